//! The imported ONNX model computes what the exporter's reference computes.

use burn::tensor::Device;
use outpost_onnx_example::{CHANNELS, CLASSES, LENGTH, PredictError, TcnClassifier};

#[test]
fn imported_model_matches_the_reference_within_1e_4() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/model/reference.json"))
            .expect("reference.json is committed beside tcn.onnx");
    let reference: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let inputs = reference["inputs"].as_array().expect("inputs");
    let expected = reference["probabilities"]
        .as_array()
        .expect("probabilities");
    assert_eq!(inputs.len(), expected.len());
    let mut flat = Vec::new();
    for window in inputs {
        let rows = window.as_array().expect("channels");
        assert_eq!(rows.len(), CHANNELS);
        for row in rows {
            let row = row.as_array().expect("samples");
            assert_eq!(row.len(), LENGTH);
            flat.extend(row.iter().map(|v| v.as_f64().expect("number") as f32));
        }
    }
    let model = TcnClassifier::new(&Device::flex());
    let got = model.predict(&flat).expect("predict");
    assert_eq!(got.len(), expected.len());
    let mut max_diff = 0f32;
    for (g, e) in got.iter().zip(expected) {
        let e = e.as_array().expect("row");
        assert_eq!(g.len(), CLASSES);
        assert_eq!(e.len(), CLASSES);
        for (a, b) in g.iter().zip(e) {
            max_diff = max_diff.max((a - b.as_f64().expect("number") as f32).abs());
        }
    }
    assert!(max_diff < 1e-4, "largest difference {max_diff}");
    // The reference inputs are not degenerate: the model tells them apart.
    assert!(got.windows(2).any(|w| w[0] != w[1]));
}

#[test]
fn a_partial_window_is_refused() {
    let model = TcnClassifier::new(&Device::flex());
    assert_eq!(
        model.predict(&[0.0; 7]),
        Err(PredictError::Shape(7)),
        "7 values are not a window"
    );
}
