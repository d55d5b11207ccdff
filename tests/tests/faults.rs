//! Fault tests of the offline-first path: real Mosquitto processes, a real
//! `outpost` process killed with SIGKILL, real outbox files corrupted.
//!
//! The counting subscribers use brokers configured with
//! `max_queued_messages 0` (unlimited), so the broker is never the one
//! losing messages.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use outpost::outbox::{DiskOutbox, DiskSettings, FullPolicy, Outbox};
use outpost_tests::*;
use serde_json::Value;

/// A gateway reading `path` (JSON Lines) and publishing to `cloud`.
fn file_config(path: &Path, cloud: u16, window_ms: u64, extra: &str) -> String {
    format!(
        r#"
[gateway]
id = "gw-fault"
shutdown_timeout_ms = 3000

[[sources]]
type = "file"
path = {path:?}

[aggregation]
window_ms = {window_ms}
allowed_lateness_ms = 0

[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
topic = "outpost/{{gateway}}/agg/{{group}}"
max_inflight = 4
backoff_initial_ms = 50
backoff_max_ms = 500
{extra}
"#,
        path = path.display().to_string()
    )
}

/// `n` readings per sensor at 100 Hz for `sensors` sensors, interleaved.
fn write_readings(path: &Path, sensors: usize, n: usize) -> u64 {
    let base = now_ms() - 3_600_000;
    let base = base - base.rem_euclid(60_000);
    let mut out = String::new();
    for t in 0..n {
        for s in 0..sensors {
            let v = ((t + s) % 17) as f32 / 17.0;
            out.push_str(&reading(
                &format!("s{s}"),
                base + t as i64 * 10,
                &[v, -v, v * 2.0, 0.1, 0.2, 0.3],
            ));
            out.push('\n');
        }
    }
    std::fs::write(path, out).unwrap();
    (sensors * n) as u64
}

fn outbox_dir(state: &Path) -> PathBuf {
    state.join("outbox")
}

/// The records pending in a (closed) outbox directory, by id.
fn pending_ids(state: &Path) -> BTreeSet<String> {
    let mut o = DiskOutbox::open(DiskSettings {
        dir: outbox_dir(state),
        segment_bytes: 8 << 20,
        max_bytes: 1 << 30,
        policy: FullPolicy::DropOldest,
        protect_oldest: 0,
        stream_caps: Default::default(),
    })
    .unwrap();
    o.read_from(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect()
}

fn ids(aggs: &[Value]) -> BTreeSet<String> {
    aggs.iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

/// Per group, the window starts in order of first arrival are increasing.
fn assert_order_per_group(aggs: &[Value]) {
    let mut seen = BTreeSet::new();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for a in aggs {
        if !seen.insert(a["id"].as_str().unwrap().to_string()) {
            continue; // a re-sent duplicate
        }
        let g = a["group"].as_str().unwrap().to_string();
        let start = a["window_start"].as_i64().unwrap();
        if let Some(prev) = last.insert(g.clone(), start) {
            assert!(start > prev, "group {g}: window {start} after {prev}");
        }
    }
}

/// A site broker, a cloud broker that keeps sessions across restarts, a
/// persistent counting subscriber on it, and a gateway with 1 s windows
/// whose `[uplink]` table gets `uplink_extra`.
struct OutageRig {
    site: Broker,
    cloud: Broker,
    sub: Subscriber,
    o: Outpost,
    _state: tempfile::TempDir,
}

impl OutageRig {
    fn start(gateway: &str, uplink_extra: &str) -> OutageRig {
        let site = Broker::start();
        let cloud = Broker::start_persistent();
        let sub = Subscriber::start_persistent(cloud.port, "outpost/+/agg/#");
        let state = tempfile::tempdir().unwrap();
        let cfg = format!(
            r#"{}
[uplink]
broker = {{ host = "127.0.0.1", port = {} }}
allow_plaintext = true
backoff_initial_ms = 50
backoff_max_ms = 500
{uplink_extra}
"#,
            site_config(gateway, site.port).replace("window_ms = 10000", "window_ms = 1000"),
            cloud.port
        );
        let o = Outpost::run_with_state(&cfg, state.path());
        wait_until("site subscription", Duration::from_secs(20), || {
            o.log().contains("subscribed to site topics")
        });
        OutageRig {
            site,
            cloud,
            sub,
            o,
            _state: state,
        }
    }

    /// Stop the cloud broker and wait until the uplink knows.
    fn cut(&mut self) {
        self.cloud.stop();
        wait_until("the uplink to notice", Duration::from_secs(20), || {
            self.o.metric("outpost_uplink_connected", &[]) == 0.0
        });
    }
}

/// Fault 1: the cloud broker stops for a while as readings keep flowing,
/// then comes back: after dedupe by id, every aggregate arrived exactly once,
/// in order per group, with every reading counted.
#[test]
fn cloud_outage_loses_nothing_and_keeps_order() {
    // Strict per-group order across the outage (live first would send fresh
    // aggregates before the backlog).
    let mut r = OutageRig::start("gw-outage", "live_first = false");
    let mut publisher = Publisher::connect(r.site.port);
    let base = now_ms() - 600_000;
    let base = base - base.rem_euclid(1000);
    let mut sent = 0u64;
    let mut t = 0i64;
    let mut publish_seconds = |publisher: &mut Publisher, secs: i64, sent: &mut u64| {
        for _ in 0..secs * 20 {
            for s in 0..3 {
                publisher.publish(
                    &format!("sensors/p{s}/data"),
                    reading(
                        &format!("p{s}"),
                        base + t * 50,
                        &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                    ),
                );
                *sent += 1;
            }
            t += 1;
        }
        publisher.flush();
    };
    publish_seconds(&mut publisher, 5, &mut sent);
    wait_until(
        "first aggregates delivered",
        Duration::from_secs(20),
        || r.o.metric("outpost_uplink_acked_total", &[]) > 0.0,
    );
    r.cut();
    // Readings keep flowing during the outage; aggregates pile up in the outbox.
    let acked_before = r.o.metric("outpost_uplink_acked_total", &[]);
    publish_seconds(&mut publisher, 10, &mut sent);
    r.o.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(30),
    );
    wait_until("a backlog", Duration::from_secs(20), || {
        r.o.metric("outpost_outbox_depth", &[]) >= 10.0
    });
    assert_eq!(r.o.metric("outpost_uplink_acked_total", &[]), acked_before);
    r.cloud.restart();
    publish_seconds(&mut publisher, 3, &mut sent);
    r.o.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(30),
    );
    r.o.signal(libc::SIGTERM);
    assert!(r.o.wait(Duration::from_secs(30)).success(), "{}", r.o.log());
    let n = r.o.produced_aggregates();
    wait_for(Duration::from_secs(20), || {
        ids(&r.sub.json()).len() as u64 >= n
    });
    let aggs = r.sub.json();
    assert_eq!(
        ids(&aggs).len() as u64,
        n,
        "none missing, none extra; {} messages received\n{}",
        aggs.len(),
        r.o.log()
    );
    let mut by_id = BTreeMap::new();
    for a in &aggs {
        by_id.insert(a["id"].as_str().unwrap().to_string(), a.clone());
    }
    let readings: u64 = by_id
        .values()
        .map(|a| a["readings"].as_u64().unwrap())
        .sum();
    assert_eq!(readings, sent, "every reading counted once after dedupe");
    assert_order_per_group(&aggs);
}

/// Fault 2: SIGKILL at random moments under load, 20 times, restarting each
/// time: every aggregate that was in the outbox at a kill reaches the cloud.
#[test]
fn sigkill_twenty_times_loses_no_committed_aggregate() {
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let input = dir.path().join("in.jsonl");
    write_readings(&input, 4, 20_000);
    // Without a broker for most of the run, aggregates accumulate; the
    // uplink points at the real one so some are in flight at each kill.
    let cfg = file_config(
        &input,
        cloud.port,
        100,
        "[outbox]\nfsync_interval_ms = 20\n",
    );
    let mut committed = BTreeSet::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..20 {
        let mut o = Outpost::spawn_with_state(&cfg, &state);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Kill it at a random point of its progress: once it has read a
        // random number of the 80,000 readings (or finished).
        let at = (1 + rng % 60_000) as f64;
        wait_until(
            "outpost to reach the kill point",
            Duration::from_secs(60),
            || o.metric("outpost_readings_total", &[]) >= at || o.log().contains("outpost stopped"),
        );
        o.kill9();
        let pending = pending_ids(&state);
        committed.extend(pending);
        assert!(!o.log().contains("panicked"), "round {round}: {}", o.log());
    }
    // A last clean run delivers the backlog and stops.
    std::fs::write(dir.path().join("empty.jsonl"), "").unwrap();
    let mut o = Outpost::spawn_with_state(
        &file_config(
            &dir.path().join("empty.jsonl"),
            cloud.port,
            100,
            "[outbox]\nfsync_interval_ms = 20\n",
        ),
        &state,
    );
    let status = o.wait(Duration::from_secs(60));
    assert!(status.success(), "{}", o.log());
    assert!(
        pending_ids(&state).is_empty(),
        "outbox drained:\n{}",
        o.log()
    );
    wait_until(
        "every committed aggregate at the cloud",
        Duration::from_secs(20),
        || {
            let got = ids(&sub.json());
            committed.iter().all(|i| got.contains(i))
        },
    );
    assert!(
        committed.len() > 20,
        "the kills caught a backlog ({})",
        committed.len()
    );
}

/// Fault 3: the outbox's last record torn and a middle record's bytes
/// flipped: the runtime starts, quarantines, reports, delivers the rest.
#[test]
fn corrupt_outbox_is_quarantined_and_the_rest_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let input = dir.path().join("in.jsonl");
    write_readings(&input, 2, 3000);
    // No broker on this port: everything stays in the outbox.
    let dead = free_port();
    let mut o = Outpost::spawn_with_state(&file_config(&input, dead, 1000, ""), &state);
    let status = o.wait(Duration::from_secs(60));
    assert!(status.success(), "{}", o.log());
    let before = pending_ids(&state);
    let n = o.produced_aggregates() as usize;
    assert_eq!(before.len(), n, "all {n} aggregates kept while offline");

    // Tear the last record and flip bytes inside one in the middle.
    let seg = std::fs::read_dir(outbox_dir(&state))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let len = bytes.len();
    bytes.truncate(len - 9);
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4] {
        *b ^= 0xA5;
    }
    std::fs::write(&seg, &bytes).unwrap();

    let cloud = Broker::start_on(dead, "");
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let mut o = Outpost::spawn_with_state(&file_config(&empty, cloud.port, 1000, ""), &state);
    let status = o.wait(Duration::from_secs(60));
    assert!(status.success(), "{}", o.log());
    let log = o.log();
    assert!(log.contains("torn tail truncated and quarantined"), "{log}");
    assert!(log.contains("corrupt records quarantined"), "{log}");
    let quarantined = std::fs::read_dir(outbox_dir(&state).join("quarantine"))
        .unwrap()
        .count();
    assert_eq!(
        quarantined, 2,
        "the torn tail and the flipped record kept for inspection"
    );
    wait_until(
        "the intact aggregates at the cloud",
        Duration::from_secs(20),
        || ids(&sub.json()).len() >= n - 2,
    );
    let got = ids(&sub.json());
    assert_eq!(got.len(), n - 2, "everything but the two damaged records");
    assert!(got.is_subset(&before));
}

