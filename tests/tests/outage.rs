//! Issue 18 (6), "Field faults": a short cloud outage opened the uplink's
//! circuit breaker, and nothing was delivered for `breaker_open_ms` (five
//! minutes) after the cloud was back. The open breaker must keep probing, so
//! that delivery resumes within about `backoff_max_ms` of the cloud's
//! return. Real Mosquitto brokers and the real `outpost` binary.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outpost_tests::*;

/// Distinct aggregate ids a subscriber received.
fn delivered(sub: &Subscriber) -> usize {
    sub.json()
        .iter()
        .filter_map(|a| a["id"].as_str().map(str::to_string))
        .collect::<BTreeSet<_>>()
        .len()
}

#[test]
fn open_breaker_delivers_within_the_largest_backoff_of_the_cloud_return() {
    let site = Broker::start();
    // Sessions kept across the restart, so the subscriber misses nothing.
    let mut cloud = Broker::start_persistent();
    let sub = Subscriber::start_persistent(cloud.port, "outpost/+/agg/#");
    // The field settings: a short largest backoff, the default five-minute
    // breaker, which here opens after three failed connections; windows of
    // 10 s.
    let cfg = format!(
        r#"{}
[uplink]
broker = {{ host = "127.0.0.1", port = {} }}
allow_plaintext = true
backoff_max_ms = 1000
breaker_failures = 3
breaker_open_ms = 300000
"#,
        site_config("gw-breaker", site.port),
        cloud.port
    );
    let o = Outpost::run(&cfg);
    o.wait_subscribed();
    wait_until("the uplink connected", Duration::from_secs(20), || {
        o.metric("outpost_uplink_connected", &[]) == 1.0
    });

    cloud.stop();
    o.wait_metric(
        "outpost_uplink_breaker_open",
        &[],
        1.0,
        Duration::from_secs(20),
    );
    // The open breaker probes on (counted at the end: the breaker as it was
    // had no probes, and waiting here for them would hide where it failed).
    let probes_failed = || o.metric("outpost_uplink_breaker_probes_failed_total", &[]);
    wait_for(Duration::from_secs(10), || probes_failed() >= 1.0);
    // Aggregates pile up while the cloud is away (and the breaker open).
    publish_old_readings(site.port, 600);
    wait_until("a backlog", Duration::from_secs(30), || {
        o.metric("outpost_outbox_depth", &[]) >= 3.0
    });
    let backlog = o.metric("outpost_outbox_depth", &[]) as usize;
    assert_eq!(delivered(&sub), 0, "nothing reaches a stopped cloud");
    assert_eq!(o.metric("outpost_uplink_breaker_open", &[]), 1.0);

    cloud.restart();
    let back = Instant::now();
    // backoff_max_ms is 1 s: a probe finds the cloud within it, then the
    // backlog goes. Five seconds leave room for a slow machine; the breaker
    // as it was waited 300.
    let drained = wait_for(Duration::from_secs(5), || {
        o.metric("outpost_outbox_depth", &[]) == 0.0 && delivered(&sub) >= backlog
    });
    assert!(
        drained,
        "{:?} after the cloud's return: depth {}, {} of a backlog of {backlog} delivered\n{}",
        back.elapsed(),
        o.metric("outpost_outbox_depth", &[]),
        delivered(&sub),
        o.log()
    );
    // The probe's PUBACK closed the breaker; the failed probes were counted.
    assert_eq!(o.metric("outpost_uplink_breaker_open", &[]), 0.0);
    assert!(probes_failed() >= 1.0);
}
