//! A minimal HTTP/1.1 client for webhook POSTs (http, or https with the
//! system's root certificates), on hyper.

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where the system's root certificates usually are (Debian, Ubuntu, Alpine).
const ROOTS: &[&str] = &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for path in ROOTS {
        if let Ok(pem) = std::fs::read_to_string(path)
            && let Ok(certs) = laddnet_pki::tls::certs_from_pem(&pem)
        {
            for c in certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err("no system root certificates for https webhooks".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// POSTs `body` as JSON with laddnet's webhook headers; Ok on a 2xx answer.
pub async fn post_json(url: &str, body: &[u8], id: &str, timestamp: i64, signature: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad webhook url: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("webhook url must be http or https".into()),
    };
    let host = uri.host().ok_or("webhook url has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let req = http::Request::post(path)
        .header(http::header::HOST, host.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("x-laddnet-notification-id", id)
        .header("x-laddnet-timestamp", timestamp.to_string())
        .header("x-laddnet-signature", signature)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let status = if https {
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}"))
    }
}

async fn send<I>(io: I, req: http::Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status();
    // Drain the answer so the connection closes cleanly.
    let _ = resp.into_body().collect().await;
    Ok(status)
}
