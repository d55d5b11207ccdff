//! Checking a configuration: every problem is collected with its full path
//! (`sources[1].rate_hz`, `uplink.broker.port`), so that one run of
//! `outpost check` reports them all.
//!
//! Each stage checks its own part through a [`Collector`] with paths
//! relative to that part; [`crate::config`] places each part at its path
//! with [`Collector::within`] and checks what crosses stages.

use std::fmt;

use serde::de::DeserializeOwned;

/// One problem in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path, e.g. `sources[0].rate_hz`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem of a configuration, collected as the stages check their
/// parts; paths are made full by [`Collector::within`].
#[derive(Debug, Default)]
pub struct Collector {
    problems: Vec<Problem>,
    prefix: String,
}

impl Collector {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a problem at `path`, relative to the part being checked
    /// (`rate_hz` inside `sources[1]` is recorded as `sources[1].rate_hz`).
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let path = match (self.prefix.is_empty(), path.is_empty()) {
            (true, _) => path,
            (false, true) => self.prefix.clone(),
            (false, false) if path.starts_with('[') => format!("{}{path}", self.prefix),
            (false, false) => format!("{}.{path}", self.prefix),
        };
        self.problems.push(Problem {
            path,
            message: message.into(),
        });
    }

    /// Check a part at `path` (relative to the current one): problems that
    /// `check` records are placed under it.
    pub fn within(&mut self, path: &str, check: impl FnOnce(&mut Self)) {
        let saved = self.prefix.clone();
        self.prefix = match (saved.is_empty(), path.starts_with('[')) {
            (true, _) => path.to_string(),
            (false, true) => format!("{saved}{path}"),
            (false, false) => format!("{saved}.{path}"),
        };
        check(self);
        self.prefix = saved;
    }

    /// Every problem recorded, in order.
    pub fn into_problems(self) -> Vec<Problem> {
        self.problems
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// Deserialize one section; record every problem with its full path.
    /// An unknown field is recorded, removed, and the section parsed again,
    /// so that one typo does not hide the section's other problems.
    pub(crate) fn section<T: DeserializeOwned>(
        &mut self,
        path: &str,
        mut value: toml::Value,
    ) -> Option<T> {
        for _ in 0..32 {
            match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(v) => return Some(v),
                Err(e) => {
                    let inner: Vec<String> = e
                        .path()
                        .iter()
                        .filter_map(|seg| match seg {
                            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                            serde_path_to_error::Segment::Seq { index } => {
                                Some(format!("[{index}]"))
                            }
                            _ => None,
                        })
                        .collect();
                    let message = e.into_inner().to_string().trim().replace('\n', " ");
                    let unknown = message
                        .strip_prefix("unknown field `")
                        .and_then(|m| m.split('`').next())
                        .map(str::to_string);
                    let mut full = path.to_string();
                    for seg in &inner {
                        if !seg.starts_with('[') {
                            full.push('.');
                        }
                        full.push_str(seg);
                    }
                    match unknown {
                        Some(field) => {
                            // Some deserializers point at the field itself, some at its table.
                            let (table, field_path) = if inner.last() == Some(&field) {
                                (&inner[..inner.len() - 1], full)
                            } else {
                                (&inner[..], format!("{full}.{field}"))
                            };
                            self.push(field_path, message);
                            let removed = table_at(&mut value, table)
                                .and_then(|t| t.remove(&field))
                                .is_some();
                            if !removed {
                                return None;
                            }
                        }
                        None => {
                            self.push(full, message);
                            return None;
                        }
                    }
                }
            }
        }
        None
    }
}

/// The table at `path` (keys and `[i]` indices) inside `v`.
fn table_at<'a>(v: &'a mut toml::Value, path: &[String]) -> Option<&'a mut toml::Table> {
    let mut cur = v;
    for seg in path {
        cur = match seg.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(i) => cur.as_array_mut()?.get_mut(i.parse::<usize>().ok()?)?,
            None => cur.as_table_mut()?.get_mut(seg)?,
        };
    }
    cur.as_table_mut()
}
