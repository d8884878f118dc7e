//! Listeners, connection limits, signals and shutdown.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::Shared;

/// Connections being refused at once (each is answered with a Reject);
/// past this, more are closed without an answer.
const MAX_REFUSING: usize = 256;
/// Pause after a failed accept (out of fds, typically), so that the loop
/// does not spin on a listener that stays readable.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Process-wide protections, before any app connects: the fd limit raised
/// to what the connection limit needs (each shm session holds 4 fds), and
/// the process made non-dumpable if configured.
fn harden_process(sh: &Shared) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
        }
        let now = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |l| l.0);
        let need = sh.cfg.shm.max_connections as u64 * 4 + 64;
        if now < need {
            tracing::warn!(
                limit = now,
                need,
                "the open-file limit is below what shm.max_connections needs; \
                 connections past it will be refused"
            );
        }
    }
    if sh.cfg.runtime.non_dumpable {
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(error = %e, "cannot make the process non-dumpable");
        }
    }
}

/// Log refusals without flooding: the first, then every 1000th.
fn log_refusal(n: u64, what: &str) {
    if n == 1 || n % 1000 == 0 {
        tracing::warn!(refused = n, "{what}");
    }
}

fn prepare_socket_path(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        }
    }
    if path.exists() {
        // A live proxy answers; a stale file from a killed one does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("{} is in use by a running proxy", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("removing stale {}: {e}", path.display()))?;
    }
    Ok(())
}

pub async fn run(sh: Arc<Shared>) -> Result<(), String> {
    harden_process(&sh);
    let path = sh.cfg.socket_path();
    prepare_socket_path(&path)?;
    if let meshshm_ring::Backing::Dir(d) = sh.cfg.backing() {
        let n = meshshm_ring::sweep_stale(&d);
        if n > 0 {
            tracing::info!(removed = n, dir = %d.display(), "removed segments left by dead processes");
        }
    }
    let unix = UnixListener::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    std::fs::set_permissions(
        &path,
        std::fs::Permissions::from_mode(sh.cfg.listen.socket_mode),
    )
    .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    let (uid, gid) = sh.cfg.socket_owner()?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(&path, uid, gid)
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
    }
    let tcp = match sh.cfg.tcp_addr()? {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| format!("binding tcp {a}: {e}"))?,
        ),
        None => None,
    };
    // The admin port (metrics, /live, /ready): up before the ready line.
    crate::admin::spawn(sh.clone()).await;
    crate::http::spawn(sh.clone()).await;
    tracing::info!(
        socket = %path.display(),
        tcp = ?tcp.as_ref().and_then(|t| t.local_addr().ok()),
        threads = sh.cfg.runtime.threads,
        "meshshm-proxy ready"
    );
    // A line for scripts and tests that wait for readiness.
    println!(
        "meshshm-proxy ready socket={} tcp={}",
        path.display(),
        tcp.as_ref()
            .and_then(|t| t.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_default()
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(sh.cfg.shm.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let refused = AtomicU64::new(0);
    let per_uid = PerUid::default();
    let ids = AtomicU64::new(1);
    let mut sessions = JoinSet::new();
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            r = unix.accept() => match r {
                Ok((s, _)) => {
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    // The uid's own share first (no credentials: `serve`
                    // refuses the connection itself).
                    let uid = meshshm_proto::peer_credentials(s.as_fd()).ok().map(|c| c.uid);
                    let share = uid.map(|u| per_uid.take(u, sh.cfg.listen.max_sessions_per_uid));
                    match (share, limit.clone().try_acquire_owned()) {
                        (Some(None), _) => {
                            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                            log_refusal(n, "a uid reached its session limit; refusing");
                            if let Ok(p) = refusing.clone().try_acquire_owned() {
                                let t = Duration::from_millis(sh.cfg.listen.handshake_timeout_ms.min(1000));
                                let reason = format!(
                                    "uid {} has reached its limit of {} sessions",
                                    uid.unwrap_or_default(),
                                    sh.cfg.listen.max_sessions_per_uid
                                );
                                sessions.spawn(async move {
                                    crate::shm::refuse(s, &reason, t).await;
                                    drop(p);
                                });
                            }
                        }
                        (share, Ok(permit)) => {
                            let (sh, stop) = (sh.clone(), stop_rx.clone());
                            sessions.spawn(async move {
                                crate::shm::serve(sh, s, id, stop).await;
                                drop((permit, share));
                            });
                        }
                        (_, Err(_)) => {
                            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                            log_refusal(n, "connection limit reached; refusing");
                            // Answered with a Reject while few are; closed beyond.
                            if let Ok(p) = refusing.clone().try_acquire_owned() {
                                let t = Duration::from_millis(sh.cfg.listen.handshake_timeout_ms.min(1000));
                                sessions.spawn(async move {
                                    crate::shm::refuse(s, "the proxy's connection limit is reached", t).await;
                                    drop(p);
                                });
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the control socket");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            r = async { tcp.as_ref().expect("guarded").accept().await }, if tcp.is_some() => match r {
                Ok((s, _)) => {
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    match limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let (sh, stop) = (sh.clone(), stop_rx.clone());
                            sessions.spawn(async move {
                                crate::tcp::run(sh, s, id, stop).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                            log_refusal(n, "connection limit reached; refusing tcp");
                            drop(s);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the tcp listener");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!(
        sessions = sessions.len(),
        "shutting down: draining sessions"
    );
    drop(unix);
    let _ = std::fs::remove_file(&path);
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            r = sessions.join_next() => if r.is_none() { break },
            _ = &mut grace => {
                tracing::warn!(left = sessions.len(), "grace period over; closing the rest");
                sessions.abort_all();
                while sessions.join_next().await.is_some() {}
                break;
            }
        }
    }
    tracing::info!("meshshm-proxy stopped");
    Ok(())
}

/// Sessions held per uid, for `listen.max_sessions_per_uid`.
#[derive(Default, Clone)]
struct PerUid(Arc<Mutex<HashMap<u32, usize>>>);

/// One session of a uid; gives its place back when dropped.
struct UidShare {
    of: PerUid,
    uid: u32,
}

impl PerUid {
    /// A place for one more session of `uid`, if it has fewer than `max`
    /// (0: no limit).
    fn take(&self, uid: u32, max: usize) -> Option<UidShare> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(UidShare {
            of: self.clone(),
            uid,
        })
    }
}

impl Drop for UidShare {
    fn drop(&mut self) {
        let mut m = self.of.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}
