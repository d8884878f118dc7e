//! What every connection shares, whatever its transport: the table of calls
//! in flight, and the leader/follower hand-off that lets the calling threads
//! themselves read responses (no reader thread, no extra hop) — one of them
//! at a time leads and delivers the others' responses.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::thread::Thread;

use slab::Slab;

use crate::error::{Error, Result};
use crate::Response;

/// How the owner of a call wants to be told it completed.
pub(crate) enum Notify {
    /// A blocked thread: unparked.
    Thread(Thread),
    /// A future: its waker, registered when polled ([`Slot::poll_take`]).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Task,
}

/// One call in flight.
pub(crate) struct Slot {
    done: AtomicBool,
    /// The result and the waker to call with it, under one lock: a poll
    /// that finds no result registers its waker in the same critical section
    /// that [`Slot::complete`] takes it from, so no completion is missed.
    state: Mutex<SlotState>,
    thread: Option<Thread>,
}

struct SlotState {
    result: Option<Result<Response>>,
    waker: Option<Waker>,
}

impl Slot {
    fn new(notify: Notify) -> Self {
        Slot {
            done: AtomicBool::new(false),
            state: Mutex::new(SlotState {
                result: None,
                waker: None,
            }),
            thread: match notify {
                Notify::Thread(t) => Some(t),
                Notify::Task => None,
            },
        }
    }

    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub(crate) fn take(&self) -> Option<Result<Response>> {
        if !self.is_done() {
            return None;
        }
        self.state().result.take()
    }

    /// The result if it is in, else remember `w` to be woken with it.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn poll_take(&self, w: &Waker) -> Option<Result<Response>> {
        let mut st = self.state();
        if let Some(r) = st.result.take() {
            return Some(r);
        }
        if !st.waker.as_ref().is_some_and(|old| old.will_wake(w)) {
            st.waker = Some(w.clone());
        }
        None
    }

    fn complete(&self, r: Result<Response>) {
        let waker = {
            let mut st = self.state();
            st.result = Some(r);
            st.waker.take()
        };
        self.done.store(true, Ordering::Release);
        match (waker, &self.thread) {
            (Some(w), _) => w.wake(),
            (None, Some(t)) => t.unpark(),
            (None, None) => {}
        }
    }

    /// Nudge the owner (a leader's hand-off to a follower).
    fn wake(&self) {
        if let Some(t) = &self.thread {
            t.unpark();
        } else if let Some(w) = self.state().waker.as_ref() {
            w.wake_by_ref();
        }
    }
}

/// The calls in flight, addressed by the low 32 bits of their stream id
/// (the slab index); the high 32 bits are a per-connection generation, so
/// a late response for a call that was forgotten (timed out, cancelled)
/// does not complete a newer call that reuses its index.
struct Table {
    slots: Slab<(u64, Arc<Slot>)>,
    generation: u32,
}

impl Table {
    /// Remove call `id` if it is the one in its slot.
    fn remove(&mut self, id: u64) -> Option<Arc<Slot>> {
        let key = (id & u64::from(u32::MAX)) as usize;
        match self.slots.get(key) {
            Some((held, _)) if *held == id => Some(self.slots.remove(key).1),
            _ => None,
        }
    }
}

/// The in-flight table of one connection.
pub(crate) struct Core {
    pending: Mutex<Table>,
    /// A call in flight outside the table: made by the thread that holds
    /// the receive side ([`Core::solo_id`]); 0 or 1.
    solo: AtomicUsize,
    /// Generation of the ids of such calls.
    solo_generation: AtomicU32,
    dead: OnceLock<String>,
    goaway: AtomicBool,
    /// Async callers waiting for room in the ring to send their request.
    #[cfg(feature = "tokio")]
    room: crate::room::RoomLine,
}

impl Core {
    pub(crate) fn new() -> Self {
        Core {
            pending: Mutex::new(Table {
                slots: Slab::new(),
                generation: 0,
            }),
            solo: AtomicUsize::new(0),
            solo_generation: AtomicU32::new(0),
            dead: OnceLock::new(),
            goaway: AtomicBool::new(false),
            #[cfg(feature = "tokio")]
            room: crate::room::RoomLine::default(),
        }
    }

