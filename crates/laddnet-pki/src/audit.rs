//! The security audit log: append-only and hash-chained. Each entry's hash
//! is SHA-256 over the previous entry's hash and the entry's own fields, and
//! a head record names the last entry, so altering, removing or truncating
//! entries is detected by [`verify`].
//!
//! Entries are appended inside the same transaction as the action they
//! record: there is no issuance without its audit entry, and no audit entry
//! for an action that did not commit.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use laddnet_store::{Store, StoreExt, Transaction, keys};

use crate::PkiError;
use crate::records::{get_json, put_json};

/// What happened.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuditKind {
    PkiInit,
    Issue,
    Renew,
    Revoke,
    TokenCreate,
    Enroll,
    Crl,
    /// A peer was refused: bad token, impersonation attempt, revoked or
    /// unknown certificate, wrong role.
    AuthRefused,
    /// A peer misbehaved after authenticating (claims another identity).
    SecurityEvent,
    /// Someone read or exported a driver's personal data.
    PersonalDataRead,
    /// A driver's personal data was destroyed (crypto-shredded).
    PersonalDataErased,
    /// A driver account or token was created or changed.
    DriverChanged,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::PkiInit => "pki-init",
            AuditKind::Issue => "issue",
            AuditKind::Renew => "renew",
            AuditKind::Revoke => "revoke",
            AuditKind::TokenCreate => "token-create",
            AuditKind::Enroll => "enroll",
            AuditKind::Crl => "crl",
            AuditKind::AuthRefused => "auth-refused",
            AuditKind::PersonalDataRead => "personal-data-read",
            AuditKind::PersonalDataErased => "personal-data-erased",
            AuditKind::DriverChanged => "driver-changed",
            AuditKind::SecurityEvent => "security-event",
        }
    }
}

/// One audit entry. `detail` never holds secrets (token values, keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix seconds, UTC.
    pub at: i64,
    pub kind: AuditKind,
    pub actor: String,
    pub subject: String,
    pub detail: String,
    /// Hex SHA-256 of the previous entry (all zeros for the first).
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct AuditHead {
    seq: u64,
    hash: String,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn entry_key(seq: u64) -> Vec<u8> {
    keys::pack(&("pki", "audit", seq))
}
fn head_key() -> Vec<u8> {
    keys::pack(&("pki", "audit-head"))
}

fn digest(e: &AuditEntry) -> String {
    let mut h = Sha256::new();
    // Length-prefixed fields: no two different entries hash alike.
    for field in [
        e.prev_hash.as_bytes(),
        &e.seq.to_be_bytes(),
        &e.at.to_be_bytes(),
        e.kind.as_str().as_bytes(),
        e.actor.as_bytes(),
        e.subject.as_bytes(),
        e.detail.as_bytes(),
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field);
    }
    hex::encode(h.finalize())
}

/// Appends an entry inside `tx`.
pub fn append(
    tx: &mut dyn Transaction,
    now: i64,
    kind: AuditKind,
    actor: &str,
    subject: &str,
    detail: &str,
) -> Result<AuditEntry, PkiError> {
    let head: Option<AuditHead> = get_json(tx, &head_key())?;
    let (seq, prev_hash) = match head {
        Some(h) => (h.seq + 1, h.hash),
        None => (1, GENESIS.to_string()),
    };
    let mut entry = AuditEntry {
        seq,
        at: now,
        kind,
        actor: actor.into(),
        subject: subject.into(),
        detail: detail.into(),
        prev_hash,
        hash: String::new(),
    };
    entry.hash = digest(&entry);
    put_json(tx, &entry_key(seq), &entry)?;
    put_json(
        tx,
        &head_key(),
        &AuditHead {
            seq,
            hash: entry.hash.clone(),
        },
    )?;
    Ok(entry)
}

/// Entries after `after_seq`, at most `limit`, oldest first.
pub fn list(store: &dyn Store, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, PkiError> {
    let begin = entry_key(after_seq + 1);
    let (_, end) = keys::tuple_range(&("pki", "audit"));
    store.snapshot(|tx| {
        tx.get_range(&begin, &end, limit, false)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| PkiError::Corrupted(format!("audit entry: {e}"))))
            .collect()
    })
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerdict {
    pub entries: u64,
    /// The first entry found broken, and how.
    pub problem: Option<(u64, String)>,
}

