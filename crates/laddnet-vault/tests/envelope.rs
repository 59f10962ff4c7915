//! RELIABILITY 17–19 for the envelope scheme, on the real embedded store.

use std::collections::HashSet;
use std::sync::Arc;

use laddnet_store::{RedbStore, Store, StoreExt, keys};
use laddnet_vault::{FieldRef, LocalMasterKeys, MasterKeys, Vault, VaultError};

const NAME: FieldRef<'static> = FieldRef {
    table: "driver",
    field: "name",
    record_id: "drv-1",
};

fn master(versions: &[u32]) -> Arc<dyn MasterKeys> {
    Arc::new(LocalMasterKeys::from_keys(versions.iter().map(|v| (*v, [*v as u8; 32]))).unwrap())
}

fn store() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path().join("s.redb")).unwrap();
    (dir, s)
}

fn seal(v: &Vault, s: &dyn Store, subject: &str, at: FieldRef<'_>, pt: &[u8]) -> Vec<u8> {
    s.transact(|tx| {
        v.create_subject(tx, subject)?;
        v.seal_field(tx, subject, at, pt)
    })
    .unwrap()
}

fn open(v: &Vault, s: &dyn Store, subject: &str, at: FieldRef<'_>, blob: &[u8]) -> Result<Vec<u8>, VaultError> {
    s.snapshot(|tx| v.open_field(tx, subject, at, blob).map(|p| p.to_vec()))
}

#[test]
fn ciphertext_moved_to_another_table_field_record_subject_or_version_fails() {
    let (_d, s) = store();
    let v = Vault::load(&s, master(&[1])).unwrap();
    let blob = seal(&v, &s, "drv-1", NAME, b"Ada Lovelace");
    assert_eq!(open(&v, &s, "drv-1", NAME, &blob).unwrap(), b"Ada Lovelace");
    seal(&v, &s, "drv-2", NAME, b"x");
    let elsewhere = [
        ("drv-1", FieldRef { field: "email", ..NAME }),
        ("drv-1", FieldRef { table: "token", ..NAME }),
        (
            "drv-1",
            FieldRef {
                record_id: "drv-2",
                ..NAME
            },
        ),
        ("drv-2", NAME),
        (
            "drv-2",
            FieldRef {
                record_id: "drv-2",
                ..NAME
            },
        ),
    ];
    for (subject, at) in elsewhere {
        assert!(
            matches!(open(&v, &s, subject, at, &blob), Err(VaultError::Open)),
            "{subject} {at:?} must not open"
        );
    }
    // The key version is bound too: relabel the blob as another version.
    let mut relabelled = blob.clone();
    relabelled[4] ^= 1;
    assert!(open(&v, &s, "drv-1", NAME, &relabelled).is_err());
    // A flipped ciphertext bit fails; a truncated blob is a clear error.
    let mut flipped = blob.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(matches!(open(&v, &s, "drv-1", NAME, &flipped), Err(VaultError::Open)));
    assert!(matches!(
        open(&v, &s, "drv-1", NAME, &blob[..10]),
        Err(VaultError::Malformed(_))
    ));
}

#[test]
fn nonces_never_repeat_and_data_keys_rotate_long_before_2_pow_32() {
    const { assert!(laddnet_vault::envelope::DEFAULT_ROTATE_AFTER <= 1 << 31) };
    let (_d, s) = store();
    let v = Vault::load(&s, master(&[1])).unwrap().with_rotate_after(5);
    let mut nonces = HashSet::new();
    let mut blobs = Vec::new();
    for i in 0..23 {
        let blob = seal(&v, &s, "drv-1", NAME, format!("value {i}").as_bytes());
        assert!(nonces.insert(blob[5..17].to_vec()), "nonce repeated at {i}");
        blobs.push(blob);
    }
    let uses = s.snapshot(|tx| v.key_uses(tx, "drv-1")).unwrap();
    let versions: Vec<u32> = uses.iter().map(|u| u.0).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5], "a new data key every 5 encryptions");
    assert!(uses.iter().all(|u| u.2 <= 5), "no key used past its limit: {uses:?}");
    assert_eq!(uses.iter().map(|u| u.2).sum::<u64>(), 23, "every encryption counted");
    for (i, b) in blobs.iter().enumerate() {
        assert_eq!(open(&v, &s, "drv-1", NAME, b).unwrap(), format!("value {i}").as_bytes());
    }
    // A counter increment that is rolled back with its transaction is not
    // lost either way: the use is counted only if the write committed.
    let r = s.transact(|tx| -> Result<(), VaultError> {
        v.seal_field(tx, "drv-1", NAME, b"rolled back")?;
        Err(VaultError::Seal)
    });
    assert!(r.is_err());
    let after = s.snapshot(|tx| v.key_uses(tx, "drv-1")).unwrap();
    assert_eq!(after.iter().map(|u| u.2).sum::<u64>(), 23);
}

