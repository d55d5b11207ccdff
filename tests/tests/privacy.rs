//! Egress: what leaves the gateway. Daphnet freezing-of-gait readings (health
//! data) with a patient's name, ids, e-mail and phone attached go in through
//! the site broker; every byte published to the cloud broker, on every topic
//! (aggregates, health, last will), is captured, and none of the personal
//! data or raw values is in it.

use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const NAME: &str = "Jane Doe";
const PATIENT_ID: &str = "S06-4471";
const EMAIL: &str = "jane.doe@example.org";
const PHONE: &str = "+41 79 555 12 34";
const SENSOR: &str = "jane-doe-S06-ankle";
const WARD: &str = "neuro-ward-3";

/// Daphnet rows: the first 6 of the 9 accelerometer channels (the bundled
/// model takes 6), as text exactly as in the file, and as numbers.
fn daphnet(rows: usize) -> Vec<(Vec<String>, Vec<f32>)> {
    let path = workspace().join(".cache/datasets/Daphnet_S06R02E0/S06R02E0.csv");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-datasets.sh", path.display()));
    text.lines()
        .skip(1)
        .take(rows)
        .map(|l| {
            let f: Vec<String> = l.split(',').skip(1).take(6).map(str::to_string).collect();
            let v = f
                .iter()
                .map(|x| x.parse::<f32>().expect("number"))
                .collect();
            (f, v)
        })
        .collect()
}

/// Run a gateway with `privacy` (the `[privacy]` tables) and `group_by`
/// over Daphnet rows laden with personal data; return every message the
/// cloud broker carried, once the gateway has drained and stopped.
fn egress(privacy: &str, group_by: &str, rows: &[(Vec<String>, Vec<f32>)]) -> Vec<Message> {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("pseudonym.key");
    std::fs::write(
        &key,
        "k2026-11:8f2a6c1e9b7d4a3f0e5c2b1a9d8e7f6c5b4a3928170615f4e3d2c1b0a9f8e7d6\n",
    )
    .unwrap();
    let site = Broker::start();
    let cloud = Broker::start();
    // Everything the cloud broker carries, retained messages and last wills included.
    let all = Subscriber::start(cloud.port, "#");
    let config = format!(
        r#"
[gateway]
id = "gw-egress"
shutdown_timeout_ms = 10000

[[sources]]
type = "mqtt"
name = "site"
broker = {{ host = "127.0.0.1", port = {} }}
topics = ["sensors/+/data"]
sensor_from = "topic:1"

[aggregation]
window_ms = 10000
allowed_lateness_ms = 0
group_by = "{group_by}"

[privacy]
policy_version = "egress-test-1"
allow_attrs = ["ward", "patient_id", "note"]
pseudonymize_sensor = true
pseudonymize_attrs = ["patient_id"]
key = {{ file = "{}" }}
free_text_attrs = ["note"]
redact = ["email", "phone"]
{privacy}
{}"#,
        site.port,
        key.display(),
        cloud_uplink(cloud.port)
    );
    let mut gw = Outpost::run(&config);
    gw.wait_subscribed();

    let t = now_ms() - 10 * 60_000;
    let base = t - t.rem_euclid(10_000);
    let mut p = Publisher::connect(site.port);
    for (i, (_, values)) in rows.iter().enumerate() {
        let payload = serde_json::json!({
            "sensor": SENSOR,
            // 64 Hz, as recorded.
            "ts": base + (i as i64 * 1000) / 64,
            "values": values,
            "attrs": {
                "patient": NAME,
                "patient_id": PATIENT_ID,
                "email": EMAIL,
                "ward": WARD,
                "note": format!("{NAME} froze at the door, call {PHONE} or {EMAIL}"),
            },
        });
        p.publish(&format!("sensors/{SENSOR}/data"), payload.to_string());
    }
    p.flush();
    gw.wait_metric(
        "outpost_readings_total",
        &[],
        rows.len() as f64,
        Duration::from_secs(30),
    );
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(30)).success());
    // The drain published everything; wait until the subscriber has it.
    let produced = gw.produced_aggregates();
    assert!(produced > 0);
    all.wait_aggregates(produced, Duration::from_secs(20));
    all.messages()
}

