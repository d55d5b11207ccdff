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
//! 3. when every part that changed can change live ([`live_parts`]),
//!    sends it to the running pipeline ([`LiveUpdate`]): each stage takes
//!    its part and open windows stay open. When a part fails, the previous
//!    configuration is sent back, [`Outcome::RolledBack`]. The files the
//!    uplink reads (certificates, key, password) count as part of the
//!    configuration: renewed in place, they are read again;
//! 4. otherwise restarts the pipeline in process: the sources stop, every
//!    stage drains into the outbox (nothing accepted is dropped: windows
//!    are flushed, the outbox commits), then the new pipeline starts. When
//!    it fails before it is ready, the last configuration that ran
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
use crate::pipeline::{self, LiveUpdate, PipelineError, Prepared, RunReport};

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
    // What the running uplink read from its files, to notice a renewal.
    let mut good_files = uplink_files(&good);
    // A reload being tried: who asked, and the configuration it replaces.
    let mut trying: Option<Option<oneshot::Sender<Outcome>>> = None;
    loop {
        audit.follow(&next.cfg, &metrics).await?;
        next.audit = audit.shared.clone();
        http.follow(&next.cfg, &metrics, &control).await?;
        let started = next.cfg.clone();
        let generation = CancellationToken::new();
        let mut ready = metrics.ready_watch();
        let (live, updates) = flume::bounded::<LiveUpdate>(1);
        let mut run = tokio::spawn(pipeline::run(next, generation.clone(), updates));
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
                good_files = uplink_files(&good);
                continue;
            }
            audit.entry(
                &metrics,
                kinds::CONFIG_APPLIED,
                serde_json::json!({
                    "config_sha256": sha(&started),
                    "previous_sha256": sha(&good),
                    "policy_version": &started.privacy.policy_version,
                    "how": "restart",
                }),
            );
            tracing::info!(config_sha256 = %sha(&started), "new configuration applied");
            good_files = uplink_files(&started);
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
                    match try_config(path.as_deref(), &good, &good_files, &metrics) {
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
                        Ok((p, renew)) if live_parts(&good, &p.cfg) => {
                            let outcome = apply_live(&live, &good, p.cfg, renew, &metrics, &audit).await;
                            match outcome {
                                Ok(cfg) => {
                                    http.follow(&cfg, &metrics, &control).await?;
                                    good_files = uplink_files(&cfg);
                                    good = cfg;
                                    metrics.set_config(&sha(&good), crate::clock::now_ms());
                                    answer(&metrics, req.reply, Outcome::Applied(sha(&good)));
                                }
                                Err(outcome) => answer(&metrics, req.reply, outcome),
                            }
                        }
                        Ok((p, _)) => {
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

/// Whether every part that differs between `old` and `new` applies live:
/// sources, `[privacy]`, `[aggregation]` but its window length, `[uplink]`,
/// `[metrics]`, `[log]` (at the next start of the process). Anything else
/// (the model, windows, inference, outbox, governance, decisions, audit,
/// ingest checks, gateway identity) restarts the pipeline in process.
fn live_parts(old: &Config, new: &Config) -> bool {
    let mut rest = new.clone();
    rest.sources.clone_from(&old.sources);
    rest.privacy = old.privacy.clone();
    rest.aggregation = crate::aggregate::AggregationConfig {
        window_ms: new.aggregation.window_ms,
        ..old.aggregation.clone()
    };
    rest.uplink.clone_from(&old.uplink);
    rest.metrics = old.metrics.clone();
    rest.log = old.log.clone();
    rest.source_sha256.clone_from(&old.source_sha256);
    rest == *old
}

/// Send `cfg` to the running pipeline; when it does not apply, send `good`
/// back so that what had applied is undone. `Ok`: the configuration that
/// now runs.
async fn apply_live(
    live: &flume::Sender<LiveUpdate>,
    good: &Config,
    cfg: Config,
    renew_uplink: bool,
    metrics: &Arc<Metrics>,
    audit: &AuditLog,
) -> Result<Config, Outcome> {
    tracing::info!(config_sha256 = %sha(&cfg), "applying a new configuration live");
    if cfg.log != good.log {
        tracing::warn!("log settings take effect at the next start of the process");
    }
    let send = |cfg: Config, renew_uplink: bool| async move {
        let (reply, answer) = oneshot::channel();
        live.send_async(LiveUpdate {
            cfg,
            renew_uplink,
            reply,
        })
        .await
        .map_err(|_| "the pipeline has ended".to_string())?;
        answer
            .await
            .map_err(|_| "the pipeline has ended".to_string())?
    };
    match send(cfg.clone(), renew_uplink).await {
        Ok(parts) => {
            tracing::info!(config_sha256 = %sha(&cfg), parts = %parts.join(", "), "new configuration applied live");
            audit.entry(
                metrics,
                kinds::CONFIG_APPLIED,
                serde_json::json!({
                    "config_sha256": sha(&cfg),
                    "previous_sha256": sha(good),
                    "policy_version": &cfg.privacy.policy_version,
                    "how": "live",
                    "parts": parts,
                }),
            );
            Ok(cfg)
        }
        Err(error) => {
            tracing::error!(%error, "the new configuration could not apply: the previous one is restored");
            if let Err(e) = send(good.clone(), renew_uplink).await {
                tracing::error!(error = %e, "the previous configuration could not be restored live");
            }
            audit.entry(
                metrics,
                kinds::CONFIG_ROLLED_BACK,
                serde_json::json!({
                    "config_sha256": sha(&cfg),
                    "restored_sha256": sha(good),
                    "error": &error,
                }),
            );
            Err(Outcome::RolledBack(error))
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
    good_files: &Option<String>,
    metrics: &Arc<Metrics>,
) -> Result<(Prepared, bool), Outcome> {
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
    let renew = uplink_files(&cfg) != *good_files;
    if sha(&cfg) == sha(good) && !renew {
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
    Ok((p, renew))
}

/// What the uplink reads from files, as [`crate::mqtt::files_digest`].
fn uplink_files(cfg: &Config) -> Option<String> {
    cfg.uplink
        .as_ref()
        .map(|u| crate::mqtt::files_digest(&u.broker))
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
