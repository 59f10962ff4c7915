//! laddnet's encryption at rest: AES-256-GCM sealing with additional
//! authenticated data, under a key-encryption key (KEK) that comes from a
//! key file (created mode 0600) or a passphrase (Argon2id).
//!
//! Two uses: [`seal`]/[`open`] protect the CA's intermediate key, and
//! [`Vault`] is the envelope encryption of drivers' personal data
//! (per-driver data keys wrapped by versioned master keys, see
//! [`envelope`]).
//!
//! Nonces are 96 random bits, fresh for every seal. The AAD binds a
//! ciphertext to what it is (for the CA key: `"laddnet/ca/intermediate-key/v1"`),
//! so a sealed blob moved elsewhere fails to open.

#![forbid(unsafe_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub mod envelope;
mod master;

pub use envelope::{FieldRef, RewrapCursor, Vault, VaultStatus, hmac};
pub use master::{LocalMasterKeys, MASTER_KEYS_ENV, MasterKeys};
pub use zeroize::Zeroizing as Secret;

/// Why sealing or opening failed. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("sealed data is malformed: {0}")]
    Malformed(String),
    #[error("cannot open sealed data: wrong key or passphrase, or the data was altered or moved")]
    Open,
    #[error("sealed with a {sealed} but given a {given}")]
    WrongSource { sealed: &'static str, given: &'static str },
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("encryption failed")]
    Seal,
    #[error("master key version {0} is not available")]
    MissingMasterKey(u32),
    #[error("the data keys were destroyed (erased) or never existed")]
    Shredded,
    #[error("store: {0}")]
    Store(String),
}

/// Where the key-encryption key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// 32 random bytes, hex, in a file only its owner may read.
    KeyFile(PathBuf),
    /// A passphrase stretched with Argon2id.
    Passphrase(Zeroizing<String>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::KeyFile(p) => f.debug_tuple("KeyFile").field(p).finish(),
            KeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
        }
    }
}

impl KeySource {
    fn name(&self) -> &'static str {
        match self {
            KeySource::KeyFile(_) => "key file",
            KeySource::Passphrase(_) => "passphrase",
        }
    }
}

/// Argon2id cost: 64 MiB, 3 passes, 1 lane (above OWASP's minimum).
const ARGON_M_KIB: u32 = 64 * 1024;
const ARGON_T: u32 = 3;
const ARGON_P: u32 = 1;

/// How the KEK of a sealed box was obtained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Kdf {
    KeyFile,
    Argon2id { salt: String, m_kib: u32, t: u32, p: u32 },
}

/// A sealed secret as stored on disk (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealedBox {
    pub version: u32,
    pub alg: String,
    pub kdf: Kdf,
    pub nonce: String,
    pub ciphertext: String,
}

/// Creates a new random key file at `path` with mode 0600. Refuses to
/// overwrite an existing file.
pub fn create_key_file(path: &Path) -> Result<(), VaultError> {
    let err = |reason: String| VaultError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(key.as_mut());
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
    let hex: Zeroizing<String> = Zeroizing::new(key.iter().map(|b| format!("{b:02x}")).collect());
    f.write_all(hex.as_bytes()).map_err(|e| err(e.to_string()))?;
    f.sync_all().map_err(|e| err(e.to_string()))?;
    Ok(())
}

pub(crate) fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let err = |reason: String| VaultError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).map_err(|e| err(e.to_string()))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "mode {:o} lets others read it; chmod 600 it",
                mode & 0o777
            )));
        }
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    let hex = text.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err("expected 64 hex characters (32 bytes)".into()));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| err("not hex".into()))?;
        key[i] = u8::from_str_radix(s, 16).map_err(|_| err("not hex".into()))?;
    }
    Ok(key)
}

fn argon(pass: &str, salt: &[u8], m: u32, t: u32, p: u32) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let params = argon2::Params::new(m, t, p, Some(32)).map_err(|e| VaultError::Kdf(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    a.hash_password_into(pass.as_bytes(), salt, key.as_mut())
        .map_err(|e| VaultError::Kdf(e.to_string()))?;
    Ok(key)
}

pub(crate) fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(key.into())
}

