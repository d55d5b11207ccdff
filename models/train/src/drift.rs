//! Drift reference statistics of a model over a dataset: what
//! `outpost-train` stores in a manifest ([`outpost_models::drift`] computes
//! them from model inputs and stores them; this prepares a dataset's samples
//! as the runtime prepares its windows).

use outpost_models::drift::{Reference, reference_from};
use outpost_models::{LoadedModel, ModelError};

use crate::dataset::Dataset;
use crate::predict::model_dataset;

/// The reference of `model` over every sample of `ds`, prepared as at
/// inference (features extracted for feature models, then normalized as the
/// manifest says).
pub fn reference_for_dataset(model: &LoadedModel, ds: &Dataset) -> Result<Reference, ModelError> {
    if ds.is_empty() {
        return Err(ModelError::Data(format!(
            "{}: no sample to compute a reference on",
            ds.name
        )));
    }
    let input = model_dataset(model, ds)?;
    let spec = &model.manifest().input;
    if (input.channels, input.length) != (spec.channels, spec.length) {
        return Err(ModelError::Data(format!(
            "{}: the data gives {}×{} model inputs, the model reads {}×{}",
            ds.name, input.channels, input.length, spec.channels, spec.length
        )));
    }
    let mut x = input.x.clone();
    model.normalize(&mut x);
    reference_from(model, &x, input.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_models::drift::{DriftCounts, DriftStats, input_summary, store_reference};

    #[test]
    fn stored_reference_keeps_the_artifact_loadable() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["manifest.json", "model.bpk"] {
            std::fs::copy(
                std::path::Path::new(outpost_models::bundled::DIR).join(f),
                dir.path().join(f),
            )
            .unwrap();
        }
        let device = burn::tensor::Device::flex();
        let model = LoadedModel::load_dir(dir.path(), &device).unwrap();
        let ds = Dataset {
            name: "synthetic".into(),
            channels: 6,
            length: 100,
            labels: vec!["a".into()],
            channel_names: Vec::new(),
            x: (0..12 * 600).map(|i| (i as f32 * 0.11).cos()).collect(),
            y: vec![0; 12],
        };
        let r = reference_for_dataset(&model, &ds).unwrap();
        assert_eq!(r.samples, 12);
        let weights = std::fs::read(dir.path().join("model.bpk")).unwrap();
        let stored = store_reference(dir.path(), r.clone()).unwrap();
        assert_eq!(stored.reference.as_ref(), Some(&r));
        let reloaded = LoadedModel::load_dir(dir.path(), &device).unwrap();
        assert_eq!(reloaded.manifest().reference.as_ref(), Some(&r));
        assert_eq!(
            std::fs::read(dir.path().join("model.bpk")).unwrap(),
            weights
        );
        // Everything but the reference is unchanged.
        let mut without = reloaded.manifest().clone();
        without.reference = None;
        let mut original = model.manifest().clone();
        original.reference = None;
        assert_eq!(without, original);
        // Data that does not fit the model is refused with a clear error.
        let short = Dataset {
            length: 50,
            x: ds.x[..12 * 300].to_vec(),
            ..ds
        };
        let err = reference_for_dataset(&model, &short).unwrap_err();
        assert!(err.to_string().contains("6×50"), "{err}");
    }

    /// PSI of every summary value and of the score of `ds` against `r`.
    fn psi_against(model: &LoadedModel, r: &Reference, ds: &Dataset) -> DriftStats {
        let mut x = ds.x.clone();
        model.normalize(&mut x);
        let preds = model.predict(&x, ds.len()).unwrap();
        let mut counts = DriftCounts::new(r.clone());
        for (window, p) in x.chunks_exact(model.window_values()).zip(&preds) {
            counts.add(&input_summary(model.manifest(), window), p.score);
        }
        counts.stats()
    }

    #[test]
    fn bundled_manifest_carries_the_training_reference() {
        let device = burn::tensor::Device::flex();
        let model = LoadedModel::load_static(
            outpost_models::bundled::MANIFEST,
            outpost_models::bundled::WEIGHTS,
            &device,
        )
        .unwrap();
        let r = model
            .manifest()
            .reference
            .clone()
            .expect("the bundled manifest has a reference (outpost-train reference)");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/datasets");
        let path = dir.join("BasicMotions/BasicMotions_TRAIN.ts");
        assert!(
            path.is_file(),
            "{} is missing: run scripts/fetch-datasets.sh first",
            path.display()
        );
        let train = crate::dataset::load_ts(&path).unwrap();
        assert_eq!(r.samples, train.len());
        // The training split against its own reference: no drift at all.
        let s = psi_against(&model, &r, &train);
        assert!(s.max_feature_psi < 1e-9 && s.score < 1e-9, "{s:?}");
    }
}
