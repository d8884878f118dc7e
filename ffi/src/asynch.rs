//! The asynchronous side of `meshshm_client`: send without waiting, poll
//! for completions, and an eventfd that is readable when a completion may be
//! ready.
//!
//! Built on the shim's `AsyncClient`: each sent call is a task on one small
//! tokio runtime shared by the library (one worker thread, started on first
//! use); each client's async connection is read by a task on that runtime
//! (the shim's reader: no thread of its own). A finished call is pushed on
//! the client's completion queue and the eventfd is signalled.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::runtime::Runtime;

use crate::args::wait_timeout;
use crate::buffer::{free_c_string, give_c_string, meshshm_buffer};
use crate::client::{call_args, handle, meshshm_client, CallArgs, ClientHandle};
use crate::error::{
    guard, guard_void, response_result, Fail, Res, MESHSHM_ERR_CANCELLED, MESHSHM_ERR_CLOSED,
    MESHSHM_ERR_NOT_FOUND, MESHSHM_OK,
};
use crate::options::{call_options, meshshm_call_options, CallOpts};

/// One finished asynchronous call, as `meshshm_client_poll` hands it out.
/// Release what it holds with `meshshm_completion_free`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct meshshm_completion {
    /// the `user_data` given to `meshshm_client_send`
    pub user_data: u64,
    /// the id `meshshm_client_send` returned for the call
    pub call_id: u64,
    /// `MESHSHM_OK`, or the negative error code the blocking call would have
    /// returned (`MESHSHM_ERR_STATUS`, `MESHSHM_ERR_TIMEOUT`,
    /// `MESHSHM_ERR_CANCELLED`, ...)
    pub result: c_int,
    /// the service's status (0 = OK; set when `result` is `MESHSHM_OK` or
    /// `MESHSHM_ERR_STATUS`; 4 with a `MESHSHM_ERR_TIMEOUT` from the proxy)
    pub status: u32,
    /// the response body (may be non-empty with `MESHSHM_ERR_STATUS` too)
    pub body: meshshm_buffer,
    /// NULL on success, else the error message (NUL-terminated)
    pub error: *mut c_char,
}

type Outcome = Result<shim::Response, Fail>;

struct Done {
    user_data: u64,
    call_id: u64,
    outcome: Outcome,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the tasks of one client share with the poller.
struct Shared {
    queue: Mutex<VecDeque<Done>>,
    /// Calls in flight, by call id. Whoever removes an entry (the task that
    /// finished, or `meshshm_client_cancel`) queues the call's one completion.
    tasks: Mutex<HashMap<u64, (u64, tokio::task::AbortHandle)>>,
    /// Readable while the queue may hold completions.
    efd: EventFd,
}

impl Shared {
    fn complete(&self, d: Done) {
        if lock(&self.tasks).remove(&d.call_id).is_none() {
            return; // cancelled: its completion is queued already
        }
        self.push(d);
    }

    fn push(&self, d: Done) {
        lock(&self.queue).push_back(d);
        // An error here (counter overflow) still leaves the fd readable.
        let _ = self.efd.write(1);
    }
}

/// The asynchronous state of one client.
pub(crate) struct AsyncState {
    client: shim::AsyncClient,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl AsyncState {
    /// Drop every call in flight (the client is closing).
    pub(crate) fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let all: Vec<_> = lock(&self.shared.tasks).drain().collect();
        for (_, (_, task)) in all {
            task.abort();
        }
        lock(&self.shared.queue).clear();
    }
}

/// The library's runtime for asynchronous calls.
fn runtime() -> Res<&'static Runtime> {
    static RT: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("meshshm-async")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Fail::sys("cannot start the async runtime", e))
}

/// The client's async state, set up on first use.
fn state(h: &ClientHandle) -> Res<&Arc<AsyncState>> {
    if let Some(s) = h.asynch.get() {
        return Ok(s);
    }
    let _once = lock(&h.asynch_init);
    if let Some(s) = h.asynch.get() {
        return Ok(s);
    }
    let rt = runtime()?;
    let client = rt.block_on(shim::AsyncClient::connect(h.opts.clone()))?;
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| Fail::sys("eventfd", e))?;
    let s = Arc::new(AsyncState {
        client,
        shared: Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            tasks: Mutex::new(HashMap::new()),
            efd,
        }),
        next_id: AtomicU64::new(1),
        closed: AtomicBool::new(false),
    });
    Ok(h.asynch.get_or_init(|| s))
}

