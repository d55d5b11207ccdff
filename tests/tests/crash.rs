//! Exactly once across crashes: readings published with QoS 1 to a site
//! broker, a gateway on a persistent session killed with SIGKILL at random
//! moments while the cloud broker goes down and up, and every reading
//! counted in exactly one delivered aggregate after dedupe by id. Without
//! the ingest journal, the aggregates after an unclean start say so (`gap`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const SENSORS: usize = 4;
const PER_SENSOR: i64 = 6_000;

fn config(site: u16, cloud: u16, extra: &str) -> String {
    // The site source's session is persistent by default.
    site_config("gw-crash", site).replace("window_ms = 10000", "window_ms = 1000")
        + &format!(
            r#"
[outbox]
fsync_interval_ms = 20

[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
topic = "outpost/{{gateway}}/agg/{{group}}"
max_inflight = 8
backoff_initial_ms = 50
backoff_max_ms = 300
{extra}
"#
        )
}

/// Readings counted by the unique aggregates (by id) the cloud received.
fn counted(sub: &Subscriber) -> (u64, usize, usize) {
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    let mut gaps = 0;
    for a in sub.json() {
        if let Some(id) = a["id"].as_str() {
            if a["gap"] == Value::Bool(true) {
                gaps += 1;
            }
            by_id.insert(id.to_string(), a);
        }
    }
    let n = by_id
        .values()
        .map(|a| a["readings"].as_u64().unwrap_or(0) + a["late_readings"].as_u64().unwrap_or(0))
        .sum();
    (n, by_id.len(), gaps)
}

/// Publish every reading with QoS 1 from a thread, paced, until done or `stop`.
fn publish_all(site: u16, published: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut p = Publisher::connect(site);
        let t = now_ms() - 3_600_000;
        let base = t - t.rem_euclid(1000);
        for k in 0..PER_SENSOR {
            for s in 0..SENSORS {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let sensor = format!("s{s}");
                p.publish(
                    &format!("sensors/{sensor}/data"),
                    reading(&sensor, base + k * 10, &[0.1, 0.2, 0.3, 0.0, 0.0, k as f32]),
                );
            }
            if k % 100 == 99 {
                p.flush();
                published.store(((k + 1) as u64) * SENSORS as u64, Ordering::SeqCst);
            }
        }
        p.flush();
        published.store(PER_SENSOR as u64 * SENSORS as u64, Ordering::SeqCst);
    });
}

/// Wait until the subscriber has everything the broker had for it: a
/// sentinel published after the gateway stopped arrives last.
fn sentinel(cloud: u16, sub: &Subscriber) {
    let mut p = Publisher::connect(cloud);
    p.publish("outpost/sentinel/agg/end", b"{}".to_vec());
    p.flush();
    wait_until("the sentinel", Duration::from_secs(20), || {
        sub.messages()
            .iter()
            .any(|m| m.topic == "outpost/sentinel/agg/end")
    });
}

fn kill_loop(state: &Path, cfg: &str, kills: usize, mut cloud: Option<&mut Broker>, seed: u64) {
    let mut rng = seed;
    for round in 0..kills {
        let mut o = Outpost::spawn_with_state(cfg, state);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Kill at a random point of this run's progress (sometimes before
        // it has taken anything).
        let at = (rng % 1_500) as f64;
        let reached = wait_for(Duration::from_secs(60), || {
            at == 0.0 || o.metric("outpost_readings_total", &[]) >= at
        });
        assert!(
            reached,
            "round {round}: the kill point ({at} readings) not reached: {}\n{}",
            o.http("/metrics"),
            o.log()
        );
        eprintln!(
            "round {round}: readings {} replayed {} dups {}",
            o.metric("outpost_readings_total", &[]),
            o.metric("outpost_journal_replayed_total", &[]),
            o.metric("outpost_journal_duplicates_total", &[])
        );
        o.kill9();
        assert!(!o.log().contains("panicked"), "round {round}: {}", o.log());
        // The cloud goes down for a few rounds, and comes back.
        if let Some(c) = cloud.as_deref_mut() {
            match round % 6 {
                2 => c.stop(),
                4 => c.restart(),
                _ => {}
            }
        }
    }
    if let Some(c) = cloud {
        c.restart();
    }
}

