//! What every connection shares, whatever its transport: the table of calls
//! in flight, and the leader/follower hand-off that lets the calling threads
//! themselves read responses (no reader thread, no extra hop) — one of them
//! at a time leads and delivers the others' responses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Waker;
use std::thread::Thread;

use crate::error::{Error, Result};
use crate::Response;

/// How the owner of a call wants to be told it completed.
pub(crate) enum Notify {
    Thread(Thread),
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Task(Mutex<Option<Waker>>),
}

/// One call in flight.
pub(crate) struct Slot {
    done: AtomicBool,
    result: Mutex<Option<Result<Response>>>,
    notify: Notify,
}

impl Slot {
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub(crate) fn take(&self) -> Option<Result<Response>> {
        if !self.is_done() {
            return None;
        }
        self.result.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn set_waker(&self, w: &Waker) {
        if let Notify::Task(m) = &self.notify {
            *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(w.clone());
        }
    }

    fn complete(&self, r: Result<Response>) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.done.store(true, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        match &self.notify {
            Notify::Thread(t) => t.unpark(),
            Notify::Task(m) => {
                if let Some(w) = m.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    w.wake();
                }
            }
        }
    }
}

/// The in-flight table of one connection.
pub(crate) struct Core {
    pending: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    dead: OnceLock<String>,
    goaway: AtomicBool,
}

impl Core {
    pub(crate) fn new() -> Self {
        Core {
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dead: OnceLock::new(),
            goaway: AtomicBool::new(false),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a call; returns its stream id.
    pub(crate) fn register(&self, notify: Notify) -> Result<(u64, Arc<Slot>)> {
        if let Some(r) = self.dead.get() {
            return Err(Error::ProxyGone(r.clone()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            done: AtomicBool::new(false),
            result: Mutex::new(None),
            notify,
        });
        self.table().insert(id, slot.clone());
        // A kill between the check above and the insert would miss this slot.
        if let Some(r) = self.dead.get() {
            self.table().remove(&id);
            return Err(Error::ProxyGone(r.clone()));
        }
        Ok((id, slot))
    }

    /// Complete call `id` (a response for an unknown id — late, after a
    /// timeout — is dropped).
    pub(crate) fn deliver(&self, id: u64, r: Result<Response>) {
        let slot = self.table().remove(&id);
        if let Some(s) = slot {
            s.complete(r);
        }
    }

    /// Forget call `id` (timed out or dropped). True if it was still pending.
    pub(crate) fn forget(&self, id: u64) -> bool {
        self.table().remove(&id).is_some()
    }

    /// The connection is finished: fail every call in flight, now.
    pub(crate) fn kill(&self, reason: &str) {
        let _ = self.dead.set(reason.to_owned());
        let all: Vec<_> = self.table().drain().collect();
        for (_, s) in all {
            s.complete(Err(Error::ProxyGone(reason.to_owned())));
        }
    }

    pub(crate) fn dead(&self) -> Option<&String> {
        self.dead.get()
    }

    pub(crate) fn set_goaway(&self) {
        self.goaway.store(true, Ordering::Relaxed);
    }

    /// Whether new calls may start here.
    pub(crate) fn accepting(&self) -> bool {
        self.dead.get().is_none() && !self.goaway.load(Ordering::Relaxed)
    }

    /// The leader is leaving: wake one waiting caller to take over.
    pub(crate) fn handoff(&self) {
        let t = self.table();
        if let Some(s) = t.values().find(|s| !s.is_done()) {
            s.wake();
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.table().len()
    }
}
