//! Diagnostics bundles: a charger asked with `GetDiagnostics` uploads a log
//! bundle over its own stream in `DiagnosticsChunk` messages; the node
//! accepts chunks only for a request it made to that charger, in order,
//! up to [`MAX_BUNDLE`], and stores the bundle when the last one arrives
//! (content in chunks, [`crate::blobs`]; the metadata last).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use laddnet_proto::v1;
use laddnet_store::{Store, StoreExt, keys};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::blobs::{list_json, put_json, read_chunks, write_chunks};
use crate::now_ms;
use crate::state::NodeState;
use crate::status::NodeError;

pub const MAX_BUNDLE: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub id: String,
    pub charger_id: String,
    pub file_name: String,
    pub received_ms: i64,
    pub size: u64,
    pub sha256: String,
    pub chunks: u32,
}

/// Uploads in progress on one charger's stream: request id -> bytes so far
/// and the next index expected.
#[derive(Default)]
pub struct Uploads {
    open: Mutex<HashMap<String, (Vec<u8>, u32)>>,
}

impl Uploads {
    /// The node asked for a bundle under `command_id`.
    pub fn requested(&self, command_id: &str) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(command_id.to_string(), (Vec::new(), 0));
    }

    /// Takes a chunk; returns the whole bundle with its file name after the
    /// last one.
    pub fn chunk(&self, c: v1::DiagnosticsChunk) -> Result<Option<(String, String, Vec<u8>)>, NodeError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let Some((buf, next)) = open.get_mut(&c.command_id) else {
            return Err(NodeError::Invalid(format!(
                "no diagnostics were requested under {:?}",
                c.command_id.chars().take(64).collect::<String>()
            )));
        };
        if c.index != *next {
            let expected = *next;
            open.remove(&c.command_id);
            return Err(NodeError::Invalid(format!(
                "diagnostics chunk {} arrived where {expected} was expected; the upload is dropped",
                c.index
            )));
        }
        if buf.len() + c.data.len() > MAX_BUNDLE {
            open.remove(&c.command_id);
            return Err(NodeError::Invalid(format!(
                "the diagnostics bundle is larger than {} MiB; the upload is dropped",
                MAX_BUNDLE / 1024 / 1024
            )));
        }
        buf.extend_from_slice(&c.data);
        *next += 1;
        if !c.last {
            return Ok(None);
        }
        let (buf, _) = open.remove(&c.command_id).unwrap_or_default();
        Ok(Some((c.command_id, c.file_name, buf)))
    }
}

pub fn file_name_ok(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(100)
        .collect();
    if clean.is_empty() {
        "diagnostics.log".into()
    } else {
        clean
    }
}

fn meta_key(charger: &str, id: &str) -> Vec<u8> {
    keys::pack(&("diag", charger, id))
}
fn data_key(id: &str, i: u32) -> Vec<u8> {
    keys::pack(&("diag-data", id, i as i64))
}

pub fn save(store: &dyn Store, charger: &str, id: &str, file_name: &str, content: &[u8]) -> Result<Bundle, NodeError> {
    let chunks = write_chunks(store, content, |i| data_key(id, i))?;
    let b = Bundle {
        id: id.into(),
        charger_id: charger.into(),
        file_name: file_name_ok(file_name),
        received_ms: now_ms(),
        size: content.len() as u64,
        sha256: hex::encode(Sha256::digest(content)),
        chunks,
    };
    store.transact(|tx| put_json(tx, &meta_key(charger, id), &b))?;
    Ok(b)
}

pub fn list(store: &dyn Store, charger: &str) -> Result<Vec<Bundle>, NodeError> {
    list_json(store, keys::tuple_range(&("diag", charger)), 1_000)
}

/// A bundle with its content: by id, or the charger's latest.
pub fn load(store: &dyn Store, charger: &str, id: Option<&str>) -> Result<(Bundle, Vec<u8>), NodeError> {
    let all = list(store, charger)?;
    let b = match id {
        Some(id) => all.into_iter().find(|b| b.id == id),
        None => all.into_iter().max_by_key(|b| b.received_ms),
    }
    .ok_or_else(|| NodeError::NotFound(format!("no diagnostics bundle for charger {charger}")))?;
    let content = read_chunks(store, b.chunks, |i| data_key(&b.id, i))?;
    Ok((b, content))
}

/// Asks `charger`, connected to this node, for a bundle and waits up to
/// `wait` for the whole upload; returns the stored bundle's id.
pub async fn request_here(state: &Arc<NodeState>, charger: &str, wait: Duration) -> Result<String, tonic::Status> {
    let outbound = state
        .chargers
        .outbound(charger)
        .ok_or_else(|| tonic::Status::from(NodeError::Precondition(format!("charger {charger} is not connected"))))?;
    let request = format!("diag-{charger}-{}", now_ms());
    outbound.uploads.requested(&request);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    state
        .diag_waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(request.clone(), done_tx);
    outbound
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(request.clone(), reply_tx);
    let forget = || {
        state
            .diag_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request);
    };
    let cmd = v1::Command {
        command_id: request.clone(),
        kind: Some(v1::command::Kind::GetDiagnostics(v1::GetDiagnostics {})),
    };
    if !outbound.send_command(cmd).await {
        forget();
        return Err(NodeError::Precondition(format!("charger {charger} disconnected")).into());
    }
    let deadline = tokio::time::Instant::now() + wait;
    match tokio::time::timeout_at(deadline, reply_rx).await {
        Ok(Ok(reply)) if reply.status == v1::CommandStatus::Accepted as i32 => {}
        Ok(Ok(reply)) => {
            forget();
            return Err(NodeError::Precondition(format!(
                "charger {charger} refused to upload diagnostics: {}",
                reply.detail
            ))
            .into());
        }
        _ => {
            forget();
            return Err(tonic::Status::deadline_exceeded(format!(
                "charger {charger} did not answer in time"
            )));
        }
    }
    match tokio::time::timeout_at(deadline, done_rx).await {
        Ok(Ok(bundle)) => Ok(bundle.id),
        _ => {
            forget();
            Err(tonic::Status::deadline_exceeded(format!(
                "charger {charger} did not finish its upload within {} s",
                wait.as_secs()
            )))
        }
    }
}
