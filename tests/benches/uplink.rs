//! Uplink benchmark: Outpost's uplink (outbox → QoS 1 publish → PUBACK →
//! outbox acknowledgement) against raw rumqttc publishing the same bytes
//! with the same in-flight window, to the same local Mosquitto, in one run.
//!
//! ```sh
//! cargo bench -p outpost-tests --bench uplink
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::aggregate::{AGGREGATE_SCHEMA, Aggregate, ModelRef, PolicyRef};
use outpost::metrics::Metrics;
use outpost::outbox::{DiskOutbox, DiskSettings, FullPolicy, MemoryOutbox, Outbox, SharedOutbox};
use outpost::uplink::{self, Backoff, RumqttConnector, Stop, UplinkSettings, UplinkState};
use outpost_tests::Broker;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

const N: u64 = 30_000;
const INFLIGHT: u16 = 32;

fn aggregate(i: u64) -> Aggregate {
    let mut a = Aggregate {
        schema: AGGREGATE_SCHEMA,
        id: String::new(),
        gateway: "gw-bench".into(),
        group: format!("line-{}", i % 16),
        window_start: 1_700_000_000_000 + i as i64 * 10_000,
        window_end: 1_700_000_010_000 + i as i64 * 10_000,
        partial: false,
        readings: 1000,
        late_readings: 0,
        inferences: 19,
        sensors: 4,
        model: ModelRef {
            name: "basicmotions-fcn".into(),
            version: "1.0.0".into(),
        },
        classes: None,
        anomalies: Some(i % 3),
        anomaly_rate: Some(0.1),
        score: None,
        policy: PolicyRef::default(),
        models: None,
        shadow: None,
        drift: None,
        gap: false,
        covers: Vec::new(),
    };
    a.id = a.compute_id();
    a
}

fn options(port: u16, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

async fn outpost_uplink(port: u16, outbox: Box<dyn Outbox>) -> f64 {
    let outbox = SharedOutbox::new(outbox);
    for i in 0..N {
        outbox.append(&aggregate(i)).expect("append");
    }
    outbox.commit().expect("commit");
    let stop = Stop {
        drain: CancellationToken::new(),
        now: CancellationToken::new(),
    };
    stop.drain.cancel();
    let t = Instant::now();
    let left = uplink::run(
        RumqttConnector::new(options(port, "bench-uplink"), INFLIGHT),
        UplinkState::new(
            INFLIGHT as usize,
            Backoff::new(Duration::from_millis(10), Duration::from_millis(100), 1),
        ),
        outbox,
        UplinkSettings::new("bench/{gateway}/{group}", "gw-bench"),
        Arc::new(Metrics::new()),
        stop,
    )
    .await;
    assert_eq!(left, 0);
    N as f64 / t.elapsed().as_secs_f64()
}

async fn raw_rumqttc(port: u16) -> f64 {
    let payloads: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| {
            let a = aggregate(i);
            (
                format!("bench/gw-bench/{}", a.group),
                serde_json::to_vec(&a).expect("json"),
            )
        })
        .collect();
    let mut o = options(port, "bench-raw");
    o.set_inflight(INFLIGHT);
    let (client, mut eventloop) = AsyncClient::new(o, INFLIGHT as usize + 8);
    let t = Instant::now();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in payloads {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < N {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("poll") {
            acked += 1;
        }
    }
    let _client = publisher.await.expect("publisher");
    N as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let broker = Broker::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "uplink benchmark: {N} aggregates of {} bytes, QoS 1, {INFLIGHT} in flight, local Mosquitto\n",
        serde_json::to_vec(&aggregate(1)).expect("json").len()
    );
    println!("| publisher | aggregates/s | ratio to raw rumqttc |");
    println!("|---|---|---|");
    // Raw first and last, to see drift within the run.
    let raw1 = rt.block_on(raw_rumqttc(broker.port));
    let mem = rt.block_on(outpost_uplink(
        broker.port,
        Box::new(MemoryOutbox::new(N as usize)),
    ));
    let disk = rt.block_on(outpost_uplink(
        broker.port,
        Box::new(
            DiskOutbox::open(DiskSettings {
                dir: dir.path().to_path_buf(),
                segment_bytes: 8 << 20,
                max_bytes: 1 << 30,
                policy: FullPolicy::RejectNew,
                protect_oldest: 0,
                stream_caps: Default::default(),
            })
            .expect("open"),
        ),
    ));
    let raw2 = rt.block_on(raw_rumqttc(broker.port));
    let raw = (raw1 + raw2) / 2.0;
    println!(
        "| raw rumqttc AsyncClient (mean of a run before and after) | {raw:.0} ({raw1:.0}, {raw2:.0}) | 1.00 |"
    );
    println!(
        "| Outpost uplink, memory outbox | {mem:.0} | {:.2} |",
        mem / raw
    );
    println!(
        "| Outpost uplink, disk outbox (acks persisted at the end) | {disk:.0} | {:.2} |",
        disk / raw
    );
}
