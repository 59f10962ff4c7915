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
