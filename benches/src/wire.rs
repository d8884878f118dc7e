//! What every transport sends and checks: the same request (the shim's
//! metadata for `echo`/`Echo`, then the body) and the same response (OK
//! metadata, then the body echoed back), so no transport does less work.

use meshshm_proto::{status, RequestMeta, ResponseMeta};

/// The service and method every request calls (the proxy's built-in echo).
pub const SERVICE: &str = "echo";
pub const METHOD: &str = "Echo";

/// The request metadata bytes the client shim sends for a call to
/// `echo`/`Echo` with no timeout, normal priority and no headers.
pub fn request_meta() -> Vec<u8> {
    let mut m = Vec::with_capacity(32);
    RequestMeta::encode(&mut m, SERVICE, METHOD, 0, 1, &[]);
    m
}

/// Decode response metadata the way the shim does and require OK.
pub fn check_response_meta(meta: &[u8]) -> Result<(), String> {
    let m = ResponseMeta::decode(meta).map_err(|e| format!("response metadata: {e}"))?;
    if m.status != status::OK {
        return Err(format!(
            "status {} ({}): {}",
            m.status,
            status::name(m.status),
            m.message
        ));
    }
    Ok(())
}

/// A request body: a fixed pattern, with a per-request sequence number
/// stamped at both ends so a stale or mixed-up response cannot pass.
pub struct Body {
    buf: Vec<u8>,
    seq: u64,
}

impl Body {
    pub fn new(size: usize, seed: u64) -> Body {
        let buf = (0..size)
            .map(|i| (i as u64).wrapping_mul(131).wrapping_add(seed * 7 + 1) as u8)
            .collect();
        Body {
            buf,
            seq: seed << 40,
        }
    }

    /// The next request's bytes.
    pub fn next(&mut self) -> &[u8] {
        self.seq += 1;
        let s = self.seq.to_le_bytes();
        let n = self.buf.len();
        let k = n.min(8);
        self.buf[..k].copy_from_slice(&s[..k]);
        if n >= 16 {
            self.buf[n - 8..].copy_from_slice(&s);
        }
        &self.buf
    }

    /// The bytes [`Body::next`] returned last.
    pub fn current(&self) -> &[u8] {
        &self.buf
    }
}

/// Where a connection hands each response: its stream id, and its body
/// (or why it is not a good response).
pub type OnResponse<'a> = dyn FnMut(u64, Result<&[u8], String>) + 'a;

/// The response body must be the request body, byte for byte.
pub fn check_echo(got: &[u8], sent: &[u8]) -> Result<(), String> {
    if got.len() != sent.len() {
        return Err(format!(
            "echo of {} bytes came back as {} bytes",
            sent.len(),
            got.len()
        ));
    }
    if got != sent {
        let at = got.iter().zip(sent).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!("echo differs from the request at byte {at}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_change_per_request() {
        let mut b = Body::new(64, 3);
        let a = b.next().to_vec();
        let c = b.next().to_vec();
        assert_ne!(a, c);
        assert!(check_echo(&c, b.current()).is_ok());
        assert!(check_echo(&a, b.current()).is_err());
        let mut tiny = Body::new(3, 0);
        assert_eq!(tiny.next().len(), 3);
        assert!(check_response_meta(&ResponseMeta::OK).is_ok());
    }
}
