#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (underlay_fuzz::targets::cni_invocation)(data));
