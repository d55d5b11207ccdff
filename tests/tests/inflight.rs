//! Issue 18 (4), "Field faults": `coarsen` merged records that were in
//! flight. The outbox protected `max_inflight` records, while a batch
//! carries up to 64; a record in flight merged with one behind it, and its
//! PUBACK then deleted the readings merged into it. The real `outpost`
//! binary and a real Mosquitto, behind a proxy that holds the broker's
//! PUBACKs back while the outbox fills up and coarsens.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outpost_tests::*;

/// A TCP proxy to `upstream` that forwards everything from the client at
/// once, and from the broker only its CONNACK (the first 4 bytes of each
/// connection) until `open` is set.
fn gated_proxy(upstream: u16, open: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut c_in, mut b_out) = (
                client.try_clone().expect("clone"),
                broker.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut b_out);
            });
            let (mut b_in, mut c_out) = (broker, client);
            let open = open.clone();
            std::thread::spawn(move || {
                b_in.set_read_timeout(Some(Duration::from_millis(10))).ok();
                let mut held = Vec::new();
                let mut passed = 0usize;
                let mut buf = [0u8; 4096];
                loop {
                    match b_in.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => held.extend_from_slice(&buf[..n]),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                    let allowed = if open.load(Ordering::SeqCst) {
                        held.len()
                    } else {
                        held.len().min(4usize.saturating_sub(passed))
                    };
                    if allowed > 0 {
                        if c_out.write_all(&held[..allowed]).is_err() {
                            return;
                        }
                        held.drain(..allowed);
                        passed += allowed;
                    }
                }
            });
        }
    });
    port
}

/// `n` readings per sensor at 100 Hz for 4 sensors, interleaved; returns
/// how many.
fn write_readings(path: &Path, n: usize) -> u64 {
    let base = now_ms() - 3_600_000;
    let base = base - base.rem_euclid(60_000);
    let mut out = String::new();
    for t in 0..n {
        for s in 0..4 {
            let v = ((t + s) % 17) as f32 / 17.0;
            out.push_str(&reading(
                &format!("s{s}"),
                base + t as i64 * 10,
                &[v, -v, v * 2.0, 0.1, 0.2, 0.3],
            ));
            out.push('\n');
        }
    }
    std::fs::write(path, out).expect("write readings");
    4 * n as u64
}

/// Readings counted by the aggregates a subscriber received, each id once.
fn readings_delivered(sub: &Subscriber) -> u64 {
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for m in sub.messages() {
        let batch: Vec<serde_json::Value> = serde_json::from_slice(&m.payload).expect("a batch");
        for a in batch {
            if seen.insert(a["id"].as_str().expect("an id").to_string()) {
                total += a["readings"].as_u64().expect("readings")
                    + a["late_readings"].as_u64().unwrap_or(0);
            }
        }
    }
    total
}

/// Run the gateway over `input` to the cloud at `cloud`, through the gated
/// proxy; the PUBACKs pass once the outbox has coarsened (when `gate`).
/// Returns the readings counted at the cloud.
fn run(input: &Path, cloud: &Broker, gate: bool) -> u64 {
    let state = tempfile::tempdir().expect("temp dir");
    let sub = Subscriber::start(cloud.port, "outpost/#");
    let open = Arc::new(AtomicBool::new(!gate));
    let proxy = gated_proxy(cloud.port, open.clone());
    let cfg = format!(
        r#"
[gateway]
id = "gw-inflight"
shutdown_timeout_ms = 30000

[[sources]]
type = "file"
path = {path:?}

[aggregation]
window_ms = 500
allowed_lateness_ms = 1000

[outbox]
policy = "coarsen"
max_bytes = {max_bytes}
segment_bytes = 16384
fsync_interval_ms = 500

[uplink]
broker = {{ host = "127.0.0.1", port = {proxy} }}
allow_plaintext = true
health_interval_s = 0
topic = "outpost/{{gateway}}/agg"
batch_max_bytes = 65536
max_inflight = 1
backoff_initial_ms = 50
backoff_max_ms = 500
"#,
        path = input.display().to_string(),
        max_bytes = if gate { 524288 } else { 1 << 30 },
    );
    let mut o = Outpost::spawn_with_state(&cfg, &state.path().join("state"));
    if gate {
        wait_until(
            "the outbox coarsened under the batch in flight",
            Duration::from_secs(120),
            || o.metric("outpost_outbox_coarsened_total", &[]) > 100.0,
        );
        assert_eq!(o.metric("outpost_uplink_acked_total", &[]), 0.0);
        open.store(true, Ordering::SeqCst);
    }
    let status = o.wait(Duration::from_secs(120));
    assert!(status.success(), "{}", o.log());
    if gate {
        assert_eq!(
            o.log().matches("oldest segment dropped").count(),
            0,
            "nothing dropped: coarsen kept up"
        );
    }
    let aggregates = o.produced_aggregates();
    assert!(aggregates > 1000, "{aggregates} aggregates");
    readings_delivered(&sub)
}

#[test]
fn coarsen_never_merges_a_batch_in_flight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in.jsonl");
    write_readings(&input, 40_000);
    let cloud = Broker::start();
    // Room enough: nothing merged, every reading counted once.
    let plain = run(&input, &cloud, false);
    // A batch in flight while the outbox fills and merges around it.
    let merged = run(&input, &cloud, true);
    assert_eq!(merged, plain, "every reading counted once, merged or not");
}
