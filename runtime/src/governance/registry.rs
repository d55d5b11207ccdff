//! The registry on disk: `registry.json` (the desired state, changed by
//! [`RegistryState`] without I/O), the installed versions and the lock.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::io;
use super::{GovernanceError, StateProblem, Trust, load_artifact};

/// The id of the model the configuration names (`model.path` or the
/// bundled one), when no registry version is active.
pub const CONFIGURED: &str = "configured";

/// Layout version of `registry.json`.
pub const REGISTRY_SCHEMA: u32 = 1;

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
        // Synced into its parent: a new directory is durable only then.
        outpost_storage::fsutil::create_dir_all(dir).map_err(io(dir))?;
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
                        source: StateProblem::Json(e),
                    })?;
                if s.schema != REGISTRY_SCHEMA {
                    return Err(GovernanceError::State {
                        path,
                        source: StateProblem::Schema(s.schema),
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
            source: StateProblem::Json(e),
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
        // The files' names in it, durable before the directory is renamed
        // into place (synced files whose names are not are gone at a power cut).
        sync_dir(&tmp)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
