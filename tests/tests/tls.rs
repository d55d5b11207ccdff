//! The uplink over mutual TLS (rustls, ring provider) to a real Mosquitto
//! that requires client certificates; and refusal of an untrusted server.

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

#[test]
fn aggregates_cross_mutual_tls() {
    let pki = Pki::new();
    let site = Broker::start();
    let (cloud, tls_port) = tls_cloud(&pki);
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let mut o = Outpost::run(&tls_config(site.port, tls_port, &pki, &pki.path("ca.pem")));
    o.wait_subscribed();
    o.wait_metric(
        "outpost_uplink_connected",
        &[],
        1.0,
        Duration::from_secs(20),
    );
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
