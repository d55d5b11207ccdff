//! Feature vectors of a whole dataset, for feature models (MLP): the same
//! extractors ([`outpost_models::features::Extractor`]) as the runtime's
//! windower, so a model sees the same numbers in training and at run time.

use outpost_models::features::Extractor;

use crate::dataset::Dataset;

/// The feature vectors of every sample of `ds`: a dataset of
/// `channels × width` channels of length 1, same labels. The trainer and
/// `eval` use this, and the runtime's windower calls the same [`Extractor`].
pub fn dataset_features(ds: &Dataset, names: &[String]) -> Result<Dataset, String> {
    let mut ex = Extractor::new(names, ds.length)?;
    let mut x = Vec::with_capacity(ds.len() * ds.channels * ex.width());
    for i in 0..ds.len() {
        ex.extract(ds.sample(i), &mut x);
    }
    Ok(Dataset {
        name: ds.name.clone(),
        channels: ds.channels * ex.width(),
        length: 1,
        labels: ds.labels.clone(),
        channel_names: Vec::new(),
        x,
        y: ds.y.clone(),
    })
}
