//! TLS termination in front of tonic. tonic's own `ServerTlsConfig` builds
//! its client verifier without CRLs and has no handshake timeout, so the
//! node accepts TCP itself, sets TCP_NODELAY (tonic ignores it for
//! `serve_with_incoming`), runs the rustls handshake under a deadline with a
//! bounded number in flight, and hands finished streams to tonic.
//!
//! Every stream carries a [`PeerInfo`] (tonic's `Connected`), so handlers
//! read the caller's identity from the certificate. Each mutual-TLS stream
//! is also registered under its certificate serial: revoking the serial
//! cancels the stream, which makes its I/O fail and hyper close the
//! connection at once.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::identity::{Identity, IdentityCheck};

/// What a handler knows about its caller's connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// `None` on the enrollment listener (no client certificate there).
    pub identity: Option<Arc<Identity>>,
    /// Cancelled when the connection must close (its certificate was revoked).
    pub closed: CancellationToken,
}

/// A TLS stream that dies when its token is cancelled.
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    cancelled: BoxFuture<'static, ()>,
    _registration: Option<Registration>,
}

impl PeerStream {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        // Polling the owned cancellation future registers our waker, so a
        // revocation wakes a connection that is idle in a read.
        if self.cancelled.poll_unpin(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "certificate revoked"));
        }
        Ok(())
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Live mutual-TLS connections by certificate serial.
#[derive(Default)]
pub struct ConnRegistry {
    next: AtomicU64,
    by_serial: Mutex<HashMap<String, HashMap<u64, CancellationToken>>>,
    /// Finished mutual-TLS handshakes: full, and resumed from a ticket.
    pub handshakes_full: AtomicU64,
    pub handshakes_resumed: AtomicU64,
}

/// Removes its connection from the registry when the stream is dropped.
struct Registration {
    registry: Arc<ConnRegistry>,
    serial: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.registry.by_serial.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conns) = map.get_mut(&self.serial) {
            conns.remove(&self.id);
            if conns.is_empty() {
                map.remove(&self.serial);
            }
        }
    }
}

impl ConnRegistry {
    fn register(self: &Arc<Self>, serial: &str, token: CancellationToken) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(serial.to_string())
            .or_default()
            .insert(id, token);
        Registration {
            registry: self.clone(),
            serial: serial.to_string(),
            id,
        }
    }

    /// Closes every live connection presenting `serial`. Returns how many.
    pub fn close_serial(&self, serial: &str) -> usize {
        let conns = self.by_serial.lock().unwrap_or_else(|p| p.into_inner()).remove(serial);
        let n = conns.as_ref().map_or(0, |c| c.len());
        for token in conns.into_iter().flat_map(|c| c.into_values()) {
            token.cancel();
        }
        n
    }

    pub fn connections(&self) -> usize {
        self.by_serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| c.len())
            .sum()
    }
}

/// The current TLS configuration of a listener; replaced when the CRL changes.
pub type SharedTlsConfig = Arc<RwLock<Arc<ServerConfig>>>;

/// A listener's settings.
pub struct AcceptorSettings {
    pub tls: SharedTlsConfig,
    pub handshake_timeout: Duration,
    pub max_pending: usize,
    /// Set on the mutual-TLS listener: checks the presented certificate
    /// beyond the chain (known serial, not revoked, profile).
    pub identity_check: Option<Arc<dyn IdentityCheck>>,
    pub registry: Arc<ConnRegistry>,
}

/// Accepts TCP on `listener`, runs TLS handshakes (each under the deadline,
/// at most `max_pending` at once) and yields finished streams. Ends when
/// `shutdown` is cancelled.
pub fn accept_loop(
    listener: TcpListener,
    settings: AcceptorSettings,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Result<PeerStream, io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    let settings = Arc::new(settings);
    let pending = Arc::new(Semaphore::new(settings.max_pending));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = pending.clone().acquire_owned().await else {
                break;
            };
            let settings = settings.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let acceptor = TlsAcceptor::from(settings.tls.read().unwrap_or_else(|p| p.into_inner()).clone());
                let tls = match tokio::time::timeout(settings.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(remote = %remote, error = %e, "TLS handshake refused");
                        if let Some(check) = &settings.identity_check {
                            check.refused(remote, &e.to_string());
                        }
                        return;
                    }
                    Err(_) => {
                        tracing::info!(remote = %remote, "TLS handshake timed out");
                        return;
                    }
                };
                drop(permit);
                let counter = match tls.get_ref().1.handshake_kind() {
                    Some(rustls::HandshakeKind::Resumed) => &settings.registry.handshakes_resumed,
                    _ => &settings.registry.handshakes_full,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let closed = CancellationToken::new();
                let (identity, registration) = match &settings.identity_check {
                    None => (None, None),
                    Some(check) => {
                        let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
                        let Some(cert) = cert else {
                            // The verifier requires a certificate; this is defence in depth.
                            return;
                        };
                        match check.identify(remote, cert.as_ref()).await {
                            Ok(identity) => {
                                let reg = settings.registry.register(&identity.serial, closed.clone());
                                (Some(Arc::new(identity)), Some(reg))
                            }
                            Err(reason) => {
                                tracing::info!(remote = %remote, reason = %reason, "peer refused after handshake");
                                return;
                            }
                        }
                    }
                };
                let cancelled = closed.clone().cancelled_owned().boxed();
                let stream = PeerStream {
                    inner: tls,
                    info: PeerInfo {
                        remote,
                        identity,
                        closed,
                    },
                    cancelled,
                    _registration: registration,
                };
                let _ = tx.send(Ok(stream)).await;
            });
        }
    });
    rx
}
