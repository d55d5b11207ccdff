//! Inference: Outpost's burn CPU backend (flex) against tract running the
//! same weights exported to ONNX (`LoadedModel::to_onnx`), on the bundled FCN
//! and on an MLP, at batch 1, 8, 64 and 256. Both on one core (the bench
//! re-runs itself under `taskset -c 0`), measured in alternating rounds of
//! the same run; reports µs per sample, the ratio burn/tract, the batch
//! where throughput saturates, and the FLOP/s achieved against the core's
//! peak. Also writes the ONNX files to `target/bench/` for the Python peer
//! of the end-to-end benchmark.
//!
//! ```sh
//! cargo bench -p outpost-models --bench inference            # ~1 min
//! cargo bench -p outpost-models --bench inference -- --quick # seconds
//! ```

use std::time::Duration;

use burn::tensor::Device;
use outpost_models::arch::Network;
use outpost_models::bench_support::{max_abs_diff, measure, windows};
use outpost_models::manifest::{Architecture, InputKind};
use outpost_models::{LoadedModel, Manifest, bundled};
use tract_onnx::prelude::*;

const BATCHES: [usize; 4] = [1, 8, 64, 256];

type Runnable = std::sync::Arc<TypedRunnableModel>;

fn tract_model(onnx: &[u8], batch: usize, c: usize, l: usize) -> Runnable {
    tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(onnx))
        .expect("tract reads the exported ONNX")
        .with_input_fact(0, f32::fact([batch, c, l]).into())
        .expect("input fact")
        .into_optimized()
        .expect("tract optimizes the graph")
        .into_runnable()
        .expect("runnable")
}

fn tract_outputs(m: &Runnable, x: &[f32], batch: usize, c: usize, l: usize) -> Vec<f32> {
    let input = Tensor::from_shape(&[batch, c, l], x).expect("input tensor");
    let out = m.run(tvec!(input.into_tvalue())).expect("tract runs");
    out[0]
        .try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>())
        .expect("f32 output")
        .to_vec()
}

/// FLOPs of one window through the network (multiply-adds count 2).
fn flops(m: &Manifest) -> f64 {
    let (c, l, k) = (m.input.channels, m.input.length, m.outputs());
    match &m.architecture {
        Architecture::Fcn { filters, kernels } => {
            let mut cin = c;
            let mut f = 0.0;
            for (&out, &ker) in filters.iter().zip(kernels) {
                // conv, then batch norm and ReLU (3 per value)
                f += (2 * cin * out * ker * l + 3 * out * l) as f64;
                cin = out;
            }
            f + (cin * l) as f64 + (2 * cin * k) as f64
        }
        Architecture::Mlp { hidden } => {
            let mut din = c * l;
            let mut f = 0.0;
            for &h in hidden {
                f += (2 * din * h + h) as f64;
                din = h;
            }
            f + (2 * din * k) as f64
        }
        Architecture::Autoencoder { .. } => f64::NAN,
    }
}

/// This core's fp32 peak, from /proc/cpuinfo: the nominal clock × FLOP per
/// cycle: 64 with AVX-512 (two 512-bit FMA pipes: Zen 5, Xeon server cores),
/// 32 with AVX2+FMA (two 256-bit pipes), else 8. An assumption, stated in the
/// output: a Zen 4 core has AVX-512 on 256-bit pipes (32), and a core
/// boosting above its nominal clock can exceed 100 %.
fn peak_flops() -> (f64, String) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let mhz: f64 = field("cpu MHz").parse().unwrap_or(0.0);
    let flags = field("flags");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let per_cycle = if has("avx512f") {
        64.0
    } else if has("avx2") && has("fma") {
        32.0
    } else {
        8.0
    };
    (
        mhz * 1e6 * per_cycle,
        format!(
            "{} at {mhz:.0} MHz, {per_cycle} fp32 FLOP/cycle assumed",
            field("model name")
        ),
    )
}

