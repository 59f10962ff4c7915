//! `OperatorService`: the operators' view of the network.

use std::sync::Arc;

use laddnet_proto::v1;
use laddnet_proto::v1::operator_service_server::OperatorService;
use tonic::{Request, Response, Status};

use super::{page, page_token, require_role, rfc3339};
use crate::identity::Principal;
use crate::state::NodeState;

pub struct Operator {
    pub state: Arc<NodeState>,
}

#[tonic::async_trait]
impl OperatorService for Operator {
    async fn who_am_i(&self, req: Request<v1::WhoAmIRequest>) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let (id, role) = require_role(&self.state, &req, "ask", |_| true)?;
        let name = match &id.principal {
            Principal::Operator { name, .. } => name.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(v1::WhoAmIResponse {
            name,
            role: role.to_string(),
            serial: id.serial.clone(),
            not_after: rfc3339(id.not_after),
        }))
    }

    async fn list_chargers(
        &self,
        req: Request<v1::ListChargersRequest>,
    ) -> Result<Response<v1::ListChargersResponse>, Status> {
        require_role(&self.state, &req, "list chargers", |_| true)?;
        let (limit, after) = page(&self.state, req.get_ref().page.as_ref())?;
        let (rows, more) = self.state.chargers.page(after.as_deref(), limit);
        Ok(Response::new(v1::ListChargersResponse {
            next_page_token: page_token(rows.last().map(|c| c.charger_id.as_str()), more),
            chargers: rows,
        }))
    }
}
