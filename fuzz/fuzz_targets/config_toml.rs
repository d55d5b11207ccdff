#![no_main]
//! Fuzz target `config_toml`: see `outpost_fuzz_entry::config_toml` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::config_toml(data));
