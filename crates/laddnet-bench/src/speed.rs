//! The machine's speed: a fixed user-space workload, timed.
//!
//! The virtual machines these benchmarks run on change speed from hour to
//! hour: in one run the tariff engine took 9.3 µs, in another 14.9 µs,
//! the same code, while the echo's messages per CPU-second did not move.
//! What slows is user-space work (allocation, pointer-chasing, branches),
//! far more than the kernel's, and the node does much more of it than the
//! echo, so its ratios move with the mode. `scripts/bench.sh` times this
//! workload on the server core at the start and the end of the suite and
//! writes both into docs/performance.md, so two runs can be compared
//! knowing whether the machine under them was the same.
//!
//! The work is the kind the node does between the socket and the disk:
//! small allocations, an ordered map of string keys (a B-tree, as the
//! store's), integer formatting. It is deterministic: the same checksum
//! every time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One pass of the workload; returns a checksum of what it computed.
pub fn workload() -> u64 {
    let mut map: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut sum = 0u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..40_000u64 {
        // A xorshift: keys land all over the map, as session ids do.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = format!("session-{:08}", x % 20_000);
        let value = format!("{i}:{}", x % 1_000_003).into_bytes();
        if let Some(old) = map.insert(key, value) {
            sum = sum.wrapping_add(old.len() as u64);
        }
        if i % 4 == 0
            && let Some((k, v)) = map.range(format!("session-{:08}", x % 10_000)..).next()
        {
            sum = sum.wrapping_add(k.len() as u64 ^ v[0] as u64);
        }
    }
    for (k, v) in &map {
        sum = sum
            .wrapping_mul(31)
            .wrapping_add(k.as_bytes()[8] as u64 + v.len() as u64);
    }
    sum
}

/// The fastest of `passes` passes of [`workload`].
pub fn best_of(passes: usize) -> Duration {
    (0..passes.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(workload());
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_is_the_same_work_every_time() {
        let first = workload();
        assert_eq!(first, workload());
        assert_ne!(first, 0);
    }
}
