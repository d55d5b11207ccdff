//! Replays every committed fuzz input through the fuzz targets' entry
//! points: `fuzz/corpus/<target>/` (the minimized corpora) and
//! `fuzz/regressions/<target>/` (every crash found, kept after its fix).
//! Stable Rust, no libFuzzer: part of the ordinary `cargo test --workspace`.
//! Fails on a panic in any input, and when a target has no corpus (a replay
//! that finds nothing to replay must not pass). See docs/fuzzing.md.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Each input through `entry`, each in its own catch so that every
/// panicking input is named, not just the first.
fn replay(target: &str, entry: outpost_fuzz_entry::Entry) -> (usize, Vec<String>) {
    let root = fuzz_dir();
    let corpus = files(&root.join("corpus").join(target));
    let regressions = files(&root.join("regressions").join(target));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("a readable corpus file");
        if std::panic::catch_unwind(|| entry(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    (corpus.len(), failed)
}

#[test]
fn every_fuzz_target_has_a_target_file_and_a_corpus_and_no_input_panics() {
    let root = fuzz_dir();
    let mut problems = Vec::new();
    for (target, entry) in outpost_fuzz_entry::TARGETS {
        let src = root.join("fuzz_targets").join(format!("{target}.rs"));
        if !src.is_file() {
            problems.push(format!("{target}: no fuzz target {}", src.display()));
        }
        let (n, failed) = replay(target, *entry);
        if n == 0 {
            problems.push(format!(
                "{target}: fuzz/corpus/{target}/ is missing or empty"
            ));
        }
        for f in failed {
            problems.push(format!("{target}: panicked on {f}"));
        }
        eprintln!("{target}: {n} corpus inputs replayed");
    }
    outpost_fuzz_entry::remove_scratch();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every target directory in fuzz/fuzz_targets is listed in TARGETS (a
/// target added there without an entry here would never be replayed).
#[test]
fn every_fuzz_target_file_is_replayed() {
    let listed: Vec<&str> = outpost_fuzz_entry::TARGETS.iter().map(|t| t.0).collect();
    for f in files(&fuzz_dir().join("fuzz_targets")) {
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        assert!(
            listed.contains(&name),
            "fuzz target {name} is not in TARGETS"
        );
    }
}
