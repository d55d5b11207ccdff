//! The ARM release builds (cross/build.sh) under qemu-user: `outpost
//! replay` of the recorded fixture gives the aggregates of the x86-64 build
//! byte for byte (every field, scores and ids included: the flex backend
//! computes the same bits on every target), and the ARM binary
//! carries readings from a site Mosquitto to a cloud Mosquitto on the host.
//!
//! Ignored by a plain `cargo test` (they need the ARM binaries):
//! scripts/test.sh runs cross/build.sh, then these with `--ignored`.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const TARGETS: [&str; 2] = ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"];

/// Static musl builds (`cross/build.sh --musl` after `cross/setup-musl.sh`):
/// tested the same way when they have been built, skipped otherwise (the
/// test run does not build them; docs/arm-and-packaging.md).
const MUSL_TARGETS: [&str; 1] = ["aarch64-unknown-linux-musl"];

/// The glibc targets, and the musl ones that were built.
fn targets() -> Vec<&'static str> {
    let mut t = TARGETS.to_vec();
    for m in MUSL_TARGETS {
        if OutpostBin::cross_exists(m) {
            t.push(m);
        } else {
            eprintln!("{m}: not built (cross/build.sh --musl); skipped");
        }
    }
    t
}

fn replay(bin: &OutpostBin, input: &std::path::Path) -> Vec<Value> {
    let out = run_ok(bin.command().args(["replay", "--input"]).arg(input));
    String::from_utf8(out)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON aggregate per line"))
        .collect()
}

/// Where `a` and `b` first differ (a field path), if they do.
fn difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let kx: Vec<_> = x.keys().collect();
            let ky: Vec<_> = y.keys().collect();
            if kx != ky {
                return Some(format!("{path}: fields {kx:?} vs {ky:?}"));
            }
            x.iter()
                .find_map(|(k, v)| difference(v, &y[k], &format!("{path}.{k}")))
        }
        _ if a == b => None,
        _ => Some(format!("{path}: {a} vs {b}")),
    }
}

#[test]
#[ignore = "needs cross/build.sh; scripts/test.sh runs it"]
fn arm_replay_matches_x86_64() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("recording.jsonl");
    write_recording(&input);
    let host = replay(&OutpostBin::host(), &input);
    assert!(host.len() >= 3, "{} aggregates", host.len());
    assert!(host.iter().any(|a| a["classes"].is_object()));
    for target in targets() {
        let arm = replay(&OutpostBin::cross(target), &input);
        assert_eq!(arm.len(), host.len(), "{target}: aggregate count");
        for (i, (a, h)) in arm.iter().zip(&host).enumerate() {
            if let Some(e) = difference(a, h, "") {
                panic!("{target}, aggregate {i}: {e}\narm:  {a}\nhost: {h}");
            }
        }
        eprintln!(
            "{target}: {} aggregates identical to x86-64, scores and ids included",
            arm.len()
        );
    }
}

#[test]
#[ignore = "needs cross/build.sh; scripts/test.sh runs it"]
fn arm_binary_carries_readings_from_site_to_cloud() {
    let series =
        load_ts_series(&workspace().join(".cache/datasets/BasicMotions/BasicMotions_TEST.ts"));
    let t0 = now_ms() - 10 * 60_000;
    let base = t0 - t0.rem_euclid(10_000);
    for target in targets() {
        let site = Broker::start();
        let cloud = Broker::start();
        let cloud_sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
        let config = format!(
            "{}\n[uplink]\nbroker = {{ host = \"127.0.0.1\", port = {} }}\nallow_plaintext = true\ntopic = \"outpost/{{gateway}}/agg/{{group}}\"\n",
            site_config("gw-arm", site.port),
            cloud.port
        );
        let mut outpost = Outpost::run_bin(&OutpostBin::cross(target), &config);
        wait_until(
            "the site source to subscribe",
            Duration::from_secs(60),
            || outpost.log().contains("subscribed to site topics"),
        );
        let mut publisher = Publisher::connect(site.port);
        let mut sent = 0u64;
        for (i, (_, chans)) in series.iter().take(4).enumerate() {
            let sensor = format!("arm-{}", i % 2);
            for t in 0..chans[0].len() {
                let values: Vec<f32> = chans.iter().map(|c| c[t]).collect();
                let ts = base + (i as i64 / 2) * 10_000 + t as i64 * 100;
                publisher.publish(
                    &format!("sensors/{sensor}/data"),
                    reading(&sensor, ts, &values),
                );
                sent += 1;
            }
        }
        publisher.flush();
        outpost.wait_metric(
            "outpost_readings_total",
            &[],
            sent as f64,
            Duration::from_secs(120),
        );
        outpost.signal(libc::SIGTERM);
        let status = outpost.wait(Duration::from_secs(120));
        assert!(status.success(), "{target}: {status:?}\n{}", outpost.log());
        let produced = outpost.produced_aggregates() as usize;
        assert!(produced > 0, "{target}: {}", outpost.log());
        wait_until(
            "aggregates at the cloud broker",
            Duration::from_secs(30),
            || cloud_sub.messages().len() >= produced,
        );
        let aggs = cloud_sub.json();
        let mut by_id: BTreeMap<String, &Value> = BTreeMap::new();
        for a in &aggs {
            by_id.insert(a["id"].as_str().unwrap_or_default().to_string(), a);
        }
        let readings: u64 = by_id
            .values()
            .map(|a| a["readings"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(
            readings, sent,
            "{target}: every reading counted in an aggregate at the cloud"
        );
        assert!(
            by_id.values().all(|a| a["gateway"] == "gw-arm"),
            "{target}: {aggs:?}"
        );
        eprintln!(
            "{target}: {sent} readings -> {} aggregates at the cloud broker",
            by_id.len()
        );
    }
}

/// The size budgets of what ships (issue 22): the stripped ARM release
/// binaries. (CI builds no x86-64 release binary; its size is in
/// BENCHMARKS.md.)
#[test]
#[ignore = "needs cross/build.sh"]
fn the_shipped_binaries_are_within_their_size_budget() {
    for (target, budget) in [
        ("aarch64-unknown-linux-gnu", 12_000_000u64),
        ("armv7-unknown-linux-gnueabihf", 11_500_000),
    ] {
        let path = OutpostBin::cross_path(target);
        let size = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run cross/build.sh)", path.display()))
            .len();
        eprintln!("{target}: {size} bytes (budget {budget})");
        assert!(
            size <= budget,
            "{target}: the binary is {size} bytes; the budget is {budget}"
        );
    }
}
