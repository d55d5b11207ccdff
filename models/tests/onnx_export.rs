//! The ONNX export computes what burn computes: the bundled FCN and an MLP,
//! exported with `LoadedModel::to_onnx` and run by tract, give burn's
//! outputs within 1e-4 on the same windows. A broken export (a transposed
//! weight, a wrong padding) fails here, not in a benchmark.

use burn::tensor::Device;
use outpost_models::arch::Network;
use outpost_models::bench_support::max_abs_diff;
use outpost_models::manifest::Architecture;
use outpost_models::{LoadedModel, Manifest, bundled};
use tract_onnx::prelude::*;

fn windows(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
        .collect()
}

fn max_diff_with_tract(model: &LoadedModel, batch: usize) -> f32 {
    let m = model.manifest();
    let (c, l) = (m.input.channels, m.input.length);
    let onnx = model.to_onnx().expect("exportable");
    let tract = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(onnx))
        .expect("tract reads the export")
        .with_input_fact(0, f32::fact([batch, c, l]).into())
        .unwrap()
        .into_optimized()
        .expect("tract optimizes it")
        .into_runnable()
        .unwrap();
    let x = windows(batch * c * l);
    let ours = model.outputs(&x, batch).unwrap();
    let input = Tensor::from_shape(&[batch, c, l], &x).unwrap();
    let out = tract.run(tvec!(input.into_tvalue())).unwrap();
    let theirs = out[0]
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap();
    assert_eq!(ours.len(), batch * m.outputs());
    max_abs_diff(&ours, theirs)
}

#[test]
fn the_bundled_fcn_exported_runs_the_same_in_tract() {
    let model =
        LoadedModel::load_static(bundled::MANIFEST, bundled::WEIGHTS, &Device::flex()).unwrap();
    for batch in [1, 8] {
        let d = max_diff_with_tract(&model, batch);
        assert!(d < 1e-4, "batch {batch}: max |burn - tract| = {d}");
    }
}

#[test]
fn an_mlp_exported_runs_the_same_in_tract() {
    let device = Device::flex();
    let mut manifest: Manifest = serde_json::from_slice(bundled::MANIFEST).unwrap();
    manifest.architecture = Architecture::Mlp {
        hidden: vec![64, 32],
    };
    let net = Network::init(
        &manifest.architecture,
        manifest.input.channels,
        manifest.input.length,
        manifest.outputs(),
        &device,
    );
    let model = LoadedModel::from_network(manifest, net, &device);
    let d = max_diff_with_tract(&model, 4);
    assert!(d < 1e-4, "max |burn - tract| = {d}");
}

#[test]
fn the_autoencoder_is_refused_with_a_clear_error() {
    let device = Device::flex();
    let mut manifest: Manifest = serde_json::from_slice(bundled::MANIFEST).unwrap();
    manifest.architecture = Architecture::Autoencoder {
        channels: vec![8],
        kernel: 3,
    };
    let net = Network::init(&manifest.architecture, 6, 100, 1, &device);
    let err = LoadedModel::from_network(manifest, net, &device)
        .to_onnx()
        .unwrap_err();
    assert!(err.to_string().contains("autoencoder"), "{err}");
}
