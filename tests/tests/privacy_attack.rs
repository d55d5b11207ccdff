//! An observer's attack on the published stream. A week-like stream in
//! compressed time (168 ten-second windows, one per "hour"), three
//! subjects (one wearable each, grouped by their pseudonymized patient id),
//! each active in a window or not (a fixed pseudo-random schedule; an active
//! subject sends 20 readings), goes through the real gateway under a
//! realistic policy: differential privacy with the three patients declared,
//! `sensitivity = 20` (so one subject's whole activity in a window is the
//! protected unit) and epsilon = 1. An "observer" reads only what the cloud
//! broker carries and tries to recover (a) which subject was active in
//! which window, (b) the exact per-subject counts, (c) any raw value or
//! personal string. Under epsilon-DP no observer can tell active from
//! inactive with accuracy above e^ε / (1 + e^ε) (0.731 for ε = 1) on a
//! balanced schedule; the test asserts the observer stays under that bound
//! (within sampling error), that exact counts are almost never hit, and that
//! nothing raw or personal is on the wire, and prints its success rates
//! against chance.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const KEY: &str = "k-attack:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
const SUBJECTS: [(&str, &str); 3] = [
    ("wearable-anna", "MRN-1001"),
    ("wearable-ben", "MRN-1002"),
    ("wearable-cleo", "MRN-1003"),
];
const WINDOWS: i64 = 168;
const PER_ACTIVE_WINDOW: i64 = 20;
const EPSILON: f64 = 1.0;

