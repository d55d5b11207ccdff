//! Model governance end to end, with the `outpost` binary: publisher keys,
//! signatures and refusals; the registry; shadow, promotion, probation and
//! automatic rollback on a live gateway, while no reading is dropped or
//! double-counted across the swaps; the audit log that records it all.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const BUNDLED: &str = "models/artifacts/basicmotions-fcn";

fn outpost() -> Command {
    OutpostBin::host().command()
}

/// Copy the bundled artifact to `dir` as version `version`; `edit` may change
/// the manifest (the weights stay the same).
fn variant(dir: &Path, version: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = workspace().join(BUNDLED);
    std::fs::copy(src.join("model.bpk"), dir.join("model.bpk")).unwrap();
    let mut m: Value =
        serde_json::from_slice(&std::fs::read(src.join("manifest.json")).unwrap()).unwrap();
    m["version"] = version.into();
    edit(&mut m);
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (secret, public) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    run_ok(
        outpost()
            .args(["models", "keygen", "--secret"])
            .arg(&secret)
            .arg("--public")
            .arg(&public),
    );
    (secret, public)
}

fn sign(key: &Path, artifact: &Path) {
    run_ok(
        outpost()
            .args(["models", "sign", "--key"])
            .arg(key)
            .arg(artifact),
    );
}

/// Exit status and stderr+stdout of `outpost models verify`.
fn verify(artifact: &Path, public: &Path) -> (bool, String) {
    let out = outpost()
        .args(["models", "verify"])
        .arg(artifact)
        .arg("--trusted-key")
        .arg(public)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn signatures_are_checked_and_refusals_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(tmp.path(), "publisher");
    let (other_secret, _) = keygen(tmp.path(), "stranger");
    let artifact = variant(&tmp.path().join("m"), "1.1.0", |_| {});

    let (ok, text) = verify(&artifact, &public);
    assert!(!ok, "an unsigned model verifies: {text}");
    assert!(
        text.contains("not signed") || text.contains("unsigned") || text.contains("manifest.sig"),
        "{text}"
    );

    sign(&secret, &artifact);
    let (ok, text) = verify(&artifact, &public);
    assert!(ok, "{text}");
    assert!(text.contains("basicmotions-fcn@1.1.0"), "{text}");

    // A flipped byte in the weights.
    let weights = artifact.join("model.bpk");
    let original = std::fs::read(&weights).unwrap();
    let mut bad = original.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x01;
    std::fs::write(&weights, &bad).unwrap();
    let (ok, text) = verify(&artifact, &public);
    assert!(!ok, "tampered weights verify: {text}");
    assert!(text.contains("model.bpk"), "names the file: {text}");
    std::fs::write(&weights, &original).unwrap();

    // An edited manifest (a threshold, a label...) after signing.
    let manifest = artifact.join("manifest.json");
    let text0 = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text0.replace("Badminton", "Tennis")).unwrap();
    let (ok, text) = verify(&artifact, &public);
    assert!(!ok, "an edited manifest verifies: {text}");
    assert!(text.to_lowercase().contains("signature"), "{text}");
    std::fs::write(&manifest, &text0).unwrap();

    // Signed by a key the operator does not trust.
    sign(&other_secret, &artifact);
    let (ok, text) = verify(&artifact, &public);
    assert!(!ok, "an untrusted signature verifies: {text}");
    assert!(text.to_lowercase().contains("trusted"), "{text}");

    // The gateway refuses to start on it: `outpost check` says why.
    let config = tmp.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[sources]]
type = "simulated"
name = "sim"

[model]
path = "{}"

[governance]
trusted_keys = ["{}"]
"#,
            artifact.display(),
            public.display()
        ),
    )
    .unwrap();
    let out = outpost()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("trusted"), "{err}");
    sign(&secret, &artifact);
    run_ok(outpost().arg("check").arg("--config").arg(&config));
}

/// The BasicMotions test series (label, channel-major values).
fn series() -> Vec<(String, Vec<Vec<f32>>)> {
    load_ts_series(&workspace().join(".cache/datasets/BasicMotions/BasicMotions_TEST.ts"))
}

struct Feed {
    publisher: Publisher,
    next_ts: i64,
    sent: u64,
}

impl Feed {
    /// Publish whole series for sensor `w1`, 100 ms apart, continuing in event time.
    fn publish(&mut self, all: &[(String, Vec<Vec<f32>>)], which: &[usize]) {
        for &i in which {
            let chans = &all[i].1;
            for t in 0..chans[0].len() {
                let values: Vec<f32> = chans.iter().map(|c| c[t]).collect();
                self.publisher
                    .publish("sensors/w1/data", reading("w1", self.next_ts, &values));
                self.next_ts += 100;
                self.sent += 1;
            }
        }
        self.publisher.flush();
    }
}

