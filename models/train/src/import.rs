//! Bring your own weights: a network trained outside Outpost (PyTorch,
//! safetensors) turned into a verified Outpost artifact.

use std::path::Path;

use burn::module::Module;
use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::Device;
use outpost_models::arch::Network;
use outpost_models::artifact::save_artifact;
use outpost_models::{Manifest, ModelError};

/// Bring your own weights: build the network `manifest` describes, load its
/// parameters from a safetensors file written by PyTorch (`state_dict`
/// names; linear weights transposed and batch-norm names mapped by burn's
/// PyTorch adapter), and write a verified Outpost artifact to `out`.
pub fn import_safetensors(
    manifest: Manifest,
    safetensors: &Path,
    out: &Path,
) -> Result<Manifest, ModelError> {
    let device = Device::flex();
    let mut net = Network::init(
        &manifest.architecture,
        manifest.input.channels,
        manifest.input.length,
        manifest.outputs(),
        &device,
    );
    let mut store = SafetensorsStore::from_file(safetensors)
        .with_from_adapter(PyTorchToBurnAdapter)
        .skip_enum_variants(true);
    let applied = net
        .load_from(&mut store)
        .map_err(|e| ModelError::Weights(format!("{}: {e}", safetensors.display())))?;
    if !applied.missing.is_empty() || !applied.errors.is_empty() {
        return Err(ModelError::Weights(format!(
            "{}: missing tensors {:?}, errors {:?} (unused in the file: {:?})",
            safetensors.display(),
            applied.missing.iter().map(|m| &m.0).collect::<Vec<_>>(),
            applied.errors,
            applied.unused
        )));
    }
    save_artifact(out, manifest, &net.valid(), &[])
}
