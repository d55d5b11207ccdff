//! `[outbox]`: where aggregates wait for the cloud, how much, and what
//! happens when it is full.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::FullPolicy;
use crate::check::Collector;

/// `[outbox]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// `disk` (durable segment log, the default) or `memory` (lost at exit).
    pub kind: OutboxKind,
    /// Directory of the disk outbox; absent: `<gateway.state_dir>/outbox`.
    pub dir: Option<PathBuf>,
    /// Bytes on disk at most.
    pub max_bytes: u64,
    /// Bytes per segment file.
    pub segment_bytes: u64,
    /// When full: `drop_oldest`, `reject_new` or `coarsen`. Applies to the
    /// total cap and to each stream's cap.
    pub policy: FullPolicy,
    /// Bytes on disk at most per stream (aggregate group), so that one
    /// chatty stream cannot take the whole outbox; 0 (default): no cap but
    /// `max_bytes`.
    pub stream_max_bytes: u64,
    /// Caps of named streams, overriding `stream_max_bytes` (0: none), e.g.
    /// `streams = { "line-1" = 104857600 }`.
    pub streams: std::collections::BTreeMap<String, u64>,
    /// Group commit: appends are synced to disk at most this long after they
    /// are written (0: every aggregate is synced on its own).
    pub fsync_interval_ms: u64,
    /// Most records held by the memory outbox; when full, the oldest is dropped and counted.
    pub max_records: usize,
}

/// Where the outbox keeps aggregates.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    /// The segment log under `outbox.dir`.
    Disk,
    /// In memory (the embedded demo; tests).
    Memory,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            kind: OutboxKind::Disk,
            dir: None,
            max_bytes: 1 << 30,
            segment_bytes: 8 << 20,
            policy: FullPolicy::DropOldest,
            stream_max_bytes: 0,
            streams: std::collections::BTreeMap::new(),
            fsync_interval_ms: 100,
            max_records: 100_000,
        }
    }
}

impl OutboxConfig {
    /// The disk outbox's directory.
    pub fn dir(&self, state_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| state_dir.join("outbox"))
    }
}

impl OutboxConfig {
    /// Check `[outbox]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        if self.max_records == 0 {
            c.push("max_records", "must be at least 1");
        }
        if self.segment_bytes < 4096 {
            c.push("segment_bytes", "must be at least 4096");
        }
        if self.max_bytes < self.segment_bytes.saturating_mul(2) {
            c.push(
                "max_bytes",
                format!(
                    "must be at least twice outbox.segment_bytes ({})",
                    self.segment_bytes
                ),
            );
        }
        for (path, cap) in std::iter::once(("stream_max_bytes".to_string(), self.stream_max_bytes))
            .chain(
                self.streams
                    .iter()
                    .map(|(k, v)| (format!("streams.{k}"), *v)),
            )
        {
            if cap == 0 {
                continue;
            }
            if cap < 4096 {
                c.push(path.clone(), "must be 0 (no cap) or at least 4096");
            } else if cap > self.max_bytes {
                c.push(
                    &path,
                    format!("must not exceed outbox.max_bytes ({})", self.max_bytes),
                );
            }
            if self.kind == OutboxKind::Memory {
                c.push(path.clone(), "per-stream caps need outbox.kind = \"disk\"");
            }
        }
    }
}
