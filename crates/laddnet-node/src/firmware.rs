//! Firmware images and staged update campaigns.
//!
//! - An uploaded image is stored in chunks ([`crate::blobs`]; its metadata
//!   last, so a half-written upload is never visible) and signed with the CA's
//!   firmware-signing key ([`laddnet_pki::firmware`]).
//! - A campaign sends `UpdateFirmware` to its chargers in two stages: a
//!   canary share first (the first chargers by id), then the rest. A stage
//!   with more failures than `max_failures` halts the campaign; the chargers
//!   not yet told are skipped. A charger that does not finish within the
//!   timeout has failed. Each charger's progress comes from its
//!   `FirmwareStatus` messages; a charger refuses an image that does not
//!   verify (`signature-invalid`), which is a failure like any other.
//! - The campaign's driver runs on the node and resumes after a restart.

use std::sync::Arc;
use std::time::Duration;

use laddnet_proto::v1;
use laddnet_store::{Store, StoreExt, keys};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::blobs::{get_json, list_json, put_json, write_chunks};
use crate::now_ms;
use crate::state::NodeState;
use crate::status::NodeError;

/// The largest image accepted.
pub const MAX_IMAGE: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub version: String,
    pub size: u64,
    pub sha256: String,
    pub uploaded_at_ms: i64,
    pub uploaded_by: String,
    pub signer_serial: String,
    pub signer_chain_pem: String,
    pub signature: String,
    pub chunks: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub charger_id: String,
    pub stage: u32,
    pub state: String,
    pub detail: String,
    pub updated_ms: i64,
    #[serde(default)]
    pub sent_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Campaign {
    pub id: String,
    pub version: String,
    /// running, completed, halted, aborted
    pub state: String,
    pub detail: String,
    pub stage: u32,
    pub created_ms: i64,
    pub created_by: String,
    pub canary_percent: u32,
    pub max_failures: u32,
    pub timeout_s: u32,
    pub stage_started_ms: i64,
    pub chargers: Vec<Target>,
}

const TERMINAL: [&str; 3] = ["installed", "failed", "skipped"];

pub fn check_version(v: &str) -> Result<(), NodeError> {
    if v.is_empty()
        || v.len() > 32
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
    {
        return Err(NodeError::Invalid(format!(
            "firmware version {v:?} must be 1 to 32 characters of letters, digits, '.', '-', '_' or '+'"
        )));
    }
    Ok(())
}

fn image_key(version: &str) -> Vec<u8> {
    keys::pack(&("fw-image", version))
}
fn chunk_key(version: &str, i: u32) -> Vec<u8> {
    keys::pack(&("fw-chunk", version, i as i64))
}
fn campaign_key(id: &str) -> Vec<u8> {
    keys::pack(&("fw-campaign", id))
}

/// Stores and signs an image. Versions are immutable: uploading one that
/// exists is refused.
pub fn store_image(
    store: &dyn Store,
    signer: &laddnet_pki::firmware::FirmwareSigner,
    version: &str,
    image: &[u8],
    by: &str,
) -> Result<Image, NodeError> {
    check_version(version)?;
    if image.is_empty() {
        return Err(NodeError::Invalid("the firmware image is empty".into()));
    }
    if store.snapshot(|tx| Ok::<_, NodeError>(tx.get(&image_key(version))?.is_some()))? {
        return Err(NodeError::AlreadyExists(format!(
            "firmware {version} was already uploaded; versions are immutable"
        )));
    }
    let digest = Sha256::digest(image);
    let signature = signer
        .sign(version, &digest)
        .map_err(|e| NodeError::Internal(format!("signing firmware: {e}")))?;
    let chunks = write_chunks(store, image, |i| chunk_key(version, i))?;
    let meta = Image {
        version: version.into(),
        size: image.len() as u64,
        sha256: hex::encode(digest),
        uploaded_at_ms: now_ms(),
        uploaded_by: by.into(),
        signer_serial: signer.serial.clone(),
        signer_chain_pem: signer.chain_pem.clone(),
        signature: hex::encode(signature),
        chunks,
    };
    store.transact(|tx| {
        if tx.get(&image_key(version))?.is_some() {
            return Err(NodeError::AlreadyExists(format!(
                "firmware {version} was already uploaded"
            )));
        }
        put_json(tx, &image_key(version), &meta)
    })?;
    Ok(meta)
}

