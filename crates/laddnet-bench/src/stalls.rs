//! The machine's own stalls, seen by a real-time probe on each core.
//!
//! This virtual machine stops a vCPU for 1.5–30 ms about twice a second
//! per core, and `/proc/stat` counts little of it as stolen (0.1 % over a
//! pair that lost 20 ms at once). Every request in flight meanwhile is
//! late, on either server, and a few such stalls set a p99 of thousands
//! of samples. A probe thread per core, `SCHED_FIFO` (above every normal
//! thread, so no server work can hold it off), wakes every
//! [`PERIOD`]; a wake-up later than [`STALL`] means the core did not run
//! at all meanwhile. The scenarios leave out of a tail, on both sides
//! alike, the requests such a stall overlapped, and report how many.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often each probe wakes.
pub const PERIOD: Duration = Duration::from_micros(500);
/// A gap between wake-ups longer than this is a stall of the core.
pub const STALL: Duration = Duration::from_micros(1_500);

/// A stretch when a core did not run: `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    pub from: Instant,
    pub to: Instant,
}

impl Stall {
    /// Whether a request in flight from `start` to `end` met this stall or
    /// the backlog it leaves (requests queued meanwhile are answered late
    /// for about as long again after it).
    pub fn hits(&self, start: Instant, end: Instant) -> bool {
        let backlog_until = self.to + (self.to - self.from);
        start < backlog_until && end > self.from
    }
}

/// Running probes, one per core.
pub struct Probe {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Stall>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probe {
    /// A probe on each of `cores`; `None` where a real-time thread cannot
    /// be had (without root or CAP_SYS_NICE) or pinned.
    pub fn start(cores: &[usize]) -> Option<Probe> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for &core in cores {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (their_stop, their_seen) = (stop.clone(), seen.clone());
            let t = std::thread::Builder::new()
                .name(format!("stall-probe-{core}"))
                .spawn(move || {
                    let ok = realtime_on(core);
                    let _ = ready_tx.send(ok);
                    if ok {
                        watch(&their_stop, &their_seen);
                    }
                })
                .ok()?;
            threads.push(t);
            if ready_rx.recv() != Ok(true) {
                let p = Probe { stop, seen, threads };
                p.finish();
                return None;
            }
        }
        Some(Probe { stop, seen, threads })
    }

    /// The stalls seen so far (the probe runs on).
    pub fn stalls(&self) -> Vec<Stall> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the probes; the stalls they saw.
    pub fn finish(self) -> Vec<Stall> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.clone()
    }
}

fn watch(stop: &AtomicBool, seen: &Mutex<Vec<Stall>>) {
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(PERIOD);
        let now = Instant::now();
        if now - last > STALL {
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Stall { from: last, to: now });
        }
        last = now;
    }
}

/// Pins the calling thread to `core` at the lowest real-time priority.
#[allow(unsafe_code)]
fn realtime_on(core: usize) -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: both calls act on this thread (0) with values built here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return false;
        }
        let param = libc::sched_param { sched_priority: 1 };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = core;
        false
    }
}

/// Stalls a second (over every probed core) above which a pair met a
/// storm. Calm stretches of this machine show 2–5, storms 12–25; the
/// tails of a stormy pair are the machine's more than either server's
/// (slices shorter than the probe's threshold, and the wider aftermath of
/// the stalls it does see, pull both toward the same figure), so their
/// ratio is not comparable from run to run.
pub const STORMY_PER_S: f64 = 8.0;

/// How many of `stalls` began between `from` and `to`, per second.
pub fn per_second(stalls: &[Stall], from: Instant, to: Instant) -> f64 {
    let secs = (to - from).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    stalls.iter().filter(|s| s.from >= from && s.from < to).count() as f64 / secs
}

/// Which pairs of a scenario to keep: pairs run until `want` of them met
/// calm weather or twice as many have run, and the `want` calmest count.
/// A pair run in a storm is set aside (and reported) rather than mixed
/// into a median it would drag toward the machine's own tail; a storm
/// that lasts the whole budget still yields `want` pairs, the calmest,
/// and the summary says how stormy they were.
#[derive(Debug, Default)]
pub struct Gate {
    want: usize,
    /// Stalls a second of each pair run, in order.
    weather: Vec<f64>,
}

impl Gate {
    pub fn new(want: usize) -> Gate {
        Gate {
            want: want.max(1),
            weather: Vec::new(),
        }
    }

    /// Whether to run another pair.
    pub fn more(&self) -> bool {
        let calm = self.weather.iter().filter(|w| **w <= STORMY_PER_S).count();
        calm < self.want && self.weather.len() < 2 * self.want
    }

    /// Records the weather of the pair just run (its stalls a second).
    pub fn record(&mut self, per_second: f64) {
        self.weather.push(per_second);
    }

    /// The indices (in the order run) of the pairs to keep: the `want`
    /// calmest, ties to the earlier.
    pub fn kept(&self) -> Vec<usize> {
        let mut by_weather: Vec<usize> = (0..self.weather.len()).collect();
        by_weather.sort_by(|a, b| self.weather[*a].total_cmp(&self.weather[*b]).then(a.cmp(b)));
        by_weather.truncate(self.want);
        by_weather.sort();
        by_weather
    }