fn registry_state(config: &Path) -> Value {
    let out = run_ok(
        outpost()
            .args(["models", "list", "--json", "--config"])
            .arg(config),
    );
    serde_json::from_slice(&out).unwrap()
}

fn models(config: &Path, args: &[&str]) -> String {
    let out = run_ok(
        outpost()
            .arg("models")
            .args(args)
            .arg("--config")
            .arg(config),
    );
    String::from_utf8_lossy(&out).to_string()
}

#[test]
fn shadow_promote_probation_and_automatic_rollback_on_a_live_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(tmp.path(), "publisher");
    // 1.1.0: the same network and statistics: agrees with 1.0.0 everywhere.
    let good = variant(&tmp.path().join("good"), "1.1.0", |_| {});
    sign(&secret, &good);
    // 1.2.0: the same weights, but normalization statistics that flatten
    // every input: a broken retraining that passes a file check.
    let broken = variant(&tmp.path().join("broken"), "1.2.0", |m| {
        let std = m["normalization"]["std"].as_array_mut().unwrap();
        for s in std.iter_mut() {
            *s = (s.as_f64().unwrap() * 1000.0).into();
        }
    });
    sign(&secret, &broken);

    let site = Broker::start();
    let cloud = Broker::start();
    let sub = Subscriber::start(cloud.port, "outpost/+/agg/#");
    let registry = tmp.path().join("registry");
    let audit_log = tmp.path().join("audit.log");
    let config_text = format!(
        r#"{}
[windowing]
hop = 10

[uplink]
broker = {{ host = "127.0.0.1", port = {} }}
allow_plaintext = true
topic = "outpost/{{gateway}}/agg/{{group}}"

[governance]
registry_dir = "{}"
trusted_keys = ["{}"]
poll_interval_ms = 100
min_agreement = 0.9
min_inferences = 5
probation_windows = 3

[audit]
path = "{}"
"#,
        site_config("gw-gov", site.port),
        cloud.port,
        registry.display(),
        public.display(),
        audit_log.display()
    );
    let config = tmp.path().join("outpost.toml");
    std::fs::write(&config, &config_text).unwrap();
    let gw = Outpost::run(&config_text);
    gw.wait_subscribed();

    let all = series();
    let t = now_ms() - 20 * 60_000;
    let mut feed = Feed {
        publisher: Publisher::connect(site.port),
        next_ts: t - t.rem_euclid(10_000),
        sent: 0,
    };
    // Classes interleaved: Standing 0-9, Running 10-19, Walking 20-29, Badminton 30-39.
    let mixed = |k: usize| -> Vec<usize> { (0..8).map(|j| (j % 4) * 10 + (k + j) % 10).collect() };

    // Phase 1: the configured model alone.
    feed.publish(&all, &mixed(0));

    // Phase 2: 1.1.0 in shadow.
    run_ok(
        outpost()
            .args(["models", "install"])
            .arg(&good)
            .arg("--config")
            .arg(&config),
    );
    run_ok(
        outpost()
            .args(["models", "install"])
            .arg(&broken)
            .arg("--config")
            .arg(&config),
    );
    models(&config, &["shadow", "basicmotions-fcn@1.1.0"]);
    gw.wait_metric(
        "outpost_model_swaps_total",
        &[],
        1.0,
        Duration::from_secs(20),
    );
    feed.publish(&all, &mixed(1));
    wait_until(
        "aggregates with the shadow's agreement",
        Duration::from_secs(30),
        || {
            sub.json()
                .iter()
                .any(|a| a["shadow"]["model"]["version"] == "1.1.0")
        },
    );
    for a in sub
        .json()
        .iter()
        .filter(|a| a["shadow"]["model"]["version"] == "1.1.0")
    {
        assert_eq!(a["shadow"]["agreement"], 1.0, "identical models agree: {a}");
    }

    // Phase 3: promote; 1.0.0 runs in shadow during the probation, which passes.
    models(&config, &["promote"]);
    gw.wait_metric(
        "outpost_model_swaps_total",
        &[],
        2.0,
        Duration::from_secs(20),
    );
    feed.publish(&all, &mixed(2));
    wait_until("the probation to pass", Duration::from_secs(60), || {
        registry_state(&config)["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["action"] == "probation_passed")
    });
    assert_eq!(registry_state(&config)["active"], "basicmotions-fcn@1.1.0");

    // Phase 4: promote the broken 1.2.0: it disagrees with 1.1.0 and is rolled back.
    // Wait for the model itself, not a swap count: the passed probation
    // drops its shadow with a swap of its own, which may land before or
    // after this point.
    models(&config, &["promote", "basicmotions-fcn@1.2.0"]);
    gw.wait_metric(
        "outpost_model",
        &["version=\"1.2.0\""],
        1.0,
        Duration::from_secs(20),
    );
    feed.publish(&all, &mixed(3));
    wait_until("the automatic rollback", Duration::from_secs(60), || {
        let s = registry_state(&config);
        s["active"] == "basicmotions-fcn@1.1.0"
            && s["history"].as_array().unwrap().iter().any(|h| {
                h["action"] == "rollback"
                    && h["by"] == "auto"
                    && h["model"] == "basicmotions-fcn@1.1.0"
            })
    });
    gw.wait_metric(
        "outpost_model_rollbacks_total",
        &[],
        1.0,
        Duration::from_secs(10),
    );
    feed.publish(&all, &mixed(4));

    // Drain: every reading is counted once, across four model changes.
    let mut gw = gw;
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(30)).success());
    let aggs = sub.json();
    let mut ids = std::collections::BTreeSet::new();
    let readings: u64 = aggs
        .iter()
        .filter(|a| ids.insert(a["id"].as_str().unwrap().to_string()))
        .map(|a| a["readings"].as_u64().unwrap())
        .sum();
    assert_eq!(
        readings, feed.sent,
        "no reading dropped or double-counted across swaps"
    );
    let versions: std::collections::BTreeSet<String> = aggs
        .iter()
        .map(|a| a["model"]["version"].as_str().unwrap().to_string())
        .collect();
    for v in ["1.0.0", "1.1.0", "1.2.0"] {
        assert!(versions.contains(v), "aggregates of {v}: {versions:?}");
    }

    // The audit log holds it all, and verifies.
    let out = run_ok(outpost().args(["audit", "verify", "--log"]).arg(&audit_log));
    assert!(
        String::from_utf8_lossy(&out).contains("ok"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let log = std::fs::read_to_string(&audit_log).unwrap();
    for kind in [
        "\"start\"",
        "\"model_install\"",
        "\"model_shadow\"",
        "\"model_promote\"",
        "\"model_probation_passed\"",
        "\"model_rollback\"",
        "\"model_activated\"",
        "\"aggregate\"",
    ] {
        assert!(log.contains(kind), "audit log has no {kind} entry");
    }
    for a in &aggs {
        assert!(
            log.contains(a["id"].as_str().unwrap()),
            "aggregate {} is not in the audit log",
            a["id"]
        );
    }
    // Any edit shows.
    let edited = log.replacen("basicmotions-fcn@1.2.0", "basicmotions-fcn@1.2.1", 1);
    std::fs::write(&audit_log, edited).unwrap();
    let out = outpost()
        .args(["audit", "verify", "--log"])
        .arg(&audit_log)
        .output()
        .unwrap();
    assert!(!out.status.success(), "an edited audit log verifies");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("line"),
        "says where"
    );
}

