//! Which models may be loaded from disk, and loading one under that trust.

use std::path::Path;

use outpost_models::LoadedModel;
use outpost_models::signing::TrustedKey;

use super::{GovernanceConfig, GovernanceError};

/// Which models may be loaded from disk.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Publishers' public keys.
    pub keys: Vec<TrustedKey>,
    /// Refuse a model that is not signed by one of `keys`.
    pub require_signature: bool,
}

impl Trust {
    /// From `governance.trusted_keys` and `governance.require_signature`
    /// (default: required as soon as a key is configured).
    pub fn from_config(cfg: &GovernanceConfig) -> Result<Self, GovernanceError> {
        let mut keys = Vec::new();
        for path in &cfg.trusted_keys {
            let key = outpost_models::signing::read_public_key(path).map_err(|source| {
                GovernanceError::Key {
                    path: path.clone(),
                    source,
                }
            })?;
            keys.push(key);
        }
        let require_signature = cfg.require_signature.unwrap_or(!keys.is_empty());
        Ok(Self {
            keys,
            require_signature,
        })
    }
}

/// A model loaded from disk, with the key that signed it.
#[derive(Debug)]
pub struct Loaded {
    /// The model.
    pub model: LoadedModel,
    /// Id of the publisher key whose signature was verified; `None` when
    /// signatures are not required and the artifact was loaded unverified.
    pub key_id: Option<String>,
}

/// Load an artifact directory under `trust`: with signatures required, the
/// manifest's signature must verify against a trusted key before any file
/// is used (and every file's sha256 must match the manifest, always).
pub fn load_artifact(
    dir: &Path,
    trust: &Trust,
    device: &burn::tensor::Device,
) -> Result<Loaded, GovernanceError> {
    let err = |source| GovernanceError::Model {
        id: dir.display().to_string(),
        source,
    };
    if trust.require_signature {
        let (model, key_id) =
            LoadedModel::load_dir_signed(dir, device, &trust.keys).map_err(err)?;
        Ok(Loaded {
            model,
            key_id: Some(key_id),
        })
    } else {
        let model = LoadedModel::load_dir(dir, device).map_err(err)?;
        Ok(Loaded {
            model,
            key_id: None,
        })
    }
}
