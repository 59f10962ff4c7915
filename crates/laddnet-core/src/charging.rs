//! Chargers, connectors and charging sessions as laddnet understands them.
//!
//! A session's aggregates are a pure function of the *set* of its accepted
//! events: [`SessionRecord::apply`] gives the same record whatever order the
//! events arrive in, and however often each is replayed. That is what lets
//! a charger replay its offline queue twice, shuffled, with gaps, and still
//! produce the same bill.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectorType {
    Ac,
    Dc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectorStatus {
    Available,
    Preparing,
    Charging,
    SuspendedEv,
    SuspendedEvse,
    Finishing,
    Reserved,
    Unavailable,
    Faulted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connector {
    pub connector_id: u32,
    pub connector_type: ConnectorType,
    pub max_power_w: u32,
    pub status: ConnectorStatus,
    #[serde(default)]
    pub error_code: String,
}

/// One meter reading, in integers: Wh, W, mA, mV, percent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterSample {
    pub energy_wh: u64,
    pub power_w: u32,
    pub current_ma: u32,
    pub voltage_mv: u32,
    pub soc_percent: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxEventKind {
    Started,
    Updated,
    Ended,
}

/// One transaction event as accepted from a charger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxEvent {
    pub transaction_id: String,
    pub seq: u64,
    pub kind: TxEventKind,
    pub connector_id: u32,
    /// Unix milliseconds, charger clock.
    pub at_ms: i64,
    pub meter: MeterSample,
    pub offline: bool,
    #[serde(default)]
    pub stop_reason: String,
    /// Who started it (start events): the pseudonymous driver id, when the
    /// token is known, and the token's pseudonymous reference. Never the
    /// token value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ref: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionStatus {
    Active,
    /// The charger dropped mid-session; resumes when it comes back, or is
    /// closed after the interruption timeout.
    Interrupted,
    Ended,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Interrupted => "interrupted",
            SessionStatus::Ended => "ended",
        }
    }
}

/// Anomalies found in a session's meter data: billed only after review.
pub const FLAG_REGISTER_BACKWARDS: &str = "register-backwards";
pub const FLAG_ENERGY_EXCEEDS_CAPACITY: &str = "energy-exceeds-capacity";
/// The energy between two readings disagrees with the power they report
/// (more than 1.5 times the higher, or less than half the lower): the
/// register or the power measurement is off, or tampered with.
pub const FLAG_ENERGY_POWER_MISMATCH: &str = "energy-power-mismatch";
pub const FLAG_STUCK: &str = "stuck";
/// A start the token did not allow (found when an offline start was
/// reconciled, or a charger started despite a refusal).
pub const FLAG_UNAUTHORIZED_START: &str = "unauthorized-start";

/// A reading at a sequence number: what neighbours are compared by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub seq: u64,
    pub at_ms: i64,
    pub energy_wh: u64,
    /// The power at this reading, W (0 in records stored before it was kept).
    #[serde(default)]
    pub power_w: u32,
}

impl From<&TxEvent> for Point {
    fn from(e: &TxEvent) -> Self {
        Point {
            seq: e.seq,
            at_ms: e.at_ms,
            energy_wh: e.meter.energy_wh,
            power_w: e.meter.power_w,
        }
    }
}

/// A session's state, kept up to date event by event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub transaction_id: String,
    pub charger_id: String,
    pub connector_id: u32,
    #[serde(default)]
    pub site_id: Option<String>,
    pub status: SessionStatus,
    /// The first and last readings by sequence number.
    pub first: Point,
    pub last: Point,
    pub samples: u64,
    /// Power and state of charge at the last reading.
    pub power_w: u32,
    pub soc_percent: Option<u32>,
    /// Set by the start event (seq 0) when it has arrived.
    pub started_at_ms: Option<i64>,
    /// Set by the end event.
    pub ended: Option<Point>,
    #[serde(default)]
    pub stop_reason: String,
    /// Unix seconds (node clock) the charger dropped, while interrupted.
    #[serde(default)]
    pub interrupted_at: Option<i64>,
    /// The connector's rating, for plausibility checks.
    pub max_power_w: u32,
    pub flags: BTreeSet<String>,
    /// The pseudonymous driver and token reference, from the start event.
    #[serde(default)]
    pub driver_id: Option<String>,
    #[serde(default)]
    pub token_ref: Option<String>,
    /// Set when a start was authorized after the fact (an offline start)
    /// and refused: why.
    #[serde(default)]
    pub authorization: Option<String>,
}

