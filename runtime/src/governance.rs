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

mod config;
pub use config::{GovernanceConfig, ModelConfig};

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_models::signing::TrustedKey;
use outpost_models::{LoadedModel, ModelError};
use serde::{Deserialize, Serialize};

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::aggregate::Aggregate;
use crate::inference::{ModelSet, ModelSlot, Runner, swap_problems};
use crate::metrics::Metrics;

/// The id of the model the configuration names (`model.path` or the
/// bundled one), when no registry version is active.
pub const CONFIGURED: &str = "configured";

/// Layout version of `registry.json`.
pub const REGISTRY_SCHEMA: u32 = 1;

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
    #[error("{path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A trusted key file could not be read.
    #[error("trusted key {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The requested change is not possible.
    #[error("{0}")]
    Refused(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GovernanceError + '_ {
    move |source| GovernanceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

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
            let key = outpost_models::signing::read_public_key(path).map_err(|e| {
                GovernanceError::Key {
                    path: path.clone(),
                    message: e.to_string(),
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

/// One change of the registry's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryEvent {
    /// Number of the change, from 1.
    pub n: u64,
    /// Wall-clock time, ms since the epoch.
    pub ts_ms: i64,
    /// `install`, `shadow`, `promote`, `rollback`, `reject_candidate`,
    /// `probation_passed`, `activation_failed`.
    pub action: String,
    /// The version concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The version it replaced, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// `cli` (an operator) or `auto` (the gateway).
    pub by: String,
}

/// `registry.json`: the desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryState {
    /// [`REGISTRY_SCHEMA`].
    pub schema: u32,
    /// Incremented by every change; the gateway applies a state once.
    pub generation: u64,
    /// The active version (`None`: [`CONFIGURED`]).
    #[serde(default)]
    pub active: Option<String>,
    /// The version run in shadow.
    #[serde(default)]
    pub candidate: Option<String>,
    /// Versions active before, most recent last ([`CONFIGURED`] for the configured model).
    #[serde(default)]
    pub previous: Vec<String>,
    /// After a promotion: the version replaced, run in shadow during the probation.
    #[serde(default)]
    pub probation: Option<String>,
    /// Every change.
    #[serde(default)]
    pub history: Vec<HistoryEvent>,
}

impl Default for RegistryState {
    fn default() -> Self {
        Self {
            schema: REGISTRY_SCHEMA,
            generation: 0,
            active: None,
            candidate: None,
            previous: Vec::new(),
            probation: None,
            history: Vec::new(),
        }
    }
}

impl RegistryState {
    /// The active version's id ([`CONFIGURED`] when none is).
    pub fn active_id(&self) -> &str {
        self.active.as_deref().unwrap_or(CONFIGURED)
    }

    /// The model to run in shadow: the candidate, else the probation baseline.
    pub fn shadow_id(&self) -> Option<&str> {
        self.candidate.as_deref().or(self.probation.as_deref())
    }

    /// Append a history event.
    pub fn record(
        &mut self,
        action: &str,
        model: Option<&str>,
        from: Option<&str>,
        reason: &str,
        by: &str,
    ) -> HistoryEvent {
        let ev = HistoryEvent {
            n: self.history.last().map_or(1, |h| h.n + 1),
            ts_ms: crate::clock::now_ms(),
            action: action.into(),
            model: model.map(str::to_string),
            from: from.map(str::to_string),
            reason: reason.into(),
            by: by.into(),
        };
        self.history.push(ev.clone());
        ev
    }

    /// Run `candidate` in shadow.
    pub fn shadow(&mut self, candidate: &str, by: &str) -> Result<HistoryEvent, GovernanceError> {
        if self.active_id() == candidate {
            return Err(GovernanceError::Refused(format!(
                "{candidate} is already active"
            )));
        }
        if let Some(b) = &self.probation {
            return Err(GovernanceError::Refused(format!(
                "{} is on probation (baseline {b} in shadow): wait for it to pass, or promote or roll back first",
                self.active_id()
            )));
        }
        let from = self.candidate.replace(candidate.to_string());
        Ok(self.record("shadow", Some(candidate), from.as_deref(), "", by))
    }

    /// Make `version` (default: the candidate) active; the one it replaces
    /// goes on the rollback stack and, with `probation`, runs in shadow
    /// while the new one is on probation.
    pub fn promote(
        &mut self,
        version: Option<&str>,
        probation: bool,
        by: &str,
    ) -> Result<HistoryEvent, GovernanceError> {
        let target = match version.or(self.candidate.as_deref()) {
            Some(v) => v.to_string(),
            None => {
                return Err(GovernanceError::Refused(
                    "nothing to promote: no candidate in shadow and no version given".into(),
                ));
            }
        };
        if self.active_id() == target {
            return Err(GovernanceError::Refused(format!(
                "{target} is already active"
            )));
        }
        let from = self.active_id().to_string();
        self.previous.push(from.clone());
        self.active = Some(target.clone());
        if self.candidate.as_deref() == Some(&target) {
            self.candidate = None;
        }
        self.probation = probation.then(|| from.clone());
        Ok(self.record("promote", Some(&target), Some(&from), "", by))
    }

    /// Go back to the version active before this one.
    pub fn rollback(&mut self, reason: &str, by: &str) -> Result<HistoryEvent, GovernanceError> {
        let Some(back) = self.previous.pop() else {
            return Err(GovernanceError::Refused(
                "nothing to roll back to: no version was active before this one".into(),
            ));
        };
        let from = self.active_id().to_string();
        self.active = (back != CONFIGURED).then(|| back.clone());
        self.probation = None;
        Ok(self.record("rollback", Some(&back), Some(&from), reason, by))
    }

    /// Stop the candidate's shadow run.
    pub fn reject_candidate(
        &mut self,
        reason: &str,
        by: &str,
    ) -> Result<HistoryEvent, GovernanceError> {
        let Some(c) = self.candidate.take() else {
            return Err(GovernanceError::Refused("no candidate in shadow".into()));
        };
        Ok(self.record("reject_candidate", Some(&c), None, reason, by))
    }

    /// `id` could not be loaded or verified by the gateway, which runs
    /// `running`: the desired state goes back to what runs, so that it never
    /// names a model that is not running.
    pub fn refuse(&mut self, id: &str, running: &str, why: &str) -> HistoryEvent {
        if self.active_id() == id {
            if self.previous.last().map(String::as_str) == Some(running) {
                self.previous.pop();
            }
            self.active = (running != CONFIGURED).then(|| running.to_string());
            self.probation = None;
        }
        if self.candidate.as_deref() == Some(id) {
            self.candidate = None;
        }
        if self.probation.as_deref() == Some(id) {
            self.probation = None;
        }
        self.record("activation_failed", Some(id), None, why, "auto")
    }

    /// The probation ended well.
    pub fn end_probation(&mut self, by: &str) -> Option<HistoryEvent> {
        let baseline = self.probation.take()?;
        let active = self.active_id().to_string();
        Some(self.record("probation_passed", Some(&active), Some(&baseline), "", by))
    }
}

/// The registry directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

/// An exclusive lock on the registry, released when dropped.
struct RegistryLock {
    _file: File,
}

impl Registry {
    /// The registry in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, GovernanceError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    /// The directory of an installed version.
    pub fn artifact_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn lock(&self) -> Result<RegistryLock, GovernanceError> {
        use std::os::fd::AsRawFd;
        let path = self.dir.join("registry.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(GovernanceError::Io {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(RegistryLock { _file: file })
    }

    /// The desired state (the default when the registry is new).
    pub fn state(&self) -> Result<RegistryState, GovernanceError> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let s: RegistryState =
                    serde_json::from_slice(&bytes).map_err(|e| GovernanceError::State {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                if s.schema != REGISTRY_SCHEMA {
                    return Err(GovernanceError::State {
                        path,
                        message: format!("schema {} is not supported", s.schema),
                    });
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryState::default()),
            Err(e) => Err(GovernanceError::Io { path, source: e }),
        }
    }

    /// Change the state under the lock; the change is on disk (fsynced,
    /// replaced atomically) when this returns.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut RegistryState) -> Result<T, GovernanceError>,
    ) -> Result<(T, RegistryState), GovernanceError> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let out = f(&mut state)?;
        state.generation += 1;
        let path = self.state_path();
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| GovernanceError::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &bytes)?;
        Ok((out, state))
    }

    /// Installed versions, sorted.
    pub fn versions(&self) -> Result<Vec<String>, GovernanceError> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let e = e.map_err(io(&self.dir))?;
            let name = e.file_name().to_string_lossy().to_string();
            if e.path()
                .join(outpost_models::artifact::MANIFEST_FILE)
                .is_file()
                && name.contains('@')
            {
                v.push(name);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Verify the artifact in `src` under `trust` and copy it into the
    /// registry as `name@version`. Installing the same files again is a
    /// no-op; different files under an installed `name@version` are refused
    /// (versions are immutable).
    pub fn install(&self, src: &Path, trust: &Trust) -> Result<String, GovernanceError> {
        let loaded = load_artifact(src, trust, &burn::tensor::Device::flex())?;
        let m = loaded.model.manifest();
        let id = m.id();
        let mut files: Vec<String> = m.files.keys().cloned().collect();
        files.push(outpost_models::artifact::MANIFEST_FILE.to_string());
        if src.join(outpost_models::signing::SIGNATURE_FILE).is_file() {
            files.push(outpost_models::signing::SIGNATURE_FILE.to_string());
        }
        let dest = self.artifact_dir(&id);
        if dest.exists() {
            for f in &files {
                let a = std::fs::read(src.join(f)).map_err(io(&src.join(f)))?;
                let b = std::fs::read(dest.join(f)).unwrap_or_default();
                if a != b {
                    return Err(GovernanceError::Refused(format!(
                        "{id} is already installed with a different {f}: versions are immutable, publish a new version"
                    )));
                }
            }
            return Ok(id);
        }
        let tmp = self.dir.join(format!(".{id}.installing"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        for f in &files {
            let bytes = std::fs::read(src.join(f)).map_err(io(&src.join(f)))?;
            write_synced(&tmp.join(f), &bytes)?;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        sync_dir(&self.dir)?;
        self.update(|s| Ok(s.record("install", Some(&id), None, "", "cli")))?;
        Ok(id)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), GovernanceError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), GovernanceError> {
    outpost_storage::fsutil::sync_dir(dir).map_err(io(dir))
}

/// Replace `path` with `bytes` atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), GovernanceError> {
    outpost_storage::fsutil::write_atomic(path, bytes).map_err(io(path))
}

/// What the governor learns from one aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The active model (`name@version`).
    pub active: String,
    /// Inferences of the active model in the window.
    pub inferences: u64,
    /// Its anomaly rate (detectors).
    pub anomaly_rate: Option<f64>,
    /// Its mean score.
    pub mean_score: Option<f64>,
    /// The shadow model, its inferences and its agreement with the active one.
    pub shadow: Option<(String, u64, f64)>,
}

impl Observation {
    /// From an aggregate.
    pub fn of(a: &Aggregate) -> Self {
        Self {
            active: format!("{}@{}", a.model.name, a.model.version),
            inferences: a.inferences,
            anomaly_rate: a.anomaly_rate,
            mean_score: a.score.as_ref().map(|s| s.mean),
            shadow: a.shadow.as_ref().map(|s| {
                (
                    format!("{}@{}", s.model.name, s.model.version),
                    s.inferences,
                    s.agreement,
                )
            }),
        }
    }
}

/// What the governor decides. Each verdict names the state it was made in,
/// so that it is only carried out if the registry is still in that state (an
/// operator may have changed it meanwhile).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to do.
    Continue,
    /// Stop the candidate's shadow run.
    RejectCandidate {
        /// The candidate.
        candidate: String,
        /// Why.
        why: String,
    },
    /// Roll the model on probation back to its baseline.
    Rollback {
        /// The model on probation.
        model: String,
        /// The model it replaced.
        baseline: String,
        /// Why.
        why: String,
    },
    /// The probation is over.
    ProbationPassed {
        /// The model that passed.
        model: String,
        /// The model it replaced.
        baseline: String,
    },
}

/// Thresholds of the governor.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Least agreement with the shadow / baseline.
    pub min_agreement: f64,
    /// Fewest inferences (active, or shadow for agreement) for an aggregate to count.
    pub min_inferences: u64,
    /// Aggregates that must pass before a probation ends.
    pub probation_windows: u32,
    /// Highest anomaly rate of a model on probation.
    pub max_anomaly_rate: Option<f64>,
    /// Lowest mean score of a model on probation.
    pub min_mean_score: Option<f64>,
}

