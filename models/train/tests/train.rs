//! Training is seeded and reproducible: the same seed gives the same curve,
//! normalization and outputs; another seed gives another curve.

use std::path::Path;

use outpost_train::dataset::load_ts;
use outpost_train::train::{TrainConfig, train_classifier};

fn run(seed: u64) -> (Vec<(f64, f64)>, String, Vec<f32>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/datasets/ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts");
    let ds = load_ts(&path).expect("scripts/fetch-datasets.sh fetches ItalyPowerDemand");
    let cfg = TrainConfig {
        epochs: 3,
        seed,
        ..TrainConfig::for_length(ds.length)
    };
    let t = train_classifier(&ds, &cfg, "ipd", "1.0.0", |_| {}).expect("train");
    let curve = t
        .history
        .iter()
        .map(|e| (e.train_loss, e.validation_loss))
        .collect();
    let norm = serde_json::to_string(&t.manifest.normalization).expect("json");
    let dir = tempfile::tempdir().expect("temp dir");
    outpost_models::artifact::save_artifact(dir.path(), t.manifest, &t.network, &[]).expect("save");
    // Compare what the weights compute (the burnpack file also holds random
    // parameter ids, which are not part of the model).
    let model = outpost_models::LoadedModel::load_dir(dir.path(), &burn::tensor::Device::flex())
        .expect("load");
    let n = 8;
    let mut x = ds.x[..n * ds.channels * ds.length].to_vec();
    model.normalize(&mut x);
    let scores = model
        .predict(&x, n)
        .expect("predict")
        .iter()
        .map(|p| p.score)
        .collect();
    (curve, norm, scores)
}

#[test]
fn same_seed_same_model_other_seed_other_curve() {
    let a = run(7);
    let b = run(7);
    assert_eq!(a.0, b.0, "same loss curve");
    assert_eq!(a.1, b.1, "same normalization");
    assert_eq!(a.2, b.2, "same weights: the same outputs, bit for bit");
    let c = run(8);
    assert_ne!(a.0, c.0, "the seed matters");
}