pub fn get_image(store: &dyn Store, version: &str) -> Result<Option<Image>, NodeError> {
    store.snapshot(|tx| get_json(tx, &image_key(version)))
}

pub fn list_images(store: &dyn Store) -> Result<Vec<Image>, NodeError> {
    list_json(store, keys::tuple_range(&("fw-image",)), 10_000)
}

pub fn read_chunk(store: &dyn Store, version: &str, i: u32) -> Result<Option<Vec<u8>>, NodeError> {
    store.snapshot(|tx| Ok(tx.get(&chunk_key(version, i))?))
}

pub fn get_campaign(store: &dyn Store, id: &str) -> Result<Option<Campaign>, NodeError> {
    store.snapshot(|tx| get_json(tx, &campaign_key(id)))
}

pub fn list_campaigns(store: &dyn Store) -> Result<Vec<Campaign>, NodeError> {
    list_json(store, keys::tuple_range(&("fw-campaign",)), 10_000)
}

/// Creates a campaign over `chargers` (sorted: the first of them are the
/// canaries).
#[allow(clippy::too_many_arguments)]
pub fn create_campaign(
    store: &dyn Store,
    version: &str,
    mut chargers: Vec<String>,
    canary_percent: u32,
    max_failures: u32,
    timeout_s: u32,
    by: &str,
) -> Result<Campaign, NodeError> {
    if get_image(store, version)?.is_none() {
        return Err(NodeError::NotFound(format!("no firmware {version} was uploaded")));
    }
    chargers.sort();
    chargers.dedup();
    if chargers.is_empty() {
        return Err(NodeError::Invalid("the campaign has no chargers".into()));
    }
    if canary_percent == 0 || canary_percent > 100 {
        return Err(NodeError::Invalid("canary_percent must be 1 to 100".into()));
    }
    let canaries = (chargers.len() * canary_percent as usize).div_ceil(100).max(1);
    let now = now_ms();
    store.transact(|tx| {
        let n = tx
            .get(&keys::pack(&("fw-campaign-seq",)))?
            .map_or(0u64, |v| u64::from_le_bytes(v.as_slice().try_into().unwrap_or([0; 8])))
            + 1;
        tx.set(&keys::pack(&("fw-campaign-seq",)), &n.to_le_bytes())?;
        let c = Campaign {
            id: format!("FW-{n:06}"),
            version: version.into(),
            state: "running".into(),
            detail: String::new(),
            stage: 1,
            created_ms: now,
            created_by: by.into(),
            canary_percent,
            max_failures,
            timeout_s,
            stage_started_ms: now,
            chargers: chargers
                .iter()
                .enumerate()
                .map(|(i, id)| Target {
                    charger_id: id.clone(),
                    stage: if i < canaries { 1 } else { 2 },
                    state: "pending".into(),
                    detail: String::new(),
                    updated_ms: now,
                    sent_ms: None,
                })
                .collect(),
        };
        put_json(tx, &campaign_key(&c.id), &c)?;
        Ok(c)
    })
}

/// Applies `f` to a stored campaign in one transaction.
fn update(store: &dyn Store, id: &str, mut f: impl FnMut(&mut Campaign)) -> Result<Campaign, NodeError> {
    store.transact(|tx| {
        let mut c: Campaign =
            get_json(tx, &campaign_key(id))?.ok_or_else(|| NodeError::NotFound(format!("no campaign {id}")))?;
        f(&mut c);
        put_json(tx, &campaign_key(id), &c)?;
        Ok(c)
    })
}

