//! The baseline: a bare tonic server with the node's mutual-TLS setup (the
//! same CA, the same rustls configuration, client certificates required)
//! and the same `ChargerService`, that answers every charger message at
//! once and does nothing else: no store, no actors, no checks.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use laddnet_proto::v1;
use laddnet_proto::v1::charger_service_server::{ChargerService, ChargerServiceServer};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

struct Echo;

fn answer(m: v1::ChargerMessage) -> v1::CentralMessage {
    use v1::central_message::Payload as Out;
    use v1::charger_message::Payload as In;
    let payload = match m.payload {
        Some(In::Boot(_)) => Out::BootAccepted(v1::BootAccepted {
            server_time: String::new(),
            heartbeat_interval_s: 60,
        }),
        Some(In::Heartbeat(_)) => Out::HeartbeatAck(v1::HeartbeatAck::default()),
        Some(In::Authorize(_)) => Out::AuthorizeResult(v1::AuthorizeResult {
            accepted: true,
            reason: String::new(),
            status: v1::AuthorizationStatus::Accepted as i32,
        }),
        Some(In::Transaction(ev)) => Out::TransactionAck(v1::TransactionAck {
            transaction_id: ev.transaction_id,
            seq: ev.seq,
            ..Default::default()
        }),
        _ => Out::StatusAck(v1::StatusAck {}),
    };
    v1::CentralMessage {
        msg_id: m.msg_id,
        payload: Some(payload),
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<v1::CentralMessage, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ChargerService for Echo {
    type AttachStream = Replies;
    type DownloadFirmwareStream = Replies2;

    async fn attach(
        &self,
        req: tonic::Request<tonic::Streaming<v1::ChargerMessage>>,
    ) -> Result<tonic::Response<Self::AttachStream>, tonic::Status> {
        let inbound = req.into_inner();
        let replies = inbound.map_while(|m| m.ok().map(|m| Ok(answer(m))));
        Ok(tonic::Response::new(Box::pin(replies)))
    }

    async fn renew_certificate(
        &self,
        _: tonic::Request<v1::RenewCertificateRequest>,
    ) -> Result<tonic::Response<v1::RenewCertificateResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("the echo server only answers Attach"))
    }

    async fn download_firmware(
        &self,
        _: tonic::Request<v1::DownloadFirmwareRequest>,
    ) -> Result<tonic::Response<Self::DownloadFirmwareStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("the echo server only answers Attach"))
    }
}

type Replies2 = Pin<Box<dyn Stream<Item = Result<v1::FirmwareChunk, tonic::Status>> + Send>>;

/// Serves the echo on `listen` until the process ends, printing
/// `echo serving on ADDR` once it accepts.
pub async fn serve(listen: std::net::SocketAddr, tls: Arc<tokio_rustls::rustls::ServerConfig>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("echo serving on {}", listener.local_addr()?);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            // tonic's serve_with_incoming does not set it (the node's
            // acceptor does): the same here, or the baseline would pay
            // Nagle's delay.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok::<_, std::io::Error>(Conn(tls))).await;
                }
            });
        }
    });
    tonic::transport::Server::builder()
        .add_service(ChargerServiceServer::new(Echo))
        .serve_with_incoming(ReceiverStream::new(rx))
        .await?;
    Ok(())
}

/// The reconnect storm's baseline: a raw rustls mutual-TLS handshake per
/// connection (the same server configuration), no HTTP/2 and no service;
/// one byte written once it is done, then the connection is held until the
/// client closes it.
pub async fn serve_handshakes(
    listen: std::net::SocketAddr,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("echo serving on {}", listener.local_addr()?);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                // One byte says "admitted": the client knows the server
                // has verified its certificate (in TLS 1.3 the client's
                // handshake ends before that).
                if tls.write_all(b"k").await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                let mut buf = [0u8; 64];
                while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
}

/// A TLS connection as tonic's `serve_with_incoming` takes it.
struct Conn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
