//! The gateway side of fleet operations, on the uplink's connection (a
//! [`Control`]): it subscribes to the gateway's and its groups' desired
//! state and commands, runs every message through the [`Trust`] rules,
//! stores what they remember (`<state_dir>/fleet/trust.json`, replaced
//! atomically), and publishes the reported state (retained) and command
//! results. Every refusal is counted (`outpost_fleet_refused_total{reason}`),
//! logged, audited, and reported in `last_error`.
//!
//! Not built yet: applying an accepted document (it is recorded under
//! `accepted`, `applied` stays as it was) and running commands other than
//! `status` (their result is `failed`, "not implemented").

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::governance::SharedAudit;
use crate::metrics::{KindLabels, Metrics, ReasonLabels};
use crate::uplink::{Control, ControlPublish};

use super::document::{
    Command, CommandName, CommandResult, CommandStatus, FORMAT_VERSION, Health, LastError,
    ModelState, ReportedModel, ReportedState,
};
use super::trust::{DesiredOutcome, Limits, Refusal, Trust, TrustMemory};
use super::{FleetConfig, FleetError};

/// The fleet agent of a gateway.
pub struct Agent {
    trust: Trust,
    gateway: String,
    prefix: String,
    groups: Vec<String>,
    memory_path: PathBuf,
    config_sha256: Option<String>,
    privacy_version: String,
    metrics: Arc<Metrics>,
    audit: Option<SharedAudit>,
    deadletter_dir: Option<PathBuf>,
    last_error: Option<LastError>,
}

/// What the agent needs of the configuration (the fleet module does not
/// import the assembled configuration, which imports it).
#[derive(Clone)]
pub struct Setup<'a> {
    /// `[fleet]`; `None`: fleet operations are off.
    pub fleet: Option<&'a FleetConfig>,
    /// `[privacy]`: its trusted keys and policy version.
    pub privacy: &'a crate::privacy::PrivacyConfig,
    /// `gateway.id`.
    pub gateway: &'a str,
    /// `gateway.state_dir`.
    pub state_dir: &'a std::path::Path,
    /// sha256 of the configuration file that runs.
    pub config_sha256: Option<&'a str>,
    /// The audit log: every acceptance and refusal is written to it.
    pub audit: Option<SharedAudit>,
    /// The uplink's dead-letter store (`deadletter-list`,
    /// `deadletter-resend`).
    pub deadletter_dir: Option<PathBuf>,
}

/// The control channel when `[fleet]` is configured; `None` without it,
/// or (counted in `outpost_fleet_errors_total`, logged) when its keys or
/// its stored memory cannot be read.
pub fn control(setup: Setup<'_>, metrics: &Arc<Metrics>) -> Option<Box<dyn Control>> {
    let fleet = setup.fleet?;
    match Agent::new(setup, fleet, metrics.clone()) {
        Ok(a) => Some(Box::new(a)),
        Err(e) => {
            metrics.fleet_errors.inc();
            tracing::error!(error = %e, "fleet operations are off");
            None
        }
    }
}

