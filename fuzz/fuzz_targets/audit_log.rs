#![no_main]
//! Fuzz target `audit_log`: see `outpost_fuzz_entry::audit_log` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::audit_log(data));
