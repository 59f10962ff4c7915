//! One actor per charging session, alive while the session is open. It
//! holds the session's record in memory, applies events one at a time
//! (each persisted before it is acknowledged) and rebuilds itself from the
//! store when restarted.

use std::time::Instant;

use laddnet_core::charging::{SessionRecord, SessionStatus, TxEvent};
use laddnet_store::SharedStore;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use laddnet_core::cost::{Meter, Reading};
use laddnet_core::tariff::Tariff;

use crate::repo::{self, Applied, RepoError, RunningCost};

pub struct SessionActor;

pub struct SessionArgs {
    pub store: SharedStore,
    pub transaction_id: String,
    pub charger_id: String,
    pub site_id: Option<String>,
    pub max_power_w: u32,
    /// Bill the session when it ends, in this default currency (None: leave
    /// it to the billing sweeper).
    pub bill_in: Option<String>,
}

pub struct SessionState {
    args: SessionArgs,
    record: Option<SessionRecord>,
    last_event: Instant,
    pricing: Option<LivePricing>,
    /// Whether a tariff lookup has been done (none may apply).
    priced: bool,
    running: Option<RunningCost>,
    /// A stuck-session incident was raised and not yet cleared.
    stuck: bool,
}

/// The running cost, kept incrementally: each new reading's periods are
/// added to the meter (pricing in pieces equals pricing whole).
struct LivePricing {
    tariff: Tariff,
    tz: chrono_tz::Tz,
    first: Reading,
    last: Reading,
    meter: Meter,
}

impl LivePricing {
    fn running(&self) -> RunningCost {
        let c = self.meter.cost(&self.tariff, false);
        RunningCost {
            currency: c.currency,
            excl_vat: c.total_excl_vat,
            incl_vat: c.total_incl_vat,
        }
    }
}

/// Builds the pricing of a session from everything stored for it.
fn load_pricing(store: &SharedStore, tx_id: &str) -> Result<Option<LivePricing>, RepoError> {
    let gone = |e: laddnet_ledger::LedgerError| RepoError::Gone(e.to_string());
    let Some(s) = repo::get_session(store.as_ref(), tx_id)? else {
        return Ok(None);
    };
    let readings = laddnet_ledger::cdr::readings(store.as_ref(), tx_id).map_err(gone)?;
    let Some(first) = readings.first().copied() else {
        return Ok(None);
    };
    let ctx = laddnet_ledger::cdr::pricing_context(store.as_ref(), &s, first.at_ms).map_err(gone)?;
    let Some(tariff) = ctx.tariff else { return Ok(None) };
    let periods = laddnet_core::cost::periods(&tariff, &readings, &ctx.tz, first.at_ms, first.energy_wh)
        .map_err(|e| RepoError::Invalid(e.to_string()))?;
    let mut meter = Meter::start(&tariff, first, &ctx.tz);
    for p in &periods {
        meter.add(&tariff, p);
    }
    let last = *readings.last().unwrap_or(&first);
    Ok(Some(LivePricing {
        tariff,
        tz: ctx.tz,
        first,
        last,
        meter,
    }))
}

impl SessionState {
    async fn update_pricing(&mut self, reading: Reading) {
        let in_order = matches!(&self.pricing, Some(p) if reading.at_ms >= p.last.at_ms);
        if in_order {
            if let Some(p) = &mut self.pricing
                && let Ok(new) =
                    laddnet_core::cost::periods(&p.tariff, &[p.last, reading], &p.tz, p.first.at_ms, p.first.energy_wh)
            {
                for x in &new {
                    p.meter.add(&p.tariff, x);
                }
                p.last = reading;
            }
        } else if self.pricing.is_some() || !self.priced {
            // First event of this actor's life, or one out of time order:
            // rebuild from the store.
            let (store, id) = (self.args.store.clone(), self.args.transaction_id.clone());
            match blocking(move || load_pricing(&store, &id)).await {
                Ok(p) => self.pricing = p,
                Err(e) => {
                    tracing::warn!(transaction_id = %self.args.transaction_id, error = %e, "running cost unavailable")
                }
            }
            self.priced = true;
        }
        self.running = self.pricing.as_ref().map(LivePricing::running);
    }
}

/// Faults a test can inject (feature `fault-injection`).
#[derive(Debug, Clone, Copy)]
pub enum SessionFault {
    Panic,
    Hang,
}

