#![no_main]
//! Fuzz target `model_manifest`: see `outpost_fuzz_entry::model_manifest` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::model_manifest(data));
