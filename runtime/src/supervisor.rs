//! The running gateway across configuration changes.
//!
//! `outpost reload` (`POST /reload` on the local endpoint) and SIGHUP ask
//! for the configuration file to be read again. The supervisor then:
//!
//! 1. checks it: every problem is reported ([`Outcome::Refused`]) and
//!    nothing changes when there is any;
//! 2. tries it before touching what runs: the model loads and fits the
//!    windows, and every broker's TLS files and credentials can be read. A
//!    configuration that passes its checks but cannot start is
//!    [`Outcome::RolledBack`]: what ran keeps running;
//! 3. restarts the pipeline in process: the sources stop, every stage
//!    drains into the outbox (nothing accepted is dropped: windows are
//!    flushed, the outbox commits), then the new pipeline starts. When it
//!    fails before it is ready, the last configuration that ran
//!    (last-known-good) starts again, [`Outcome::RolledBack`].
//!
//! Every outcome is counted (`outpost_config_reloads_total{kind}`) and
//! written to the audit log (`config_applied`, `config_refused`,
//! `config_rolled_back`); `/status` shows the sha256 of the configuration
//! that runs and when it was applied. The metrics, the audit log and the
//! local endpoint outlive the restarts (the endpoint moves when its
//! address changes).
//!
//! Limits: the embedded default has no file to read again; a configuration
//! with a file source is not reloaded (the file would be read again from
//! its start); a memory outbox loses what it holds when the pipeline
//! restarts, as at any restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::audit::kinds;
use crate::config::{Config, ConfigError};
use crate::control::{Control, Outcome};
use crate::governance::SharedAudit;
use crate::ingest::SourceConfig;
use crate::metrics::Metrics;
use crate::pipeline::{self, PipelineError, Prepared, RunReport};

/// The sha256 shown for a configuration that is not a file.
const EMBEDDED: &str = "embedded";

fn sha(cfg: &Config) -> String {
    cfg.source_sha256.clone().unwrap_or_else(|| EMBEDDED.into())
}

/// Run the gateway on `cfg` (read from `path`, `None` for the embedded
/// default) until `shutdown`, applying configuration changes as they are
/// asked for.
pub async fn run(
    path: Option<PathBuf>,
    cfg: Config,
    shutdown: CancellationToken,
) -> Result<RunReport, PipelineError> {
    let metrics = Arc::new(Metrics::new());
    let mut next = Prepared::with_metrics(cfg, metrics.clone())?;
    let (control, mut requests) = Control::new(1);
    tokio::spawn(forward_sighup(control.clone(), shutdown.clone()));
    let mut audit = AuditLog::default();
    let mut http = Endpoint::default();
    let mut good = next.cfg.clone();
    // A reload being tried: who asked, and the configuration it replaces.
    let mut trying: Option<Option<oneshot::Sender<Outcome>>> = None;
    loop {
        audit.follow(&next.cfg, &metrics).await?;
        next.audit = audit.shared.clone();
        http.follow(&next.cfg, &metrics, &control).await?;
        let started = next.cfg.clone();
        let generation = CancellationToken::new();
        let mut ready = metrics.ready_watch();
        let mut run = tokio::spawn(pipeline::run(next, generation.clone()));
        // Ready, or ended (by an error, or every source ended) first.
        let ended = tokio::select! {
            biased;
            r = ready.wait_for(|r| *r) => match r {
                Ok(_) => None,
                Err(_) => Some((&mut run).await),
            },
            r = &mut run => Some(r),
        };
        if let Some(reply) = trying.take() {
            if let Some(r) = ended {
                let error = match r {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => "it ended before it was ready".to_string(),
                    Err(e) => format!("it panicked: {e}"),
                };
                tracing::error!(%error, "the new configuration could not start: the previous one starts again");
                audit.entry(
                    &metrics,
                    kinds::CONFIG_ROLLED_BACK,
                    serde_json::json!({
                        "config_sha256": sha(&started),
                        "restored_sha256": sha(&good),
                        "error": &error,
                    }),
                );
                answer(&metrics, reply, Outcome::RolledBack(error));
                next = Prepared::with_metrics(good.clone(), metrics.clone())?;
                continue;
            }
            audit.entry(
                &metrics,
                kinds::CONFIG_APPLIED,
                serde_json::json!({
                    "config_sha256": sha(&started),
                    "previous_sha256": sha(&good),
                }),
            );
            tracing::info!(config_sha256 = %sha(&started), "new configuration applied");
            good = started;
            answer(&metrics, reply, Outcome::Applied(sha(&good)));
        }
        if let Some(r) = ended {
            // The configuration that ran last ended by itself (its sources
            // ended) or failed before it was ready: so does the gateway.
            http.stop().await;
            return finished(r);
        }
        metrics.set_config(&sha(&good), crate::clock::now_ms());
        // Serve reload requests until one is applied, or the end.
        loop {
            tokio::select! {
                r = &mut run => {
                    http.stop().await;
                    return finished(r);
                }
                _ = shutdown.cancelled() => {
                    generation.cancel();
                    let r = (&mut run).await;
                    http.stop().await;
                    return finished(r);
                }
                Some(req) = requests.recv() => {
                    match try_config(path.as_deref(), &good, &metrics) {
                        Err(outcome) => {
                            if let Outcome::Refused(problems) = &outcome {
                                tracing::warn!(problems = %problems.join("; "), "configuration refused; nothing changed");
                                audit.entry(&metrics, kinds::CONFIG_REFUSED, serde_json::json!({
                                    "problems": problems,
                                }));
                            }
                            if let Outcome::RolledBack(error) = &outcome {
                                tracing::error!(%error, "the new configuration cannot start; nothing changed");
                                audit.entry(&metrics, kinds::CONFIG_ROLLED_BACK, serde_json::json!({
                                    "restored_sha256": sha(&good),
                                    "error": error,
                                }));
                            }
                            answer(&metrics, req.reply, outcome);
                        }
                        Ok(p) => {
                            tracing::info!(config_sha256 = %sha(&p.cfg), "applying a new configuration: draining the pipeline");
                            generation.cancel();
                            if let Ok(Err(e)) = (&mut run).await {
                                tracing::error!(error = %e, "the pipeline ended with an error while draining");
                            }
                            next = p;
                            trying = Some(req.reply);
                            break;
                        }
                    }
                }
            }
        }
    }
}