/// Walks the whole chain and checks every link, and the head.
pub fn verify(store: &dyn Store) -> Result<AuditVerdict, PkiError> {
    const PAGE: usize = 1000;
    let head: Option<AuditHead> = store.snapshot(|tx| get_json(tx, &head_key()))?;
    let mut prev = GENESIS.to_string();
    let mut expected_seq = 1u64;
    let (begin, end) = keys::tuple_range(&("pki", "audit"));
    let mut from = begin;
    loop {
        let rows = store.snapshot(|tx| tx.get_range(&from, &end, PAGE, false).map_err(PkiError::from))?;
        let done = rows.len() < PAGE;
        for (k, v) in &rows {
            let bad = |seq: u64, why: String| {
                Ok(AuditVerdict {
                    entries: seq.saturating_sub(1),
                    problem: Some((seq, why)),
                })
            };
            let e: AuditEntry = match serde_json::from_slice(v) {
                Ok(e) => e,
                Err(e) => return bad(expected_seq, format!("entry does not parse: {e}")),
            };
            if e.seq != expected_seq {
                return bad(
                    expected_seq,
                    format!("entry {expected_seq} is missing (found {} next)", e.seq),
                );
            }
            if *k != entry_key(e.seq) {
                return bad(expected_seq, "entry stored under the wrong key".into());
            }
            if e.prev_hash != prev {
                return bad(e.seq, "previous-hash link is broken".into());
            }
            if digest(&e) != e.hash {
                return bad(e.seq, "entry content does not match its hash (altered)".into());
            }
            prev = e.hash.clone();
            expected_seq += 1;
            from = entry_key(e.seq + 1);
        }
        if done {
            break;
        }
    }
    let count = expected_seq - 1;
    match head {
        None if count == 0 => Ok(AuditVerdict {
            entries: 0,
            problem: None,
        }),
        None => Ok(AuditVerdict {
            entries: count,
            problem: Some((count, "head record is missing".into())),
        }),
        Some(h) if h.seq != count || h.hash != prev => Ok(AuditVerdict {
            entries: count,
            problem: Some((
                count + 1,
                format!(
                    "log ends at entry {count} but the head names entry {} (entries removed from the end)",
                    h.seq
                ),
            )),
        }),
        Some(_) => Ok(AuditVerdict {
            entries: count,
            problem: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use laddnet_store::RedbStore;

    fn store_with(n: u64) -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path().join("a.redb")).unwrap();
        for i in 0..n {
            s.transact(|tx| append(tx, 1000 + i as i64, AuditKind::Issue, "system", &format!("cp-{i}"), "x"))
                .unwrap();
        }
        (dir, s)
    }

    #[test]
    fn intact_chain_verifies() {
        let (_d, s) = store_with(5);
        assert_eq!(
            verify(&s).unwrap(),
            AuditVerdict {
                entries: 5,
                problem: None
            }
        );
        assert_eq!(list(&s, 2, 10).unwrap().first().unwrap().seq, 3);
    }

    #[test]
    fn altered_entry_is_detected() {
        let (_d, s) = store_with(5);
        s.transact(|tx| {
            let mut e: AuditEntry = get_json(tx, &entry_key(3))?.unwrap();
            e.subject = "someone-else".into();
            put_json(tx, &entry_key(3), &e)
        })
        .unwrap();
        let v = verify(&s).unwrap();
        assert_eq!(v.problem.as_ref().unwrap().0, 3, "{v:?}");
        assert!(v.problem.unwrap().1.contains("altered"));
    }

    #[test]
    fn altered_and_rehashed_entry_breaks_the_next_link() {
        let (_d, s) = store_with(5);
        s.transact(|tx| {
            let mut e: AuditEntry = get_json(tx, &entry_key(2))?.unwrap();
            e.detail = "nothing to see".into();
            e.hash = digest(&e);
            put_json(tx, &entry_key(2), &e)
        })
        .unwrap();
        assert_eq!(verify(&s).unwrap().problem.unwrap().0, 3);
    }

    #[test]
    fn removed_entries_are_detected() {
        let (_d, s) = store_with(5);
        s.transact(|tx| tx.clear(&entry_key(2)).map_err(PkiError::from))
            .unwrap();
        assert_eq!(verify(&s).unwrap().problem.unwrap().0, 2);

        let (_d2, s2) = store_with(5);
        s2.transact(|tx| tx.clear(&entry_key(5)).map_err(PkiError::from))
            .unwrap();
        let v = verify(&s2).unwrap();
        assert!(v.problem.unwrap().1.contains("removed from the end"));
    }
}
