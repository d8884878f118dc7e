//! The control-socket handshake. Every control message is a u32 LE length
//! followed by that many bytes; the first four bytes of the body are a magic
//! that says what it is, the next two the protocol version. A peer that
//! speaks another version is refused by version number, never misread.

use std::io::{self, Read, Write};

use crate::codec::{put_str16, DecodeError, Reader};

/// The session protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest control message accepted.
pub const MAX_CONTROL: usize = 64 * 1024;

const HELLO: &[u8; 4] = b"MSHH";
const WELCOME: &[u8; 4] = b"MSHW";
const REJECT: &[u8; 4] = b"MSHR";

/// What the connecting app will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// makes outbound calls
    Client,
    /// serves the named service (inbound calls)
    Server,
}

/// App → proxy: who I am and what I want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// client or server
    pub role: Role,
    /// the service this app is (client) or serves (server)
    pub service: String,
    /// optional credential for access rules ("" = none)
    pub token: String,
    /// requested app→proxy ring bytes (0: proxy default)
    pub ring_up: u64,
    /// requested proxy→app ring bytes (0: proxy default)
    pub ring_down: u64,
}

/// Proxy → app: accepted. Travels with three fds: segment, app bell, proxy bell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// the proxy's id for this session (for logs)
    pub session_id: u64,
    /// negotiated app→proxy ring bytes
    pub ring_up: u64,
    /// negotiated proxy→app ring bytes
    pub ring_down: u64,
    /// largest message either side accepts
    pub max_message: u64,
}

/// Proxy → app: refused, with a reason a person can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// why
    pub reason: String,
}

fn header(out: &mut Vec<u8>, magic: &[u8; 4]) {
    out.extend_from_slice(magic);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
}

fn check_header(
    r: &mut Reader<'_>,
    magic: &[u8; 4],
    what: &'static str,
) -> Result<(), DecodeError> {
    if r.bytes(4, what)? != magic {
        return Err(DecodeError::BadMagic(what));
    }
    match r.u16(what)? {
        PROTOCOL_VERSION => Ok(()),
        v => Err(DecodeError::Version(v)),
    }
}

impl Hello {
    /// Encode the body (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(32 + self.service.len() + self.token.len());
        header(&mut o, HELLO);
        o.push(match self.role {
            Role::Client => 1,
            Role::Server => 2,
        });
        o.push(0);
        o.extend_from_slice(&self.ring_up.to_le_bytes());
        o.extend_from_slice(&self.ring_down.to_le_bytes());
        put_str16(&mut o, &self.service);
        put_str16(&mut o, &self.token);
        o
    }

    /// Decode a body.
    ///
    /// # Errors
    /// Magic and version are checked first; then every field.
    pub fn decode(b: &[u8]) -> Result<Hello, DecodeError> {
        let mut r = Reader::new(b);
        check_header(&mut r, HELLO, "hello")?;
        let role = match r.u8("role")? {
            1 => Role::Client,
            2 => Role::Server,
            _ => return Err(DecodeError::Invalid("role")),
        };
        if r.u8("flags")? != 0 {
            return Err(DecodeError::Invalid("hello flags"));
        }
        let ring_up = r.u64("ring size")?;
        let ring_down = r.u64("ring size")?;
        let service = r.str16("service")?.to_owned();
        let token = r.str16("token")?.to_owned();
        r.finish()?;
        Ok(Hello {
            role,
            service,
            token,
            ring_up,
            ring_down,
        })
    }
}

/// The proxy's answer to a Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// accepted
    Welcome(Welcome),
    /// refused
    Reject(Reject),
}

impl Welcome {
    /// Encode the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(40);
        header(&mut o, WELCOME);
        o.extend_from_slice(&[0, 0]);
        for v in [
            self.session_id,
            self.ring_up,
            self.ring_down,
            self.max_message,
        ] {
            o.extend_from_slice(&v.to_le_bytes());
        }
        o
    }
}

impl Reject {
    /// Encode the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(8 + self.reason.len());
        header(&mut o, REJECT);
        put_str16(&mut o, &self.reason);
        o
    }
}

impl Answer {
    /// Decode a Welcome or Reject body.
    ///
    /// # Errors
    /// Unknown magic or version, or a malformed field.
    pub fn decode(b: &[u8]) -> Result<Answer, DecodeError> {
        let magic = b.get(..4).ok_or(DecodeError::Truncated("answer"))?;
        let mut r = Reader::new(b);
        if magic == REJECT {
            // A Reject is readable whatever its version: it is how a proxy
            // of another version says why.
            r.bytes(6, "reject")?;
            let reason = r.str16("reason")?.to_owned();
            return Ok(Answer::Reject(Reject { reason }));
        }
        check_header(&mut r, WELCOME, "welcome")?;
        r.bytes(2, "welcome")?;
        let w = Welcome {
            session_id: r.u64("session id")?,
            ring_up: r.u64("ring size")?,
            ring_down: r.u64("ring size")?,
            max_message: r.u64("max message")?,
        };
        r.finish()?;
        Ok(Answer::Welcome(w))
    }
}

/// Write one length-prefixed control message.
///
/// # Errors
/// The writer's error.
pub fn write_control(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)
}

/// Frame a control message body with its length prefix.
pub fn frame_control(body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(body);
    buf
}

/// Read one length-prefixed control message (at most [`MAX_CONTROL`] bytes).
///
/// # Errors
/// I/O errors; `InvalidData` for an oversized length.
pub fn read_control(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_CONTROL {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control message of {n} bytes exceeds {MAX_CONTROL}"),
        ));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Ok(body)
}