impl From<&GovernanceConfig> for Thresholds {
    fn from(c: &GovernanceConfig) -> Self {
        Self {
            min_agreement: c.min_agreement,
            min_inferences: c.min_inferences,
            probation_windows: c.probation_windows,
            max_anomaly_rate: c.max_anomaly_rate,
            min_mean_score: c.min_mean_score,
        }
    }
}

/// What the governor watches for.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Steady,
    Shadow {
        candidate: String,
    },
    Probation {
        model: String,
        baseline: String,
        passed: u32,
    },
}

/// The shadow/probation state machine. No I/O: it reads observations and
/// returns verdicts; the governance task acts on them.
#[derive(Debug, Clone)]
pub struct Governor {
    thresholds: Thresholds,
    phase: Phase,
}

impl Governor {
    /// A governor with these thresholds, watching nothing yet.
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            phase: Phase::Steady,
        }
    }

    /// Follow the registry's desired state.
    pub fn follow(&mut self, state: &RegistryState) {
        let next = if let Some(c) = &state.candidate {
            Phase::Shadow {
                candidate: c.clone(),
            }
        } else if let Some(b) = &state.probation {
            let model = state.active_id().to_string();
            match &self.phase {
                // Keep the count of a probation already under way.
                Phase::Probation {
                    model: m,
                    baseline,
                    passed,
                } if *m == model && baseline == b => Phase::Probation {
                    model,
                    baseline: b.clone(),
                    passed: *passed,
                },
                _ => Phase::Probation {
                    model,
                    baseline: b.clone(),
                    passed: 0,
                },
            }
        } else {
            Phase::Steady
        };
        self.phase = next;
    }

    /// Judge one aggregate.
    pub fn observe(&mut self, o: &Observation) -> Verdict {
        let t = &self.thresholds;
        match &mut self.phase {
            Phase::Steady => Verdict::Continue,
            Phase::Shadow { candidate } => match &o.shadow {
                Some((id, n, agreement)) if id == candidate && *n >= t.min_inferences => {
                    if *agreement < t.min_agreement {
                        let why = format!(
                            "agreement {agreement:.3} with {} under {} over {n} windows",
                            o.active, t.min_agreement
                        );
                        let candidate = candidate.clone();
                        self.phase = Phase::Steady;
                        Verdict::RejectCandidate { candidate, why }
                    } else {
                        Verdict::Continue
                    }
                }
                _ => Verdict::Continue,
            },
            Phase::Probation {
                model,
                baseline,
                passed,
            } => {
                if o.active != *model || o.inferences < t.min_inferences {
                    return Verdict::Continue;
                }
                let mut why = Vec::new();
                if let Some((id, n, agreement)) = &o.shadow
                    && id == baseline
                    && *n >= t.min_inferences
                    && *agreement < t.min_agreement
                {
                    why.push(format!(
                        "agreement {agreement:.3} with {baseline} under {}",
                        t.min_agreement
                    ));
                }
                if let (Some(max), Some(rate)) = (t.max_anomaly_rate, o.anomaly_rate)
                    && rate > max
                {
                    why.push(format!("anomaly rate {rate:.3} above {max}"));
                }
                if let (Some(min), Some(mean)) = (t.min_mean_score, o.mean_score)
                    && mean < min
                {
                    why.push(format!("mean score {mean:.3} under {min}"));
                }
                if !why.is_empty() {
                    let why = format!("{model} on probation: {}", why.join("; "));
                    let (model, baseline) = (model.clone(), baseline.clone());
                    self.phase = Phase::Steady;
                    return Verdict::Rollback {
                        model,
                        baseline,
                        why,
                    };
                }
                *passed += 1;
                if *passed >= t.probation_windows {
                    let (model, baseline) = (model.clone(), baseline.clone());
                    self.phase = Phase::Steady;
                    Verdict::ProbationPassed { model, baseline }
                } else {
                    Verdict::Continue
                }
            }
        }
    }
}

