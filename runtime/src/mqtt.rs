//! Broker connections shared by the MQTT source, the uplink and decisions:
//! the broker table of the configuration, options, credentials and TLS
//! (rustls with the ring provider), topic filters and templates.

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use serde::Deserialize;

use crate::check::Collector;
use crate::secret::SecretSource;

/// Connection to an MQTT broker, shared by the MQTT source, the uplink and decisions.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name or address.
    pub host: String,
    /// Port (1883 plain, 8883 TLS by convention).
    pub port: u16,
    /// Client id; default: `<gateway id>-<role>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password, from a file or the environment.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// TLS settings; absent means plaintext, which must be allowed explicitly
    /// for the uplink (`allow_plaintext = true`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

fn default_keep_alive() -> u64 {
    30
}

/// TLS with rustls (ring provider).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificates that verify the server; default: the
    /// bundled Mozilla roots (webpki-roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// ALPN protocols, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443.
    #[serde(default)]
    pub alpn: Vec<String>,
}

/// Check a broker table at `path`.
/// A digest of what a connection reads from files (TLS certificates and
/// key, the password file), so that a reload notices a renewed certificate
/// or a changed password behind an unchanged configuration. A file that
/// cannot be read counts as its error. Never logged: it is only compared.
pub fn files_digest(b: &BrokerConfig) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let tls = b.tls.as_ref();
    let files = [
        tls.and_then(|t| t.ca_file.as_ref()),
        tls.and_then(|t| t.cert_file.as_ref()),
        tls.and_then(|t| t.key_file.as_ref()),
        b.password.as_ref().and_then(|p| p.file.as_ref()),
    ];
    for f in files.into_iter().flatten() {
        match std::fs::read(f) {
            Ok(bytes) => h.update(sha2::Sha256::digest(&bytes)),
            Err(e) => h.update(e.to_string().as_bytes()),
        }
    }
    format!("{:x}", h.finalize())
}

pub fn check_broker(c: &mut Collector, path: &str, b: &BrokerConfig) {
    if b.host.trim().is_empty() {
        c.push(format!("{path}.host"), "must not be empty");
    }
    if b.port == 0 {
        c.push(format!("{path}.port"), "must not be 0");
    }
    if let Some(p) = &b.password
        && (p.file.is_some() == p.env.is_some())
    {
        c.push(
            format!("{path}.password"),
            "set exactly one of `file` or `env`",
        );
    }
    if let Some(t) = &b.tls
        && (t.cert_file.is_some() != t.key_file.is_some())
    {
        c.push(
            format!("{path}.tls"),
            "cert_file and key_file go together (mutual TLS)",
        );
    }
}

/// Check a topic template at `path`: only the `allowed` placeholders, no wildcards.
pub fn check_template(c: &mut Collector, path: &str, template: &str, allowed: &[&str]) {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            c.push(path, "unclosed '{'");
            return;
        };
        let name = &rest[open + 1..open + close];
        if !allowed.contains(&name) {
            c.push(
                path,
                format!(
                    "unknown placeholder {{{name}}}; allowed: {}",
                    allowed.join(", ")
                ),
            );
        }
        rest = &rest[open + close + 1..];
    }
    if template.contains(['+', '#']) || template.is_empty() {
        c.push(path, "a topic must be non-empty and contain no wildcards");
    }
}

