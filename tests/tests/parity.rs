//! `outpost replay` with a trained artifact reproduces `outpost-train eval`
//! window by window: same classes, scores within 1e-5.

use std::process::Command;

use outpost_tests::*;
use serde_json::Value;

#[test]
fn replay_reproduces_eval_predictions() {
    let ws = workspace();
    assert_replay_matches_eval(
        &ws.join("models/artifacts/basicmotions-fcn"),
        &ws.join(".cache/datasets/BasicMotions/BasicMotions_TEST.ts"),
    );
}

/// A feature model: the runtime's windower and `eval` run the same extractors.
#[test]
fn replay_reproduces_eval_predictions_of_a_feature_mlp() {
    let ws = workspace();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mlp");
    run_ok(
        Command::new(bin("outpost-train"))
            .args(["train", "--arch", "mlp", "--epochs", "20", "--dataset"])
            .arg(ws.join(".cache/datasets/BasicMotions/BasicMotions_TRAIN.ts"))
            .arg("--out")
            .arg(&model),
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(model.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["input"]["kind"], "features");
    assert_eq!(manifest["input"]["window"], 100);
    assert_replay_matches_eval(
        &model,
        &ws.join(".cache/datasets/BasicMotions/BasicMotions_TEST.ts"),
    );
}

fn assert_replay_matches_eval(model: &std::path::Path, dataset: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();

    // eval's per-sample predictions.
    let preds = dir.path().join("preds.jsonl");
    run_ok(
        Command::new(bin("outpost-train"))
            .args(["eval", "--model"])
            .arg(model)
            .arg("--dataset")
            .arg(dataset)
            .arg("--predictions")
            .arg(&preds),
    );
    let eval: Vec<Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // The same series as readings: sample i is sensor bm-i, 100 readings at 10 Hz,
    // so each sensor has exactly one window and one inference.
    let series = load_ts_series(dataset);
    assert_eq!(series.len(), eval.len());
    let base = 1_700_000_040_000i64; // aligned to the 60 s aggregation window
    let mut lines = Vec::new();
    for (i, (_, chans)) in series.iter().enumerate() {
        for t in 0..chans[0].len() {
            let values: Vec<f32> = chans.iter().map(|c| c[t]).collect();
            lines.push(reading(
                &format!("bm-{i:02}"),
                base + t as i64 * 100,
                &values,
            ));
        }
    }
    let input = dir.path().join("rec.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let cfg = dir.path().join("replay.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[sources]]\ntype = \"simulated\"\n[model]\npath = {:?}\n[windowing]\nhop = 100\n[aggregation]\nwindow_ms = 60000\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let stdout = run_ok(
        Command::new(outpost_bin())
            .args(["replay", "--config"])
            .arg(&cfg)
            .arg("--input")
            .arg(&input),
    );
    let aggs: Vec<Value> = String::from_utf8(stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(aggs.len(), eval.len(), "one aggregate per sensor");

    for a in &aggs {
        let i: usize = a["group"].as_str().unwrap()["bm-".len()..].parse().unwrap();
        assert_eq!(a["inferences"], 1);
        let class = a["classes"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, n)| n.as_u64() == Some(1))
            .map(|(c, _)| c.clone())
            .unwrap();
        assert_eq!(class, eval[i]["class"].as_str().unwrap(), "sample {i}");
        let replay_score = a["score"]["mean"].as_f64().unwrap();
        let eval_score = eval[i]["score"].as_f64().unwrap();
        assert!(
            (replay_score - eval_score).abs() <= 1e-5,
            "sample {i}: {replay_score} vs {eval_score}"
        );
    }
}
