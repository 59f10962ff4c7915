//! The simulated fleet that `laddnet up` runs beside its node: three sites,
//! chargers enrolled through the real enrollment listener (identities kept
//! in `<data_dir>/sim`, so a restart reuses them), a fault now and then,
//! and a live summary line.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use laddnet_actors::repo::{self, RepoError, SiteRecord};
use laddnet_core::charging::{ConnectorStatus, SessionStatus};
use laddnet_core::{ChargerId, SiteId};
use laddnet_node::RunningNode;
use laddnet_node::state::NodeState;
use laddnet_sim::{Endpoints, Fault, Profile, SimHandle};
use tokio::sync::Mutex;

pub type Fleet = Arc<Mutex<Vec<SimHandle>>>;

/// The demo's tariff: a start fee, energy by time of day, idle fee after a
/// grace hour.
const DEMO_TARIFF: &str = r#"{"id":"demo-standard","currency":"EUR","elements":[
  {"price_components":[{"type":"FLAT","price":0.50,"vat":25.0,"step_size":1}]},
  {"price_components":[{"type":"ENERGY","price":0.45,"vat":25.0,"step_size":1}],"restrictions":{"start_time":"07:00","end_time":"21:00"}},
  {"price_components":[{"type":"ENERGY","price":0.32,"vat":25.0,"step_size":1}]},
  {"price_components":[{"type":"PARKING_TIME","price":6.00,"vat":25.0,"step_size":300}],"restrictions":{"min_duration":3600}}]}"#;

const SITES: &[(&str, &str, &str, u32)] = &[
    ("central-garage", "Central station garage", "Europe/Stockholm", 150_000),
    ("harbour-depot", "Harbour bus depot", "Europe/Stockholm", 600_000),
    ("mall-north", "North mall car park", "Europe/Stockholm", 250_000),
];

/// Demo card `n` (1-based): not a secret, the simulated chargers present it.
fn demo_card(n: usize) -> String {
    format!("DE{n:08X}")
}

/// Demo drivers per simulated charger: each charger serves its own three
/// regulars, so no card is ever in two places at once.
const DRIVERS_PER_CHARGER: usize = 3;

/// Demo drivers 1..=`count` (those not there yet): most pay by card, some
/// from a prepaid wallet, a fleet on invoice; half want 80 %; every 20th
/// card is blocked, so the demo shows a refusal now and then.
fn create_demo_drivers(drivers: &laddnet_drivers::Drivers, count: usize) -> anyhow::Result<()> {
    use laddnet_drivers::accounts::NewDriver;
    use laddnet_drivers::{PaymentKind, TokenKind, TokenStatus};
    let have = drivers.list(None, count + 1)?.len();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for n in have + 1..=count {
        let payment = match n % 4 {
            0 => PaymentKind::Wallet,
            3 => PaymentKind::Invoice,
            _ => PaymentKind::Card,
        };
        let d = drivers.create(
            NewDriver {
                name: Some(format!("Demo Driver {n}")),
                email: Some(format!("demo-{n}@example.invalid")),
                payment: Some(payment),
                currency: "EUR".into(),
                max_concurrent_sessions: 1,
                groups: if payment == PaymentKind::Invoice {
                    ["fleet".to_string()].into()
                } else {
                    Default::default()
                },
                ..Default::default()
            },
            now,
        )?;
        if payment == PaymentKind::Wallet {
            drivers.adjust_wallet(&d.driver_id, rust_decimal::Decimal::from(40), &format!("demo-{n}"), now)?;
        }
        if n % 2 == 0 {
            drivers.update(&d.driver_id, now, |r| {
                r.preferences.target_soc_percent = Some(80);
                Ok(())
            })?;
        }
        let t = drivers.add_token(&d.driver_id, TokenKind::Rfid, &demo_card(n), None, now)?;
        if n % 20 == 0 {
            drivers.set_token_status(&t.token_id, TokenStatus::Blocked, now)?;
        }
    }
    Ok(())
}

