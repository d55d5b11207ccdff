//! What an observer of the cloud broker learns: the real `outpost` binary
//! between two real Mosquitto brokers, every message the cloud broker
//! carries recorded (aggregates, health, last will).
//!
//! - With k-anonymity on (and differential privacy off), the health message
//!   carries no exact data totals: the totals minus what was released would
//!   give the readings of the suppressed groups.
//! - A grouping attribute that holds an object (an e-mail address as its
//!   key) is refused and counted: the address reaches no group name, no
//!   topic and no published byte.

use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const VALUES: [f32; 6] = [0.1, 0.2, 0.3, 0.0, 0.0, 0.0];

/// Every number in `v`, at any depth.
fn numbers(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Number(n) => out.extend(n.as_f64()),
        Value::Array(a) => a.iter().for_each(|x| numbers(x, out)),
        Value::Object(m) => m.values().for_each(|x| numbers(x, out)),
        _ => {}
    }
}

/// A reading of `sensor` with `attrs`, at `ts`.
fn reading_with(sensor: &str, ts: i64, attrs: Value) -> String {
    serde_json::json!({"sensor": sensor, "ts": ts, "values": VALUES, "attrs": attrs}).to_string()
}

/// Window-aligned start ten minutes ago (10 s windows).
fn old_base() -> i64 {
    let t = now_ms() - 600_000;
    t - t.rem_euclid(10_000)
}

/// A gateway `id` between a site and a cloud broker, grouping by the `line`
/// attribute, with `privacy` (its `[privacy]` tables) and health messages
/// every second; every message at the cloud broker recorded.
fn gateway(id: &str, privacy: &str) -> (Broker, Broker, Subscriber, Outpost) {
    let site = Broker::start();
    let cloud = Broker::start();
    let all = Subscriber::start(cloud.port, "#");
    let config = format!(
        r#"{}group_by = "attr:line"
{privacy}
{}"#,
        site_config(id, site.port),
        cloud_uplink(cloud.port)
    );
    let gw = Outpost::run(&config);
    gw.wait_subscribed();
    (site, cloud, all, gw)
}

#[test]
fn health_totals_do_not_reveal_suppressed_groups() {
    let (site, _cloud, all, mut gw) = gateway(
        "gw-k",
        r#"
[privacy]
allow_attrs = ["line"]

[privacy.k_anonymity]
min_subjects = 2
"#,
    );

    // Line A: two sensors (k = 2 met); line B: one sensor (suppressed).
    // 300 readings each, 100 ms apart: three 10 s windows per sensor.
    let base = old_base();
    let mut p = Publisher::connect(site.port);
    let per_sensor = 300i64;
    for k in 0..per_sensor {
        for (sensor, line) in [("a1", "A"), ("a2", "A"), ("b1", "B")] {
            p.publish(
                &format!("sensors/{sensor}/data"),
                reading_with(sensor, base + k * 100, serde_json::json!({ "line": line })),
            );
        }
    }
    p.flush();
    let total = 3 * per_sensor;
    gw.wait_metric(
        "outpost_readings_total",
        &[],
        total as f64,
        Duration::from_secs(30),
    );
    // Line B's first windows are closed and suppressed ...
    wait_until(
        "line B suppressed by k-anonymity",
        Duration::from_secs(30),
        || gw.metric("outpost_privacy_suppressed_total", &["k_anonymity"]) >= 2.0,
    );
    // ... and a health message went out after that.
    let seen = all.messages().len();
    wait_until("a health message", Duration::from_secs(10), || {
        all.messages()[seen..]
            .iter()
            .any(|m| m.topic.ends_with("/health"))
    });
    let inferences = gw.metric("outpost_inferences_total", &[]);
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(30)).success());
    let produced = gw.produced_aggregates();
    all.wait_aggregates(produced, Duration::from_secs(20));

    let mut released = 0u64;
    let mut health = 0;
    for m in all.messages() {
        let v: Value = serde_json::from_slice(&m.payload).expect("JSON");
        if m.topic.contains("/agg/") {
            assert!(
                m.topic.ends_with("/agg/A"),
                "only line A is released: {}",
                m.topic
            );
            released += v["readings"].as_u64().unwrap();
            continue;
        }
        if v["state"] == "offline" {
            continue;
        }
        health += 1;
        assert_eq!(v["counts_withheld"], true, "{v}");
        assert_eq!(
            (&v["readings"], &v["rejected"], &v["inferences"]),
            (&Value::from(0), &Value::from(0), &Value::from(0)),
            "{v}"
        );
        // No figure in it gives the readings of line B, the total, or the
        // exact inferences.
        let suppressed = total as u64 - released;
        let mut ns = Vec::new();
        numbers(&v, &mut ns);
        for n in ns {
            for secret in [total as f64, inferences] {
                assert_ne!(
                    n, secret,
                    "{secret} is readable from the health message: {v}"
                );
            }
            assert!(
                suppressed == 0 || n != suppressed as f64,
                "line B's readings are readable: {v}"
            );
        }
    }
    assert!(health > 0, "health messages were published");
    assert!(released > 0 && released < total as u64, "{released}");
}

