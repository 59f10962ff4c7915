//! laddnet's wire contract, generated from `proto/laddnet/v1/*.proto` at
//! build time. Generated code is never edited: change the `.proto` files.
//!
//! Prost types stop at the service boundary; handlers convert them to
//! domain types from `laddnet-core` and friends.

#![forbid(unsafe_code)]

/// Version 1 of the contract.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("laddnet.v1");
}

/// The encoded `FileDescriptorSet` of the whole contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("laddnet_descriptor");

/// Response metadata on a refused charger attach: how many milliseconds to
/// wait before connecting again (the charger's previous node still holds
/// it until then).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
