//! `laddctl plans …` (subscription plans, who is on which) and
//! `laddctl invoices …`.

use std::path::Path;

use clap::Subcommand;
use laddnet_proto::v1;
use laddnet_proto::v1::billing_service_client::BillingServiceClient;
use serde_json::{Value, json};

use crate::{Output, channel, emit};

#[derive(Subcommand)]
pub enum PlansCmd {
    /// A plan: monthly fee (excl. VAT), included kWh, a discount, maybe a tariff of its own.
    Create {
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        currency: String,
        /// Per month, excl. VAT.
        #[arg(long, default_value = "0")]
        fee: String,
        /// VAT on the fee, percent.
        #[arg(long, default_value = "0")]
        vat: String,
        #[arg(long, default_value = "0")]
        included_kwh: String,
        /// Percent off sessions.
        #[arg(long, default_value = "0")]
        discount: String,
        /// Subscribers' sessions are priced by this tariff.
        #[arg(long, default_value = "")]
        tariff: String,
    },
    List,
    /// Put a driver on a plan (from now, or --from RFC 3339).
    Subscribe {
        driver_id: String,
        plan_id: String,
        #[arg(long, default_value = "")]
        from: String,
    },
    /// End a driver's subscription (now, or --at RFC 3339).
    Unsubscribe {
        driver_id: String,
        #[arg(long, default_value = "")]
        at: String,
    },
}

#[derive(Subcommand)]
pub enum InvoicesCmd {
    /// Invoice a month (every account with something to invoice, or one).
    Run {
        /// YYYY-MM (UTC).
        #[arg(long)]
        period: String,
        #[arg(long, default_value = "")]
        driver: String,
    },
    List {
        #[arg(long, default_value = "")]
        driver: String,
    },
    /// One invoice as JSON; --html writes the printable page to a file.
    Show {
        number: String,
        #[arg(long)]
        html: Option<std::path::PathBuf>,
    },
}

const PLAN_HEADERS: &[&str] = &["PLAN", "NAME", "FEE", "VAT %", "INCLUDED KWH", "DISCOUNT %", "TARIFF"];
const INVOICE_HEADERS: &[&str] = &["INVOICE", "DRIVER", "PERIOD", "TOTAL", "PAID", "DUE"];

fn plan_json(p: &v1::PlanInfo) -> Value {
    json!({"id": p.id, "name": p.name, "currency": p.currency, "monthly_fee": p.monthly_fee,
           "vat_percent": p.vat_percent, "included_kwh": p.included_kwh,
           "discount_percent": p.discount_percent, "tariff_id": p.tariff_id})
}

fn plan_row(p: &v1::PlanInfo) -> Vec<String> {
    vec![
        p.id.clone(),
        p.name.clone(),
        format!("{} {}", p.monthly_fee, p.currency),
        p.vat_percent.clone(),
        p.included_kwh.clone(),
        p.discount_percent.clone(),
        p.tariff_id.clone(),
    ]
}

fn invoice_json(i: &v1::InvoiceInfo) -> Value {
    serde_json::from_str(&i.json).unwrap_or_else(|_| json!({"number": i.number}))
}

fn invoice_row(i: &v1::InvoiceInfo) -> Vec<String> {
    vec![
        i.number.clone(),
        i.driver_id.clone(),
        i.period.clone(),
        format!("{} {}", i.total_incl_vat, i.currency),
        i.paid.clone(),
        i.amount_due.clone(),
    ]
}

fn subscription_out(out: Output, s: &v1::SubscriptionInfo) {
    emit(
        out,
        json!({"driver_id": s.driver_id, "plan_id": s.plan_id, "from": s.from, "until": s.until}),
        &["DRIVER", "PLAN", "FROM", "UNTIL"],
        vec![vec![
            s.driver_id.clone(),
            s.plan_id.clone(),
            s.from.clone(),
            s.until.clone(),
        ]],
    );
}

fn invoices_out(out: Output, list: &[v1::InvoiceInfo]) {
    emit(
        out,
        json!({"invoices": list.iter().map(invoice_json).collect::<Vec<_>>()}),
        INVOICE_HEADERS,
        list.iter().map(invoice_row).collect(),
    );
}

pub async fn plans(cmd: PlansCmd, cfg: Option<&Path>, out: Output) -> anyhow::Result<()> {
    let mut c = BillingServiceClient::new(channel(cfg).await?);
    match cmd {
        PlansCmd::Create {
            id,
            name,
            currency,
            fee,
            vat,
            included_kwh,
            discount,
            tariff,
        } => {
            let p = c
                .create_plan(v1::CreatePlanRequest {
                    id,
                    name,
                    currency,
                    monthly_fee: fee,
                    vat_percent: vat,
                    included_kwh,
                    discount_percent: discount,
                    tariff_id: tariff,
                })
                .await?
                .into_inner();
            emit(out, plan_json(&p), PLAN_HEADERS, vec![plan_row(&p)]);
        }
        PlansCmd::List => {
            let r = c.list_plans(v1::ListPlansRequest {}).await?.into_inner();
            emit(
                out,
                json!({"plans": r.plans.iter().map(plan_json).collect::<Vec<_>>()}),
                PLAN_HEADERS,
                r.plans.iter().map(plan_row).collect(),
            );
        }
        PlansCmd::Subscribe {
            driver_id,
            plan_id,
            from,
        } => {
            let s = c
                .subscribe(v1::SubscribeRequest {
                    driver_id,
                    plan_id,
                    from,
                })
                .await?
                .into_inner();
            subscription_out(out, &s);
        }
        PlansCmd::Unsubscribe { driver_id, at } => {
            let s = c
                .unsubscribe(v1::UnsubscribeRequest { driver_id, at })
                .await?
                .into_inner();
            subscription_out(out, &s);
        }
    }
    Ok(())
}

pub async fn invoices(cmd: InvoicesCmd, cfg: Option<&Path>, out: Output) -> anyhow::Result<()> {
    let mut c = BillingServiceClient::new(channel(cfg).await?);
    match cmd {
        InvoicesCmd::Run { period, driver } => {
            let r = c
                .run_invoices(v1::RunInvoicesRequest {
                    period,
                    driver_id: driver,
                })
                .await?
                .into_inner();
            invoices_out(out, &r.invoices);
        }
        InvoicesCmd::List { driver } => {
            let r = c
                .list_invoices(v1::ListInvoicesRequest { driver_id: driver })
                .await?
                .into_inner();
            invoices_out(out, &r.invoices);
        }
        InvoicesCmd::Show { number, html } => {
            let i = c
                .get_invoice(v1::GetInvoiceRequest {
                    number,
                    html: html.is_some(),
                })
                .await?
                .into_inner();
            if let Some(path) = html {
                crate::drivers::write_private(&path, i.html.as_bytes())?;
                eprintln!("wrote {}", path.display());
            }
            match out {
                Output::Json => println!("{}", i.json),
                _ => {
                    emit(out, invoice_json(&i), INVOICE_HEADERS, vec![invoice_row(&i)]);
                    if let Ok(v) = serde_json::from_str::<Value>(&i.json) {
                        for l in v["lines"].as_array().into_iter().flatten() {
                            println!(
                                "  {}  {} {}  VAT {}%  {} {}",
                                l["description"].as_str().unwrap_or_default(),
                                l["quantity"].as_str().unwrap_or_default(),
                                l["unit"].as_str().unwrap_or_default(),
                                l["vat_percent"].as_str().unwrap_or_default(),
                                l["incl_vat"].as_str().unwrap_or_default(),
                                i.currency
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