/// Start a call and return at once; its result comes back through
/// `meshshm_client_poll` as a `meshshm_completion` carrying `user_data`.
/// Every successful send yields exactly one completion (success, error,
/// timeout after `timeout_ms` (0: none), or cancellation). `*call_id` (if not
/// NULL) receives the call's id, for `meshshm_client_cancel`.
///
/// The first asynchronous use of a client opens a second connection to the
/// proxy for it (read on the library's runtime thread), so it may fail with
/// `MESHSHM_ERR_CONNECT`.
///
/// # Safety
/// As `meshshm_client_call`; `call_id` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_send(
    c: *mut meshshm_client,
    service: *const c_char,
    method: *const c_char,
    body: *const c_void,
    body_len: usize,
    timeout_ms: u32,
    user_data: u64,
    call_id: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on.
        let a = unsafe { call_args(c, service, method, body, body_len) }?;
        let id = send(&a, CallOpts::plain(timeout_ms), user_data)?;
        if !call_id.is_null() {
            // SAFETY: not NULL, and the caller promises it is writable.
            unsafe { call_id.write(id) };
        }
        Ok(MESHSHM_OK)
    })
}

/// As `meshshm_client_send`, with request headers, a priority and the
/// timeout given in `options` (NULL: no timeout, normal priority, no
/// headers; see `meshshm_call_options`). The options, the headers and their
/// strings are copied before this function returns.
///
/// # Safety
/// As `meshshm_client_send`; `options` is NULL or points to a
/// `meshshm_call_options` as documented there.
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_send_opts(
    c: *mut meshshm_client,
    service: *const c_char,
    method: *const c_char,
    body: *const c_void,
    body_len: usize,
    options: *const meshshm_call_options,
    user_data: u64,
    call_id: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on (here and below).
        let a = unsafe { call_args(c, service, method, body, body_len) }?;
        // SAFETY: as above.
        let opts = unsafe { call_options(options) }?;
        let id = send(&a, opts, user_data)?;
        if !call_id.is_null() {
            // SAFETY: not NULL, and the caller promises it is writable.
            unsafe { call_id.write(id) };
        }
        Ok(MESHSHM_OK)
    })
}

/// Start one asynchronous call; its id.
fn send(a: &CallArgs<'_>, opts: CallOpts, user_data: u64) -> Res<u64> {
    let (service, method, body) = (a.service.to_owned(), a.method.to_owned(), a.body.to_vec());
    let st = state(a.h)?;
    if st.closed.load(Ordering::Acquire) {
        return Err(Fail::new(MESHSHM_ERR_CLOSED, "the client is closed"));
    }
    let rt = runtime()?;
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    let client = st.client.clone();
    let shared = st.shared.clone();
    // Hold the table while spawning, so the task cannot finish (and look
    // itself up) before it is registered.
    let mut tasks = lock(&st.shared.tasks);
    let task = rt.spawn(async move {
        let headers = opts.header_refs();
        let call = shim::Call {
            service: &service,
            method: &method,
            body: &body,
            headers: &headers,
            timeout: opts.timeout,
            priority: opts.priority,
        };
        let outcome = client.invoke(&call).await.map_err(Fail::from);
        shared.complete(Done {
            user_data,
            call_id: id,
            outcome,
        });
    });
    tasks.insert(id, (user_data, task.abort_handle()));
    Ok(id)
}

/// Cancel an asynchronous call in flight. Its completion (with
/// `MESHSHM_ERR_CANCELLED`) is queued at once. Returns
/// `MESHSHM_ERR_NOT_FOUND` if the call already completed.
///
/// # Safety
/// `c` is a live client (or NULL).
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_cancel(c: *mut meshshm_client, call_id: u64) -> c_int {
    guard(|| {
        // SAFETY: the caller's promise.
        let h = unsafe { handle(c) }?;
        let st = h
            .asynch
            .get()
            .ok_or_else(|| Fail::new(MESHSHM_ERR_NOT_FOUND, "no asynchronous call was sent"))?;
        let Some((user_data, task)) = lock(&st.shared.tasks).remove(&call_id) else {
            return Err(Fail::new(
                MESHSHM_ERR_NOT_FOUND,
                format!("call {call_id} is not in flight"),
            ));
        };
        // Dropping the call's future sends the proxy a cancel frame.
        task.abort();
        st.shared.push(Done {
            user_data,
            call_id,
            outcome: Err(Fail::new(MESHSHM_ERR_CANCELLED, "cancelled")),
        });
        Ok(MESHSHM_OK)
    })
}

