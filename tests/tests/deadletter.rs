//! Issue 18 (5), "Field faults": a message the broker refuses blocked the
//! backlog for ever (the same publish after every reconnect, the backoff
//! reset at every CONNACK). Real Mosquitto with `message_size_limit` and
//! `max_packet_size` (it drops the connection of a client that sends a
//! larger packet, as AWS IoT Core does), the real `outpost` binary and its
//! `deadletter` commands: the oversized aggregate is set aside after its
//! attempts, everything behind it is delivered, `outpost deadletter list`
//! shows it, and `outpost deadletter resend` sends it again.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost::aggregate::Aggregate;
use outpost::outbox::{DiskOutbox, DiskSettings, FullPolicy, Outbox};
use outpost_tests::*;

/// Aggregate `i` of group `line-1`; `classes` class counts make it large.
fn aggregate(i: i64, classes: usize) -> Aggregate {
    let classes: serde_json::Map<String, serde_json::Value> = (0..classes)
        .map(|c| (format!("class-{c:05}"), serde_json::json!(1)))
        .collect();
    let mut v = serde_json::json!({
        "schema": 2,
        "id": "",
        "gateway": "gw-dl",
        "group": "line-1",
        "window_start": 1_700_000_000_000i64 + i * 10_000,
        "window_end": 1_700_000_010_000i64 + i * 10_000,
        "partial": false,
        "readings": 10,
        "late_readings": 0,
        "inferences": 1,
        "sensors": 1,
        "model": { "name": "m", "version": "1.0.0" },
        "policy": { "version": "" },
    });
    if !classes.is_empty() {
        v["classes"] = serde_json::Value::Object(classes);
    }
    let mut a: Aggregate = serde_json::from_value(v).expect("an aggregate");
    a.id = a.compute_id();
    a
}

/// Put 10 small aggregates, one of about 45 KB, then 10 small ones in the
/// disk outbox under `state`. Returns the small ones' ids and the large one's.
fn fill_outbox(state: &Path) -> (BTreeSet<String>, String) {
    let mut o = DiskOutbox::open(DiskSettings {
        dir: state.join("outbox"),
        segment_bytes: 8 << 20,
        max_bytes: 1 << 30,
        policy: FullPolicy::DropOldest,
        protect_oldest: 0,
        stream_caps: Default::default(),
    })
    .expect("open the outbox");
    let mut small = BTreeSet::new();
    let mut big = String::new();
    for i in 0..21 {
        let a = aggregate(i, if i == 10 { 3000 } else { 0 });
        if i == 10 {
            big = a.id.clone();
            assert!(serde_json::to_vec(&a).unwrap().len() > 40_000);
        } else {
            small.insert(a.id.clone());
        }
        Outbox::append(&mut o, &a).expect("append");
    }
    Outbox::commit(&mut o).expect("commit");
    (small, big)
}

