//! `laddctl drivers …`, `laddctl sites access|utilisation`, `laddctl maintenance …`.

use std::path::Path;

use anyhow::{Context, bail};
use clap::Subcommand;
use laddnet_proto::v1;
use laddnet_proto::v1::driver_admin_service_client::DriverAdminServiceClient;
use serde_json::{Value, json};

use crate::{Output, channel, emit};

#[derive(Subcommand)]
pub enum DriversCmd {
    /// Create a driver account. Personal fields are stored only encrypted.
    Create {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        phone: Option<String>,
        /// none, wallet, card, mobile-wallet or invoice.
        #[arg(long, default_value = "none")]
        payment: String,
        /// The payment provider's reference (stored encrypted).
        #[arg(long)]
        payment_ref: Option<String>,
        #[arg(long, default_value = "")]
        currency: String,
        /// Groups granting access to private sites (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long, default_value_t = 1)]
        max_concurrent_sessions: u32,
        /// RFC 3339.
        #[arg(long, default_value = "")]
        expires_at: String,
    },
    List,
    /// One account; --personal decrypts name, e-mail, phone (support/admin role, audited).
    Show {
        driver_id: String,
        #[arg(long)]
        personal: bool,
    },
    /// Change status (active, blocked, expired), groups, limits or payment.
    Update {
        driver_id: String,
        #[arg(long)]
        status: Option<String>,
        #[arg(long = "group")]
        groups: Option<Vec<String>>,
        #[arg(long)]
        max_concurrent_sessions: Option<u32>,
        #[arg(long)]
        payment: Option<String>,
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Add to (or, negative, take from) a prepaid wallet.
    Topup {
        driver_id: String,
        amount: String,
        /// The payment's id (booking it twice is refused).
        #[arg(long)]
        reference: Option<String>,
    },
    /// Tokens: RFID cards, app tokens, contract ids.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Set preferences: target state of charge, departure, price limit, channels.
    Prefs {
        driver_id: String,
        #[arg(long, default_value_t = 0)]
        target_soc: u32,
        /// Local HH:MM.
        #[arg(long, default_value = "")]
        departure: String,
        #[arg(long, default_value = "")]
        max_price_per_kwh: String,
        /// stream, webhook (repeatable; default both).
        #[arg(long = "channel")]
        channels: Vec<String>,
    },
    /// Watch charger:ID or site:ID for availability.
    Watch {
        driver_id: String,
        target: String,
        #[arg(long)]
        stop: bool,
    },
    /// Everything held on a driver, as JSON (GDPR access; audited).
    Export {
        driver_id: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Destroy the driver's data key: all personal data becomes unreadable.
    Erase {
        driver_id: String,
        /// Required: erasure cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// When, how long, how much, AC or DC, where.
    Insights {
        driver_id: String,
    },
    /// Issue a driver-app certificate (key made here, never sent).
    Credential {
        driver_id: String,
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
pub enum TokensCmd {
    Add {
        driver_id: String,
        /// rfid, app or contract.
        #[arg(long, default_value = "rfid")]
        kind: String,
        value: String,
        #[arg(long, default_value = "")]
        expires_at: String,
    },
    Block {
        token_id: String,
    },
    Unblock {
        token_id: String,
    },
    Remove {
        token_id: String,
    },
}

#[derive(Subcommand)]
pub enum MaintenanceCmd {
    /// Plan maintenance; drivers who use or watch the place are told.
    Schedule {
        #[arg(long, default_value = "")]
        charger: String,
        #[arg(long, default_value = "")]
        site: String,
        /// RFC 3339.
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        reason: String,
    },
}

const HEADERS: &[&str] = &["DRIVER", "STATUS", "PAYMENT", "WALLET", "GROUPS", "TOKENS", "OPEN"];

fn driver_json(d: &v1::Driver) -> Value {
    json!({
        "driver_id": d.driver_id, "status": d.status, "expires_at": d.expires_at,
        "groups": d.groups, "max_concurrent_sessions": d.max_concurrent_sessions,
        "payment": d.payment, "currency": d.currency, "wallet_balance": d.wallet_balance, "wallet_available": d.wallet_available,
        "preferences": d.preferences.as_ref().map(|p| json!({
            "target_soc_percent": p.target_soc_percent, "departure": p.departure,
            "max_price_per_kwh": p.max_price_per_kwh, "channels": p.channels,
        })),
        "watches": d.watches, "personal_fields": d.personal_fields, "personal": d.personal,
        "tokens": d.tokens.iter().map(token_json).collect::<Vec<_>>(),
        "created_at": d.created_at, "open_sessions": d.open_sessions,
    })
}

fn token_json(t: &v1::DriverToken) -> Value {
    json!({"token_id": t.token_id, "driver_id": t.driver_id, "kind": t.kind, "status": t.status,
           "expires_at": t.expires_at, "token_ref": t.token_ref})
}

fn driver_row(d: &v1::Driver) -> Vec<String> {
    vec![
        d.driver_id.clone(),
        d.status.clone(),
        d.payment.clone(),
        format!("{} {}", d.wallet_balance, d.currency),
        d.groups.join(","),
        d.tokens.len().to_string(),
        d.open_sessions.to_string(),
    ]
}

fn show(out: Output, d: &v1::Driver) {
    emit(out, driver_json(d), HEADERS, vec![driver_row(d)]);
    if out == Output::Table {
        for (k, v) in &d.personal {
            println!("{k}: {v}");
        }
        for t in &d.tokens {
            println!("token {} {} {} ref {}", t.token_id, t.kind, t.status, t.token_ref);
        }
    }
}

fn token_out(out: Output, t: &v1::DriverToken) {
    emit(
        out,
        token_json(t),
        &["TOKEN", "DRIVER", "KIND", "STATUS", "REF"],
        vec![vec![
            t.token_id.clone(),
            t.driver_id.clone(),
            t.kind.clone(),
            t.status.clone(),
            t.token_ref.clone(),
        ]],
    );
}

pub async fn run(cmd: DriversCmd, cfg: Option<&Path>, out: Output) -> anyhow::Result<()> {
    let mut c = DriverAdminServiceClient::new(channel(cfg).await?);
    match cmd {
        DriversCmd::Create {
            name,
            email,
            phone,
            payment,
            payment_ref,
            currency,
            groups,
            max_concurrent_sessions,
            expires_at,
        } => {
            let d = c
                .create_driver(v1::CreateDriverRequest {
                    name: name.unwrap_or_default(),
                    email: email.unwrap_or_default(),
                    phone: phone.unwrap_or_default(),
                    payment,
                    payment_ref: payment_ref.unwrap_or_default(),
                    currency,
                    groups,
                    max_concurrent_sessions,
                    expires_at,
                })
                .await?
                .into_inner();
            show(out, &d);
        }
        DriversCmd::List => {
            let mut token = String::new();
            let mut all = Vec::new();
            loop {
                let r = c
                    .list_drivers(v1::ListDriversRequest {
                        page: Some(v1::PageRequest {
                            page_size: 0,
                            page_token: token.clone(),
                        }),
                    })
                    .await?
                    .into_inner();
                all.extend(r.drivers);
                token = r.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            emit(
                out,
                json!({"drivers": all.iter().map(driver_json).collect::<Vec<_>>()}),
                HEADERS,
                all.iter().map(driver_row).collect(),
            );
        }
        DriversCmd::Show { driver_id, personal } => {
            let d = c
                .get_driver(v1::GetDriverRequest {
                    driver_id,
                    with_personal: personal,
                })
                .await?
                .into_inner();
            show(out, &d);
        }
        DriversCmd::Update {
            driver_id,
            status,
            groups,
            max_concurrent_sessions,
            payment,
            expires_at,
        } => {
            let d = c
                .update_driver(v1::UpdateDriverRequest {
                    driver_id,
                    status,
                    expires_at,
                    set_groups: groups.is_some(),
                    groups: groups.unwrap_or_default(),
                    max_concurrent_sessions,
                    payment,
                    personal: Default::default(),
                })
                .await?
                .into_inner();
            show(out, &d);
        }
        DriversCmd::Topup {
            driver_id,
            amount,
            reference,
        } => {
            let d = c
                .adjust_wallet(v1::AdjustWalletRequest {
                    driver_id,
                    amount,
                    reference: reference.unwrap_or_default(),
                })
                .await?
                .into_inner();
            show(out, &d);
        }
        DriversCmd::Tokens(t) => match t {
            TokensCmd::Add {
                driver_id,
                kind,
                value,
                expires_at,
            } => {
                let t = c
                    .add_token(v1::AddTokenRequest {
                        driver_id,
                        kind,
                        value,
                        expires_at,
                    })
                    .await?
                    .into_inner();
                token_out(out, &t);
            }
            TokensCmd::Block { token_id } => {
                let t = c
                    .set_token_status(v1::SetTokenStatusRequest {
                        token_id,
                        status: "blocked".into(),
                    })
                    .await?
                    .into_inner();
                token_out(out, &t);
            }
            TokensCmd::Unblock { token_id } => {
                let t = c
                    .set_token_status(v1::SetTokenStatusRequest {
                        token_id,
                        status: "active".into(),
                    })
                    .await?
                    .into_inner();
                token_out(out, &t);
            }
            TokensCmd::Remove { token_id } => {
                c.remove_token(v1::RemoveTokenRequest {
                    token_id: token_id.clone(),
                })
                .await?;
                emit(out, json!({"removed": token_id}), &["REMOVED"], vec![vec![token_id]]);
            }
        },
        DriversCmd::Prefs {
            driver_id,
            target_soc,
            departure,
            max_price_per_kwh,
            channels,
        } => {
            let channels = if channels.is_empty() {
                vec!["stream".into(), "webhook".into()]
            } else {
                channels
            };
            let d = c
                .set_preferences(v1::SetPreferencesRequest {
                    driver_id,
                    preferences: Some(v1::Preferences {
                        target_soc_percent: target_soc,
                        departure,
                        max_price_per_kwh,
                        channels,
                    }),
                })
                .await?
                .into_inner();
            show(out, &d);
        }
        DriversCmd::Watch {
            driver_id,
            target,
            stop,
        } => {
            let d = c
                .watch(v1::WatchRequest {
                    driver_id,
                    target,
                    stop,
                })
                .await?
                .into_inner();
            show(out, &d);
        }
        DriversCmd::Export { driver_id, out: file } => {
            let r = c
                .export_driver(v1::ExportDriverRequest { driver_id })
                .await?
                .into_inner();
            match file {
                Some(p) => {
                    write_private(&p, r.json.as_bytes())?;
                    eprintln!("wrote {}", p.display());
                }
                None => println!("{}", r.json),
            }
        }
        DriversCmd::Erase { driver_id, yes } => {
            if !yes {
                bail!("erasure destroys the driver's personal data for good: add --yes");
            }
            let d = c.erase_driver(v1::EraseDriverRequest { driver_id }).await?.into_inner();
            show(out, &d);
        }
        DriversCmd::Insights { driver_id } => {
            let r = c
                .driver_insights(v1::DriverInsightsRequest { driver_id })
                .await?
                .into_inner();
            println!("{}", r.json);
        }
        DriversCmd::Credential { driver_id, out: dir } => {
            let (key, csr) = laddnet_pki::new_key_and_csr(&driver_id)?;
            let r = c
                .issue_driver_credential(v1::IssueDriverCredentialRequest {
                    driver_id: driver_id.clone(),
                    csr_pem: csr,
                })
                .await?
                .into_inner();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::write(dir.join(format!("{driver_id}.crt")), &r.chain_pem)?;
            write_private(&dir.join(format!("{driver_id}.key")), key.as_bytes())?;
            let serial = r.certificate.map(|c| c.serial).unwrap_or_default();
            emit(
                out,
                json!({"driver_id": driver_id, "serial": serial, "dir": dir}),
                &["DRIVER", "SERIAL", "DIR"],
                vec![vec![driver_id, serial, dir.display().to_string()]],
            );
        }
    }
    Ok(())
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
        .with_context(|| format!("writing {}", path.display()))?
        .write_all(bytes)?;
    Ok(())
}

pub async fn site_access(
    cfg: Option<&Path>,
    out: Output,
    site_id: String,
    private: bool,
    groups: Vec<String>,
) -> anyhow::Result<()> {
    let mut c = DriverAdminServiceClient::new(channel(cfg).await?);
    c.set_site_access(v1::SetSiteAccessRequest {
        site_id: site_id.clone(),
        private,
        groups: groups.clone(),
    })
    .await?;
    emit(
        out,
        json!({"site_id": site_id, "private": private, "groups": groups}),
        &["SITE", "PRIVATE", "GROUPS"],
        vec![vec![site_id, private.to_string(), groups.join(",")]],
    );
    Ok(())
}

pub async fn site_utilisation(cfg: Option<&Path>, site_id: String, days: u32) -> anyhow::Result<()> {
    let mut c = DriverAdminServiceClient::new(channel(cfg).await?);
    let r = c
        .site_utilisation(v1::SiteUtilisationRequest { site_id, days })
        .await?
        .into_inner();
    println!("{}", r.json);
    Ok(())
}

pub async fn maintenance(cmd: MaintenanceCmd, cfg: Option<&Path>, out: Output) -> anyhow::Result<()> {
    let MaintenanceCmd::Schedule {
        charger,
        site,
        from,
        to,
        reason,
    } = cmd;
    let mut c = DriverAdminServiceClient::new(channel(cfg).await?);
    let r = c
        .schedule_maintenance(v1::ScheduleMaintenanceRequest {
            charger_id: charger,
            site_id: site,
            starts_at: from,
            ends_at: to,
            reason,
        })
        .await?
        .into_inner();
    emit(
        out,
        json!({"maintenance_id": r.maintenance_id, "notified": r.notified}),
        &["MAINTENANCE", "NOTIFIED"],
        vec![vec![r.maintenance_id, r.notified.to_string()]],
    );
    Ok(())
}
