//! The errors of model governance.

use std::path::{Path, PathBuf};

use outpost_models::ModelError;
use outpost_models::signing::SigningError;

/// Errors of model governance.
#[derive(Debug, thiserror::Error)]
pub enum GovernanceError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The model could not be loaded or verified.
    #[error("model {id}: {source}")]
    Model {
        /// `name@version` or a path.
        id: String,
        /// The cause.
        source: ModelError,
    },
    /// `registry.json` is not valid.
    #[error("{path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: StateProblem,
    },
    /// A trusted key file could not be read.
    #[error("trusted key {path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: SigningError,
    },
    /// Loading a model panicked.
    #[error("loading {id} panicked: {source}")]
    Panicked {
        /// `name@version`.
        id: String,
        /// The cause.
        source: tokio::task::JoinError,
    },
    /// The requested change is not possible.
    #[error("{0}")]
    Refused(String),
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GovernanceError + '_ {
    move |source| GovernanceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What is wrong with `registry.json`.
#[derive(Debug, thiserror::Error)]
pub enum StateProblem {
    /// Not valid JSON, or not a registry state.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A layout this version does not read.
    #[error("schema {0} is not supported")]
    Schema(u32),
}
