//! A loaded model over a dataset: what its network reads from the data
//! ([`model_dataset`]) and its predictions for every sample
//! ([`predict_dataset`]), prepared as the runtime prepares its windows.

use std::borrow::Cow;

use outpost_models::manifest::InputKind;
use outpost_models::{LoadedModel, ModelError, Prediction};

use crate::dataset::Dataset;

/// Predictions for every sample of a dataset (normalized as the model says),
/// in batches of 64.
pub fn predict_dataset(model: &LoadedModel, ds: &Dataset) -> Result<Vec<Prediction>, ModelError> {
    let ds = model_dataset(model, ds)?;
    let ds = ds.as_ref();
    let per = ds.channels * ds.length;
    let mut out = Vec::with_capacity(ds.len());
    for start in (0..ds.len()).step_by(64) {
        let end = (start + 64).min(ds.len());
        let mut x = ds.x[start * per..end * per].to_vec();
        model.normalize(&mut x);
        out.extend(model.predict(&x, end - start)?);
    }
    Ok(out)
}

/// What the network of `model` reads from `ds`, not yet normalized: `ds`
/// itself for raw models, its feature vectors for feature models (the same
/// extractors as the runtime's windower).
pub fn model_dataset<'a>(
    model: &LoadedModel,
    ds: &'a Dataset,
) -> Result<Cow<'a, Dataset>, ModelError> {
    let input = &model.manifest().input;
    match input.kind {
        InputKind::Raw => Ok(Cow::Borrowed(ds)),
        InputKind::Features => {
            if let Some(w) = input.window.filter(|&w| w != ds.length) {
                return Err(ModelError::Data(format!(
                    "the model's features were computed over {w}-sample windows, the data has {}",
                    ds.length
                )));
            }
            crate::features::dataset_features(ds, &input.features)
                .map(Cow::Owned)
                .map_err(ModelError::Data)
        }
    }
}