pub enum SessionMsg {
    Event(TxEvent, RpcReplyPort<Result<Applied, RepoError>>),
    /// Liveness: answered at once by a healthy actor.
    Ping(RpcReplyPort<Instant>),
    MarkStuck,
    Fault(SessionFault),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RepoError> + Send + 'static,
) -> Result<T, RepoError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RepoError::Gone(e.to_string()))?
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        let (store, id) = (args.store.clone(), args.transaction_id.clone());
        // Rehydrate: a restarted actor continues from what was persisted.
        let record = blocking(move || repo::get_session(store.as_ref(), &id)).await?;
        Ok(SessionState {
            args,
            record,
            last_event: Instant::now(),
            pricing: None,
            priced: false,
            running: None,
            stuck: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Event(event, reply) => {
                let a = &state.args;
                let (store, charger, site, max) =
                    (a.store.clone(), a.charger_id.clone(), a.site_id.clone(), a.max_power_w);
                let reading = Reading {
                    at_ms: event.at_ms,
                    energy_wh: event.meter.energy_wh,
                    current_ma: event.meter.current_ma,
                };
                let mut result = match repo::validate_event(&event) {
                    Err(e) => Err(e),
                    Ok(()) => {
                        repo::write(&store, move |tx| {
                            repo::apply_event_in(tx, &charger, site.as_deref(), max, &event)
                        })
                        .await
                    }
                };
                if let Ok(applied) = &mut result {
                    state.record = Some(applied.record.clone());
                    state.last_event = Instant::now();
                    if !applied.duplicate && applied.record.status != SessionStatus::Ended {
                        state.update_pricing(reading).await;
                    }
                    applied.running_cost = state.running.clone();
                }
                let ended = matches!(&result, Ok(a) if a.record.status == SessionStatus::Ended && !a.duplicate);
                if state.stuck && matches!(&result, Ok(a) if !a.duplicate) {
                    // Meter data again: the stuck incident resolves.
                    state.stuck = false;
                    let (store, subject) = (
                        state.args.store.clone(),
                        format!("session:{}", state.args.transaction_id),
                    );
                    let cleared = tokio::task::spawn_blocking(move || {
                        laddnet_store::StoreExt::transact(store.as_ref(), |tx| {
                            laddnet_incidents::clear(
                                tx,
                                laddnet_incidents::AlarmKind::StuckSession,
                                &subject,
                                now_ms(),
                                "meter data again",
                            )
                        })
                    })
                    .await;
                    if let Ok(Err(e)) = cleared {
                        tracing::warn!(error = %e, "clearing the stuck-session incident failed");
                    }
                }
                if let Ok(a) = &result
                    && !a.duplicate
                    && (ended || a.record.samples == 1)
                {
                    let r = &a.record;
                    tracing::info!(
                        transaction_id = %r.transaction_id,
                        charger_id = %r.charger_id,
                        connector_id = r.connector_id,
                        driver_id = r.driver_id.as_deref().unwrap_or("-"),
                        energy_wh = r.last.energy_wh.saturating_sub(r.first.energy_wh),
                        "{}",
                        if ended { "session ended" } else { "session started" }
                    );
                }
                let foreign = matches!(&result, Err(RepoError::ForeignTransaction(_)));
                let _ = reply.send(result);
                if ended && let Some(currency) = state.args.bill_in.clone() {
                    // The charger has its ack; the CDR follows. If this fails or
                    // the node dies first, the billing sweeper does it.
                    let (store, id) = (state.args.store.clone(), state.args.transaction_id.clone());
                    let billed = tokio::task::spawn_blocking(move || {
                        laddnet_ledger::cdr::bill_session(
                            store.as_ref(),
                            &id,
                            &laddnet_ledger::cdr::BillingDefaults { currency },
                        )
                    })
                    .await;
                    if let Ok(Err(e)) = billed {
                        tracing::warn!(transaction_id = %state.args.transaction_id, error = %e, "billing at session end failed; the sweeper retries");
                    }
                }
                if ended || foreign {
                    myself.stop(Some(if ended { "session ended" } else { "foreign transaction" }.into()));
                }
            }
            SessionMsg::Ping(reply) => {
                let _ = reply.send(state.last_event);
            }
            SessionMsg::MarkStuck => {
                let (store, id) = (state.args.store.clone(), state.args.transaction_id.clone());
                if let Some(r) =
                    blocking(move || repo::flag_session(store.as_ref(), &id, laddnet_core::charging::FLAG_STUCK))
                        .await?
                {
                    tracing::warn!(transaction_id = %state.args.transaction_id, charger_id = %state.args.charger_id, "session stuck: no meter data");
                    state.record = Some(r);
                    let (store, subject, detail) = (
                        state.args.store.clone(),
                        format!("session:{}", state.args.transaction_id),
                        format!("no meter data from charger {}", state.args.charger_id),
                    );
                    let raised = tokio::task::spawn_blocking(move || {
                        laddnet_store::StoreExt::transact(store.as_ref(), |tx| {
                            laddnet_incidents::raise(
                                tx,
                                &laddnet_incidents::Alarm {
                                    kind: laddnet_incidents::AlarmKind::StuckSession,
                                    subject: &subject,
                                    detail: &detail,
                                    at_ms: now_ms(),
                                },
                            )
                        })
                    })
                    .await;
                    match raised {
                        Ok(Ok(_)) => state.stuck = true,
                        Ok(Err(e)) => tracing::warn!(error = %e, "raising the stuck-session incident failed"),
                        Err(_) => {}
                    }
                }
            }
            SessionMsg::Fault(f) => fault(f).await,
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(feature = "fault-injection")]
async fn fault(f: SessionFault) {
    match f {
        SessionFault::Panic => panic!("injected session fault"),
        SessionFault::Hang => std::future::pending::<()>().await,
    }
}

#[cfg(not(feature = "fault-injection"))]
async fn fault(_: SessionFault) {
    tracing::warn!("fault injection is not compiled in; ignored");
}
