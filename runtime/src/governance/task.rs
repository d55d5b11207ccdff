//! The [`GovernanceTask`]: follows the registry, loads and verifies the
//! models it names, hot-swaps them into inference and acts on the
//! [`Governor`]'s verdicts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::inference::{ModelSet, ModelSlot, Runner, swap_problems};
use crate::metrics::Metrics;

use super::{
    CONFIGURED, GovernanceConfig, GovernanceError, Governor, Observation, Registry, RegistryState,
    SharedAudit, Thresholds, Trust, Verdict, audit, load_artifact, write_atomic,
};

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
        .map_err(|source| GovernanceError::Panicked {
            id: id.to_string(),
            source,
        })??;
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
