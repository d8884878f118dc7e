//! Frame header codec: encode and decode (with its checks) of the 24-byte
//! header. Run: `cargo bench -p meshshm-bench --bench frame`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshshm_ring::{FrameHeader, FrameKind, FLAG_MORE};

fn frame(c: &mut Criterion) {
    let h = FrameHeader {
        len: 1000,
        kind: FrameKind::Request,
        flags: FLAG_MORE,
        meta_len: 40,
        msg_len: 70_000,
        stream_id: 0x0123_4567_89ab_cdef,
    };
    let bytes = h.encode();
    let mut g = c.benchmark_group("frame_header");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| b.iter(|| black_box(black_box(&h).encode())));
    g.bench_function("decode", |b| {
        b.iter(|| black_box(FrameHeader::decode(black_box(&bytes))).expect("valid"))
    });
    let mut bad = bytes;
    bad[4] = 200;
    g.bench_function("decode_reject", |b| {
        b.iter(|| black_box(FrameHeader::decode(black_box(&bad))).expect_err("invalid"))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = frame
}
criterion_main!(benches);
