//! Charger → central messages as they arrive on the Attach stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = laddnet_proto::v1::ChargerMessage::decode(data) {
        // Re-encoding what decoded must not panic either.
        let _ = m.encode_to_vec();
    }
});
