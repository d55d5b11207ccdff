//! Issue 18 (7), "Field faults": one reading with a clock ahead closed its
//! group's windows early, and every reading of the other sensors after it
//! was late; a gateway whose own wall clock jumps, or that boots at 1970
//! without NTP, refused good readings as "in the future" and closed windows
//! on a wall clock that had jumped. The real `outpost` binary, real
//! Mosquitto brokers, and Debian's `faketime` (libfaketime, changed while
//! the gateway runs through `FAKETIME_TIMESTAMP_FILE`) for the gateway's
//! clock. The monotonic clock is left alone, as a real wall-clock step does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_tests::*;

/// The aggregates a subscriber received, each once (by id), batches unpacked.
fn aggregates(sub: &Subscriber) -> Vec<serde_json::Value> {
    let mut ids = BTreeSet::new();
    let mut out = Vec::new();
    for v in sub.json() {
        let items = match v {
            serde_json::Value::Array(a) => a,
            v => vec![v],
        };
        for a in items {
            if let Some(id) = a["id"].as_str()
                && ids.insert(id.to_string())
            {
                out.push(a);
            }
        }
    }
    out
}

/// Readings counted in the aggregates: (in their window, late).
fn counted(aggs: &[serde_json::Value]) -> (u64, u64) {
    aggs.iter().fold((0, 0), |(r, l), a| {
        (
            r + a["readings"].as_u64().unwrap_or(0),
            l + a["late_readings"].as_u64().unwrap_or(0),
        )
    })
}

/// A gateway reading `sensors/<id>/data` on `site`, delivering to `cloud`:
/// 1 s windows for the whole gateway, windows every 10 readings, idle
/// sensors forgotten after 1 s (windowing) and 3 s (aggregation).
fn config(gateway: &str, site: u16, cloud: u16) -> String {
    let base = site_config(gateway, site).replace(
        "window_ms = 10000\nallowed_lateness_ms = 0\n",
        "window_ms = 1000\nallowed_lateness_ms = 2000\nidle_close_ms = 3000\ngroup_by = \"gateway\"\n",
    );
    assert!(base.contains("group_by"), "site_config changed:\n{base}");
    format!(
        r#"{base}
[windowing]
hop = 10
idle_evict_ms = 1000

[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
"#
    )
}

/// Publish one reading per sensor every 10 ms for `ticks` ticks, each
/// stamped with the test's (true) clock plus the sensor's offset; returns
/// how many were published.
fn feed(p: &mut Publisher, sensors: &[(&str, i64)], ticks: usize) -> u64 {
    let mut n = 0;
    for k in 0..ticks {
        let now = now_ms();
        for (s, offset) in sensors {
            let v = (k % 7) as f32 * 0.1;
            p.publish(
                &format!("sensors/{s}/data"),
                reading(s, now + offset, &[v, 0.2, 0.3, 0.0, 0.1, 0.0]),
            );
            n += 1;
        }
        // Pacing the feed (a sensor's rate), not waiting for a result.
        std::thread::sleep(Duration::from_millis(10));
    }
    p.flush();
    n
}

/// Wait until the aggregates count `sent` readings; the aggregates then.
fn wait_counted(o: &Outpost, sub: &Subscriber, sent: u64) -> Vec<serde_json::Value> {
    let done = wait_for(Duration::from_secs(60), || {
        let (r, l) = counted(&aggregates(sub));
        r + l >= sent
    });
    let aggs = aggregates(sub);
    assert!(
        done,
        "counted {:?} of {sent} readings\n{}",
        counted(&aggs),
        o.log()
    );
    aggs
}

/// No window of a group is delivered twice (no flood of partial windows).
fn assert_one_aggregate_per_window(aggs: &[serde_json::Value]) {
    let mut windows = BTreeSet::new();
    for a in aggs {
        let key = (a["group"].to_string(), a["window_start"].as_i64());
        assert!(windows.insert(key.clone()), "{key:?} delivered twice");
    }
}

#[test]
fn a_sensor_ahead_makes_no_reading_of_the_others_late() {
    let site = Broker::start();
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let o = Outpost::run(&config("gw-skew", site.port, cloud.port));
    o.wait_subscribed();
    let mut p = Publisher::connect(site.port);
    // Three sensors on time, one four minutes ahead: within
    // ingest.max_future_ms (5 min), so it is taken, in the same group.
    let sent = feed(
        &mut p,
        &[
            ("good-0", 0),
            ("good-1", 0),
            ("good-2", 0),
            ("ahead", 240_000),
        ],
        300,
    );
    let aggs = wait_counted(&o, &sub, sent);
    let (readings, late) = counted(&aggs);
    assert_eq!(
        (readings, late),
        (sent, 0),
        "every reading in its window, none late"
    );
    assert_eq!(o.metric("outpost_late_readings_total", &[]), 0.0);
    assert_eq!(o.metric("outpost_rejected_total", &[]), 0.0);
    assert_one_aggregate_per_window(&aggs);
    // The sensor ahead has its own windows, four minutes on.
    let ahead = aggs
        .iter()
        .filter_map(|a| a["window_start"].as_i64())
        .max()
        .unwrap_or(0);
    assert!(ahead > now_ms() + 200_000, "{ahead}");
}

/// libfaketime, as Debian's `faketime` package installs it.
fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("libfaketime not found in {candidates:?}: install faketime (scripts/setup.sh)")
        })
}