/// Assert that nothing personal or raw is in `messages`; returns the
/// aggregates and the health messages, parsed.
fn check(
    messages: &[Message],
    rows: &[(Vec<String>, Vec<f32>)],
) -> (
    Vec<outpost::aggregate::Aggregate>,
    Vec<outpost::status::Status>,
) {
    let (mut aggregates, mut health) = (Vec::new(), Vec::new());
    for m in messages {
        let text = String::from_utf8_lossy(&m.payload).to_string() + " " + &m.topic;
        for secret in [
            NAME,
            "Jane",
            "Doe",
            PATIENT_ID,
            EMAIL,
            "example.org",
            PHONE,
            "555 12 34",
            SENSOR,
            WARD,
            "froze",
        ] {
            assert!(
                !text.contains(secret),
                "{secret:?} left the gateway on {}: {text}",
                m.topic
            );
        }
        // Raw values: no three consecutive values of a row, in any of the
        // forms a serializer would write them.
        for (fields, values) in rows {
            let as_text = fields[..3].join(",");
            let as_f32 = values[..3]
                .iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(",");
            assert!(
                !text.contains(&format!("[{as_text}")),
                "raw values {as_text} left: {text}"
            );
            assert!(!text.contains(&as_f32), "raw values {as_f32} left: {text}");
        }
        // What leaves is an aggregate (or a batch of them), or the health message.
        let v: Value = serde_json::from_slice(&m.payload).expect("every message is JSON");
        if m.topic.contains("/agg/") {
            let batch = match v {
                Value::Array(items) => items,
                one => vec![one],
            };
            for a in batch {
                let a: outpost::aggregate::Aggregate =
                    serde_json::from_value(a).expect("only the aggregate type is published");
                assert!(
                    a.group.starts_with("p_"),
                    "the group is a token: {}",
                    a.group
                );
                assert!(m.topic.ends_with(&a.group), "{}", m.topic);
                assert_eq!(a.policy.version, "egress-test-1");
                assert_eq!(a.policy.key_id.as_deref(), Some("k2026-11"));
                aggregates.push(a);
            }
        } else {
            assert!(m.topic.ends_with("/health"), "unexpected topic {}", m.topic);
            health.push(serde_json::from_value(v).expect("the health message is a status"));
        }
    }
    assert!(!aggregates.is_empty());
    (aggregates, health)
}

#[test]
fn nothing_personal_or_raw_leaves_the_gateway() {
    let rows = daphnet(1500);
    // Grouped by the (pseudonymized) sensor: exact counts.
    let messages = egress(
        "[privacy.k_anonymity]\nmin_subjects = 1\nmin_readings = 1\n",
        "sensor",
        &rows,
    );
    let (aggs, health) = check(&messages, &rows);
    // k-anonymity can suppress: the health message has no exact totals.
    assert!(!health.is_empty());
    assert!(health.iter().all(|h| h.counts_withheld && h.readings == 0));
    let readings: u64 = aggs.iter().map(|a| a.readings).sum();
    assert_eq!(
        readings,
        rows.len() as u64,
        "every reading counted, under a token"
    );
}

#[test]
fn nothing_personal_leaves_with_noise_grouped_by_a_pseudonymized_attribute() {
    let rows = daphnet(1500);
    // Two patients declared; only one has readings.
    let messages = egress(
        &format!(
            "[privacy.differential_privacy]\nepsilon = 1.0\nbudget = 1000.0\n\
             groups = [\"{PATIENT_ID}\", \"S07-0815\"]\nrelease_delay_ms = 10000\n"
        ),
        "attr:patient_id",
        &rows,
    );
    let (aggs, health) = check(&messages, &rows);
    for a in &aggs {
        assert_eq!(a.policy.epsilon, Some(1.0), "noised: {a:?}");
        assert!(a.score.is_none(), "scores are not released under noise");
    }
    // Both declared patients are released in every window: the cloud cannot
    // tell which one was active.
    let mut windows = std::collections::BTreeMap::<String, Vec<i64>>::new();
    for a in &aggs {
        windows
            .entry(a.group.clone())
            .or_default()
            .push(a.window_start);
    }
    assert_eq!(windows.len(), 2, "{windows:?}");
    let sets: Vec<std::collections::BTreeSet<i64>> = windows
        .values()
        .map(|w| w.iter().copied().collect())
        .collect();
    assert_eq!(sets[0], sets[1], "the same windows for both");
    for w in windows.values() {
        assert_eq!(w.len(), sets[0].len(), "each window once per group: {w:?}");
    }
    assert!(!health.is_empty());
    for h in &health {
        assert!(h.counts_withheld, "exact totals would undo the noise");
        assert_eq!((h.readings, h.inferences), (0, 0));
    }
}
