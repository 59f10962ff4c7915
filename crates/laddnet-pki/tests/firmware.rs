//! Firmware signing with a real CA: what a charger accepts and refuses.

use std::sync::Arc;

use laddnet_pki::firmware::verify_firmware;
use laddnet_pki::{Ca, CaFiles, Policy, Subject};
use laddnet_vault::KeySource;
use sha2::{Digest, Sha256};

fn new_ca(dir: &std::path::Path) -> (Ca, KeySource) {
    let key = dir.join("kek");
    laddnet_vault::create_key_file(&key).unwrap();
    let source = KeySource::KeyFile(key);
    let store: laddnet_store::SharedStore = Arc::new(laddnet_store::RedbStore::open(dir.join("store.redb")).unwrap());
    let files = CaFiles::new(dir.join("ca"));
    let policy = Policy::default();
    let clock = laddnet_pki::system_clock();
    laddnet_pki::init(&files, &policy, &source, &store, &clock).unwrap();
    (Ca::open(&files, policy, &source, store, clock).unwrap(), source)
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[test]
fn a_signed_image_verifies_and_every_tampering_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, source) = new_ca(dir.path());
    let signer = ca.firmware_signer(&source).unwrap();
    // The same signer comes back while it is valid.
    assert_eq!(ca.firmware_signer(&source).unwrap().serial, signer.serial);
    assert_eq!(ca.get(&signer.serial).unwrap().profile.as_str(), "firmware-signing");

    let image = b"firmware image bytes".repeat(1000);
    let sha = Sha256::digest(&image).to_vec();
    let sig = signer.sign("2.0.0", &sha).unwrap();
    let root = ca.root_pem();
    verify_firmware(root, &signer.chain_pem, "2.0.0", &image, &sha, &sig, now()).unwrap();

    // A changed byte in the image.
    let mut bad = image.clone();
    bad[100] ^= 1;
    let e = verify_firmware(root, &signer.chain_pem, "2.0.0", &bad, &sha, &sig, now()).unwrap_err();
    assert!(e.to_string().contains("SHA-256"), "{e}");
    // The right image under another version (a downgrade or a relabel).
    let e = verify_firmware(root, &signer.chain_pem, "2.0.1", &image, &sha, &sig, now()).unwrap_err();
    assert!(e.to_string().contains("signature does not verify"), "{e}");
    // A changed signature.
    let mut bad_sig = sig.clone();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    assert!(verify_firmware(root, &signer.chain_pem, "2.0.0", &image, &sha, &bad_sig, now()).is_err());
    // Another image hashed and "announced" with the old signature.
    let other = b"other".to_vec();
    let other_sha = Sha256::digest(&other).to_vec();
    assert!(verify_firmware(root, &signer.chain_pem, "2.0.0", &other, &other_sha, &sig, now()).is_err());
    // A certificate of this CA that is not for code signing: a charger's.
    let (issued, key) = ca
        .issue_with_new_key(
            &Subject::Charger {
                id: laddnet_core::ChargerId::new("CP-1").unwrap(),
                site: None,
            },
            "test",
        )
        .unwrap();
    let kp = rcgen::KeyPair::from_pem(&key).unwrap();
    let sig2 = rcgen::SigningKey::sign(&kp, &laddnet_pki::firmware::firmware_message("2.0.0", &sha)).unwrap();
    let e = verify_firmware(root, &issued.chain_pem, "2.0.0", &image, &sha, &sig2, now()).unwrap_err();
    assert!(e.to_string().contains("not for code signing"), "{e}");
    // A signer from another CA.
    let dir2 = tempfile::tempdir().unwrap();
    let (other_ca, source2) = new_ca(dir2.path());
    let foreign = other_ca.firmware_signer(&source2).unwrap();
    let sig3 = foreign.sign("2.0.0", &sha).unwrap();
    let e = verify_firmware(root, &foreign.chain_pem, "2.0.0", &image, &sha, &sig3, now()).unwrap_err();
    assert!(e.to_string().contains("not signed by the laddnet root"), "{e}");
    // After the signer expired.
    let e = verify_firmware(
        root,
        &signer.chain_pem,
        "2.0.0",
        &image,
        &sha,
        &sig,
        now() + 800 * 86_400,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not valid now"), "{e}");
    // Garbage chains are refused with a reason.
    assert!(verify_firmware(root, "not pem", "2.0.0", &image, &sha, &sig, now()).is_err());
}
