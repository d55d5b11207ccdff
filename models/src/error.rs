//! The errors of loading and running a model ([`ModelError`]) and of
//! signing and verifying an artifact ([`SigningError`]).
//!
//! The two hold each other: loading a signed artifact fails with a
//! [`SigningError`] ([`ModelError::Signature`]), and verifying one fails with
//! the artifact's own error ([`SigningError::Artifact`], e.g. a
//! [`ModelError::Checksum`]). They live here, below [`crate::files`],
//! [`crate::signing`] and [`crate::artifact`], which all produce them, so
//! that no module imports one that imports it back. Both keep their cause:
//! I/O and JSON errors as their `source`, the inner error as a variant.

use std::path::PathBuf;

use crate::manifest::{MANIFEST_FILE, SIGNATURE_FILE};

/// Errors of loading, saving and running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the artifact could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is not valid JSON for a [`crate::Manifest`] (or could not be
    /// written as JSON).
    #[error("{path}: invalid manifest: {source}")]
    ManifestSyntax {
        /// The manifest's path (or `<embedded>`).
        path: String,
        /// What is wrong.
        source: serde_json::Error,
    },
    /// The manifest parses but describes an unusable model.
    #[error("{path}: invalid manifest: {}", problems.join("; "))]
    ManifestInvalid {
        /// The manifest's path (or `<embedded>`).
        path: String,
        /// Every problem found.
        problems: Vec<String>,
    },
    /// A file's sha256 differs from the manifest's.
    #[error(
        "{file}: sha256 {actual} does not match the manifest's {expected}: the artifact was modified or corrupted"
    )]
    Checksum {
        /// The file.
        file: String,
        /// Hash in the manifest.
        expected: String,
        /// Hash of the file as read.
        actual: String,
    },
    /// The weights do not fit the architecture the manifest describes.
    #[error("weights do not fit the manifest's architecture: {0}")]
    Weights(String),
    /// A batch given to [`crate::LoadedModel::predict`] has the wrong size.
    #[error("input has {actual} values, expected {expected} ({n} windows of {channels}×{length})")]
    InputShape {
        /// Values given.
        actual: usize,
        /// Values expected.
        expected: usize,
        /// Windows in the batch.
        n: usize,
        /// Channels per window.
        channels: usize,
        /// Samples per window.
        length: usize,
    },
    /// The backend failed to return the output.
    #[error("inference failed: {0}")]
    Backend(String),
    /// Data given to the model does not fit it.
    #[error("{0}")]
    Data(String),
    /// The artifact's signature is missing, untrusted or wrong
    /// ([`crate::LoadedModel::load_dir_signed`]).
    #[error(transparent)]
    Signature(#[from] SigningError),
}

/// Errors of signing and verifying artifacts and of reading key files.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The artifact has no `manifest.sig`.
    #[error(
        "{}: the model is not signed (no {SIGNATURE_FILE}); sign it with a trusted key or configure no trusted keys to load unsigned models",
        dir.display()
    )]
    Unsigned {
        /// The artifact directory.
        dir: PathBuf,
    },
    /// The signature names a key that is not among the trusted keys.
    #[error("the model is signed by key {key_id}, which is not a trusted key")]
    UntrustedKey {
        /// Id of the key named by the signature.
        key_id: String,
    },
    /// The signature does not match the manifest: the manifest was changed
    /// after signing, or the signature was not made by the key it names.
    #[error(
        "{}: the signature of key {key_id} does not match {MANIFEST_FILE}: the manifest was modified after signing",
        dir.display()
    )]
    BadSignature {
        /// The artifact directory.
        dir: PathBuf,
        /// Id of the key named by the signature.
        key_id: String,
    },
    /// The artifact itself is broken: unreadable or invalid manifest, or a
    /// file whose sha256 differs from the manifest's ([`ModelError::Checksum`]).
    #[error(transparent)]
    Artifact(Box<ModelError>),
    /// A key file is malformed.
    #[error("{}: invalid key file: {reason}", path.display())]
    KeyFile {
        /// The key file (or `<text>` for [`crate::signing::parse_public_key`]).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `manifest.sig` is malformed.
    #[error("{}: invalid signature file: {reason}", path.display())]
    SignatureFile {
        /// The signature file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// [`crate::signing::generate_keypair`] refuses to overwrite a file.
    #[error("{}: already exists; refusing to overwrite a key file", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl From<ModelError> for SigningError {
    fn from(e: ModelError) -> Self {
        SigningError::Artifact(Box::new(e))
    }
}
