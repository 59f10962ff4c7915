//! Site load management: sharing a site's grid limit among its sessions.
//!
//! [`plan`] is pure: the site actor calls it on every start and stop and
//! now and then in between.
//!
//! 1. Every session gets a minimum (`min_w`, or its maximum if lower), in
//!    priority order, while the limit allows: a session that cannot get
//!    its minimum is paused (0 W) rather than starved below what a car
//!    needs to keep charging.
//! 2. What remains goes to sessions with a departure, earliest first, each
//!    up to what it can take.
//! 3. What still remains is shared equally among the others (water
//!    filling: a session that can take less than its share leaves the
//!    rest to the others).
//!
//! What a session "can take" is its connector's maximum and the car's, and
//! when it drew clearly less than its last limit (the car or the charger
//! holds back), what it drew plus a margin, so unused power goes to others;
//! it is offered more again as soon as it uses what it has.

/// One session competing for the site's power.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub key: String,
    /// The connector's rating, W.
    pub max_w: u32,
    /// What the car accepts, W, when the charger says.
    pub ev_max_w: Option<u32>,
    /// The driver's departure (Unix ms), when known.
    pub departure_ms: Option<i64>,
    /// When the session started (Unix ms): ties go to the earlier.
    pub started_ms: i64,
    /// The last reading, and the limit in force when it was taken.
    pub measured_w: u32,
    pub limit_w: Option<u32>,
}

impl Demand {
    /// The most this session can use now.
    pub fn can_take(&self) -> u32 {
        let mut cap = self.max_w;
        if let Some(ev) = self.ev_max_w {
            cap = cap.min(ev);
        }
        if let Some(limit) = self.limit_w
            && self.measured_w > 0
            && u64::from(self.measured_w) * 10 < u64::from(limit) * 9
        {
            // Held back below its limit: offer what it uses, plus 10 %.
            cap = cap.min(
                self.measured_w
                    .saturating_add(self.measured_w / 10)
                    .max(self.measured_w.saturating_add(500)),
            );
        }
        cap
    }
}

/// The limit for each session, in the order given.
pub fn plan(limit_w: u32, demands: &[Demand], min_w: u32) -> Vec<u32> {
    let n = demands.len();
    let mut out = vec![0u32; n];
    let caps: Vec<u32> = demands.iter().map(Demand::can_take).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| {
        let d = &demands[i];
        (
            d.departure_ms.is_none(),
            d.departure_ms.unwrap_or(0),
            d.started_ms,
            d.key.clone(),
        )
    });
    let mut left = limit_w;
    // 1. The minimum, in priority order.
    for &i in &order {
        let m = min_w.min(caps[i]);
        if m <= left {
            out[i] = m;
            left -= m;
        }
    }
    let running = |i: usize, out: &[u32]| out[i] > 0 || caps[i] == 0;
    // 2. Departures first, earliest first, up to what they can take.
    for &i in order.iter().filter(|&&i| demands[i].departure_ms.is_some()) {
        if !running(i, &out) {
            continue;
        }
        let more = (caps[i] - out[i]).min(left);
        out[i] += more;
        left -= more;
    }
    // 3. The rest shared equally, water filling.
    let mut open: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| demands[i].departure_ms.is_none() && out[i] > 0 && out[i] < caps[i])
        .collect();
    while left > 0 && !open.is_empty() {
        let share = left / open.len() as u32;
        if share == 0 {
            break;
        }
        let mut next = Vec::new();
        for &i in &open {
            let more = (caps[i] - out[i]).min(share);
            out[i] += more;
            left -= more;
            if out[i] < caps[i] {
                next.push(i);
            }
        }
        open = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(key: &str, max_w: u32, departure_ms: Option<i64>, started_ms: i64) -> Demand {
        Demand {
            key: key.into(),
            max_w,
            ev_max_w: None,
            departure_ms,
            started_ms,
            measured_w: 0,
            limit_w: None,
        }
    }

    #[test]
    fn never_above_the_limit_and_everyone_gets_the_minimum() {
        let ds: Vec<Demand> = (0..20).map(|i| d(&format!("s{i}"), 22_000, None, i)).collect();
        let p = plan(60_000, &ds, 1_400);
        assert!(p.iter().sum::<u32>() <= 60_000);
        assert!(p.iter().all(|&w| w >= 1_400), "{p:?}");
        // Equal shares: 60 kW / 20.
        assert!(p.iter().all(|&w| w == 3_000), "{p:?}");
    }

    #[test]
    fn earlier_departures_come_first() {
        let ds = vec![
            d("late", 11_000, Some(9_000), 0),
            d("none", 11_000, None, 0),
            d("early", 11_000, Some(5_000), 1),
        ];
        let p = plan(20_000, &ds, 1_400);
        assert_eq!(p, vec![7_600, 1_400, 11_000]);
    }

    #[test]
    fn unused_power_goes_to_others() {
        let mut a = d("a", 22_000, None, 0);
        a.limit_w = Some(10_000);
        a.measured_w = 4_000; // the car takes 4 kW only
        let b = d("b", 22_000, None, 1);
        let p = plan(20_000, &[a, b], 1_400);
        assert_eq!(p, vec![4_500, 15_500]);
        // The car's own maximum counts too.
        let mut c = d("c", 22_000, None, 0);
        c.ev_max_w = Some(7_400);
        assert_eq!(plan(50_000, &[c], 1_400), vec![7_400]);
    }

    #[test]
    fn too_many_for_the_minimum_pauses_the_last() {
        let ds: Vec<Demand> = (0..5).map(|i| d(&format!("s{i}"), 22_000, None, i)).collect();
        let p = plan(5_000, &ds, 1_400);
        assert_eq!(p.iter().filter(|&&w| w > 0).count(), 3);
        assert!(p.iter().sum::<u32>() <= 5_000);
        assert_eq!(p[3], 0);
        assert_eq!(p[4], 0);
    }
}
