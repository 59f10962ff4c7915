//! `BillingService`: tariffs, CDRs and the ledger over gRPC.

use std::sync::Arc;

use laddnet_core::Role;
use laddnet_core::cost::{Reading, price};
use laddnet_core::tariff::Tariff;
use laddnet_ledger::cdr::Cdr;
use laddnet_ledger::invoices::{self, Invoice, Period};
use laddnet_ledger::subscriptions::{self, Plan, Subscription};
use laddnet_ledger::tariffs::{Assignment, Scope};
use laddnet_ledger::{LedgerError, cdr, ledger, tariffs};
use laddnet_proto::v1;
use laddnet_proto::v1::billing_service_server::BillingService;
use tonic::{Request, Response, Status};

use super::{blocking, invalid, page, page_token, parse_time, require_role, rfc3339};
use crate::state::NodeState;
use crate::status::NodeError;

pub struct Billing {
    pub state: Arc<NodeState>,
}

const READ: &str = "read billing data (needs billing, operator or admin)";
const WRITE: &str = "change billing data (needs billing or admin)";

fn tariff_info(t: &Tariff) -> v1::TariffInfo {
    v1::TariffInfo {
        id: t.id.clone(),
        version: t.version,
        currency: t.currency.clone(),
        tariff_json: serde_json::to_string_pretty(t).unwrap_or_default(),
    }
}

pub(crate) fn cdr_info(c: &Cdr) -> v1::CdrInfo {
    v1::CdrInfo {
        id: c.id.clone(),
        charger_id: c.charger_id.clone(),
        site_id: c.site_id.clone().unwrap_or_default(),
        start: rfc3339(c.start_ms.div_euclid(1000)),
        stop: rfc3339(c.stop_ms.div_euclid(1000)),
        energy_wh: c.energy_wh,
        currency: c.currency.clone(),
        total_excl_vat: c.total_excl_vat.to_string(),
        total_vat: c.total_vat.to_string(),
        total_incl_vat: c.total_incl_vat.to_string(),
        tariff_id: c.tariff_id.clone().unwrap_or_default(),
        tariff_version: c.tariff_version.unwrap_or_default(),
        review_required: c.review_required,
        approved: c.approved,
        flags: c.flags.clone(),
        content_hash: c.content_hash.clone(),
        json: serde_json::to_string_pretty(c).unwrap_or_default(),
    }
}

fn plan_info(p: &Plan) -> v1::PlanInfo {
    v1::PlanInfo {
        id: p.id.clone(),
        name: p.name.clone(),
        currency: p.currency.clone(),
        monthly_fee: p.monthly_fee.to_string(),
        vat_percent: p.vat_percent.to_string(),
        included_kwh: p.included_kwh.to_string(),
        discount_percent: p.discount_percent.to_string(),
        tariff_id: p.tariff_id.clone().unwrap_or_default(),
    }
}

fn subscription_info(s: &Subscription) -> v1::SubscriptionInfo {
    v1::SubscriptionInfo {
        driver_id: s.driver.clone(),
        plan_id: s.plan_id.clone(),
        from: rfc3339(s.from),
        until: s.until.map(rfc3339).unwrap_or_default(),
    }
}

fn invoice_info(i: &Invoice, html: Option<String>) -> v1::InvoiceInfo {
    v1::InvoiceInfo {
        number: i.number.clone(),
        driver_id: i.driver.clone(),
        period: i.period.clone(),
        currency: i.currency.clone(),
        total_excl_vat: i.total_excl_vat.to_string(),
        total_vat: i.total_vat.to_string(),
        total_incl_vat: i.total_incl_vat.to_string(),
        paid: i.paid.to_string(),
        amount_due: i.amount_due.to_string(),
        issued_at: rfc3339(i.issued_at),
        json: serde_json::to_string_pretty(i).unwrap_or_default(),
        html: html.unwrap_or_default(),
    }
}

fn decimal(field: &str, s: &str) -> Result<rust_decimal::Decimal, Status> {
    if s.is_empty() {
        return Ok(rust_decimal::Decimal::ZERO);
    }
    s.parse()
        .map_err(|_| invalid(format!("{field} {s:?} is not a decimal number")))
}

