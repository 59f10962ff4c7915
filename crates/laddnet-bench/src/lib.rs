//! What the benchmark scenarios share with the benches in `tests/benches`.

pub mod speed;
pub mod stalls;
