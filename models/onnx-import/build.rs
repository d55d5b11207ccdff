//! Generate Burn code for `model/tcn.onnx` at build time: a `Model` struct
//! with a typed `forward`, its weights embedded in the crate as Burnpack.

use burn_onnx::{LoadStrategy, ModelGen};

fn main() {
    println!("cargo:rerun-if-changed=model/tcn.onnx");
    ModelGen::new()
        .input("model/tcn.onnx")
        .out_dir("model/")
        .load_strategy(LoadStrategy::Embedded)
        .run_from_script();
}
