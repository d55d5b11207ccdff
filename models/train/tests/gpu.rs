//! The GPU backend (burn's wgpu) against the CPU backend (flex): the same
//! outputs within 1e-4. In CI the GPU is Mesa's lavapipe, a software Vulkan
//! device that `scripts/setup.sh` installs (`mesa-vulkan-drivers`); on a
//! machine with a GPU the same tests run on it. Without any adapter they
//! fail: a GPU build that cannot reach a GPU is what they are there to catch.
#![cfg(feature = "gpu")]

use burn::tensor::Device;
use outpost_models::arch::Network;
use outpost_models::bench_support::windows;
use outpost_models::device::{self, Preference};
use outpost_models::manifest::Architecture;
use outpost_models::{LoadedModel, Manifest, bundled};
use outpost_train::dataset::load_ts;

fn gpu() -> device::Gpu {
    device::gpu(Preference::Gpu)
        .expect("a GPU adapter opens (lavapipe: scripts/setup.sh installs mesa-vulkan-drivers)")
        .expect("the `gpu` preference gives a GPU or an error")
}

/// The largest |cpu - gpu| over `n` windows `x`, after checking lengths.
fn max_diff(cpu: &LoadedModel, on_gpu: &LoadedModel, x: &[f32], n: usize) -> f32 {
    let a = cpu.outputs(x, n).expect("the CPU runs");
    let b = on_gpu.outputs(x, n).expect("the GPU runs");
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()), "{a:?}");
    a.iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs() / (1.0 + p.abs()))
        .fold(0f32, f32::max)
}

#[test]
fn the_bundled_model_on_the_gpu_matches_the_cpu_on_basicmotions() {
    let cpu = LoadedModel::load_static(bundled::MANIFEST, bundled::WEIGHTS, &Device::flex())
        .expect("the bundled model loads");
    let g = gpu();
    let on_gpu = cpu.to_device(&g.device);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/datasets/BasicMotions/BasicMotions_TEST.ts");
    let ds = load_ts(&path).expect("BasicMotions (scripts/fetch-datasets.sh)");
    let mut x = ds.x.clone();
    cpu.normalize(&mut x);
    // All 40 test recordings in one batch, then batches of 1 and 7.
    let n = ds.len();
    let d = max_diff(&cpu, &on_gpu, &x, n);
    assert!(d <= 1e-4, "{}: max difference {d:e}", g.adapter);
    let per = cpu.window_values();
    for b in [1, 7] {
        let d = max_diff(&cpu, &on_gpu, &x[..b * per], b);
        assert!(d <= 1e-4, "batch {b}: max difference {d:e}");
    }
    // The same classes.
    let pa = cpu.predict(&x, n).unwrap();
    let pb = on_gpu.predict(&x, n).unwrap();
    let classes = |p: &[outpost_models::Prediction]| p.iter().map(|p| p.class).collect::<Vec<_>>();
    assert_eq!(classes(&pa), classes(&pb));
}

#[test]
fn every_architecture_on_the_gpu_matches_the_cpu() {
    let g = gpu();
    let base: Manifest = serde_json::from_slice(bundled::MANIFEST).unwrap();
    for arch in [
        Architecture::Fcn {
            filters: vec![16, 32, 16],
            kernels: vec![8, 5, 3],
        },
        Architecture::Mlp {
            hidden: vec![64, 32],
        },
        Architecture::Autoencoder {
            channels: vec![8, 4],
            kernel: 5,
        },
    ] {
        let mut m = base.clone();
        m.architecture = arch.clone();
        if matches!(arch, Architecture::Autoencoder { .. }) {
            m.task = outpost_models::manifest::Task::Detector;
            m.labels = Vec::new();
            m.anomaly_threshold = Some(1.0);
        }
        let (c, l) = (m.input.channels, m.input.length);
        let net = Network::init(&m.architecture, c, l, m.outputs(), &Device::flex());
        let cpu = LoadedModel::from_network(m, net, &Device::flex());
        let on_gpu = cpu.to_device(&g.device);
        for n in [1, 16] {
            let x = windows(n * c * l);
            let d = max_diff(&cpu, &on_gpu, &x, n);
            assert!(d <= 1e-4, "{arch:?}, batch {n}: max difference {d:e}");
        }
    }
}

#[test]
fn auto_takes_only_a_hardware_adapter() {
    let adapters = device::adapters();
    assert!(
        !adapters.is_empty(),
        "no adapter at all: is lavapipe installed?"
    );
    let hardware = adapters.iter().any(|a| !a.software);
    match device::gpu(Preference::Auto).expect("auto never fails for lack of an adapter") {
        Some(g) => {
            assert!(
                hardware,
                "auto opened {} though all adapters are software",
                g.adapter
            );
            assert!(!g.adapter.software);
        }
        None => assert!(!hardware, "auto left the hardware GPU unused: {adapters:?}"),
    }
    assert!(device::gpu(Preference::Cpu).unwrap().is_none());
}