    /// The async callers waiting for room to send (see [`crate::room`]).
    #[cfg(feature = "tokio")]
    pub(crate) fn room(&self) -> &crate::room::RoomLine {
        &self.room
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a call; returns its stream id (never 0).
    pub(crate) fn register(&self, notify: Notify) -> Result<(u64, Arc<Slot>)> {
        let slot = Arc::new(Slot::new(notify));
        let mut t = self.table();
        // Checked under the table's lock: `kill` sets `dead` before it
        // drains the table, so a call either sees it or is drained.
        if let Some(r) = self.dead.get() {
            return Err(Error::ProxyGone(r.clone()));
        }
        t.generation = t.generation.checked_add(1).unwrap_or(1);
        let generation = t.generation;
        let entry = t.slots.vacant_entry();
        // (Key u32::MAX is the solo call's: Core::solo_id.)
        let Some(key) = u32::try_from(entry.key()).ok().filter(|&k| k != u32::MAX) else {
            return Err(Error::InvalidArgument(
                "more than 2^32 calls in flight on one connection".into(),
            ));
        };
        let id = (u64::from(generation) << 32) | u64::from(key);
        entry.insert((id, slot.clone()));
        Ok((id, slot))
    }

    /// Complete call `id` (a response for an unknown id — late, after a
    /// timeout, or made up by a broken proxy — is dropped).
    pub(crate) fn deliver(&self, id: u64, r: Result<Response>) {
        let slot = self.table().remove(id);
        if let Some(s) = slot {
            s.complete(r);
        }
    }

    /// Forget call `id` (timed out or dropped). True if it was still pending.
    pub(crate) fn forget(&self, id: u64) -> bool {
        self.table().remove(id).is_some()
    }

    /// The connection is finished: fail every call in flight, now.
    pub(crate) fn kill(&self, reason: &str) {
        let _ = self.dead.set(reason.to_owned());
        let all: Vec<_> = self.table().slots.drain().collect();
        for (_, s) in all {
            s.complete(Err(Error::ProxyGone(reason.to_owned())));
        }
        #[cfg(feature = "tokio")]
        self.room.close();
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
        if let Some((_, (_, s))) = t.slots.iter().find(|(_, (_, s))| !s.is_done()) {
            s.wake();
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.table().slots.len() + self.solo.load(Ordering::Acquire)
    }

    /// An id for a call whose response the caller reads itself, holding
    /// the receive side: it is not in the table (no slot to complete), so
    /// its key is one the table never gives out (`u32::MAX`), and its
    /// generation its own. One such call at a time (the receive side is
    /// held throughout); `done` ends it ([`Core::solo_done`]).
    pub(crate) fn solo_id(&self) -> u64 {
        let g = self
            .solo_generation
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        self.solo.store(1, Ordering::Release);
        (u64::from(g) << 32) | u64::from(u32::MAX)
    }

    pub(crate) fn solo_done(&self) {
        self.solo.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &[u8]) -> Result<Response> {
        Ok(Response {
            status: 0,
            message: String::new(),
            headers: Vec::new(),
            body: body.to_vec(),
        })
    }

    #[test]
    fn a_late_response_does_not_complete_the_call_that_reused_its_index() {
        let core = Core::new();
        let (old, _) = core.register(Notify::Task).unwrap();
        assert!(core.forget(old), "the first call was pending");
        let (new, slot) = core.register(Notify::Task).unwrap();
        assert_eq!(old & 0xffff_ffff, new & 0xffff_ffff, "same index reused");
        assert_ne!(old, new);
        core.deliver(old, ok(b"late"));
        assert!(!slot.is_done(), "the late answer went to the new call");
        core.deliver(new, ok(b"mine"));
        assert_eq!(slot.take().unwrap().unwrap().body, b"mine");
        assert_eq!(core.in_flight(), 0);
    }

    #[test]
    fn made_up_ids_are_dropped() {
        let core = Core::new();
        let (id, slot) = core.register(Notify::Task).unwrap();
        for bogus in [0, u64::MAX, id + 1, id ^ (1 << 40), id & 0xffff_ffff] {
            core.deliver(bogus, ok(b"x"));
            assert!(!core.forget(bogus));
        }
        assert!(!slot.is_done());
        assert_eq!(core.in_flight(), 1);
        core.kill("test");
        assert!(matches!(slot.take(), Some(Err(Error::ProxyGone(_)))));
        assert!(
            core.register(Notify::Task).is_err(),
            "a dead core takes no calls"
        );
    }

    #[test]
    fn a_poll_after_completion_gets_the_result_and_one_before_is_woken() {
        use std::sync::atomic::AtomicUsize;
        use std::task::Wake;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let core = Core::new();
        let (id, slot) = core.register(Notify::Task).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let w = Waker::from(count.clone());
        assert!(slot.poll_take(&w).is_none());
        assert!(slot.poll_take(&w).is_none(), "polled twice: one waker kept");
        core.deliver(id, ok(b"r"));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(slot.poll_take(&w).unwrap().unwrap().body, b"r");
    }
}
