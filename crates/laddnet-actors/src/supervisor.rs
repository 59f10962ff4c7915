//! The root of the charger tree: starts a [`ChargerActor`] per attached
//! charger and handles its failure by closing that charger's connection
//! (the charger reconnects and starts afresh from the store).

use std::collections::HashMap;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio_util::sync::CancellationToken;

use crate::charger::{ChargerActor, ChargerArgs, ChargerHandle};

pub struct ChargerSupervisor;

pub enum SupervisorMsg {
    Start(
        ChargerArgs,
        CancellationToken,
        RpcReplyPort<Result<ActorRef<crate::charger::ChargerMsg>, String>>,
    ),
}

pub struct SupervisorState {
    children: HashMap<ActorId, (String, CancellationToken)>,
}

impl Actor for ChargerSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<SupervisorMsg>, _: ()) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            children: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start(args, connection, reply) => {
                let id = args.charger_id.clone();
                let r = Actor::spawn_linked(None, ChargerActor, args, myself.get_cell()).await;
                let r = match r {
                    Ok((actor, _)) => {
                        state.children.insert(actor.get_id(), (id, connection));
                        Ok(actor)
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(r);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<SupervisorMsg>,
        evt: SupervisorEvtAlias,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some((id, connection)) = state.children.remove(&cell.get_id()) {
                    tracing::error!(charger_id = %id, error = %err, "charger actor failed; closing its connection");
                    connection.cancel();
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.children.remove(&cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }
}

type SupervisorEvtAlias = SupervisionEvent;

/// Typed access to the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
    config: crate::ActorConfig,
}

impl SupervisorHandle {
    pub async fn start(config: crate::ActorConfig) -> Result<Self, String> {
        let (actor, _) = Actor::spawn(None, ChargerSupervisor, ())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { actor, config })
    }

    /// Starts the actor of a charger that attached. `connection` is
    /// cancelled if the actor fails beyond its restart budget.
    pub async fn attach(&self, mut args: ChargerArgs, connection: CancellationToken) -> Result<ChargerHandle, String> {
        args.config = self.config.clone();
        match self
            .actor
            .call(
                |r| SupervisorMsg::Start(args, connection, r),
                Some(self.config.call_timeout),
            )
            .await
        {
            Ok(CallResult::Success(Ok(actor))) => Ok(ChargerHandle {
                actor,
                timeout: self.config.call_timeout,
            }),
            Ok(CallResult::Success(Err(e))) => Err(e),
            _ => Err("the charger supervisor did not answer".into()),
        }
    }

    pub fn stop(&self) {
        self.actor.stop(Some("node stopping".into()));
    }
}
