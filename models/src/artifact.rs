//! Model artifacts: a directory with `manifest.json` and the weights in burn's
//! burnpack format. Loading verifies every hash the manifest lists before any
//! byte of the weights is used.

use std::path::Path;

use burn::module::Module;
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::{Bytes, Device, Tensor, TensorData, activation::softmax};

use crate::arch::Network;
pub use crate::error::ModelError;
pub use crate::files::sha256_hex;
use crate::files::{parse_manifest, read, read_verified_files, verify};
pub use crate::manifest::MANIFEST_FILE;
use crate::manifest::{Manifest, Normalization, Task};

/// The output of the network for one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Winning class (classifiers).
    pub class: Option<usize>,
    /// Winning class probability (classifiers) or anomaly score (detectors).
    pub score: f32,
    /// Whether the score is above the anomaly threshold (detectors).
    pub anomaly: bool,
}

/// A verified, loaded model ready to run on a device.
#[derive(Debug)]
pub struct LoadedModel {
    manifest: Manifest,
    net: Network,
    /// The inference form of `net` ([`crate::fast`]).
    compiled: crate::fast::Compiled,
    device: Device,
}

impl LoadedModel {
    /// Load an artifact directory: parse and check the manifest, verify the
    /// sha256 of every file it lists, then load the weights onto `device`.
    /// No signature is checked: see [`LoadedModel::load_dir_signed`].
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest =
            parse_manifest(&read(&manifest_path)?, &manifest_path.display().to_string())?;
        let weights = read_verified_files(dir, &manifest)?;
        let store = BurnpackStore::from_bytes(Some(Bytes::from_bytes_vec(weights)));
        Self::from_store(manifest, store, device)
    }

    /// Load a signed artifact directory: read manifest.json once, check that
    /// its `manifest.sig` is a valid signature of one of `trusted` over
    /// exactly those bytes, then verify the sha256 of every file and load the
    /// weights onto `device`. Returns the model and the signing key's id.
    ///
    /// Errors: [`ModelError::Signature`] for an unsigned artifact, an
    /// untrusted key or a manifest changed after signing;
    /// [`ModelError::Checksum`] for a file changed after signing.
    pub fn load_dir_signed(
        dir: &Path,
        device: &Device,
        trusted: &[crate::signing::TrustedKey],
    ) -> Result<(Self, String), ModelError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_bytes = read(&manifest_path)?;
        let key_id = crate::signing::verify_manifest_bytes(dir, &manifest_bytes, trusted)?;
        let manifest = parse_manifest(&manifest_bytes, &manifest_path.display().to_string())?;
        let weights = read_verified_files(dir, &manifest)?;
        let store = BurnpackStore::from_bytes(Some(Bytes::from_bytes_vec(weights)));
        Ok((Self::from_store(manifest, store, device)?, key_id))
    }

    /// Load a model compiled into the binary (the bundled default).
    pub fn load_static(
        manifest_json: &'static [u8],
        weights: &'static [u8],
        device: &Device,
    ) -> Result<Self, ModelError> {
        let manifest = parse_manifest(manifest_json, "<embedded>")?;
        verify(&manifest.weights.clone(), weights, &manifest)?;
        Self::from_store(manifest, BurnpackStore::from_static(weights), device)
    }

    fn from_store(
        manifest: Manifest,
        mut store: BurnpackStore,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut net = Network::init(
            &manifest.architecture,
            manifest.input.channels,
            manifest.input.length,
            manifest.outputs(),
            device,
        );
        let applied = net
            .load_from(&mut store)
            .map_err(|e| ModelError::Weights(e.to_string()))?;
        if !applied.missing.is_empty() || !applied.errors.is_empty() {
            return Err(ModelError::Weights(format!(
                "missing tensors {:?}, errors {:?}",
                applied.missing.iter().map(|m| &m.0).collect::<Vec<_>>(),
                applied.errors
            )));
        }
        Ok(Self::from_network(manifest, net, device))
    }

    /// A model from a network already in memory, e.g. freshly initialized
    /// for a benchmark. Nothing is verified: no file, no hash.
    ///
    /// On the CPU the network runs in its compiled form ([`crate::fast`]);
    /// on a GPU as trained, through burn's own kernels, which run it faster
    /// there than the im2col form's many small slices (BENCHMARKS.md, "GPU").
    pub fn from_network(manifest: Manifest, net: Network, device: &Device) -> Self {
        let net = net.valid();
        let compiled = if *device == Device::flex() {
            crate::fast::Compiled::new(&net, device)
        } else {
            crate::fast::Compiled::Plain
        };
        Self {
            manifest,
            net,
            compiled,
            device: device.clone(),
        }
    }

    /// The same model on `device`: the weights copied there and the
    /// inference form rebuilt. `self` stays where it is (the CPU copy a
    /// failing GPU falls back to).
    pub fn to_device(&self, device: &Device) -> Self {
        Self::from_network(
            self.manifest.clone(),
            self.net.clone().to_device(device),
            device,
        )
    }

    /// Run the network once on zeros for each batch size in `sizes` and
    /// wait for the result: the device compiles its kernels and allocates
    /// its buffers now rather than on the first readings.
    pub fn warm_up(&self, sizes: &[usize]) -> Result<(), ModelError> {
        for &n in sizes {
            let zeros = vec![0.0; n * self.window_values()];
            self.outputs(&zeros, n)?;
        }
        Ok(())
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Values per window (`channels × length`).
    pub fn window_values(&self) -> usize {
        self.manifest.input.channels * self.manifest.input.length
    }

    /// Normalize windows in place, as at training time. `windows` holds whole
    /// windows, channel-major (`[n][channels][length]`).
    pub fn normalize(&self, windows: &mut [f32]) {
        normalize(
            &self.manifest.normalization,
            self.manifest.input.channels,
            self.manifest.input.length,
            windows,
        );
    }

    /// Run the network on `n` normalized windows laid out `[n][channels][length]`.
    pub fn predict(&self, windows: &[f32], n: usize) -> Result<Vec<Prediction>, ModelError> {
        let values = self.outputs(windows, n)?;
        Ok(self.predictions(values))
    }

    /// The network's outputs on `n` normalized windows, `[n][outputs]`:
    /// class probabilities (classifiers) or the anomaly score (detectors).
    pub fn outputs(&self, windows: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        self.outputs_via(windows, n, true)
    }

    /// [`LoadedModel::outputs`] through the network as trained (batch norm
    /// apart, flex's own convolution): the benchmark's reference for [`crate::fast`].
    #[doc(hidden)]
    pub fn outputs_unfolded(&self, windows: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        self.outputs_via(windows, n, false)
    }

    fn outputs_via(
        &self,
        windows: &[f32],
        n: usize,
        compiled: bool,
    ) -> Result<Vec<f32>, ModelError> {
        let (c, l) = (self.manifest.input.channels, self.manifest.input.length);
        if windows.len() != n * c * l || n == 0 {
            return Err(ModelError::InputShape {
                actual: windows.len(),
                expected: n * c * l,
                n,
                channels: c,
                length: l,
            });
        }
        let x = Tensor::<3>::from_data(TensorData::new(windows.to_vec(), [n, c, l]), &self.device);
        let out = if compiled {
            self.compiled.forward(&self.net, x)
        } else {
            self.net.forward(x)
        };
        let out = match self.manifest.task {
            Task::Classifier => softmax(out, 1),
            Task::Detector => out,
        };
        out.into_data()
            .try_to_vec_as::<f32>()
            .map_err(|e| ModelError::Backend(format!("{e:?}")))
    }

    /// Turn raw outputs ([`LoadedModel::outputs`]) into predictions.
    fn predictions(&self, values: Vec<f32>) -> Vec<Prediction> {
        let k = self.manifest.outputs();
        values
            .chunks_exact(k)
            .map(|row| match self.manifest.task {
                Task::Classifier => {
                    let (class, score) = argmax(row);
                    Prediction {
                        class: Some(class),
                        score,
                        anomaly: false,
                    }
                }
                Task::Detector => {
                    let score = row[0];
                    Prediction {
                        class: None,
                        score,
                        anomaly: self.manifest.anomaly_threshold.is_some_and(|t| score > t),
                    }
                }
            })
            .collect()
    }
}

