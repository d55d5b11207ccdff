//! `outpost privacy report` against the wire: a real gateway between two
//! real Mosquitto brokers, under differential privacy with pseudonymized,
//! declared groups; every message the cloud broker carries
//! (aggregates, health, the last will after a kill) is recorded, and checked
//! against the report the same binary prints for the same configuration:
//! every JSON field seen on the wire is in the report for its message, as
//! sent; nothing the report says is not sent is on the wire; what it says is
//! withheld is 0 or null; the groups and topics seen are the ones it lists;
//! and nothing it calls hidden (readings, attributes, sensor ids) is there.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use outpost::privacy_report::paths;
use outpost_tests::*;
use serde_json::Value;

const KEY: &str = "k-report:8f2a6c1e9b7d4a3f0e5c2b1a9d8e7f6c5b4a3928170615f4e3d2c1b0a9f8e7d6\n";
const VALUES: [f32; 6] = [0.731942, 0.268113, 0.5519, 0.0, 0.0, 0.0];

#[test]
fn the_report_covers_every_field_on_the_wire_and_nothing_hidden_is_there() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("pseudonym.key");
    std::fs::write(&key, KEY).unwrap();
    let site = Broker::start();
    let cloud = Broker::start();
    let all = Subscriber::start(cloud.port, "#");
    let config = format!(
        r#"{}group_by = "attr:patient"

[privacy]
allow_attrs = ["patient", "ward"]
pseudonymize_sensor = true
pseudonymize_attrs = ["patient"]
key = {{ file = "{}" }}

[privacy.differential_privacy]
epsilon = 1.0
budget = 1000.0
groups = ["MRN-1", "MRN-2", "MRN-3"]
release_delay_ms = 10000
{}"#,
        site_config("gw-report", site.port),
        key.display(),
        cloud_uplink(cloud.port)
    );
    let path = tmp.path().join("outpost.toml");
    std::fs::write(&path, &config).unwrap();
    let report: Value = serde_json::from_slice(&run_ok(
        Command::new(outpost_bin())
            .args(["privacy", "report", "--json", "--config"])
            .arg(&path),
    ))
    .expect("the report is JSON");
    // The plain-language report says the same.
    let text = String::from_utf8(run_ok(
        Command::new(outpost_bin())
            .args(["privacy", "report", "--config"])
            .arg(&path),
    ))
    .unwrap();
    for needle in [
        "noised",
        "withheld",
        "not sent",
        "Still observable",
        "epsilon 1",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }

    let mut gw = Outpost::run(&config);
    gw.wait_subscribed();
    // Two patients with readings (MRN-3 declared, never active), six 10 s
    // windows of event time; a sensor id and a ward that must not leave.
    let t = now_ms() - 600_000;
    let base = t - t.rem_euclid(10_000);
    let mut p = Publisher::connect(site.port);
    for k in 0..600i64 {
        for (sensor, patient) in [("ankle-jane-17", "MRN-1"), ("wrist-john-42", "MRN-2")] {
            let payload = serde_json::json!({
                "sensor": sensor, "ts": base + k * 100, "values": VALUES,
                "attrs": {"patient": patient, "ward": "ward-secret-9"},
            });
            p.publish(&format!("sensors/{sensor}/data"), payload.to_string());
        }
    }
    // A patient not declared: refused at ingest, counted.
    for k in 0..50i64 {
        let payload = serde_json::json!({
            "sensor": "chest-eve-3", "ts": base + k * 100, "values": VALUES,
            "attrs": {"patient": "MRN-9"},
        });
        p.publish("sensors/chest-eve-3/data", payload.to_string());
    }
    p.flush();
    gw.wait_metric(
        "outpost_rejected_total",
        &["source=\"privacy\"", "reason=\"undeclared_group\""],
        50.0,
        Duration::from_secs(30),
    );
    // Released windows reach the cloud, and health messages after them.
    let released = wait_for(Duration::from_secs(30), || {
        all.messages()
            .iter()
            .filter(|m| m.topic.contains("/agg/"))
            .count()
            >= 6
    });
    assert!(
        released,
        "no aggregates at the cloud\n{}\n{}",
        gw.http("/metrics"),
        gw.log()
    );
    let seen = all.messages().len();
    wait_until("a health message", Duration::from_secs(10), || {
        all.messages()[seen..]
            .iter()
            .any(|m| m.topic.ends_with("/health"))
    });
    // MRN-3 had no reading: its aggregates are the empty ones.
    assert!(gw.metric("outpost_privacy_empty_total", &[]) >= 1.0);
    // An unclean end: the broker publishes the last will.
    gw.kill9();
    wait_until("the last will", Duration::from_secs(30), || {
        all.json().iter().any(|v| v["state"] == "offline")
    });

    let fields: BTreeMap<(String, String), (String, Value)> = report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| {
            let kind = m["message"].as_str().unwrap().to_string();
            m["fields"].as_array().unwrap().iter().map(move |f| {
                (
                    (kind.clone(), f["path"].as_str().unwrap().to_string()),
                    (f["exposure"].as_str().unwrap().to_string(), f.clone()),
                )
            })
        })
        .collect();
    let released: BTreeSet<String> = report["groups"]["declared"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| {
            v.as_str()
                .expect("the key is readable: tokens listed")
                .to_string()
        })
        .collect();
    let topics: BTreeSet<String> = report["groups"]["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(released.len(), 3);
    assert!(released.iter().all(|g| g.starts_with("p_")), "{released:?}");

    let mut kinds = BTreeSet::new();
    let mut groups_seen = BTreeSet::new();
    for m in all.messages() {
        let text = String::from_utf8_lossy(&m.payload).to_string() + " " + &m.topic;
        // Hidden: sensor ids, attributes, raw values.
        for secret in [
            "ankle-jane",
            "wrist-john",
            "chest-eve",
            "ward-secret",
            "MRN-",
            "0.731942",
            "0.268113",
        ] {
            assert!(!text.contains(secret), "{secret:?} on the wire: {text}");
        }
        let v: Value = serde_json::from_slice(&m.payload).expect("JSON");
        let kind = if m.topic.contains("/agg/") {
            assert!(
                topics.contains(&m.topic),
                "topic {} not in the report",
                m.topic
            );
            groups_seen.insert(v["group"].as_str().unwrap().to_string());
            "aggregate"
        } else if v["state"] == "offline" {
            "last_will"
        } else {
            "health"
        };
        kinds.insert(kind);
        for path in paths(&v) {
            let Some((exposure, f)) = fields.get(&(kind.to_string(), path.clone())) else {
                panic!("{kind} field {path} is on the wire but not in the report: {v}");
            };
            assert_ne!(
                exposure, "not_sent",
                "{kind} {path}: the report says it is not sent: {f}"
            );
            if exposure == "withheld" {
                let x = path.split('.').fold(&v, |x, k| &x[k]);
                assert!(
                    x.is_null() || x.as_f64() == Some(0.0),
                    "{kind} {path} is withheld but reads {x}"
                );
            }
            if exposure == "token" {
                let x = path.split('.').fold(&v, |x, k| &x[k]);
                assert!(x.as_str().unwrap().starts_with("p_"), "{kind} {path}: {x}");
            }
        }
    }
    assert_eq!(
        kinds,
        ["aggregate", "health", "last_will"].into(),
        "every message kind seen"
    );
    // Every declared group, the inactive one included, and no other.
    assert_eq!(groups_seen, released);
}

