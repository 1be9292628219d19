//! Fuzz target `hbone_request`: see [`ambit_shared::fuzzing::hbone_request`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ambit_shared::fuzzing::hbone_request(data));
