//! `[fleet]`: remote management over the uplink's MQTT connection (see
//! docs/fleet.md). Absent: the gateway is managed only locally.

use std::path::PathBuf;

use serde::Deserialize;

use crate::check::Collector;

/// `[fleet]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Public key files (`ed25519-public <hex>`, as for model signing) of
    /// the fleet operators whose signed desired-state documents and
    /// commands this gateway applies. At least one.
    pub trusted_keys: Vec<PathBuf>,
    /// Groups this gateway belongs to: it also follows
    /// `<topic_prefix>/group/<group>/desired`.
    pub groups: Vec<String>,
    /// First level of every fleet topic.
    pub topic_prefix: String,
    /// Largest desired-state document or command accepted, in bytes; a
    /// larger one is refused before it is parsed.
    pub max_document_bytes: usize,
    /// Most command ids remembered (until their expiry) to refuse a
    /// command replayed; a command beyond that is refused, not forgotten.
    pub max_pending_commands: usize,
    /// The longest validity a document or command may claim
    /// (`expires_at_ms` at most this far ahead of the gateway's clock).
    pub max_validity_s: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            trusted_keys: Vec::new(),
            groups: Vec::new(),
            topic_prefix: "outpost".into(),
            max_document_bytes: 1 << 20,
            max_pending_commands: 1024,
            max_validity_s: 30 * 24 * 3600,
        }
    }
}

/// The largest MQTT packet the uplink's connection takes
/// (`crate::mqtt::options`).
const MAX_PACKET: usize = 1 << 20;

/// A topic level: non-empty, no `/`, `+`, `#` or NUL.
fn bad_level(s: &str) -> bool {
    s.trim().is_empty() || s.contains(['/', '+', '#', '\0'])
}

impl FleetConfig {
    /// Check `[fleet]` (paths relative to it).
    pub fn check(&self, c: &mut Collector) {
        if self.trusted_keys.is_empty() {
            c.push(
                "trusted_keys",
                "at least one fleet operator key is required: without one no document could be applied",
            );
        }
        for (i, k) in self.trusted_keys.iter().enumerate() {
            if let Err(e) = outpost_models::signing::read_public_key(k) {
                c.push(format!("trusted_keys[{i}]"), e.to_string());
            }
        }
        for (i, g) in self.groups.iter().enumerate() {
            if bad_level(g) {
                c.push(
                    format!("groups[{i}]"),
                    "must be non-empty and contain no '/', '+', '#' or NUL",
                );
            }
            if self.groups[..i].contains(g) {
                c.push(format!("groups[{i}]"), format!("{g:?} is listed twice"));
            }
        }
        if self.topic_prefix.is_empty()
            || self.topic_prefix.contains(['+', '#', '\0'])
            || self.topic_prefix.starts_with('/')
            || self.topic_prefix.ends_with('/')
        {
            c.push(
                "topic_prefix",
                "must be non-empty, contain no '+', '#' or NUL, and not start or end with '/'",
            );
        }
        if !(1024..=MAX_PACKET).contains(&self.max_document_bytes) {
            c.push(
                "max_document_bytes",
                "must be 1024 to 1048576 (the uplink's MQTT packet limit)",
            );
        }
        if self.max_pending_commands == 0 {
            c.push("max_pending_commands", "must be at least 1");
        }
        if self.max_validity_s == 0 {
            c.push("max_validity_s", "must be at least 1");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "t") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.path).collect()
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn fleet_settings_are_checked_with_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (s, p) = (dir.path().join("k.key"), dir.path().join("k.pub"));
        outpost_models::signing::generate_keypair(&s, &p).unwrap();
        let key = p.display();
        let base = "[[sources]]\ntype = \"simulated\"\n[uplink]\nallow_plaintext = true\nbroker = { host = \"x\", port = 1883 }\n";
        let ok = format!("{base}[fleet]\ntrusted_keys = [\"{key}\"]\ngroups = [\"north\"]\n");
        let cfg = Config::parse(&ok, "t").unwrap();
        let fleet = cfg.fleet.unwrap();
        assert_eq!(fleet.groups, vec!["north".to_string()]);
        assert_eq!(fleet.topic_prefix, "outpost");
        assert!(Config::parse(base, "t").unwrap().fleet.is_none());

        let bad = format!(
            "{base}[fleet]\ntrusted_keys = [\"{key}\", \"/nonexistent.pub\"]\n\
             groups = [\"a/b\", \"n\", \"n\"]\ntopic_prefix = \"x/\"\nmax_document_bytes = 1\n\
             max_pending_commands = 0\nmax_validity_s = 0\n[privacy]\ntrusted_keys = [\"{key}\"]\n"
        );
        let paths = problems(&bad);
        for want in [
            "fleet.trusted_keys[1]",
            "fleet.groups[0]",
            "fleet.groups[2]",
            "fleet.topic_prefix",
            "fleet.max_document_bytes",
            "fleet.max_pending_commands",
            "fleet.max_validity_s",
            // The same key for fleet and privacy.
            "fleet.trusted_keys[0]",
        ] {
            assert!(paths.iter().any(|p| p == want), "{want} missing: {paths:?}");
        }
        let paths = problems("[[sources]]\ntype = \"simulated\"\n[fleet]\ncolour = 1\n");
        assert!(paths.iter().any(|p| p.starts_with("fleet")), "{paths:?}");
        let paths = problems(&format!(
            "[[sources]]\ntype = \"simulated\"\n[fleet]\ntrusted_keys = [\"{key}\"]\n"
        ));
        assert_eq!(paths, vec!["fleet".to_string()], "no uplink");
        let paths = problems(&format!(
            "{base}[fleet]\n[privacy]\ntrusted_keys = [\"/nonexistent.pub\"]\n"
        ));
        assert!(
            paths.contains(&"fleet.trusted_keys".to_string()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"privacy.trusted_keys[0]".to_string()),
            "{paths:?}"
        );
    }
}
