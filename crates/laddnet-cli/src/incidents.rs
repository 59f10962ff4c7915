//! `laddctl incidents …`.

use std::path::Path;

use clap::Subcommand;
use laddnet_proto::v1;
use laddnet_proto::v1::incident_service_client::IncidentServiceClient;
use serde_json::{Value, json};

use crate::{Output, channel, emit};

#[derive(Subcommand)]
pub enum IncidentsCmd {
    /// Newest first.
    List {
        /// open, acknowledged, assigned or resolved.
        #[arg(long, default_value = "")]
        state: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One incident with its timeline.
    Show { id: String },
    /// Seen: someone is on it.
    Ack { id: String },
    /// Hand it to a technician.
    Assign { id: String, technician: String },
    /// Closed by hand (a recurrence opens a new incident).
    Resolve {
        id: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// The incidents not closed, then each change as it happens (Ctrl-C ends).
    Watch,
}

const HEADERS: &[&str] = &[
    "INCIDENT", "KIND", "SUBJECT", "SEVERITY", "STATE", "ACTIVE", "ASSIGNEE", "OPENED",
];

fn incident_json(i: &v1::IncidentInfo) -> Value {
    json!({"id": i.id, "kind": i.kind, "subject": i.subject, "severity": i.severity,
           "state": i.state, "active": i.active, "assignee": i.assignee,
           "occurrences": i.occurrences, "opened_at": i.opened_at,
           "timeline": i.timeline.iter().map(|s| json!({"at": s.at, "what": s.what, "by": s.by, "detail": s.detail})).collect::<Vec<_>>()})
}

fn row(i: &v1::IncidentInfo) -> Vec<String> {
    vec![
        i.id.clone(),
        i.kind.clone(),
        i.subject.clone(),
        i.severity.clone(),
        i.state.clone(),
        if i.active { "yes" } else { "no" }.into(),
        i.assignee.clone(),
        i.opened_at.clone(),
    ]
}

fn one(out: Output, i: &v1::IncidentInfo) {
    emit(out, incident_json(i), HEADERS, vec![row(i)]);
    if out == Output::Table {
        for s in &i.timeline {
            println!("  {}  {:<12} {:<10} {}", s.at, s.what, s.by, s.detail);
        }
    }
}

pub async fn run(cmd: IncidentsCmd, cfg: Option<&Path>, out: Output) -> anyhow::Result<()> {
    let mut c = IncidentServiceClient::new(channel(cfg).await?);
    let action = |id: String, note: String| v1::IncidentActionRequest { id, note };
    match cmd {
        IncidentsCmd::List { state, limit } => {
            let r = c
                .list_incidents(v1::ListIncidentsRequest { state, limit })
                .await?
                .into_inner();
            emit(
                out,
                json!({"incidents": r.incidents.iter().map(incident_json).collect::<Vec<_>>()}),
                HEADERS,
                r.incidents.iter().map(row).collect(),
            );
        }
        IncidentsCmd::Show { id } => one(out, &c.get_incident(v1::GetIncidentRequest { id }).await?.into_inner()),
        IncidentsCmd::Ack { id } => one(
            out,
            &c.acknowledge_incident(action(id, String::new())).await?.into_inner(),
        ),
        IncidentsCmd::Assign { id, technician } => {
            one(out, &c.assign_incident(action(id, technician)).await?.into_inner())
        }
        IncidentsCmd::Resolve { id, note } => one(out, &c.resolve_incident(action(id, note)).await?.into_inner()),
        IncidentsCmd::Watch => {
            let mut s = c.watch_incidents(v1::WatchIncidentsRequest {}).await?.into_inner();
            while let Some(i) = s.message().await? {
                match out {
                    Output::Json => println!("{}", incident_json(&i)),
                    Output::Table => {
                        let last = i.timeline.last();
                        println!(
                            "{}  {:<8} {:<13} {:<21} {:<24} {}",
                            last.map(|s| s.at.as_str()).unwrap_or(&i.opened_at),
                            i.severity,
                            i.state,
                            i.kind,
                            i.subject,
                            last.map(|s| format!("{}: {}", s.what, s.detail)).unwrap_or_default()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum AvailabilityCmd {
    /// Uptime over a period, with downtime by reason.
    Report {
        /// RFC 3339.
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// connector, charger or site.
        #[arg(long, default_value = "charger")]
        by: String,
    },
}

fn hours(s: i64) -> String {
    format!("{:.2}", s as f64 / 3600.0)
}

pub async fn availability(cmd: AvailabilityCmd, cfg: Option<&Path>, out: Output) -> anyhow::Result<()> {
    let AvailabilityCmd::Report { from, to, by } = cmd;
    let mut c = laddnet_proto::v1::operator_service_client::OperatorServiceClient::new(channel(cfg).await?);
    let r = c
        .availability_report(v1::AvailabilityReportRequest { from, to, by })
        .await?
        .into_inner();
    emit(
        out,
        json!({"rows": r.rows.iter().map(|x| json!({
            "key": x.key, "availability_percent": x.availability_percent, "counted_s": x.counted_s,
            "up_s": x.up_s, "fault_s": x.fault_s, "offline_s": x.offline_s, "maintenance_s": x.maintenance_s,
        })).collect::<Vec<_>>()}),
        &[
            "KEY",
            "AVAILABLE %",
            "COUNTED H",
            "UP H",
            "FAULT H",
            "OFFLINE H",
            "MAINTENANCE H",
        ],
        r.rows
            .iter()
            .map(|x| {
                vec![
                    x.key.clone(),
                    x.availability_percent.clone(),
                    hours(x.counted_s),
                    hours(x.up_s),
                    hours(x.fault_s),
                    hours(x.offline_s),
                    hours(x.maintenance_s),
                ]
            })
            .collect(),
    );
    Ok(())
}
