//! Quick timing of the compiled (folded) FCN path against the network as
//! trained, for development; the real comparison is `benches/inference.rs`.
use std::time::Instant;

use burn::tensor::Device;
use outpost_models::{LoadedModel, bundled};

fn main() {
    let device = Device::flex();
    let m = LoadedModel::load_static(bundled::MANIFEST, bundled::WEIGHTS, &device).unwrap();
    let batches: Vec<usize> = match std::env::var("FOLD_BATCH") {
        Ok(b) => vec![b.parse().expect("FOLD_BATCH is a number")],
        Err(_) => vec![1, 8, 64, 256],
    };
    let only_compiled = std::env::var("FOLD_ONLY_COMPILED").is_ok();
    for b in batches {
        let x: Vec<f32> = (0..b * 600).map(|i| (i as f32 * 0.37).sin()).collect();
        let time = |f: &dyn Fn()| {
            f();
            let t = Instant::now();
            let mut n = 0;
            while t.elapsed().as_millis() < 400 {
                f();
                n += 1;
            }
            t.elapsed().as_secs_f64() * 1e6 / (n * b) as f64
        };
        let a = if only_compiled {
            0.0
        } else {
            time(&|| {
                std::hint::black_box(m.outputs_unfolded(&x, b).unwrap());
            })
        };
        let c = time(&|| {
            std::hint::black_box(m.outputs(&x, b).unwrap());
        });
        println!(
            "batch {b}: as trained {a:.1} µs/sample, compiled {c:.1} µs/sample, ratio {:.2}",
            a / c
        );
    }
}