/// Seals `plaintext` under the KEK from `source`, bound to `aad`.
pub fn seal(source: &KeySource, aad: &[u8], plaintext: &[u8]) -> Result<SealedBox, VaultError> {
    let (key, kdf) = match source {
        KeySource::KeyFile(path) => (read_key_file(path)?, Kdf::KeyFile),
        KeySource::Passphrase(pass) => {
            let mut salt = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut salt);
            let key = argon(pass, &salt, ARGON_M_KIB, ARGON_T, ARGON_P)?;
            (
                key,
                Kdf::Argon2id {
                    salt: B64.encode(salt),
                    m_kib: ARGON_M_KIB,
                    t: ARGON_T,
                    p: ARGON_P,
                },
            )
        }
    };
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = cipher(&key)
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
        .map_err(|_| VaultError::Seal)?;
    Ok(SealedBox {
        version: 1,
        alg: "AES-256-GCM".into(),
        kdf,
        nonce: B64.encode(nonce),
        ciphertext: B64.encode(ct),
    })
}

/// Opens a sealed box with the KEK from `source`, checking `aad`.
pub fn open(source: &KeySource, aad: &[u8], sealed: &SealedBox) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    if sealed.version != 1 || sealed.alg != "AES-256-GCM" {
        return Err(VaultError::Malformed(format!(
            "unsupported version {} / algorithm {}",
            sealed.version, sealed.alg
        )));
    }
    let key = match (&sealed.kdf, source) {
        (Kdf::KeyFile, KeySource::KeyFile(path)) => read_key_file(path)?,
        (Kdf::Argon2id { salt, m_kib, t, p }, KeySource::Passphrase(pass)) => {
            let salt = B64
                .decode(salt)
                .map_err(|e| VaultError::Malformed(format!("salt: {e}")))?;
            // Refuse absurd costs from a tampered file rather than hang.
            if *m_kib > 4 * 1024 * 1024 || *t > 64 || *p > 64 {
                return Err(VaultError::Malformed("argon2 cost out of range".into()));
            }
            argon(pass, &salt, *m_kib, *t, *p)?
        }
        (Kdf::KeyFile, given) => {
            return Err(VaultError::WrongSource {
                sealed: "key file",
                given: given.name(),
            });
        }
        (Kdf::Argon2id { .. }, given) => {
            return Err(VaultError::WrongSource {
                sealed: "passphrase",
                given: given.name(),
            });
        }
    };
    let nonce = B64
        .decode(&sealed.nonce)
        .map_err(|e| VaultError::Malformed(format!("nonce: {e}")))?;
    if nonce.len() != 12 {
        return Err(VaultError::Malformed("nonce is not 96 bits".into()));
    }
    let ct = B64
        .decode(&sealed.ciphertext)
        .map_err(|e| VaultError::Malformed(format!("ciphertext: {e}")))?;
    let pt = cipher(&key)
        .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad })
        .map_err(|_| VaultError::Open)?;
    Ok(Zeroizing::new(pt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_binds_aad() {
        let dir = tempfile::tempdir().unwrap();
        let kf = dir.path().join("kek");
        create_key_file(&kf).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&kf).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(create_key_file(&kf).is_err(), "never overwrites a key file");
        let src = KeySource::KeyFile(kf);
        let sealed = seal(&src, b"table/a", b"secret").unwrap();
        assert_eq!(&open(&src, b"table/a", &sealed).unwrap()[..], b"secret");
        assert!(matches!(open(&src, b"table/b", &sealed), Err(VaultError::Open)));
        // Nonces are fresh each time.
        let again = seal(&src, b"table/a", b"secret").unwrap();
        assert_ne!(sealed.nonce, again.nonce);
        assert_ne!(sealed.ciphertext, again.ciphertext);
    }

    #[test]
    fn passphrase_round_trip_and_wrong_passphrase() {
        let src = KeySource::Passphrase(Zeroizing::new("correct horse".into()));
        let sealed = seal(&src, b"x", b"secret").unwrap();
        assert_eq!(&open(&src, b"x", &sealed).unwrap()[..], b"secret");
        let wrong = KeySource::Passphrase(Zeroizing::new("battery staple".into()));
        assert!(matches!(open(&wrong, b"x", &sealed), Err(VaultError::Open)));
        assert!(format!("{src:?}").contains("redacted"));
    }

    #[test]
    fn loose_key_file_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kf = dir.path().join("kek");
        create_key_file(&kf).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&kf, fs::Permissions::from_mode(0o644)).unwrap();
            let e = seal(&KeySource::KeyFile(kf), b"", b"").unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{e}");
        }
    }
}
