#![no_main]
//! Fuzz target `registry_state`: see `outpost_fuzz_entry::registry_state` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::registry_state(data));
