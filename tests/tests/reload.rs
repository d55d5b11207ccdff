//! Live reconfiguration (`outpost reload`, SIGHUP) with the real binary and
//! real Mosquitto: a reload under load loses and duplicates no reading; a
//! broken configuration is refused with its problems and the old one keeps
//! running; a configuration whose uplink certificate is missing rolls back
//! to the last one that ran.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

/// A gateway reading the site broker (persistent session, so the broker
/// keeps what arrives while the pipeline restarts) and delivering to the
/// cloud broker; `extra` is appended.
fn config(site: u16, cloud: u16, extra: &str) -> String {
    format!(
        r#"{}
[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
topic = "outpost/{{gateway}}/agg/{{group}}"
backoff_initial_ms = 50
backoff_max_ms = 500
{extra}
"#,
        site_config("gw-reload", site)
            .replace(
                "sensor_from = \"topic:1\"",
                "sensor_from = \"topic:1\"\npersistent_session = true"
            )
            .replace("window_ms = 10000", "window_ms = 1000")
    )
}

fn outpost_reload(o: &Outpost) -> (bool, String) {
    let out = Command::new(outpost_bin())
        .args(["reload", "--config"])
        .arg(&o.config_path)
        .output()
        .expect("run outpost reload");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn status(o: &Outpost) -> serde_json::Value {
    let r = o.http("/status");
    let body = r.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {r}"))
}

fn reloads(o: &Outpost, kind: &str) -> f64 {
    o.metric(
        "outpost_config_reloads_total",
        &[&format!("kind=\"{kind}\"")],
    )
}

/// Stop the gateway (SIGTERM, a drain) and wait until every aggregate it
/// produced has arrived: the aggregates by id, and the readings they count.
fn stop_and_collect(
    mut o: Outpost,
    sub: &Subscriber,
) -> (BTreeMap<String, serde_json::Value>, u64) {
    o.signal(libc::SIGTERM);
    assert!(o.wait(Duration::from_secs(60)).success(), "{}", o.log());
    let n = o.produced_aggregates();
    let by_id = || {
        sub.json()
            .into_iter()
            .map(|a| (a["id"].as_str().unwrap().to_string(), a))
            .collect::<BTreeMap<_, _>>()
    };
    wait_for(Duration::from_secs(30), || by_id().len() as u64 >= n);
    let by_id = by_id();
    assert_eq!(
        by_id.len() as u64,
        n,
        "every aggregate arrived\n{}",
        o.log()
    );
    let readings = by_id
        .values()
        .map(|a| a["readings"].as_u64().unwrap() + a["late_readings"].as_u64().unwrap())
        .sum();
    (by_id, readings)
}

#[test]
fn reload_under_load_loses_and_duplicates_no_reading() {
    let site = Broker::start();
    let cloud = Broker::start_persistent();
    let sub = Subscriber::start_persistent(cloud.port, "outpost/+/agg/#");
    let state = tempfile::tempdir().unwrap();
    let o = Outpost::run_with_state(&config(site.port, cloud.port, ""), state.path());
    wait_until("site subscription", Duration::from_secs(20), || {
        o.log().contains("subscribed to site topics")
    });
    let first = status(&o)["config"]["sha256"].as_str().unwrap().to_string();

    // Readings are published before, during and after two configuration
    // changes: one by SIGHUP, one by `outpost reload`, each published into
    // while the pipeline drains and restarts.
    let mut p = Publisher::connect(site.port);
    let base = now_ms() - 600_000;
    let base = base - base.rem_euclid(1000);
    let mut sent = 0u64;
    let mut t = 0i64;
    let mut publish = |p: &mut Publisher, n: i64, sent: &mut u64| {
        for _ in 0..n {
            for s in 0..3 {
                // Values differ reading by reading, so that no two partial
                // aggregates of a window can share an id.
                let v = (t * 3 + s) as f32 * 0.001;
                p.publish(
                    &format!("sensors/r{s}/data"),
                    reading(&format!("r{s}"), base + t * 20, &[v, 0.2, 0.3, 0.4, 0.5, v]),
                );
                *sent += 1;
            }
            t += 1;
        }
        p.flush();
    };
    publish(&mut p, 500, &mut sent);
    o.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(30),
    );

    o.write_config(&config(site.port, cloud.port, "health_interval_s = 2"));
    o.signal(libc::SIGHUP);
    publish(&mut p, 500, &mut sent);
    wait_until("the first reload applied", Duration::from_secs(60), || {
        reloads(&o, "applied") == 1.0
    });

    // The window queue's capacity cannot change live: the pipeline
    // restarts in process.
    o.write_config(&config(
        site.port,
        cloud.port,
        "health_interval_s = 3\n[windowing]\nchannel_capacity = 500",
    ));
    let reload = {
        let path = o.config_path.clone();
        std::thread::spawn(move || {
            let out = Command::new(outpost_bin())
                .args(["reload", "--config"])
                .arg(&path)
                .output()
                .expect("run outpost reload");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string(),
            )
        })
    };
    publish(&mut p, 500, &mut sent);
    let (ok, out) = reload.join().unwrap();
    assert!(ok && out.starts_with("applied "), "{out}\n{}", o.log());
    assert_eq!(reloads(&o, "applied"), 2.0);
    let sha = status(&o)["config"]["sha256"].as_str().unwrap().to_string();
    assert_ne!(sha, first);
    assert!(out.contains(&sha), "{out}");
    publish(&mut p, 100, &mut sent);

    o.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(60),
    );
    let (_, readings) = stop_and_collect(o, &sub);
    assert_eq!(
        readings, sent,
        "every reading counted once across two reloads"
    );
    // Both changes are on record: the first applied live, the second by a restart.
    let audit = std::fs::read_to_string(state.path().join("audit/audit.log")).unwrap();
    assert_eq!(audit.matches("\"config_applied\"").count(), 2, "{audit}");
    assert_eq!(audit.matches("\"how\":\"live\"").count(), 1, "{audit}");
    assert_eq!(audit.matches("\"how\":\"restart\"").count(), 1, "{audit}");
}

