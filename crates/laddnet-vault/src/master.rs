//! Master keys: the keys that wrap per-subject data keys. Behind the
//! [`MasterKeys`] trait so a KMS (which never hands out its keys, only
//! wraps and unwraps) can replace the local implementation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aes_gcm::Nonce;
use aes_gcm::aead::{Aead, Payload};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::{VaultError, cipher, create_key_file, read_key_file};

/// Wraps and unwraps 32-byte data keys under versioned master keys.
pub trait MasterKeys: Send + Sync {
    /// The version new wraps use: the highest one available.
    fn current(&self) -> u32;
    /// The versions this instance can unwrap.
    fn versions(&self) -> Vec<u32>;
    fn wrap(&self, version: u32, aad: &[u8], key: &[u8; 32]) -> Result<Vec<u8>, VaultError>;
    fn unwrap(&self, version: u32, aad: &[u8], wrapped: &[u8]) -> Result<Zeroizing<[u8; 32]>, VaultError>;
}

/// Master keys held by this process: files `master-v<N>.key` (32 bytes,
/// hex, mode 0600) in a directory, and/or the environment variable
/// `LADDNET_MASTER_KEYS` = `1=<hex>,2=<hex>` (for secret managers that
/// inject environment, never logged).
pub struct LocalMasterKeys {
    keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

pub const MASTER_KEYS_ENV: &str = "LADDNET_MASTER_KEYS";

fn key_path(dir: &Path, version: u32) -> PathBuf {
    dir.join(format!("master-v{version}.key"))
}

/// One master key's bytes, wiped when dropped.
pub type MasterKey = Zeroizing<[u8; 32]>;

fn parse_hex32(text: &str) -> Option<Zeroizing<[u8; 32]>> {
    let t = text.trim();
    if t.len() != 64 {
        return None;
    }
    let mut k = Zeroizing::new([0u8; 32]);
    for (i, c) in t.as_bytes().chunks(2).enumerate() {
        k[i] = u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok()?;
    }
    Some(k)
}

impl LocalMasterKeys {
    /// Keys from explicit values (tests, embedding).
    pub fn from_keys(keys: impl IntoIterator<Item = (u32, [u8; 32])>) -> Result<Self, VaultError> {
        let keys: BTreeMap<_, _> = keys.into_iter().map(|(v, k)| (v, Zeroizing::new(k))).collect();
        if keys.is_empty() || keys.contains_key(&0) {
            return Err(VaultError::Malformed("master key versions start at 1".into()));
        }
        Ok(Self { keys })
    }

    /// Loads every `master-v<N>.key` in `dir` and the keys in
    /// `LADDNET_MASTER_KEYS`. With none anywhere, creates `master-v1.key`
    /// when `create` is true.
    pub fn load(dir: &Path, create: bool) -> Result<Self, VaultError> {
        let mut keys = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(v) = name
                    .strip_prefix("master-v")
                    .and_then(|r| r.strip_suffix(".key"))
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if v == 0 {
                    return Err(VaultError::Malformed(format!("{name}: versions start at 1")));
                }
                keys.insert(v, read_key_file(&entry.path())?);
            }
        }
        if let Ok(spec) = std::env::var(MASTER_KEYS_ENV) {
            keys.extend(Self::parse_spec(&spec)?);
        }
        if keys.is_empty() {
            if !create {
                return Err(VaultError::KeyFile {
                    path: dir.to_owned(),
                    reason: format!("no master key (master-v<N>.key here or {MASTER_KEYS_ENV})"),
                });
            }
            std::fs::create_dir_all(dir).map_err(|e| VaultError::KeyFile {
                path: dir.to_owned(),
                reason: e.to_string(),
            })?;
            let path = key_path(dir, 1);
            create_key_file(&path)?;
            keys.insert(1, read_key_file(&path)?);
        }
        Ok(Self { keys })
    }

    /// Parses `LADDNET_MASTER_KEYS`: `VERSION=HEX` pairs (64 hex
    /// characters each) separated by commas.
    pub fn parse_spec(spec: &str) -> Result<Vec<(u32, MasterKey)>, VaultError> {
        let mut out = Vec::new();
        for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
            let (v, hex) = part
                .split_once('=')
                .ok_or_else(|| VaultError::Malformed(format!("{MASTER_KEYS_ENV}: expected VERSION=HEX pairs")))?;
            let v: u32 = v
                .trim()
                .parse()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| VaultError::Malformed(format!("{MASTER_KEYS_ENV}: bad version {:?}", v.trim())))?;
            let k = parse_hex32(hex).ok_or_else(|| {
                VaultError::Malformed(format!("{MASTER_KEYS_ENV}: version {v} is not 64 hex characters"))
            })?;
            out.push((v, k));
        }
        Ok(out)
    }

    /// Adds master key version current+1 as a new file in `dir`; returns
    /// the new version. Data keys are rewrapped under it by
    /// [`crate::Vault::rewrap`]; until that finishes the old key must stay.
    pub fn rotate(dir: &Path) -> Result<u32, VaultError> {
        let have = Self::load(dir, false)?;
        let next = have.current() + 1;
        create_key_file(&key_path(dir, next))?;
        Ok(next)
    }

    /// Path of a version's key file in `dir`.
    pub fn path(dir: &Path, version: u32) -> PathBuf {
        key_path(dir, version)
    }
}

impl MasterKeys for LocalMasterKeys {
    fn current(&self) -> u32 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    fn wrap(&self, version: u32, aad: &[u8], key: &[u8; 32]) -> Result<Vec<u8>, VaultError> {
        let master = self.keys.get(&version).ok_or(VaultError::MissingMasterKey(version))?;
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = cipher(master)
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: key, aad })
            .map_err(|_| VaultError::Seal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unwrap(&self, version: u32, aad: &[u8], wrapped: &[u8]) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let master = self.keys.get(&version).ok_or(VaultError::MissingMasterKey(version))?;
        if wrapped.len() != 12 + 32 + 16 {
            return Err(VaultError::Malformed("wrapped key has the wrong length".into()));
        }
        let pt = Zeroizing::new(
            cipher(master)
                .decrypt(
                    Nonce::from_slice(&wrapped[..12]),
                    Payload {
                        msg: &wrapped[12..],
                        aad,
                    },
                )
                .map_err(|_| VaultError::Open)?,
        );
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&pt);
        Ok(k)
    }
}