/// Index and value of the largest element; the first one on ties. NaN never wins.
fn argmax(row: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best
}

/// Normalize `[n][channels][length]` windows in place.
pub fn normalize(norm: &Normalization, channels: usize, length: usize, windows: &mut [f32]) {
    match norm {
        Normalization::None => {}
        Normalization::PerChannel { mean, std } => {
            for window in windows.chunks_exact_mut(channels * length) {
                for (c, series) in window.chunks_exact_mut(length).enumerate() {
                    let (m, s) = (mean[c], std[c]);
                    series.iter_mut().for_each(|v| *v = (*v - m) / s);
                }
            }
        }
        Normalization::PerWindow => {
            for series in windows.chunks_exact_mut(length) {
                let n = series.len() as f32;
                let m = series.iter().sum::<f32>() / n;
                let var = series.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / n;
                let s = if var > 1e-12 { var.sqrt() } else { 1.0 };
                series.iter_mut().for_each(|v| *v = (*v - m) / s);
            }
        }
    }
}

/// Write an artifact: the network's weights as burnpack, any `extras`
/// (name, bytes) beside them, and a manifest that lists the sha256 of every
/// file. `manifest.files` is filled in here.
pub fn save_artifact(
    dir: &Path,
    mut manifest: Manifest,
    net: &Network,
    extras: &[(&str, &[u8])],
) -> Result<Manifest, ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut store = BurnpackStore::from_bytes(None);
    net.save_into(&mut store)
        .map_err(|e| ModelError::Weights(e.to_string()))?;
    let bytes = store
        .get_bytes()
        .map_err(|e| ModelError::Weights(e.to_string()))?;
    let bytes: Vec<u8> = bytes.to_vec();
    let weights_path = dir.join(&manifest.weights);
    std::fs::write(&weights_path, &bytes).map_err(|source| ModelError::Io {
        path: weights_path,
        source,
    })?;
    manifest.files.clear();
    manifest
        .files
        .insert(manifest.weights.clone(), sha256_hex(&bytes));
    for (name, data) in extras {
        let path = dir.join(name);
        std::fs::write(&path, data).map_err(|source| ModelError::Io { path, source })?;
        manifest.files.insert(name.to_string(), sha256_hex(data));
    }
    let problems = manifest.problems();
    if !problems.is_empty() {
        return Err(ModelError::ManifestInvalid {
            path: dir.display().to_string(),
            problems,
        });
    }
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|source| ModelError::ManifestSyntax {
            path: dir.display().to_string(),
            source,
        })?;
    let manifest_path = dir.join(MANIFEST_FILE);
    std::fs::write(&manifest_path, text + "\n").map_err(|source| ModelError::Io {
        path: manifest_path,
        source,
    })?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_bundled(dir: &Path) {
        for f in ["manifest.json", "model.bpk"] {
            std::fs::copy(Path::new(crate::bundled::DIR).join(f), dir.join(f)).unwrap();
        }
    }

    #[test]
    fn bundled_directory_and_embedded_copy_agree() {
        let dir = tempfile::tempdir().unwrap();
        copy_bundled(dir.path());
        let device = Device::flex();
        let a = LoadedModel::load_dir(dir.path(), &device).unwrap();
        let b =
            LoadedModel::load_static(crate::bundled::MANIFEST, crate::bundled::WEIGHTS, &device)
                .unwrap();
        let mut x: Vec<f32> = (0..1200).map(|i| (i as f32 * 0.37).sin()).collect();
        a.normalize(&mut x);
        assert_eq!(a.predict(&x, 2).unwrap(), b.predict(&x, 2).unwrap());
        assert!(matches!(
            a.predict(&x, 3),
            Err(ModelError::InputShape { .. })
        ));
    }

    #[test]
    fn tampered_weights_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        copy_bundled(dir.path());
        let path = dir.path().join("model.bpk");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let err = LoadedModel::load_dir(dir.path(), &Device::flex()).unwrap_err();
        assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
    }

    #[test]
    fn manifest_problems_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        copy_bundled(dir.path());
        let path = dir.path().join(MANIFEST_FILE);
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        m["version"] = "one".into();
        m["labels"] = serde_json::json!(["only"]);
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        match LoadedModel::load_dir(dir.path(), &Device::flex()) {
            Err(ModelError::ManifestInvalid { problems, .. }) => {
                assert_eq!(problems.len(), 2, "{problems:?}")
            }
            other => panic!("expected ManifestInvalid, got {other:?}"),
        }
    }
}
