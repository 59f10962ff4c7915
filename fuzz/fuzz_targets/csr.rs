//! CSR inspection: any bytes, PEM or DER, give Ok or a precise error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = laddnet_pki::Policy::default().csr;
    let _ = laddnet_pki::check_csr(data, &policy);
});