impl SessionRecord {
    /// A session opened by its first accepted event.
    pub fn open(charger_id: &str, site_id: Option<String>, max_power_w: u32, e: &TxEvent) -> Self {
        let p = Point::from(e);
        let mut r = SessionRecord {
            transaction_id: e.transaction_id.clone(),
            charger_id: charger_id.to_string(),
            connector_id: e.connector_id,
            site_id,
            status: SessionStatus::Active,
            first: p,
            last: p,
            samples: 0,
            power_w: 0,
            soc_percent: None,
            started_at_ms: None,
            ended: None,
            stop_reason: String::new(),
            interrupted_at: None,
            max_power_w,
            flags: BTreeSet::new(),
            driver_id: None,
            token_ref: None,
            authorization: None,
        };
        r.samples = 0;
        r
    }

    /// Folds in a new (never seen) event, given its nearest stored
    /// neighbours by sequence number. Order-independent: anomalies are
    /// checked between neighbours at insertion, and any anomaly between
    /// neighbours in the final set was neighbours when the later of the two
    /// arrived.
    pub fn apply(&mut self, e: &TxEvent, prev: Option<Point>, next: Option<Point>) {
        let p = Point::from(e);
        if self.samples == 0 || p.seq < self.first.seq {
            self.first = p;
        }
        if self.samples == 0 || p.seq >= self.last.seq {
            self.last = p;
            self.power_w = e.meter.power_w;
            self.soc_percent = e.meter.soc_percent;
        }
        self.samples += 1;
        match e.kind {
            TxEventKind::Started => {
                self.started_at_ms = Some(e.at_ms);
                self.driver_id = e.driver_id.clone();
                self.token_ref = e.token_ref.clone();
            }
            TxEventKind::Ended => {
                self.ended = Some(p);
                self.status = SessionStatus::Ended;
                self.stop_reason = e.stop_reason.clone();
                self.power_w = 0;
            }
            TxEventKind::Updated => {}
        }
        for (a, b) in [(prev, Some(p)), (Some(p), next)] {
            if let (Some(a), Some(b)) = (a, b) {
                self.check_pair(a, b);
            }
        }
    }

    fn check_pair(&mut self, a: Point, b: Point) {
        if b.energy_wh < a.energy_wh {
            self.flags.insert(FLAG_REGISTER_BACKWARDS.into());
            return;
        }
        // Energy between two readings can be at most the connector's rating
        // times the time between them (10 % and 1 Wh of slack for meter
        // resolution and clock jitter).
        let dt_ms = (b.at_ms - a.at_ms).max(0) as u128;
        let allowed_wh = (u128::from(self.max_power_w) * dt_ms * 11) / (3_600_000 * 10) + 1;
        let delta = u128::from(b.energy_wh - a.energy_wh);
        if self.max_power_w > 0 && delta > allowed_wh {
            self.flags.insert(FLAG_ENERGY_EXCEEDS_CAPACITY.into());
        }
        // The power integral: between two readings the power was somewhere
        // around the two reported values. Energy far outside that range
        // (1.5 times the higher, half the lower, 2 Wh of meter resolution)
        // means one of the two measurements is wrong.
        let (lo, hi) = (
            u128::from(a.power_w.min(b.power_w)),
            u128::from(a.power_w.max(b.power_w)),
        );
        let wh = |w: u128| w * dt_ms / 3_600_000;
        if dt_ms > 0 && (delta > wh(hi) * 3 / 2 + 2 || delta + 2 < wh(lo) / 2) {
            self.flags.insert(FLAG_ENERGY_POWER_MISMATCH.into());
        }
    }