/// Loaded models by id, so that switching back and forth does not reload.
#[derive(Debug, Default)]
pub struct ModelCache {
    runners: BTreeMap<String, Arc<crate::inference::Runner>>,
}

impl ModelCache {
    /// Remember a runner under `id`.
    pub fn insert(&mut self, id: &str, r: Arc<crate::inference::Runner>) {
        self.runners.insert(id.to_string(), r);
    }

    /// The runner of `id`, if loaded.
    pub fn get(&self, id: &str) -> Option<Arc<crate::inference::Runner>> {
        self.runners.get(id).cloned()
    }

    /// Forget every runner but those in `keep`.
    pub fn retain(&mut self, keep: &[&str]) {
        self.runners.retain(|k, _| keep.contains(&k.as_str()));
    }
}

/// The audit log, shared by the stages that write to it.
pub type SharedAudit = Arc<std::sync::Mutex<crate::audit::AuditLog>>;

/// Append entries to the audit log and commit them; a failure is logged and
/// counted, never fatal (the gateway keeps running without a record rather
/// than stopping the data). Returns whether the entries are on disk (true
/// without an audit log).
pub fn audit(
    audit: &Option<SharedAudit>,
    metrics: &Metrics,
    entries: &[(&str, serde_json::Value)],
) -> bool {
    let Some(a) = audit else { return true };
    let mut log = a.lock().unwrap_or_else(|e| e.into_inner());
    let r = entries
        .iter()
        .try_for_each(|(kind, data)| log.append(kind, data.clone()).map(|_| ()))
        .and_then(|_| log.commit());
    match r {
        Ok(()) => {
            metrics.audit_entries.inc_by(entries.len() as u64);
            metrics.set_audit_head(log.committed());
            true
        }
        Err(e) => {
            metrics.audit_errors.inc();
            tracing::error!(error = %e, "cannot write the audit log");
            false
        }
    }
}

