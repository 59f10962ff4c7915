//! The node's own records in the store (firmware images and campaigns,
//! diagnostics bundles): typed JSON values, and large byte values split
//! into 64 KiB chunks written 16 to a transaction (1 MiB: well inside
//! FoundationDB's transaction limit), so a reader sees a large value only
//! once its metadata, written last, names it.

use laddnet_store::{Store, StoreExt, Transaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::status::NodeError;

pub const CHUNK: usize = 64 * 1024;
const CHUNKS_PER_TX: usize = 16;

pub fn get_json<T: DeserializeOwned>(tx: &mut dyn Transaction, key: &[u8]) -> Result<Option<T>, NodeError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| NodeError::Internal(format!("stored record: {e}"))),
    }
}

pub fn put_json<T: Serialize>(tx: &mut dyn Transaction, key: &[u8], v: &T) -> Result<(), NodeError> {
    let bytes = serde_json::to_vec(v).map_err(|e| NodeError::Internal(e.to_string()))?;
    Ok(tx.set(key, &bytes)?)
}

/// Every record in `[begin, end)`, at most `limit`, in key order.
pub fn list_json<T: DeserializeOwned>(
    store: &dyn Store,
    (begin, end): (Vec<u8>, Vec<u8>),
    limit: usize,
) -> Result<Vec<T>, NodeError> {
    store.snapshot(|tx| {
        tx.get_range(&begin, &end, limit, false)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| NodeError::Internal(format!("stored record: {e}"))))
            .collect()
    })
}

/// Writes `data` as chunks under `key(i)`; returns how many.
pub fn write_chunks(store: &dyn Store, data: &[u8], key: impl Fn(u32) -> Vec<u8>) -> Result<u32, NodeError> {
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    for (batch_no, batch) in chunks.chunks(CHUNKS_PER_TX).enumerate() {
        store.transact(|tx| {
            for (j, c) in batch.iter().enumerate() {
                tx.set(&key((batch_no * CHUNKS_PER_TX + j) as u32), c)?;
            }
            Ok::<_, NodeError>(())
        })?;
    }
    Ok(chunks.len() as u32)
}

/// Reads `n` chunks written by [`write_chunks`] back into one value.
pub fn read_chunks(store: &dyn Store, n: u32, key: impl Fn(u32) -> Vec<u8>) -> Result<Vec<u8>, NodeError> {
    store.snapshot(|tx| {
        let mut out = Vec::new();
        for i in 0..n {
            let part = tx
                .get(&key(i))?
                .ok_or_else(|| NodeError::Internal(format!("a stored value misses chunk {i} of {n}")))?;
            out.extend_from_slice(&part);
        }
        Ok(out)
    })
}
