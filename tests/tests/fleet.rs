//! Fleet operations (issue 20, test 4 end to end, first part): the real
//! gateway on a real Mosquitto refuses unsigned, wrongly signed, replayed
//! and expired desired-state documents and commands, and a privacy change
//! signed by the fleet key only, reports the reason in its retained
//! reported state and in command results, counts each refusal by reason,
//! and still refuses a replay after a restart; and the gateway works under
//! the Mosquitto ACL of docs/fleet.md.

use std::path::Path;
use std::time::Duration;

use outpost::fleet::canonical::{Kind, sign};
use outpost_models::signing::{SigningKey, generate_keypair, read_secret_key};
use outpost_tests::{Broker, Outpost, Publisher, Subscriber, cloud_uplink, now_ms, wait_until};
use serde_json::{Map, Value, json};

const GW: &str = "gw-fleet";
const WAIT: Duration = Duration::from_secs(20);

fn keypair(dir: &Path, name: &str) -> (SigningKey, String) {
    let (s, p) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    generate_keypair(&s, &p).expect("a key pair in a fresh temp dir");
    (
        read_secret_key(&s).expect("the secret key just written"),
        p.display().to_string(),
    )
}

fn config(cloud: u16, fleet_pub: &str, privacy_pub: &str) -> String {
    format!(
        r#"
[gateway]
id = "{GW}"

[[sources]]
type = "simulated"

[privacy]
trusted_keys = ["{privacy_pub}"]

[fleet]
trusted_keys = ["{fleet_pub}"]
groups = ["north"]
{}
"#,
        cloud_uplink(cloud)
    )
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn desired(version: u64, expires_at_ms: i64) -> Map<String, Value> {
    object(json!({
        "format": 1,
        "target": {"gateway": GW},
        "version": version,
        "expires_at_ms": expires_at_ms,
        "config": {"patch": {"aggregation": {"allowed_lateness_ms": 1000}}},
    }))
}

fn signed(kind: Kind, mut doc: Map<String, Value>, keys: &[&SigningKey]) -> Vec<u8> {
    for k in keys {
        sign(kind, &mut doc, k);
    }
    serde_json::to_vec(&doc).expect("JSON")
}

/// Wait until a reported state shows `reason` in `last_error`; returns it.
fn wait_reported_error(reported: &Subscriber, reason: &str, o: &Outpost) -> Value {
    let mut found = None;
    let ok = outpost_tests::wait_for(WAIT, || {
        found = reported
            .json()
            .into_iter()
            .rev()
            .find(|r| r["last_error"]["reason"] == reason);
        found.is_some()
    });
    assert!(
        ok,
        "no reported state with last_error.reason = {reason}: {:?}\n{}",
        reported.json().last(),
        o.log()
    );
    found.expect("found above")
}

fn wait_accepted(reported: &Subscriber, version: u64) {
    wait_until(&format!("version {version} accepted"), WAIT, || {
        reported
            .json()
            .iter()
            .any(|r| r["accepted"][format!("gateway:{GW}")] == version)
    });
}

#[test]
fn desired_state_and_commands_are_refused_unless_signed_fresh_and_new_with_the_reason_reported() {
    let broker = Broker::start();
    let keys = tempfile::tempdir().expect("temp dir");
    let (fleet, fleet_pub) = keypair(keys.path(), "fleet");
    let (privacy, privacy_pub) = keypair(keys.path(), "privacy");
    let (stranger, _) = keypair(keys.path(), "stranger");
    let state = tempfile::tempdir().expect("temp dir");
    let cfg = config(broker.port, &fleet_pub, &privacy_pub);

    let reported = Subscriber::start(broker.port, &format!("outpost/{GW}/reported"));
    let results = Subscriber::start(broker.port, &format!("outpost/{GW}/results"));
    let mut o = Outpost::run_with_state(&cfg, state.path());
    // The first report follows the gateway's subscriptions on its connection.
    wait_until("the first reported state", WAIT, || {
        reported.json().iter().any(|r| r["gateway"] == GW)
    });
    let first = reported.json()[0].clone();
    assert_eq!(first["format"], 1);
    assert_eq!(first["privacy_policy_version"], "1");
    assert!(first["config_sha256"].is_string(), "{first}");
    assert_eq!(first["models"][0]["state"], "active", "{first}");
    assert!(first["health"]["ready"].is_boolean(), "{first}");

    let mut p = Publisher::connect(broker.port);
    let topic = format!("outpost/{GW}/desired");
    let later = now_ms() + 3_600_000;

    // Unsigned.
    p.publish(
        &topic,
        serde_json::to_vec(&desired(2, later)).expect("JSON"),
    );
    wait_reported_error(&reported, "unsigned", &o);
    // Signed by a key the gateway does not trust.
    p.publish(
        &topic,
        signed(Kind::Desired, desired(2, later), &[&stranger]),
    );
    wait_reported_error(&reported, "untrusted_key", &o);
    // Signed by the fleet key, then changed.
    let mut tampered: Value =
        serde_json::from_slice(&signed(Kind::Desired, desired(2, later), &[&fleet])).expect("JSON");
    tampered["version"] = json!(3);
    p.publish(&topic, serde_json::to_vec(&tampered).expect("JSON"));
    wait_reported_error(&reported, "bad_signature", &o);
    // Expired.
    p.publish(
        &topic,
        signed(Kind::Desired, desired(2, now_ms() - 1_000), &[&fleet]),
    );
    wait_reported_error(&reported, "expired", &o);
    // A privacy change signed by the fleet key only.
    let mut loosen = desired(2, later);
    loosen.insert("privacy".into(), json!({"allow_attrs": ["patient"]}));
    p.publish(&topic, signed(Kind::Desired, loosen.clone(), &[&fleet]));
    wait_reported_error(&reported, "privacy_not_countersigned", &o);
    // Nothing refused was taken: version 2, properly signed, passes; with
    // the privacy officer's signature too, a privacy change passes.
    p.publish(&topic, signed(Kind::Desired, desired(2, later), &[&fleet]));
    wait_accepted(&reported, 2);
    let mut loosen3 = loosen;
    loosen3.insert("version".into(), json!(3));
    p.publish(&topic, signed(Kind::Desired, loosen3, &[&fleet, &privacy]));
    wait_accepted(&reported, 3);
    // An older version, properly signed: a replay.
    p.publish(&topic, signed(Kind::Desired, desired(2, later), &[&fleet]));
    let r = wait_reported_error(&reported, "replayed", &o);
    assert_eq!(r["last_error"]["subject"], format!("desired:gateway:{GW}"));

    // Commands: unsigned refused, signed run once, a second delivery refused.
    let commands = format!("outpost/{GW}/commands");
    let status = object(json!({
        "format": 1, "id": "c-1", "target": {"gateway": GW},
        "name": "status", "expires_at_ms": later,
    }));
    p.publish(&commands, serde_json::to_vec(&status).expect("JSON"));
    p.publish(&commands, signed(Kind::Command, status.clone(), &[&fleet]));
    p.publish(&commands, signed(Kind::Command, status, &[&fleet]));
    wait_until("three command results", WAIT, || results.json().len() >= 3);
    let res = results.json();
    assert_eq!(res[0]["status"], "refused", "{res:?}");
    assert_eq!(res[0]["reason"], "unsigned", "{res:?}");
    assert_eq!(res[1]["status"], "ok", "{res:?}");
    assert_eq!(res[1]["output"]["gateway"], GW, "{res:?}");
    assert_eq!(res[2]["reason"], "duplicate_command", "{res:?}");

    for (reason, n) in [
        ("unsigned", 2.0),
        ("untrusted_key", 1.0),
        ("bad_signature", 1.0),
        ("expired", 1.0),
        ("privacy_not_countersigned", 1.0),
        ("replayed", 1.0),
        ("duplicate_command", 1.0),
    ] {
        assert_eq!(
            o.metric(
                "outpost_fleet_refused_total",
                &[&format!("reason=\"{reason}\"")]
            ),
            n,
            "{reason}"
        );
    }
    assert_eq!(
        o.metric("outpost_fleet_accepted_total", &["kind=\"desired\""]),
        2.0
    );
    // Every acceptance and refusal is in the audit log.
    let audit = std::fs::read_to_string(state.path().join("audit").join("audit.log"))
        .expect("the audit log");
    let kinds = |kind: &str| {
        audit
            .lines()
            .filter(|l| l.contains(&format!("\"{kind}\"")))
            .count()
    };
    assert_eq!(kinds("fleet_refused"), 8, "{audit}");
    assert_eq!(kinds("fleet_accepted"), 3, "{audit}");
    assert!(audit.contains("privacy_not_countersigned"), "{audit}");

    // The dead-letter store, remotely: listed (empty here); an entry that
    // does not exist cannot be sent again; a command not built yet fails.
    for (id, name, args) in [
        ("c-2", "deadletter-list", json!({})),
        ("c-3", "deadletter-resend", json!({"ids": [99]})),
        ("c-4", "restart-pipeline", json!({})),
    ] {
        let cmd = object(json!({
            "format": 1, "id": id, "target": {"gateway": GW},
            "name": name, "args": args, "expires_at_ms": later,
        }));
        p.publish(&commands, signed(Kind::Command, cmd, &[&fleet]));
    }
    wait_until("six command results", WAIT, || results.json().len() >= 6);
    let res = results.json();
    assert_eq!(res[3]["status"], "ok", "{res:?}");
    assert_eq!(res[3]["output"]["total"], 0, "{res:?}");
    assert_eq!(res[4]["status"], "failed", "{res:?}");
    assert_eq!(res[5]["status"], "failed", "{res:?}");
    assert!(
        res[5]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restart-pipeline is not implemented")),
        "{res:?}"
    );

    // A group's document: its own version sequence; one signed for
    // another group is refused on this group's topic.
    let group_topic = "outpost/group/north/desired";
    let mut north = desired(1, later);
    north.insert("target".into(), json!({"group": "north"}));
    p.publish(group_topic, signed(Kind::Desired, north.clone(), &[&fleet]));
    wait_until("the group's version 1 accepted", WAIT, || {
        reported
            .json()
            .iter()
            .any(|r| r["accepted"]["group:north"] == 1)
    });
    north.insert("target".into(), json!({"group": "south"}));
    north.insert("version".into(), json!(5));
    p.publish(group_topic, signed(Kind::Desired, north, &[&fleet]));
    let r = wait_reported_error(&reported, "wrong_target", &o);
    assert_eq!(r["last_error"]["subject"], "desired:group:north");

    // After a restart the gateway still knows what it accepted: the
    // replay is refused again, the retained report shows it.
    o.signal(libc::SIGTERM);
    o.wait(Duration::from_secs(30));
    drop(o);
    // Counted before the start: the new report may come before readiness.
    let before = reported.json().len();
    let o = Outpost::run_with_state(&cfg, state.path());
    wait_until("a report from the restarted gateway", WAIT, || {
        reported.json().len() > before
    });
    p.publish(&topic, signed(Kind::Desired, desired(2, later), &[&fleet]));
    p.flush();
    o.wait_metric(
        "outpost_fleet_refused_total",
        &["reason=\"replayed\""],
        1.0,
        WAIT,
    );
}

/// The ACL of docs/fleet.md, with the test's operator clients anonymous
/// (they may do anything under `outpost/`) and the gateway a user.
const ACL: &str = "\
topic readwrite outpost/#
pattern read  outpost/%u/desired
pattern read  outpost/%u/commands
pattern write outpost/%u/reported
pattern write outpost/%u/results
pattern write outpost/%u/health
pattern write outpost/%u/agg/#
user gw-fleet
topic read outpost/group/north/desired
topic read outpost/group/north/commands
";

#[test]
fn the_gateway_follows_its_own_and_its_groups_desired_state_under_the_documented_acl() {
    use std::os::unix::fs::PermissionsExt;
    let auth = tempfile::tempdir().expect("temp dir");
    // Mosquitto drops to its own user: it must read these.
    std::fs::set_permissions(auth.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (acl, passwd, secret) = (
        auth.path().join("acl"),
        auth.path().join("passwd"),
        auth.path().join("gw.password"),
    );
    std::fs::write(&acl, ACL).expect("write acl");
    std::fs::write(&secret, "s3cret").expect("write password");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args([GW, "s3cret"])
        .status()
        .expect("mosquitto_passwd (scripts/setup.sh installs mosquitto)");
    assert!(made.success());
    for f in [&acl, &passwd] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let broker = Broker::start_with(&format!(
        "acl_file {}\npassword_file {}\n",
        acl.display(),
        passwd.display()
    ));
    let keys = tempfile::tempdir().expect("temp dir");
    let (fleet, fleet_pub) = keypair(keys.path(), "fleet");
    let (_, privacy_pub) = keypair(keys.path(), "privacy");
    let cfg = config(broker.port, &fleet_pub, &privacy_pub).replace(
        &format!("broker = {{ host = \"127.0.0.1\", port = {} }}", broker.port),
        &format!(
            "broker = {{ host = \"127.0.0.1\", port = {}, username = \"{GW}\", password = {{ file = \"{}\" }} }}",
            broker.port,
            secret.display()
        ),
    );
    assert!(cfg.contains("username"), "{cfg}");

    let reported = Subscriber::start(broker.port, &format!("outpost/{GW}/reported"));
    let health = Subscriber::start(broker.port, &format!("outpost/{GW}/health"));
    let o = Outpost::run(&cfg);
    // It may write its reported state and health.
    wait_until("the reported state through the ACL", WAIT, || {
        reported.json().iter().any(|r| r["gateway"] == GW)
    });
    wait_until("a health message through the ACL", WAIT, || {
        !health.messages().is_empty()
    });
    // It may read its own and its group's desired state.
    let mut p = Publisher::connect(broker.port);
    let later = now_ms() + 3_600_000;
    p.publish(
        &format!("outpost/{GW}/desired"),
        signed(Kind::Desired, desired(1, later), &[&fleet]),
    );
    let mut north = desired(1, later);
    north.insert("target".into(), json!({"group": "north"}));
    p.publish(
        "outpost/group/north/desired",
        signed(Kind::Desired, north, &[&fleet]),
    );
    let ok = outpost_tests::wait_for(WAIT, || {
        reported.json().iter().any(|r| {
            r["accepted"][format!("gateway:{GW}")] == 1 && r["accepted"]["group:north"] == 1
        })
    });
    assert!(ok, "{:?}\n{}", reported.json().last(), o.log());
}

#[test]
fn an_unreadable_trust_memory_keeps_fleet_operations_off_and_is_counted() {
    let broker = Broker::start();
    let keys = tempfile::tempdir().expect("temp dir");
    let (_, fleet_pub) = keypair(keys.path(), "fleet");
    let (_, privacy_pub) = keypair(keys.path(), "privacy");
    let state = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(state.path().join("fleet")).expect("mkdir");
    std::fs::write(state.path().join("fleet").join("trust.json"), b"{torn").expect("write");
    let reported = Subscriber::start(broker.port, &format!("outpost/{GW}/reported"));
    let health = Subscriber::start(broker.port, &format!("outpost/{GW}/health"));
    let o = Outpost::run_with_state(&config(broker.port, &fleet_pub, &privacy_pub), state.path());
    // The gateway runs and delivers (its health goes out), but accepts no
    // fleet document: forgetting what it accepted could let a replay in.
    // Two health messages: the second goes a second after the connection,
    // well after a report would have (it follows the first at once).
    wait_until("two health messages", WAIT, || health.messages().len() >= 2);
    o.wait_metric("outpost_fleet_errors_total", &[], 1.0, WAIT);
    assert!(o.log().contains("fleet operations are off"), "{}", o.log());
    assert!(reported.messages().is_empty());
}
