//! The privacy-budget accountant: the epsilon spent per group and period,
//! written to disk before each release.
//!
//! File `<state_dir>/privacy/budget.json`:
//! `{"version":1,"exhausted_before_ms":…,"spent":{"<group>":[{"start_ms":…,"end_ms":…,"epsilon":…}]}}`,
//! where `<group>` is the declared name of a declared group (stable across
//! key rotations; the file stays on the gateway).
//! Each entry is the epsilon spent on a group's releases whose window
//! overlaps the period `[start_ms, end_ms)`. A release over a period counts
//! every entry that overlaps it, so a changed `period_s` never refunds
//! anything. Every period that starts before `exhausted_before_ms` counts as
//! spent (pruned entries).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::PrivacyError;

/// Periods kept behind the newest one; older ones are pruned and count as spent.
pub(super) const RETAIN_PERIODS: i64 = 7;
/// Most periods one release may span.
const MAX_PERIODS_PER_RELEASE: i64 = 10_000;
const FILE_VERSION: u32 = 1;
/// The file's name under `<state_dir>/privacy/`.
pub(super) const FILE_NAME: &str = "budget.json";

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetFile {
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exhausted_before_ms: Option<i64>,
    #[serde(default)]
    spent: BTreeMap<String, Vec<Spend>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spend {
    start_ms: i64,
    end_ms: i64,
    epsilon: f64,
}

/// Epsilon spent per group and period.
#[derive(Debug)]
pub(super) struct Accountant {
    path: PathBuf,
    budget: f64,
    epsilon: f64,
    period_ms: i64,
    file: BudgetFile,
    dirty: bool,
}

impl Accountant {
    /// Load the spend from `dir` (a missing file: nothing spent yet) and
    /// write it back at once, so that a directory that cannot be written
    /// stops the start rather than every release.
    pub(super) fn open(
        dir: &Path,
        budget: f64,
        epsilon: f64,
        period_ms: i64,
    ) -> Result<Self, PrivacyError> {
        let path = dir.join(FILE_NAME);
        let io = |error| PrivacyError::BudgetIo {
            path: path.clone(),
            error,
        };
        // Synced into its parent: a new directory is durable only then.
        outpost_storage::fsutil::create_dir_all(dir).map_err(io)?;
        let file = match std::fs::read(&path) {
            Ok(bytes) => parse(&bytes).map_err(|reason| PrivacyError::BudgetCorrupt {
                path: path.clone(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BudgetFile {
                version: FILE_VERSION,
                ..Default::default()
            },
            Err(e) => return Err(io(e)),
        };
        let mut a = Self {
            path,
            budget,
            epsilon,
            period_ms: period_ms.max(1),
            file,
            dirty: true,
        };
        a.persist()?;
        Ok(a)
    }

    /// The periods `[start, end)` that the window `[start_ms, end_ms)` overlaps.
    fn periods(&self, start_ms: i64, end_ms: i64) -> Option<Vec<(i64, i64)>> {
        let p = self.period_ms;
        let first = start_ms.div_euclid(p);
        let last = end_ms
            .max(start_ms.saturating_add(1))
            .saturating_sub(1)
            .div_euclid(p);
        if last - first >= MAX_PERIODS_PER_RELEASE {
            return None;
        }
        Some(
            (first..=last)
                .map(|i| {
                    let a = i.saturating_mul(p);
                    (a, a.saturating_add(p))
                })
                .collect(),
        )
    }

    /// Epsilon spent on `group` over `[start_ms, end_ms)`.
    pub(super) fn spent(&self, group: &str, start_ms: i64, end_ms: i64) -> f64 {
        self.file
            .spent
            .get(group)
            .map(|v| {
                v.iter()
                    .filter(|s| s.start_ms < end_ms && start_ms < s.end_ms)
                    .map(|s| s.epsilon)
                    .sum()
            })
            .unwrap_or(0.0)
    }

    /// Spend one release's epsilon for `group`'s window `[start_ms,
    /// end_ms)` in every period it overlaps, if each has that much left
    /// (and is not pruned); `false` (nothing spent) otherwise.
    pub(super) fn try_spend(&mut self, group: &str, start_ms: i64, end_ms: i64) -> bool {
        let Some(periods) = self.periods(start_ms, end_ms) else {
            return false;
        };
        // Sums of floats: 0.1 + 0.1 + 0.1 must fit a budget of 0.3.
        let limit = self.budget * (1.0 + 1e-9);
        for &(a, b) in &periods {
            if self.file.exhausted_before_ms.is_some_and(|e| a < e)
                || self.spent(group, a, b) + self.epsilon > limit
            {
                return false;
            }
        }
        let entries = self.file.spent.entry(group.to_string()).or_default();
        for (a, b) in periods {
            match entries
                .iter_mut()
                .find(|s| s.start_ms == a && s.end_ms == b)
            {
                Some(s) => s.epsilon += self.epsilon,
                None => entries.push(Spend {
                    start_ms: a,
                    end_ms: b,
                    epsilon: self.epsilon,
                }),
            }
        }
        self.dirty = true;
        true
    }

    /// Whether there is spend not yet on disk.
    pub(super) fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Drop periods more than [`RETAIN_PERIODS`] behind the newest; they
    /// then count as spent.
    fn prune(&mut self) {
        let Some(newest) = self.file.spent.values().flatten().map(|s| s.start_ms).max() else {
            return;
        };
        let horizon = newest.saturating_sub(RETAIN_PERIODS.saturating_mul(self.period_ms));
        for v in self.file.spent.values_mut() {
            v.retain(|s| s.end_ms > horizon);
        }
        self.file.spent.retain(|_, v| !v.is_empty());
        let e = self.file.exhausted_before_ms.get_or_insert(horizon);
        *e = (*e).max(horizon);
    }

    /// Write the spend to disk atomically (temporary file, fsync, rename,
    /// directory fsync).
    pub(super) fn persist(&mut self) -> Result<(), PrivacyError> {
        self.prune();
        let bytes = serde_json::to_vec(&self.file).map_err(|e| PrivacyError::BudgetIo {
            path: self.path.clone(),
            error: std::io::Error::other(e),
        })?;
        write_atomic(&self.path, &bytes).map_err(|error| PrivacyError::BudgetIo {
            path: self.path.clone(),
            error,
        })?;
        self.dirty = false;
        Ok(())
    }
}

fn parse(bytes: &[u8]) -> Result<BudgetFile, String> {
    let f: BudgetFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if f.version != FILE_VERSION {
        return Err(format!("unknown version {}", f.version));
    }
    for (group, v) in &f.spent {
        for s in v {
            if !(s.epsilon.is_finite() && s.epsilon >= 0.0) || s.start_ms >= s.end_ms {
                return Err(format!("an invalid entry for group {group:?}"));
            }
        }
    }
    Ok(f)
}

use outpost_storage::fsutil::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn spends_per_group_and_period_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Accountant::open(dir.path(), 0.3, 0.1, DAY).unwrap();
        for _ in 0..3 {
            assert!(a.try_spend("g", 10, 20));
        }
        assert!(!a.try_spend("g", 30, 40), "0.3 spent");
        assert!(a.try_spend("h", 30, 40), "another group");
        assert!(a.try_spend("g", DAY, DAY + 10), "the next period");
        // A window over two periods needs budget in both.
        assert!(!a.try_spend("g", DAY - 5, DAY + 5));
        assert!((a.spent("g", DAY, 2 * DAY) - 0.1).abs() < 1e-12);
        a.persist().unwrap();
        // Eight periods on: the first is pruned and then counts as spent.
        assert!(a.try_spend("h", 8 * DAY, 8 * DAY + 1));
        a.persist().unwrap();
        assert_eq!(a.spent("g", 0, DAY), 0.0, "pruned");
        assert!(!a.try_spend("x", 0, 1), "older than 7 periods: refused");
        assert!(a.try_spend("x", DAY, DAY + 1), "7 periods back: still open");
        // Reopened: the same state.
        a.persist().unwrap();
        let b = Accountant::open(dir.path(), 0.3, 0.1, DAY).unwrap();
        assert_eq!(a.file, b.file);
    }

    #[test]
    fn a_damaged_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "{not json".to_string(),
            r#"{"version":9,"spent":{}}"#.to_string(),
            r#"{"version":1,"spent":{"g":[{"start_ms":0,"end_ms":10,"epsilon":-1}]}}"#.to_string(),
        ] {
            std::fs::write(dir.path().join(FILE_NAME), &bad).unwrap();
            let e = Accountant::open(dir.path(), 1.0, 0.1, DAY).unwrap_err();
            assert!(
                matches!(e, PrivacyError::BudgetCorrupt { .. }),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("delete it"), "{e}");
        }
    }
}
