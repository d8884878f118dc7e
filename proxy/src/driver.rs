//! The io_uring waiter: a fixed set of shm driver threads, each a small
//! executor for the shm sessions it owns.
//!
//! A driver thread polls the futures of its sessions (`Session::run`) with a
//! waker that puts the session on the thread's run queue. When no session
//! is runnable it sleeps in one `io_uring_enter`, which holds at once a
//! multishot, edge-triggered poll of each session's doorbell eventfd (armed
//! once per session: going to sleep costs no submission, and, as with
//! epoll, the eventfd is never drained), a poll of each session's control
//! socket, and a multishot poll of the thread's own eventfd. Its own eventfd
//! is rung by wakers called from other threads (a tokio task completed a
//! forwarded request, a channel got a message, a timer fired), and only
//! when the thread announced that it sleeps (the same announce/re-check
//! protocol as the rings' doorbells), so a busy thread is woken without a
//! syscall. tokio channels, `watch` and timers work with any waker; the
//! runtime's handle is entered on the thread so that sessions can spawn
//! forwarding tasks and start timers.
//!
//! Fairness: a session yields every 50 µs (`tokio::task::yield_now` wakes
//! it at once, which queues it behind the other runnable sessions), and
//! the thread reaps completed waits and submits new ones after every pass
//! over its run queue, so a busy session neither starves the others nor
//! keeps a sleeping session's doorbell from being heard. The ring runs
//! completions cooperatively (no interrupt per doorbell while the thread is
//! busy); a pass enters the kernel only when the kernel flags completions
//! to run or new waits are queued. A panicking session is dropped alone.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use meshshm_ring::uring::{Completion, Uring, Watch, WatchKind};
use meshshm_ring::{heap_doorbell, Bell, Notifier};

/// A session handed to a driver thread: builds the session's future there.
pub type Job = Box<dyn FnOnce(Io) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// The driver threads.
pub struct Drivers {
    threads: Vec<Arc<Inbox>>,
}

struct Inbox {
    jobs: Mutex<Vec<Job>>,
    /// Sessions owned (for placing new ones on the least loaded thread).
    load: AtomicUsize,
    runq: Arc<RunQueue>,
}

struct RunQueue {
    q: Mutex<VecDeque<(usize, u64)>>,
    /// Rings the thread's eventfd if (and only if) it announced sleep.
    notifier: Notifier,
}

impl RunQueue {
    fn push(&self, idx: usize, gen: u64) {
        self.q.lock().expect("run queue").push_back((idx, gen));
        self.notifier.notify();
    }
}

struct TaskWaker {
    idx: usize,
    gen: u64,
    scheduled: AtomicBool,
    runq: Arc<RunQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.runq.push(self.idx, self.gen);
        }
    }
}

impl Drivers {
    /// Start `n` driver threads. Call [`meshshm_ring::uring::Uring::probe`]
    /// first: this fails if a ring cannot be set up.
    pub fn start(n: usize, rt: tokio::runtime::Handle) -> std::io::Result<Drivers> {
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let uring = Uring::new(256)?;
            let bell = Bell::eventfd()?;
            let own = bell.fd().expect("eventfd bell").try_clone_to_owned()?;
            let (waiter, notifier) = heap_doorbell(bell, 0);
            let inbox = Arc::new(Inbox {
                jobs: Mutex::new(Vec::new()),
                load: AtomicUsize::new(0),
                runq: Arc::new(RunQueue {
                    q: Mutex::new(VecDeque::new()),
                    notifier,
                }),
            });
            let me = inbox.clone();
            let rt = rt.clone();
            std::thread::Builder::new()
                .name(format!("shm-driver-{i}"))
                .spawn(move || {
                    let _rt = rt.enter();
                    run(me, uring, own, waiter);
                })?;
            threads.push(inbox);
        }
        Ok(Drivers { threads })
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Hand a session to the least loaded thread.
    pub fn spawn(&self, job: Job) {
        let t = self
            .threads
            .iter()
            .min_by_key(|t| t.load.load(Ordering::Relaxed))
            .expect("at least one driver");
        t.load.fetch_add(1, Ordering::Relaxed);
        t.jobs.lock().expect("inbox").push(job);
        t.runq.notifier.notify();
    }
}

struct Task {
    fut: Pin<Box<dyn Future<Output = ()>>>,
    waker: Arc<TaskWaker>,
}