/// The client's completion file descriptor: it becomes readable when a
/// completion may be ready (register it with epoll, libuv, asyncio, Go's
/// poller, ...; then call `meshshm_client_poll`). Returns the fd (owned by the
/// client, closed by `meshshm_client_close`: do not close or read it
/// yourself) or a negative error code. Sets up the asynchronous side if
/// needed (see `meshshm_client_send`).
///
/// # Safety
/// `c` is a live client (or NULL).
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_fd(c: *mut meshshm_client) -> c_int {
    guard(|| {
        // SAFETY: the caller's promise.
        let h = unsafe { handle(c) }?;
        Ok(state(h)?.shared.efd.as_raw_fd())
    })
}

fn fill(d: Done) -> meshshm_completion {
    let mut c = meshshm_completion {
        user_data: d.user_data,
        call_id: d.call_id,
        result: MESHSHM_OK,
        status: 0,
        body: meshshm_buffer::EMPTY,
        error: std::ptr::null_mut(),
    };
    match d.outcome {
        Ok(r) => {
            c.status = r.status;
            match response_result(r) {
                Ok(body) => c.body = meshshm_buffer::from_vec(body),
                Err((f, body)) => {
                    c.result = f.code;
                    c.error = give_c_string(&f.msg);
                    c.body = meshshm_buffer::from_vec(body);
                }
            }
        }
        Err(f) => {
            c.result = f.code;
            c.status = f.status;
            c.error = give_c_string(&f.msg);
        }
    }
    c
}

/// Take up to `max` completions into `out[0..max]`, waiting up to
/// `timeout_ms` for the first (0: do not wait; negative: wait as long as it
/// takes). Returns how many were written (0 when none came in time), or a
/// negative error code. Each completion written must be released with
/// `meshshm_completion_free`. Any number of threads may poll one client;
/// each completion goes to exactly one of them.
///
/// # Safety
/// `c` is a live client (or NULL); `out` is NULL or points to `max` writable
/// `meshshm_completion`s.
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_poll(
    c: *mut meshshm_client,
    out: *mut meshshm_completion,
    max: usize,
    timeout_ms: i32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promise.
        let h = unsafe { handle(c) }?;
        if out.is_null() || max == 0 {
            return Err(Fail::arg("out is NULL or max is 0"));
        }
        let max = max.min(c_int::MAX as usize);
        let st = state(h)?;
        let deadline = wait_timeout(timeout_ms).map(|t| Instant::now() + t);
        loop {
            // Reset the fd first, then look: a completion queued after the
            // look signals the fd again, so none is missed.
            let _ = st.shared.efd.read();
            let taken: Vec<Done> = {
                let mut q = lock(&st.shared.queue);
                let n = q.len().min(max);
                let v = q.drain(..n).collect();
                if !q.is_empty() {
                    let _ = st.shared.efd.write(1);
                }
                v
            };
            if !taken.is_empty() {
                let n = taken.len();
                for (i, d) in taken.into_iter().enumerate() {
                    // SAFETY: i < n <= max, and the caller promises `max`
                    // writable completions at `out`; `write` does not read
                    // (or drop) what was there.
                    unsafe { out.add(i).write(fill(d)) };
                }
                return Ok(n as c_int);
            }
            if st.closed.load(Ordering::Acquire) {
                return Err(Fail::new(MESHSHM_ERR_CLOSED, "the client is closed"));
            }
            let wait = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(0);
                    }
                    PollTimeout::try_from(left.as_millis().max(1)).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(st.shared.efd.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, wait) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(Fail::sys("poll", e)),
            }
        }
    })
}

/// Release the body and error message of a completion and reset them.
/// NULL is fine; freeing twice is harmless.
///
/// # Safety
/// `c` is NULL or a completion written by `meshshm_client_poll` (not
/// modified since, except by this function).
#[no_mangle]
pub unsafe extern "C" fn meshshm_completion_free(c: *mut meshshm_completion) {
    guard_void(|| {
        // SAFETY: the caller promises NULL or a completion of ours.
        if let Some(c) = unsafe { c.as_mut() } {
            c.body.release();
            free_c_string(&mut c.error);
        }
    });
}
