//! The load side: chargers on real mutual-TLS Attach streams, the same
//! for the node and the echo.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;
use laddnet_proto::v1;
use laddnet_proto::v1::charger_service_client::ChargerServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::servers::{Creds, Fleet};

/// One charger's open stream.
pub struct Attached {
    pub tx: mpsc::Sender<v1::ChargerMessage>,
    pub rx: tonic::Streaming<v1::CentralMessage>,
    next_id: u64,
}

impl Attached {
    pub async fn send(&mut self, payload: v1::charger_message::Payload) -> anyhow::Result<u64> {
        self.next_id += 1;
        self.tx
            .send(v1::ChargerMessage {
                msg_id: self.next_id,
                payload: Some(payload),
            })
            .await
            .map_err(|_| anyhow::anyhow!("the stream closed"))?;
        Ok(self.next_id)
    }

    /// The next message that answers a request (commands are skipped).
    pub async fn reply(&mut self) -> anyhow::Result<v1::CentralMessage> {
        loop {
            let m = self.rx.message().await?.context("the server ended the stream")?;
            if m.msg_id != 0 {
                return Ok(m);
            }
        }
    }
}

/// Connects `c` to `addr` (any loopback address: the 4-tuples of many
/// connections spread over 127.0.0.x), attaches and boots.
pub async fn attach(fleet: &Fleet, c: &Creds, addr: std::net::SocketAddr) -> anyhow::Result<Attached> {
    attach_with(fleet.client_tls(c)?, c, addr).await
}

/// [`attach`] with the charger's client configuration already built.
pub async fn attach_with(
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    c: &Creds,
    addr: std::net::SocketAddr,
) -> anyhow::Result<Attached> {
    let channel = laddnet_client::connect(&format!("https://{addr}"), "localhost", tls).await?;
    let mut client = ChargerServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(256);
    // The boot goes first: the server answers the call only once it has
    // read it.
    tx.send(v1::ChargerMessage {
        msg_id: 1,
        payload: Some(v1::charger_message::Payload::Boot(v1::Boot {
            charger_id: c.id.clone(),
            vendor: "bench".into(),
            model: "bench".into(),
            firmware_version: "1.0".into(),
            connectors: vec![v1::Connector {
                connector_id: 1,
                r#type: v1::ConnectorType::Ac as i32,
                max_power_w: 22_000,
            }],
            local_list_version: 0,
        })),
    })
    .await
    .map_err(|_| anyhow::anyhow!("the stream closed"))?;
    let mut a = Attached {
        tx,
        rx: client.attach(ReceiverStream::new(rx)).await?.into_inner(),
        next_id: 1,
    };
    match a.reply().await?.payload {
        Some(v1::central_message::Payload::BootAccepted(_)) => Ok(a),
        other => anyhow::bail!("boot of {} not accepted: {other:?}", c.id),
    }
}

/// A raw mutual-TLS handshake (the reconnect storm's baseline): TCP, then
/// rustls, then the server's one byte; nothing above it.
pub async fn handshake(
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost")?;
    let mut stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
    // Admitted once the server, having checked this certificate, says so.
    let mut byte = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut byte).await?;
    Ok(stream)
}

/// Meter event `seq` of a session begun at `start_ms`: 11 kW, the energy
/// register following the power, so the node's plausibility checks see a
/// sound session.
pub fn meter_event(transaction_id: &str, seq: u64, start_ms: i64) -> v1::charger_message::Payload {
    let t = now_ms();
    let energy_wh = ((t - start_ms).max(0) as u64) * 11_000 / 3_600_000;
    v1::charger_message::Payload::Transaction(v1::TransactionEvent {
        transaction_id: transaction_id.into(),
        seq,
        event_type: if seq == 0 {
            v1::TransactionEventType::Started as i32
        } else {
            v1::TransactionEventType::Updated as i32
        },
        connector_id: 1,
        timestamp_ms: t,
        meter: Some(v1::MeterValue {
            energy_wh,
            power_w: 11_000,
            current_ma: 16_000,
            voltage_mv: 230_000,
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Where acknowledged events are written down, for the loss check.
pub type AckLog = Arc<std::sync::Mutex<Vec<(String, u64)>>>;

/// A session's meter events on one stream: `window` events in flight,
/// each acknowledged one counted in `acked` (and written to `log`), until
/// `stop`.
pub async fn charge(
    mut a: Attached,
    transaction_id: String,
    window: usize,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    log: Option<AckLog>,
) -> anyhow::Result<u64> {
    let start = now_ms();
    let event = |seq: u64| meter_event(&transaction_id, seq, start);
    a.send(event(0)).await?;
    let mut sent = 1u64;
    let mut in_flight = 1usize;
    let mut last_acked = 0u64;
    while in_flight > 0 {
        while in_flight < window && !stop.load(Ordering::Relaxed) {
            a.send(event(sent)).await?;
            sent += 1;
            in_flight += 1;
        }
        match a.reply().await?.payload {
            Some(v1::central_message::Payload::TransactionAck(ack)) => {
                in_flight -= 1;
                last_acked = last_acked.max(ack.seq);
                acked.fetch_add(1, Ordering::Relaxed);
                if let Some(log) = &log {
                    log.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((transaction_id.clone(), ack.seq));
                }
            }
            Some(v1::central_message::Payload::Rejected(r)) => anyhow::bail!("event rejected: {}", r.reason),
            _ => {}
        }
    }
    Ok(last_acked)
}