    /// What was kept and set aside, for a report.
    pub fn summary(&self) -> String {
        let kept = self.kept();
        let aside: Vec<f64> = (0..self.weather.len())
            .filter(|i| !kept.contains(i))
            .map(|i| self.weather[i])
            .collect();
        let worst_kept = kept.iter().map(|i| self.weather[*i]).fold(0.0, f64::max);
        let mut s = format!("{} pairs", kept.len());
        if !aside.is_empty() {
            let most = aside.iter().copied().fold(0.0, f64::max);
            s.push_str(&format!(
                " of {} run ({} set aside for storms, up to {most:.0} stalls a second)",
                self.weather.len(),
                aside.len()
            ));
        }
        if worst_kept > STORMY_PER_S {
            s.push_str(&format!(
                "; storms throughout: kept pairs up to {worst_kept:.0} stalls a second"
            ));
        }
        s
    }
}

/// The `p` quantile of the round trips `(start, took)` that no stall hit,
/// and how many were left out.
pub fn quantile_clear(samples: &[(Instant, Duration)], stalls: &[Stall], p: f64) -> (Duration, usize) {
    let mut clear: Vec<Duration> = samples
        .iter()
        .filter(|(start, took)| !stalls.iter().any(|s| s.hits(*start, *start + *took)))
        .map(|(_, took)| *took)
        .collect();
    let left_out = samples.len() - clear.len();
    clear.sort();
    let q = if clear.is_empty() {
        Duration::ZERO
    } else {
        clear[((clear.len() as f64 * p) as usize).min(clear.len() - 1)]
    };
    (q, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_hits_what_was_in_flight_and_its_backlog_only() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let s = Stall {
            from: ms(10),
            to: ms(14),
        };
        assert!(s.hits(ms(9), ms(11)), "in flight when it began");
        assert!(s.hits(ms(12), ms(13)), "sent during it");
        assert!(s.hits(ms(17), ms(18)), "queued in its backlog");
        assert!(!s.hits(ms(18), ms(19)), "after its backlog");
        assert!(!s.hits(ms(5), ms(10)), "answered as it began");
    }

    /// A real stall: a real-time thread above the probe's priority spins
    /// on the probed core for 20 ms, which no normal thread could do.
    /// Needs root or CAP_SYS_NICE (CI runs as root); elsewhere it says so
    /// and checks nothing, as the FoundationDB tests do without a cluster.
    #[test]
    fn the_probe_sees_its_core_held() {
        let Some(probe) = Probe::start(&[0]) else {
            eprintln!("no real-time priority here: the probe cannot be tested");
            return;
        };
        let held = std::thread::spawn(|| {
            #[allow(unsafe_code)]
            // SAFETY: as in `realtime_on`, on this thread only.
            let ok = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                let param = libc::sched_param { sched_priority: 2 };
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
                    && libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0
            };
            let from = Instant::now();
            while from.elapsed() < Duration::from_millis(20) {
                std::hint::spin_loop();
            }
            ok.then_some((from, Instant::now()))
        });
        let (from, to) = held
            .join()
            .unwrap()
            .expect("the hog got real-time priority where the probe did");
        // Wait for the probe's next wake-up after the hold.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !probe.stalls().iter().any(|s| s.to >= to) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let seen = probe.finish();
        assert!(
            seen.iter().any(|s| s.from <= from + Duration::from_millis(2)
                && s.to >= to
                && s.to - s.from >= Duration::from_millis(18)),
            "the 20 ms hold was not seen: {seen:?}"
        );
    }

    #[test]
    fn the_gate_keeps_the_calm_pairs_and_stops_at_twice_the_want() {
        let mut g = Gate::new(3);
        for w in [2.0, 20.0, 3.0, 15.0, 1.0] {
            assert!(g.more());
            g.record(w);
        }
        assert!(!g.more(), "three calm pairs are enough");
        assert_eq!(g.kept(), vec![0, 2, 4]);
        assert!(
            g.summary()
                .starts_with("3 pairs of 5 run (2 set aside for storms, up to 20"),
            "{}",
            g.summary()
        );

        // A storm all along: twice the want, then the calmest of them.
        let mut g = Gate::new(2);
        for w in [30.0, 12.0, 25.0, 9.0] {
            assert!(g.more());
            g.record(w);
        }
        assert!(!g.more(), "the budget is twice the want");
        assert_eq!(g.kept(), vec![1, 3]);
        assert!(
            g.summary().contains("storms throughout: kept pairs up to 12"),
            "{}",
            g.summary()
        );
    }

    #[test]
    fn stalls_a_second_count_those_that_began_in_the_span() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let at = |n: u64| Stall {
            from: ms(n),
            to: ms(n + 2),
        };
        let stalls = [at(100), at(900), at(1_500), at(2_500)];
        assert_eq!(per_second(&stalls, ms(0), ms(2_000)), 1.5);
        assert_eq!(per_second(&stalls, ms(2_000), ms(2_000)), 0.0);
    }

    #[test]
    fn the_quantile_leaves_out_the_hit_round_trips() {
        let t0 = Instant::now();
        let samples: Vec<(Instant, Duration)> = (0..100u64)
            .map(|i| {
                let took = if i == 50 {
                    Duration::from_millis(9)
                } else {
                    Duration::from_micros(100 + i)
                };
                (t0 + Duration::from_millis(i), took)
            })
            .collect();
        let stall = Stall {
            from: t0 + Duration::from_millis(50),
            to: t0 + Duration::from_millis(51),
        };
        let (p99, left_out) = quantile_clear(&samples, &[stall], 0.99);
        assert_eq!(left_out, 2, "the round trip it delayed and the one in its backlog");
        assert!(p99 < Duration::from_millis(1), "{p99:?}");
        let (raw, none) = quantile_clear(&samples, &[], 0.99);
        assert_eq!((raw, none), (Duration::from_millis(9), 0));
    }
}
