//! Async callers waiting for room in the ring to send their request, in
//! the order they came. Only the first in line tries; it is woken each time
//! the connection's reader has looked at the ring (room may have been made:
//! the reader asks the proxy to ring for room while anyone waits here), and
//! when it has sent, the next one tries at once. A caller that gives up
//! (its future dropped: a timeout, a cancel) leaves the line.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub(crate) struct RoomLine {
    waiting: AtomicUsize,
    st: Mutex<LineState>,
}

#[derive(Default)]
struct LineState {
    /// Tickets in order, each with its owner's waker once it waits.
    queue: VecDeque<(u64, Option<Waker>)>,
    next_ticket: u64,
    /// Bumped each time the reader has looked at the ring, and on close.
    looks: u64,
    closed: bool,
}

impl RoomLine {
    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether anyone waits for room.
    pub(crate) fn wanted(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// The reader has looked at the ring: the first in line tries again.
    pub(crate) fn looked(&self) {
        if !self.wanted() {
            return;
        }
        let mut st = self.lock();
        st.looks += 1;
        if let Some((_, Some(w))) = st.queue.front() {
            w.wake_by_ref();
        }
    }

    /// The connection has ended: everyone in line tries (and fails) now.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.looks += 1;
        st.closed = true;
        for w in st.queue.iter().filter_map(|(_, w)| w.as_ref()) {
            w.wake_by_ref();
        }
    }

    /// Take a place at the end of the line (left when the ticket drops).
    pub(crate) fn join(&self) -> Ticket<'_> {
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back((ticket, None));
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Ticket { line: self, ticket }
    }
}

/// Let the other ready tasks of this runtime run, then come back: wake
/// this task and return Pending once. (Unlike `tokio::task::yield_now`, it
/// does not make the runtime poll its I/O driver, a syscall, first.)
pub(crate) async fn let_others_run() {
    let mut once = false;
    poll_fn(|cx| {
        if std::mem::replace(&mut once, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

pub(crate) struct Ticket<'a> {
    line: &'a RoomLine,
    ticket: u64,
}

impl Ticket<'_> {
    /// Wait until this ticket is first in line (or the line closed);
    /// returns the reader's look count then, for [`Ticket::next_look`].
    pub(crate) async fn first(&self) -> u64 {
        poll_fn(|cx| {
            let mut st = self.line.lock();
            let looks = st.looks;
            if st.closed || st.queue.front().is_some_and(|(t, _)| *t == self.ticket) {
                return Poll::Ready(looks);
            }
            self.park(&mut st, cx);
            Poll::Pending
        })
        .await
    }

    /// Wait until the reader has looked at the ring again since `looks`.
    pub(crate) async fn next_look(&self, looks: u64) {
        poll_fn(|cx| {
            let mut st = self.line.lock();
            if st.looks != looks {
                return Poll::Ready(());
            }
            self.park(&mut st, cx);
            Poll::Pending
        })
        .await
    }

    fn park(&self, st: &mut LineState, cx: &Context<'_>) {
        if let Some((_, w)) = st.queue.iter_mut().find(|(t, _)| *t == self.ticket) {
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut st = self.line.lock();
        if let Some(i) = st.queue.iter().position(|(t, _)| *t == self.ticket) {
            st.queue.remove(i);
            // The next one may find room right away.
            if i == 0 {
                if let Some((_, Some(w))) = st.queue.front() {
                    w.wake_by_ref();
                }
            }
        }
        self.line.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>, flag: &Arc<Flag>) -> bool {
        let w = Waker::from(flag.clone());
        f.poll(&mut Context::from_waker(&w)).is_ready()
    }

    #[test]
    fn only_the_first_in_line_goes_and_leaving_passes_the_turn() {
        let line = RoomLine::default();
        let a = line.join();
        let b = line.join();
        assert!(line.wanted());
        let (fa, fb) = (Arc::new(Flag(false.into())), Arc::new(Flag(false.into())));
        {
            let mut first_b = std::pin::pin!(b.first());
            assert!(!poll_once(first_b.as_mut(), &fb), "b is behind a");
            {
                let mut first_a = std::pin::pin!(a.first());
                assert!(poll_once(first_a.as_mut(), &fa));
                // a waits for the reader's next look; a look wakes a, not b.
                let mut look_a = std::pin::pin!(a.next_look(0));
                assert!(!poll_once(look_a.as_mut(), &fa));
                line.looked();
                assert!(fa.0.load(Ordering::SeqCst) && !fb.0.load(Ordering::SeqCst));
                assert!(poll_once(look_a.as_mut(), &fa));
            }
            drop(a);
            assert!(fb.0.load(Ordering::SeqCst), "a left: b's turn");
            assert!(poll_once(first_b.as_mut(), &fb));
        }
        drop(b);
        assert!(!line.wanted());
    }

    #[test]
    fn close_wakes_everyone() {
        let line = RoomLine::default();
        let a = line.join();
        let b = line.join();
        let fb = Arc::new(Flag(false.into()));
        {
            let mut first_b = std::pin::pin!(b.first());
            assert!(!poll_once(first_b.as_mut(), &fb));
            line.close();
            assert!(fb.0.load(Ordering::SeqCst));
            assert!(
                poll_once(first_b.as_mut(), &fb),
                "a closed line lets all through"
            );
        }
        drop((a, b));
    }
}
