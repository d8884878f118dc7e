//! Request and response metadata: the bytes at the start of a Request or
//! Response message (`FrameHeader::meta_len` of them), before the body.
//!
//! Decoding borrows from the input: no allocation per request.

use crate::codec::{put_bytes32, put_str16, DecodeError, Reader};

/// Status codes of a response (the gRPC numbering, which mesh users know).
pub mod status {
    /// success
    pub const OK: u32 = 0;
    /// the caller cancelled
    pub const CANCELLED: u32 = 1;
    /// the upstream failed in an unclassified way
    pub const UNKNOWN: u32 = 2;
    /// the request was malformed
    pub const INVALID_ARGUMENT: u32 = 3;
    /// the deadline passed
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// no route for this service
    pub const NOT_FOUND: u32 = 5;
    /// access rules refused the call
    pub const PERMISSION_DENIED: u32 = 7;
    /// shed by overload protection, or a limit was hit
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// a bug or broken invariant
    pub const INTERNAL: u32 = 13;
    /// the upstream cannot be reached now (retryable)
    pub const UNAVAILABLE: u32 = 14;

    /// A name for logs and errors.
    pub fn name(code: u32) -> &'static str {
        match code {
            OK => "ok",
            CANCELLED => "cancelled",
            UNKNOWN => "unknown",
            INVALID_ARGUMENT => "invalid argument",
            DEADLINE_EXCEEDED => "deadline exceeded",
            NOT_FOUND => "not found",
            PERMISSION_DENIED => "permission denied",
            RESOURCE_EXHAUSTED => "resource exhausted",
            INTERNAL => "internal",
            UNAVAILABLE => "unavailable",
            _ => "unrecognised status",
        }
    }
}

const META_FORMAT: u8 = 1;

/// Headers as they lie in the encoded metadata; iterate to read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderIter<'a> {
    raw: &'a [u8],
    count: u16,
}

impl<'a> HeaderIter<'a> {
    /// Number of headers.
    pub fn len(&self) -> usize {
        self.count as usize
    }
    /// No headers.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Owned copies of all headers.
    pub fn to_vec(&self) -> Vec<(String, Vec<u8>)> {
        self.into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_vec()))
            .collect()
    }
    /// The first header named `key` (case-sensitive).
    pub fn get(&self, key: &str) -> Option<&'a [u8]> {
        self.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
    fn parse(r: &mut Reader<'a>, count: u16) -> Result<Self, DecodeError> {
        let start = r.rest();
        for _ in 0..count {
            r.str16("header name")?;
            r.bytes32("header value")?;
        }
        let used = start.len() - r.rest().len();
        Ok(HeaderIter {
            raw: &start[..used],
            count,
        })
    }
}

impl<'a> IntoIterator for HeaderIter<'a> {
    type Item = (&'a str, &'a [u8]);
    type IntoIter = std::iter::FromFn<Box<dyn FnMut() -> Option<(&'a str, &'a [u8])> + 'a>>;
    fn into_iter(self) -> Self::IntoIter {
        let mut r = Reader::new(self.raw);
        let mut left = self.count;
        std::iter::from_fn(Box::new(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            // Validated in parse(), so these cannot fail.
            Some((r.str16("").ok()?, r.bytes32("").ok()?))
        }))
    }
}

fn put_headers(out: &mut Vec<u8>, headers: &[(&str, &[u8])]) {
    for (k, v) in headers {
        put_str16(out, k);
        put_bytes32(out, v);
    }
}

/// Request metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestMeta<'a> {
    /// destination service
    pub service: &'a str,
    /// method of the service
    pub method: &'a str,
    /// time the caller still allows, in ms when sent (0 = none)
    pub timeout_ms: u32,
    /// 0 = low (shed first), 1 = normal, 2+ = high
    pub priority: u8,
    /// request headers
    pub headers: HeaderIter<'a>,
}

impl<'a> RequestMeta<'a> {
    /// Append the encoding to `out`.
    ///
    /// ```text
    /// u8 format (1) | u8 priority | u16 header count | u32 timeout_ms
    /// str16 service | str16 method | (str16 name, bytes32 value) * count
    /// ```
    pub fn encode(
        out: &mut Vec<u8>,
        service: &str,
        method: &str,
        timeout_ms: u32,
        priority: u8,
        headers: &[(&str, &[u8])],
    ) {
        out.push(META_FORMAT);
        out.push(priority);
        out.extend_from_slice(&(headers.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend_from_slice(&timeout_ms.to_le_bytes());
        put_str16(out, service);
        put_str16(out, method);
        put_headers(out, &headers[..headers.len().min(u16::MAX as usize)]);
    }

    /// Decode, borrowing from `b`.
    ///
    /// # Errors
    /// Any malformed field or trailing bytes.
    pub fn decode(b: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        if r.u8("request meta")? != META_FORMAT {
            return Err(DecodeError::Invalid("request meta format"));
        }
        let priority = r.u8("priority")?;
        let count = r.u16("header count")?;
        let timeout_ms = r.u32("timeout")?;
        let service = r.str16("service")?;
        let method = r.str16("method")?;
        let headers = HeaderIter::parse(&mut r, count)?;
        r.finish()?;
        Ok(RequestMeta {
            service,
            method,
            timeout_ms,
            priority,
            headers,
        })
    }
}

/// Response metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseMeta<'a> {
    /// [`status`] code
    pub status: u32,
    /// human-readable error message ("" on success)
    pub message: &'a str,
    /// response headers
    pub headers: HeaderIter<'a>,
}

impl<'a> ResponseMeta<'a> {
    /// Append the encoding to `out`.
    ///
    /// ```text
    /// u32 status | u16 header count | str16 message | (str16 name, bytes32 value) * count
    /// ```
    pub fn encode(out: &mut Vec<u8>, status: u32, message: &str, headers: &[(&str, &[u8])]) {
        out.extend_from_slice(&status.to_le_bytes());
        out.extend_from_slice(&(headers.len().min(u16::MAX as usize) as u16).to_le_bytes());
        put_str16(out, message);
        put_headers(out, &headers[..headers.len().min(u16::MAX as usize)]);
    }

    /// Bytes of the encoding of a plain OK response (no headers): `[0,0,0,0, 0,0, 0,0]`.
    pub const OK: [u8; 8] = [0; 8];

    /// Decode, borrowing from `b`.
    ///
    /// # Errors
    /// Any malformed field or trailing bytes.
    pub fn decode(b: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let status = r.u32("status")?;
        let count = r.u16("header count")?;
        let message = r.str16("message")?;
        let headers = HeaderIter::parse(&mut r, count)?;
        r.finish()?;
        Ok(ResponseMeta {
            status,
            message,
            headers,
        })
    }
}
