//! The laddnet node: the mutual-TLS gRPC services, their configuration and
//! the `laddnet` binary.
//!
//! - [`config`]: typed TOML config with `LADDNET_*` overrides.
//! - [`transport`]: TLS termination (rustls with the CRL, handshake
//!   deadline, TCP_NODELAY) in front of tonic, and revocable connections.
//! - [`identity`]: the caller, from its certificate and the CA's record.
//! - [`services`]: `ChargerService`, `EnrollmentService`, `PkiService`,
//!   `OperatorService`, plus `grpc.health.v1` and reflection.
//! - [`drivers`]: authorization, offline lists, notifications (streams and
//!   signed webhooks via [`webhook`]), retention.
//! - [`node`]: start and graceful shutdown.
//! - [`bootstrap`]: a new data dir with CA, admin credentials and configs.
//! - [`status`]: the one table from domain errors to gRPC codes.

#![forbid(unsafe_code)]

pub mod alarms;
pub mod blobs;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod diagnostics;
pub mod drivers;
pub mod firmware;
pub mod follow;
pub mod identity;
pub mod load;
pub mod metrics;
pub mod node;
pub mod panics;
pub mod services;
pub mod shared_store;
pub mod state;
pub mod status;
pub mod transport;
pub mod webhook;

pub use bootstrap::{CtlConfig, InitOutput, init_data_dir, write_ctl_config};
pub use config::NodeConfig;
/// The client side: connector and `laddctl.toml` (re-exported).
pub use laddnet_client as client;
pub use node::RunningNode;

/// Now, unix milliseconds (UTC).
pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}
