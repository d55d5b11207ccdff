#![no_main]
//! Fuzz target `mqtt_payload`: see `outpost_fuzz_entry::mqtt_payload` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::mqtt_payload(data));
