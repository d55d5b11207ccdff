//! End to end: sensors publish to a real site broker, `outpost` runs as a
//! process, aggregates arrive at a real cloud broker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const WINDOW_MS: i64 = 10_000;

fn config(site: u16, cloud: u16, extra: &str) -> String {
    format!(
        r#"{}
[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
topic = "outpost/{{gateway}}/agg/{{group}}"
{extra}
"#,
        site_config("gw-test", site)
    )
}

/// A base time in the past, aligned to the aggregation window.
fn base_ts() -> i64 {
    let t = now_ms() - 10 * 60_000;
    t - t.rem_euclid(WINDOW_MS)
}

fn sum(aggs: &[Value], field: &str) -> u64 {
    aggs.iter().map(|a| a[field].as_u64().unwrap_or(0)).sum()
}

struct Rig {
    _site: Broker,
    _cloud: Broker,
    outpost: Outpost,
    cloud_sub: Subscriber,
    publisher: Publisher,
}

fn rig(extra: &str) -> Rig {
    rig_env(extra, &[])
}

fn rig_env(extra: &str, env: &[(&str, &str)]) -> Rig {
    let site = Broker::start();
    let cloud = Broker::start();
    let cloud_sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let outpost = Outpost::run_with_env(&config(site.port, cloud.port, extra), env);
    let publisher = Publisher::connect(site.port);
    // The source subscribes right after it connects; wait for that before publishing.
    wait_until(
        "the site source to subscribe",
        Duration::from_secs(20),
        || outpost.log().contains("subscribed to site topics"),
    );
    Rig {
        _site: site,
        _cloud: cloud,
        outpost,
        cloud_sub,
        publisher,
    }
}

impl Rig {
    /// SIGTERM, wait for exit 0, and return the aggregates received.
    fn stop(mut self) -> Vec<Value> {
        self.outpost.signal(libc::SIGTERM);
        let status = self.outpost.wait(Duration::from_secs(20));
        assert!(
            status.success(),
            "exit {status:?}; log:\n{}",
            self.outpost.log()
        );
        let acked = self.outpost.log();
        assert!(acked.contains("outpost stopped"), "{acked}");
        // Everything the runtime reports as delivered was acknowledged by the
        // broker, and the subscriber (QoS 1) gets it shortly after.
        let produced = self.outpost.produced_aggregates() as usize;
        wait_until(
            "aggregates at the cloud broker",
            Duration::from_secs(10),
            || self.cloud_sub.messages().len() >= produced,
        );
        self.cloud_sub.json()
    }
}

#[test]
fn aggregates_from_real_sensor_data_reach_the_cloud() {
    let r = rig("");
    assert_eq!(r.outpost.metric("outpost_model", &["device=\"cpu\""]), 1.0);
    real_sensor_data_to_the_cloud(r);
}

/// The same on the GPU backend (lavapipe in CI: `device = "gpu"` takes a
/// software adapter when there is no hardware one).
#[cfg(feature = "gpu")]
#[test]
fn aggregates_from_real_sensor_data_reach_the_cloud_on_the_gpu() {
    let r = rig("[inference]\ndevice = \"gpu\"\n");
    let o = &r.outpost;
    assert_eq!(
        o.metric("outpost_model", &["device=\"gpu\""]),
        1.0,
        "{}",
        o.log()
    );
    assert_eq!(
        o.metric("outpost_inference_device_fallbacks_total", &[]),
        0.0
    );
    assert!(o.metric("outpost_inference_ready_seconds", &[]) > 0.0);
    assert!(
        o.log().contains("models uploaded to the GPU"),
        "{}",
        o.log()
    );
    real_sensor_data_to_the_cloud(r);
}

/// `device = "gpu"` on a machine whose Vulkan loader finds no driver: the
/// gateway starts on the CPU, says so, counts it, and loses nothing.
#[cfg(feature = "gpu")]
#[test]
fn without_a_gpu_adapter_inference_falls_back_to_the_cpu() {
    let r = rig_env(
        "[inference]\ndevice = \"gpu\"\n",
        &[
            ("VK_ICD_FILENAMES", "/nonexistent/icd.json"),
            ("VK_DRIVER_FILES", "/nonexistent/icd.json"),
        ],
    );
    let o = &r.outpost;
    assert_eq!(
        o.metric("outpost_inference_device_fallbacks_total", &[]),
        1.0,
        "{}",
        o.log()
    );
    assert_eq!(o.metric("outpost_model", &["device=\"cpu\""]), 1.0);
    assert!(o.log().contains("the GPU is unusable"), "{}", o.log());
    real_sensor_data_to_the_cloud(r);
}

/// Six BasicMotions recordings from two sensors, through the gateway; the
/// aggregates at the cloud count every reading once and name the activities.
fn real_sensor_data_to_the_cloud(mut r: Rig) {
    let series =
        load_ts_series(&workspace().join(".cache/datasets/BasicMotions/BasicMotions_TEST.ts"));
    let base = base_ts();
    // Two sensors, each wearing three recordings of one activity back to back (30 s at 10 Hz).
    let plan = [("walker", "Walking"), ("runner", "Running")];
    let mut sent = 0u64;
    for (sensor, activity) in plan {
        let recs: Vec<_> = series
            .iter()
            .filter(|(l, _)| l == activity)
            .take(3)
            .collect();
        assert_eq!(recs.len(), 3);
        let mut k = 0i64;
        for (_, chans) in recs {
            for t in 0..chans[0].len() {
                let values: Vec<f32> = chans.iter().map(|c| c[t]).collect();
                r.publisher.publish(
                    &format!("sensors/{sensor}/data"),
                    reading(sensor, base + k * 100, &values),
                );
                k += 1;
                sent += 1;
            }
        }
    }
    r.publisher.flush();
    let o = &r.outpost;
    o.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(30),
    );
    let aggs = r.stop();

    let ids: BTreeSet<&str> = aggs.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), aggs.len(), "aggregate ids are unique");
    assert_eq!(sum(&aggs, "readings"), sent, "every reading counted once");
    // 300 readings per sensor, windows of 100 with hop 50: 5 inferences each.
    assert_eq!(sum(&aggs, "inferences"), 10);
    let mut per_group: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for a in &aggs {
        assert_eq!(a["gateway"], "gw-test");
        assert_eq!(a["schema"], outpost::aggregate::AGGREGATE_SCHEMA);
        assert_eq!(a["model"]["name"], "basicmotions-fcn");
        let classes = a["classes"].as_object().unwrap();
        let total: u64 = classes.values().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(total, a["inferences"].as_u64().unwrap());
        let g = per_group
            .entry(a["group"].as_str().unwrap().to_string())
            .or_default();
        for (c, n) in classes {
            *g.entry(c.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    // 30 s of readings over 10 s windows: 3 aggregates per sensor.
    assert_eq!(aggs.len(), 6, "{aggs:#?}");
    assert!(per_group["walker"]["Walking"] >= 4, "{per_group:?}");
    assert!(per_group["runner"]["Running"] >= 4, "{per_group:?}");
}

#[test]
fn sigterm_publishes_the_last_partial_window() {
    let mut r = rig("");
    let base = base_ts();
    for k in 0..30 {
        r.publisher.publish(
            "sensors/s1/data",
            reading("s1", base + k * 100, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
        );
    }
    r.publisher.flush();
    let o = &r.outpost;
    o.wait_metric("outpost_readings_total", &[], 30.0, Duration::from_secs(20));
    assert_eq!(
        r.cloud_sub.messages().len(),
        0,
        "nothing closed before the signal"
    );
    let aggs = r.stop();
    assert_eq!(aggs.len(), 1, "{aggs:?}");
    assert_eq!(aggs[0]["partial"], true);
    assert_eq!(aggs[0]["readings"], 30);
    assert_eq!(aggs[0]["inferences"], 0);
}

/// Publish one bad payload (on `topic`) among 150 good readings: the bad one
/// is counted under `reason`, the good ones all make it into aggregates.
fn bad_input_on(extra: &str, topic: &str, payload: &[u8], reason: &str) -> Vec<Value> {
    let mut r = rig(extra);
    let base = base_ts();
    for k in 0..150 {
        if k == 75 {
            r.publisher.publish(topic, payload.to_vec());
        }
        r.publisher.publish(
            "sensors/s1/data",
            reading("s1", base + k * 100, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
        );
    }
    r.publisher.flush();
    let o = &r.outpost;
    let label = format!("reason=\"{reason}\"");
    o.wait_metric(
        "outpost_rejected_total",
        &[&label],
        1.0,
        Duration::from_secs(20),
    );
    o.wait_metric(
        "outpost_readings_total",
        &[],
        150.0,
        Duration::from_secs(20),
    );
    assert_eq!(
        o.metric("outpost_rejected_total", &[]),
        1.0,
        "only one rejection"
    );
    let aggs = r.stop();
    assert_eq!(sum(&aggs, "readings"), 150);
    assert_eq!(
        sum(&aggs, "inferences"),
        2,
        "the pipeline kept going after the bad input"
    );
    aggs
}

fn bad_input(extra: &str, payload: &[u8], reason: &str) {
    bad_input_on(extra, "sensors/s1/data", payload, reason);
}

#[test]
fn bad_input_malformed_json() {
    bad_input("", b"{\"sensor\": \"s1\", \"ts\": ", "malformed");
}

#[test]
fn bad_input_wrong_channel_count() {
    bad_input(
        "",
        reading("s1", now_ms() - 1000, &[1.0, 2.0]).as_bytes(),
        "wrong_channels",
    );
}

#[test]
fn bad_input_non_finite_values() {
    bad_input(
        "",
        br#"{"sensor":"s1","ts":1700000000000,"values":[1,2,1e39,4,5,6]}"#,
        "non_finite",
    );
}

#[test]
fn bad_input_nan_as_null() {
    bad_input(
        "",
        br#"{"sensor":"s1","ts":1700000000000,"values":[1,2,null,4,5,6]}"#,
        "non_finite",
    );
}

#[test]
fn bad_input_timestamp_far_in_the_future() {
    let ts = now_ms() + 24 * 3600 * 1000;
    bad_input(
        "",
        reading("s1", ts, &[0.0; 6]).as_bytes(),
        "future_timestamp",
    );
}

#[test]
fn bad_input_payload_over_the_size_limit() {
    let big = format!(
        "{{\"sensor\":\"s1\",\"ts\":1,\"values\":[0,0,0,0,0,0],\"attrs\":{{\"pad\":\"{}\"}}}}",
        "x".repeat(5000)
    );
    bad_input(
        "[ingest]\nmax_payload_bytes = 4096\n",
        big.as_bytes(),
        "payload_too_large",
    );
}

#[test]
fn bad_input_unknown_sensor() {
    // The sensor id comes from the topic, so the unknown one has its own topic.
    let payload = reading("x", base_ts(), &[0.0; 6]);
    let aggs = bad_input_on(
        "[ingest]\nsensors = [\"s1\"]\n",
        "sensors/intruder/data",
        payload.as_bytes(),
        "unknown_sensor",
    );
    assert!(aggs.iter().all(|a| a["group"] == "s1"));
}

#[test]
fn bad_input_invalid_timestamp() {
    bad_input(
        "",
        br#"{"sensor":"s1","ts":"last tuesday","values":[1,2,3,4,5,6]}"#,
        "invalid_timestamp",
    );
}

#[test]
fn bad_input_missing_field() {
    bad_input(
        "",
        br#"{"sensor":"s1","values":[1,2,3,4,5,6]}"#,
        "invalid_field",
    );
}

#[test]
fn decisions_go_to_the_site_broker_and_never_to_the_cloud() {
    let site = Broker::start();
    let cloud = Broker::start();
    let cloud_sub = Subscriber::start(cloud.port, "#");
    let site_sub = Subscriber::start(site.port, "outpost/+/decision/#");
    let extra = format!(
        "[decisions]\nbroker = {{ host = \"127.0.0.1\", port = {} }}\nmode = \"all\"\n",
        site.port
    );
    let mut outpost = Outpost::run(&config(site.port, cloud.port, &extra));
    wait_until(
        "the site source to subscribe",
        Duration::from_secs(20),
        || outpost.log().contains("subscribed to site topics"),
    );
    let mut publisher = Publisher::connect(site.port);
    let base = base_ts();
    for k in 0..150 {
        publisher.publish(
            "sensors/s1/data",
            reading("s1", base + k * 100, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
        );
    }
    publisher.flush();
    // 150 readings, windows of 100 with hop 50: two decisions, within moments.
    wait_until("two decisions on site", Duration::from_secs(20), || {
        site_sub.messages().len() >= 2
    });
    let d: Value = serde_json::from_slice(&site_sub.messages()[0].payload).unwrap();
    assert_eq!(site_sub.messages()[0].topic, "outpost/gw-test/decision/s1");
    assert_eq!(d["sensor"], "s1");
    assert!(d["class"].is_string());
    outpost.signal(libc::SIGTERM);
    assert!(outpost.wait(Duration::from_secs(20)).success());
    wait_until(
        "the aggregate at the cloud",
        Duration::from_secs(10),
        || !cloud_sub.messages().is_empty(),
    );
    // Besides aggregates, only the health message (counters, no reading).
    assert!(
        cloud_sub.messages().iter().all(|m| {
            m.topic.starts_with("outpost/gw-test/agg/")
                || (m.topic == "outpost/gw-test/health"
                    && serde_json::from_slice::<outpost::status::Status>(&m.payload).is_ok())
        }),
        "only aggregates and health reach the cloud: {:?}",
        cloud_sub
            .messages()
            .iter()
            .map(|m| &m.topic)
            .collect::<Vec<_>>()
    );
}

/// Batching and zstd: several aggregates per message on `<topic>/zstd`,
/// every aggregate there once, every reading counted.
#[test]
fn batched_zstd_messages_carry_every_aggregate() {
    // One topic for all groups, and a 1 s group commit: everything the burst
    // below produces is committed, and so read, together.
    let site = Broker::start();
    let cloud = Broker::start();
    let cloud_sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let cfg = format!(
        r#"{}
[outbox]
fsync_interval_ms = 1000
[uplink]
broker = {{ host = "127.0.0.1", port = {} }}
allow_plaintext = true
topic = "outpost/{{gateway}}/agg"
batch_max_bytes = 65536
compression = "zstd"
"#,
        site_config("gw-test", site.port),
        cloud.port
    );
    let outpost = Outpost::run(&cfg);
    wait_until(
        "the site source to subscribe",
        Duration::from_secs(20),
        || outpost.log().contains("subscribed to site topics"),
    );
    let publisher = Publisher::connect(site.port);
    let mut r = Rig {
        _site: site,
        _cloud: cloud,
        outpost,
        cloud_sub,
        publisher,
    };
    let base = base_ts();
    let mut sent = 0u64;
    for k in 0..300 {
        for s in ["b1", "b2", "b3"] {
            r.publisher.publish(
                &format!("sensors/{s}/data"),
                reading(s, base + k * 100, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
            );
            sent += 1;
        }
    }
    r.publisher.flush();
    r.outpost.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(30),
    );
    r.outpost.signal(libc::SIGTERM);
    assert!(r.outpost.wait(Duration::from_secs(20)).success());
    let produced = r.outpost.produced_aggregates() as usize;
    let decode = |msgs: &[Message]| -> Vec<Value> {
        msgs.iter()
            .flat_map(|m| {
                assert!(m.topic.ends_with("/zstd"), "{}", m.topic);
                let json = zstd::bulk::decompress(&m.payload, 1 << 22).expect("zstd");
                serde_json::from_slice::<Vec<Value>>(&json).expect("a JSON array")
            })
            .collect()
    };
    wait_until("every aggregate", Duration::from_secs(10), || {
        decode(&r.cloud_sub.messages()).len() >= produced
    });
    let msgs = r.cloud_sub.messages();
    let aggs = decode(&msgs);
    assert_eq!(aggs.len(), produced);
    assert!(
        msgs.len() < aggs.len(),
        "{} messages for {} aggregates",
        msgs.len(),
        aggs.len()
    );
    let ids: BTreeSet<&str> = aggs.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), aggs.len());
    assert_eq!(sum(&aggs, "readings"), sent);
}
