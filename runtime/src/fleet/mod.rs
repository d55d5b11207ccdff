//! Fleet operations over MQTT (issue 20), the foundation: the `[fleet]`
//! configuration, the versioned documents a fleet operator and a gateway
//! exchange (desired state, reported state, commands and their results),
//! the bytes a fleet signature covers, and the trust rules that decide
//! whether a document or command may be applied ([`trust::Trust`], free of
//! I/O). The topic design, the formats with examples, the mapping onto AWS
//! IoT and Azure IoT Hub, and what is not built yet: docs/fleet.md.
//!
//! Input: documents and commands as received (bytes). Output: accepted
//! documents and commands, or a typed [`Refusal`] with its reason code.
//! Nothing here is queued: a caller checks one message at a time.

mod agent;
pub mod canonical;
mod config;
pub mod document;
pub mod trust;

pub use agent::{Agent, Setup, control};
pub use config::FleetConfig;
pub use document::{
    Command, CommandName, CommandResult, CommandStatus, ConfigChange, DesiredState, Health,
    LastError, ModelRef, ModelState, ReportedModel, ReportedState, Target,
};
pub use trust::{DesiredOutcome, Keys, Limits, Refusal, Trust, TrustMemory};

use outpost_models::signing::TrustedKey;

/// Errors of setting up fleet operations.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A trusted key file could not be read.
    #[error("{what}: {source}")]
    Key {
        /// Which setting (`fleet.trusted_keys[0]`).
        what: String,
        /// The cause.
        source: outpost_models::SigningError,
    },
    /// The stored trust memory could not be read: starting without it
    /// could accept a replay, so fleet operations stay off.
    #[error("{}: cannot read the fleet trust memory: {reason}", path.display())]
    Memory {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn read_keys(paths: &[std::path::PathBuf], setting: &str) -> Result<Vec<TrustedKey>, FleetError> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            outpost_models::signing::read_public_key(p).map_err(|source| FleetError::Key {
                what: format!("{setting}[{i}]"),
                source,
            })
        })
        .collect()
}

/// The keys of `fleet.trusted_keys` and `privacy.trusted_keys`.
pub fn load_keys(
    fleet: &FleetConfig,
    privacy: &crate::privacy::PrivacyConfig,
) -> Result<Keys, FleetError> {
    Ok(Keys {
        fleet: read_keys(&fleet.trusted_keys, "fleet.trusted_keys")?,
        privacy: read_keys(&privacy.trusted_keys, "privacy.trusted_keys")?,
    })
}