fn mlp(device: &Device) -> LoadedModel {
    let mut manifest: Manifest =
        serde_json::from_slice(bundled::MANIFEST).expect("the bundled manifest parses");
    manifest.name = "bench-mlp".into();
    manifest.architecture = Architecture::Mlp {
        hidden: vec![256, 128],
    };
    assert_eq!(manifest.input.kind, InputKind::Raw);
    let net = Network::init(
        &manifest.architecture,
        manifest.input.channels,
        manifest.input.length,
        manifest.outputs(),
        device,
    );
    LoadedModel::from_network(manifest, net, device)
}

fn main() {
    outpost_models::bench_support::pin_to_one_core();
    let quick = std::env::args().any(|a| a == "--quick");
    let (round, rounds) = if quick {
        (Duration::from_millis(20), 3)
    } else {
        (Duration::from_millis(150), 7)
    };
    let device = Device::flex();
    let (peak, cpu) = peak_flops();
    println!(
        "# Inference: burn 0.22.1 (flex, CPU) vs tract 0.23.9 on the same ONNX weights, one core"
    );
    println!("# {cpu}: peak {:.1} GFLOP/s per core", peak / 1e9);
    let out_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out_dir);
    let fcn = LoadedModel::load_static(bundled::MANIFEST, bundled::WEIGHTS, &device)
        .expect("the bundled model loads");
    for model in [fcn, mlp(&device)] {
        let m = model.manifest().clone();
        let (c, l) = (m.input.channels, m.input.length);
        let onnx = model.to_onnx().expect("exportable");
        let _ = std::fs::write(out_dir.join(format!("{}.onnx", m.name)), &onnx);
        let f = flops(&m);
        println!();
        println!(
            "## {} ({:?}), {:.2} MFLOP per window",
            m.name,
            m.architecture,
            f / 1e6
        );
        println!(
            "| batch | burn µs/sample | tract µs/sample | burn / tract | burn GFLOP/s (% peak) | tract GFLOP/s (% peak) | max |Δ output| | burn as trained µs/sample (same run) | as trained / compiled |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut per_sample = Vec::new();
        for b in BATCHES {
            let x = windows(b * c * l);
            let tract = tract_model(&onnx, b, c, l);
            let ours = model.outputs(&x, b).expect("burn runs");
            let theirs = tract_outputs(&tract, &x, b, c, l);
            let diff = max_abs_diff(&ours, &theirs);
            let (tb, tt) = measure(
                round,
                rounds,
                || {
                    std::hint::black_box(model.outputs(&x, b).expect("burn runs"));
                },
                || {
                    std::hint::black_box(tract_outputs(&tract, &x, b, c, l));
                },
            );
            // The network as trained (no folding, flex's own convolution),
            // against the compiled form, in alternating rounds too.
            let (t_unfolded, t_compiled) = measure(
                round,
                rounds,
                || {
                    std::hint::black_box(model.outputs_unfolded(&x, b).expect("burn runs"));
                },
                || {
                    std::hint::black_box(model.outputs(&x, b).expect("burn runs"));
                },
            );
            let (ub, ut) = (tb * 1e6 / b as f64, tt * 1e6 / b as f64);
            let gb = f * b as f64 / tb;
            let gt = f * b as f64 / tt;
            per_sample.push((b, ub, ut));
            println!(
                "| {b} | {ub:.1} | {ut:.1} | {:.2}× | {:.2} ({:.1} %) | {:.2} ({:.1} %) | {diff:.1e} | {:.1} | {:.2}× |",
                ub / ut,
                gb / 1e9,
                100.0 * gb / peak,
                gt / 1e9,
                100.0 * gt / peak,
                t_unfolded * 1e6 / b as f64,
                t_unfolded / t_compiled
            );
        }
        // Saturation: the smallest batch within 10 % of the best µs/sample.
        for (name, pick) in [("burn", 1usize), ("tract", 2)] {
            let value = |t: &(usize, f64, f64)| if pick == 1 { t.1 } else { t.2 };
            let best = per_sample.iter().map(value).fold(f64::INFINITY, f64::min);
            let sat = per_sample
                .iter()
                .find(|t| value(t) <= best * 1.1)
                .map_or(0, |t| t.0);
            println!(
                "{name}: throughput saturates at batch {sat} (within 10 % of its best, {best:.1} µs/sample)"
            );
        }
    }
}
