//! Firmware signing: the node signs each uploaded image with a
//! firmware-signing key whose certificate the CA issues (profile
//! `firmware-signing`, code-signing usage only); a charger verifies the
//! image against the laddnet root it already trusts before installing.
//!
//! What is signed is [`firmware_message`]: a domain tag, the version and
//! the image's SHA-256, so a signature for one version can never pass for
//! another, and nothing else ever signed by the key can pass for firmware.

use rcgen::{KeyPair, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use laddnet_store::StoreExt;
use laddnet_vault::{KeySource, SealedBox};

use crate::ca::{Ca, Subject};
use crate::{CertStatus, PkiError};

const AAD_FIRMWARE: &[u8] = b"laddnet/ca/firmware-signing-key/v1";
const SIGNER_NAME: &str = "laddnet-firmware-signing";

/// The bytes a firmware signature covers.
pub fn firmware_message(version: &str, sha256: &[u8]) -> Vec<u8> {
    format!("laddnet-firmware/v1\n{version}\n{}", hex::encode(sha256)).into_bytes()
}

/// The key images are signed with, and its chain (leaf, intermediate).
pub struct FirmwareSigner {
    key: KeyPair,
    pub chain_pem: String,
    pub serial: String,
}

impl std::fmt::Debug for FirmwareSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirmwareSigner")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl FirmwareSigner {
    /// Signs `version` with the image hash `sha256`.
    pub fn sign(&self, version: &str, sha256: &[u8]) -> Result<Vec<u8>, PkiError> {
        Ok(self.key.sign(&firmware_message(version, sha256))?)
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSigner {
    serial: String,
    chain_pem: String,
    key: SealedBox,
}

fn signer_key() -> Vec<u8> {
    laddnet_store::keys::pack(&("pki", "firmware-signer"))
}

impl Ca {
    /// The current firmware signer: the stored one while its certificate is
    /// valid and outside its renewal window, else a new key and certificate
    /// (the old images stay valid: their signatures name their own chain).
    /// The key is kept in the store sealed under `source`, so every node of
    /// a cluster signs with the same one.
    pub fn firmware_signer(&self, source: &KeySource) -> Result<FirmwareSigner, PkiError> {
        let stored: Option<StoredSigner> = self.store().snapshot(|tx| {
            tx.get(&signer_key())?
                .map(|v| serde_json::from_slice(&v).map_err(|e| PkiError::Corrupted(format!("firmware signer: {e}"))))
                .transpose()
        })?;
        let now = self.now();
        if let Some(s) = stored {
            let rec = self.get(&s.serial)?;
            let window = i64::from(
                self.policy()
                    .profile(crate::Profile::FirmwareSigning)
                    .renewal_window_days,
            ) * 86_400;
            if rec.status(now) == CertStatus::Valid && rec.not_after - now > window {
                let der = laddnet_vault::open(source, AAD_FIRMWARE, &s.key)?;
                let key = KeyPair::try_from(der.as_slice())
                    .map_err(|e| PkiError::Key(format!("firmware-signing key does not load: {e}")))?;
                return Ok(FirmwareSigner {
                    key,
                    chain_pem: s.chain_pem,
                    serial: s.serial,
                });
            }
        }
        let subject = Subject::FirmwareSigning {
            name: SIGNER_NAME.into(),
        };
        let (issued, key_pem) = self.issue_with_new_key(&subject, "system")?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| PkiError::Key(format!("new firmware-signing key does not load: {e}")))?;
        let sealed = laddnet_vault::seal(source, AAD_FIRMWARE, &key.serialize_der())?;
        let record = StoredSigner {
            serial: issued.record.serial.clone(),
            chain_pem: issued.chain_pem.clone(),
            key: sealed,
        };
        let json = serde_json::to_vec(&record).map_err(|e| PkiError::Corrupted(e.to_string()))?;
        self.store().transact(|tx| {
            tx.set(&signer_key(), &json)?;
            Ok::<_, PkiError>(())
        })?;
        tracing::info!(serial = %issued.record.serial, "firmware-signing certificate issued");
        Ok(FirmwareSigner {
            key,
            chain_pem: issued.chain_pem,
            serial: issued.record.serial,
        })
    }
}

/// What a charger checks before installing an image:
///
/// 1. the image's SHA-256 is the one announced;
/// 2. the signer chain (leaf, intermediate) chains to `root_pem`, each
///    certificate valid at `now` (Unix seconds), the intermediate a CA;
/// 3. the leaf carries the code-signing usage;
/// 4. the signature over [`firmware_message`] verifies with the leaf's key.
pub fn verify_firmware(
    root_pem: &str,
    signer_chain_pem: &str,
    version: &str,
    image: &[u8],
    sha256: &[u8],
    signature: &[u8],
    now: i64,
) -> Result<(), PkiError> {
    let bad = |m: String| Err(PkiError::BadCertificate(m));
    let digest = Sha256::digest(image);
    if digest.as_slice() != sha256 {
        return Err(PkiError::Invalid(format!(
            "image SHA-256 {} is not the announced {}",
            hex::encode(digest),
            hex::encode(sha256)
        )));
    }
    let root = ::pem::parse(root_pem).map_err(|e| PkiError::BadCertificate(format!("root: {e}")))?;
    let chain =
        ::pem::parse_many(signer_chain_pem).map_err(|e| PkiError::BadCertificate(format!("signer chain: {e}")))?;
    let [leaf, intermediate] = chain.as_slice() else {
        return bad(format!(
            "signer chain has {} certificates; expected the signer and the intermediate",
            chain.len()
        ));
    };
    let (_, root) =
        X509Certificate::from_der(root.contents()).map_err(|e| PkiError::BadCertificate(format!("root: {e}")))?;
    let (_, int) = X509Certificate::from_der(intermediate.contents())
        .map_err(|e| PkiError::BadCertificate(format!("intermediate: {e}")))?;
    let (_, leaf) =
        X509Certificate::from_der(leaf.contents()).map_err(|e| PkiError::BadCertificate(format!("signer: {e}")))?;
    let at = ASN1Time::from_timestamp(now).map_err(|e| PkiError::Invalid(format!("time: {e}")))?;
    for (what, c) in [("intermediate", &int), ("signer", &leaf)] {
        if !c.validity().is_valid_at(at) {
            return bad(format!("the {what} certificate is not valid now"));
        }
    }
    if !int.is_ca() {
        return bad("the signer's issuer is not a CA".into());
    }
    int.verify_signature(Some(root.public_key()))
        .map_err(|_| PkiError::BadCertificate("the intermediate is not signed by the laddnet root".into()))?;
    leaf.verify_signature(Some(int.public_key()))
        .map_err(|_| PkiError::BadCertificate("the signer is not signed by the intermediate".into()))?;
    let code_signing = leaf
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.code_signing);
    if !code_signing {
        return bad("the signer certificate is not for code signing".into());
    }
    let msg = firmware_message(version, sha256);
    let public = leaf.public_key().subject_public_key.data.as_ref();
    let ok = [
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        &ring::signature::ECDSA_P384_SHA384_ASN1,
    ]
    .into_iter()
    .any(|alg| {
        ring::signature::UnparsedPublicKey::new(alg, public)
            .verify(&msg, signature)
            .is_ok()
    });
    if !ok {
        return Err(PkiError::Invalid(format!(
            "the signature does not verify for firmware {version:?}"
        )));
    }
    Ok(())
}
