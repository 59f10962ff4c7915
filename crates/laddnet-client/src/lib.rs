//! Connecting to a laddnet node as a client: TLS by rustls (configured by
//! `laddnet_pki::tls::client_config`, the same protocol choices as the
//! server), gRPC by tonic; and [`CtlConfig`], what `laddctl.toml` holds.
//! Used by `laddctl`, the simulator, `laddnet up` and the tests.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What `laddctl` reads: where the node is and which credentials to use.
/// Relative paths are relative to the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// `https://host:port` of the mutual-TLS listener.
    pub endpoint: String,
    /// The name to check in the node's certificate.
    pub server_name: String,
    /// The root CA certificate to trust.
    pub ca_cert: PathBuf,
    /// This operator's certificate chain and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

use std::sync::Arc;

use hyper_util::rt::TokioIo;
pub use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// Opens a gRPC channel to `endpoint` (`https://host:port`), verifying the
/// server as `server_name` and presenting whatever identity `tls` carries.
pub async fn connect(endpoint: &str, server_name: &str, tls: Arc<ClientConfig>) -> anyhow::Result<Channel> {
    let uri: Uri = endpoint
        .parse()
        .map_err(|e| anyhow::anyhow!("endpoint {endpoint:?} is not a URI: {e}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow::anyhow!("endpoint {endpoint:?} has no host:port"))?
        .as_str()
        .to_string();
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| anyhow::anyhow!("server name {server_name:?}: {e}"))?;
    let connector = TlsConnector::from(tls);
    let channel = Endpoint::from(uri)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, name, authority) = (connector.clone(), name.clone(), authority.clone());
            async move {
                let tcp = TcpStream::connect(&authority).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {endpoint}: {}", error_chain(&e)))?;
    Ok(channel)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