fn when(field: &str, s: &str) -> Result<i64, Status> {
    Ok(parse_time(s, field)?.unwrap_or_else(|| time::OffsetDateTime::now_utc().unix_timestamp()))
}

fn driver_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(invalid(format!("driver_id {id:?} is not a driver id")));
    }
    Ok(())
}

#[tonic::async_trait]
impl BillingService for Billing {
    async fn create_plan(&self, req: Request<v1::CreatePlanRequest>) -> Result<Response<v1::PlanInfo>, Status> {
        require_role(&self.state, &req, WRITE, Role::can_bill)?;
        let r = req.into_inner();
        let plan = Plan {
            id: r.id,
            name: r.name,
            currency: if r.currency.is_empty() {
                self.state.config.billing.default_currency.clone()
            } else {
                r.currency
            },
            monthly_fee: decimal("monthly_fee", &r.monthly_fee)?,
            vat_percent: decimal("vat_percent", &r.vat_percent)?,
            included_kwh: decimal("included_kwh", &r.included_kwh)?,
            discount_percent: decimal("discount_percent", &r.discount_percent)?,
            tariff_id: (!r.tariff_id.is_empty()).then_some(r.tariff_id),
            created_at: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        let store = self.state.store.clone();
        let p = plan.clone();
        blocking(move || subscriptions::create_plan(store.as_ref(), &p)).await?;
        Ok(Response::new(plan_info(&plan)))
    }

    async fn list_plans(&self, req: Request<v1::ListPlansRequest>) -> Result<Response<v1::ListPlansResponse>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let store = self.state.store.clone();
        let plans = blocking(move || subscriptions::list_plans(store.as_ref())).await?;
        Ok(Response::new(v1::ListPlansResponse {
            plans: plans.iter().map(plan_info).collect(),
        }))
    }

    async fn subscribe(&self, req: Request<v1::SubscribeRequest>) -> Result<Response<v1::SubscriptionInfo>, Status> {
        require_role(&self.state, &req, WRITE, |r| r.can_bill() || r.can_manage_drivers())?;
        let r = req.into_inner();
        driver_id(&r.driver_id)?;
        let from = when("from", &r.from)?;
        let (st, id) = (self.state.clone(), r.driver_id.clone());
        blocking(move || st.hub.drivers.get(&id)).await?;
        let store = self.state.store.clone();
        let s = blocking(move || subscriptions::subscribe(store.as_ref(), &r.driver_id, &r.plan_id, from)).await?;
        Ok(Response::new(subscription_info(&s)))
    }

    async fn unsubscribe(
        &self,
        req: Request<v1::UnsubscribeRequest>,
    ) -> Result<Response<v1::SubscriptionInfo>, Status> {
        require_role(&self.state, &req, WRITE, |r| r.can_bill() || r.can_manage_drivers())?;
        let r = req.into_inner();
        driver_id(&r.driver_id)?;
        let at = when("at", &r.at)?;
        let store = self.state.store.clone();
        let s = blocking(move || subscriptions::unsubscribe(store.as_ref(), &r.driver_id, at)).await?;
        Ok(Response::new(subscription_info(&s)))
    }

    async fn run_invoices(
        &self,
        req: Request<v1::RunInvoicesRequest>,
    ) -> Result<Response<v1::ListInvoicesResponse>, Status> {
        require_role(&self.state, &req, WRITE, Role::can_bill)?;
        let r = req.into_inner();
        let period = Period::parse(&r.period).map_err(|e| invalid(e.to_string()))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if period.start() > now {
            return Err(invalid(format!("period {period} has not started")));
        }
        let store = self.state.store.clone();
        let made = if r.driver_id.is_empty() {
            blocking(move || invoices::run_all(store.as_ref(), period, now)).await?
        } else {
            driver_id(&r.driver_id)?;
            vec![blocking(move || invoices::run(store.as_ref(), &r.driver_id, period, now)).await?]
        };
        for i in &made {
            tracing::info!(invoice = %i.number, driver_id = %i.driver, period = %i.period, "invoice issued");
        }
        Ok(Response::new(v1::ListInvoicesResponse {
            invoices: made.iter().map(|i| invoice_info(i, None)).collect(),
        }))
    }

