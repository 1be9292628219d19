//! Fuzz target `dns`: see [`ambit_ztunnel::fuzzing::dns`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ambit_ztunnel::fuzzing::dns(data));
