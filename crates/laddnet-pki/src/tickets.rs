//! TLS session tickets every node opens: stateless resumption across the
//! cluster and across restarts.
//!
//! A charger that reconnects (after a node restart, a failover or a network
//! blip) presents the ticket its last connection gave it and resumes: no
//! certificate chain to verify and no signatures, so a reconnect storm
//! costs the node about half the public-key work of fresh handshakes. What
//! the node checks after the handshake does not change: the identity check
//! still finds the certificate (from the ticket) issued, unrevoked and
//! unexpired, so revoking a certificate shuts out resumed connections too.
//!
//! - A ticket is sealed with AES-256-GCM under a ticket key. It reads
//!   `key id (4 bytes) ‖ nonce (12 random bytes) ‖ ciphertext and tag`;
//!   the additional data binds it to its purpose and key id.
//! - The keys are in the store, each sealed under the node's key-encryption
//!   key (as the CA key is), so any node opens any other node's tickets.
//! - Rotation bounds what a stolen key exposes: the newest key seals for
//!   [`ROTATE_MS`] (6 h) and then only opens, for one period more; then it
//!   is erased from the store and from memory. A ticket lives at most 12 h;
//!   after that the charger makes a full handshake.
//! - Whichever node finds the newest key due rotates it, in a transaction:
//!   two nodes rotating at once leave one new key.

use std::sync::{Arc, RwLock};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use laddnet_store::{Store, StoreExt};
use laddnet_vault::{KeySource, SealedBox};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::PkiError;

/// How long the newest key seals tickets; it opens them one period more.
pub const ROTATE_MS: i64 = 6 * 3600 * 1000;

const ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

fn store_key() -> Vec<u8> {
    laddnet_store::keys::pack(&("tls", "ticket-keys"))
}

fn key_aad(id: u32) -> Vec<u8> {
    let mut aad = b"laddnet/tls-ticket-key/v1:".to_vec();
    aad.extend_from_slice(&id.to_be_bytes());
    aad
}

fn ticket_aad(id: &[u8]) -> Vec<u8> {
    let mut aad = b"laddnet/tls-ticket/v1:".to_vec();
    aad.extend_from_slice(id);
    aad
}

/// The stored keys, newest first.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredKeys {
    keys: Vec<StoredKey>,
}

impl StoredKeys {
    /// The keys still in use at `now_ms`: the newest (it seals), and
    /// older ones for one period after they stopped sealing.
    fn live(&self, now_ms: i64) -> impl Iterator<Item = &StoredKey> {
        self.keys
            .iter()
            .enumerate()
            .filter(move |(i, k)| *i == 0 || k.created_ms.saturating_add(2 * ROTATE_MS) > now_ms)
            .map(|(_, k)| k)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    id: u32,
    created_ms: i64,
    sealed: SealedBox,
}

struct OpenKey {
    id: u32,
    created_ms: i64,
    cipher: Aes256Gcm,
}

/// The ticket keys a node holds open, newest (the sealing key) first.
/// Empty: no tickets are issued (full handshakes only).
#[derive(Default)]
pub struct TicketKeys {
    keys: RwLock<Vec<OpenKey>>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys").field("ids", &self.ids()).finish()
    }
}

/// What [`TicketKeys::sync`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// This node created a new sealing key.
    pub rotated: bool,
    /// The ids held open afterwards, newest first.
    pub ids: Vec<u32>,
}

impl TicketKeys {
    pub fn new() -> Arc<Self> {
        Arc::new(TicketKeys::default())
    }