/// Check an MQTT topic filter: `#` only last and alone in its level, `+` alone in its level.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty topic filter".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err(format!("{filter:?}: '#' must be the whole last level"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("{filter:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Fill a topic template: each `{name}` of `vars` becomes its value as one
/// topic level ([`escape_level`]); anything else is kept as it is. Values
/// are not searched for placeholders again, so distinct values always give
/// distinct topics.
pub fn render_topic(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let var = after.find('}').and_then(|close| {
            let name = &after[..close];
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (close, *v))
        });
        match var {
            Some((close, v)) => {
                out.push_str(&escape_level(v));
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A topic level from arbitrary text, one to one: `/`, `+`, `#`, `%` and
/// control characters become `%XX`, one per UTF-8 byte (upper-case hex);
/// everything else is kept, so a value without them is its own level.
pub fn escape_level(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for ch in v.chars() {
        if matches!(ch, '/' | '+' | '#' | '%') || ch.is_control() {
            let mut buf = [0u8; 4];
            for b in ch.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Errors of setting up a broker connection.
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    /// A certificate or key file could not be read or parsed.
    #[error("{what} {path}: {message}")]
    Pem {
        /// Which file (CA, certificate, key).
        what: &'static str,
        /// Its path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The password could not be read.
    #[error("password: {0}")]
    Secret(String),
}

fn read_pem(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, MqttSetupError> {
    std::fs::read(path).map_err(|e| MqttSetupError::Pem {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Build the rustls client configuration: server verification always (with
/// the configured CA or the Mozilla roots), client certificates when given.
pub fn rustls_config(tls: &TlsConfig) -> Result<rustls::ClientConfig, MqttSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?;
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(p) => {
            let pem = read_pem("CA file", p)?;
            let certs: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut BufReader::new(&pem[..]))
                    .collect::<Result<_, _>>()
                    .map_err(|e| MqttSetupError::Pem {
                        what: "CA file",
                        path: p.display().to_string(),
                        message: e.to_string(),
                    })?;
            if certs.is_empty() {
                return Err(MqttSetupError::Pem {
                    what: "CA file",
                    path: p.display().to_string(),
                    message: "no certificate found".into(),
                });
            }
            for c in certs {
                roots.add(c)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = builder.with_root_certificates(roots);
    let mut cfg = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let pem = read_pem("certificate", cert)?;
            let chain: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut BufReader::new(&pem[..]))
                    .collect::<Result<_, _>>()
                    .map_err(|e| MqttSetupError::Pem {
                        what: "certificate",
                        path: cert.display().to_string(),
                        message: e.to_string(),
                    })?;
            let kpem = read_pem("key", key)?;
            let key_der: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut BufReader::new(&kpem[..]))
                    .map_err(|e| MqttSetupError::Pem {
                        what: "key",
                        path: key.display().to_string(),
                        message: e.to_string(),
                    })?
                    .ok_or_else(|| MqttSetupError::Pem {
                        what: "key",
                        path: key.display().to_string(),
                        message: "no private key found".into(),
                    })?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = tls.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Ok(cfg)
}

/// rumqttc options for a broker. `role` makes the default client id unique
/// per connection of this gateway (`<gateway>-uplink`, ...).
pub fn options(
    broker: &BrokerConfig,
    gateway: &str,
    role: &str,
) -> Result<MqttOptions, MqttSetupError> {
    let client_id = broker
        .client_id
        .clone()
        .unwrap_or_else(|| format!("{gateway}-{role}"));
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_keep_alive(Duration::from_secs(broker.keep_alive_s.max(5)));
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    if let Some(user) = &broker.username {
        let password = match &broker.password {
            Some(s) => s.read().map_err(MqttSetupError::Secret)?,
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if let Some(tls) = &broker.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(rustls_config(tls)?),
        )));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The inverse of [`escape_level`], for the tests.
    fn unescape(level: &str) -> String {
        let mut bytes = Vec::new();
        let mut rest = level.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'%' {
                let hex = std::str::from_utf8(&tail[..2]).expect("two hex digits after '%'");
                bytes.push(u8::from_str_radix(hex, 16).expect("two hex digits after '%'"));
                rest = &tail[2..];
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        String::from_utf8(bytes).expect("escape_level keeps UTF-8 whole")
    }

    const AGG: &str = "o/{gateway}/agg/{group}";

    fn agg_topic(group: &str) -> String {
        render_topic(AGG, &[("gateway", "g1"), ("group", group)])
    }

    /// Issue 18 (11): `a/b` and `a_b` went to the same topic.
    #[test]
    fn uplink_topics_of_groups_once_replaced_alike_are_distinct() {
        assert_eq!(agg_topic("a/b"), "o/g1/agg/a%2Fb");
        assert_eq!(agg_topic("a_b"), "o/g1/agg/a_b");
        assert_ne!(agg_topic("a+b"), agg_topic("a#b"));
        assert_eq!(agg_topic("a+b#%"), "o/g1/agg/a%2Bb%23%25");
        assert_eq!(agg_topic("50%2F"), "o/g1/agg/50%252F");
        assert_eq!(agg_topic("l\n\u{85}"), "o/g1/agg/l%0A%C2%85");
        // Groups without those characters keep their topics.
        for g in ["pump-7", "line a", "Ünïcode_läne", "unassigned", "x.y:z"] {
            assert_eq!(agg_topic(g), format!("o/g1/agg/{g}"));
        }
        // A value is never searched for placeholders.
        assert_eq!(
            render_topic(AGG, &[("gateway", "{group}"), ("group", "x")]),
            "o/{group}/agg/x"
        );
        assert_eq!(render_topic("a/{other}/{x", &[("x", "1")]), "a/{other}/{x");
    }

    proptest! {
        #[test]
        fn uplink_topic_levels_are_one_to_one(
            a in prop_oneof![any::<String>(), "[ab/+#%_\\x00\\n-]{0,10}"],
            b in prop_oneof![any::<String>(), "[ab/+#%_\\x00\\n-]{0,10}"],
        ) {
            let level = escape_level(&a);
            prop_assert!(!level.contains(['/', '+', '#']) && !level.chars().any(char::is_control));
            prop_assert_eq!(unescape(&level), a.clone());
            prop_assert_eq!(agg_topic(&a) == agg_topic(&b), a == b);
        }
    }
}
