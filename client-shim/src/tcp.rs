//! The loopback-TCP transport: the same frames, byte for byte, on a socket.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshshm_proto::{encode_frame, FrameDecoder};
use meshshm_ring::{FrameKind, Message, Reassembler, WaitOutcome, HEADER_LEN};

use crate::conn::{check_size, try_lock, Out};
use crate::error::{gone, Error, Result};

pub(crate) struct TcpLink {
    w: Mutex<TcpStream>,
    rx: Mutex<TcpRx>,
    shut: TcpStream,
    max_message: usize,
    /// Write batching (see [`TcpLink::batch_writes`]): bytes, 0 = off.
    batch: AtomicUsize,
    /// Frames waiting to be written while batching.
    pending: Mutex<Vec<u8>>,
}

pub(crate) struct TcpRx {
    s: TcpStream,
    buf: Vec<u8>,
    filled: usize,
    dec: FrameDecoder,
    reasm: Reassembler,
    timeout: Option<Duration>,
}

impl TcpRx {
    /// Where the next read goes: `filled`, after doubling the buffer if it
    /// is full.
    fn make_room(&mut self) -> usize {
        if self.filled == self.buf.len() {
            let l = self.buf.len() * 2;
            self.buf.resize(l, 0);
        }
        self.filled
    }
}

