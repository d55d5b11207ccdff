//! Acknowledgements that wait for the ingest journal.
//!
//! A source whose protocol acknowledges (MQTT QoS 1) attaches an [`Ack`] to
//! each reading of a message; the acknowledgement goes out when the last
//! reading's `Ack` is dropped: by the journal once its commit holds them on
//! disk, or, without a journal, as soon as the windowing stage has taken
//! them. A crash before that leaves the message unacknowledged: the broker
//! sends it again, and [`RecentKeys`] recognises a message sent again whose
//! readings the journal already holds.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// An acknowledgement owed to a source, sent when the last clone drops.
#[derive(Clone)]
pub struct Ack(Arc<AckInner>);

struct AckInner {
    key: u64,
    send: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Drop for AckInner {
    fn drop(&mut self) {
        if let Some(send) = self.send.take() {
            send();
        }
    }
}

impl Ack {
    /// An acknowledgement that runs `send` once, when the last clone drops;
    /// `key` identifies the message ([`message_key`]).
    pub fn new(key: u64, send: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self(Arc::new(AckInner {
            key,
            send: Some(Box::new(send)),
        }))
    }

    /// The message's key.
    pub fn key(&self) -> u64 {
        self.0.key
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ack({:016x})", self.0.key)
    }
}

/// Readings compare by content; who is owed an acknowledgement does not matter.
impl PartialEq for Ack {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The key of a message: source, packet id, topic and payload. A broker
/// sends an unacknowledged QoS 1 message again with the same packet id and
/// payload (and the DUP flag), so a message sent again has the same key.
pub fn message_key(source: &str, pkid: u16, topic: &str, payload: &[u8]) -> u64 {
    // SipHash with fixed keys: the same key in every process, so keys
    // written to the journal before a crash match after it.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6f75_7470_6f73_7431, 0x6a6f_7572_6e61_6c31);
    source.hash(&mut h);
    pkid.hash(&mut h);
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish() | 1
}

/// The keys of the messages the journal holds or recently committed, so a
/// message the broker sends again (a crash or a lost acknowledgement before
/// the broker had it) is acknowledged without being counted twice. Bounded:
/// the oldest keys go first.
#[derive(Debug)]
pub struct RecentKeys {
    inner: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    cap: usize,
}

impl RecentKeys {
    /// Remember at most `cap` keys.
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new((HashSet::new(), VecDeque::new())),
            cap: cap.max(1),
        }
    }

    /// Remember `key` (0: none).
    pub fn insert(&self, key: u64) {
        if key == 0 {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *g;
        if set.insert(key) {
            order.push_back(key);
            while order.len() > self.cap {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    }

    /// Whether `key` is remembered.
    pub fn contains(&self, key: u64) -> bool {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.contains(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_acknowledgement_goes_when_the_last_reading_lets_go() {
        let sent = Arc::new(AtomicUsize::new(0));
        let s = sent.clone();
        let a = Ack::new(7, move || {
            s.fetch_add(1, Ordering::SeqCst);
        });
        let b = a.clone();
        drop(a);
        assert_eq!(sent.load(Ordering::SeqCst), 0);
        drop(b);
        assert_eq!(sent.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn keys_are_stable_and_bounded() {
        let k = message_key("site", 3, "t", b"{}");
        assert_eq!(k, message_key("site", 3, "t", b"{}"));
        assert_ne!(k, message_key("site", 4, "t", b"{}"));
        let r = RecentKeys::new(2);
        r.insert(1);
        r.insert(2);
        r.insert(3);
        assert!(!r.contains(1) && r.contains(2) && r.contains(3));
    }
}
