//! CPU time from the kernel's accounting: `getrusage(RUSAGE_SELF)` for the
//! benchmark (the client side: every thread, exited ones included), and
//! for a server process (proxy, echo server, ring-floor child) the sum of
//! its threads' `/proc/<pid>/task/<tid>/schedstat` run times (nanoseconds),
//! falling back to `/proc/<pid>/stat` utime+stime (clock ticks, 10 ms) when
//! schedstat is missing or the set of threads changed in between.

use std::time::Duration;

use nix::sys::resource::{getrusage, UsageWho};

/// CPU time (user + system) used by this process so far.
pub fn self_cpu() -> Duration {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => tv(u.user_time()) + tv(u.system_time()),
        Err(_) => Duration::ZERO,
    }
}

fn tv(t: nix::sys::time::TimeVal) -> Duration {
    Duration::from_secs(t.tv_sec().max(0) as u64) + Duration::from_micros(t.tv_usec().max(0) as u64)
}

/// One reading of another process's CPU time.
#[derive(Debug, Clone, Default)]
pub struct ProcCpu {
    tids: Vec<u32>,
    sched_ns: Option<u64>,
    stat: Duration,
}

/// USER_HZ: the unit of /proc/<pid>/stat times on Linux (100 on every
/// architecture that matters here).
const USER_HZ: u64 = 100;

/// Read `pid`'s CPU time now.
pub fn proc_cpu(pid: i32) -> ProcCpu {
    let mut r = ProcCpu::default();
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the command name: state is field 3; utime 14, stime 15.
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let ticks = tick(11) + tick(12);
            r.stat = Duration::from_nanos(ticks * (1_000_000_000 / USER_HZ));
        }
    }
    let mut tids = Vec::new();
    let mut sum = 0u64;
    let mut ok = true;
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(dir) => {
            for e in dir.flatten() {
                let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
                    continue;
                };
                match std::fs::read_to_string(e.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                {
                    Some(ns) => {
                        sum += ns;
                        tids.push(tid);
                    }
                    None => ok = false,
                }
            }
        }
        Err(_) => ok = false,
    }
    tids.sort_unstable();
    r.tids = tids;
    r.sched_ns = ok.then_some(sum);
    r
}

/// Busy CPU time of the whole machine so far (all CPUs, `/proc/stat`:
/// everything but idle and iowait), in 10 ms ticks.
pub fn machine_busy() -> Duration {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return Duration::ZERO;
    };
    let Some(line) = s.lines().next().filter(|l| l.starts_with("cpu ")) else {
        return Duration::ZERO;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest* are inside user).
    let busy: u64 = v.iter().take(8).sum::<u64>()
        - v.get(3).copied().unwrap_or(0)
        - v.get(4).copied().unwrap_or(0);
    Duration::from_nanos(busy * (1_000_000_000 / USER_HZ))
}

/// CPU used between two readings.
pub fn used(a: &ProcCpu, b: &ProcCpu) -> Duration {
    match (a.sched_ns, b.sched_ns) {
        (Some(x), Some(y)) if a.tids == b.tids && y >= x => Duration::from_nanos(y - x),
        _ => b.stat.saturating_sub(a.stat),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_is_measured_both_ways() {
        let pid = std::process::id() as i32;
        let a = proc_cpu(pid);
        let s0 = self_cpu();
        // Burn 60 ms of CPU (however long that takes on a busy machine).
        let t0 = std::time::Instant::now();
        let mut x = 0u64;
        while self_cpu() - s0 < Duration::from_millis(60) {
            for _ in 0..10_000 {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
            std::hint::black_box(x);
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no CPU time accounted"
            );
        }
        let b = proc_cpu(pid);
        // Threads of the test harness may come and go: then stat is used,
        // with its 10 ms ticks.
        assert!(
            used(&a, &b) >= Duration::from_millis(20),
            "{:?}",
            used(&a, &b)
        );
    }
}