/// The fixed schedule: whether subject `s` is active in window `w`.
fn active(s: usize, w: i64) -> bool {
    // A 64-bit LCG step over (s, w): deterministic, balanced enough.
    let x = (w as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add((s as u64 + 1).wrapping_mul(1442695040888963407));
    (x >> 33) & 1 == 1
}

#[test]
fn an_observer_of_the_cloud_learns_no_more_than_epsilon_allows() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("pseudonym.key");
    std::fs::write(&key, KEY).unwrap();
    let site = Broker::start();
    let cloud = Broker::start();
    let all = Subscriber::start(cloud.port, "#");
    let declared: Vec<String> = SUBJECTS.iter().map(|(_, p)| format!("{p:?}")).collect();
    let config = format!(
        r#"{}group_by = "attr:patient"

[privacy]
allow_attrs = ["patient", "name"]
pseudonymize_sensor = true
pseudonymize_attrs = ["patient"]
free_text_attrs = ["name"]
key = {{ file = "{}" }}

[privacy.differential_privacy]
epsilon = {EPSILON}
budget = 1000000.0
sensitivity = {PER_ACTIVE_WINDOW}
groups = [{}]
# Compressed time: a subject silent for hours closes its window only when
# it is active again, so windows go out at the end.
release_delay_ms = 100000000
{}"#,
        site_config("gw-attack", site.port),
        key.display(),
        declared.join(", "),
        cloud_uplink(cloud.port)
    );
    let mut gw = Outpost::run(&config);
    gw.wait_subscribed();

    let t = now_ms() - 3 * 86_400_000;
    let base = t - t.rem_euclid(10_000);
    let mut p = Publisher::connect(site.port);
    let mut sent = 0;
    let mut truth: BTreeMap<(usize, i64), bool> = BTreeMap::new();
    for w in 0..WINDOWS {
        for (s, (sensor, patient)) in SUBJECTS.iter().enumerate() {
            let on = active(s, w);
            truth.insert((s, w), on);
            if !on {
                continue;
            }
            for k in 0..PER_ACTIVE_WINDOW {
                let payload = serde_json::json!({
                    "sensor": sensor,
                    "ts": base + w * 10_000 + k * 400,
                    "values": [0.8125 + s as f32, 0.4375, 0.0, 0.0, 0.0, 0.0],
                    "attrs": {"patient": patient, "name": format!("{sensor} Smith")},
                });
                p.publish(&format!("sensors/{sensor}/data"), payload.to_string());
                sent += 1;
            }
        }
    }
    p.flush();
    gw.wait_metric(
        "outpost_readings_total",
        &[],
        sent as f64,
        Duration::from_secs(60),
    );
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(60)).success());
    all.wait_aggregates(gw.produced_aggregates(), Duration::from_secs(30));

    // The scorer (not the observer) knows which token is whose.
    let token_of: BTreeMap<String, usize> = SUBJECTS
        .iter()
        .enumerate()
        .map(|(s, (_, patient))| (token(&key, "patient", patient), s))
        .collect();

    // (c) nothing raw or personal on the wire; and the observer's view.
    let mut seen: BTreeMap<(usize, i64), Value> = BTreeMap::new();
    for m in all.messages() {
        let text = String::from_utf8_lossy(&m.payload).to_string() + " " + &m.topic;
        for secret in ["wearable-", "MRN-", "Smith", "0.8125", "1.8125", "0.4375"] {
            assert!(!text.contains(secret), "(c) {secret:?} on the wire: {text}");
        }
        if !m.topic.contains("/agg/") {
            continue;
        }
        let a: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            a["policy"]["epsilon"], EPSILON,
            "every aggregate noised: {a}"
        );
        let s = token_of[a["group"].as_str().unwrap()];
        let w = (a["window_start"].as_i64().unwrap() - base) / 10_000;
        assert!(
            seen.insert((s, w), a).is_none(),
            "one aggregate per group and window"
        );
    }
    // Every subject in every window from the first to the last: existence
    // says nothing.
    let first = seen.keys().map(|k| k.1).min().unwrap();
    let last = seen.keys().map(|k| k.1).max().unwrap();
    for w in first..=last {
        for s in 0..SUBJECTS.len() {
            assert!(
                seen.contains_key(&(s, w)),
                "subject {s} missing in window {w}"
            );
        }
    }

    // (a) which subject was active: the observer guesses active when the
    // released readings exceed half an active window's.
    let (mut right, mut total, mut active_n) = (0u32, 0u32, 0u32);
    // (b) the exact count of an active subject.
    let (mut exact, mut active_seen) = (0u32, 0u32);
    for ((s, w), a) in &seen {
        let Some(&on) = truth.get(&(*s, *w)) else {
            continue;
        };
        let readings = a["readings"].as_u64().unwrap() as i64;
        let guess = readings > PER_ACTIVE_WINDOW / 2;
        total += 1;
        active_n += u32::from(on);
        right += u32::from(guess == on);
        if on {
            active_seen += 1;
            exact += u32::from(readings == PER_ACTIVE_WINDOW);
        }
    }
    let mean = |want: bool| {
        let v: Vec<f64> = seen
            .iter()
            .filter(|(k, _)| truth.get(k) == Some(&want))
            .map(|(_, a)| a["readings"].as_f64().unwrap())
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "observer: mean released readings {:.1} when active, {:.1} when not",
        mean(true),
        mean(false)
    );
    let n = f64::from(total);
    let accuracy = f64::from(right) / n;
    let chance = f64::from(active_n.max(total - active_n)) / n;
    let bound = EPSILON.exp() / (1.0 + EPSILON.exp());
    let exact_rate = f64::from(exact) / f64::from(active_seen);
    println!(
        "observer: (a) activity {accuracy:.3} correct over {total} subject-windows \
         (chance {chance:.3}, epsilon bound {bound:.3}); (b) exact counts {exact_rate:.3} \
         of {active_seen} active windows"
    );
    assert!(total >= 400, "{total} subject-windows scored");
    assert!(
        (0.35..0.65).contains(&(f64::from(active_n) / n)),
        "the schedule is about balanced"
    );
    // Four standard errors of a proportion over n.
    let slack = 4.0 * (0.25 / n).sqrt();
    assert!(
        accuracy <= bound + slack,
        "(a) the observer tells activity apart better than epsilon allows: {accuracy}"
    );
    assert!(
        exact_rate < 0.05,
        "(b) exact counts recovered too often: {exact_rate}"
    );
}
