//! The async API, on tokio. Each connection's responses are read by a task
//! on the runtime that opened it: the doorbell eventfd and the control
//! socket (or the TCP socket) sit in that runtime's reactor, and the task
//! completes the callers' futures with no thread hop. It does not spin: a
//! task that polled would hold up the runtime's other tasks. If that
//! runtime shuts down, the connection ends and the next call opens a new
//! one on the caller's runtime. Outside any runtime (a connection opened
//! from a plain thread), a reader thread does the same.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::conn::AnyConn;
use crate::core::{Notify, Slot};
use crate::error::{Error, Result};
use crate::{Call, Client, ClientOptions, Response};

/// An async client: the same calls as [`Client`], as futures. Dropping a
/// call's future cancels the call.
///
/// ```no_run
/// # async fn f() -> Result<(), meshshm::Error> {
/// let client = meshshm::AsyncClient::connect(meshshm::ClientOptions::default()).await?;
/// let reply = client.call("echo", "Echo", b"hi", std::time::Duration::from_secs(1)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AsyncClient {
    client: Client,
}

impl AsyncClient {
    /// Connect (the handshake runs on a blocking thread).
    ///
    /// # Errors
    /// As [`Client::with_options`].
    pub async fn connect(opts: ClientOptions) -> Result<AsyncClient> {
        let client = tokio::task::spawn_blocking(move || Client::build(opts, true))
            .await
            .map_err(|e| Error::Connect {
                target: "proxy".into(),
                reason: e.to_string(),
            })??;
        Ok(AsyncClient { client })
    }

    /// Call `service`/`method`; the body of an OK response, else an error.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let r = self
            .invoke(&Call::with_timeout(service, method, body, timeout))
            .await?;
        crate::client::deadline_as_timeout(r.into_result(), timeout)
    }

    /// Make a call with every option.
    ///
    /// # Errors
    /// Transport errors and timeouts.
    pub async fn invoke(&self, call: &Call<'_>) -> Result<Response> {
        let call_it = async {
            let (conn, id, slot) = self.start(call).await?;
            Pending {
                conn,
                id,
                slot,
                armed: true,
            }
            .await
        };
        match call.timeout {
            Some(t) => match tokio::time::timeout(t, call_it).await {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout(t)),
            },
            None => call_it.await,
        }
    }

    /// Send the request. A full ring is waited out as a future (the
    /// reader wakes the callers waiting for room each time it looks at the
    /// ring), not by blocking the thread: other tasks on it go on meanwhile.
    /// Callers that found no room are served in the order they came.
    async fn start(&self, call: &Call<'_>) -> Result<(Arc<dyn AnyConn>, u64, Arc<Slot>)> {
        let conn = self.client.conn()?;
        let core = conn.core();
        if !core.room().wanted() {
            if let Some((id, slot)) = conn.try_start(call, Notify::Task)? {
                return Ok((conn, id, slot));
            }
        }
        let ticket = core.room().join();
        loop {
            let looks = ticket.first().await;
            // Have a sleeping reader woken for room too, then look (room
            // made before that rang nobody).
            conn.want_room();
            // A few more tries after the other ready tasks have run (the
            // proxy reads on meanwhile), then wait for the reader: a wake-up
            // costs more than these on a busy connection.
            for _ in 0..ROOM_TRIES {
                if let Some((id, slot)) = conn.try_start(call, Notify::Task)? {
                    return Ok((conn.clone(), id, slot));
                }
                crate::room::let_others_run().await;
            }
            ticket.next_look(looks).await;
        }
    }

    /// The blocking client underneath (same connection).
    pub fn blocking(&self) -> &Client {
        &self.client
    }
}

/// Tries for room, each after the other ready tasks ran, before the first
/// in line waits for the reader to look at the ring again.
const ROOM_TRIES: usize = 8;

struct Pending {
    conn: Arc<dyn AnyConn>,
    id: u64,
    slot: Arc<Slot>,
    armed: bool,
}

impl Future for Pending {
    type Output = Result<Response>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.slot.poll_take(cx.waker()) {
            Some(r) => {
                self.armed = false;
                Poll::Ready(r)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed && !self.slot.is_done() {
            self.conn.cancel(self.id);
        }
    }
}
