//! Groups forgotten after idling, remembered for a while by where their
//! windows had closed. Pure state, no I/O (`now` in monotonic ms).
//!
//! A group's state is evicted when its sensors go silent, but a reading for
//! it may still be on its way (a sensor's last readings wait in windowing
//! until it is evicted there too). Without this, such a reading would open
//! a window that was already delivered, and a second aggregate of the same
//! group and window could have the same content, and so the same id, as
//! another: a consumer deduplicating by id would drop it. With it, the
//! group starts again where it had closed, and the reading is late, as it
//! would have been had the group stayed. Bounded by count (oldest first)
//! and by age.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Most groups remembered.
pub const TOMBSTONES_MAX: usize = 100_000;
/// How long a group is remembered (monotonic ms).
pub const TOMBSTONE_KEEP_MS: i64 = 600_000;

/// Evicted groups by where their windows had closed.
#[derive(Debug)]
pub struct Tombstones {
    closed: HashMap<Arc<str>, (i64, u64)>,
    /// Burial order: when it expires, its stamp, the group.
    order: VecDeque<(i64, u64, Arc<str>)>,
    next: u64,
    max: usize,
    keep_ms: i64,
}

impl Default for Tombstones {
    fn default() -> Self {
        Self::new(TOMBSTONES_MAX, TOMBSTONE_KEEP_MS)
    }
}

impl Tombstones {
    /// At most `max` groups, each for `keep_ms`.
    pub fn new(max: usize, keep_ms: i64) -> Self {
        Self {
            closed: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            max: max.max(1),
            keep_ms,
        }
    }

    /// Remember that `group`, evicted at `now`, had closed every window
    /// starting before `closed_before`.
    pub fn bury(&mut self, group: Arc<str>, closed_before: i64, now: i64) {
        if closed_before == i64::MIN {
            return;
        }
        let stamp = self.next;
        self.next += 1;
        self.closed.insert(group.clone(), (closed_before, stamp));
        self.order
            .push_back((now.saturating_add(self.keep_ms), stamp, group));
        while self.order.len() > self.max {
            self.pop();
        }
    }

    /// Where `group` had closed, if it is remembered; it is forgotten here
    /// (the group lives again).
    pub fn raise(&mut self, group: &str) -> Option<i64> {
        self.closed
            .remove(group)
            .map(|(closed_before, _)| closed_before)
    }

    /// Forget the groups buried `keep_ms` before `now`.
    pub fn expire(&mut self, now: i64) {
        while self
            .order
            .front()
            .is_some_and(|(expires, _, _)| *expires <= now)
        {
            self.pop();
        }
    }

    /// Groups remembered.
    pub fn len(&self) -> usize {
        self.closed.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.closed.is_empty()
    }

    fn pop(&mut self) {
        if let Some((_, stamp, group)) = self.order.pop_front()
            && self.closed.get(&group).is_some_and(|(_, s)| *s == stamp)
        {
            self.closed.remove(&group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_until_raised_expired_or_crowded_out() {
        let mut t = Tombstones::new(2, 1_000);
        t.bury(Arc::from("a"), 5_000, 0);
        t.bury(Arc::from("never-closed"), i64::MIN, 0);
        assert_eq!(
            t.len(),
            1,
            "nothing to remember for a group that closed nothing"
        );
        assert_eq!(t.raise("a"), Some(5_000));
        assert_eq!(t.raise("a"), None);
        t.bury(Arc::from("a"), 6_000, 100);
        t.bury(Arc::from("b"), 7_000, 200);
        t.bury(Arc::from("c"), 8_000, 300);
        assert_eq!(t.raise("a"), None, "the oldest went first");
        t.expire(1_199);
        assert_eq!(t.len(), 2);
        t.expire(1_200);
        assert_eq!((t.raise("b"), t.raise("c")), (None, Some(8_000)));
        assert!(t.is_empty());
    }

    #[test]
    fn a_group_buried_again_is_kept_by_its_latest_burial() {
        let mut t = Tombstones::new(10, 1_000);
        t.bury(Arc::from("a"), 1_000, 0);
        t.raise("a");
        t.bury(Arc::from("a"), 2_000, 500);
        t.expire(1_000);
        assert_eq!(t.raise("a"), Some(2_000));
    }
}