/// The exposure of `path` in `message` of `report`.
fn exposure<'a>(report: &'a Value, message: &str, path: &str) -> &'a str {
    report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["message"] == message)
        .and_then(|m| {
            m["fields"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["path"] == path)
        })
        .and_then(|f| f["exposure"].as_str())
        .unwrap_or_else(|| panic!("{message} {path} not in the report"))
}

#[test]
fn the_report_follows_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("outpost.toml");
    let report = |privacy: &str| -> Value {
        std::fs::write(
            &path,
            format!(
                "[[sources]]\ntype = \"simulated\"\n[aggregation]\ngroup_by = \"gateway\"\n{privacy}{}",
                cloud_uplink(1883)
            ),
        )
        .unwrap();
        serde_json::from_slice(&run_ok(
            Command::new(outpost_bin())
                .args(["privacy", "report", "--json", "--config"])
                .arg(&path),
        ))
        .unwrap()
    };
    // No suppression: exact counts everywhere, health totals exact.
    let open = report("");
    assert_eq!(exposure(&open, "aggregate", "readings"), "exact");
    assert_eq!(exposure(&open, "aggregate", "score.mean"), "exact");
    assert_eq!(exposure(&open, "health", "readings"), "exact");
    assert_eq!(exposure(&open, "health", "counts_withheld"), "not_sent");
    assert!(open["differential_privacy"].is_null() && open["k_anonymity"].is_null());
    // k-anonymity alone: exact counts, health totals withheld, and the
    // decision on exact counts stated as observable.
    let k = report("[privacy.k_anonymity]\nmin_subjects = 2\n");
    assert_eq!(exposure(&k, "aggregate", "readings"), "exact");
    assert_eq!(exposure(&k, "health", "readings"), "withheld");
    assert_eq!(k["k_anonymity"]["on_noised_counts"], false);
    assert!(
        k["observable"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["what"] == "k-anonymity decisions"),
        "{k}"
    );
    // Differential privacy: noised counts, removed statistics, the budget.
    let dp =
        report("[privacy.differential_privacy]\nepsilon = 0.5\nbudget = 12.0\ngroups = [\"gw\"]\n");
    assert_eq!(exposure(&dp, "aggregate", "readings"), "noised");
    assert_eq!(exposure(&dp, "aggregate", "score.mean"), "not_sent");
    assert_eq!(exposure(&dp, "health", "readings"), "withheld");
    let f = &dp["differential_privacy"];
    assert_eq!(f["epsilon_per_statistic"], 0.1);
    assert_eq!(f["count_noise_scale"], 10.0);
    assert_eq!(f["releases_per_period"], 24);
    assert_eq!(f["windows_per_period"], 1440);
    assert_eq!(f["epsilon_per_period"], 12.0);
    // A configuration that does not load: exit 1, the reason said.
    let out = Command::new(outpost_bin())
        .args(["privacy", "report", "--config"])
        .arg(tmp.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}