pub fn abort(store: &dyn Store, id: &str, by: &str) -> Result<Campaign, NodeError> {
    let c = get_campaign(store, id)?.ok_or_else(|| NodeError::NotFound(format!("no campaign {id}")))?;
    if c.state != "running" {
        return Err(NodeError::Precondition(format!(
            "campaign {id} is {}, not running",
            c.state
        )));
    }
    let now = now_ms();
    update(store, id, |c| {
        c.state = "aborted".into();
        c.detail = format!("aborted by {by}");
        for t in c.chargers.iter_mut().filter(|t| t.state == "pending") {
            t.state = "skipped".into();
            t.updated_ms = now;
        }
    })
}

fn state_name(s: i32) -> Option<&'static str> {
    use v1::FirmwareState as F;
    Some(match F::try_from(s).ok()? {
        F::Downloading => "downloading",
        F::Downloaded => "downloaded",
        F::Installing => "installing",
        F::Installed => "installed",
        F::DownloadFailed | F::SignatureInvalid | F::InstallFailed => "failed",
        F::Unspecified => return None,
    })
}

/// A charger's `FirmwareStatus`: its campaign entry moves on; an installed
/// version goes into the charger's record.
pub fn on_status(store: &dyn Store, charger_id: &str, s: &v1::FirmwareStatus) -> Result<(), NodeError> {
    let Some(state) = state_name(s.state) else {
        return Err(NodeError::Invalid(format!("firmware state {} is not known", s.state)));
    };
    check_version(&s.version)?;
    let detail: String = match v1::FirmwareState::try_from(s.state) {
        Ok(v1::FirmwareState::SignatureInvalid) => format!("refused by the charger: {}", s.detail),
        _ => s.detail.clone(),
    }
    .chars()
    .take(200)
    .collect();
    let now = now_ms();
    if !s.campaign_id.is_empty() && get_campaign(store, &s.campaign_id)?.is_some() {
        update(store, &s.campaign_id, |c| {
            if let Some(t) = c.chargers.iter_mut().find(|t| t.charger_id == charger_id)
                && !TERMINAL.contains(&t.state.as_str())
            {
                t.state = state.into();
                t.detail = detail.clone();
                t.updated_ms = now;
            }
        })?;
    }
    if state == "installed" {
        laddnet_actors::repo::set_firmware_version(store, charger_id, &s.version)
            .map_err(|e| NodeError::Internal(e.to_string()))?;
    }
    Ok(())
}

/// Whether `charger_id` may download `version`: a campaign for it names
/// the charger.
pub fn may_download(store: &dyn Store, charger_id: &str, version: &str) -> Result<bool, NodeError> {
    Ok(list_campaigns(store)?
        .iter()
        .any(|c| c.version == version && c.chargers.iter().any(|t| t.charger_id == charger_id)))
}

