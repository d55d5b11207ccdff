#![no_main]
//! Fuzz target `modbus_response`: see `outpost_fuzz_entry::modbus_response` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::modbus_response(data));