fn config(site: u16, cloud: u16) -> String {
    format!(
        r#"{}
[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
health_interval_s = 0
backoff_initial_ms = 50
backoff_max_ms = 400
max_attempts = 3
"#,
        site_config("gw-dl", site)
    )
}

/// `outpost deadletter ARGS --config CONFIG` with the gateway's state
/// directory; its stdout (it must succeed).
fn deadletter(state: &Path, config: &Path, args: &[&str]) -> String {
    let out = run_ok(
        Command::new(outpost_bin())
            .arg("deadletter")
            .args(args)
            .arg("--config")
            .arg(config)
            .env("STATE_DIRECTORY", state),
    );
    String::from_utf8(out).expect("utf-8")
}

#[test]
fn a_message_the_broker_refuses_is_set_aside_and_the_rest_is_delivered() {
    let state_dir = tempfile::tempdir().expect("temp dir");
    let state = state_dir.path().join("state");
    let (small, big) = fill_outbox(&state);
    let site = Broker::start();
    // A packet over 8 KiB: Mosquitto drops the connection.
    let cloud = Broker::start_with("message_size_limit 8192\nmax_packet_size 8192\n");
    let sub = Subscriber::start(cloud.port, "outpost/#");
    let o = Outpost::run_with_state(&config(site.port, cloud.port), &state);

    wait_until(
        "every aggregate behind the refused one delivered",
        Duration::from_secs(60),
        || sub.ids().is_superset(&small),
    );
    o.wait_metric(
        "outpost_uplink_deadlettered_total",
        &[],
        1.0,
        Duration::from_secs(30),
    );
    assert!(!sub.ids().contains(&big), "the broker refused it");
    assert!(o.metric("outpost_uplink_failed_messages_total", &[]) >= 3.0);
    assert_eq!(o.metric("outpost_deadletter_records", &[]), 1.0);
    wait_until("the outbox empty", Duration::from_secs(10), || {
        o.metric("outpost_outbox_depth", &[]) == 0.0
    });

    // Listed, with its attempts; the file is private.
    let table = deadletter(&state, &o.config_path, &["list"]);
    assert!(table.contains(&big), "{table}");
    let entries: serde_json::Value =
        serde_json::from_str(&deadletter(&state, &o.config_path, &["list", "--json"]))
            .expect("JSON");
    let entries = entries.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["record_id"], big.as_str());
    assert_eq!(entries[0]["attempts"], 3);
    let file = std::fs::read_dir(state.join("deadletter"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".dl"))
        .expect("an entry file");
    assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    // Audited.
    assert!(
        audited(&state, &big),
        "an audit entry for the aggregate set aside"
    );
    // Sent again while the gateway runs, to the same broker: refused
    // again, so set aside again after its attempts, under a new number.
    let asked = deadletter(&state, &o.config_path, &["resend", "1"]);
    assert!(asked.contains("entry 1: resend asked for"), "{asked}");
    o.wait_metric(
        "outpost_deadletter_resent_total",
        &[],
        1.0,
        Duration::from_secs(10),
    );
    o.wait_metric(
        "outpost_uplink_deadlettered_total",
        &[],
        2.0,
        Duration::from_secs(30),
    );
    wait_until(
        "entry 1 replaced by entry 2",
        Duration::from_secs(10),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&deadletter(&state, &o.config_path, &["list", "--json"]))
                    .expect("JSON");
            v.as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["id"] == 2)
        },
    );
    drop(o);

    // The broker's limit raised (another broker here): sent again on request.
    let cloud2 = Broker::start();
    let sub2 = Subscriber::start(cloud2.port, "outpost/#");
    let asked = deadletter(
        &state,
        &o_config(&state, site.port, cloud2.port),
        &["resend", "--all"],
    );
    assert!(asked.contains("1 entries"), "{asked}");
    let o = Outpost::run_with_state(&config(site.port, cloud2.port), &state);
    wait_until(
        "the aggregate set aside delivered",
        Duration::from_secs(30),
        || sub2.ids().contains(&big),
    );
    o.wait_metric(
        "outpost_deadletter_resent_total",
        &[],
        1.0,
        Duration::from_secs(10),
    );
    wait_until("the store empty", Duration::from_secs(10), || {
        deadletter(&state, &o.config_path, &["list", "--json"]).trim() == "[]"
    });
}

/// A configuration file for the CLI while no gateway runs.
fn o_config(state: &Path, site: u16, cloud: u16) -> std::path::PathBuf {
    let path = state.join("..").join("cli.toml");
    std::fs::write(&path, config(site, cloud)).expect("write config");
    path
}

/// Whether a file under `dir` (the audit log) has a `deadletter` entry for `id`.
fn audited(dir: &Path, id: &str) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            return p.file_name().is_some_and(|n| n != "deadletter") && audited(&p, id);
        }
        std::fs::read_to_string(&p).is_ok_and(|t| {
            t.lines()
                .any(|l| l.contains("\"deadletter\"") && l.contains(id))
        })
    })
}
