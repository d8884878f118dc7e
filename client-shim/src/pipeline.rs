//! Many calls in flight from one thread, without a runtime: a [`Pipeline`]
//! sends requests as long as the ring (or socket) takes them and hands
//! replies out as they come, each lent from the connection's receive buffer.
//! Per call there is no task, no waker, no lock shared with another thread
//! and no allocation; this is the API for an app that keeps many calls in
//! flight on one thread (an event loop, a load generator, a batch job).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use meshshm_proto::{status, HeaderIter, ResponseMeta};
use meshshm_ring::{FrameKind, Message};
use slab::Slab;

use crate::client::{connect_link, Linked};
use crate::conn::{Link, Out};
use crate::error::{Error, Result};
use crate::shm::Rest;
use crate::{Call, ClientOptions};

/// One reply, lent from the connection's receive buffer until the callback
/// given to [`Pipeline::poll`] returns.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    /// The id [`Pipeline::send`] returned for the call.
    pub id: u64,
    /// A [`status`] code; 0 is OK.
    pub status: u32,
    /// The error message ("" on success).
    pub message: &'a str,
    /// The response body.
    pub body: &'a [u8],
    headers: Option<HeaderIter<'a>>,
}

impl<'a> Reply<'a> {
    /// The response headers, as (name, value) pairs.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        self.headers.into_iter().flatten()
    }
}

/// Many calls in flight on one connection of its own, driven by one thread.
///
/// [`Pipeline::send`] writes a request and returns its id at once (or
/// `None` when the ring is full: poll, then send again); [`Pipeline::poll`]
/// hands each reply that has come to a callback, waiting up to a timeout
/// for the first. Replies come in whatever order the services answer.
/// A call's `timeout` travels with it and is kept by the proxy, which
/// answers `DEADLINE_EXCEEDED` when it passes; the pipeline runs no timers
/// of its own. [`Pipeline::cancel`] gives up on a call.
///
/// The connection is the pipeline's own, with the transport and fallback of
/// its [`ClientOptions`]. If the proxy goes away, `send` and `poll` fail
/// with [`Error::ProxyGone`] and the calls in flight are lost: open a new
/// pipeline. Shm waits spin first as [`ClientOptions::spin`] says. Over TCP
/// each request is written as it is sent, unless
/// [`ClientOptions::tcp_batch`] asks to gather them (then they go out at the
/// next poll, or once that many bytes wait).
///
/// ```no_run
/// use meshshm::{Call, ClientOptions, Pipeline};
/// let mut p = Pipeline::connect(&ClientOptions::default())?;
/// let mut left = 1000;
/// let mut sent = 0;
/// while left > 0 {
///     // Keep up to 64 in flight.
///     while sent < 1000 && p.in_flight() < 64 {
///         if p.send(&Call::new("echo", "Echo", b"hi"))?.is_none() {
///             break; // the ring is full: take replies first
///         }
///         sent += 1;
///     }
///     left -= p.poll(Some(std::time::Duration::from_secs(1)), |r| {
///         assert_eq!((r.status, r.body), (0, &b"hi"[..]));
///     })?;
/// }
/// # Ok::<(), meshshm::Error>(())
/// ```
pub struct Pipeline {
    inner: Box<dyn Driven + Send>,
}

impl Pipeline {
    /// Open a connection for the pipeline.
    ///
    /// # Errors
    /// As [`crate::Client::with_options`].
    pub fn connect(opts: &ClientOptions) -> Result<Pipeline> {
        let inner: Box<dyn Driven + Send> = match connect_link(opts)? {
            Linked::Shm(l) => Box::new(Pipe::new(l, 0)),
            Linked::Tcp(l) => Box::new(Pipe::new(l, opts.tcp_batch)),
        };
        Ok(Pipeline { inner })
    }

    /// Send a call; its id, or `None` (nothing sent) if there is no room
    /// for it now: poll, then send again (room comes as the proxy reads the
    /// calls in flight). With no other call in flight this waits for room
    /// instead. A message larger than half the ring goes in parts: once its
    /// first part is written, this waits for room for the rest, taking in
    /// replies meanwhile (the next [`Pipeline::poll`] hands them out). Over
    /// TCP, see [`ClientOptions::tcp_batch`] for when a request leaves.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a message over the size limit;
    /// [`Error::ProxyGone`] when the connection is lost or the proxy asked
    /// it to end (goaway: calls in flight still complete).
    pub fn send(&mut self, call: &Call<'_>) -> Result<Option<u64>> {
        self.inner.send(call)
    }

    /// Hand every reply that has come to `on`; if none has, wait for the
    /// first up to `timeout` (`None`: no limit; zero: do not wait).
    /// Returns how many replies were handed out.
    ///
    /// # Errors
    /// [`Error::ProxyGone`] when the connection is lost, [`Error::Protocol`]
    /// when the proxy broke the protocol (the connection is then unusable).
    pub fn poll(
        &mut self,
        timeout: Option<Duration>,
        mut on: impl FnMut(Reply<'_>),
    ) -> Result<usize> {
        self.inner.poll(timeout, &mut on)
    }

    /// Give up on call `id`: its reply, if one comes, is dropped, and the
    /// proxy is told to stop working on it. False if it was not in flight.
    ///
    /// # Errors
    /// [`Error::ProxyGone`] when the connection is lost.
    pub fn cancel(&mut self, id: u64) -> Result<bool> {
        self.inner.cancel(id)
    }

    /// Calls sent and neither answered nor cancelled.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    /// "shm" or "tcp".
    pub fn transport(&self) -> &'static str {
        self.inner.transport()
    }
}

