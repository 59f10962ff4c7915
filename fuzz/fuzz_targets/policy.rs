//! Certificate policy TOML.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = laddnet_pki::Policy::from_toml(text);
    }
});