#[test]
fn a_live_change_keeps_windows_open_and_sessions_up_and_adds_a_source() {
    let site = Broker::start();
    let cloud = Broker::start_persistent();
    let sub = Subscriber::start_persistent(cloud.port, "outpost/+/agg/#");
    let state = tempfile::tempdir().unwrap();
    // One-minute windows that close only by event time or at the end: every
    // reading below falls in one window per sensor.
    let base_config = config(site.port, cloud.port, "")
        .replace("window_ms = 1000", "window_ms = 60000")
        .replace(
            "allowed_lateness_ms = 0",
            "allowed_lateness_ms = 0\nidle_close_ms = 600000",
        );
    let o = Outpost::run_with_state(&base_config, state.path());
    wait_until("site subscription", Duration::from_secs(20), || {
        o.log().contains("subscribed to site topics")
    });
    let mut p = Publisher::connect(site.port);
    let base = now_ms() - 600_000;
    let base = base - base.rem_euclid(60_000);
    let mut sent = 0u64;
    let publish = |p: &mut Publisher, prefix: &str, from: i64, n: i64, sent: &mut u64| {
        for t in from..from + n {
            for s in 0..3 {
                let v = (t * 3 + s) as f32 * 0.001;
                p.publish(
                    &format!("{prefix}/{prefix}-{s}/data"),
                    reading(
                        &format!("{prefix}-{s}"),
                        base + t * 20,
                        &[v, 0.2, 0.3, 0.4, 0.5, v],
                    ),
                );
                *sent += 1;
            }
        }
        p.flush();
    };
    publish(&mut p, "sensors", 0, 300, &mut sent);
    o.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(30),
    );

    // A second source, a new privacy policy version, new uplink and
    // aggregation settings: every part applies live.
    let changed = format!(
        "{}\n[privacy]\npolicy_version = \"2\"\n\n[[sources]]\ntype = \"mqtt\"\nname = \"line2\"\nbroker = {{ host = \"127.0.0.1\", port = {} }}\ntopics = [\"line2/+/data\"]\nsensor_from = \"topic:1\"\n",
        base_config
            .replace("idle_close_ms = 600000", "idle_close_ms = 500000")
            .replace("backoff_max_ms = 500", "backoff_max_ms = 400"),
        site.port
    );
    o.write_config(&changed);
    let (ok, out) = outpost_reload(&o);
    assert!(ok && out.starts_with("applied "), "{out}\n{}", o.log());
    wait_until("the new source subscribed", Duration::from_secs(20), || {
        o.log().contains("line2/+/data")
    });
    publish(&mut p, "sensors", 300, 300, &mut sent);
    publish(&mut p, "line2", 0, 300, &mut sent);
    o.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(30),
    );
    // The site source was not touched: one subscription in the whole run.
    let log = o.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("subscribed to site topics") && l.contains("sensors/+/data"))
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("draining the pipeline"), "{log}");

    let (by_id, readings) = stop_and_collect(o, &sub);
    // Windows stayed open across the change: one aggregate per sensor and
    // window, holding all of its readings.
    let mut windows = BTreeMap::new();
    for a in by_id.values() {
        let key = (
            a["group"].as_str().unwrap().to_string(),
            a["window_start"].as_i64().unwrap(),
        );
        *windows.entry(key).or_insert(0u64) += 1;
    }
    assert_eq!(windows.len(), 6, "{windows:?}");
    assert!(windows.values().all(|&c| c == 1), "{windows:?}");
    assert_eq!(readings, sent, "every reading counted once");
    // The windows released after the change carry the new policy version.
    assert!(
        by_id.values().all(|a| a["policy"]["version"] == "2"),
        "{by_id:?}"
    );
    let audit = std::fs::read_to_string(state.path().join("audit/audit.log")).unwrap();
    for part in [
        "\"how\":\"live\"",
        "uplink",
        "privacy",
        "aggregation",
        "source \\\"line2\\\" added",
    ] {
        assert!(audit.contains(part), "{part}: {audit}");
    }
}