    async fn list_invoices(
        &self,
        req: Request<v1::ListInvoicesRequest>,
    ) -> Result<Response<v1::ListInvoicesResponse>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let r = req.into_inner();
        if !r.driver_id.is_empty() {
            driver_id(&r.driver_id)?;
        }
        let store = self.state.store.clone();
        let all = blocking(move || {
            invoices::list(
                store.as_ref(),
                (!r.driver_id.is_empty()).then_some(r.driver_id.as_str()),
            )
        })
        .await?;
        Ok(Response::new(v1::ListInvoicesResponse {
            invoices: all.iter().map(|i| invoice_info(i, None)).collect(),
        }))
    }

    async fn get_invoice(&self, req: Request<v1::GetInvoiceRequest>) -> Result<Response<v1::InvoiceInfo>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let r = req.into_inner();
        let store = self.state.store.clone();
        let n = r.number.clone();
        let inv = blocking(move || invoices::get_invoice(store.as_ref(), &n)).await?;
        let html = r
            .html
            .then(|| invoices::render_html(&inv, &self.state.config.billing.invoice_issuer));
        Ok(Response::new(invoice_info(&inv, html)))
    }

    async fn create_tariff(&self, req: Request<v1::CreateTariffRequest>) -> Result<Response<v1::TariffInfo>, Status> {
        require_role(&self.state, &req, WRITE, Role::can_bill)?;
        let t = Tariff::parse_json(&req.into_inner().tariff_json).map_err(invalid)?;
        let store = self.state.store.clone();
        let t = blocking(move || tariffs::create(store.as_ref(), t)).await?;
        tracing::info!(tariff_id = %t.id, version = t.version, "tariff version created");
        Ok(Response::new(tariff_info(&t)))
    }

    async fn list_tariffs(
        &self,
        req: Request<v1::ListTariffsRequest>,
    ) -> Result<Response<v1::ListTariffsResponse>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let store = self.state.store.clone();
        let (ts, assigns) = blocking(move || {
            Ok::<_, LedgerError>((tariffs::list(store.as_ref())?, tariffs::assignments(store.as_ref())?))
        })
        .await?;
        Ok(Response::new(v1::ListTariffsResponse {
            tariffs: ts.iter().map(tariff_info).collect(),
            assignments: assigns
                .into_iter()
                .map(|a| v1::TariffAssignment {
                    scope: a.scope.as_str().into(),
                    target: a.target,
                    tariff_id: a.tariff_id,
                    valid_from: rfc3339(a.valid_from),
                    valid_to: a.valid_to.map(rfc3339).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn get_tariff(&self, req: Request<v1::GetTariffRequest>) -> Result<Response<v1::TariffInfo>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let r = req.into_inner();
        let store = self.state.store.clone();
        let t =
            blocking(move || tariffs::get_tariff(store.as_ref(), &r.id, (r.version > 0).then_some(r.version))).await?;
        Ok(Response::new(tariff_info(&t)))
    }

    async fn assign_tariff(
        &self,
        req: Request<v1::AssignTariffRequest>,
    ) -> Result<Response<v1::AssignTariffResponse>, Status> {
        require_role(&self.state, &req, WRITE, Role::can_bill)?;
        let a = req
            .into_inner()
            .assignment
            .ok_or_else(|| invalid("assignment is required"))?;
        let scope = Scope::parse(&a.scope).map_err(crate::status::to_status)?;
        if scope == Scope::Operator && !a.target.is_empty() {
            return Err(invalid("an operator assignment has no target"));
        }
        if scope != Scope::Operator && (a.target.is_empty() || a.target.len() > 64) {
            return Err(invalid("target must be 1 to 64 characters"));
        }
        let assignment = Assignment {
            scope,
            target: a.target,
            tariff_id: a.tariff_id,
            valid_from: parse_time(&a.valid_from, "valid_from")?
                .unwrap_or_else(|| time::OffsetDateTime::now_utc().unix_timestamp()),
            valid_to: parse_time(&a.valid_to, "valid_to")?,
        };
        let store = self.state.store.clone();
        blocking(move || tariffs::assign(store.as_ref(), &assignment)).await?;
        Ok(Response::new(v1::AssignTariffResponse {}))
    }

    async fn preview_cost(&self, req: Request<v1::PreviewCostRequest>) -> Result<Response<v1::CostBreakdown>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let r = req.into_inner();
        let tariff = match (r.tariff_id.is_empty(), r.tariff_json.is_empty()) {
            (false, true) => {
                let store = self.state.store.clone();
                let id = r.tariff_id.clone();
                blocking(move || tariffs::get_tariff(store.as_ref(), &id, None)).await?
            }
            (true, false) => Tariff::parse_json(&r.tariff_json).map_err(invalid)?,
            _ => return Err(invalid("give exactly one of tariff_id and tariff_json")),
        };
        let tz: chrono_tz::Tz = if r.time_zone.is_empty() {
            chrono_tz::UTC
        } else {
            r.time_zone
                .parse()
                .map_err(|_| invalid(format!("unknown time zone {:?}", r.time_zone)))?
        };
        if r.readings.is_empty() || r.readings.len() > 100_000 {
            return Err(invalid("readings: give 1 to 100000"));
        }
        let mut readings = Vec::with_capacity(r.readings.len());
        for (i, x) in r.readings.iter().enumerate() {
            let at = time::OffsetDateTime::parse(&x.timestamp, &time::format_description::well_known::Rfc3339)
                .map_err(|e| invalid(format!("readings[{i}].timestamp: {e}")))?;
            readings.push(Reading {
                at_ms: (at.unix_timestamp_nanos() / 1_000_000) as i64,
                energy_wh: x.energy_wh,
                current_ma: x.current_ma,
            });
        }
        let c = tokio::task::spawn_blocking(move || price(&tariff, &readings, &tz))
            .await
            .map_err(|e| Status::from(NodeError::Internal(e.to_string())))?
            .map_err(invalid)?;
        Ok(Response::new(v1::CostBreakdown {
            currency: c.currency.clone(),
            total_excl_vat: c.total_excl_vat.to_string(),
            total_vat: c.total_vat().to_string(),
            total_incl_vat: c.total_incl_vat.to_string(),
            json: serde_json::to_string_pretty(&c).unwrap_or_default(),
        }))
    }

    async fn list_cdrs(&self, req: Request<v1::ListCdrsRequest>) -> Result<Response<v1::ListCdrsResponse>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let (limit, after) = page(&self.state, req.get_ref().page.as_ref())?;
        let store = self.state.store.clone();
        let all = blocking(move || cdr::all(store.as_ref())).await?;
        let mut rows: Vec<&Cdr> = all
            .iter()
            .filter(|c| after.as_deref().is_none_or(|a| c.id.as_str() > a))
            .collect();
        let more = rows.len() > limit;
        rows.truncate(limit);
        Ok(Response::new(v1::ListCdrsResponse {
            next_page_token: page_token(rows.last().map(|c| c.id.as_str()), more),
            cdrs: rows.into_iter().map(cdr_info).collect(),
        }))
    }

    async fn get_cdr(&self, req: Request<v1::GetCdrRequest>) -> Result<Response<v1::CdrInfo>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let id = req.into_inner().id;
        let store = self.state.store.clone();
        let key = id.clone();
        let c = blocking(move || cdr::get_cdr(store.as_ref(), &key)).await?;
        let c = c.ok_or_else(|| crate::status::to_status(LedgerError::NotFound(format!("CDR {id}"))))?;
        Ok(Response::new(cdr_info(&c)))
    }

    async fn export_cdrs(
        &self,
        req: Request<v1::ExportCdrsRequest>,
    ) -> Result<Response<v1::ExportCdrsResponse>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let r = req.into_inner();
        let from = parse_time(&r.from, "from")?.map_or(i64::MIN, |s| s * 1000);
        let to = parse_time(&r.to, "to")?.map_or(i64::MAX, |s| s * 1000);
        let format = r.format.clone();
        if !matches!(format.as_str(), "" | "json" | "csv") {
            return Err(invalid(format!("format {format:?}: expected json or csv")));
        }
        let store = self.state.store.clone();
        let cdrs = blocking(move || cdr::between(store.as_ref(), from, to)).await?;
        let content = if format == "csv" {
            cdr::to_csv(&cdrs)
        } else {
            serde_json::to_string_pretty(&cdrs).unwrap_or_default()
        };
        Ok(Response::new(v1::ExportCdrsResponse {
            content,
            count: cdrs.len() as u32,
        }))
    }

    async fn approve_cdr(&self, req: Request<v1::GetCdrRequest>) -> Result<Response<v1::CdrInfo>, Status> {
        let (who, _) = require_role(&self.state, &req, WRITE, Role::can_bill)?;
        let id = req.into_inner().id;
        let store = self.state.store.clone();
        let c = blocking(move || cdr::approve(store.as_ref(), &id)).await?;
        tracing::info!(cdr = %c.id, by = %who.actor(), "held CDR approved and posted");
        Ok(Response::new(cdr_info(&c)))
    }

    async fn refund_cdr(&self, req: Request<v1::RefundCdrRequest>) -> Result<Response<v1::RefundCdrResponse>, Status> {
        let (who, _) = require_role(&self.state, &req, WRITE, Role::can_bill)?;
        let r = req.into_inner();
        if r.reason.trim().is_empty() || r.reason.len() > 256 {
            return Err(invalid("reason must be 1 to 256 characters"));
        }
        let store = self.state.store.clone();
        let reason = format!("{} (by {})", r.reason, who.actor());
        blocking(move || ledger::refund(store.as_ref(), &r.id, &reason)).await?;
        Ok(Response::new(v1::RefundCdrResponse {}))
    }

    async fn ledger_balances(
        &self,
        req: Request<v1::LedgerBalancesRequest>,
    ) -> Result<Response<v1::LedgerBalancesResponse>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let store = self.state.store.clone();
        let b = blocking(move || ledger::balances(store.as_ref())).await?;
        Ok(Response::new(v1::LedgerBalancesResponse {
            balances: b
                .into_iter()
                .map(|(currency, account, m)| v1::Balance {
                    amount: ledger::from_minor(m, &currency).to_string(),
                    currency,
                    account,
                })
                .collect(),
        }))
    }

    async fn revenue_report(
        &self,
        req: Request<v1::RevenueReportRequest>,
    ) -> Result<Response<v1::RevenueReportResponse>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let r = req.into_inner();
        let from = parse_time(&r.from, "from")?.map_or(i64::MIN, |s| s * 1000);
        let to = parse_time(&r.to, "to")?.map_or(i64::MAX, |s| s * 1000);
        let by = laddnet_ledger::report::GroupBy::parse(if r.by.is_empty() { "site" } else { &r.by })
            .map_err(crate::status::to_status)?;
        let store = self.state.store.clone();
        let rows = blocking(move || laddnet_ledger::report::revenue(store.as_ref(), from, to, by)).await?;
        Ok(Response::new(v1::RevenueReportResponse {
            csv: laddnet_ledger::report::to_csv(&rows),
            rows: rows
                .into_iter()
                .map(|x| v1::RevenueRow {
                    key: x.key,
                    currency: x.currency,
                    sessions: x.sessions,
                    energy_wh: x.energy_wh,
                    excl_vat: x.excl_vat.to_string(),
                    vat: x.vat.to_string(),
                    incl_vat: x.incl_vat.to_string(),
                })
                .collect(),
        }))
    }

    async fn verify_ledger(
        &self,
        req: Request<v1::VerifyLedgerRequest>,
    ) -> Result<Response<v1::VerifyLedgerResponse>, Status> {
        require_role(&self.state, &req, READ, Role::can_read_billing)?;
        let store = self.state.store.clone();
        let v = blocking(move || ledger::verify(store.as_ref())).await?;
        Ok(Response::new(v1::VerifyLedgerResponse {
            ok: v.problems.is_empty(),
            entries: v.entries,
            postings: v.postings,
            cdrs: v.cdrs,
            problems: v.problems,
        }))
    }
}