impl Agent {
    /// The agent of `setup`, continuing from its stored memory.
    pub fn new(
        setup: Setup<'_>,
        fleet: &FleetConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FleetError> {
        let keys = super::load_keys(fleet, setup.privacy)?;
        let setup = &setup;
        let memory_path = setup.state_dir.join("fleet").join("trust.json");
        let memory = match std::fs::read(&memory_path) {
            Ok(bytes) => {
                serde_json::from_slice::<TrustMemory>(&bytes).map_err(|e| FleetError::Memory {
                    path: memory_path.clone(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TrustMemory::default(),
            Err(e) => {
                return Err(FleetError::Memory {
                    path: memory_path,
                    reason: e.to_string(),
                });
            }
        };
        for r in Refusal::REASONS {
            let _ = metrics.fleet_refused.get_or_create(&ReasonLabels {
                reason: r.to_string(),
            });
        }
        Ok(Self {
            trust: Trust::new(keys, setup.gateway, &fleet.groups, Limits::from(fleet))
                .with_memory(memory),
            gateway: setup.gateway.to_string(),
            prefix: fleet.topic_prefix.clone(),
            groups: fleet.groups.clone(),
            memory_path,
            config_sha256: setup.config_sha256.map(str::to_string),
            privacy_version: setup.privacy.policy_version.clone(),
            metrics,
            audit: setup.audit.clone(),
            deadletter_dir: setup.deadletter_dir.clone(),
            last_error: None,
        })
    }

    fn topic(&self, leaf: &str) -> String {
        format!("{}/{}/{leaf}", self.prefix, self.gateway)
    }

    fn store(&self) {
        let res = serde_json::to_vec_pretty(self.trust.memory())
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = self.memory_path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                outpost_storage::fsutil::write_atomic(&self.memory_path, &bytes)
            });
        if let Err(e) = res {
            self.metrics.fleet_errors.inc();
            tracing::error!(error = %e, path = %self.memory_path.display(), "fleet: cannot store the trust memory; a restart may accept a replay");
        }
    }

    fn refused(&mut self, subject: String, r: &Refusal) {
        self.metrics
            .fleet_refused
            .get_or_create(&ReasonLabels {
                reason: r.reason().to_string(),
            })
            .inc();
        tracing::warn!(subject, reason = r.reason(), "fleet: refused: {r}");
        crate::governance::audit(
            &self.audit,
            &self.metrics,
            &[(
                crate::audit::kinds::FLEET_REFUSED,
                serde_json::json!({
                    "subject": &subject,
                    "reason": r.reason(),
                    "message": r.to_string(),
                }),
            )],
        );
        self.last_error = Some(LastError {
            at_ms: crate::clock::now_ms(),
            subject,
            reason: r.reason().to_string(),
            message: r.to_string(),
        });
    }

    fn accepted(&self, kind: &str, entry: serde_json::Value) {
        self.metrics
            .fleet_accepted
            .get_or_create(&KindLabels::of(kind))
            .inc();
        crate::governance::audit(
            &self.audit,
            &self.metrics,
            &[(crate::audit::kinds::FLEET_ACCEPTED, entry)],
        );
    }

    /// The reported state as it is now.
    pub fn report(&self) -> ReportedState {
        ReportedState {
            format: FORMAT_VERSION,
            gateway: self.gateway.clone(),
            reported_at_ms: crate::clock::now_ms(),
            applied: BTreeMap::new(),
            accepted: self
                .trust
                .memory()
                .applied
                .iter()
                .map(|(k, a)| (k.clone(), a.version))
                .collect(),
            // The serving model; shadow and probation are not known here yet.
            models: {
                let m = self.metrics.model();
                if m.name.is_empty() {
                    Vec::new()
                } else {
                    vec![ReportedModel {
                        name: m.name,
                        version: m.version,
                        weights_sha256: m.weights_sha256,
                        state: ModelState::Active,
                    }]
                }
            },
            config_sha256: self.config_sha256.clone(),
            privacy_policy_version: self.privacy_version.clone(),
            health: Health {
                ready: self.metrics.is_ready(),
                uplink: true,
                backlog: self.metrics.outbox_depth.get().max(0) as u64,
                errors: self.metrics.inference_errors.get()
                    + self.metrics.outbox_append_failures.get()
                    + self.metrics.uplink_failed_messages.get(),
                shadow_agreement: Some(self.metrics.shadow_agreement.get())
                    .filter(|a| a.is_finite() && *a > 0.0),
                drift_alerts: self.metrics.drift_alerts.get(),
            },
            certificate_expires_at_ms: None,
            last_error: self.last_error.clone(),
        }
    }

    fn reported(&self) -> ControlPublish {
        ControlPublish {
            topic: self.topic("reported"),
            payload: serde_json::to_vec(&self.report()).expect("a report is plain data"),
            retain: true,
        }
    }

    /// The target key a desired-state topic stands for.
    fn subject_of(&self, topic: &str) -> String {
        let group_prefix = format!("{}/group/", self.prefix);
        match topic
            .strip_prefix(&group_prefix)
            .and_then(|rest| rest.split('/').next())
        {
            Some(g) => format!("group:{g}"),
            None => format!("gateway:{}", self.gateway),
        }
    }

    fn on_desired(&mut self, topic: &str, payload: &[u8]) -> Vec<ControlPublish> {
        // The running [privacy] table is not kept as written: unknown, so
        // every privacy mention needs the privacy officer's signature.
        match self
            .trust
            .check_desired(payload, crate::clock::now_ms(), None)
        {
            Ok(DesiredOutcome::Unchanged) => Vec::new(),
            Ok(DesiredOutcome::Apply(a)) => {
                self.trust
                    .record_applied(&a.doc.target, a.doc.version, &a.digest);
                self.store();
                self.accepted(
                    "desired",
                    serde_json::json!({
                        "subject": format!("desired:{}", a.doc.target.key()),
                        "version": a.doc.version,
                        "digest": &a.digest,
                        "signed_by": &a.signed_by,
                        "privacy_signed_by": &a.privacy_signed_by,
                    }),
                );
                tracing::info!(
                    target = a.doc.target.key(),
                    version = a.doc.version,
                    "fleet: desired state accepted (applying it is not implemented yet)"
                );
                vec![self.reported()]
            }
            Err(r) => {
                self.refused(format!("desired:{}", self.subject_of(topic)), &r);
                vec![self.reported()]
            }
        }
    }

    fn on_command(&mut self, payload: &[u8]) -> Vec<ControlPublish> {
        let now = crate::clock::now_ms();
        let result = match self.trust.accept_command(payload, now) {
            Ok(cmd) => {
                self.store();
                self.accepted(
                    "command",
                    serde_json::json!({
                        "subject": format!("command:{}", cmd.id),
                        "name": cmd.name,
                    }),
                );
                let (status, reason, output) = match self.run(&cmd) {
                    Ok(output) => (CommandStatus::Ok, None, output),
                    Err(why) => (CommandStatus::Failed, Some(why), serde_json::Value::Null),
                };
                CommandResult {
                    format: FORMAT_VERSION,
                    id: cmd.id,
                    gateway: self.gateway.clone(),
                    status,
                    reason,
                    output,
                    finished_at_ms: now,
                }
            }
            Err(r) => {
                // The id as written, when there is one, so the operator
                // can match the refusal.
                let id = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
                    .unwrap_or_default();
                self.refused(format!("command:{id}"), &r);
                CommandResult {
                    format: FORMAT_VERSION,
                    id,
                    gateway: self.gateway.clone(),
                    status: CommandStatus::Refused,
                    reason: Some(r.reason().to_string()),
                    output: serde_json::Value::String(r.to_string()),
                    finished_at_ms: now,
                }
            }
        };
        vec![
            ControlPublish {
                topic: self.topic("results"),
                payload: serde_json::to_vec(&result).expect("a result is plain data"),
                retain: false,
            },
            self.reported(),
        ]
    }
}

/// Most dead-letter entries one `deadletter-list` result carries.
const MAX_LISTED: usize = 1000;

impl Agent {
    /// Run an accepted command: its output, or why it failed.
    fn run(&self, cmd: &Command) -> Result<serde_json::Value, String> {
        use outpost_storage::deadletter;
        let store = || {
            self.deadletter_dir
                .as_deref()
                .ok_or_else(|| "this gateway has no dead-letter store".to_string())
        };
        match cmd.name {
            CommandName::Status => serde_json::to_value(self.report()).map_err(|e| e.to_string()),
            CommandName::DeadletterList => {
                let mut entries = deadletter::list(store()?).map_err(|e| e.to_string())?;
                let total = entries.len();
                entries.truncate(MAX_LISTED);
                Ok(serde_json::json!({ "total": total, "entries": entries }))
            }
            CommandName::DeadletterResend => {
                let dir = store()?;
                let asked = match (cmd.args.get("all"), cmd.args.get("ids")) {
                    (Some(serde_json::Value::Bool(true)), None) => {
                        deadletter::request_resend_all(dir).map_err(|e| e.to_string())?
                    }
                    (None, Some(serde_json::Value::Array(ids))) => {
                        let mut asked = Vec::new();
                        for id in ids {
                            let id = id
                                .as_u64()
                                .ok_or_else(|| format!("ids: {id} is not an entry number"))?;
                            if deadletter::request_resend(dir, id).map_err(|e| e.to_string())? {
                                asked.push(id);
                            }
                        }
                        asked
                    }
                    _ => {
                        return Err(
                            "args: give {\"all\": true} or {\"ids\": [entry numbers]}".into()
                        );
                    }
                };
                Ok(serde_json::json!({ "asked": asked }))
            }
            other => Err(format!(
                "{} is not implemented yet",
                serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )),
        }
    }
}

impl Control for Agent {
    fn subscriptions(&self) -> Vec<String> {
        let mut topics = vec![self.topic("desired"), self.topic("commands")];
        for g in &self.groups {
            topics.push(format!("{}/group/{g}/desired", self.prefix));
            topics.push(format!("{}/group/{g}/commands", self.prefix));
        }
        topics
    }

    fn on_connected(&mut self) -> Vec<ControlPublish> {
        vec![self.reported()]
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) -> Vec<ControlPublish> {
        if topic.ends_with("/desired") {
            self.on_desired(topic, payload)
        } else if topic.ends_with("/commands") {
            self.on_command(payload)
        } else {
            Vec::new()
        }
    }
}
