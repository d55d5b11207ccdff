//! Model governance: the registry on disk, signature trust, shadow runs,
//! probation after a promotion and automatic rollback.
//!
//! # Registry
//!
//! `<governance.registry_dir>` (default `<gateway.state_dir>/models`) holds
//! one directory per installed version, named `name@version`, each a
//! complete, verified artifact (manifest, weights, `manifest.sig`), and
//! `registry.json`, the desired state:
//!
//! - `active`: the version the gateway runs (absent: the configured model,
//!   `model.path` or the bundled one, called [`CONFIGURED`] here);
//! - `candidate`: a version run in shadow beside the active one;
//! - `previous`: the versions that were active before, the last one first
//!   to come back on a rollback;
//! - `probation`: after a promotion, the version that was active before,
//!   run in shadow until `governance.probation_windows` aggregates passed
//!   the thresholds;
//! - `history`: every change, numbered, with who made it (`cli`, `auto`)
//!   and why.
//!
//! The `outpost models` commands change the desired state under an
//! exclusive lock (`registry.lock`) and replace the file atomically; the
//! running gateway notices the new `generation` within
//! `governance.poll_interval_ms`, loads and verifies what it names, and
//! hands the models to the inference thread between two batches (a swap
//! neither drops nor double-counts a reading). A version that fails to load
//! or verify is not activated: the gateway keeps what it runs, and logs,
//! audits and records the refusal.
//!
//! # Shadow and probation
//!
//! A candidate runs on the same windows as the active model; each aggregate
//! then carries its agreement rate and score statistics (`shadow`). The
//! [`Governor`] watches the aggregates: a candidate whose agreement falls
//! under `governance.min_agreement` (over an aggregate with at least
//! `governance.min_inferences` inferences) is rejected automatically. After
//! a promotion, the new active model is on probation: if its agreement with
//! the model it replaced falls under the threshold, or its anomaly rate
//! rises above `governance.max_anomaly_rate`, or its mean score falls below
//! `governance.min_mean_score`, the gateway rolls back on its own.

mod auditing;
mod config;
mod error;
mod governor;
mod registry;
mod task;
mod trust;

pub use auditing::{SharedAudit, audit};
pub use config::{GovernanceConfig, ModelConfig};
pub use error::{GovernanceError, StateProblem};
pub use governor::{Governor, Observation, Thresholds, Verdict};
pub(crate) use registry::write_atomic;
pub use registry::{CONFIGURED, HistoryEvent, REGISTRY_SCHEMA, Registry, RegistryState};
pub use task::{GovernanceTask, ModelCache};
pub use trust::{Loaded, Trust, load_artifact};