/// The simulated chargers started so far, and the task still enrolling
/// the rest (it holds the CA, and through it the store: it must be
/// stopped before the node can close the store).
pub struct SimFleet {
    pub sims: Fleet,
    pub enrolling: tokio::task::JoinHandle<()>,
}

/// Creates the demo sites (once) and starts `n` simulated chargers; those
/// not yet enrolled enroll in the background, at the pace the listener's
/// rate limit allows.
pub async fn start(node: &RunningNode, data_dir: &Path, n: usize) -> anyhow::Result<SimFleet> {
    let store = node.state.store.clone();
    tokio::task::spawn_blocking(move || {
        for (id, name, tz, limit) in SITES {
            let site = SiteRecord {
                site_id: (*id).into(),
                name: (*name).into(),
                address: String::new(),
                time_zone: (*tz).into(),
                grid_limit_w: *limit,
            };
            match repo::create_site(store.as_ref(), &site) {
                Ok(()) | Err(RepoError::AlreadyExists(_)) => {}
                Err(e) => return Err(anyhow::anyhow!(e)),
            }
        }
        // A tariff, so sessions have costs from the first minute.
        if laddnet_ledger::tariffs::list(store.as_ref())?.is_empty() {
            let t = laddnet_core::tariff::Tariff::parse_json(DEMO_TARIFF)?;
            laddnet_ledger::tariffs::create_at(store.as_ref(), t, 0)?;
            laddnet_ledger::tariffs::assign(
                store.as_ref(),
                &laddnet_ledger::tariffs::Assignment {
                    scope: laddnet_ledger::tariffs::Scope::Operator,
                    target: String::new(),
                    tariff_id: "demo-standard".into(),
                    valid_from: 0,
                    valid_to: None,
                },
            )?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await??;
    let drivers = node.state.hub.drivers.clone();
    tokio::task::spawn_blocking(move || create_demo_drivers(&drivers, n * DRIVERS_PER_CHARGER)).await??;
    let ep = Endpoints {
        mtls: vec![format!("https://{}", node.mtls_addr)],
        enrollment: format!("https://{}", node.enrollment_addr),
        server_name: node
            .state
            .config
            .tls
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into()),
        root_pem: node.state.ca.root_pem().to_string(),
    };
    let fleet: Fleet = Arc::new(Mutex::new(Vec::new()));
    let dir = laddnet_sim::identity_dir(data_dir);
    let ca = node.state.ca.clone();
    let f = fleet.clone();
    // The listener allows `burst` enrollments per address at once and then
    // `per_minute`: the fleet keeps to that pace, so the node's own demo
    // does not trip its limit (each refusal is a warning in the log).
    let limit = ca.policy().enrollment.clone();
    let every = Duration::from_secs_f64(60.0 / f64::from(limit.per_minute.max(1)));
    let enrolling = tokio::spawn(async move {
        let mut fresh = 0u32;
        for i in 0..n {
            let mut profile = Profile::fleet_member(i);
            profile.tokens = (1..=DRIVERS_PER_CHARGER)
                .map(|k| demo_card(i * DRIVERS_PER_CHARGER + k))
                .collect();
            let id = profile.charger_id.clone();
            let identity = match laddnet_sim::load_identity(&dir, &id) {
                Some(identity) => identity,
                None => {
                    // One token kept in hand for anyone else enrolling
                    // from this address.
                    if fresh + 1 >= limit.burst {
                        tokio::time::sleep(every).await;
                    }
                    fresh += 1;
                    let mut wait = Duration::from_millis(500);
                    loop {
                        match enroll_one(&ca, &ep, &id, SITES[i % SITES.len()].0).await {
                            Ok(identity) => break identity,
                            Err(e) => {
                                tracing::debug!(charger_id = %id, error = %e, "simulated charger enrollment retry");
                                tokio::time::sleep(wait).await;
                                wait = (wait * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                }
            };
            if let Err(e) = laddnet_sim::save_identity(&dir, &id, &identity) {
                tracing::warn!(charger_id = %id, error = %e, "could not save the simulated charger's identity");
            }
            f.lock().await.push(laddnet_sim::spawn(ep.clone(), identity, profile));
        }
    });
    Ok(SimFleet { sims: fleet, enrolling })
}

async fn enroll_one(
    ca: &Arc<laddnet_pki::Ca>,
    ep: &Endpoints,
    id: &str,
    site: &str,
) -> anyhow::Result<laddnet_sim::Identity> {
    let (ca, cid, sid) = (
        ca.clone(),
        ChargerId::new(id).map_err(|e| anyhow::anyhow!(e))?,
        SiteId::new(site).map_err(|e| anyhow::anyhow!(e))?,
    );
    let token = tokio::task::spawn_blocking(move || ca.create_token(&cid, Some(&sid), 600, "system:up")).await??;
    laddnet_sim::enroll(ep, id, &token.token).await
}

/// Every `every_s` seconds, something goes wrong somewhere.
pub async fn inject_faults(fleet: Fleet, every_s: u64) {
    if every_s == 0 {
        return;
    }
    let mut round = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(every_s)).await;
        let sims = fleet.lock().await;
        if sims.is_empty() {
            continue;
        }
        let sim = &sims[(rand::random::<u32>() as usize) % sims.len()];
        let fault = match round % 4 {
            0 => Fault::ErrorCode(1, "GroundFailure".into()),
            1 => Fault::MeterJump(80_000),
            2 => Fault::Disconnect,
            _ => Fault::ClearError(1),
        };
        tracing::info!(charger_id = %sim.charger_id, fault = ?fault, "injecting a simulated fault");
        sim.inject(fault).await;
        round += 1;
    }
}

/// What the summary line shows.
struct Figures {
    active: usize,
    power_w: u64,
    energy_wh: u64,
    flagged: usize,
    faulted: usize,
    cdrs: usize,
    billed: rust_decimal::Decimal,
    incidents: u64,
}

/// One line every two seconds: chargers, sessions, power, energy, alarms.
pub async fn summary(state: Arc<NodeState>) {
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let store = state.store.clone();
        let figures = tokio::task::spawn_blocking(move || -> anyhow::Result<Figures> {
            let (all, _) = repo::list_sessions(store.as_ref(), None, None, None, 1_000_000)?;
            let active: Vec<_> = all.iter().filter(|s| s.status == SessionStatus::Active).collect();
            let power: u64 = active.iter().map(|s| u64::from(s.power_w)).sum();
            let energy: u64 = all.iter().map(|s| s.energy_wh()).sum();
            let flagged = all.iter().filter(|s| !s.flags.is_empty()).count();
            let (chargers, _) = repo::list_chargers(store.as_ref(), None, 1_000_000)?;
            let faulted = chargers
                .iter()
                .flat_map(|c| &c.connectors)
                .filter(|c| c.status == ConnectorStatus::Faulted)
                .count();
            let cdrs = laddnet_ledger::cdr::all(store.as_ref())?;
            let billed = cdrs
                .iter()
                .filter(|c| !c.review_required || c.approved)
                .map(|c| c.total_incl_vat)
                .sum();
            let incidents: u64 = laddnet_incidents::active_counts(store.as_ref())?.values().sum();
            Ok(Figures {
                active: active.len(),
                power_w: power,
                energy_wh: energy,
                flagged,
                faulted,
                cdrs: cdrs.len(),
                billed,
                incidents,
            })
        })
        .await;
        let Ok(Ok(Figures {
            active,
            power_w,
            energy_wh,
            flagged,
            faulted,
            cdrs,
            billed,
            incidents,
        })) = figures
        else {
            continue;
        };
        let line = format!(
            "chargers {:>3} | sessions {:>3} active | {:>4}.{} kW | {:>5}.{} kWh | {:>3} CDRs, EUR {:>7} billed | alarms: {} faulted connectors, {} flagged sessions, {} active incidents",
            state.chargers.len(),
            active,
            power_w / 1000,
            (power_w % 1000) / 100,
            energy_wh / 1000,
            (energy_wh % 1000) / 100,
            cdrs,
            billed,
            faulted,
            flagged,
            incidents,
        );
        if line != last {
            println!("{line}");
            last = line;
        }
    }
}