/// The part of the gateway that follows the registry and acts on the
/// governor's verdicts.
pub struct GovernanceTask {
    /// The registry.
    pub registry: Registry,
    /// Which models may load.
    pub trust: Trust,
    /// The configured model (`model.path` or bundled).
    pub configured: Arc<Runner>,
    /// Where the inference thread takes its models.
    pub slot: Arc<ModelSlot>,
    /// The audit log.
    pub audit: Option<SharedAudit>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Thresholds.
    pub thresholds: Thresholds,
    /// Run the replaced model in shadow after a promotion.
    pub probation: bool,
    /// How often to look at the registry.
    pub poll: Duration,
    governor: Governor,
    cache: ModelCache,
    applied: Option<u64>,
}

impl GovernanceTask {
    /// A task over `registry`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Registry,
        trust: Trust,
        configured: Arc<Runner>,
        slot: Arc<ModelSlot>,
        audit: Option<SharedAudit>,
        metrics: Arc<Metrics>,
        cfg: &GovernanceConfig,
    ) -> Self {
        let thresholds = Thresholds::from(cfg);
        Self {
            registry,
            trust,
            configured,
            slot,
            audit,
            metrics,
            governor: Governor::new(thresholds.clone()),
            thresholds,
            probation: cfg.probation_windows > 0,
            poll: Duration::from_millis(cfg.poll_interval_ms),
            cache: ModelCache::default(),
            applied: None,
        }
    }

    /// The runner of `id`: the configured model, a cached one, or the
    /// registry's artifact loaded and verified now.
    async fn runner(&mut self, id: &str) -> Result<(Arc<Runner>, Option<String>), GovernanceError> {
        if id == CONFIGURED {
            return Ok((self.configured.clone(), None));
        }
        if let Some(r) = self.cache.get(id) {
            return Ok((r, None));
        }
        let dir = self.registry.artifact_dir(id);
        let trust = self.trust.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            load_artifact(&dir, &trust, &burn::tensor::Device::flex())
        })
        .await
        .map_err(|e| GovernanceError::Refused(format!("loading {id} panicked: {e}")))??;
        if loaded.model.manifest().id() != id {
            return Err(GovernanceError::Refused(format!(
                "the registry's {id} holds {}",
                loaded.model.manifest().id()
            )));
        }
        let problems = swap_problems(self.configured.manifest(), loaded.model.manifest());
        if !problems.is_empty() {
            return Err(GovernanceError::Refused(format!(
                "{id} cannot replace {} without a restart: {}",
                self.configured.id,
                problems.join("; ")
            )));
        }
        let r = Runner::new(Arc::new(loaded.model));
        self.cache.insert(id, r.clone());
        Ok((r, loaded.key_id))
    }

    /// Audit the registry changes made since the last one audited.
    fn audit_history(&self, state: &RegistryState) {
        let cursor = self.registry.dir().join("audited");
        let done: u64 = std::fs::read_to_string(&cursor)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let owned: Vec<(String, serde_json::Value)> = state
            .history
            .iter()
            .filter(|h| h.n > done)
            .map(|h| {
                (
                    format!("{}{}", crate::audit::kinds::MODEL_REGISTRY_PREFIX, h.action),
                    serde_json::to_value(h).unwrap_or_default(),
                )
            })
            .collect();
        let new: Vec<(&str, serde_json::Value)> =
            owned.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        if new.is_empty() {
            return;
        }
        // The cursor moves only past what was written: a failed write is
        // retried with the next state.
        if !audit(&self.audit, &self.metrics, &new) || self.audit.is_none() {
            return;
        }
        if let Some(last) = state.history.last()
            && let Err(e) = write_atomic(&cursor, last.n.to_string().as_bytes())
        {
            tracing::warn!(error = %e, "cannot record the audited registry history");
        }
    }

    fn audit_loaded(&self, r: &Runner, role: &str, key_id: Option<String>) {
        audit(
            &self.audit,
            &self.metrics,
            &[(
                crate::audit::kinds::MODEL_LOADED,
                serde_json::json!({
                    "model": &*r.id,
                    "role": role,
                    "weights_sha256": weights_sha256(r),
                    "signed_by": key_id,
                }),
            )],
        );
    }

    /// Make the running models what `state` asks for.
    pub async fn apply(&mut self, state: &RegistryState) {
        self.audit_history(state);
        let mut failures = Vec::new();
        let current = self.slot.current();
        let active = match self.runner(state.active_id()).await {
            Ok((r, key_id)) => {
                if r.id != current.active.id {
                    self.audit_loaded(&r, "active", key_id);
                }
                r
            }
            Err(e) => {
                tracing::error!(error = %e, "the registry's active model is refused; the running one stays");
                failures.push((state.active_id().to_string(), e.to_string()));
                current.active.clone()
            }
        };
        let is_active = |id: &str| {
            id == &*active.id || (id == CONFIGURED && Arc::ptr_eq(&active, &self.configured))
        };
        let shadow = match state.shadow_id() {
            Some(id) if is_active(id) => None,
            Some(id) => match self.runner(id).await {
                Ok((r, key_id)) => {
                    if current.shadow.as_ref().map(|s| &s.id) != Some(&r.id) {
                        self.audit_loaded(&r, "shadow", key_id);
                    }
                    Some(r)
                }
                Err(e) => {
                    tracing::error!(error = %e, "the shadow model is refused; running without it");
                    failures.push((id.to_string(), e.to_string()));
                    None
                }
            },
            None => None,
        };
        let changed = active.id != current.active.id
            || shadow.as_ref().map(|s| &s.id) != current.shadow.as_ref().map(|s| &s.id);
        if changed {
            tracing::info!(active = %active.id, shadow = ?shadow.as_ref().map(|s| &s.id), generation = state.generation, "models activated");
            audit(
                &self.audit,
                &self.metrics,
                &[(
                    crate::audit::kinds::MODEL_ACTIVATED,
                    serde_json::json!({
                        "active": &*active.id,
                        "shadow": shadow.as_ref().map(|s| s.id.to_string()),
                        "generation": state.generation,
                    }),
                )],
            );
            self.metrics.set_model(&crate::metrics::ModelStatus {
                name: active.manifest().name.clone(),
                version: active.manifest().version.clone(),
                weights_sha256: weights_sha256(&active),
                device: String::new(),
            });
            self.metrics.model_swaps.inc();
            self.slot.replace(ModelSet {
                active: active.clone(),
                shadow: shadow.clone(),
            });
        }
        let keep: Vec<&str> = [Some(&*active.id), shadow.as_ref().map(|s| &*s.id)]
            .into_iter()
            .flatten()
            .collect();
        self.cache.retain(&keep);
        self.governor.follow(state);
        self.applied = Some(state.generation);
        for (id, why) in failures {
            self.metrics.model_refused.inc();
            audit(
                &self.audit,
                &self.metrics,
                &[(
                    crate::audit::kinds::MODEL_REFUSED,
                    serde_json::json!({ "model": id, "reason": why }),
                )],
            );
            // The registry calls the configured model CONFIGURED, not by its id.
            let running = if Arc::ptr_eq(&active, &self.configured) {
                CONFIGURED.to_string()
            } else {
                active.id.to_string()
            };
            match self.registry.update(|s| Ok(s.refuse(&id, &running, &why))) {
                Ok((_, s)) => {
                    self.audit_history(&s);
                    // The desired state now names what runs; the next poll
                    // applies it (and whatever the CLI wrote meanwhile).
                    self.applied = None;
                }
                Err(e) => tracing::error!(error = %e, "cannot record the refusal in the registry"),
            }
        }
    }

    /// Read the registry and apply it if it changed since the last time.
    pub async fn poll_once(&mut self) {
        match self.registry.state() {
            Ok(s) if Some(s.generation) != self.applied => self.apply(&s).await,
            Ok(_) => {}
            Err(e) => {
                if self.applied.is_some() {
                    tracing::error!(error = %e, "cannot read the model registry; keeping the running models");
                }
                // Do not log again until it changes.
                self.applied = Some(u64::MAX);
            }
        }
    }

    async fn act(&mut self, verdict: Verdict) {
        let stale = || GovernanceError::Refused("the registry changed meanwhile".into());
        let (result, kind) = match &verdict {
            Verdict::Continue => return,
            Verdict::RejectCandidate { candidate, why } => {
                tracing::warn!(%candidate, reason = %why, "shadow candidate rejected");
                (
                    self.registry.update(|s| {
                        if s.candidate.as_deref() != Some(candidate) {
                            return Err(stale());
                        }
                        s.reject_candidate(why, "auto")
                    }),
                    "candidate_rejected",
                )
            }
            Verdict::Rollback {
                model,
                baseline,
                why,
            } => {
                tracing::warn!(%model, %baseline, reason = %why, "automatic rollback");
                (
                    self.registry.update(|s| {
                        if s.active_id() != model || s.probation.as_deref() != Some(baseline) {
                            return Err(stale());
                        }
                        s.rollback(why, "auto")
                    }),
                    "rollback",
                )
            }
            Verdict::ProbationPassed { model, baseline } => {
                tracing::info!(%model, "probation passed");
                (
                    self.registry.update(|s| {
                        if s.active_id() != model || s.probation.as_deref() != Some(baseline) {
                            return Err(stale());
                        }
                        s.end_probation("auto").ok_or_else(stale)
                    }),
                    "probation_passed",
                )
            }
        };
        match result {
            Ok((_, state)) => {
                if kind == "rollback" {
                    self.metrics.model_rollbacks.inc();
                }
                self.apply(&state).await
            }
            Err(e) => {
                tracing::warn!(error = %e, action = kind, "the governor's decision was not carried out")
            }
        }
    }

    /// Follow the registry and the aggregates until `stop`.
    pub async fn run(
        mut self,
        observations: flume::Receiver<Observation>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.poll_once().await,
                o = observations.recv_async() => match o {
                    Ok(o) => {
                        let v = self.governor.observe(&o);
                        self.act(v).await;
                    }
                    Err(_) => return,
                },
            }
        }
    }
}

