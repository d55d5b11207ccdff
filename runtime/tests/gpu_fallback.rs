//! The inference thread on a GPU whose device fails mid-stream: the wgpu
//! device is destroyed under it (what a driver reset or a lost device does),
//! and inference carries on on the CPU, in order, without losing a window.
//! A test binary of its own: the destroyed device is shared by the process.
#![cfg(feature = "gpu")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::inference::Inferred;
use outpost::inference::{
    Batching, ModelSet, ModelSlot, ModelSource, Runner, Scratch, infer_batch, load_model,
    spawn_with_ready,
};
use outpost::metrics::Metrics;
use outpost::window::Window;
use outpost_models::device::{self, Preference};

fn window(i: usize) -> Window {
    Window {
        sensor: Arc::from(format!("s{}", i % 3)),
        group: Arc::from("g"),
        start_ms: i as i64,
        end_ms: i as i64 * 10,
        readings: vec![i as i64],
        seqs: Vec::new(),
        data: Some(
            (0..600)
                .map(|k| (((k * (i + 1)) % 17) as f32 - 8.0) / 3.0)
                .collect(),
        ),
    }
}

fn collect(rx: &flume::Receiver<Inferred>, n: usize) -> Vec<Inferred> {
    let deadline = Instant::now() + Duration::from_secs(120);
    (0..n)
        .map(|_| {
            rx.recv_deadline(deadline)
                .expect("a result for every window in time")
        })
        .collect()
}

#[test]
fn a_gpu_that_fails_mid_stream_falls_back_to_the_cpu_without_losing_windows() {
    let runner = Runner::new(Arc::new(
        load_model(&ModelSource::Bundled).expect("the bundled model loads"),
    ));
    let slot = ModelSlot::new(ModelSet {
        active: runner,
        shadow: None,
    });
    let metrics = Arc::new(Metrics::new());
    let (win_tx, win_rx) = flume::bounded(8);
    let (inf_tx, inf_rx) = flume::bounded(8);
    let (handle, ready) = spawn_with_ready(
        slot.clone(),
        win_rx,
        inf_tx,
        Batching {
            max_batch: 4,
            gpu_max_batch: 8,
            max_wait: Some(Duration::from_millis(2)),
            device: Preference::Gpu,
        },
        metrics.clone(),
    )
    .expect("the thread starts");
    ready.blocking_recv().expect("inference reports ready");
    assert_eq!(metrics.model().device, "gpu", "lavapipe at least opens");
    let windows: Vec<Window> = (0..60).map(window).collect();

    // Half on the GPU; a sender thread, since the channels are small.
    let send = |ws: Vec<Window>| {
        let tx = win_tx.clone();
        std::thread::spawn(move || ws.into_iter().for_each(|w| tx.send(w).expect("send")))
    };
    let sender = send(windows[..30].to_vec());
    let mut out = collect(&inf_rx, 30);
    sender.join().unwrap();
    assert_eq!(metrics.device_fallbacks.get(), 0);

    device::gpu(Preference::Gpu)
        .expect("opened above")
        .expect("a GPU")
        .wgpu_device()
        .destroy();

    let sender = send(windows[30..].to_vec());
    out.extend(collect(&inf_rx, 30));
    sender.join().unwrap();
    drop(win_tx);
    handle.join().expect("no panic").expect("no error");

    assert_eq!(metrics.device_fallbacks.get(), 1, "one fallback");
    assert_eq!(metrics.model().device, "cpu");
    assert_eq!(
        metrics.inference_errors.get(),
        0,
        "the failed batch ran again on the CPU"
    );
    assert_eq!(metrics.inferences.get(), 60);
    // Every window once, in order, with the prediction the CPU makes.
    let (cpu, _) = infer_batch(&slot.current(), &windows, &mut Scratch::default()).unwrap();
    assert_eq!(out.len(), 60);
    for (i, (r, c)) in out.iter().zip(&cpu).enumerate() {
        assert_eq!(r.ts_ms, windows[i].end_ms, "in order");
        let (p, q) = (
            r.prediction.as_ref().unwrap(),
            c.prediction.as_ref().unwrap(),
        );
        assert_eq!(p.class, q.class, "window {i}");
        assert!(
            (p.score - q.score).abs() <= 1e-4,
            "window {i}: {} vs {}",
            p.score,
            q.score
        );
    }
}