#[test]
fn an_email_object_key_in_the_group_attribute_never_leaves() {
    let (site, _cloud, all, mut gw) = gateway(
        "gw-keys",
        r#"
[privacy]
allow_attrs = ["line", "tags"]
redact = ["email"]
"#,
    );

    let email = "jane.doe@example.org";
    let base = old_base();
    let mut p = Publisher::connect(site.port);
    let n = 200i64;
    for k in 0..n {
        // The group attribute as an object, its key an e-mail address; and
        // nested in an array.
        p.publish(
            "sensors/s1/data",
            reading_with(
                "s1",
                base + k * 100,
                serde_json::json!({ "line": { email: 1 } }),
            ),
        );
        p.publish(
            "sensors/s2/data",
            reading_with(
                "s2",
                base + k * 100,
                serde_json::json!({ "line": [{ email: "x" }] }),
            ),
        );
        // A good reading, with the address as a key deep in another attribute.
        p.publish(
            "sensors/s3/data",
            reading_with(
                "s3",
                base + k * 100,
                serde_json::json!({ "line": "A", "tags": { "a": [{ email: email }] } }),
            ),
        );
    }
    p.flush();
    gw.wait_metric(
        "outpost_rejected_total",
        &["reason=\"group_not_scalar\""],
        (2 * n) as f64,
        Duration::from_secs(30),
    );
    // Accepted at the source, then refused by the privacy stage.
    gw.wait_metric(
        "outpost_readings_total",
        &[],
        (3 * n) as f64,
        Duration::from_secs(30),
    );
    assert!(gw.metric("outpost_privacy_redactions_total", &[]) >= (2 * n) as f64);
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(30)).success());
    let produced = gw.produced_aggregates();
    assert!(produced > 0);
    all.wait_aggregates(produced, Duration::from_secs(20));
    let mut groups = std::collections::BTreeSet::new();
    for m in all.messages() {
        for part in [m.topic.as_bytes(), &m.payload[..]] {
            let text = String::from_utf8_lossy(part);
            for secret in [email, "jane.doe", "example.org"] {
                assert!(
                    !text.contains(secret),
                    "{secret:?} left on {}: {text}",
                    m.topic
                );
            }
        }
        if m.topic.contains("/agg/") {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            groups.insert(v["group"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        groups,
        ["A".to_string()].into(),
        "only the scalar group is released"
    );
    // The log names the reason, never the value.
    let log = gw.log();
    assert!(!log.contains(email), "the address is in the log");
}

#[test]
fn check_refuses_differential_privacy_without_declared_groups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outpost.toml");
    let base = r#"
[[sources]]
type = "simulated"

[aggregation]
group_by = "gateway"

[privacy.k_anonymity]
min_subjects = 2
action = "merge"

[privacy.differential_privacy]
epsilon = 1.0
budget = 10.0
"#;
    std::fs::write(&path, base).unwrap();
    let out = std::process::Command::new(outpost_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("privacy.differential_privacy.groups"),
        "{text}"
    );
    assert!(text.contains("privacy.k_anonymity.action"), "{text}");
    // Declared, without merge: accepted.
    let fixed = base.replace("action = \"merge\"", "") + "groups = [\"line-a\"]\n";
    std::fs::write(&path, fixed).unwrap();
    run_ok(
        std::process::Command::new(outpost_bin())
            .args(["check", "--config"])
            .arg(&path),
    );
}

#[test]
fn declared_groups_follow_a_live_reconfiguration() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("pseudonym.key");
    std::fs::write(
        &key,
        "k-reload:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\n",
    )
    .unwrap();
    let site = Broker::start();
    let cloud = Broker::start();
    let all = Subscriber::start(cloud.port, "#");
    let config = |groups: &str| {
        format!(
            r#"{}group_by = "attr:line"

[privacy]
allow_attrs = ["line"]
pseudonymize_attrs = ["line"]
key = {{ file = "{}" }}

[privacy.differential_privacy]
epsilon = 1.0
budget = 1000.0
groups = [{groups}]
release_delay_ms = 10000
{}"#,
            site_config("gw-dp-reload", site.port),
            key.display(),
            cloud_uplink(cloud.port)
        )
    };
    let mut gw = Outpost::run(&config(r#""A""#));
    gw.wait_subscribed();
    let base = old_base();
    let mut p = Publisher::connect(site.port);
    let mut send = |from: i64, to: i64| {
        for k in from..to {
            for (sensor, line) in [("a1", "A"), ("b1", "B")] {
                p.publish(
                    &format!("sensors/{sensor}/data"),
                    reading_with(sensor, base + k * 100, serde_json::json!({ "line": line })),
                );
            }
        }
        p.flush();
    };
    send(0, 300);
    let undeclared = ["source=\"privacy\"", "reason=\"undeclared_group\""];
    // Refused in the windowing stage, after the source counted them.
    gw.wait_metric(
        "outpost_rejected_total",
        &undeclared,
        300.0,
        Duration::from_secs(30),
    );
    // Line B declared: applied live, its readings accepted from then on.
    gw.write_config(&config(r#""A", "B""#));
    gw.signal(libc::SIGHUP);
    wait_until("the reload applied", Duration::from_secs(60), || {
        gw.metric("outpost_config_reloads_total", &["kind=\"applied\""]) == 1.0
    });
    send(300, 600);
    let (a, b) = (token(&key, "line", "A"), token(&key, "line", "B"));
    wait_until("line B released", Duration::from_secs(30), || {
        all.json().iter().any(|v| v["group"] == b.as_str())
    });
    assert_eq!(gw.metric("outpost_rejected_total", &undeclared), 300.0);
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(30)).success());
    all.wait_aggregates(gw.produced_aggregates(), Duration::from_secs(20));

    let mut windows: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for v in all.json() {
        if v.get("window_start").is_some() {
            windows
                .entry(v["group"].as_str().unwrap().to_string())
                .or_default()
                .push(v["window_start"].as_i64().unwrap());
        }
    }
    assert_eq!(
        windows.keys().cloned().collect::<Vec<_>>(),
        {
            let mut want = vec![a.clone(), b.clone()];
            want.sort();
            want
        },
        "only the two tokens"
    );
    // B's readings after the reload are released under its token, with
    // readings (noised, but 300 readings are far above the noise).
    let b_readings: u64 = all
        .json()
        .iter()
        .filter(|v| v["group"] == b.as_str())
        .map(|v| v["readings"].as_u64().unwrap())
        .sum();
    assert!(b_readings > 150, "{b_readings}");
    // Once both are declared, every window has both.
    let b_windows: std::collections::BTreeSet<i64> = windows[&b].iter().copied().collect();
    for w in &b_windows {
        assert!(windows[&a].contains(w), "window {w} has B but not A");
    }
}