/// A gateway whose wall clock reads `clock` (a libfaketime setting such as
/// `+0`, `-1h` or `@1970-01-01 00:00:00`) from the file `rc`, read again
/// on every clock call so it can be changed while it runs. The monotonic
/// clock is not faked.
fn run_faked(cfg: &str, rc: &Path, clock: &str) -> Outpost {
    std::fs::write(rc, format!("{clock}\n")).unwrap();
    let lib = libfaketime();
    Outpost::run_with_env(
        cfg,
        &[
            ("LD_PRELOAD", lib.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", rc.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
}

#[test]
fn a_wall_clock_jumping_an_hour_either_way_loses_and_repeats_nothing() {
    let site = Broker::start();
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("faketime.rc");
    let o = run_faked(&config("gw-jump", site.port, cloud.port), &rc, "+0");
    o.wait_subscribed();
    let mut p = Publisher::connect(site.port);
    let sensors = [("s-0", 0), ("s-1", 0)];
    let mut sent = feed(&mut p, &sensors, 150);
    for clock in ["+1h", "-1h", "+0"] {
        // The gateway's wall clock steps; the sensors' clocks are right.
        std::fs::write(&rc, format!("{clock}\n")).unwrap();
        let before = aggregates(&sub).len();
        sent += feed(&mut p, &sensors, 150);
        // Still delivering after the step (no stall).
        wait_until(
            &format!("aggregates after the step to {clock}"),
            Duration::from_secs(20),
            || aggregates(&sub).len() > before,
        );
    }
    let aggs = wait_counted(&o, &sub, sent);
    assert_eq!(
        counted(&aggs),
        (sent, 0),
        "each reading once, in its window\n{}",
        o.log()
    );
    assert_eq!(o.metric("outpost_rejected_total", &[]), 0.0, "{}", o.log());
    assert_one_aggregate_per_window(&aggs);
}

#[test]
fn a_gateway_booted_at_1970_delivers_and_refuses_only_a_skewed_sensor() {
    let site = Broker::start();
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("faketime.rc");
    let o = run_faked(
        &config("gw-1970", site.port, cloud.port),
        &rc,
        "@1970-01-01 00:00:00",
    );
    o.wait_subscribed();
    let mut p = Publisher::connect(site.port);
    let good = [("s-0", 0), ("s-1", 0)];
    let mut sent = feed(&mut p, &good, 150);
    // Both good sensors have reached aggregation before the skewed one
    // starts (otherwise it would be the first the group knows).
    let inferred = wait_for(Duration::from_secs(20), || {
        o.metric("outpost_inferences_total", &[]) >= 10.0
    });
    assert!(
        inferred,
        "windows of both sensors\n{}\n{}",
        o.http("/metrics"),
        o.log()
    );
    // An hour ahead of the others: the gateway cannot judge the future
    // (its clock is not set), the others can.
    let skewed = feed(
        &mut p,
        &[("s-0", 0), ("s-1", 0), ("skewed", 3_600_000)],
        150,
    );
    sent += skewed * 2 / 3;
    let refused = skewed / 3;
    let aggs = wait_counted(&o, &sub, sent);
    assert_eq!(counted(&aggs), (sent, 0), "{}", o.log());
    wait_until(
        "the skewed readings counted",
        Duration::from_secs(20),
        || o.metric("outpost_rejected_total", &["reason=\"clock_skew\""]) == refused as f64,
    );
    assert_eq!(o.metric("outpost_rejected_total", &[]), refused as f64);
    assert_one_aggregate_per_window(&aggs);
}
