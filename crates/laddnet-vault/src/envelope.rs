//! Envelope encryption of personal data.
//!
//! - Every *subject* (a driver) has its own data keys, stored wrapped by a
//!   master key ([`MasterKeys`]). Destroying a subject's data keys
//!   ([`Vault::shred`]) makes every copy of its data unreadable, backups
//!   included: crypto-shredding.
//! - A field is sealed with AES-256-GCM under the subject's current data
//!   key, a random 96-bit nonce, and AAD binding table, field, record id,
//!   subject and data-key version: a ciphertext copied to another record,
//!   field or subject fails to open.
//! - Each data key counts its encryptions in the same transaction as the
//!   write that uses it; at [`Vault::rotate_after`] uses (default 2^30, far
//!   below the 2^32 bound for random nonces) a new data-key version takes
//!   over. Old versions stay to open what they sealed.
//! - Master-key rotation: new wraps use the highest master version at once;
//!   [`Vault::rewrap`] moves the existing wrapped keys over in batches, each
//!   batch one transaction with its cursor, so a crash resumes where the
//!   last committed batch ended.
//! - Token values are looked up by a keyed blind index
//!   ([`Vault::blind_index`], HMAC-SHA-256 under an index key that is itself
//!   stored wrapped by the master key), never by their clear value.
//!
//! | key | value |
//! |---|---|
//! | `("vault", "dek", subject)` | the subject's wrapped data keys (JSON) |
//! | `("vault", "index-key")` | the wrapped blind-index key |
//! | `("vault", "rewrap")` | the rewrap cursor |

use std::sync::Arc;

use aes_gcm::Nonce;
use aes_gcm::aead::{Aead, Payload};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use laddnet_store::{Store, StoreError, StoreExt, Transaction, keys};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{MasterKeys, VaultError, cipher};

/// Data keys are rotated after this many encryptions by default.
pub const DEFAULT_ROTATE_AFTER: u64 = 1 << 30;
const BLOB_FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct DataKey {
    version: u32,
    master: u32,
    wrapped: String,
    uses: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct SubjectKeys {
    current: u32,
    keys: Vec<DataKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexKey {
    master: u32,
    wrapped: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RewrapCursor {
    /// The master version being rewrapped to.
    pub target: u32,
    /// The last subject done, when a rewrap is under way.
    pub after: Option<String>,
    /// Wrapped keys moved so far in this rewrap.
    pub moved: u64,
    pub finished: bool,
}

/// Where the keys stand, for `laddnet vault status`.
#[derive(Debug, Clone, Serialize)]
pub struct VaultStatus {
    pub current_master: u32,
    /// (master version, data keys wrapped under it).
    pub wrapped_by_master: Vec<(u32, u64)>,
    pub subjects: u64,
    pub rewrap: Option<RewrapCursor>,
}

/// Envelope encryption over a store. Cheap to clone.
#[derive(Clone)]
pub struct Vault {
    master: Arc<dyn MasterKeys>,
    index_key: Arc<Zeroizing<[u8; 32]>>,
    rotate_after: u64,
}

fn dek_key(subject: &str) -> Vec<u8> {
    keys::pack(&("vault", "dek", subject))
}

fn index_key_key() -> Vec<u8> {
    keys::pack(&("vault", "index-key"))
}

fn cursor_key() -> Vec<u8> {
    keys::pack(&("vault", "rewrap"))
}

fn dek_aad(subject: &str, version: u32, master: u32) -> Vec<u8> {
    format!("laddnet/dek/v1\0{subject}\0{version}\0{master}").into_bytes()
}

fn index_aad(master: u32) -> Vec<u8> {
    format!("laddnet/index-key/v1\0{master}").into_bytes()
}

/// What a sealed field is bound to.
#[derive(Debug, Clone, Copy)]
pub struct FieldRef<'a> {
    pub table: &'a str,
    pub field: &'a str,
    pub record_id: &'a str,
}

fn field_aad(subject: &str, at: FieldRef<'_>, version: u32) -> Vec<u8> {
    let mut aad = b"laddnet/field/v1\0".to_vec();
    for part in [at.table, at.field, at.record_id, subject] {
        aad.extend_from_slice(part.as_bytes());
        aad.push(0);
    }
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// HMAC-SHA-256 over `parts`, each followed by a zero byte when there are several.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    if parts.len() == 1 {
        mac.update(parts[0]);
    } else {
        for p in parts {
            mac.update(p);
            mac.update(&[0]);
        }
    }
    mac.finalize().into_bytes().into()
}

fn corrupted(e: impl std::fmt::Display) -> VaultError {
    VaultError::Malformed(e.to_string())
}

fn load<T: for<'de> Deserialize<'de>>(tx: &mut dyn Transaction, key: &[u8]) -> Result<Option<T>, VaultError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v).map(Some).map_err(corrupted),
    }
}

