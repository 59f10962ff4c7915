//! Charger → central messages as they arrive on the Attach stream: the
//! protobuf decoding and the node's conversion to domain types.
#![no_main]
use laddnet_proto::v1::charger_message::Payload;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = laddnet_proto::v1::ChargerMessage::decode(data) {
        let _ = m.encode_to_vec();
        match m.payload {
            Some(Payload::Transaction(t)) => {
                let _ = laddnet_node::services::charger::tx_event(t);
            }
            Some(Payload::Status(s)) => {
                let _ = laddnet_node::services::charger::connector_status(s.status);
            }
            Some(Payload::Boot(b)) => {
                if let Ok(id) = laddnet_core::ChargerId::new(b.charger_id.clone()) {
                    let _ = laddnet_node::services::charger::boot_record(&id, None, "00", &b);
                }
            }
            _ => {}
        }
    }
});