/// Fault 4: the disk cap reached during a long outage: the oldest segments
/// go (policy drop_oldest), the counters say how many, memory stays flat.
#[test]
fn disk_cap_during_a_long_outage_drops_oldest_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let input = dir.path().join("in.jsonl");
    write_readings(&input, 8, 200_000);
    // One aggregate per inference (hop 50 readings = 500 ms) and sensor.
    let cfg = file_config(
        &input,
        free_port(),
        500,
        // Stream s0 (sensor s0's aggregates) has a cap of its own.
        "[outbox]\nmax_bytes = 131072\nsegment_bytes = 16384\nstreams = { s0 = 8192 }\n",
    )
    .replace("allowed_lateness_ms = 0", "allowed_lateness_ms = 1000")
    .replace("shutdown_timeout_ms = 3000", "shutdown_timeout_ms = 5000");
    let mut o = Outpost::spawn_with_state(&cfg, &state);
    // Memory half way through the input (the allocator's arenas and the
    // outbox's caps reached long before) and at its end: whatever the
    // gateway kept of the second half's ~16,000 aggregates shows as growth.
    let mut early = 0;
    wait_until("half of the aggregates", Duration::from_secs(240), || {
        early = o.rss_kib();
        o.metric("outpost_aggregates_total", &[]) >= 16_000.0
    });
    let mut late = 0;
    let mut s0_max: f64 = 0.0;
    let mut s1_max: f64 = 0.0;
    wait_until("the input read", Duration::from_secs(300), || {
        late = o.rss_kib();
        s0_max = s0_max.max(o.metric("outpost_outbox_stream_bytes", &["stream=\"s0\""]));
        s1_max = s1_max.max(o.metric("outpost_outbox_stream_bytes", &["stream=\"s1\""]));
        o.metric("outpost_readings_total", &[]) >= 1_600_000.0
    });
    let bytes = o.metric("outpost_outbox_bytes", &[]);
    assert!(bytes <= 131072.0, "outbox bytes {bytes}");
    assert!(
        s0_max > 0.0 && s0_max <= 8192.0,
        "stream s0 bytes peaked at {s0_max}"
    );
    assert!(
        s1_max > 8192.0,
        "the other streams are not held to s0's cap: s1 peaked at {s1_max}"
    );
    let status = o.wait(Duration::from_secs(120));
    assert!(status.success(), "{}", o.log());
    let n = o.produced_aggregates();
    assert!(n >= 30_000, "{n} aggregates");
    eprintln!("rss early {early} KiB, late {late} KiB, {n} aggregates");
    let held = pending_ids(&state).len() as u64;
    // Whole segments dropped (total cap) and s0's records dropped (its cap).
    let log = o.log();
    let logged = |message: &str, field: &str| -> u64 {
        log.lines()
            .filter(|l| l.contains(message))
            .filter_map(|l| l.split(field).nth(1))
            .filter_map(|s| s.split_whitespace().next())
            .filter_map(|s| {
                s.trim_matches(|c: char| !c.is_ascii_digit())
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    let by_stream = logged("oldest aggregates dropped", " dropped=");
    assert!(by_stream > 0, "s0's cap dropped its oldest records");
    let dropped = logged("oldest segment dropped", "records=") + by_stream;
    assert_eq!(
        held + dropped,
        n,
        "every aggregate held or counted as dropped"
    );
    // The second half's ~16,000 aggregates are about 7 MB of JSON; a flat
    // process grows far less.
    assert!(
        late < early + 3 * 1024,
        "memory grew from {early} KiB to {late} KiB"
    );
}

/// A broker that accepts connections and subscriptions, answers pings, and
/// never acknowledges a publish.
struct SilentBroker {
    port: u16,
    stop: Arc<AtomicBool>,
    max_unacked: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentBroker {
    fn start(port: u16) -> SilentBroker {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let max_unacked = Arc::new(AtomicUsize::new(0));
        let (s, m) = (stop.clone(), max_unacked.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            // Blocking accept; `stop` wakes it with a connection of its own.
            for c in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = c {
                    let (s, m) = (s.clone(), m.clone());
                    conns.push(std::thread::spawn(move || serve_silently(c, &s, &m)));
                }
            }
            drop(listener);
            for c in conns {
                let _ = c.join();
            }
        });
        SilentBroker {
            port,
            stop,
            max_unacked,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_silently(mut c: std::net::TcpStream, stop: &AtomicBool, max: &AtomicUsize) {
    let _ = c.set_read_timeout(Some(Duration::from_millis(50)));
    let mut publishes = 0usize;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match c.read(&mut chunk) {
            Ok(0) => return,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
        // Parse whole packets: fixed header, remaining length (varint).
        loop {
            if buf.len() < 2 {
                break;
            }
            let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
            let mut complete = false;
            while i < buf.len() && i <= 4 {
                len += (buf[i] & 0x7F) as usize * mult;
                mult *= 128;
                i += 1;
                if buf[i - 1] & 0x80 == 0 {
                    complete = true;
                    break;
                }
            }
            if !complete || buf.len() < i + len {
                break;
            }
            let kind = buf[0] >> 4;
            let qos = (buf[0] >> 1) & 0x03;
            buf.drain(..i + len);
            let reply: &[u8] = match kind {
                1 => &[0x20, 0x02, 0x00, 0x00], // CONNECT → CONNACK
                12 => &[0xD0, 0x00],            // PINGREQ → PINGRESP
                // QoS 0 publishes (health messages) take no place in the window.
                3 if qos > 0 => {
                    publishes += 1;
                    max.fetch_max(publishes, Ordering::SeqCst);
                    &[]
                }
                _ => &[],
            };
            if !reply.is_empty() && c.write_all(reply).is_err() {
                return;
            }
        }
    }
}

/// Fault 5: a broker that accepts the connection and never acknowledges:
/// in flight stays at the window, memory flat; then a healthy broker on the
/// same port gets everything.
#[test]
fn silent_broker_keeps_in_flight_bounded_then_delivery_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let input = dir.path().join("in.jsonl");
    write_readings(&input, 2, 6000);
    let port = free_port();
    let mut silent = SilentBroker::start(port);
    let cfg = file_config(&input, port, 1000, "")
        .replace("shutdown_timeout_ms = 3000", "shutdown_timeout_ms = 60000");
    let mut o = Outpost::spawn_with_state(&cfg, &state);
    wait_until("the input read", Duration::from_secs(60), || {
        o.metric("outpost_readings_total", &[]) >= 12_000.0
    });
    wait_until("a full in-flight window", Duration::from_secs(20), || {
        o.metric("outpost_uplink_inflight", &[]) == 4.0
    });
    wait_until("a backlog", Duration::from_secs(30), || {
        o.metric("outpost_outbox_depth", &[]) >= 100.0
    });
    let rss = o.rss_kib();
    assert_eq!(o.metric("outpost_uplink_acked_total", &[]), 0.0);
    assert!(
        silent.max_unacked.load(Ordering::SeqCst) <= 4,
        "{} publishes unacknowledged on one connection",
        silent.max_unacked.load(Ordering::SeqCst)
    );
    silent.stop();
    let cloud = Broker::start_on(port, "");
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let status = o.wait(Duration::from_secs(60));
    assert!(status.success(), "{}", o.log());
    let n = o.produced_aggregates();
    wait_until(
        "every aggregate at the healthy broker",
        Duration::from_secs(20),
        || ids(&sub.json()).len() as u64 >= n,
    );
    assert_eq!(ids(&sub.json()).len() as u64, n);
    assert!(rss > 0 && rss < 200 * 1024, "rss {rss} KiB");
}

/// Live first: after an outage, aggregates of fresh readings reach the cloud
/// while the backlog is still draining at its rate cap (2 a second here).
#[test]
fn after_an_outage_fresh_aggregates_overtake_the_backlog() {
    let mut r = OutageRig::start("gw-live", "backlog_rate = 2");
    r.cut();
    // 20 s of event time for two sensors while the cloud is away.
    let mut publisher = Publisher::connect(r.site.port);
    let base = now_ms() - 600_000;
    let base = base - base.rem_euclid(1000);
    for t in 0..400 {
        for s in ["old-a", "old-b"] {
            publisher.publish(
                &format!("sensors/{s}/data"),
                reading(s, base + t * 50, &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
            );
        }
    }
    publisher.flush();
    wait_until("a backlog", Duration::from_secs(30), || {
        r.o.metric("outpost_outbox_depth", &[]) >= 30.0
    });
    let backlog = r.o.metric("outpost_outbox_depth", &[]) as usize;
    r.cloud.restart();
    wait_until("the uplink back", Duration::from_secs(20), || {
        r.o.metric("outpost_uplink_connected", &[]) == 1.0
    });
    // Fresh readings of another sensor, after the reconnect (300: windows of
    // 100 readings must fill before anything reaches aggregation).
    for t in 0..300 {
        publisher.publish(
            "sensors/fresh/data",
            reading(
                "fresh",
                base + 30_000 + t * 50,
                &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            ),
        );
    }
    publisher.flush();
    let group_count = |g: &str| {
        ids(&r
            .sub
            .json()
            .into_iter()
            .filter(|a| a["group"].as_str().is_some_and(|x| x.starts_with(g)))
            .collect::<Vec<_>>())
        .len()
    };
    wait_until(
        "a fresh aggregate at the cloud",
        Duration::from_secs(20),
        || group_count("fresh") > 0,
    );
    let old = group_count("old-");
    assert!(
        old < backlog,
        "the fresh aggregate came after the whole backlog ({old} of {backlog})"
    );
}

/// A site message larger than the MQTT client would take used to drop the
/// source's connection before its acknowledgement: on a persistent session
/// the broker delivered it again at every reconnect, and everything behind
/// it waited. It is received, acknowledged, refused (`payload_too_large`)
/// once, and not seen again after a restart on the same session.
#[test]
fn an_oversized_site_message_is_refused_once_and_not_delivered_again() {
    let site = Broker::start();
    let state = tempfile::tempdir().unwrap();
    let config = site_config("gw-big", site.port).replace(
        "sensor_from = \"topic:1\"",
        "sensor_from = \"topic:1\"\npersistent_session = true",
    );
    let too_large =
        |o: &Outpost| o.metric("outpost_rejected_total", &["reason=\"payload_too_large\""]);
    let mut o = Outpost::run_with_state(&config, state.path());
    o.wait_subscribed();
    let mut p = Publisher::connect(site.port);
    // Over rumqttc's usual 1 MiB limit, and over ingest.max_payload_bytes.
    p.publish("sensors/big/data", vec![b' '; 2 * 1024 * 1024]);
    p.flush();
    publish_old_readings(site.port, 30);
    o.wait_metric("outpost_readings_total", &[], 30.0, Duration::from_secs(30));
    assert_eq!(too_large(&o), 1.0, "{}", o.log());
    o.signal(libc::SIGTERM);
    assert!(o.wait(Duration::from_secs(30)).success(), "{}", o.log());

    // The same session again: the broker has nothing more to deliver.
    let o = Outpost::run_with_state(&config, state.path());
    o.wait_subscribed();
    publish_old_readings(site.port, 10);
    o.wait_metric("outpost_readings_total", &[], 10.0, Duration::from_secs(30));
    assert_eq!(too_large(&o), 0.0, "{}", o.log());
}