fn weights_sha256(r: &Runner) -> String {
    let m = r.manifest();
    m.files.get(&m.weights).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds {
            min_agreement: 0.8,
            min_inferences: 5,
            probation_windows: 3,
            max_anomaly_rate: Some(0.5),
            min_mean_score: None,
        }
    }

    fn obs(
        active: &str,
        shadow: Option<(&str, u64, f64)>,
        anomaly_rate: Option<f64>,
    ) -> Observation {
        Observation {
            active: active.into(),
            inferences: 10,
            anomaly_rate,
            mean_score: Some(0.9),
            shadow: shadow.map(|(id, n, a)| (id.to_string(), n, a)),
        }
    }

    #[test]
    fn state_promote_rollback_and_history() {
        let mut s = RegistryState::default();
        assert_eq!(s.active_id(), CONFIGURED);
        assert!(s.rollback("", "cli").is_err(), "nothing to roll back to");
        assert!(s.promote(None, true, "cli").is_err(), "no candidate");
        s.shadow("m@1.1.0", "cli").unwrap();
        assert_eq!(s.shadow_id(), Some("m@1.1.0"));
        s.promote(None, true, "cli").unwrap();
        assert_eq!(s.active_id(), "m@1.1.0");
        assert_eq!(s.candidate, None);
        assert_eq!(s.probation.as_deref(), Some(CONFIGURED));
        assert_eq!(
            s.shadow_id(),
            Some(CONFIGURED),
            "the baseline runs in shadow"
        );
        s.promote(Some("m@1.2.0"), false, "cli").unwrap();
        assert_eq!(s.previous, vec![CONFIGURED.to_string(), "m@1.1.0".into()]);
        assert_eq!(s.probation, None);
        s.rollback("bad", "auto").unwrap();
        assert_eq!(s.active_id(), "m@1.1.0");
        s.rollback("worse", "cli").unwrap();
        assert_eq!(s.active, None, "back to the configured model");
        let actions: Vec<&str> = s.history.iter().map(|h| h.action.as_str()).collect();
        assert_eq!(
            actions,
            vec!["shadow", "promote", "promote", "rollback", "rollback"]
        );
        let ns: Vec<u64> = s.history.iter().map(|h| h.n).collect();
        assert_eq!(ns, vec![1, 2, 3, 4, 5]);
        assert_eq!(s.history[3].reason, "bad");
        assert_eq!(s.history[3].by, "auto");
    }

    #[test]
    fn a_refused_activation_puts_back_what_runs() {
        let mut s = RegistryState::default();
        s.promote(Some("m@1.0.0"), false, "cli").unwrap();
        s.promote(Some("m@2.0.0"), true, "cli").unwrap();
        s.refuse("m@2.0.0", "m@1.0.0", "bad signature");
        assert_eq!(s.active_id(), "m@1.0.0");
        assert_eq!(
            s.previous,
            vec![CONFIGURED.to_string()],
            "no rollback to itself"
        );
        assert_eq!(s.probation, None);
        assert_eq!(s.history.last().unwrap().action, "activation_failed");
        s.shadow("m@3.0.0", "cli").unwrap();
        s.refuse("m@3.0.0", "m@1.0.0", "checksum");
        assert_eq!((s.active_id(), s.candidate.as_deref()), ("m@1.0.0", None));
    }

    #[test]
    fn a_disagreeing_candidate_is_rejected() {
        let mut s = RegistryState::default();
        s.shadow("m@2.0.0", "cli").unwrap();
        let mut g = Governor::new(thresholds());
        g.follow(&s);
        assert_eq!(
            g.observe(&obs("m@1.0.0", Some(("m@2.0.0", 10, 0.95)), None)),
            Verdict::Continue
        );
        assert_eq!(
            g.observe(&obs("m@1.0.0", Some(("m@2.0.0", 3, 0.1)), None)),
            Verdict::Continue,
            "too few windows to judge"
        );
        match g.observe(&obs("m@1.0.0", Some(("m@2.0.0", 10, 0.5)), None)) {
            Verdict::RejectCandidate { candidate, why } => {
                assert_eq!(candidate, "m@2.0.0");
                assert!(why.contains("0.500"), "{why}")
            }
            v => panic!("expected a rejection, got {v:?}"),
        }
    }

    #[test]
    fn probation_rolls_back_on_a_breach_and_passes_otherwise() {
        let mut s = RegistryState::default();
        s.promote(Some("m@2.0.0"), true, "cli").unwrap();
        let mut g = Governor::new(thresholds());
        g.follow(&s);
        // Another model's aggregates (before the swap reached inference) do not count.
        assert_eq!(
            g.observe(&obs(CONFIGURED, None, Some(0.9))),
            Verdict::Continue
        );
        assert_eq!(
            g.observe(&obs("m@2.0.0", Some((CONFIGURED, 10, 0.9)), Some(0.1))),
            Verdict::Continue
        );
        match g.observe(&obs("m@2.0.0", Some((CONFIGURED, 10, 0.9)), Some(0.7))) {
            Verdict::Rollback {
                model,
                baseline,
                why,
            } => {
                assert_eq!((model.as_str(), baseline.as_str()), ("m@2.0.0", CONFIGURED));
                assert!(why.contains("anomaly rate 0.700"), "{why}")
            }
            v => panic!("expected a rollback, got {v:?}"),
        }
        let mut g = Governor::new(thresholds());
        g.follow(&s);
        match g.observe(&obs("m@2.0.0", Some((CONFIGURED, 10, 0.2)), Some(0.1))) {
            Verdict::Rollback { why, .. } => assert!(why.contains("agreement 0.200"), "{why}"),
            v => panic!("expected a rollback, got {v:?}"),
        }
        let mut g = Governor::new(thresholds());
        g.follow(&s);
        let good = obs("m@2.0.0", Some((CONFIGURED, 10, 0.9)), Some(0.1));
        assert_eq!(g.observe(&good), Verdict::Continue);
        assert_eq!(g.observe(&good), Verdict::Continue);
        // Re-reading the same state keeps the count.
        g.follow(&s);
        assert!(matches!(g.observe(&good), Verdict::ProbationPassed { .. }));
        assert_eq!(g.observe(&good), Verdict::Continue, "steady afterwards");
    }

    #[test]
    fn registry_updates_are_durable_and_numbered() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        assert_eq!(r.state().unwrap(), RegistryState::default());
        let (_, s) = r.update(|s| s.shadow("m@1.0.0", "cli")).unwrap();
        assert_eq!(s.generation, 1);
        let (_, s) = r.update(|s| s.promote(None, false, "cli")).unwrap();
        assert_eq!(s.generation, 2);
        let back = Registry::open(dir.path()).unwrap().state().unwrap();
        assert_eq!(back, s);
        assert!(r.update(|s| s.reject_candidate("x", "cli")).is_err());
        assert_eq!(
            r.state().unwrap().generation,
            2,
            "a refused change writes nothing"
        );
        std::fs::write(dir.path().join("registry.json"), b"{not json").unwrap();
        assert!(matches!(r.state(), Err(GovernanceError::State { .. })));
    }
}
