//! Bring your own weights: a network built and exported outside Outpost
//! (models/train/examples/byow/export_fcn.py, safetensors with PyTorch names) is
//! imported, and Outpost's predictions match the exporter's within 1e-4.

use std::path::Path;
use std::process::Command;

use burn::tensor::Device;
use outpost_models::LoadedModel;
use outpost_train::import::import_safetensors;

#[test]
fn safetensors_from_pytorch_names_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/byow/export_fcn.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .status()
        .expect("python3 runs");
    assert!(status.success());
    let manifest =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    let out = dir.path().join("artifact");
    import_safetensors(manifest, &dir.path().join("model.safetensors"), &out).unwrap();
    let model = LoadedModel::load_dir(&out, &Device::flex()).unwrap();

    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("reference.json")).unwrap()).unwrap();
    let inputs = reference["inputs"].as_array().unwrap();
    let probs = reference["probabilities"].as_array().unwrap();
    let mut x = Vec::new();
    for input in inputs {
        for channel in input.as_array().unwrap() {
            x.extend(
                channel
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32),
            );
        }
    }
    model.normalize(&mut x);
    let preds = model.predict(&x, inputs.len()).unwrap();
    for (p, want) in preds.iter().zip(probs) {
        let want: Vec<f64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let (best, best_p) = want
            .iter()
            .enumerate()
            .fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        assert_eq!(p.class, Some(best));
        assert!(
            (p.score as f64 - best_p).abs() < 1e-4,
            "{} vs {best_p}",
            p.score
        );
    }
}