    /// Energy delivered so far (to the end reading once ended), Wh.
    pub fn energy_wh(&self) -> u64 {
        let end = self.ended.unwrap_or(self.last);
        end.energy_wh.saturating_sub(self.first.energy_wh)
    }

    /// Seconds from the start to the end reading, or to `now_ms` while open.
    pub fn duration_s(&self, now_ms: i64) -> u64 {
        let start = self.started_at_ms.unwrap_or(self.first.at_ms);
        let end = match self.ended {
            Some(p) => p.at_ms,
            None => now_ms.max(self.last.at_ms),
        };
        ((end - start).max(0) / 1000) as u64
    }

    /// Sequence numbers between the first and last seen that never arrived.
    pub fn missing_events(&self) -> u64 {
        (self.last.seq - self.first.seq + 1).saturating_sub(self.samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, wh: u64, kind: TxEventKind) -> TxEvent {
        TxEvent {
            transaction_id: "t".into(),
            seq,
            kind,
            connector_id: 1,
            at_ms: 1_000_000 + seq as i64 * 60_000,
            meter: MeterSample {
                energy_wh: wh,
                power_w: 11_000,
                ..Default::default()
            },
            offline: false,
            stop_reason: String::new(),
            driver_id: None,
            token_ref: None,
        }
    }

    /// Applies events in the given order, finding neighbours among those
    /// already applied, as the store does.
    fn fold(events: &[TxEvent]) -> SessionRecord {
        let mut seen: std::collections::BTreeMap<u64, Point> = Default::default();
        let mut r = SessionRecord::open("cp", None, 11_000, &events[0]);
        for e in events {
            if seen.contains_key(&e.seq) {
                continue;
            }
            let prev = seen.range(..e.seq).next_back().map(|(_, p)| *p);
            let next = seen.range(e.seq + 1..).next().map(|(_, p)| *p);
            r.apply(e, prev, next);
            seen.insert(e.seq, Point::from(e));
        }
        r
    }

    fn session() -> Vec<TxEvent> {
        let mut v = vec![ev(0, 1000, TxEventKind::Started)];
        for i in 1..10 {
            v.push(ev(i, 1000 + i * 150, TxEventKind::Updated));
        }
        v.push(ev(10, 2500, TxEventKind::Ended));
        v
    }

    #[test]
    fn order_and_replays_do_not_change_the_record() {
        let inorder = fold(&session());
        assert_eq!(inorder.energy_wh(), 1500);
        assert_eq!(inorder.status, SessionStatus::Ended);
        assert!(inorder.flags.is_empty(), "{:?}", inorder.flags);
        let mut shuffled = session();
        shuffled.reverse();
        shuffled.extend(session());
        shuffled.swap(2, 7);
        assert_eq!(fold(&shuffled), inorder);
    }

    #[test]
    fn register_going_backwards_is_flagged_in_any_order() {
        let mut s = session();
        s[5].meter.energy_wh = 900;
        let a = fold(&s);
        assert!(a.flags.contains(FLAG_REGISTER_BACKWARDS));
        s.reverse();
        assert_eq!(fold(&s).flags, a.flags);
    }

    #[test]
    fn energy_beyond_the_connector_is_flagged() {
        let mut s = session();
        // 11 kW for one minute is ~183 Wh; 5 kWh in one minute is not.
        s[4].meter.energy_wh += 5000;
        for e in s.iter_mut().skip(5) {
            e.meter.energy_wh += 5000;
        }
        assert!(fold(&s).flags.contains(FLAG_ENERGY_EXCEEDS_CAPACITY));
    }

    #[test]
    fn gaps_are_counted() {
        let s: Vec<_> = session().into_iter().filter(|e| e.seq != 3 && e.seq != 4).collect();
        assert_eq!(fold(&s).missing_events(), 2);
    }
}