    /// The ids of the keys held open, newest first.
    pub fn ids(&self) -> Vec<u32> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|k| k.id)
            .collect()
    }

    /// Brings the keys in line with the store at `now_ms`: creates the
    /// first key or rotates the newest when it is due, erases keys past
    /// their window, and opens keys this node does not hold yet (another
    /// node's rotation). Keys are sealed and opened outside the store's
    /// transaction (a passphrase KEK costs an Argon2id run).
    pub fn sync(&self, store: &dyn Store, source: &KeySource, now_ms: i64) -> Result<SyncReport, PkiError> {
        let key = store_key();
        let load = |tx: &mut dyn laddnet_store::Transaction| -> Result<StoredKeys, PkiError> {
            match tx.get(&key)? {
                None => Ok(StoredKeys::default()),
                Some(v) => serde_json::from_slice(&v).map_err(|e| PkiError::Corrupted(format!("TLS ticket keys: {e}"))),
            }
        };
        let due = |s: &StoredKeys| {
            s.keys
                .first()
                .is_none_or(|k| k.created_ms.saturating_add(ROTATE_MS) <= now_ms)
        };
        let stored = store.snapshot(|tx| load(tx))?;
        let (stored, rotated) = if due(&stored) {
            let mut secret = laddnet_vault::Secret::new([0u8; 32]);
            rand::thread_rng().fill_bytes(&mut secret[..]);
            let id = loop {
                let id = rand::random::<u32>();
                if !stored.keys.iter().any(|k| k.id == id) {
                    break id;
                }
            };
            let sealed = laddnet_vault::seal(source, &key_aad(id), &secret[..])?;
            let fresh = StoredKey {
                id,
                created_ms: now_ms,
                sealed,
            };
            store.transact(|tx| -> Result<(StoredKeys, bool), PkiError> {
                let mut current = load(tx)?;
                let rotated = due(&current);
                if rotated {
                    current.keys.insert(0, fresh.clone());
                }
                current.keys = current.live(now_ms).cloned().collect();
                let json = serde_json::to_vec(&current).map_err(|e| PkiError::Corrupted(e.to_string()))?;
                tx.set(&key, &json)?;
                Ok((current, rotated))
            })?
        } else {
            (stored, false)
        };
        self.open_all(&stored, source, now_ms)?;
        Ok(SyncReport {
            rotated,
            ids: self.ids(),
        })
    }

    fn open_all(&self, stored: &StoredKeys, source: &KeySource, now_ms: i64) -> Result<(), PkiError> {
        let held: Vec<u32> = self.ids();
        let mut opened = Vec::new();
        for k in stored.live(now_ms) {
            if held.contains(&k.id) {
                continue;
            }
            let secret = laddnet_vault::open(source, &key_aad(k.id), &k.sealed)?;
            if secret.len() != 32 {
                return Err(PkiError::Corrupted(format!("TLS ticket key {} is not 32 bytes", k.id)));
            }
            let cipher = Aes256Gcm::new_from_slice(&secret).map_err(|_| PkiError::Key("TLS ticket key".into()))?;
            opened.push(OpenKey {
                id: k.id,
                created_ms: k.created_ms,
                cipher,
            });
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.extend(opened);
        // Only what the store still holds, in its order (newest first).
        keys.retain(|k| stored.live(now_ms).any(|s| s.id == k.id));
        keys.sort_by_key(|k| std::cmp::Reverse(k.created_ms));
        Ok(())
    }

    /// Keys given directly (tests, benchmarks): (id, created, secret),
    /// newest first.
    pub fn from_secrets(secrets: &[(u32, i64, [u8; 32])]) -> Arc<Self> {
        let keys = secrets
            .iter()
            .filter_map(|(id, created_ms, secret)| {
                Some(OpenKey {
                    id: *id,
                    created_ms: *created_ms,
                    cipher: Aes256Gcm::new_from_slice(secret).ok()?,
                })
            })
            .collect();
        Arc::new(TicketKeys {
            keys: RwLock::new(keys),
        })
    }

    /// Seals `plain` under the newest key.
    pub fn seal(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.first()?;
        let id = key.id.to_be_bytes();
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &ticket_aad(&id),
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + sealed.len());
        out.extend_from_slice(&id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// Opens a ticket a client presented: any bytes at all; `None` unless
    /// it was sealed by a key still held and not altered.
    pub fn unseal(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < ID_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (id, rest) = ticket.split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let want = u32::from_be_bytes(id.try_into().ok()?);
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.iter().find(|k| k.id == want)?;
        key.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &ticket_aad(id),
                },
            )
            .ok()
    }
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        !self.keys.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    fn lifetime(&self) -> u32 {
        (ROTATE_MS / 1000) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.unseal(cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use laddnet_store::RedbStore;

    fn setup() -> (tempfile::TempDir, Arc<dyn Store>, KeySource) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path().join("s.redb")).unwrap());
        let file = dir.path().join("kek");
        laddnet_vault::create_key_file(&file).unwrap();
        (dir, store, KeySource::KeyFile(file))
    }

    #[test]
    fn a_ticket_opens_on_another_node_and_nowhere_else() {
        let (_d, store, source) = setup();
        let a = TicketKeys::new();
        let b = TicketKeys::new();
        assert!(a.sync(store.as_ref(), &source, 1_000).unwrap().rotated);
        assert!(!b.sync(store.as_ref(), &source, 2_000).unwrap().rotated);
        assert_eq!(a.ids(), b.ids());
        let t = a.seal(b"session state").unwrap();
        assert_eq!(b.unseal(&t).unwrap(), b"session state");
        // Another cluster (another store) cannot open it.
        let (_d2, other, source2) = setup();
        let c = TicketKeys::new();
        c.sync(other.as_ref(), &source2, 1_000).unwrap();
        assert_eq!(c.unseal(&t), None);
        // Every altered byte, a short ticket or garbage: refused.
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(b.unseal(&bad), None, "byte {i} altered");
        }
        for n in 0..(ID_LEN + NONCE_LEN + TAG_LEN) {
            assert_eq!(b.unseal(&t[..n]), None);
        }
    }

    #[test]
    fn keys_rotate_and_expire_and_no_tickets_without_keys() {
        use rustls::server::ProducesTickets;
        let (_d, store, source) = setup();
        let none = TicketKeys::new();
        assert!(!none.enabled());
        assert_eq!(none.encrypt(b"x"), None);

        let node = TicketKeys::new();
        node.sync(store.as_ref(), &source, 0).unwrap();
        let first = node.ids();
        let old = node.seal(b"old").unwrap();
        // Not due yet: nothing changes.
        let r = node.sync(store.as_ref(), &source, ROTATE_MS - 1).unwrap();
        assert!(!r.rotated);
        assert_eq!(r.ids, first);
        // Due: a new sealing key; the old one still opens.
        let r = node.sync(store.as_ref(), &source, ROTATE_MS).unwrap();
        assert!(r.rotated);
        assert_eq!(r.ids.len(), 2);
        assert_eq!(r.ids[1], first[0]);
        let new = node.seal(b"new").unwrap();
        assert_eq!(&new[..4], &r.ids[0].to_be_bytes());
        assert_eq!(node.unseal(&old).unwrap(), b"old");
        // A node that only reads (not due for it) follows the rotation.
        let follower = TicketKeys::new();
        follower.sync(store.as_ref(), &source, ROTATE_MS + 1).unwrap();
        assert_eq!(follower.ids(), r.ids);
        // Two periods after it was made, the first key is gone everywhere.
        let r = node.sync(store.as_ref(), &source, 2 * ROTATE_MS).unwrap();
        assert!(r.rotated);
        assert!(!r.ids.contains(&first[0]));
        assert_eq!(node.unseal(&old), None);
        follower.sync(store.as_ref(), &source, 2 * ROTATE_MS).unwrap();
        assert_eq!(follower.unseal(&old), None);
        assert_eq!(follower.unseal(&new).unwrap(), b"new");
    }

    #[test]
    fn a_key_sealed_under_another_kek_is_refused() {
        let (_d, store, source) = setup();
        TicketKeys::new().sync(store.as_ref(), &source, 0).unwrap();
        let other = _d.path().join("other-kek");
        laddnet_vault::create_key_file(&other).unwrap();
        let err = TicketKeys::new()
            .sync(store.as_ref(), &KeySource::KeyFile(other), 1)
            .unwrap_err();
        assert!(matches!(err, PkiError::Vault(_)), "{err}");
    }
}
