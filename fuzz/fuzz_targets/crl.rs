//! CRL inspection, PEM or DER.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = laddnet_pki::summarize_crl(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = laddnet_pki::tls::crl_from_pem(text);
    }
});
