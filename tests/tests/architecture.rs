//! The module graph of each crate, drawn from the code by
//! `scripts/module-graph.py`: no import circle anywhere, the foundation of
//! the runtime imports no stage, and docs/ARCHITECTURE.md shows the graph
//! as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use outpost_tests::workspace;

/// The crates' source folders, as docs/ARCHITECTURE.md names them.
const CRATES: [&str; 4] = [
    "runtime/src",
    "models/src",
    "models/train/src",
    "storage/src",
];

/// Modules of the runtime below every stage: they report numbers, read
/// files, talk MQTT or check config; they import no stage.
const FOUNDATION: [&str; 10] = [
    "audit", "check", "clock", "control", "http", "metrics", "mqtt", "sdnotify", "secret", "status",
];

fn graph(src: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("python3")
        .arg(workspace().join("scripts/module-graph.py"))
        .arg(workspace().join(src))
        .args(args)
        .output()
        .expect("python3 runs scripts/module-graph.py (scripts/setup.sh installs it)");
    (
        out.status.success(),
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8(out.stderr).expect("utf-8"),
    )
}

#[test]
fn no_crate_has_an_import_circle() {
    for src in CRATES {
        let (ok, out, err) = graph(src, &[]);
        assert!(ok, "{src} has an import circle:\n{err}\n{out}");
    }
}

#[test]
fn the_runtime_foundation_imports_no_stage() {
    let (_, out, _) = graph("runtime/src", &[]);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in out.lines() {
        // `[layer] module -> a, b`
        let Some((_, rest)) = line.split_once("] ") else {
            continue;
        };
        let (module, to) = rest.split_once(" -> ").expect("module -> deps");
        deps.insert(
            module.to_string(),
            to.split(", ")
                .filter(|d| *d != "-")
                .map(str::to_string)
                .collect(),
        );
    }
    assert!(deps.contains_key("pipeline"), "{out}");
    for (module, to) in &deps {
        if FOUNDATION.contains(&module.as_str()) {
            for d in to {
                assert!(
                    FOUNDATION.contains(&d.as_str()),
                    "{module} (foundation) imports the stage {d}"
                );
            }
        }
    }
}

#[test]
fn architecture_md_shows_the_current_module_graphs() {
    let doc = std::fs::read_to_string(workspace().join("docs/ARCHITECTURE.md")).unwrap();
    for src in CRATES {
        let (_, mermaid, _) = graph(src, &["--mermaid"]);
        assert!(
            doc.contains(&mermaid),
            "docs/ARCHITECTURE.md does not show the module graph of {src} as it is; \
             replace its block with the output of `scripts/module-graph.py {src} --mermaid`:\n{mermaid}"
        );
    }
}

/// The inference thread catches a panic of a model's forward pass so that
/// the batch's readings are still counted and the gateway keeps running
/// (`runtime/src/inference.rs`, tested there with a model that panics).
/// That needs unwinding in what ships: `panic = "abort"` would end the
/// process instead.
#[test]
fn what_ships_unwinds_on_a_panic() {
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let table: toml::Table = toml::from_str(&manifest).unwrap();
    let profiles = table["profile"].as_table().expect("[profile] tables");
    for name in ["release", "dev"] {
        let panic = profiles
            .get(name)
            .and_then(|p| p.get("panic"))
            .and_then(|p| p.as_str())
            .unwrap_or("unwind");
        assert_eq!(panic, "unwind", "[profile.{name}] panic");
    }
}
