//! The uplink over mutual TLS (rustls, ring provider) to a real Mosquitto
//! that requires client certificates; refusal of an untrusted server; a
//! client certificate renewed in place, read again by `outpost reload`.

use std::time::Duration;

use outpost_tests::*;

fn tls_config(site: u16, cloud_tls: u16, pki: &Pki, ca: &str) -> String {
    format!(
        r#"{}
[uplink]
backoff_initial_ms = 100
backoff_max_ms = 500
[uplink.broker]
host = "localhost"
port = {cloud_tls}
[uplink.broker.tls]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
"#,
        site_config("gw-tls", site),
        cert = pki.path("client.pem"),
        key = pki.path("client.key"),
    )
}

/// A cloud broker with a plaintext listener (for the test's subscriber) and a
/// mutual-TLS listener (for the gateway).
fn tls_cloud(pki: &Pki) -> (Broker, u16) {
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.path("ca.pem"),
        pki.path("server.pem"),
        pki.path("server.key")
    );
    (Broker::start_with(&extra), tls_port)
}

/// Publish 150 readings on site, stop the gateway, and see every one of
/// them counted in the aggregates that arrived over TLS.
fn deliver_150(mut o: Outpost, site: &Broker, sub: &Subscriber) {
    publish_old_readings(site.port, 150);
    o.wait_metric(
        "outpost_readings_total",
        &[],
        150.0,
        Duration::from_secs(20),
    );
    o.signal(libc::SIGTERM);
    assert!(o.wait(Duration::from_secs(20)).success(), "{}", o.log());
    wait_until("aggregates over TLS", Duration::from_secs(10), || {
        sub.json()
            .iter()
            .map(|a| a["readings"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 150
    });
}

#[test]
fn aggregates_cross_mutual_tls() {
    let pki = Pki::new();
    let site = Broker::start();
    let (cloud, tls_port) = tls_cloud(&pki);
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let o = Outpost::run(&tls_config(site.port, tls_port, &pki, &pki.path("ca.pem")));
    o.wait_subscribed();
    o.wait_metric(
        "outpost_uplink_connected",
        &[],
        1.0,
        Duration::from_secs(20),
    );
    deliver_150(o, &site, &sub);
}

#[test]
fn an_untrusted_server_is_refused() {
    let pki = Pki::new();
    let other = Pki::new();
    let site = Broker::start();
    let (cloud, tls_port) = tls_cloud(&pki);
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    // The gateway trusts another CA: the handshake must fail and nothing is sent.
    let o = Outpost::run(&tls_config(
        site.port,
        tls_port,
        &pki,
        &other.path("ca.pem"),
    ));
    wait_until("a failed TLS connection", Duration::from_secs(20), || {
        o.log().contains("uplink disconnected")
    });
    assert_eq!(o.metric("outpost_uplink_connected", &[]), 0.0);
    let log = o.log();
    assert!(
        log.contains("UnknownIssuer") || log.contains("certificate"),
        "{log}"
    );
    assert!(sub.messages().is_empty());
}

#[test]
fn a_client_certificate_renewed_in_place_is_read_again_by_a_reload() {
    let pki = Pki::new();
    let other = Pki::new();
    let site = Broker::start();
    let (cloud, tls_port) = tls_cloud(&pki);
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    // The gateway's certificate is not one the broker accepts (as an
    // expired one would not be) until it is renewed at the same paths.
    let certs = tempfile::tempdir().unwrap();
    let cert = certs.path().join("client.pem").display().to_string();
    let key = certs.path().join("client.key").display().to_string();
    std::fs::copy(other.path("client.pem"), &cert).unwrap();
    std::fs::copy(other.path("client.key"), &key).unwrap();
    let config = tls_config(site.port, tls_port, &pki, &pki.path("ca.pem"))
        .replace(&pki.path("client.pem"), &cert)
        .replace(&pki.path("client.key"), &key);
    assert!(config.contains(&cert) && config.contains(&key));
    let o = Outpost::run(&config);
    wait_until("a refused connection", Duration::from_secs(20), || {
        o.log().contains("uplink disconnected")
    });
    assert_eq!(o.metric("outpost_uplink_connected", &[]), 0.0);
    let reload = |o: &Outpost| {
        let out = std::process::Command::new(outpost_bin())
            .args(["reload", "--config"])
            .arg(&o.config_path)
            .output()
            .expect("run outpost reload");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(reload(&o).starts_with("unchanged "), "{}", o.log());

    std::fs::copy(pki.path("client.pem"), &cert).unwrap();
    std::fs::copy(pki.path("client.key"), &key).unwrap();
    let out = reload(&o);
    assert!(out.starts_with("applied "), "{out}\n{}", o.log());
    o.wait_metric(
        "outpost_uplink_connected",
        &[],
        1.0,
        Duration::from_secs(20),
    );
    o.wait_subscribed();
    deliver_150(o, &site, &sub);
}
