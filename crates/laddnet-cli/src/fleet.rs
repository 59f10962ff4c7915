//! `laddctl firmware …`, `laddctl diagnostics …` and `laddctl sites load`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use laddnet_proto::v1;
use laddnet_proto::v1::fleet_service_client::FleetServiceClient;
use serde_json::{Value, json};

use crate::{Output, channel, emit};

#[derive(Subcommand)]
pub enum FirmwareCmd {
    /// Upload an image; the node signs it with its firmware-signing key
    /// (admin).
    Upload {
        /// The image file.
        file: PathBuf,
        #[arg(long)]
        version: String,
    },
    /// Uploaded images.
    List,
    /// Staged rollouts.
    #[command(subcommand)]
    Campaign(CampaignCmd),
}

#[derive(Subcommand)]
pub enum CampaignCmd {
    /// Roll `--version` out: a canary share first, then the rest; a stage
    /// with more than `--max-failures` failures halts the campaign.
    Start {
        #[arg(long)]
        version: String,
        /// These chargers (repeat); default: every charger of --site, or all.
        #[arg(long = "charger")]
        chargers: Vec<String>,
        #[arg(long, default_value = "")]
        site: String,
        /// Percent of the chargers in the canary stage.
        #[arg(long, default_value_t = 10)]
        canary_percent: u32,
        #[arg(long, default_value_t = 0)]
        max_failures: u32,
        /// Seconds a charger may take before it counts as failed.
        #[arg(long, default_value_t = 600)]
        timeout_s: u32,
    },
    /// A campaign with each charger's progress.
    Status {
        id: String,
    },
    List,
    /// Stop telling more chargers (the ones installing finish).
    Abort {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum DiagnosticsCmd {
    /// Ask a connected charger for a log bundle now and wait for it.
    Request {
        charger_id: String,
        /// Write the bundle here (default: print it).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 60)]
        timeout_s: u32,
    },
    /// A stored bundle: the latest, or --id.
    Get {
        charger_id: String,
        #[arg(long, default_value = "")]
        id: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// A charger's stored bundles.
    List { charger_id: String },
}

const CAMPAIGN_HEADERS: &[&str] = &["CAMPAIGN", "VERSION", "STATE", "STAGE", "CHARGERS", "DETAIL"];
const TARGET_HEADERS: &[&str] = &["CHARGER", "STAGE", "STATE", "UPDATED", "DETAIL"];

fn campaign_json(c: &v1::Campaign) -> Value {
    json!({"id": c.id, "version": c.version, "state": c.state, "detail": c.detail, "stage": c.stage,
           "created_at": c.created_at, "created_by": c.created_by, "canary_percent": c.canary_percent,
           "max_failures": c.max_failures,
           "chargers": c.chargers.iter().map(|t| json!({"charger_id": t.charger_id, "stage": t.stage,
               "state": t.state, "detail": t.detail, "updated_at": t.updated_at})).collect::<Vec<_>>()})
}

fn campaign_row(c: &v1::Campaign) -> Vec<String> {
    vec![
        c.id.clone(),
        c.version.clone(),
        c.state.clone(),
        c.stage.to_string(),
        c.chargers.len().to_string(),
        c.detail.clone(),
    ]
}

fn image_json(i: &v1::FirmwareImage) -> Value {
    json!({"version": i.version, "size": i.size, "sha256": i.sha256, "uploaded_at": i.uploaded_at,
           "signer_serial": i.signer_serial})
}

fn image_row(i: &v1::FirmwareImage) -> Vec<String> {
    vec![
        i.version.clone(),
        i.size.to_string(),
        i.sha256.clone(),
        i.uploaded_at.clone(),
        i.signer_serial.clone(),
    ]
}

const IMAGE_HEADERS: &[&str] = &["VERSION", "BYTES", "SHA256", "UPLOADED", "SIGNER"];

pub async fn firmware(cmd: FirmwareCmd, cfg: Option<&Path>, out: Output) -> anyhow::Result<()> {
    let mut c = FleetServiceClient::new(channel(cfg).await?);
    match cmd {
        FirmwareCmd::Upload { file, version } => {
            let image = std::fs::read(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let mut parts = vec![v1::FirmwareUpload {
                part: Some(v1::firmware_upload::Part::Version(version)),
            }];
            parts.extend(image.chunks(256 * 1024).map(|d| v1::FirmwareUpload {
                part: Some(v1::firmware_upload::Part::Data(d.to_vec())),
            }));
            let i = c.upload_firmware(tokio_stream::iter(parts)).await?.into_inner();
            emit(out, image_json(&i), IMAGE_HEADERS, vec![image_row(&i)]);
        }
        FirmwareCmd::List => {
            let r = c.list_firmware(v1::ListFirmwareRequest {}).await?.into_inner();
            emit(
                out,
                json!({"images": r.images.iter().map(image_json).collect::<Vec<_>>()}),
                IMAGE_HEADERS,
                r.images.iter().map(image_row).collect(),
            );
        }
        FirmwareCmd::Campaign(CampaignCmd::Start {
            version,
            chargers,
            site,
            canary_percent,
            max_failures,
            timeout_s,
        }) => {
            let r = c
                .start_campaign(v1::StartCampaignRequest {
                    version,
                    charger_ids: chargers,
                    site_id: site,
                    canary_percent,
                    max_failures,
                    charger_timeout_s: timeout_s,
                })
                .await?
                .into_inner();
            emit(out, campaign_json(&r), CAMPAIGN_HEADERS, vec![campaign_row(&r)]);
        }
        FirmwareCmd::Campaign(CampaignCmd::Status { id }) => {
            let r = c.get_campaign(v1::GetCampaignRequest { id }).await?.into_inner();
            emit(out, campaign_json(&r), CAMPAIGN_HEADERS, vec![campaign_row(&r)]);
            if out == Output::Table {
                println!();
                emit(
                    out,
                    Value::Null,
                    TARGET_HEADERS,
                    r.chargers
                        .iter()
                        .map(|t| {
                            vec![
                                t.charger_id.clone(),
                                t.stage.to_string(),
                                t.state.clone(),
                                t.updated_at.clone(),
                                t.detail.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        FirmwareCmd::Campaign(CampaignCmd::List) => {
            let r = c.list_campaigns(v1::ListCampaignsRequest {}).await?.into_inner();
            emit(
                out,
                json!({"campaigns": r.campaigns.iter().map(campaign_json).collect::<Vec<_>>()}),
                CAMPAIGN_HEADERS,
                r.campaigns.iter().map(campaign_row).collect(),
            );
        }
        FirmwareCmd::Campaign(CampaignCmd::Abort { id }) => {
            let r = c.abort_campaign(v1::GetCampaignRequest { id }).await?.into_inner();
            emit(out, campaign_json(&r), CAMPAIGN_HEADERS, vec![campaign_row(&r)]);
        }
    }
    Ok(())
}

fn bundle_json(b: &v1::DiagnosticsBundle) -> Value {
    json!({"id": b.id, "charger_id": b.charger_id, "file_name": b.file_name, "received_at": b.received_at,
           "size": b.size, "sha256": b.sha256})
}

const BUNDLE_HEADERS: &[&str] = &["BUNDLE", "CHARGER", "FILE", "RECEIVED", "BYTES", "SHA256"];

fn bundle_row(b: &v1::DiagnosticsBundle) -> Vec<String> {
    vec![
        b.id.clone(),
        b.charger_id.clone(),
        b.file_name.clone(),
        b.received_at.clone(),
        b.size.to_string(),
        b.sha256.clone(),
    ]
}

/// Writes the bundle to `to`, or prints it.
fn deliver(b: &v1::DiagnosticsBundle, to: Option<PathBuf>, out: Output) -> anyhow::Result<()> {
    match to {
        Some(path) => {
            std::fs::write(&path, &b.content).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            emit(out, bundle_json(b), BUNDLE_HEADERS, vec![bundle_row(b)]);
        }
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&b.content)?;
        }
    }
    Ok(())
}

pub async fn diagnostics(cmd: DiagnosticsCmd, cfg: Option<&Path>, out: Output) -> anyhow::Result<()> {
    let mut c = FleetServiceClient::new(channel(cfg).await?);
    match cmd {
        DiagnosticsCmd::Request {
            charger_id,
            out: to,
            timeout_s,
        } => {
            let b = c
                .request_diagnostics(v1::RequestDiagnosticsRequest { charger_id, timeout_s })
                .await?
                .into_inner();
            deliver(&b, to, out)?;
        }
        DiagnosticsCmd::Get {
            charger_id,
            id,
            out: to,
        } => {
            let b = c
                .get_diagnostics(v1::GetDiagnosticsRequest { charger_id, id })
                .await?
                .into_inner();
            deliver(&b, to, out)?;
        }
        DiagnosticsCmd::List { charger_id } => {
            let r = c
                .list_diagnostics(v1::ListDiagnosticsRequest { charger_id })
                .await?
                .into_inner();
            emit(
                out,
                json!({"bundles": r.bundles.iter().map(bundle_json).collect::<Vec<_>>()}),
                BUNDLE_HEADERS,
                r.bundles.iter().map(bundle_row).collect(),
            );
        }
    }
    Ok(())
}

/// `laddctl sites load SITE`.
pub async fn site_load(cfg: Option<&Path>, out: Output, site_id: String) -> anyhow::Result<()> {
    let mut c = FleetServiceClient::new(channel(cfg).await?);
    let r = c.site_load(v1::SiteLoadRequest { site_id }).await?.into_inner();
    let sessions: Vec<Value> = r
        .sessions
        .iter()
        .map(|s| {
            json!({"transaction_id": s.transaction_id, "charger_id": s.charger_id, "connector_id": s.connector_id,
                   "max_w": s.max_w, "limit_w": s.limit_w, "power_w": s.power_w, "departure": s.departure})
        })
        .collect();
    let value = json!({"site_id": r.site_id, "grid_limit_w": r.grid_limit_w, "power_w": r.power_w,
                       "planned_at": r.planned_at, "managed_by": r.managed_by, "sessions": sessions});
    if out == Output::Table {
        let by = if r.managed_by.is_empty() {
            String::new()
        } else {
            format!(", managed by {}", r.managed_by)
        };
        println!(
            "site {}: {} W of {} W (planned {}{by})",
            r.site_id, r.power_w, r.grid_limit_w, r.planned_at
        );
    }
    emit(
        out,
        value,
        &[
            "SESSION",
            "CHARGER",
            "CONNECTOR",
            "MAX_W",
            "LIMIT_W",
            "POWER_W",
            "DEPARTURE",
        ],
        r.sessions
            .iter()
            .map(|s| {
                vec![
                    s.transaction_id.clone(),
                    s.charger_id.clone(),
                    s.connector_id.to_string(),
                    s.max_w.to_string(),
                    s.limit_w.to_string(),
                    s.power_w.to_string(),
                    s.departure.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}
