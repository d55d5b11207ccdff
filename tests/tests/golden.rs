//! `outpost replay` is pinned byte for byte: the aggregates of a fixed
//! recording, under fixed configurations, must equal the golden files in
//! `tests/golden/`. They were made by the gateway as it was before the stages
//! were reorganised (issue 17), so a refactoring that changes what leaves the
//! gateway fails here.
//!
//! To change a golden file on purpose (a new aggregate field, a different
//! model), run `OUTPOST_BLESS=1 cargo test --test golden` and review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_tests::*;

/// Replay the recording of [`write_recording`] under `config` (`None`: the
/// embedded default) and compare with (or, blessing, write) `golden`.
fn check(name: &str, config: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rec.jsonl");
    write_recording(&input);
    let key = dir.path().join("pseudonym.key");
    std::fs::write(
        &key,
        "golden-1:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    let mut cmd = Command::new(outpost_bin());
    cmd.args(["replay", "--input"]).arg(&input);
    if let Some(c) = config {
        let path = dir.path().join("replay.toml");
        let text = c.replace("@KEY@", &key.display().to_string());
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(&path);
    }
    let out = run_ok(&mut cmd);
    let golden = golden_dir().join(format!("{name}.jsonl"));
    if std::env::var_os("OUTPOST_BLESS").is_some() {
        // Blessing writes instead of comparing: never in CI, where it
        // would pass whatever the output is.
        assert!(
            std::env::var_os("CI").is_none(),
            "OUTPOST_BLESS is for a developer's machine, not CI"
        );
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&golden, &out).unwrap();
        return;
    }
    let want = std::fs::read(&golden)
        .unwrap_or_else(|e| panic!("{}: {e} (OUTPOST_BLESS=1 makes it)", golden.display()));
    if out != want {
        let got = String::from_utf8_lossy(&out);
        let want = String::from_utf8_lossy(&want);
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "replay output differs from {} ({} lines vs {} golden), first at line {}:\n got:  {}\n want: {}",
            golden.display(),
            got.lines().count(),
            want.lines().count(),
            first + 1,
            got.lines().nth(first).unwrap_or("<end>"),
            want.lines().nth(first).unwrap_or("<end>"),
        );
    }
}

fn golden_dir() -> PathBuf {
    workspace().join("tests/golden")
}

#[test]
fn replay_on_the_embedded_default_matches_the_golden_file() {
    check("default", None);
}

#[test]
fn replay_with_pseudonymized_sensors_matches_the_golden_file() {
    check(
        "pseudonymized",
        Some(
            r#"
[gateway]
id = "gw-golden"

[[sources]]
type = "simulated"

[aggregation]
window_ms = 10000
allowed_lateness_ms = 0
group_by = "sensor"

[privacy]
policy_version = "golden-1"
pseudonymize_sensor = true
key = { file = "@KEY@" }

[outbox]
kind = "memory"

[audit]
enabled = false

[governance]
enabled = false
"#,
        ),
    );
}

#[test]
fn golden_files_exist() {
    for name in ["default", "pseudonymized"] {
        assert!(
            Path::new(&golden_dir().join(format!("{name}.jsonl"))).is_file(),
            "{name}"
        );
    }
}
