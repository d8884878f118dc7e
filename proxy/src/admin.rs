//! The admin HTTP port (loopback by default): `/metrics` (Prometheus
//! text), `/live`, `/ready`. A minimal HTTP/1.1 responder: one request per
//! connection, `Connection: close`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::Shared;

/// Bind the admin port (if configured) and serve it in the background.
pub async fn spawn(sh: Arc<Shared>) {
    let addr = sh.gov.admin.clone();
    if addr.is_empty() {
        return;
    }
    let l = match TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot bind the admin port; metrics are off");
            return;
        }
    };
    let local = l.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    tracing::info!(admin = %local, "admin port listening (/metrics /live /ready)");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let sh = sh.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(1024);
                let read = async {
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                };
                if tokio::time::timeout(Duration::from_secs(5), read)
                    .await
                    .is_err()
                {
                    return;
                }
                let line = String::from_utf8_lossy(&buf);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (code, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
                    ("GET", "/metrics") => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        sh.gov.metrics.render(),
                    ),
                    ("GET", "/live") => ("200 OK", "text/plain", "live\n".to_owned()),
                    ("GET", "/ready") => ("200 OK", "text/plain", "ready\n".to_owned()),
                    ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
                    _ => (
                        "405 Method Not Allowed",
                        "text/plain",
                        "GET only\n".to_owned(),
                    ),
                };
                let head = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
}