/// Drives one campaign until it is no longer running.
pub async fn drive(state: Arc<NodeState>, id: String) {
    loop {
        if let Err(e) = step(&state, &id).await {
            tracing::error!(campaign = %id, error = %e, "firmware campaign step failed");
        }
        let st = state.clone();
        let id2 = id.clone();
        let running = tokio::task::spawn_blocking(move || get_campaign(st.store.as_ref(), &id2))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .is_some_and(|c| c.state == "running");
        if !running {
            return;
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// One pass: time-outs, the stage's verdict, and commands for the stage's
/// chargers that have none yet.
async fn step(state: &Arc<NodeState>, id: &str) -> Result<(), NodeError> {
    let st = state.clone();
    let id2 = id.to_string();
    let now = now_ms();
    let c = tokio::task::spawn_blocking(move || {
        update(st.store.as_ref(), &id2, |c| {
            if c.state != "running" {
                return;
            }
            let timeout = i64::from(c.timeout_s) * 1000;
            let stage = c.stage;
            for t in c.chargers.iter_mut().filter(|t| t.stage == stage) {
                let started = t.sent_ms.unwrap_or(c.stage_started_ms);
                if !TERMINAL.contains(&t.state.as_str()) && now - started > timeout {
                    t.state = "failed".into();
                    t.detail = if t.sent_ms.is_some() {
                        format!("no result within {} s", c.timeout_s)
                    } else {
                        format!("not connected within {} s", c.timeout_s)
                    };
                    t.updated_ms = now;
                }
            }
            let in_stage: Vec<&Target> = c.chargers.iter().filter(|t| t.stage == stage).collect();
            let failed: Vec<&&Target> = in_stage.iter().filter(|t| t.state == "failed").collect();
            if failed.len() as u32 > c.max_failures {
                let first = failed.first().map(|t| format!(" ({}: {})", t.charger_id, t.detail));
                c.state = "halted".into();
                c.detail = format!(
                    "{} stage: {} of {} chargers failed{}",
                    if stage == 1 { "canary" } else { "rollout" },
                    failed.len(),
                    in_stage.len(),
                    first.unwrap_or_default()
                );
                for t in c.chargers.iter_mut().filter(|t| t.state == "pending") {
                    t.state = "skipped".into();
                    t.updated_ms = now;
                }
                return;
            }
            if in_stage.iter().all(|t| TERMINAL.contains(&t.state.as_str())) {
                if stage == 1 && c.chargers.iter().any(|t| t.stage == 2) {
                    c.stage = 2;
                    c.stage_started_ms = now;
                } else {
                    c.state = "completed".into();
                    let ok = c.chargers.iter().filter(|t| t.state == "installed").count();
                    c.detail = format!("{ok} of {} chargers installed {}", c.chargers.len(), c.version);
                }
            }
        })
    })
    .await
    .map_err(|e| NodeError::Internal(e.to_string()))??;
    if c.state != "running" {
        tracing::info!(campaign = %c.id, state = %c.state, detail = %c.detail, "firmware campaign finished");
        return Ok(());
    }
    let to_send: Vec<String> = c
        .chargers
        .iter()
        .filter(|t| t.stage == c.stage && t.state == "pending")
        .map(|t| t.charger_id.clone())
        .collect();
    if to_send.is_empty() {
        return Ok(());
    }
    let st = state.clone();
    let version = c.version.clone();
    let Some(image) = tokio::task::spawn_blocking(move || get_image(st.store.as_ref(), &version))
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))??
    else {
        return Err(NodeError::Internal(format!("image {} is gone", c.version)));
    };
    let sha256 = hex::decode(&image.sha256).map_err(|e| NodeError::Internal(e.to_string()))?;
    let signature = hex::decode(&image.signature).map_err(|e| NodeError::Internal(e.to_string()))?;
    let mut sent = Vec::new();
    for charger in to_send {
        let cmd = v1::Command {
            command_id: format!("fw-{}-{charger}", c.id),
            kind: Some(v1::command::Kind::UpdateFirmware(v1::UpdateFirmware {
                version: image.version.clone(),
                location: String::new(),
                sha256: sha256.clone(),
                signature: signature.clone(),
                signer_chain_pem: image.signer_chain_pem.clone(),
                size: image.size,
                campaign_id: c.id.clone(),
            })),
        };
        // Wherever the charger is connected: here or through its node.
        if crate::cluster::command(state, &charger, cmd, false, &format!("campaign:{}", c.id))
            .await
            .is_ok()
        {
            sent.push(charger);
        }
    }
    if !sent.is_empty() {
        let st = state.clone();
        let id2 = id.to_string();
        let now = now_ms();
        tokio::task::spawn_blocking(move || {
            update(st.store.as_ref(), &id2, |c| {
                for t in c.chargers.iter_mut().filter(|t| sent.contains(&t.charger_id)) {
                    if t.state == "pending" {
                        t.state = "sent".into();
                        t.sent_ms = Some(now);
                        t.updated_ms = now;
                    }
                }
            })
        })
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))??;
    }
    Ok(())
}

/// Resumes the running campaigns (at node start).
pub async fn resume(state: Arc<NodeState>) {
    let st = state.clone();
    let Ok(Ok(all)) = tokio::task::spawn_blocking(move || list_campaigns(st.store.as_ref())).await else {
        return;
    };
    for c in all.into_iter().filter(|c| c.state == "running") {
        tracing::info!(campaign = %c.id, "resuming firmware campaign");
        tokio::spawn(drive(state.clone(), c.id));
    }
}