/// The transport-independent face of [`Pipe`].
trait Driven {
    fn send(&mut self, call: &Call<'_>) -> Result<Option<u64>>;
    fn poll(&mut self, timeout: Option<Duration>, on: &mut dyn FnMut(Reply<'_>)) -> Result<usize>;
    fn cancel(&mut self, id: u64) -> Result<bool>;
    fn in_flight(&self) -> usize;
    fn transport(&self) -> &'static str;
}

/// A reply taken in while a send waited for room, kept for the next poll.
struct Early {
    id: u64,
    status: u32,
    message: String,
    body: Vec<u8>,
}

/// Calls in flight, by the low 32 bits of their id (a slab index); the high
/// 32 bits are a generation, so a reply for a cancelled call cannot complete
/// the call that reuses its index.
struct Ids {
    slots: Slab<u64>,
    generation: u32,
}

impl Ids {
    fn add(&mut self) -> Result<u64> {
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        let e = self.slots.vacant_entry();
        let key = u32::try_from(e.key())
            .map_err(|_| Error::InvalidArgument("more than 2^32 calls in flight".into()))?;
        let id = (u64::from(self.generation) << 32) | u64::from(key);
        e.insert(id);
        Ok(id)
    }

    fn remove(&mut self, id: u64) -> bool {
        let key = (id & u64::from(u32::MAX)) as usize;
        if self.slots.get(key) == Some(&id) {
            self.slots.remove(key);
            true
        } else {
            false
        }
    }
}

struct Pipe<L: Link> {
    link: L,
    ids: Ids,
    early: VecDeque<Early>,
    meta: Vec<u8>,
    goaway: bool,
    dead: Option<Error>,
}

impl<L: Link> Pipe<L> {
    fn new(link: L, batch: usize) -> Self {
        link.batch_writes(batch);
        Pipe {
            link,
            ids: Ids {
                slots: Slab::new(),
                generation: 0,
            },
            early: VecDeque::new(),
            meta: Vec::new(),
            goaway: false,
            dead: None,
        }
    }

    fn alive(&self) -> Result<()> {
        match &self.dead {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Note a lost connection: every later use fails the same way.
    fn check<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if matches!(e, Error::ProxyGone(_) | Error::Protocol(_)) {
                self.dead = Some(e.clone());
            }
        }
        r
    }

    /// Send `m`, waiting for room if it has to (a message cut by a full
    /// ring, a Cancel), taking replies in meanwhile: the proxy may need room
    /// for them before it reads on.
    fn send_out(&mut self, m: Out<'_>, wait: bool) -> Result<bool> {
        self.taking_in(|link, idle| {
            if wait {
                link.send(m, idle).map(|()| true)
            } else {
                link.try_send(m, idle, Rest::Wait)
            }
        })
    }

    /// Run a write `f` that may wait for room, with an `idle` that takes in
    /// the replies that came meanwhile (kept for the next poll).
    fn taking_in<T>(&mut self, f: impl FnOnce(&L, &mut dyn FnMut()) -> Result<T>) -> Result<T> {
        let Pipe {
            link,
            ids,
            early,
            goaway,
            ..
        } = self;
        let mut failed = None;
        let mut idle = || {
            if failed.is_none() {
                if let Err(e) = take_in(&*link, ids, early, goaway) {
                    failed = Some(e);
                }
            }
        };
        let r = f(link, &mut idle);
        match failed {
            Some(e) => Err(e),
            None => r,
        }
    }

    /// Hand out the replies taken in while a write waited.
    fn hand_out_early(&mut self, on: &mut dyn FnMut(Reply<'_>)) -> usize {
        let n = self.early.len();
        for e in self.early.drain(..) {
            on(Reply {
                id: e.id,
                status: e.status,
                message: &e.message,
                body: &e.body,
                headers: None,
            });
        }
        n
    }
}

/// Read what has come without waiting and keep each reply (copied) for the
/// next poll.
fn take_in<L: Link>(
    link: &L,
    ids: &mut Ids,
    early: &mut VecDeque<Early>,
    goaway: &mut bool,
) -> Result<()> {
    let Some(mut rx) = link.try_rx() else {
        return Ok(());
    };
    deliver(link, &mut rx, ids, goaway, &mut |r| {
        early.push_back(Early {
            id: r.id,
            status: r.status,
            message: r.message.to_owned(),
            body: r.body.to_vec(),
        })
    })?;
    Ok(())
}

/// Take in what has arrived without waiting (TCP: as many reads as find
/// data) and hand each reply for a call in flight to `on`; how many.
fn deliver<L: Link>(
    link: &L,
    rx: &mut L::Rx,
    ids: &mut Ids,
    goaway: &mut bool,
    on: &mut dyn FnMut(Reply<'_>),
) -> Result<usize> {
    let mut n = 0;
    let mut each = |m: &mut Message<'_>| {
        on_message(m, ids, goaway, &mut |r| {
            n += 1;
            on(r)
        })
    };
    while link.receive_now(rx)? {
        link.drain(rx, &mut each)?;
    }
    link.drain(rx, &mut each)?;
    Ok(n)
}

/// One message from the proxy: a reply for a call in flight goes to `on`
/// (one for an unknown or cancelled call is dropped).
fn on_message(
    m: &mut Message<'_>,
    ids: &mut Ids,
    goaway: &mut bool,
    on: &mut dyn FnMut(Reply<'_>),
) -> Result<()> {
    match m.kind {
        FrameKind::Response => {
            if !ids.remove(m.stream_id) {
                return Ok(());
            }
            // Malformed metadata fails that one call, not the connection.
            let r = match ResponseMeta::decode(m.meta()) {
                Ok(meta) => Reply {
                    id: m.stream_id,
                    status: meta.status,
                    message: meta.message,
                    body: m.body(),
                    headers: Some(meta.headers),
                },
                Err(_) => Reply {
                    id: m.stream_id,
                    status: status::INTERNAL,
                    message: "malformed response metadata",
                    body: &[],
                    headers: None,
                },
            };
            on(r);
            Ok(())
        }
        FrameKind::Goaway => {
            *goaway = true;
            Ok(())
        }
        FrameKind::Pong | FrameKind::Cancel => Ok(()),
        k => Err(Error::Protocol(format!(
            "unexpected {k:?} frame on a client connection"
        ))),
    }
}

impl<L: Link> Driven for Pipe<L> {
    fn send(&mut self, call: &Call<'_>) -> Result<Option<u64>> {
        self.alive()?;
        if self.goaway {
            return Err(Error::ProxyGone(
                "the proxy is ending this connection (goaway): open a new pipeline".into(),
            ));
        }
        let id = self.ids.add()?;
        let mut meta = std::mem::take(&mut self.meta);
        crate::conn::encode_request_meta(&mut meta, call);
        let out = Out {
            kind: FrameKind::Request,
            id,
            meta: &meta,
            body: call.body,
        };
        // With nothing else in flight no answer will come to poll for, and
        // the room (freed as the proxy reads, a pad to the ring's end
        // included) needs nothing from us: wait for it here.
        let alone = self.ids.slots.len() == 1 && self.early.is_empty();
        let r = self.send_out(out, alone);
        self.meta = meta;
        match self.check(r) {
            Ok(true) => Ok(Some(id)),
            Ok(false) => {
                self.ids.remove(id);
                Ok(None)
            }
            Err(e) => {
                self.ids.remove(id);
                Err(e)
            }
        }
    }

    fn poll(&mut self, timeout: Option<Duration>, on: &mut dyn FnMut(Reply<'_>)) -> Result<usize> {
        // Replies taken in while a write waited go first, before anything
        // else can fail.
        let n = self.hand_out_early(on);
        if n > 0 {
            return Ok(n);
        }
        self.alive()?;
        // Gathered TCP writes go out, taking replies in while the socket is
        // full (the proxy may be waiting to send them before it reads on).
        let r = self.taking_in(|link, idle| link.flush(idle));
        self.check(r)?;
        let mut n = self.hand_out_early(on);
        let deadline = timeout.map(|t| Instant::now() + t);
        let Pipe {
            link, ids, goaway, ..
        } = self;
        let r = (|| {
            let mut rx = link.rx();
            loop {
                n += deliver(link, &mut rx, ids, goaway, on)?;
                if n > 0 || deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(n);
                }
                // (Timed out: the deadline check above returns.)
                link.wait(&mut rx, deadline)?;
            }
        })();
        self.check(r)
    }

    fn cancel(&mut self, id: u64) -> Result<bool> {
        self.alive()?;
        if !self.ids.remove(id) {
            return Ok(false);
        }
        let r = self.send_out(Out::empty(FrameKind::Cancel, id), true);
        self.check(r).map(|_| true)
    }

    fn in_flight(&self) -> usize {
        self.ids.slots.len()
    }

    fn transport(&self) -> &'static str {
        self.link.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_zero_and_a_stale_one_does_not_match_its_reused_index() {
        let mut ids = Ids {
            slots: Slab::new(),
            generation: 0,
        };
        let a = ids.add().unwrap();
        assert_ne!(a, 0);
        assert!(ids.remove(a));
        assert!(!ids.remove(a), "removed twice");
        let b = ids.add().unwrap();
        assert_eq!(a & 0xffff_ffff, b & 0xffff_ffff, "index reused");
        assert!(!ids.remove(a), "the old id does not match the new call");
        assert!(ids.remove(b));
        for bogus in [0, u64::MAX, b ^ (1 << 40)] {
            assert!(!ids.remove(bogus));
        }
    }
}
