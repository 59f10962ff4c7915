//! Generates the gRPC code from `proto/laddnet/v1/*.proto` with protox, a
//! pure-Rust protobuf compiler, so building needs no `protoc` install.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "laddnet/v1/common.proto",
    "laddnet/v1/charger.proto",
    "laddnet/v1/enrollment.proto",
    "laddnet/v1/pki.proto",
    "laddnet/v1/operator.proto",
    "laddnet/v1/billing.proto",
    "laddnet/v1/drivers.proto",
    "laddnet/v1/incidents.proto",
    "laddnet/v1/fleet.proto",
    "laddnet/v1/store.proto",
    "laddnet/v1/cluster.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Server reflection serves this set, so `grpcurl` works without .proto files.
    std::fs::write(out.join("laddnet_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
