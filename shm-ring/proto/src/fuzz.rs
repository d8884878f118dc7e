//! Entry points for the fuzz targets in `fuzz/` (and their smoke test,
//! `tests/fuzz_smoke.rs`), each with the properties it checks. Built with
//! the `fuzzing` feature only; not for production use.
//!
//! Each function takes any bytes. It panics only when a property breaks:
//! a decoder panicked, looped, handed out something out of bounds, or a
//! value that decoded does not survive an encode/decode round trip.

use std::io::Cursor;

use meshshm_ring::{FrameKind, Reassembler, HEADER_LEN};

use crate::{encode_frame, read_control, Answer, FrameDecoder, Hello, RequestMeta, ResponseMeta};

/// The control-socket handshake as both sides read it: a length-prefixed
/// control message, a Hello (the proxy), an Answer (the app).
pub fn handshake(data: &[u8]) {
    let _ = read_control(&mut Cursor::new(data));
    if let Ok(h) = Hello::decode(data) {
        // A Hello has exactly one encoding.
        assert_eq!(h.encode(), data, "Hello re-encodes differently");
        assert_eq!(Hello::decode(&h.encode()).as_ref(), Ok(&h));
    }
    match Answer::decode(data) {
        Ok(Answer::Welcome(w)) => {
            assert_eq!(Answer::decode(&w.encode()), Ok(Answer::Welcome(w)));
        }
        Ok(Answer::Reject(r)) => {
            let again = Answer::decode(&r.encode());
            assert_eq!(again, Ok(Answer::Reject(r)));
        }
        Err(_) => {}
    }
}

/// Request and response metadata, as the proxy and the shim parse them.
pub fn metadata(data: &[u8]) {
    if let Ok(m) = RequestMeta::decode(data) {
        let headers: Vec<(&str, &[u8])> = m.headers.into_iter().collect();
        assert_eq!(headers.len(), m.headers.len());
        for (k, v) in &headers {
            assert!(data.len() >= k.len() + v.len());
        }
        let _ = m.headers.get("tenant");
        let mut out = Vec::new();
        RequestMeta::encode(
            &mut out,
            m.service,
            m.method,
            m.timeout_ms,
            m.priority,
            &headers,
        );
        assert_eq!(out, data, "RequestMeta re-encodes differently");
    }
    if let Ok(m) = ResponseMeta::decode(data) {
        let headers: Vec<(&str, &[u8])> = m.headers.into_iter().collect();
        assert_eq!(headers.len(), m.headers.len());
        let mut out = Vec::new();
        ResponseMeta::encode(&mut out, m.status, m.message, &headers);
        assert_eq!(out, data, "ResponseMeta re-encodes differently");
    }
}

/// A byte stream of frames (the TCP transport), read the way the proxy's
/// TCP sessions and the shim read it: find frames, reassemble messages,
/// parse their metadata. The first byte picks the size limit (64 B to
/// 8 KiB) so that limits are hit often.
pub fn stream(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let max = 64usize << (sel % 8);
    let dec = FrameDecoder::new(max);
    let mut re = Reassembler::new(max);
    let mut off = 0;
    let mut frames = 0;
    while let Ok(Some((h, total))) = dec.decode(&rest[off..]) {
        frames += 1;
        assert!(frames <= rest.len() / HEADER_LEN, "the decoder loops");
        assert!(
            total >= HEADER_LEN && total % 8 == 0,
            "frame length {total}"
        );
        assert!(off + total <= rest.len(), "frame past the input");
        assert!(h.len as usize <= max, "frame over the limit");
        assert!(HEADER_LEN + h.len as usize <= total);
        let frame = &rest[off..off + total];
        let payload = &frame[HEADER_LEN..HEADER_LEN + h.len as usize];
        // A single frame re-encodes to the same header and payload.
        if h.flags == 0 {
            let mut again = Vec::new();
            encode_frame(
                &mut again,
                h.kind,
                h.stream_id,
                h.meta_len as usize,
                &[payload],
            );
            assert_eq!(again.len(), total);
            assert_eq!(
                again[..HEADER_LEN + payload.len()],
                frame[..HEADER_LEN + payload.len()]
            );
        }
        match re.feed(&h, payload) {
            Ok(Some(m)) => {
                assert!(m.len() <= max, "message over the limit");
                assert_eq!(m.meta().len() + m.body().len(), m.len());
                match m.kind {
                    FrameKind::Request => metadata_request(m.meta()),
                    FrameKind::Response => {
                        let _ = ResponseMeta::decode(m.meta());
                    }
                    _ => {}
                }
            }
            Ok(None) => {}
            Err(_) => break,
        }
        off += total;
    }
}

fn metadata_request(b: &[u8]) {
    if let Ok(m) = RequestMeta::decode(b) {
        assert!(m.service.len() + m.method.len() <= b.len());
    }
}