#[test]
fn a_broken_config_is_refused_with_its_problems_and_the_old_one_keeps_running() {
    let site = Broker::start();
    let cloud = Broker::start();
    let state = tempfile::tempdir().unwrap();
    let good = config(site.port, cloud.port, "");
    let o = Outpost::run_with_state(&good, state.path());
    let sha = status(&o)["config"]["sha256"].as_str().unwrap().to_string();

    o.write_config(&format!(
        "{}\n[windowing]\nhop = 0\ncolour = \"blue\"\n",
        good.replace(
            "[aggregation]\nwindow_ms = 1000",
            "[aggregation]\nwindow_ms = -5"
        )
    ));
    // Checked by the command first: nothing is sent.
    let (ok, out) = outpost_reload(&o);
    assert!(!ok, "{out}");
    for problem in [
        "aggregation.window_ms",
        "windowing.hop",
        "windowing.colour",
        "nothing was sent",
    ] {
        assert!(out.contains(problem), "{problem}: {out}");
    }
    // By SIGHUP, the gateway checks it itself.
    o.signal(libc::SIGHUP);
    wait_until("the refusal", Duration::from_secs(20), || {
        reloads(&o, "refused") == 1.0
    });
    assert!(o.log().contains("configuration refused"), "{}", o.log());
    assert!(o.log().contains("windowing.hop"), "{}", o.log());
    assert_eq!(reloads(&o, "applied"), 0.0);
    assert_eq!(status(&o)["config"]["sha256"], sha.as_str());
    assert_eq!(status(&o)["state"], "running");
    let audit = std::fs::read_to_string(state.path().join("audit/audit.log")).unwrap();
    assert!(audit.contains("\"config_refused\""), "{audit}");

    // Still working: readings are taken and aggregated.
    publish_old_readings(site.port, 30);
    o.wait_metric("outpost_readings_total", &[], 30.0, Duration::from_secs(20));
}

#[test]
fn a_config_whose_uplink_certificate_is_missing_rolls_back_to_the_last_good_one() {
    let site = Broker::start();
    let cloud = Broker::start_persistent();
    let sub = Subscriber::start_persistent(cloud.port, "outpost/+/agg/#");
    let state = tempfile::tempdir().unwrap();
    let good = config(site.port, cloud.port, "");
    let o = Outpost::run_with_state(&good, state.path());
    let sha = status(&o)["config"]["sha256"].as_str().unwrap().to_string();

    let missing = state.path().join("no-such-ca.pem");
    let cloud_broker = format!("port = {} }}", cloud.port);
    assert!(good.contains(&cloud_broker));
    o.write_config(&good.replace(
        &cloud_broker,
        &format!(
            "port = {}, tls = {{ ca_file = \"{}\" }} }}",
            cloud.port,
            missing.display()
        ),
    ));
    let (ok, out) = outpost_reload(&o);
    assert!(!ok, "{out}");
    assert!(out.starts_with("rolled back:"), "{out}");
    assert!(out.contains("no-such-ca.pem"), "{out}");
    assert_eq!(reloads(&o, "rolled_back"), 1.0);
    assert_eq!(status(&o)["config"]["sha256"], sha.as_str());
    let audit = std::fs::read_to_string(state.path().join("audit/audit.log")).unwrap();
    assert!(audit.contains("\"config_rolled_back\""), "{audit}");

    // The last good configuration still delivers.
    publish_old_readings(site.port, 200);
    wait_until("aggregates delivered", Duration::from_secs(30), || {
        !sub.json().is_empty()
    });
}
