//! One actor per charging session, alive while the session is open. It
//! holds the session's record in memory, applies events one at a time
//! (each persisted before it is acknowledged) and rebuilds itself from the
//! store when restarted.

use std::time::Instant;

use laddnet_core::charging::{SessionRecord, SessionStatus, TxEvent};
use laddnet_store::SharedStore;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::repo::{self, Applied, RepoError};

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
                let result =
                    blocking(move || repo::apply_event(store.as_ref(), &charger, site.as_deref(), max, &event)).await;
                if let Ok(applied) = &result {
                    state.record = Some(applied.record.clone());
                    state.last_event = Instant::now();
                }
                let ended = matches!(&result, Ok(a) if a.record.status == SessionStatus::Ended && !a.duplicate);
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
                }
            }
            SessionMsg::Fault(f) => fault(f).await,
        }
        Ok(())
    }
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
