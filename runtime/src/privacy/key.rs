//! The pseudonymization key: its format, the tokens it makes, and noticing
//! when its file changes.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::PrivacyError;
use crate::secret::SecretSource;

/// Shortest secret, in bytes.
pub(crate) const KEY_MIN_BYTES: usize = 32;
/// Longest secret, in bytes.
const KEY_MAX_BYTES: usize = 1024;
/// The key file is looked at no more often than this.
pub(super) const RECHECK: Duration = Duration::from_secs(1);

/// A key: its id and secret. `Debug` never shows the secret.
#[derive(Clone)]
pub(super) struct PseudonymKey {
    id: String,
    secret: Vec<u8>,
    mac: Hmac<Sha256>,
}

impl PartialEq for PseudonymKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.secret == other.secret
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PseudonymKey {{ id: {:?}, secret: <redacted> }}",
            self.id
        )
    }
}

/// Whether `id` is a valid key id: `[A-Za-z0-9_-]{1,32}`.
pub(crate) fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl PseudonymKey {
    /// Parse `<key id>:<hex secret>`. The reason for a failure never
    /// contains any of the text.
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let Some((id, hex_secret)) = text.split_once(':') else {
            return Err("expected `<key id>:<hex secret>`, found no ':'".into());
        };
        if !valid_key_id(id) {
            return Err(
                "the key id must be 1 to 32 characters of A-Z, a-z, 0-9, '_' and '-'".into(),
            );
        }
        let secret = hex::decode(hex_secret.trim())
            .map_err(|_| "the secret is not an even number of hex digits".to_string())?;
        if secret.len() < KEY_MIN_BYTES {
            return Err(format!(
                "the secret has {} bytes; it needs at least {KEY_MIN_BYTES} bytes ({} hex digits)",
                secret.len(),
                2 * KEY_MIN_BYTES
            ));
        }
        if secret.len() > KEY_MAX_BYTES {
            return Err(format!("the secret has more than {KEY_MAX_BYTES} bytes"));
        }
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&secret)
            .map_err(|_| "the secret cannot key HMAC-SHA256".to_string())?;
        Ok(Self {
            id: id.to_string(),
            secret,
            mac,
        })
    }

    /// The key id.
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// The token of `value` in `field`: `p_` and the first 32 hex digits of
    /// HMAC-SHA256(key, field ‖ 0x00 ‖ value).
    pub(super) fn token(&self, field: &str, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(field.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        let out = mac.finalize().into_bytes();
        format!("p_{}", hex::encode(&out[..16]))
    }
}

/// What identifies one version of the key file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    Meta {
        len: u64,
        modified: Option<SystemTime>,
        inode: u64,
        changed: (i64, i64),
    },
    Unreadable(String),
}

fn stamp(path: &std::path::Path) -> Stamp {
    match std::fs::metadata(path) {
        Ok(m) => {
            #[cfg(unix)]
            let (inode, changed) = {
                use std::os::unix::fs::MetadataExt;
                (m.ino(), (m.ctime(), m.ctime_nsec()))
            };
            #[cfg(not(unix))]
            let (inode, changed) = (0, (0, 0));
            Stamp::Meta {
                len: m.len(),
                modified: m.modified().ok(),
                inode,
                changed,
            }
        }
        Err(e) => Stamp::Unreadable(e.kind().to_string()),
    }
}

/// The key in use and where it comes from.
#[derive(Debug)]
pub(super) struct KeyState {
    current: PseudonymKey,
    source: SecretSource,
    path: Option<PathBuf>,
    /// The file version last looked at (in use, or refused).
    stamp: Option<Stamp>,
    last_check: Option<Instant>,
}

/// The outcome of [`KeyState::check`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reload {
    /// Nothing new.
    Unchanged,
    /// A new key is in use.
    Changed {
        /// The id of the key it replaced.
        previous: String,
    },
    /// The file changed but its content cannot be used (never the secret).
    Failed(String),
}

fn origin(source: &SecretSource) -> String {
    match (&source.file, &source.env) {
        (Some(p), _) => format!("file {}", p.display()),
        (None, Some(e)) => format!("environment variable {e}"),
        (None, None) => "an unset source".into(),
    }
}

impl KeyState {
    /// Read the key now.
    pub(super) fn load(source: &SecretSource) -> Result<Self, PrivacyError> {
        let path = source.file.clone().filter(|_| source.env.is_none());
        let stamp = path.as_deref().map(stamp);
        let text = source.read().map_err(PrivacyError::KeyRead)?;
        let current = PseudonymKey::parse(&text).map_err(|reason| PrivacyError::KeyFormat {
            origin: origin(source),
            reason,
        })?;
        Ok(Self {
            current,
            source: source.clone(),
            path,
            stamp,
            last_check: None,
        })
    }

    /// The key in use.
    pub(super) fn key(&self) -> &PseudonymKey {
        &self.current
    }

    /// Look at the key file when a second has passed since the last look,
    /// and take its key when the file changed and parses.
    pub(super) fn check(&mut self, now: Instant) -> Reload {
        let Some(path) = &self.path else {
            return Reload::Unchanged;
        };
        if let Some(last) = self.last_check
            && now.saturating_duration_since(last) < RECHECK
        {
            return Reload::Unchanged;
        }
        self.last_check = Some(now);
        let st = stamp(path);
        if self.stamp.as_ref() == Some(&st) {
            return Reload::Unchanged;
        }
        self.stamp = Some(st.clone());
        if let Stamp::Unreadable(kind) = st {
            return Reload::Failed(format!("cannot read {}: {kind}", path.display()));
        }
        let parsed = self.source.read().and_then(|text| {
            PseudonymKey::parse(&text).map_err(|reason| format!("{}: {reason}", path.display()))
        });
        match parsed {
            Ok(k) if k == self.current => Reload::Unchanged,
            Ok(k) if k.id == self.current.id => Reload::Failed(format!(
                "{}: the secret changed but the key id {:?} did not; a new key needs a new id",
                path.display(),
                k.id
            )),
            Ok(k) => {
                let previous = std::mem::replace(&mut self.current, k);
                Reload::Changed {
                    previous: previous.id,
                }
            }
            Err(e) => Reload::Failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_and_formats() {
        assert!(valid_key_id("k-2026_01"));
        assert!(!valid_key_id(""));
        assert!(!valid_key_id(&"a".repeat(33)));
        assert!(!valid_key_id("a b"));
        let secret = "ab".repeat(32);
        let k = PseudonymKey::parse(&format!("  k1:{secret}\r\n")).unwrap();
        assert_eq!(k.id(), "k1");
        assert!(PseudonymKey::parse(&format!("k1:{}", "ab".repeat(31))).is_err());
        assert!(PseudonymKey::parse(&format!("k1:{}", "ab".repeat(1025))).is_err());
        for bad in [
            format!("k1;{secret}"),
            format!(":{secret}"),
            format!("k1:{secret}x"),
        ] {
            let e = PseudonymKey::parse(&bad).unwrap_err();
            assert!(!e.contains(&secret[..8]), "{e}");
        }
        assert_eq!(k.token("sensor", "a").len(), 34);
        assert!(k.token("sensor", "a").starts_with("p_"));
        // The separator makes field and value unambiguous.
        assert_ne!(k.token("ab", "c"), k.token("a", "bc"));
    }
}
