//! Fuzz target `cni`: see [`ambit_ztunnel::fuzzing::cni`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ambit_ztunnel::fuzzing::cni(data));
