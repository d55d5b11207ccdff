//! An artifact's files against its manifest: reading them, parsing and
//! checking `manifest.json`, and verifying the sha256 of every file it
//! lists. Shared by loading ([`crate::artifact`]) and signing
//! ([`crate::signing`]), which sits between the two.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::ModelError;
use crate::manifest::Manifest;

/// sha256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Parse and check a manifest; `origin` names it in errors.
pub(crate) fn parse_manifest(text: &[u8], origin: &str) -> Result<Manifest, ModelError> {
    let manifest: Manifest =
        serde_json::from_slice(text).map_err(|source| ModelError::ManifestSyntax {
            path: origin.to_string(),
            source,
        })?;
    let problems = manifest.problems();
    if !problems.is_empty() {
        return Err(ModelError::ManifestInvalid {
            path: origin.to_string(),
            problems,
        });
    }
    Ok(manifest)
}

pub(crate) fn verify(file: &str, bytes: &[u8], manifest: &Manifest) -> Result<(), ModelError> {
    let expected = manifest.files.get(file).cloned().unwrap_or_default();
    let actual = sha256_hex(bytes);
    if actual != expected {
        return Err(ModelError::Checksum {
            file: file.to_string(),
            expected,
            actual,
        });
    }
    Ok(())
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Read every file `manifest` lists from `dir` and check its sha256; returns
/// the bytes of the weights, as read (so that what was hashed is what is loaded).
pub(crate) fn read_verified_files(dir: &Path, manifest: &Manifest) -> Result<Vec<u8>, ModelError> {
    let mut weights = None;
    for file in manifest.files.keys() {
        let bytes = read(&dir.join(file))?;
        verify(file, &bytes, manifest)?;
        if *file == manifest.weights {
            weights = Some(bytes);
        }
    }
    weights
        .ok_or_else(|| ModelError::Weights(format!("{} is not listed in files", manifest.weights)))
}
