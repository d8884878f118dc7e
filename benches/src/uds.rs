//! The plain Unix-socket echo (a reference): a server process that echoes
//! each request frame back as a response frame (the same frames as on the
//! proxy's TCP listener), and its clients. No proxy, no routing: the cost
//! of two kernel socket stacks and nothing else.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use meshshm_proto::{encode_frame, FrameDecoder, ResponseMeta};
use meshshm_ring::{wire_len, FrameKind, DEFAULT_MAX_MESSAGE, HEADER_LEN};

use crate::mux::{Mux, MuxConn, MuxTx};
use crate::wire::{check_response_meta, request_meta, OnResponse};

const MAX: usize = DEFAULT_MAX_MESSAGE as usize;

/// The hidden `uds-echo` subcommand: listen on `socket`, echo forever.
pub fn server_main(socket: &Path, parent: i32) -> std::process::ExitCode {
    crate::procs::child_guard(parent);
    let l = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("uds-echo: bind {}: {e}", socket.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("uds-echo ready");
    let _ = std::io::stdout().flush();
    for s in l.incoming() {
        match s {
            Ok(s) => {
                let _ = std::thread::Builder::new()
                    .name("uds-echo".into())
                    .spawn(move || {
                        if let Err(e) = serve(s) {
                            eprintln!("uds-echo: {e}");
                        }
                    });
            }
            Err(e) => eprintln!("uds-echo: accept: {e}"),
        }
    }
    std::process::ExitCode::SUCCESS
}

/// Echo on one connection: read what is there, answer every whole frame,
/// write all the answers at once (as the proxy's TCP sessions do).
fn serve(mut s: UnixStream) -> Result<(), String> {
    let dec = FrameDecoder::new(MAX);
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        if filled == buf.len() {
            let l = buf.len() * 2;
            buf.resize(l, 0);
        }
        let n = s
            .read(&mut buf[filled..])
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut off = 0;
        loop {
            match dec.decode(&buf[off..filled]).map_err(|e| e.to_string())? {
                Some((h, total)) => {
                    let p = &buf[off + HEADER_LEN..off + HEADER_LEN + h.len as usize];
                    if h.kind == FrameKind::Request {
                        let body = p.get(h.meta_len as usize..).ok_or("bad meta_len")?;
                        encode_frame(
                            &mut out,
                            FrameKind::Response,
                            h.stream_id,
                            ResponseMeta::OK.len(),
                            &[&ResponseMeta::OK, body],
                        );
                    }
                    off += total;
                }
                None => {
                    grow_for_frame(&mut buf, off, filled);
                    break;
                }
            }
        }
        buf.copy_within(off..filled, 0);
        filled -= off;
        if !out.is_empty() {
            s.write_all(&out).map_err(|e| format!("write: {e}"))?;
            out.clear();
        }
    }
}

/// Make room for the whole of a large frame whose header is at `off`.
fn grow_for_frame(buf: &mut Vec<u8>, off: usize, filled: usize) {
    let avail = &buf[off..filled];
    if avail.len() >= HEADER_LEN {
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        let need = wire_len(len);
        if need > buf.len() {
            buf.resize(need, 0);
        }
    }
}

/// Received bytes and the frames in them.
struct Rx {
    s: UnixStream,
    buf: Vec<u8>,
    filled: usize,
    dec: FrameDecoder,
}

impl Rx {
    fn new(s: UnixStream) -> Rx {
        Rx {
            s,
            buf: vec![0u8; 64 * 1024],
            filled: 0,
            dec: FrameDecoder::new(MAX),
        }
    }

