//! laddnet's supervision tree (ractor):
//!
//! ```text
//! ChargerSupervisor ── ChargerActor (one per attached charger)
//!                        └── SessionActor (one per open session)
//! ```
//!
//! - [`repo`]: chargers, sites and sessions in the store; one store
//!   transaction per accepted event, idempotent by `(transaction, seq)`.
//! - [`session`]: a session's actor; rebuilds from the store on restart.
//! - [`charger`]: a charger's actor; supervises its sessions one-for-one
//!   with a restart budget, and a watchdog for hung or silent sessions.
//! - [`supervisor`]: starts charger actors; a charger actor that fails
//!   (its sessions' budget exhausted) gets its connection closed.
//!
//! Callers use the typed handles ([`ChargerHandle`], [`SupervisorHandle`]);
//! they never build message enums.

#![forbid(unsafe_code)]

pub mod availability;
pub mod charger;
pub mod cluster;
pub mod repo;
pub mod session;
pub mod supervisor;

use std::time::Duration;

pub use charger::ChargerHandle;
pub use session::SessionFault;
pub use supervisor::SupervisorHandle;

/// Timings and budgets of the tree.
#[derive(Debug, Clone)]
pub struct ActorConfig {
    /// How long a caller waits for an actor's answer.
    pub call_timeout: Duration,
    /// Session restarts allowed within `restart_window` before escalating.
    pub max_restarts: u32,
    pub restart_window: Duration,
    /// How often the watchdog pings sessions, and how long it waits.
    pub watchdog_interval: Duration,
    pub ping_timeout: Duration,
    /// A session with no meter data for this long is flagged stuck.
    pub stuck_after: Duration,
    /// Bill a session as soon as it ends, in this default currency.
    pub bill_on_end: Option<String>,
}

impl Default for ActorConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(5),
            max_restarts: 3,
            restart_window: Duration::from_secs(10),
            watchdog_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(2),
            stuck_after: Duration::from_secs(600),
            bill_on_end: Some("EUR".into()),
        }
    }
}
