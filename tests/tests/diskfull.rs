//! A full disk: the gateway's state directory on a small real file system
//! (a 2 MiB tmpfs mounted by the test; CI runs as root). A long cloud
//! outage fills it to the journal's low-water mark (the sources wait,
//! counted), then another program takes every byte left (writes fail,
//! counted). The gateway keeps running with flat memory, and once the space
//! and the cloud come back it recovers by itself: every reading sent is
//! delivered, counted once.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

/// Readings counted by the unique aggregates (by id), per sensor.
fn counted(sub: &Subscriber) -> BTreeMap<String, u64> {
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    for a in sub.json() {
        if let Some(id) = a["id"].as_str() {
            by_id.insert(id.to_string(), a);
        }
    }
    let mut out = BTreeMap::new();
    for a in by_id.values() {
        *out.entry(a["group"].as_str().unwrap_or("").to_string())
            .or_insert(0) +=
            a["readings"].as_u64().unwrap_or(0) + a["late_readings"].as_u64().unwrap_or(0);
    }
    out
}

#[test]
fn a_full_disk_is_counted_survived_and_recovered_from() {
    let fs = SmallFs::mount("2m");
    let site = Broker::start();
    let cloud_port = free_port();
    let state = fs.path.join("state");
    // One aggregate per 10 readings (100 ms windows): the outbox fills fast
    // while the cloud is away.
    let cfg = site_config("gw-full", site.port).replace("window_ms = 10000", "window_ms = 100")
        + &format!(
            r#"
[outbox]
max_bytes = 67108864
fsync_interval_ms = 20

[journal]
max_batch = 64
min_free_bytes = 393216

[uplink]
broker = {{ host = "127.0.0.1", port = {cloud_port} }}
allow_plaintext = true
topic = "outpost/{{gateway}}/agg/{{group}}"
backoff_initial_ms = 50
backoff_max_ms = 300
"#
        );
    let mut o = Outpost::spawn_with_state(&cfg, &state);
    o.wait_subscribed();
    let mut p = Publisher::connect(site.port);
    let t = now_ms() - 3_600_000;
    let base = t - t.rem_euclid(1000);
    let mut k = 0i64;
    let mut publish = |p: &mut Publisher, n: i64, sensor: &str| {
        for _ in 0..n {
            p.publish(
                &format!("sensors/{sensor}/data"),
                reading(sensor, base + k * 10, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
            );
            k += 1;
        }
        p.flush();
    };
    let mut sent = 0u64;
    // Until the disk is nearly full (under journal.min_free_bytes): the
    // sources wait, and it is counted.
    let low = |o: &Outpost| o.metric("outpost_journal_low_space_waits_total", &[]);
    let mut rounds = 0;
    while low(&o) == 0.0 {
        rounds += 1;
        assert!(
            rounds < 200,
            "the 2 MiB file system never filled: {} KiB used\n{}",
            used_kib(&fs.path),
            o.log()
        );
        publish(&mut p, 500, "full");
        sent += 500;
    }
    let rss_full = o.rss_kib();
    // Another program takes the rest: the disk is full to the last byte.
    // The gateway goes on: more readings come (the site broker holds
    // them), its endpoints answer, failed writes are counted, memory stays
    // flat.
    let filler = fs.fill("filler");
    assert_eq!(
        outpost_storage::fsutil::fs_free(&fs.path),
        Some(0),
        "the filler took every byte"
    );
    for _ in 0..10 {
        publish(&mut p, 500, "full");
        sent += 500;
    }
    assert!(
        wait_for(Duration::from_secs(30), || {
            o.metric("outpost_journal_commit_failures_total", &[])
                + o.metric("outpost_outbox_store_retries_total", &[])
                + o.metric("outpost_audit_errors_total", &[])
                > 0.0
        }) || low(&o) > 1.0,
        "the full disk was noticed\n{}",
        o.http("/metrics")
    );
    eprintln!(
        "full: {} KiB used, {} rounds; journal commit failures {}, low-space waits {}, outbox store retries {}, audit errors {}",
        used_kib(&fs.path),
        rounds,
        o.metric("outpost_journal_commit_failures_total", &[]),
        low(&o),
        o.metric("outpost_outbox_store_retries_total", &[]),
        o.metric("outpost_audit_errors_total", &[]),
    );
    assert!(
        o.http("/healthz").starts_with("HTTP/1.1 200"),
        "{}",
        o.log()
    );
    let rss_later = o.rss_kib();
    assert!(
        rss_later < rss_full + 8 * 1024,
        "memory grew from {rss_full} KiB to {rss_later} KiB on a full disk"
    );
    assert!(!o.log().contains("panicked"), "{}", o.log());

    // Space returns and the cloud comes back: the gateway recovers by
    // itself, and every reading sent is counted once.
    std::fs::remove_file(&filler).unwrap();
    let cloud = Broker::start_on(cloud_port, "");
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let drained = wait_for(Duration::from_secs(180), || {
        counted(&sub).get("full").copied().unwrap_or(0) >= sent
    });
    assert!(
        drained,
        "{:?} of {sent} readings delivered; {} KiB used\n{}\n{}\n{}",
        counted(&sub).get("full"),
        used_kib(&fs.path),
        du(&state),
        o.http("/metrics"),
        o.log()
    );
    publish(&mut p, 400, "after");
    let delivered = wait_for(Duration::from_secs(60), || {
        counted(&sub).get("after").copied().unwrap_or(0) >= 400
    });
    assert!(
        delivered,
        "{:?} of 400 after the disk had room again; {} KiB used\n{}\n{}\n{}",
        counted(&sub).get("after"),
        used_kib(&fs.path),
        du(&state),
        o.http("/metrics"),
        o.log()
    );
    o.signal(libc::SIGTERM);
    assert!(o.wait(Duration::from_secs(60)).success(), "{}", o.log());
    assert_eq!(counted(&sub).get("full").copied(), Some(sent), "once each");
    assert_eq!(counted(&sub).get("after").copied(), Some(400), "once each");
}