thread_local! {
    static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl TcpLink {
    pub(crate) fn connect(
        addr: SocketAddr,
        timeout: Duration,
        max_message: usize,
    ) -> Result<TcpLink> {
        let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::connect(addr, e))?;
        s.set_nodelay(true).map_err(|e| Error::connect(addr, e))?;
        let w = s.try_clone().map_err(|e| Error::connect(addr, e))?;
        let shut = s.try_clone().map_err(|e| Error::connect(addr, e))?;
        Ok(TcpLink {
            w: Mutex::new(w),
            rx: Mutex::new(TcpRx {
                s,
                buf: vec![0; 64 * 1024],
                filled: 0,
                dec: FrameDecoder::new(max_message),
                reasm: Reassembler::new(max_message),
                timeout: None,
            }),
            shut,
            max_message,
            batch: AtomicUsize::new(0),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Send one frame. The socket stays blocking for the blocking API's
    /// reads; writes use `MSG_DONTWAIT`, so that while the socket buffer is
    /// full `idle` can read the proxy's answers (which the proxy may be
    /// waiting to send before it reads more).
    pub(crate) fn send(&self, m: Out<'_>, idle: &mut dyn FnMut()) -> Result<()> {
        check_size(m.len(), self.max_message)?;
        let batch = self.batch.load(Ordering::Relaxed);
        if batch > 0 {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() < batch {
                encode_frame(&mut p, m.kind, m.id, m.meta.len(), &[m.meta, m.body]);
                if p.len() < batch {
                    return Ok(());
                }
                let r = self.write_out(&p, idle);
                p.clear();
                return r;
            }
            // A large message is not copied into the batch: what waits goes
            // first, then it.
            if !p.is_empty() {
                let r = self.write_out(&p, idle);
                p.clear();
                r?;
            }
        }
        OUT.with(|o| {
            let mut o = o.borrow_mut();
            o.clear();
            encode_frame(&mut o, m.kind, m.id, m.meta.len(), &[m.meta, m.body]);
            self.write_out(&o, idle)
        })
    }

    /// From now on, frames wait in a buffer until `bytes` of them do or
    /// [`TcpLink::flush`] (0: each frame is written at once).
    pub(crate) fn batch_writes(&self, bytes: usize) {
        self.batch.store(bytes, Ordering::Relaxed);
    }

    /// Write the frames that wait in the buffer (running `idle` while the
    /// socket buffer is full).
    pub(crate) fn flush(&self, idle: &mut dyn FnMut()) -> Result<()> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_empty() {
            return Ok(());
        }
        let r = self.write_out(&p, idle);
        p.clear();
        r
    }

    /// Write all of `o`; while the socket buffer is full, run `idle`.
    fn write_out(&self, o: &[u8], idle: &mut dyn FnMut()) -> Result<()> {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        let w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        let mut off = 0;
        while off < o.len() {
            match send(
                w.as_raw_fd(),
                &o[off..],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => off += n,
                Err(nix::errno::Errno::EAGAIN) => {
                    idle();
                    use std::os::fd::AsFd;
                    crate::shm::poll_for(
                        w.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                        Duration::from_millis(1),
                    );
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(gone(std::io::Error::from(e))),
            }
        }
        Ok(())
    }

    pub(crate) fn try_rx(&self) -> Option<MutexGuard<'_, TcpRx>> {
        try_lock(&self.rx)
    }

    pub(crate) fn rx(&self) -> MutexGuard<'_, TcpRx> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn drain(
        &self,
        rx: &mut TcpRx,
        mut on: impl FnMut(&mut Message<'_>) -> Result<()>,
    ) -> Result<usize> {
        let mut off = 0;
        let mut n = 0;
        loop {
            let avail = &rx.buf[off..rx.filled];
            match rx.dec.decode(avail) {
                Ok(Some((h, total))) => {
                    let payload = &avail[HEADER_LEN..HEADER_LEN + h.len as usize];
                    if let Some(mut m) = rx.reasm.feed(&h, payload)? {
                        if m.kind == FrameKind::Ping {
                            let p = m.to_vec();
                            let pong = Out {
                                body: &p,
                                ..Out::empty(FrameKind::Pong, m.stream_id)
                            };
                            self.send(pong, &mut || {})?;
                        } else {
                            on(&mut m)?;
                        }
                        n += 1;
                    }
                    off += total;
                }
                Ok(None) => {
                    // Make room for the rest of a large frame.
                    if avail.len() >= HEADER_LEN {
                        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]);
                        let need = meshshm_ring::wire_len(len as usize);
                        if need > rx.buf.len() {
                            rx.buf.resize(need, 0);
                        }
                    }
                    break;
                }
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
        }
        rx.buf.copy_within(off..rx.filled, 0);
        rx.filled -= off;
        Ok(n)
    }

    pub(crate) fn wait(&self, rx: &mut TcpRx, deadline: Option<Instant>) -> Result<WaitOutcome> {
        let t = match deadline {
            Some(d) => {
                let now = Instant::now();
                if d <= now {
                    return Ok(WaitOutcome::TimedOut);
                }
                // Round up to whole ms so the socket option is set rarely.
                Some(Duration::from_millis((d - now).as_millis() as u64 + 1))
            }
            None => None,
        };
        if t != rx.timeout {
            rx.s.set_read_timeout(t).map_err(gone)?;
            rx.timeout = t;
        }
        let filled = rx.make_room();
        match rx.s.read(&mut rx.buf[filled..]) {
            Ok(0) => Err(Error::ProxyGone(
                "the proxy closed the TCP connection".into(),
            )),
            Ok(n) => {
                rx.filled += n;
                Ok(WaitOutcome::Ready)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(WaitOutcome::TimedOut)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(WaitOutcome::Ready),
            Err(e) => Err(gone(e)),
        }
    }

    /// The socket, for a reader on an async runtime.
    pub(crate) fn watch_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        vec![self.shut.as_fd()]
    }

    /// One non-blocking read (`MSG_DONTWAIT`: the socket itself stays
    /// blocking for the writers and the blocking API); true if bytes came.
    pub(crate) fn receive_now(&self, rx: &mut TcpRx) -> Result<bool> {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let filled = rx.make_room();
        match recv(
            rx.s.as_raw_fd(),
            &mut rx.buf[filled..],
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => Err(Error::ProxyGone(
                "the proxy closed the TCP connection".into(),
            )),
            Ok(n) => {
                rx.filled += n;
                Ok(true)
            }
            Err(nix::errno::Errno::EAGAIN) => Ok(false),
            Err(nix::errno::Errno::EINTR) => Ok(true),
            Err(e) => Err(gone(std::io::Error::from(e))),
        }
    }

    pub(crate) fn interrupt(&self) {
        let _ = self.shut.shutdown(Shutdown::Both);
    }
}
