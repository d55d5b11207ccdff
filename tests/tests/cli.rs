//! The CLI: `replay` determinism, `check` reporting every problem, `version`.

use std::process::Command;

use outpost_tests::*;

#[test]
fn replay_is_deterministic_and_counts_every_reading() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rec.jsonl");
    let n = write_recording(&input);
    let run = || {
        run_ok(
            Command::new(outpost_bin())
                .args(["replay", "--input"])
                .arg(&input),
        )
    };
    let a = run();
    let b = run();
    assert!(!a.is_empty());
    assert_eq!(a, b, "replay output is byte-identical across runs");
    let aggs: Vec<serde_json::Value> = String::from_utf8(a)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON aggregate per line"))
        .collect();
    let readings: u64 = aggs.iter().map(|a| a["readings"].as_u64().unwrap()).sum();
    assert_eq!(
        readings as usize,
        n - 2,
        "every good reading counted, the two bad ones refused"
    );

    // The same recording from stdin gives the same output.
    let mut child = Command::new(outpost_bin())
        .args(["replay", "--input", "-"])
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(out, run());
}

#[test]
fn check_reports_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        r#"
[gateway]
id = "a/b"
[[sources]]
type = "simulated"
rate_hz = -1
colour = "blue"
[uplink]
broker = { host = "cloud.example", port = 8883 }
[windowing]
hop = 0
"#,
    )
    .unwrap();
    let out = Command::new(outpost_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "gateway.id",
        "sources[0].colour",
        "uplink.broker.tls",
        "windowing.hop",
    ] {
        assert!(err.contains(path), "missing {path} in:\n{err}");
    }

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[sources]]\ntype = \"simulated\"\n").unwrap();
    run_ok(
        Command::new(outpost_bin())
            .args(["check", "--config"])
            .arg(&good),
    );
}

#[test]
fn check_refuses_a_window_that_does_not_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[[sources]]\ntype = \"simulated\"\n[windowing]\nsize = 64\nhop = 32\n",
    )
    .unwrap();
    let out = Command::new(outpost_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("does not match the model's input length 100")
    );
}

#[test]
fn version_names_backend_and_model() {
    let out = Command::new(outpost_bin()).arg("version").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        s.contains("outpost 0.1.0")
            && s.contains("cpu(flex)")
            && s.contains("basicmotions-fcn@1.0.0"),
        "{s}"
    );
}

#[test]
fn run_on_the_embedded_default_logs_aggregates_and_exits_on_sigint() {
    // Simulated source at 10 Hz, 10 s aggregation windows: the first aggregates
    // appear within the first windows; SIGINT drains and exits 0.
    let mut child = Command::new(outpost_bin())
        .arg("run")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let mut saw_aggregate = false;
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200))
            && line.contains("outpost::aggregate")
            && line.contains(&format!(
                "\"schema\":{}",
                outpost::aggregate::AGGREGATE_SCHEMA
            ))
        {
            saw_aggregate = true;
            break;
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(saw_aggregate, "no aggregate logged within 40 s");
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_annotated_example_config_is_valid() {
    let cfg = workspace().join("deploy/examples/full.toml");
    let stdout = run_ok(
        Command::new(outpost_bin())
            .args(["check", "--config"])
            .arg(&cfg),
    );
    assert!(String::from_utf8_lossy(&stdout).contains("5 source(s)"));
}
