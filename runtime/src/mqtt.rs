//! Broker connections shared by the MQTT source, the uplink and decisions:
//! options, credentials and TLS (rustls with the ring provider).

use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{BrokerConfig, TlsConfig};

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