fn save<T: Serialize>(tx: &mut dyn Transaction, key: &[u8], v: &T) -> Result<(), VaultError> {
    let bytes = serde_json::to_vec(v).map_err(corrupted)?;
    tx.set(key, &bytes)?;
    Ok(())
}

impl Vault {
    /// Opens the vault over `store`: loads the blind-index key, creating it
    /// on first use. Fails when the master key that wraps it is missing.
    pub fn load(store: &dyn Store, master: Arc<dyn MasterKeys>) -> Result<Self, VaultError> {
        let index = store.transact(|tx| -> Result<Zeroizing<[u8; 32]>, VaultError> {
            if let Some(k) = load::<IndexKey>(tx, &index_key_key())? {
                let wrapped = B64.decode(&k.wrapped).map_err(corrupted)?;
                return master.unwrap(k.master, &index_aad(k.master), &wrapped);
            }
            let mut key = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(key.as_mut());
            let m = master.current();
            let wrapped = master.wrap(m, &index_aad(m), &key)?;
            save(
                tx,
                &index_key_key(),
                &IndexKey {
                    master: m,
                    wrapped: B64.encode(wrapped),
                },
            )?;
            Ok(key)
        })?;
        Ok(Self {
            master,
            index_key: Arc::new(index),
            rotate_after: DEFAULT_ROTATE_AFTER,
        })
    }

    /// Data keys rotate after `n` encryptions (tests use small numbers).
    pub fn with_rotate_after(mut self, n: u64) -> Self {
        self.rotate_after = n.max(1);
        self
    }

    pub fn rotate_after(&self) -> u64 {
        self.rotate_after
    }

    /// HMAC-SHA-256 of `value` under the index key, separated by `domain`
    /// (e.g. "rfid"): equal inputs give equal indexes, and nothing about
    /// the value can be learned without the key.
    pub fn blind_index(&self, domain: &str, value: &str) -> [u8; 32] {
        hmac(
            &self.index_key[..],
            &[&b"laddnet/blind-index/v1"[..], domain.as_bytes(), value.as_bytes()],
        )
    }

    /// The key chargers hold to match tokens against their offline
    /// authorization list. Derived from, but revealing nothing of, the
    /// index key: a charger's copy is useless against the store's index.
    pub fn list_key(&self) -> [u8; 32] {
        hmac(&self.index_key[..], &[&b"laddnet/local-list-key/v1"[..]])
    }

    /// HMAC-SHA-256(list_key, value): what a charger computes for a token it reads.
    pub fn list_hash(&self, value: &str) -> [u8; 32] {
        hmac(&self.list_key(), &[value.as_bytes()])
    }

