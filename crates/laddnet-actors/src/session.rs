//! One actor per charging session, alive while the session is open. It
//! applies the session's events in order (each persisted before it is
//! acknowledged; a run of them in one store transaction) and keeps the
//! running cost. The store holds the session: a replacement actor starts
//! without reading anything and rebuilds the running cost at its first
//! event.

use std::time::Instant;

use laddnet_core::charging::{SessionStatus, TxEvent};
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

impl SessionState {
    /// What follows one applied event: the record and running cost kept,
    /// a stuck incident cleared, the start or end logged. Returns whether
    /// it ended the session, and whether it was another charger's.
    async fn after_event(&mut self, result: &mut Result<Applied, RepoError>, reading: Reading) -> (bool, bool) {
        if let Ok(applied) = result {
            self.last_event = Instant::now();
            if !applied.duplicate && applied.record.status != SessionStatus::Ended {
                self.update_pricing(reading).await;
            }
            applied.running_cost = self.running.clone();
        }
        let ended = matches!(&result, Ok(a) if a.record.status == SessionStatus::Ended && !a.duplicate);
        if self.stuck && matches!(&result, Ok(a) if !a.duplicate) {
            // Meter data again: the stuck incident resolves.
            self.stuck = false;
            let (store, subject) = (self.args.store.clone(), format!("session:{}", self.args.transaction_id));
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
        (ended, matches!(result, Err(RepoError::ForeignTransaction(_))))
    }
}

/// Applies a run of events (in order, one store transaction for all that
/// are valid) and returns each one's result with its reading. An event
/// that fails on its own (invalid, another charger's) is refused alone,
/// having written nothing; if the store itself fails, each event is tried
/// again in a transaction of its own so every result is its own.
async fn apply_run(args: &SessionArgs, events: Vec<TxEvent>) -> Vec<(Result<Applied, RepoError>, Reading)> {
    let readings: Vec<Reading> = events
        .iter()
        .map(|e| Reading {
            at_ms: e.at_ms,
            energy_wh: e.meter.energy_wh,
            current_ma: e.meter.current_ma,
        })
        .collect();
    let checked: Vec<Result<(), RepoError>> = events.iter().map(repo::validate_event).collect();
    let (charger, site, max) = (args.charger_id.clone(), args.site_id.clone(), args.max_power_w);
    let valid: Vec<TxEvent> = events
        .iter()
        .zip(&checked)
        .filter(|(_, c)| c.is_ok())
        .map(|(e, _)| e.clone())
        .collect();
    let together = if valid.is_empty() {
        Ok(Vec::new())
    } else {
        let (charger, site) = (charger.clone(), site.clone());
        // A store error may leave the run half-written: it is rolled back
        // and retried one by one.
        repo::write(&args.store, move |tx| {
            repo::apply_run_in(tx, &charger, site.as_deref(), max, &valid)
        })
        .await
    };
    let mut applied = match together {
        Ok(v) => v.into_iter(),
        Err(_) if events.len() > 1 => {
            let mut one_by_one = Vec::new();
            for e in events
                .iter()
                .zip(&checked)
                .filter(|(_, c)| c.is_ok())
                .map(|(e, _)| e.clone())
            {
                let (charger, site) = (charger.clone(), site.clone());
                one_by_one.push(
                    repo::write(&args.store, move |tx| {
                        repo::apply_event_in(tx, &charger, site.as_deref(), max, &e)
                    })
                    .await,
                );
            }
            one_by_one.into_iter()
        }
        Err(e) => vec![Err(e)].into_iter(),
    };
    checked
        .into_iter()
        .zip(readings)
        .map(|(c, reading)| {
            let r = match c {
                Err(e) => Err(e),
                Ok(()) => applied
                    .next()
                    .unwrap_or_else(|| Err(RepoError::Gone("the event was not applied".into()))),
            };
            (r, reading)
        })
        .collect()
}

/// Faults a test can inject (feature `fault-injection`).
#[derive(Debug, Clone, Copy)]
pub enum SessionFault {
    Panic,
    Hang,
}

pub enum SessionMsg {
    /// A run of events of this session, applied in order (one store
    /// transaction for the run); one result each, in the same order.
    Event(Vec<TxEvent>, RpcReplyPort<Vec<Result<Applied, RepoError>>>),
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
        // Nothing is read here, so a replacement is quick: the first event
        // rebuilds the running cost from the store (`update_pricing`), and
        // every event is applied to the stored session.
        Ok(SessionState {
            args,
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
            SessionMsg::Event(events, reply) => {
                let mut results = apply_run(&state.args, events).await;
                let (mut ended, mut foreign) = (false, false);
                for (result, reading) in &mut results {
                    let (e, f) = state.after_event(result, *reading).await;
                    ended |= e;
                    foreign |= f;
                }
                let _ = reply.send(results.into_iter().map(|(r, _)| r).collect());
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
                if blocking(move || repo::flag_session(store.as_ref(), &id, laddnet_core::charging::FLAG_STUCK))
                    .await?
                    .is_some()
                {
                    tracing::warn!(transaction_id = %state.args.transaction_id, charger_id = %state.args.charger_id, "session stuck: no meter data");
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
