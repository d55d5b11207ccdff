//! Settings of the uplink task: topic, batching, compression, health
//! messages, and its shutdown signals.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::outbox::OutboxRecord;

/// Uplink settings.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// Topic template with `{gateway}` and `{group}`.
    pub topic: String,
    /// Gateway id.
    pub gateway: String,
    /// Several aggregates per message, as a JSON array, up to this many
    /// bytes (before compression); 0: one aggregate per message, as an object.
    pub batch_max_bytes: usize,
    /// Payload compression.
    pub compression: Compression,
    /// Periodic health messages; `None`: none.
    pub health: Option<HealthSettings>,
    /// The largest payload the broker takes (0: unknown); a single
    /// aggregate larger than this is set aside at once.
    pub max_message_bytes: usize,
    /// Where aggregates the broker keeps refusing are set aside; `None`:
    /// they are retried for ever (one at a time).
    pub deadletter: Option<super::DeadLetterSink>,
    /// A control channel on the same connection (fleet operations);
    /// `None`: the uplink subscribes to nothing.
    pub control: Option<ControlHandle>,
}

/// A [`Control`] shared by the clones of [`UplinkSettings`].
#[derive(Clone)]
pub struct ControlHandle(std::sync::Arc<std::sync::Mutex<Box<dyn Control>>>);

impl ControlHandle {
    /// Share `control`.
    pub fn new(control: Box<dyn Control>) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(control)))
    }

    /// Run `f` on the control channel (never held across an await).
    pub fn with<R>(&self, f: impl FnOnce(&mut dyn Control) -> R) -> R {
        // A panic inside a control call leaves nothing half-written that
        // matters here: go on with what is there.
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(guard.as_mut())
    }
}

impl std::fmt::Debug for ControlHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlHandle")
    }
}

/// A control channel carried on the uplink's connection (fleet operations,
/// `crate::fleet`): the uplink subscribes to its topics at each CONNACK,
/// hands it every message received, and publishes what it answers. Its
/// publishes go at QoS 0 (retained when asked), so they never take a place
/// in the in-flight window of aggregates.
pub trait Control: Send {
    /// Topic filters to subscribe to.
    fn subscriptions(&self) -> Vec<String>;
    /// What to publish once connected.
    fn on_connected(&mut self) -> Vec<ControlPublish>;
    /// What to publish in answer to a message received.
    fn on_message(&mut self, topic: &str, payload: &[u8]) -> Vec<ControlPublish>;
}

/// A message a [`Control`] publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPublish {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Retained on the broker.
    pub retain: bool,
}

/// Health messages of the uplink.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Topic, `{gateway}` already replaced.
    pub topic: String,
    /// Time between two messages while connected (one goes at each CONNACK).
    pub interval: Duration,
    /// Publish them retained.
    pub retain: bool,
    /// Zero the data counts ([`crate::status::Status::withhold_counts`]).
    pub withhold_counts: bool,
}

/// Payload compression of the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Plain JSON.
    None,
    /// zstd (level 3); the topic gets [`ZSTD_TOPIC_SUFFIX`].
    Zstd,
}

/// Appended to the topic of a zstd-compressed message.
pub const ZSTD_TOPIC_SUFFIX: &str = "/zstd";

impl UplinkSettings {
    /// Plain settings: one aggregate per message, no compression.
    pub fn new(topic: impl Into<String>, gateway: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            gateway: gateway.into(),
            batch_max_bytes: 0,
            compression: Compression::None,
            health: None,
            max_message_bytes: 0,
            deadletter: None,
            control: None,
        }
    }

    /// Records to read for `messages` messages.
    pub(super) fn records_for(&self, messages: usize) -> usize {
        if self.batch_max_bytes == 0 {
            messages
        } else {
            messages.saturating_mul(64).min(4096)
        }
    }

    /// Split records (in sequence order) into messages: runs of records that
    /// share a topic (the same group, when the template names it), each
    /// within `batch_max_bytes`. A record larger than the limit goes alone.
    pub fn batches<'a>(&self, records: &'a [OutboxRecord]) -> Vec<&'a [OutboxRecord]> {
        if self.batch_max_bytes == 0 {
            return records.chunks(1).collect();
        }
        let by_group = self.topic.contains("{group}");
        let mut out = Vec::new();
        let mut start = 0;
        let mut bytes = 2;
        for (i, r) in records.iter().enumerate() {
            let len = r.payload().len() + 1;
            let split = i > start
                && (bytes + len > self.batch_max_bytes
                    || (by_group && r.group != records[start].group));
            if split {
                out.push(&records[start..i]);
                start = i;
                bytes = 2;
            }
            bytes += len;
        }
        if start < records.len() {
            out.push(&records[start..]);
        }
        out
    }

    /// The payload of one message.
    pub fn encode(&self, batch: &[OutboxRecord]) -> std::io::Result<Vec<u8>> {
        let json = if self.batch_max_bytes == 0 && batch.len() == 1 {
            batch[0].payload().to_vec()
        } else {
            let mut v =
                Vec::with_capacity(batch.iter().map(|r| r.payload().len() + 1).sum::<usize>() + 2);
            v.push(b'[');
            for (i, r) in batch.iter().enumerate() {
                if i > 0 {
                    v.push(b',');
                }
                v.extend_from_slice(r.payload());
            }
            v.push(b']');
            v
        };
        match self.compression {
            Compression::None => Ok(json),
            Compression::Zstd => zstd::bulk::compress(&json, 3),
        }
    }
}

/// Shutdown signals of the uplink.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Upstream is done: exit once the outbox is empty.
    pub drain: CancellationToken,
    /// Exit now.
    pub now: CancellationToken,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_follow_topic_and_size_and_compress() {
        use crate::aggregate::Aggregate;
        use crate::outbox::tests::agg;
        let records: Vec<OutboxRecord> = ["a", "a", "b", "b", "b"]
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let mut a = agg(i as i64);
                a.group = g.to_string();
                OutboxRecord::from_aggregate(i as u64 + 1, &a).unwrap()
            })
            .collect();
        let sizes = |s: &UplinkSettings| -> Vec<usize> {
            s.batches(&records).iter().map(|b| b.len()).collect()
        };
        let mut s = UplinkSettings::new("t/{gateway}/{group}", "g");
        assert_eq!(sizes(&s), vec![1, 1, 1, 1, 1]);
        assert_eq!(s.encode(&records[..1]).unwrap(), records[0].payload());
        s.batch_max_bytes = 64 * 1024;
        assert_eq!(sizes(&s), vec![2, 3], "one group per message");
        let mut all = UplinkSettings::new("t/{gateway}", "g");
        all.batch_max_bytes = 64 * 1024;
        assert_eq!(sizes(&all), vec![5]);
        all.batch_max_bytes = 2 * records[0].payload().len() + 4;
        assert_eq!(sizes(&all), vec![2, 2, 1], "byte limit");
        let plain = all.encode(&records[..2]).unwrap();
        let back: Vec<Aggregate> = serde_json::from_slice(&plain).unwrap();
        assert_eq!(back.len(), 2);
        all.compression = Compression::Zstd;
        let z = all.encode(&records[..2]).unwrap();
        assert_eq!(zstd::bulk::decompress(&z, 1 << 20).unwrap(), plain);
    }
}
