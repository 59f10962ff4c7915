//! A server's CPU time and resident memory, from `/proc`.

/// Clock ticks per second for `/proc/PID/stat` (`getconf CLK_TCK`).
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User + system CPU ticks of `pid` so far.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// Resident set size of `pid`, bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    parse_rss(&std::fs::read_to_string(format!("/proc/{pid}/status"))?)
}

/// Ticks the hypervisor stole from this machine's CPUs so far, and all
/// ticks (the `cpu` line of `/proc/stat`: steal is its eighth value).
pub fn steal_ticks() -> anyhow::Result<(u64, u64)> {
    parse_machine_stat(&std::fs::read_to_string("/proc/stat")?)
}

fn parse_machine_stat(stat: &str) -> anyhow::Result<(u64, u64)> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("/proc/stat has no cpu line"))?;
    let values = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("/proc/stat cpu line: {e}"))?;
    let steal = *values
        .get(7)
        .ok_or_else(|| anyhow::anyhow!("/proc/stat cpu line has no steal value"))?;
    // guest and guest_nice (the ninth and tenth) are already in user.
    Ok((steal, values.iter().take(8).sum()))
}

fn parse_stat(stat: &str) -> anyhow::Result<u64> {
    // The command name is in parentheses and may hold spaces: fields are
    // counted after the last ')'. utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("/proc stat without a command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .ok_or_else(|| anyhow::anyhow!("/proc stat has no field {n}"))?
            .parse::<u64>()
            .map_err(|e| anyhow::anyhow!("/proc stat field {n}: {e}"))
    };
    Ok(field(14)? + field(15)?)
}

/// The share of the machine's CPU time stolen between two readings of
/// [`steal_ticks`].
pub fn stolen_share(from: (u64, u64), to: (u64, u64)) -> f64 {
    to.0.saturating_sub(from.0) as f64 / to.1.saturating_sub(from.1).max(1) as f64
}

fn parse_rss(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("/proc status has no VmRSS"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("VmRSS without a value"))?
        .parse()?;
    Ok(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (laddnet node (x)) S 1 4242 4242 0 -1 4194304 100 0 0 0 37 5 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(stat).unwrap(), 42);
        assert!(parse_stat("no parens here").is_err());
    }

    #[test]
    fn rss_is_read_in_bytes() {
        let status = "Name:\tladdnet\nVmPeak:\t 2000 kB\nVmRSS:\t    1536 kB\nThreads:\t9\n";
        assert_eq!(parse_rss(status).unwrap(), 1536 * 1024);
        assert!(parse_rss("Name:\tx\n").is_err());
    }

    #[test]
    fn steal_is_the_eighth_value_of_the_cpu_line() {
        let stat = "cpu  100 2 30 800 5 0 3 60 9 0\ncpu0 50 1 15 400 2 0 1 30 0 0\n";
        assert_eq!(parse_machine_stat(stat).unwrap(), (60, 1000));
        assert!(parse_machine_stat("cpu0 1 2 3\n").is_err());
        assert!(parse_machine_stat("cpu  1 2 3\n").is_err());
        assert_eq!(stolen_share((60, 1000), (70, 2000)), 0.01);
        assert_eq!(stolen_share((60, 1000), (60, 1000)), 0.0);
    }

    #[test]
    fn this_process_is_measured() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        cpu_ticks(me).unwrap();
        let (steal, all) = steal_ticks().unwrap();
        assert!(all > 0 && steal <= all);
    }
}
