//! Many requests in flight on one connection of the benchmark's own
//! reference transports (Unix-socket echo, bare ring echo), built the way
//! the client shim's `AsyncClient` is: callers (tokio tasks) write their
//! request themselves, a reader thread per connection reads responses and
//! completes the callers' futures by stream id. Same structure, same
//! thread hop, so the concurrency cells compare transports, not designs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

type Reply = Result<Vec<u8>, String>;

/// The sending half of a connection.
pub trait MuxTx: Send {
    /// Send request `id` with `body` (the metadata is the transport's business).
    fn send(&mut self, id: u64, body: &[u8]) -> Result<(), String>;
    /// The connection is done (say goodbye to the peer if the transport does).
    fn finish(&mut self) {}
}

/// The table of calls in flight.
pub struct Mux {
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next: AtomicU64,
    dead: OnceLock<String>,
    tx: Mutex<Box<dyn MuxTx>>,
}

impl Mux {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Reply>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Complete call `id` (called by the reader thread).
    pub fn deliver(&self, id: u64, r: Reply) {
        let s = self.table().remove(&id);
        if let Some(s) = s {
            let _ = s.send(r);
        }
    }

    /// The connection broke: fail every call now and from now on.
    pub fn fail(&self, reason: String) {
        let _ = self.dead.set(reason.clone());
        let all: Vec<_> = self.table().drain().collect();
        for (_, s) in all {
            let _ = s.send(Err(reason.clone()));
        }
    }

    /// One call: the response body.
    pub async fn call(&self, body: &[u8]) -> Reply {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.table().insert(id, tx);
        if let Some(r) = self.dead.get() {
            self.table().remove(&id);
            return Err(r.clone());
        }
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(id, body);
        if let Err(e) = sent {
            self.table().remove(&id);
            self.fail(e.clone());
            return Err(e);
        }
        rx.await.unwrap_or_else(|_| Err("connection closed".into()))
    }
}

/// A connection with its reader thread; dropping it stops the reader and
/// finishes the connection.
pub struct MuxConn {
    mux: Arc<Mux>,
    stop: Box<dyn Fn() + Send + Sync>,
    reader: Option<JoinHandle<()>>,
}

impl MuxConn {
    /// Start `reader` on a thread of its own; `stop` must make it return.
    pub fn start(
        tx: Box<dyn MuxTx>,
        reader: impl FnOnce(Arc<Mux>) + Send + 'static,
        stop: Box<dyn Fn() + Send + Sync>,
    ) -> Result<MuxConn, String> {
        let mux = Arc::new(Mux {
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            dead: OnceLock::new(),
            tx: Mutex::new(tx),
        });
        let m = mux.clone();
        let reader = std::thread::Builder::new()
            .name("bench-reader".into())
            .spawn(move || reader(m))
            .map_err(|e| format!("reader thread: {e}"))?;
        Ok(MuxConn {
            mux,
            stop,
            reader: Some(reader),
        })
    }

    pub async fn call(&self, body: &[u8]) -> Reply {
        self.mux.call(body).await
    }
}

impl Drop for MuxConn {
    fn drop(&mut self) {
        (self.stop)();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.mux.fail("connection closed".into());
        self.mux
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish();
    }
}