/// Run `outpost run` to completion on a config whose simulated source ends.
fn run_to_end(config: &Path, state: &Path) {
    let mut child = outpost()
        .args(["run", "--config"])
        .arg(config)
        .env("STATE_DIRECTORY", state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(
        "outpost to finish its source and exit",
        Duration::from_secs(60),
        || {
            status = child.try_wait().unwrap();
            status.is_some()
        },
    );
    assert!(status.unwrap().success());
}

#[test]
fn a_cut_audit_log_is_kept_as_evidence_and_the_gateway_keeps_running() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("audit").join("audit.log");
    let config = tmp.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[sources]]
type = "simulated"
name = "sim"
limit = 400
realtime = false

[aggregation]
window_ms = 10000

[outbox]
kind = "memory"

[metrics]
enabled = false

[audit]
path = "{}"
"#,
            log.display()
        ),
    )
    .unwrap();
    run_to_end(&config, tmp.path());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"aggregate\""), "{text}");
    run_ok(outpost().args(["audit", "verify", "--log"]).arg(&log));

    // Cut the last two entries, as someone hiding what the gateway did would.
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&log, lines[..lines.len() - 2].join("\n") + "\n").unwrap();
    let out = outpost()
        .args(["audit", "verify", "--log"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("truncated"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The gateway still runs: the cut log is moved aside untouched and a new
    // chain starts by saying so.
    run_to_end(&config, tmp.path());
    let moved: Vec<PathBuf> = std::fs::read_dir(log.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.starts_with("audit.log.corrupt-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(
        std::fs::read_to_string(&moved[0]).unwrap(),
        lines[..lines.len() - 2].join("\n") + "\n",
        "kept as it was"
    );
    let fresh = std::fs::read_to_string(&log).unwrap();
    let first: Value = serde_json::from_str(fresh.lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "audit_restarted");
    assert_eq!(first["seq"], 1);
    let out = run_ok(outpost().args(["audit", "verify", "--log"]).arg(&log));
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("started over"), "verify says so: {out}");
}

#[test]
fn a_version_tampered_in_the_registry_is_refused_by_the_running_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(tmp.path(), "publisher");
    let good = variant(&tmp.path().join("good"), "1.1.0", |_| {});
    sign(&secret, &good);
    let site = Broker::start();
    let registry = tmp.path().join("registry");
    let config_text = format!(
        r#"{}
[governance]
registry_dir = "{}"
trusted_keys = ["{}"]
poll_interval_ms = 100
"#,
        site_config("gw-tamper", site.port),
        registry.display(),
        public.display()
    );
    let config = tmp.path().join("outpost.toml");
    std::fs::write(&config, &config_text).unwrap();
    let gw = Outpost::run(&config_text);
    run_ok(
        outpost()
            .args(["models", "install"])
            .arg(&good)
            .arg("--config")
            .arg(&config),
    );
    // Someone with write access to the gateway's disk swaps a weight byte.
    let weights = registry.join("basicmotions-fcn@1.1.0").join("model.bpk");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n / 3] ^= 0x10;
    std::fs::write(&weights, bytes).unwrap();
    models(&config, &["promote", "basicmotions-fcn@1.1.0"]);
    gw.wait_metric(
        "outpost_model_refused_total",
        &[],
        1.0,
        Duration::from_secs(20),
    );
    wait_until(
        "the registry to name what runs again",
        Duration::from_secs(20),
        || {
            let s = registry_state(&config);
            s["active"].is_null()
                && s["history"].as_array().unwrap().iter().any(|h| {
                    h["action"] == "activation_failed"
                        && h["model"] == "basicmotions-fcn@1.1.0"
                        && h["reason"].as_str().unwrap_or("").contains("model.bpk")
                })
        },
    );
    assert_eq!(
        gw.metric("outpost_model_swaps_total", &[]),
        0.0,
        "nothing was swapped in"
    );
    assert!(
        gw.http("/readyz").starts_with("HTTP/1.1 200"),
        "the gateway runs on"
    );
    assert!(
        gw.metric("outpost_model_info", &["version=\"1.0.0\""]) == 1.0
            || gw.http("/metrics").contains("version=\"1.0.0\""),
        "the configured model still serves"
    );
}