fn run(me: Arc<Inbox>, uring: Uring, own: OwnedFd, waiter: meshshm_ring::Waiter) {
    let io = Io(Arc::new(Mutex::new(IoState {
        uring,
        watches: Vec::new(),
        free: Vec::new(),
        scratch: Vec::new(),
    })));
    let own = match io.watch(own, WatchKind::Rung) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "shm driver: cannot watch its eventfd");
            return;
        }
    };
    let mut tasks: Vec<Option<Task>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut gen = 0u64;
    let mut batch = VecDeque::new();
    let mut wakers = Vec::new();
    loop {
        // New sessions.
        let jobs = std::mem::take(&mut *me.jobs.lock().expect("inbox"));
        for job in jobs {
            gen += 1;
            let idx = free.pop().unwrap_or_else(|| {
                tasks.push(None);
                tasks.len() - 1
            });
            let waker = Arc::new(TaskWaker {
                idx,
                gen,
                scheduled: AtomicBool::new(false),
                runq: me.runq.clone(),
            });
            tasks[idx] = Some(Task {
                fut: job(io.clone()),
                waker: waker.clone(),
            });
            waker.wake_by_ref();
        }
        // One pass over the runnable sessions.
        std::mem::swap(&mut batch, &mut *me.runq.q.lock().expect("run queue"));
        for (idx, g) in batch.drain(..) {
            let Some(Some(t)) = tasks.get_mut(idx) else {
                continue;
            };
            if t.waker.gen != g {
                continue;
            }
            t.waker.scheduled.store(false, Ordering::Release);
            let w = Waker::from(t.waker.clone());
            let mut cx = Context::from_waker(&w);
            // A panic in one session ends that session (as in a tokio
            // task), not the thread and the other sessions on it.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                t.fut.as_mut().poll(&mut cx)
            }));
            if r.as_ref().map_or(true, Poll::is_ready) {
                if r.is_err() {
                    tracing::error!("shm driver: a session panicked; it is closed");
                }
                tasks[idx] = None;
                free.push(idx);
                me.load.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if !me.runq.q.lock().expect("run queue").is_empty()
            || !me.jobs.lock().expect("inbox").is_empty()
        {
            // Busy: submit the waits of sessions that went to sleep and
            // reap what completed (no syscall when neither), so that
            // sleeping sessions are heard while others keep the thread busy.
            if let Err(e) = io.pump(false, &mut wakers) {
                tracing::error!(error = %e, "shm driver: io_uring");
            }
            wakers.drain(..).for_each(Waker::wake);
            continue;
        }
        // Nothing runnable: submit the new waits and sleep until a wait
        // completes or a waker rings, in one io_uring_enter.
        waiter.announce_sleep();
        if !me.runq.q.lock().expect("run queue").is_empty()
            || !me.jobs.lock().expect("inbox").is_empty()
        {
            waiter.cancel_sleep();
            continue;
        }
        let r = io.arm(&own).and_then(|()| io.pump(true, &mut wakers));
        waiter.cancel_sleep();
        wakers.drain(..).for_each(Waker::wake);
        if let Err(e) = r {
            tracing::error!(error = %e, "shm driver: io_uring wait");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// The driver thread's io_uring, shared by the sessions it runs. Only that
/// thread uses it (the mutex is never contended; it makes the session
/// futures `Send`, like the epoll path's).
#[derive(Clone)]
pub struct Io(Arc<Mutex<IoState>>);

struct IoState {
    uring: Uring,
    watches: Vec<Option<WatchState>>,
    free: Vec<usize>,
    scratch: Vec<Completion>,
}

struct WatchState {
    watch: Watch,
    /// The result of a completed wait not yet taken by `Watched::ready`.
    fired: Option<i32>,
    waker: Option<Waker>,
}

/// A watched fd (a doorbell eventfd, or a control socket); ends on drop.
pub struct Watched {
    io: Io,
    key: usize,
}

impl Io {
    /// The state (a panic that poisoned the lock is contained to its
    /// session: the state is still consistent between calls).
    fn lock(&self) -> std::sync::MutexGuard<'_, IoState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watch `fd` (an owner of it, kept while the watch lives): an 8-byte
    /// read (eventfd) or a poll for input/hang-up (socket).
    pub fn watch(
        &self,
        fd: impl std::os::fd::AsFd + Send + 'static,
        kind: WatchKind,
    ) -> std::io::Result<Watched> {
        let mut st = self.lock();
        let key = st.free.pop().unwrap_or_else(|| {
            st.watches.push(None);
            st.watches.len() - 1
        });
        let watch = st.uring.register(fd, kind, key as u64);
        st.watches[key] = Some(WatchState {
            watch,
            fired: None,
            waker: None,
        });
        Ok(Watched {
            io: self.clone(),
            key,
        })
    }

    fn arm(&self, w: &Watched) -> std::io::Result<()> {
        let mut st = self.lock();
        let Some(Some(ws)) = st.watches.get(w.key) else {
            return Ok(());
        };
        let watch = ws.watch;
        st.uring.arm(watch)
    }

    /// Submit queued waits; with `block`, sleep until one completes.
    /// Puts in `wakers` those of the sessions whose waits completed: the
    /// caller wakes them once it no longer announces sleep (a wake-up while
    /// the announcement stands would ring the thread's own eventfd: a
    /// syscall, and a spurious return from the next sleep).
    fn pump(&self, block: bool, wakers: &mut Vec<Waker>) -> std::io::Result<()> {
        {
            let mut st = self.lock();
            let st = &mut *st;
            st.uring.wait(block, &mut st.scratch)?;
            for c in st.scratch.drain(..) {
                if let Some(Some(ws)) = st.watches.get_mut(c.key as usize) {
                    ws.fired = Some(c.result);
                    wakers.extend(ws.waker.take());
                }
            }
        }
        Ok(())
    }
}

impl Watched {
    /// Wait until the watched fd is ready: the result of the completed
    /// read (8) or poll (an event mask), or `-errno`.
    pub fn ready(&self) -> impl Future<Output = i32> + '_ {
        std::future::poll_fn(move |cx| {
            let mut st = self.io.lock();
            let st = &mut *st;
            let Some(Some(ws)) = st.watches.get_mut(self.key) else {
                return Poll::Ready(-nix::libc::EBADF);
            };
            if let Some(r) = ws.fired.take() {
                return Poll::Ready(r);
            }
            ws.waker = Some(cx.waker().clone());
            let watch = ws.watch;
            match st.uring.arm(watch) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(-e.raw_os_error().unwrap_or(nix::libc::EIO)),
            }
        })
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let mut st = self.io.lock();
        if let Some(ws) = st.watches.get_mut(self.key).and_then(Option::take) {
            st.uring.unregister(ws.watch);
            st.free.push(self.key);
        }
    }
}
