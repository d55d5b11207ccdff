//! The running sources, by name: started, stopped and replaced while the
//! pipeline runs, so that a new configuration adds and removes sources
//! without touching the others (an MQTT source that did not change keeps
//! its session) or the windows downstream.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{IngestCtx, SourceConfig, run_source};
use crate::ingest::ack::RecentKeys;
use crate::ingest::reading::{Reading, Validator};
use crate::metrics::Metrics;

struct Running {
    cfg: SourceConfig,
    id: u64,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// What [`SourceSet::apply`] changed, by source name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SourceChanges {
    /// Started.
    pub added: Vec<String>,
    /// Stopped.
    pub removed: Vec<String>,
    /// Stopped and started again with new settings.
    pub replaced: Vec<String>,
}

impl SourceChanges {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty()
    }
}

/// The sources of a pipeline. Every source writes into the same channel;
/// the set holds its sender until [`SourceSet::stop`], so the channel
/// closes (and the stages downstream drain) only then.
pub struct SourceSet {
    running: BTreeMap<String, Running>,
    validator: Arc<Validator>,
    tx: flume::Sender<Reading>,
    metrics: Arc<Metrics>,
    gateway: String,
    next_id: u64,
    done_tx: flume::Sender<(String, u64)>,
    done_rx: flume::Receiver<(String, u64)>,
    recent: Option<Arc<RecentKeys>>,
}

impl SourceSet {
    /// An empty set whose sources write into `tx`.
    pub fn new(
        validator: Arc<Validator>,
        tx: flume::Sender<Reading>,
        metrics: Arc<Metrics>,
        gateway: &str,
    ) -> Self {
        let (done_tx, done_rx) = flume::unbounded();
        Self {
            running: BTreeMap::new(),
            validator,
            tx,
            metrics,
            gateway: gateway.to_string(),
            next_id: 0,
            done_tx,
            done_rx,
            recent: None,
        }
    }

    /// Sources recognise messages sent again whose readings the journal
    /// holds ([`RecentKeys`]).
    pub fn with_recent(mut self, recent: Option<Arc<RecentKeys>>) -> Self {
        self.recent = recent;
        self
    }

    /// Start `cfg` (its name must not be running).
    pub fn start(&mut self, cfg: SourceConfig) {
        let name = cfg.name().to_string();
        let ctx = IngestCtx::new(
            &name,
            self.validator.clone(),
            self.tx.clone(),
            self.metrics.clone(),
        )
        .with_recent(self.recent.clone());
        let stop = CancellationToken::new();
        self.next_id += 1;
        let id = self.next_id;
        let task = {
            let (cfg, gateway, stop) = (cfg.clone(), self.gateway.clone(), stop.clone());
            let (done, name) = (self.done_tx.clone(), name.clone());
            tokio::spawn(async move {
                if let Err(e) = run_source(cfg, ctx, gateway, stop).await {
                    tracing::error!(source = %name, error = %e, "source failed");
                }
                let _ = done.send((name, id));
            })
        };
        self.running.insert(
            name,
            Running {
                cfg,
                id,
                stop,
                task,
            },
        );
    }

    /// Make the running sources those of `wanted`: a source whose settings
    /// are unchanged keeps running; a removed or changed one is stopped
    /// (it hands over what it took, then closes its connection) before
    /// a changed one starts again.
    pub async fn apply(&mut self, wanted: &[SourceConfig]) -> SourceChanges {
        let mut changes = SourceChanges::default();
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            match wanted.iter().find(|w| w.name() == name) {
                Some(w) if self.running.get(&name).is_some_and(|r| r.cfg == *w) => {}
                found => {
                    if let Some(r) = self.running.remove(&name) {
                        r.stop.cancel();
                        let _ = r.task.await;
                    }
                    if found.is_some() {
                        changes.replaced.push(name);
                    } else {
                        changes.removed.push(name);
                    }
                }
            }
        }
        for w in wanted {
            if !self.running.contains_key(w.name()) {
                if !changes.replaced.iter().any(|n| n == w.name()) {
                    changes.added.push(w.name().to_string());
                }
                self.start(w.clone());
            }
        }
        changes
    }

    /// Wait until every running source has ended by itself (a file read to
    /// its end, a simulation's limit). Cancel-safe.
    pub async fn ended(&mut self) {
        while !self.running.is_empty() {
            let Ok((name, id)) = self.done_rx.recv_async().await else {
                return;
            };
            if self.running.get(&name).is_some_and(|r| r.id == id) {
                self.running.remove(&name);
            }
        }
    }

    /// How many sources run.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// No source runs.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Stop every source and wait for each; then the readings channel
    /// closes (the sender this set held is dropped).
    pub async fn stop(mut self) {
        for r in self.running.values() {
            r.stop.cancel();
        }
        for (_, r) in std::mem::take(&mut self.running) {
            let _ = r.task.await;
        }
    }
}
