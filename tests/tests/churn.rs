//! Issue 18 (8), "Field faults": a gateway receiving new sensor ids all the
//! time (devices that rotate ids, a misbehaving publisher) grew from 32 MB
//! to 98 MB and kept it: per-sensor windows, per-group aggregation state and
//! watermarks were never forgotten. They are now evicted when idle on the
//! monotonic clock (the evicted readings still counted), and the sensors
//! tracked at once are capped. The real `outpost` binary and real Mosquitto
//! brokers: a million distinct sensor ids over 32 seconds, peak
//! memory (VmHWM) under 64 MB, every reading counted once.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use outpost_tests::*;

/// Distinct sensor ids fed, in rounds of `PER_ROUND` (each round its own
/// aggregation group, so groups churn too).
const SENSORS: u64 = 1_000_000;
const PER_ROUND: u64 = 50_000;
/// Readings per MQTT message (a JSON array).
const PER_MESSAGE: u64 = 1_000;
/// How long a message of a round takes to send: the ids come evenly over
/// 32 s (about 31,000 a second).
const MESSAGE: Duration = Duration::from_millis(32);

/// Sensors forgotten by windowing 100 ms after their reading, by aggregation
/// after 1 s: what the gateway tracks at a time is about a second of ids.
fn config(site: u16, cloud: u16) -> String {
    config_with(site, cloud, 100_000, 100)
}

/// [`config`] with `ingest.max_sensors` and `windowing.idle_evict_ms`.
fn config_with(site: u16, cloud: u16, max_sensors: usize, idle_evict_ms: u64) -> String {
    format!(
        r#"
[gateway]
id = "gw-churn"
shutdown_timeout_ms = 10000

[ingest]
max_payload_bytes = 262144
max_sensors = {max_sensors}

[[sources]]
type = "mqtt"
name = "site"
broker = {{ host = "127.0.0.1", port = {site} }}
topics = ["churn/data"]

[windowing]
idle_evict_ms = {idle_evict_ms}

[aggregation]
window_ms = 1000
allowed_lateness_ms = 0
idle_close_ms = 1000
group_by = "attr:round"

[privacy]
allow_attrs = ["round"]

[outbox]
kind = "memory"

[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
"#
    )
}

/// Readings counted in the distinct aggregates a subscriber received:
/// (in their window, late, aggregates).
fn counted(sub: &Subscriber) -> (u64, u64, usize) {
    let mut ids = BTreeSet::new();
    let (mut readings, mut late) = (0, 0);
    for v in sub.json() {
        let items = match v {
            serde_json::Value::Array(a) => a,
            v => vec![v],
        };
        for a in items {
            if a["id"]
                .as_str()
                .is_some_and(|id| ids.insert(id.to_string()))
            {
                readings += a["readings"].as_u64().unwrap_or(0);
                late += a["late_readings"].as_u64().unwrap_or(0);
            }
        }
    }
    (readings, late, ids.len())
}

/// One reading each of `ids` in one message: a JSON array.
fn readings_of(ids: std::ops::Range<u64>, round: u64) -> String {
    let ts = now_ms();
    let mut payload = String::with_capacity((ids.end - ids.start) as usize * 120);
    payload.push('[');
    for id in ids {
        if payload.len() > 1 {
            payload.push(',');
        }
        let _ = write!(
            payload,
            r#"{{"sensor":"c{id}","ts":{ts},"values":[0.1,0.2,0.3,0,0,0],"attrs":{{"round":"r{round}"}}}}"#
        );
    }
    payload.push(']');
    payload
}

/// The cap on tracked sensors: beyond `ingest.max_sensors`, a new sensor's
/// readings are refused and counted (`too_many_sensors`); the others are
/// counted once in the aggregates.
#[test]
fn sensors_beyond_the_cap_are_refused_and_counted() {
    let site = Broker::start();
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    // No eviction within the test: the first 1,000 sensors stay tracked.
    let mut o = Outpost::run(&config_with(site.port, cloud.port, 1_000, 600_000));
    o.wait_subscribed();
    let mut p = Publisher::connect(site.port);
    p.publish("churn/data", readings_of(0..1_500, 0));
    p.flush();
    o.wait_metric(
        "outpost_rejected_total",
        &["reason=\"too_many_sensors\""],
        500.0,
        Duration::from_secs(20),
    );
    // The tracked sensors' readings, in no window yet, are counted at the
    // drain.
    o.signal(libc::SIGTERM);
    assert!(o.wait(Duration::from_secs(30)).success(), "{}", o.log());
    let done = wait_for(Duration::from_secs(10), || counted(&sub).0 >= 1_000);
    assert!(done, "{:?}\n{}", counted(&sub), o.log());
    let (readings, late, _) = counted(&sub);
    assert_eq!((readings, late), (1_000, 0), "each reading once");
}

#[test]
fn a_million_sensor_ids_keep_memory_flat_and_each_reading_is_counted_once() {
    let site = Broker::start();
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let o = Outpost::run(&config(site.port, cloud.port));
    o.wait_subscribed();
    let at_start = o.peak_rss_kib();

    let mut p = Publisher::connect(site.port);
    let mut id = 0u64;
    let began = Instant::now();
    let mut sent = 0u32;
    for round in 0..SENSORS / PER_ROUND {
        for _ in 0..PER_ROUND / PER_MESSAGE {
            p.publish("churn/data", readings_of(id..id + PER_MESSAGE, round));
            id += PER_MESSAGE;
            sent += 1;
            // Pacing the feed: new ids keep coming over time, as in the field.
            if let Some(rest) = (MESSAGE * sent).checked_sub(began.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
    assert_eq!(id, SENSORS);
    p.flush();

    let done = wait_for(Duration::from_secs(60), || {
        let (r, l, _) = counted(&sub);
        r + l >= SENSORS
    });
    let (readings, late, aggregates) = counted(&sub);
    assert!(
        done,
        "{readings} + {late} late of {SENSORS} readings counted\n{}",
        o.log()
    );
    assert_eq!((readings, late), (SENSORS, 0), "each reading once");
    assert_eq!(o.metric("outpost_rejected_total", &[]), 0.0);
    // Every sensor was forgotten once idle, and every group.
    wait_until("every sensor evicted", Duration::from_secs(10), || {
        o.metric("outpost_sensors_evicted_total", &[]) == SENSORS as f64
    });
    wait_until("every group evicted", Duration::from_secs(10), || {
        o.metric("outpost_groups_evicted_total", &[]) >= (SENSORS / PER_ROUND) as f64
    });
    let peak = o.peak_rss_kib();
    eprintln!("peak RSS {peak} KiB (at start {at_start} KiB), {aggregates} aggregates");
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB (at start {at_start} KiB), {aggregates} aggregates"
    );
}