    fn new_data_key(&self, subject: &str, version: u32) -> Result<(DataKey, Zeroizing<[u8; 32]>), VaultError> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        let m = self.master.current();
        let wrapped = self.master.wrap(m, &dek_aad(subject, version, m), &key)?;
        Ok((
            DataKey {
                version,
                master: m,
                wrapped: B64.encode(wrapped),
                uses: 0,
            },
            key,
        ))
    }

    fn unwrap_data_key(&self, subject: &str, k: &DataKey) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let wrapped = B64.decode(&k.wrapped).map_err(corrupted)?;
        self.master
            .unwrap(k.master, &dek_aad(subject, k.version, k.master), &wrapped)
    }

    /// Whether `subject` has data keys (false once shredded).
    pub fn has_subject(&self, tx: &mut dyn Transaction, subject: &str) -> Result<bool, VaultError> {
        Ok(tx.get(&dek_key(subject))?.is_some())
    }

    /// Creates the subject's first data key. Idempotent.
    pub fn create_subject(&self, tx: &mut dyn Transaction, subject: &str) -> Result<(), VaultError> {
        if self.has_subject(tx, subject)? {
            return Ok(());
        }
        let (k, _) = self.new_data_key(subject, 1)?;
        save(
            tx,
            &dek_key(subject),
            &SubjectKeys {
                current: 1,
                keys: vec![k],
            },
        )
    }

    /// Seals `plaintext` for `subject` at `at`, inside the caller's
    /// transaction (the use counter commits with the write).
    pub fn seal_field(
        &self,
        tx: &mut dyn Transaction,
        subject: &str,
        at: FieldRef<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        let mut sk: SubjectKeys = load(tx, &dek_key(subject))?.ok_or(VaultError::Shredded)?;
        let idx = sk
            .keys
            .iter()
            .position(|k| k.version == sk.current)
            .ok_or_else(|| corrupted("current data key missing"))?;
        let key = if sk.keys[idx].uses >= self.rotate_after {
            let version = sk.current + 1;
            let (mut k, key) = self.new_data_key(subject, version)?;
            k.uses = 1;
            sk.keys.push(k);
            sk.current = version;
            key
        } else {
            sk.keys[idx].uses += 1;
            self.unwrap_data_key(subject, &sk.keys[idx])?
        };
        let version = sk.current;
        save(tx, &dek_key(subject), &sk)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = field_aad(subject, at, version);
        let ct = cipher(&key)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::Seal)?;
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.push(BLOB_FORMAT);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens a field sealed by [`Vault::seal_field`] for the same subject and place.
    pub fn open_field(
        &self,
        tx: &mut dyn Transaction,
        subject: &str,
        at: FieldRef<'_>,
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if blob.len() < HEADER_LEN + 16 || blob[0] != BLOB_FORMAT {
            return Err(VaultError::Malformed("sealed field has an unknown format".into()));
        }
        let version = u32::from_be_bytes([blob[1], blob[2], blob[3], blob[4]]);
        let sk: SubjectKeys = load(tx, &dek_key(subject))?.ok_or(VaultError::Shredded)?;
        let k = sk.keys.iter().find(|k| k.version == version).ok_or(VaultError::Open)?;
        let key = self.unwrap_data_key(subject, k)?;
        let aad = field_aad(subject, at, version);
        let pt = cipher(&key)
            .decrypt(
                Nonce::from_slice(&blob[5..HEADER_LEN]),
                Payload {
                    msg: &blob[HEADER_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::Open)?;
        Ok(Zeroizing::new(pt))
    }

    /// Destroys the subject's data keys: everything sealed for it becomes
    /// unreadable, in the store and in every backup.
    pub fn shred(&self, tx: &mut dyn Transaction, subject: &str) -> Result<(), VaultError> {
        tx.clear(&dek_key(subject))?;
        Ok(())
    }

    /// The data-key versions and use counts of a subject (tests, status).
    pub fn key_uses(&self, tx: &mut dyn Transaction, subject: &str) -> Result<Vec<(u32, u32, u64)>, VaultError> {
        let sk: SubjectKeys = load(tx, &dek_key(subject))?.ok_or(VaultError::Shredded)?;
        Ok(sk.keys.iter().map(|k| (k.version, k.master, k.uses)).collect())
    }

    /// Moves wrapped keys to the current master version, `batch` subjects
    /// per transaction, stopping after `max_batches` batches when given
    /// (a crash between batches looks the same). Returns the cursor:
    /// `finished` once every key is under the current version.
    pub fn rewrap(
        &self,
        store: &dyn Store,
        batch: usize,
        max_batches: Option<usize>,
    ) -> Result<RewrapCursor, VaultError> {
        let target = self.master.current();
        let batch = batch.max(1);
        let mut batches = 0usize;
        loop {
            if max_batches.is_some_and(|m| batches >= m) {
                return store.snapshot(|tx| Ok::<_, VaultError>(load(tx, &cursor_key())?.unwrap_or_default()));
            }
            batches += 1;
            let cursor = store.transact(|tx| -> Result<RewrapCursor, VaultError> {
                let mut cur: RewrapCursor = load(tx, &cursor_key())?.unwrap_or_default();
                if cur.target != target {
                    cur = RewrapCursor {
                        target,
                        ..Default::default()
                    };
                }
                if cur.finished {
                    return Ok(cur);
                }
                let (begin, end) = keys::tuple_range(&("vault", "dek"));
                let begin = match &cur.after {
                    Some(after) => {
                        let mut k = dek_key(after);
                        k.push(0);
                        k
                    }
                    None => begin,
                };
                let rows = tx.get_range(&begin, &end, batch, false)?;
                for (key, value) in &rows {
                    let (_, _, subject): (String, String, String) = keys::unpack(key).map_err(corrupted)?;
                    let mut sk: SubjectKeys = serde_json::from_slice(value).map_err(corrupted)?;
                    let mut changed = false;
                    for k in sk.keys.iter_mut().filter(|k| k.master != target) {
                        let clear = self.unwrap_data_key(&subject, k)?;
                        let wrapped = self
                            .master
                            .wrap(target, &dek_aad(&subject, k.version, target), &clear)?;
                        k.master = target;
                        k.wrapped = B64.encode(wrapped);
                        cur.moved += 1;
                        changed = true;
                    }
                    if changed {
                        save(tx, key, &sk)?;
                    }
                    cur.after = Some(subject);
                }
                if rows.len() < batch {
                    // Last batch: the index key, then done.
                    if let Some(ik) = load::<IndexKey>(tx, &index_key_key())?
                        && ik.master != target
                    {
                        let wrapped = B64.decode(&ik.wrapped).map_err(corrupted)?;
                        let clear = self.master.unwrap(ik.master, &index_aad(ik.master), &wrapped)?;
                        let w = self.master.wrap(target, &index_aad(target), &clear)?;
                        save(
                            tx,
                            &index_key_key(),
                            &IndexKey {
                                master: target,
                                wrapped: B64.encode(w),
                            },
                        )?;
                        cur.moved += 1;
                    }
                    cur.finished = true;
                }
                save(tx, &cursor_key(), &cur)?;
                Ok(cur)
            })?;
            if cursor.finished {
                return Ok(cursor);
            }
        }
    }

    /// Whether every key is under the current master version, as far as
    /// the rewrap cursor knows (a store that never rewrapped has no cursor:
    /// then only a rewrap pass can tell).
    pub fn rewrap_done(&self, store: &dyn Store) -> Result<bool, VaultError> {
        let cur: Option<RewrapCursor> = store.snapshot(|tx| load(tx, &cursor_key()))?;
        Ok(cur.is_some_and(|c| c.target == self.master.current() && c.finished))
    }

    /// Counts data keys by the master version wrapping them.
    pub fn status(&self, store: &dyn Store) -> Result<VaultStatus, VaultError> {
        store.snapshot(|tx| {
            let (b, e) = keys::tuple_range(&("vault", "dek"));
            let mut by: std::collections::BTreeMap<u32, u64> = Default::default();
            let mut subjects = 0;
            for (_, v) in tx.get_range(&b, &e, 0, false)? {
                let sk: SubjectKeys = serde_json::from_slice(&v).map_err(corrupted)?;
                subjects += 1;
                for k in sk.keys {
                    *by.entry(k.master).or_default() += 1;
                }
            }
            if let Some(ik) = load::<IndexKey>(tx, &index_key_key())? {
                *by.entry(ik.master).or_default() += 1;
            }
            Ok(VaultStatus {
                current_master: self.master.current(),
                wrapped_by_master: by.into_iter().collect(),
                subjects,
                rewrap: load(tx, &cursor_key())?,
            })
        })
    }
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        VaultError::Store(e.to_string())
    }
}