    /// Hand every whole response in the buffer to `on` (stream id, body),
    /// then read more; false at EOF.
    fn pump(&mut self, on: &mut OnResponse<'_>) -> Result<bool, String> {
        let mut off = 0;
        loop {
            match self
                .dec
                .decode(&self.buf[off..self.filled])
                .map_err(|e| e.to_string())?
            {
                Some((h, total)) => {
                    let p = &self.buf[off + HEADER_LEN..off + HEADER_LEN + h.len as usize];
                    if h.kind != FrameKind::Response {
                        return Err(format!("unexpected {:?} frame", h.kind));
                    }
                    let ml = (h.meta_len as usize).min(p.len());
                    let r = check_response_meta(&p[..ml]).map(|()| &p[ml..]);
                    on(h.stream_id, r);
                    off += total;
                }
                None => {
                    grow_for_frame(&mut self.buf, off, self.filled);
                    break;
                }
            }
        }
        self.buf.copy_within(off..self.filled, 0);
        self.filled -= off;
        if off > 0 {
            return Ok(true);
        }
        if self.filled == self.buf.len() {
            let l = self.buf.len() * 2;
            self.buf.resize(l, 0);
        }
        let n = self
            .s
            .read(&mut self.buf[self.filled..])
            .map_err(|e| format!("read: {e}"))?;
        self.filled += n;
        Ok(n > 0)
    }
}

/// One request at a time.
pub struct UdsConn {
    w: UnixStream,
    rx: Rx,
    out: Vec<u8>,
    meta: Vec<u8>,
    next: u64,
}

impl UdsConn {
    pub fn connect(path: &Path) -> Result<UdsConn, String> {
        let s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        Ok(UdsConn {
            w,
            rx: Rx::new(s),
            out: Vec::with_capacity(64 * 1024),
            meta: request_meta(),
            next: 1,
        })
    }

    pub fn call(&mut self, body: &[u8], resp: &mut Vec<u8>) -> Result<(), String> {
        let id = self.next;
        self.next += 1;
        self.out.clear();
        encode_frame(
            &mut self.out,
            FrameKind::Request,
            id,
            self.meta.len(),
            &[&self.meta, body],
        );
        self.w
            .write_all(&self.out)
            .map_err(|e| format!("write: {e}"))?;
        let mut got: Option<Result<(), String>> = None;
        while got.is_none() {
            let more = self.rx.pump(&mut |sid, r| {
                got = Some(match r {
                    Ok(b) if sid == id => {
                        resp.clear();
                        resp.extend_from_slice(b);
                        Ok(())
                    }
                    Ok(_) => Err(format!("response to stream {sid}, expected {id}")),
                    Err(e) => Err(e),
                });
            })?;
            if !more && got.is_none() {
                return Err("the echo server closed the connection".into());
            }
        }
        got.expect("set above")
    }
}

struct UdsTx {
    w: UnixStream,
    out: Vec<u8>,
    meta: Vec<u8>,
}

impl MuxTx for UdsTx {
    fn send(&mut self, id: u64, body: &[u8]) -> Result<(), String> {
        self.out.clear();
        encode_frame(
            &mut self.out,
            FrameKind::Request,
            id,
            self.meta.len(),
            &[&self.meta, body],
        );
        self.w
            .write_all(&self.out)
            .map_err(|e| format!("write: {e}"))
    }
}

/// Many requests in flight: a reader thread completes them.
pub fn connect_mux(path: &Path) -> Result<MuxConn, String> {
    let s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let w = s.try_clone().map_err(|e| e.to_string())?;
    let shut = s.try_clone().map_err(|e| e.to_string())?;
    let tx = UdsTx {
        w,
        out: Vec::with_capacity(64 * 1024),
        meta: request_meta(),
    };
    MuxConn::start(
        Box::new(tx),
        move |mux: Arc<Mux>| {
            let mut rx = Rx::new(s);
            loop {
                match rx.pump(&mut |sid, r| mux.deliver(sid, r.map(<[u8]>::to_vec))) {
                    Ok(true) => {}
                    Ok(false) => {
                        mux.fail("the echo server closed the connection".into());
                        return;
                    }
                    Err(e) => {
                        mux.fail(e);
                        return;
                    }
                }
            }
        },
        Box::new(move || {
            let _ = shut.shutdown(Shutdown::Both);
        }),
    )
}
