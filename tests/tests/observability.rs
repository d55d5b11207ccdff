//! What an operator sees without logging in: the health message in the
//! cloud, the last will when the gateway vanishes, `outpost status` on the
//! gateway, and the metrics that go with them (model info, uplink bytes,
//! oldest backlog age).

use std::process::Command;
use std::time::Duration;

use outpost::status::{GatewayState, Status};
use outpost_tests::*;

fn config(site: u16, cloud: u16) -> String {
    format!(
        r#"{}
[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
health_interval_s = 1
"#,
        site_config("gw-obs", site)
    )
}

fn health(sub: &Subscriber) -> Vec<Status> {
    sub.messages()
        .iter()
        .filter_map(|m| serde_json::from_slice::<Status>(&m.payload).ok())
        .collect()
}

fn status(o: &Outpost, json: bool) -> (i32, String) {
    let mut cmd = Command::new(outpost_bin());
    cmd.args(["status", "--addr", &format!("127.0.0.1:{}", o.metrics_port)]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run outpost status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn health_messages_status_and_the_last_will() {
    let site = Broker::start();
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/+/health");
    let mut o = Outpost::run(&config(site.port, cloud.port));
    o.wait_subscribed();
    publish_old_readings(site.port, 150);

    // Health messages every second, counting what the gateway did.
    wait_until(
        "a health message counting the 150 readings",
        Duration::from_secs(20),
        || health(&sub).iter().any(|h| h.readings == 150),
    );
    let h = health(&sub);
    let last = h.last().expect("a health message");
    assert_eq!(last.gateway, "gw-obs");
    assert_eq!(last.state, GatewayState::Running);
    assert_eq!(last.model.device, "cpu");
    assert_eq!(last.model.weights_sha256.len(), 64, "{last:?}");
    assert!(
        sub.messages()
            .iter()
            .all(|m| m.topic == "outpost/gw-obs/health"),
        "default health topic"
    );

    // The metrics that go with it.
    wait_until("an aggregate acknowledged", Duration::from_secs(20), || {
        o.metric("outpost_uplink_acked_total", &[]) >= 1.0
    });
    assert!(o.metric("outpost_uplink_bytes_total", &[]) > 0.0);
    assert!(o.metric("outpost_health_messages_total", &[]) >= 1.0);
    assert_eq!(
        o.metric(
            "outpost_model",
            &[
                &format!("version=\"{}\"", last.model.version),
                "device=\"cpu\""
            ]
        ),
        1.0,
        "{}",
        o.http("/metrics")
    );

    // `outpost status`: the summary, and the same numbers as JSON.
    let (code, text) = status(&o, false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("gateway gw-obs: running"), "{text}");
    assert!(text.contains("ingest  150 readings, 0 rejected"), "{text}");
    assert!(text.contains("uplink  connected"), "{text}");
    let (code, json) = status(&o, true);
    assert_eq!(code, 0, "{json}");
    let s: Status = serde_json::from_str(json.trim()).expect("status JSON");
    assert_eq!(s.readings, 150);
    assert!(s.uplink.acked >= 1 && s.uplink.bytes > 0, "{s:?}");
    assert!(
        s.uplink_bytes_per_inference.is_some_and(|b| b > 0.0),
        "{s:?}"
    );

    // SIGKILL: no clean disconnect, so the broker publishes the last will.
    o.kill9();
    wait_until(
        "the last will (state offline) at the cloud",
        Duration::from_secs(30),
        || {
            sub.json()
                .iter()
                .any(|v| v["state"] == "offline" && v["gateway"] == "gw-obs")
        },
    );
    // And `outpost status` says it cannot reach it.
    let out = Command::new(outpost_bin())
        .args(["status", "--addr", &format!("127.0.0.1:{}", o.metrics_port)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read the gateway's status"),
        "{out:?}"
    );
}

#[test]
fn the_oldest_backlog_age_grows_while_the_cloud_is_away() {
    let site = Broker::start();
    // Nobody listens on the cloud port: everything stays in the outbox.
    let o = Outpost::run(&config(site.port, free_port()));
    o.wait_subscribed();
    // Readings ten minutes old: their first window closes at once.
    publish_old_readings(site.port, 150);
    wait_until(
        "an aggregate waiting in the outbox",
        Duration::from_secs(30),
        || o.metric("outpost_outbox_depth", &[]) >= 1.0,
    );
    // Its window ended about 585 s ago; the gauge follows within a second.
    wait_until(
        "outpost_outbox_oldest_age_seconds to show the backlog's age",
        Duration::from_secs(10),
        || (500.0..900.0).contains(&o.metric("outpost_outbox_oldest_age_seconds", &[])),
    );
    let (code, text) = status(&o, false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("uplink  disconnected"), "{text}");
    assert!(text.contains(", oldest "), "{text}");
    let (_, json) = status(&o, true);
    let s: Status = serde_json::from_str(json.trim()).expect("status JSON");
    assert!(s.outbox.depth >= 1, "{s:?}");
    assert!(s.outbox.oldest_age_s.is_some_and(|a| a > 500.0), "{s:?}");
}
