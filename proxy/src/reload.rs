//! Configuration reload: on SIGHUP, and when the file's mtime changes
//! (polled every second). The new file is parsed and checked in full
//! first; a bad one is refused with a log line and the running
//! configuration stays. What reloads: routes, services, clusters, access
//! rules (`[[access.rules]]`, `[access.call]`, `[access.serve]`), tokens
//! and signing keys (docs/GOVERNANCE.md). What needs a restart
//! (`[listen]`, `[runtime]`, `[shm]`, `[admin]`, `[http]`, `[tls]`) keeps its
//! running value, with a warning naming it. Also samples host CPU use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::Shared;

/// Loads and checks the configuration (with the command-line overrides).
pub type Loader = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

fn mtime(p: &Option<PathBuf>) -> Option<SystemTime> {
    std::fs::metadata(p.as_ref()?)
        .and_then(|m| m.modified())
        .ok()
}

/// The sections of `new` that differ from the running configuration and
/// are only read at start.
fn restart_only(run: &Config, new: &Config) -> Vec<&'static str> {
    let differ =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut v = Vec::new();
    for (name, a, b) in [
        (
            "listen",
            &run.listen as &dyn std::fmt::Debug,
            &new.listen as &dyn std::fmt::Debug,
        ),
        ("runtime", &run.runtime, &new.runtime),
        ("shm", &run.shm, &new.shm),
        ("admin", &run.admin, &new.admin),
        ("http", &run.http, &new.http),
        ("tls", &run.tls, &new.tls),
    ] {
        if differ(a, b) {
            v.push(name);
        }
    }
    v
}

/// (busy, total) jiffies of the host, from /proc/stat.
fn host_cpu() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let l = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = l
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

pub async fn run(sh: Arc<Shared>, path: Option<PathBuf>, load: Loader) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reload on file change only");
            return;
        }
    };
    let mut seen = mtime(&path);
    let mut cpu = host_cpu();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => {
                let now = host_cpu();
                if let (Some((b0, t0)), Some((b1, t1))) = (cpu, now) {
                    if t1 > t0 {
                        sh.gov.set_host_cpu((b1 - b0) as f64 / (t1 - t0) as f64);
                    }
                }
                cpu = now;
                let m = mtime(&path);
                if m == seen {
                    continue;
                }
                seen = m;
                "file changed"
            }
        };
        match load() {
            Ok(cfg) => {
                sh.router.reload_routes(&cfg, &sh.tls);
                sh.gov.reload(&cfg, &sh.tls);
                sh.gov.count_reload(true);
                tracing::info!(trigger = why, "configuration reloaded");
                let stale = restart_only(&sh.cfg, &cfg);
                if !stale.is_empty() {
                    tracing::warn!(
                        trigger = why,
                        sections = %stale.join(","),
                        "these sections changed but are read only at start: \
                         their running values stay until a restart"
                    );
                }
            }
            Err(e) => {
                sh.gov.count_reload(false);
                tracing::error!(
                    trigger = why,
                    error = %e,
                    "configuration reload refused; the previous configuration stays in force"
                );
            }
        }
    }
}
