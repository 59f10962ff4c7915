//! laddnet's pure domain: identifiers, operator roles and the error kinds
//! every crate maps its errors onto. No I/O lives here.
//!
//! - [`ChargerId`] and friends: validated newtypes, so an id that reached a
//!   handler has already been checked.
//! - [`Role`]: what an operator certificate allows.
//! - [`charging`]: connectors, meter samples, transaction events and the
//!   order-independent session record.
//! - [`tariff`] and [`cost`]: OCPI 2.2.1 tariffs and the pure cost engine.
//! - [`load`]: how a site's grid limit is shared among its sessions.
//! - [`ErrorKind`]: the coarse classes that the node maps to gRPC codes in
//!   one table.

#![forbid(unsafe_code)]

pub mod charging;
pub mod cost;
mod error;
mod ids;
pub mod load;
mod role;
pub mod tariff;

pub use error::{ErrorKind, HasKind};
pub use ids::{ChargerId, IdError, OperatorName, SiteId};
pub use role::Role;