#[test]
fn master_rotation_new_writes_use_new_version_and_rewrap_resumes_after_a_crash() {
    let (_d, s) = store();
    let v1 = Vault::load(&s, master(&[1])).unwrap();
    let mut blobs = Vec::new();
    for i in 0..25 {
        let subject = format!("drv-{i:02}");
        let at = FieldRef {
            record_id: &subject,
            ..NAME
        };
        blobs.push((subject.clone(), seal(&v1, &s, &subject, at, subject.as_bytes())));
    }
    // Rotate: version 2 joins.
    let v2 = Vault::load(&s, master(&[1, 2])).unwrap();
    let new = seal(
        &v2,
        &s,
        "drv-new",
        FieldRef {
            record_id: "drv-new",
            ..NAME
        },
        b"n",
    );
    let st = v2.status(&s).unwrap();
    assert_eq!(st.current_master, 2);
    assert!(
        st.wrapped_by_master.contains(&(2, 1)),
        "new writes use the new version: {st:?}"
    );
    // Rewrap two batches of 4, then "crash".
    let cur = v2.rewrap(&s, 4, Some(2)).unwrap();
    assert!(!cur.finished);
    assert_eq!(cur.moved, 8);
    drop(v2);
    // A new process resumes from the cursor: it does not start over.
    let v2 = Vault::load(&s, master(&[1, 2])).unwrap();
    let cur = v2.rewrap(&s, 4, None).unwrap();
    assert!(cur.finished);
    assert_eq!(
        cur.moved,
        25 + 1,
        "each old wrapped key (and the index key) moved exactly once"
    );
    let st = v2.status(&s).unwrap();
    assert_eq!(st.wrapped_by_master, vec![(2, 27)], "{st:?}");
    // The old master key can now go: everything opens with version 2 alone.
    let only2 = Vault::load(&s, master(&[2])).unwrap();
    for (subject, blob) in &blobs {
        let at = FieldRef {
            record_id: subject,
            ..NAME
        };
        assert_eq!(open(&only2, &s, subject, at, blob).unwrap(), subject.as_bytes());
    }
    assert_eq!(
        open(
            &only2,
            &s,
            "drv-new",
            FieldRef {
                record_id: "drv-new",
                ..NAME
            },
            &new
        )
        .unwrap(),
        b"n"
    );
    // The blind index survives the rotation unchanged.
    assert_eq!(v1.blind_index("rfid", "04A1"), only2.blind_index("rfid", "04A1"));
    // Without the key wrapping the data, the vault refuses to open.
    let (_d2, fresh) = store();
    Vault::load(&fresh, master(&[1])).unwrap();
    assert!(matches!(
        Vault::load(&fresh, master(&[3])),
        Err(VaultError::MissingMasterKey(1))
    ));
}

#[test]
fn shredding_makes_every_copy_unreadable() {
    let (_d, s) = store();
    let v = Vault::load(&s, master(&[1])).unwrap();
    let blob = seal(&v, &s, "drv-1", NAME, b"Ada Lovelace");
    // A "backup" copy of the ciphertext elsewhere in the store.
    s.transact(|tx| tx.set(&keys::pack(&("backup", "x")), &blob)).unwrap();
    s.transact(|tx| v.shred(tx, "drv-1")).unwrap();
    let copy = s.snapshot(|tx| tx.get(&keys::pack(&("backup", "x")))).unwrap().unwrap();
    assert!(matches!(open(&v, &s, "drv-1", NAME, &copy), Err(VaultError::Shredded)));
    // Recreating the subject makes a new key, which does not open old data.
    seal(&v, &s, "drv-1", NAME, b"new");
    assert!(matches!(open(&v, &s, "drv-1", NAME, &copy), Err(VaultError::Open)));
}

#[test]
fn master_keys_load_from_files_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let kd = dir.path().join("keys");
    assert!(
        LocalMasterKeys::load(&kd, false).is_err(),
        "no key and no create: refused"
    );
    let k = LocalMasterKeys::load(&kd, true).unwrap();
    assert_eq!(k.current(), 1);
    assert_eq!(LocalMasterKeys::rotate(&kd).unwrap(), 2);
    let k = LocalMasterKeys::load(&kd, false).unwrap();
    assert_eq!(k.versions(), vec![1, 2]);
    assert!(LocalMasterKeys::path(&kd, 2).exists());
}