/// The registry on a full disk: an install fails with a clear error and
/// leaves the registry as it was; once there is room again it succeeds.
#[test]
fn a_full_disk_refuses_an_install_cleanly_and_the_registry_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(tmp.path(), "publisher");
    let first = variant(&tmp.path().join("first"), "1.1.0", |_| {});
    sign(&secret, &first);
    let second = variant(&tmp.path().join("second"), "1.2.0", |_| {});
    sign(&secret, &second);
    let fs = SmallFs::mount("1m");
    let config = tmp.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            r#"{}
[governance]
registry_dir = "{}"
trusted_keys = ["{}"]
"#,
            site_config("gw-full-registry", free_port()),
            fs.path.join("registry").display(),
            public.display(),
        ),
    )
    .unwrap();
    let install = |artifact: &Path| {
        outpost()
            .args(["models", "install"])
            .arg(artifact)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let versions = || -> Vec<String> {
        let v = registry_state(&config);
        let text = v.to_string();
        ["1.1.0", "1.2.0"]
            .into_iter()
            .filter(|ver| text.contains(ver))
            .map(String::from)
            .collect()
    };
    assert!(install(&first).status.success());
    assert_eq!(versions(), ["1.1.0"]);
    let filler = fs.fill("filler");
    let out = install(&second);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an install on a full disk failed");
    assert!(
        stderr.contains("No space left on device") && !stderr.contains("panicked"),
        "a clear error: {stderr}"
    );
    assert_eq!(versions(), ["1.1.0"], "the registry as it was");
    std::fs::remove_file(&filler).unwrap();
    let out = install(&second);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(versions(), ["1.1.0", "1.2.0"]);
}
