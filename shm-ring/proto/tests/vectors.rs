//! The byte-level test vectors of docs/PROTOCOL.md: each ```hex NAME block
//! there must be exactly what the code encodes for NAME, and must decode
//! back to the same value.

use meshshm_proto::{
    encode_frame, Answer, Hello, Reject, RequestMeta, ResponseMeta, Role, Welcome,
};
use meshshm_ring::{FrameHeader, FrameKind, FLAG_CONT, FLAG_MORE};

fn doc_vectors() -> Vec<(String, Vec<u8>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    let text = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
    let mut out = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some((name, hex)) = &mut cur {
            if line.starts_with("```") {
                let clean: String = hex.chars().filter(|c| c.is_ascii_hexdigit()).collect();
                let bytes = (0..clean.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&clean[i..i + 2], 16).unwrap())
                    .collect();
                out.push((std::mem::take(name), bytes));
                cur = None;
            } else {
                let data = line.split('#').next().unwrap_or("");
                hex.push_str(data);
                hex.push(' ');
            }
        } else if let Some(name) = line.strip_prefix("```hex ") {
            cur = Some((name.trim().to_owned(), String::new()));
        }
    }
    out
}

fn expected(name: &str) -> Vec<u8> {
    match name {
        "frame-header" => FrameHeader::single(FrameKind::Request, 7, 5, 9)
            .encode()
            .to_vec(),
        "frame-fragment" => FrameHeader {
            len: 16,
            kind: FrameKind::Response,
            flags: FLAG_MORE | FLAG_CONT,
            meta_len: 0,
            msg_len: 0,
            stream_id: 3,
        }
        .encode()
        .to_vec(),
        "hello" => Hello {
            role: Role::Client,
            service: "shop".into(),
            token: "".into(),
            ring_up: 0,
            ring_down: 1 << 20,
        }
        .encode(),
        "welcome" => Welcome {
            session_id: 1,
            ring_up: 2 << 20,
            ring_down: 2 << 20,
            max_message: 64 << 20,
        }
        .encode(),
        "reject" => Reject {
            reason: "nope".into(),
        }
        .encode(),
        "request-meta" => {
            let mut v = Vec::new();
            RequestMeta::encode(&mut v, "echo", "Echo", 1000, 1, &[("tenant", b"blue")]);
            v
        }
        "response-meta-ok" => ResponseMeta::OK.to_vec(),
        "response-meta-error" => {
            let mut v = Vec::new();
            ResponseMeta::encode(&mut v, 5, "no route", &[]);
            v
        }
        "tcp-response-frame" => {
            let mut v = Vec::new();
            encode_frame(
                &mut v,
                FrameKind::Response,
                1,
                8,
                &[&ResponseMeta::OK, b"hi"],
            );
            v
        }
        other => panic!("docs/PROTOCOL.md has a vector {other:?} that no test knows"),
    }
}

#[test]
fn documented_vectors_match_the_code() {
    let v = doc_vectors();
    assert!(
        v.len() >= 9,
        "expected the vectors in docs/PROTOCOL.md, found {}",
        v.len()
    );
    for (name, bytes) in &v {
        let want = expected(name);
        assert_eq!(
            bytes, &want,
            "vector {name}: doc has {bytes:02x?}, code encodes {want:02x?}"
        );
    }
}

#[test]
fn documented_vectors_decode() {
    for (name, bytes) in doc_vectors() {
        match name.as_str() {
            "frame-header" | "frame-fragment" => {
                let a: [u8; 24] = bytes.as_slice().try_into().unwrap();
                assert_eq!(FrameHeader::decode(&a).unwrap().encode(), a);
            }
            "hello" => assert_eq!(Hello::decode(&bytes).unwrap().encode(), bytes),
            "welcome" | "reject" => {
                let a = Answer::decode(&bytes).unwrap();
                let re = match a {
                    Answer::Welcome(w) => w.encode(),
                    Answer::Reject(r) => r.encode(),
                };
                assert_eq!(re, bytes);
            }
            "request-meta" => {
                let m = RequestMeta::decode(&bytes).unwrap();
                assert_eq!(
                    (m.service, m.method, m.timeout_ms, m.priority),
                    ("echo", "Echo", 1000, 1)
                );
                assert_eq!(m.headers.get("tenant"), Some(&b"blue"[..]));
            }
            "response-meta-ok" | "response-meta-error" => {
                ResponseMeta::decode(&bytes).unwrap();
            }
            _ => {}
        }
    }
}

#[test]
fn wrong_versions_and_magic_are_refused_not_misread() {
    let mut h = expected("hello");
    h[4] = 2; // version 2
    assert_eq!(
        Hello::decode(&h).unwrap_err(),
        meshshm_proto::DecodeError::Version(2)
    );
    let mut h = expected("hello");
    h[0] = b'X';
    assert!(matches!(
        Hello::decode(&h),
        Err(meshshm_proto::DecodeError::BadMagic(_))
    ));
    let mut w = expected("welcome");
    w[4] = 9;
    assert!(Answer::decode(&w).is_err());
    // Truncation at every length is an error, never a panic.
    let full = expected("request-meta");
    for n in 0..full.len() {
        assert!(RequestMeta::decode(&full[..n]).is_err());
    }
    let full = expected("hello");
    for n in 0..full.len() {
        assert!(Hello::decode(&full[..n]).is_err());
    }
}

#[test]
fn print_vectors() {
    // `cargo test -p meshshm-proto --test vectors print_vectors -- --nocapture`
    for n in [
        "frame-header",
        "frame-fragment",
        "hello",
        "welcome",
        "reject",
        "request-meta",
        "response-meta-ok",
        "response-meta-error",
        "tcp-response-frame",
    ] {
        let v = expected(n);
        let hex: Vec<String> = v.iter().map(|b| format!("{b:02x}")).collect();
        println!("{n}: {}", hex.join(" "));
    }
}