fn finished(
    r: Result<Result<RunReport, PipelineError>, tokio::task::JoinError>,
) -> Result<RunReport, PipelineError> {
    r.unwrap_or(Err(PipelineError::Inference(
        crate::inference::InferenceError::Panicked,
    )))
}

fn answer(metrics: &Metrics, reply: Option<oneshot::Sender<Outcome>>, outcome: Outcome) {
    metrics.config_reload(outcome.kind());
    if let Some(r) = reply {
        let _ = r.send(outcome);
    }
}

/// Read the configuration file again and try it (see the module doc):
/// `Err` with the outcome when it does not replace `good`.
fn try_config(
    path: Option<&Path>,
    good: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Prepared, Outcome> {
    let Some(path) = path else {
        return Err(Outcome::Refused(vec![
            "the gateway runs the embedded default: there is no configuration file to read again"
                .into(),
        ]));
    };
    let cfg = Config::load(path).map_err(|e| {
        Outcome::Refused(match e {
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        })
    })?;
    if sha(&cfg) == sha(good) {
        return Err(Outcome::Unchanged(sha(good)));
    }
    let file_sources: Vec<String> = [good, &cfg]
        .iter()
        .flat_map(|c| c.sources.iter())
        .filter(|s| matches!(s, SourceConfig::File(_)))
        .map(|s| format!("source {:?}: a file source reads its input once; a reload would read it again from the start (restart the gateway instead)", s.name()))
        .collect();
    if !file_sources.is_empty() {
        return Err(Outcome::Refused(file_sources));
    }
    let p = Prepared::with_metrics(cfg, metrics.clone())
        .map_err(|e| Outcome::RolledBack(e.to_string()))?;
    preflight(&p.cfg).map_err(Outcome::RolledBack)?;
    Ok(p)
}

/// What a start would read first: every broker's TLS files and password.
fn preflight(cfg: &Config) -> Result<(), String> {
    let gw = &cfg.gateway.id;
    let mut brokers = Vec::new();
    for s in &cfg.sources {
        if let SourceConfig::Mqtt(m) = s {
            brokers.push((format!("source {:?}", m.name), &m.broker));
        }
    }
    if let Some(u) = &cfg.uplink {
        brokers.push(("uplink".to_string(), &u.broker));
    }
    if let Some(d) = &cfg.decisions {
        brokers.push(("decisions".to_string(), &d.broker));
    }
    for (what, broker) in brokers {
        crate::mqtt::options(broker, gw, "preflight").map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

async fn forward_sighup(control: Control, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler: reload with `outpost reload`");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        tracing::info!("SIGHUP: reading the configuration again");
        if !control.request() {
            tracing::warn!("a reload is already in progress: SIGHUP ignored");
        }
    }
}

/// The audit log, kept open across restarts; reopened when a configuration
/// moves it or turns it on or off.
#[derive(Default)]
struct AuditLog {
    at: Option<Option<PathBuf>>,
    shared: Option<SharedAudit>,
}

impl AuditLog {
    async fn follow(&mut self, cfg: &Config, metrics: &Arc<Metrics>) -> Result<(), PipelineError> {
        let at = cfg
            .audit
            .enabled
            .then(|| cfg.audit.path(&cfg.gateway.state_dir));
        if self.at.as_ref() != Some(&at) {
            self.shared = None;
            self.shared = pipeline::open_shared_audit(cfg, metrics).await?;
            self.at = Some(at);
        }
        Ok(())
    }

    fn entry(&self, metrics: &Metrics, kind: &str, data: serde_json::Value) {
        crate::governance::audit(&self.shared, metrics, &[(kind, data)]);
    }
}

/// The local endpoint, kept across restarts; moved when a configuration
/// changes its address or the gateway's id.
#[derive(Default)]
struct Endpoint {
    at: Option<(bool, Option<String>, String)>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Endpoint {
    async fn follow(
        &mut self,
        cfg: &Config,
        metrics: &Arc<Metrics>,
        control: &Control,
    ) -> Result<(), PipelineError> {
        let at = (
            cfg.metrics.enabled,
            cfg.metrics.listen.clone(),
            cfg.gateway.id.clone(),
        );
        if self.at.as_ref() == Some(&at) {
            return Ok(());
        }
        self.stop().await;
        self.stop = CancellationToken::new();
        self.task = pipeline::serve_http(
            cfg,
            metrics.clone(),
            Some(control.clone()),
            self.stop.clone(),
        )
        .await?;
        self.at = Some(at);
        Ok(())
    }

    /// Stop serving; the listening socket is closed when this returns.
    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
