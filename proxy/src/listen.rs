//! Listeners, connection limits, signals and shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::Shared;

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
    let tcp = match sh.cfg.tcp_addr()? {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| format!("binding tcp {a}: {e}"))?,
        ),
        None => None,
    };
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
    let ids = AtomicU64::new(1);
    let mut sessions = JoinSet::new();
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            r = unix.accept() => match r {
                Ok((s, _)) => {
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    match limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let (sh, stop) = (sh.clone(), stop_rx.clone());
                            sessions.spawn(async move {
                                crate::shm::serve(sh, s, id, stop).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            tracing::warn!(session = id, "connection limit reached; refusing");
                            sessions.spawn(crate::shm::refuse(s, "the proxy's connection limit is reached"));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "accept on the control socket"),
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
                            tracing::warn!(session = id, "connection limit reached; refusing tcp");
                            drop(s);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "accept on the tcp listener"),
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