/// The issue's "done when": 24,000 readings, at least 20 SIGKILLs at random
/// moments under load from a persistent MQTT session, the cloud up and
/// down; every reading is counted exactly once after dedupe by id.
#[test]
fn twenty_sigkills_count_every_reading_exactly_once() {
    let site = Broker::start();
    let mut cloud = Broker::start_persistent();
    let sub = Subscriber::start_persistent(cloud.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = config(site.port, cloud.port, "");
    // The persistent session exists before anything is published.
    let mut first = Outpost::spawn_with_state(&cfg, &state);
    first.wait_subscribed();
    first.kill9();
    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    publish_all(site.port, published.clone(), stop.clone());
    let kills = std::env::var("CRASH_KILLS").map_or(20, |v| v.parse().expect("a number"));
    kill_loop(&state, &cfg, kills, Some(&mut cloud), 0x9E37_79B9_7F4A_7C15);
    let total = SENSORS as u64 * PER_SENSOR as u64;
    wait_until("every reading published", Duration::from_secs(120), || {
        published.load(Ordering::SeqCst) == total
    });
    // A last run takes what is left, and stops cleanly.
    let mut o = Outpost::spawn_with_state(&cfg, &state);
    wait_until("every reading counted", Duration::from_secs(120), || {
        counted(&sub).0 >= total
    });
    o.signal(libc::SIGTERM);
    assert!(o.wait(Duration::from_secs(60)).success(), "{}", o.log());
    sentinel(cloud.port, &sub);
    let (n, aggregates, gaps) = counted(&sub);
    if n != total {
        // Which windows were counted more than once, for the failure message.
        let mut per_window: BTreeMap<(String, i64), Vec<Value>> = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        for a in sub.json() {
            if a["id"].is_string() && seen.insert(a["id"].to_string()) {
                let k = (
                    a["group"].to_string(),
                    a["window_start"].as_i64().unwrap_or(0),
                );
                per_window.entry(k).or_default().push(a);
            }
        }
        let over: Vec<_> = per_window
            .values()
            .filter(|v| v.len() > 1)
            .take(3)
            .collect();
        panic!(
            "{n} readings counted, {total} sent, over {aggregates} aggregates; windows counted more than once: {over:#?}\n{}",
            o.log()
        );
    }
    assert_eq!(gaps, 0, "the journal replays: no gap");
    // After a clean stop the journal holds nothing to replay, and what it
    // keeps on disk is at most the segment last written (truncation works).
    let jdir = state.join("journal");
    let segments = std::fs::read_dir(&jdir).unwrap().count();
    assert!(segments <= 2, "{segments} journal segments left");
    let (_, rec) =
        outpost_storage::journal::Journal::open(outpost_storage::journal::JournalSettings {
            dir: jdir,
            segment_bytes: 16 << 20,
            max_bytes: 256 << 20,
        })
        .unwrap();
    assert!(
        rec.readings.is_empty() && rec.reappend.is_empty(),
        "{} readings, {} aggregates left",
        rec.readings.len(),
        rec.reappend.len()
    );
    let log = o.log();
    assert!(log.contains("outpost stopped"), "{log}");
}

/// Without the journal (turned off), a crash loses what the windows held,
/// and the first aggregate of each group after the unclean start says so.
#[test]
fn without_the_journal_an_unclean_start_marks_a_gap() {
    let site = Broker::start();
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = config(site.port, cloud.port, "[journal]\nenabled = false\n");
    let mut o = Outpost::spawn_with_state(&cfg, &state);
    o.wait_subscribed();
    let mut p = Publisher::connect(site.port);
    let t = now_ms() - 3_600_000;
    let base = t - t.rem_euclid(1000);
    for k in 0..500 {
        p.publish(
            "sensors/s0/data",
            reading("s0", base + k * 10, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
        );
    }
    p.flush();
    wait_until("aggregates", Duration::from_secs(30), || {
        counted(&sub).1 > 0
    });
    o.kill9();
    assert_eq!(counted(&sub).2, 0, "no gap before the crash");
    let mut o = Outpost::spawn_with_state(&cfg, &state);
    o.wait_subscribed();
    for k in 500..800 {
        p.publish(
            "sensors/s0/data",
            reading("s0", base + k * 10, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
        );
    }
    p.flush();
    wait_until("a gap-marked aggregate", Duration::from_secs(30), || {
        counted(&sub).2 == 1
    });
    // A clean stop, then a start: no gap.
    o.signal(libc::SIGTERM);
    assert!(o.wait(Duration::from_secs(30)).success(), "{}", o.log());
    let before = counted(&sub).1;
    let mut o = Outpost::spawn_with_state(&cfg, &state);
    o.wait_subscribed();
    for k in 800..1000 {
        p.publish(
            "sensors/s0/data",
            reading("s0", base + k * 10, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
        );
    }
    p.flush();
    wait_until(
        "aggregates after the clean restart",
        Duration::from_secs(30),
        || counted(&sub).1 > before,
    );
    o.signal(libc::SIGTERM);
    assert!(o.wait(Duration::from_secs(30)).success(), "{}", o.log());
    sentinel(cloud.port, &sub);
    assert_eq!(
        counted(&sub).2,
        1,
        "only the first aggregate after the crash"
    );
}
