//! The fuzz targets' entry points (`meshshm_proto::fuzz`) on valid
//! encodings and many deterministic mutations of them, so that every test
//! run exercises the decoders the way the fuzzer does (briefly). The real
//! fuzzing: `shm-ring/proto/fuzz/run.sh SECONDS`.

use meshshm_proto::fuzz;
use meshshm_proto::{
    encode_frame, frame_control, Hello, Reject, RequestMeta, ResponseMeta, Role, Welcome,
};
use meshshm_ring::{FrameHeader, FrameKind, FLAG_CONT, FLAG_MORE};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A mutation of `seed`: flipped, overwritten, dropped, inserted or
/// truncated bytes, or a length field set to something extreme.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        let last = at.min(b.len().saturating_sub(1));
        let (bit, byte) = (1u8 << rng.below(8), rng.next() as u8);
        match rng.below(6) {
            0 if !b.is_empty() => b[last] ^= bit,
            1 if !b.is_empty() => b[last] = byte,
            2 if !b.is_empty() => {
                b.remove(last);
            }
            3 => b.insert(at, byte),
            4 => b.truncate(at),
            _ if b.len() >= 4 => {
                let at = at.min(b.len() - 4);
                let v = [0u32, 1, 0xff, 0xffff, 0x1_0000, u32::MAX][rng.below(6)];
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
    b
}

fn run(seeds: &[Vec<u8>], target: fn(&[u8]), rounds: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for s in seeds {
        target(s);
    }
    for i in 0..rounds {
        let m = mutate(&mut rng, &seeds[i % seeds.len()]);
        target(&m);
    }
}

fn request_meta(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut m = Vec::new();
    RequestMeta::encode(&mut m, "greeter", "Hello", 250, 2, headers);
    m
}

fn response_meta() -> Vec<u8> {
    let mut m = Vec::new();
    ResponseMeta::encode(&mut m, 14, "unavailable", &[("retry", b"1")]);
    m
}

#[test]
fn handshake_decoders_survive_mutations() {
    let hello = Hello {
        role: Role::Server,
        service: "greeter".into(),
        token: "t0k3n".into(),
        ring_up: 1 << 20,
        ring_down: 0,
    }
    .encode();
    let welcome = Welcome {
        session_id: 9,
        ring_up: 4096,
        ring_down: 8192,
        max_message: 1 << 26,
    }
    .encode();
    let reject = Reject {
        reason: "no".into(),
    }
    .encode();
    let framed = frame_control(&hello);
    run(&[hello, welcome, reject, framed], fuzz::handshake, 20_000);
}

#[test]
fn metadata_decoders_survive_mutations() {
    let seeds = vec![
        request_meta(&[]),
        request_meta(&[("tenant", b"blue"), ("x-trace", b"0123456789")]),
        response_meta(),
        ResponseMeta::OK.to_vec(),
    ];
    run(&seeds, fuzz::metadata, 20_000);
}

#[test]
fn stream_decoder_survives_mutations() {
    let mut one = vec![3u8]; // 512-byte limit
    let meta = request_meta(&[("k", b"v")]);
    encode_frame(
        &mut one,
        FrameKind::Request,
        1,
        meta.len(),
        &[&meta, b"body"],
    );
    encode_frame(
        &mut one,
        FrameKind::Response,
        1,
        8,
        &[&ResponseMeta::OK, b"ok"],
    );
    encode_frame(&mut one, FrameKind::Cancel, 2, 0, &[]);
    // A message in three fragments.
    let mut frag = vec![3u8];
    let body = [7u8; 40];
    for (i, chunk) in body.chunks(16).enumerate() {
        let h = FrameHeader {
            len: chunk.len() as u32,
            kind: FrameKind::Request,
            flags: if i < 2 { FLAG_MORE } else { 0 } | if i > 0 { FLAG_CONT } else { 0 },
            meta_len: 0,
            msg_len: if i == 0 { 40 } else { 0 },
            stream_id: 5,
        };
        frag.extend_from_slice(&h.encode());
        frag.extend_from_slice(chunk);
        let pad = (8 - (frag.len() - 1) % 8) % 8;
        frag.resize(frag.len() + pad, 0);
    }
    run(&[one, frag], fuzz::stream, 20_000);
}
