//! Property tests of the ring, the frame codec and the fragment layer, each
//! against a model, and of the proxy's consumer against a hostile producer.

use std::collections::VecDeque;

use meshshm_ring::hostile::{message_bytes, Hostile, Op, MAX_MESSAGE};
use meshshm_ring::{
    heap_ring, write_message, FrameHeader, FrameKind, Reassembler, RingError, WriteProgress,
    FLAG_CONT, FLAG_MORE, HEADER_LEN,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn kind(k: u8) -> FrameKind {
    FrameKind::from_u8(1 + k % 6).expect("1..=6 are kinds")
}

/// One scheduler step: the producer stages up to `n` frames (publishing
/// after each one if `eager`), or the consumer takes up to `n` frames. A
/// random schedule runs first, then the two sides alternate.
#[derive(Debug, Clone, Copy)]
enum Turn {
    Produce { n: u8, eager: bool },
    Consume { n: u8 },
}

fn turns() -> impl Strategy<Value = Vec<Turn>> {
    vec(
        prop_oneof![
            (1u8..8, any::<bool>()).prop_map(|(n, eager)| Turn::Produce { n, eager }),
            (1u8..8).prop_map(|n| Turn::Consume { n }),
        ],
        1..64,
    )
}

proptest! {
    /// Single frames of random sizes, pushed and consumed in random
    /// batches, come out exactly as a queue would hand them back, across
    /// many wrap-arounds (pad frames and end-of-ring gaps included).
    #[test]
    fn frames_match_a_queue(
        cap_shift in 0u32..3,
        sizes in vec(0usize..3000, 1..120),
        schedule in turns(),
    ) {
        let cap = 4096usize << cap_shift;
        let (mut tx, mut rx) = heap_ring(cap);
        let sizes: Vec<usize> = sizes.into_iter().map(|s| s % (tx.max_payload() + 1)).collect();
        let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        let (mut sent, mut got) = (0usize, 0usize);
        let mut turn = schedule.iter().copied().chain(
            [Turn::Produce { n: 8, eager: false }, Turn::Consume { n: 8 }].into_iter().cycle(),
        );
        let mut idle = 0;
        while got < sizes.len() {
            let before = (sent, got);
            match turn.next().expect("cycle") {
                Turn::Produce { n, eager } => {
                    for _ in 0..n {
                        let Some(&len) = sizes.get(sent) else { break };
                        let body = message_bytes(sent as u64, len);
                        let h = FrameHeader::single(kind(sent as u8), sent as u64, 0, len as u32);
                        match tx.try_push(h, &[&body]) {
                            Ok(()) => {
                                model.push_back((sent as u64, body));
                                sent += 1;
                            }
                            Err(RingError::Full) => break,
                            Err(e) => panic!("push: {e}"),
                        }
                        if eager {
                            tx.publish();
                        }
                    }
                    tx.publish();
                }
                Turn::Consume { n } => {
                    for _ in 0..n {
                        let Some(f) = rx.peek().expect("honest producer") else { break };
                        let (sid, body) = model.pop_front().expect("frame the model lacks");
                        prop_assert_eq!(f.header().stream_id, sid);
                        prop_assert_eq!(f.header().kind, kind(sid as u8));
                        prop_assert_eq!(f.payload(), &body[..]);
                        f.release();
                        got += 1;
                    }
                    rx.publish();
                }
            }
            idle = if (sent, got) == before { idle + 1 } else { 0 };
            prop_assert!(idle < schedule.len() + 4, "no progress: sent {sent} got {got}");
        }
        prop_assert!(model.is_empty());
        prop_assert!(rx.peek().expect("honest").is_none());
    }

    /// Messages of random sizes (up to several times the ring), given as
    /// several parts split at random points, go through `write_message`
    /// and `Reassembler` and come out byte for byte, in order.
    #[test]
    fn messages_round_trip(
        cap_shift in 0u32..3,
        msgs in vec((0usize..40_000, 0usize..200, vec(any::<prop::sample::Index>(), 0..4)), 1..16),
        schedule in turns(),
    ) {
        let cap = 4096usize << cap_shift;
        let (mut tx, mut rx) = heap_ring(cap);
        let mut re = Reassembler::new(MAX_MESSAGE as usize);
        // (stream, meta_len, bytes, split points)
        let msgs: Vec<(u64, usize, Vec<u8>, Vec<usize>)> = msgs
            .into_iter()
            .enumerate()
            .map(|(i, (len, meta, cuts))| {
                let data = message_bytes(i as u64 + 1, len);
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
                cuts.sort_unstable();
                (i as u64, meta.min(len), data, cuts)
            })
            .collect();
        let mut model: VecDeque<usize> = VecDeque::new();
        let (mut sent, mut got, mut frames) = (0usize, 0usize, 0usize);
        let mut prog = WriteProgress { sent: 0 };
        let mut turn = schedule.iter().copied().chain(
            [Turn::Produce { n: 8, eager: false }, Turn::Consume { n: 8 }].into_iter().cycle(),
        );
        let mut idle = 0;
        while got < msgs.len() {
            let before = (sent, got, prog.sent, frames);
            match turn.next().expect("cycle") {
                Turn::Produce { n, .. } => {
                    for _ in 0..n {
                        let Some((sid, meta, data, cuts)) = msgs.get(sent) else { break };
                        let mut parts: Vec<&[u8]> = Vec::new();
                        let mut at = 0;
                        for &c in cuts.iter().chain(std::iter::once(&data.len())) {
                            parts.push(&data[at..c]);
                            at = c;
                        }
                        let done = write_message(
                            &mut tx, FrameKind::Request, *sid, *meta, &parts, &mut prog,
                        ).expect("write_message");
                        tx.publish();
                        if !done {
                            break;
                        }
                        model.push_back(sent);
                        sent += 1;
                        prog = WriteProgress { sent: 0 };
                    }
                }
                Turn::Consume { n } => {
                    for _ in 0..(n as usize * 4) {
                        let Some(f) = rx.peek().expect("honest producer") else { break };
                        frames += 1;
                        let h = *f.header();
                        // One frame for a message that fits the ring,
                        // else fragments of at most half of it.
                        if h.flags == 0 {
                            prop_assert!(h.len as usize <= cap - HEADER_LEN);
                        } else {
                            prop_assert!(h.len as usize <= rx_max(cap));
                        }
                        if let Some(m) = re.feed(&h, f.payload()).expect("honest fragments") {
                            let i = model.pop_front().expect("message the model lacks");
                            let (sid, meta, data, _) = &msgs[i];
                            prop_assert_eq!(m.stream_id, *sid);
                            prop_assert_eq!(m.meta().len(), *meta);
                            prop_assert!(m.to_vec() == data[..], "message {} differs", i);
                            got += 1;
                        }
                        f.release();
                    }
                    rx.publish();
                }
            }
            idle = if (sent, got, prog.sent, frames) == before { idle + 1 } else { 0 };
            prop_assert!(idle < schedule.len() + 4, "no progress");
        }
        prop_assert!(model.is_empty());
        prop_assert!(!re.in_progress());
    }

    /// Every header encodes and decodes to itself if valid; any 24 bytes
    /// decode without panicking, and what decodes re-encodes to the same bytes.
    #[test]
    fn header_codec(raw in any::<[u8; HEADER_LEN]>(), len in any::<u32>(), k in 0u8..7,
                    flags in 0u8..4, meta in any::<u32>(), msg in any::<u32>(), sid in any::<u64>()) {
        if let Ok(h) = FrameHeader::decode(&raw) {
            prop_assert_eq!(h.encode(), raw);
        }
        let h = FrameHeader {
            len, kind: FrameKind::from_u8(k).expect("0..7"), flags, meta_len: meta, msg_len: msg, stream_id: sid,
        };
        if let Ok(d) = FrameHeader::decode(&h.encode()) {
            prop_assert_eq!(d, h);
        }
        let single = FrameHeader::single(kind(k), sid, meta.min(len), len);
        prop_assert_eq!(FrameHeader::decode(&single.encode()), Ok(single));
        let first = FrameHeader { flags: FLAG_MORE, msg_len: len.saturating_add(1), ..single };
        prop_assert_eq!(FrameHeader::decode(&first.encode()), Ok(first));
        let cont = FrameHeader { flags: FLAG_CONT, meta_len: 0, msg_len: 0, ..single };
        prop_assert_eq!(FrameHeader::decode(&cont.encode()), Ok(cont));
    }
}

/// Largest fragment of a message that does not fit one frame.
fn rx_max(cap: usize) -> usize {
    cap / 2 - HEADER_LEN
}

/// Hostile steps, biased to reach deep: well-formed headers with lying
/// lengths, tails near the plausible range, honest traffic in between.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..20_000, 0u32..64, 0u64..4, any::<u64>())
            .prop_map(|(len, meta_len, stream, seed)| Op::Send { len, meta_len, stream, seed }),
        2 => (any::<u32>(), vec(any::<u8>(), 0..64)).prop_map(|(at, bytes)| Op::Poke { at, bytes }),
        1 => any::<[u8; HEADER_LEN]>().prop_map(|raw| Op::Header { raw }),
        3 => (0u32..5000, 0u8..7, 0u8..4, 0u32..64, prop_oneof![Just(None), (0u32..300_000).prop_map(Some)], 0u64..3)
            .prop_map(|(len, k, flags, meta, msg, sid)| {
                let msg_len = if flags & FLAG_CONT != 0 { 0 } else { msg.unwrap_or(len) };
                Op::header(&FrameHeader {
                    len,
                    kind: FrameKind::from_u8(k).expect("0..7"),
                    flags,
                    meta_len: if flags & FLAG_CONT != 0 { 0 } else { meta.min(msg_len) },
                    msg_len,
                    stream_id: sid,
                })
            }),
        3 => (-64i64..64).prop_map(|delta| Op::Tail { delta }),
        1 => (-64i64..20_000).prop_map(|delta| Op::Tail { delta }),
        1 => any::<u64>().prop_map(Op::SetTail),
        1 => (-64i64..5000).prop_map(|delta| Op::PeerHead { delta }),
        1 => (0u32..10_000).prop_map(|len| Op::ProxySend { len }),
        1 => Just(Op::Drain),
    ]
}

proptest! {
    /// Any sequence of honest and hostile steps: the proxy never panics,
    /// never loops, never reads outside its ring, and stays poisoned once
    /// it refused (all checked inside the harness); honest-only runs
    /// deliver everything.
    #[test]
    fn hostile_producer_steps(cap_shift in 0u32..2, ops in vec(op(), 0..48)) {
        let out = Hostile::run(4096 << cap_shift, &ops);
        if !out.tampered {
            prop_assert_eq!(out.error, None);
        }
    }

    /// The fuzz target's input format, on random bytes.
    #[test]
    fn hostile_producer_bytes(input in vec(any::<u8>(), 0..2048)) {
        Hostile::run_bytes(&input);
    }

    /// Random bytes in the data area behind a plausible tail: refused with
    /// an error (or read as frames, if they happen to be well formed), never
    /// out of bounds.
    #[test]
    fn random_data_area(bytes in vec(any::<u8>(), 0..4096), at in 0u32..4096, tail in 0u64..=4096) {
        let out = Hostile::run(4096, &[
            Op::Poke { at: 4096 + at, bytes },
            Op::SetTail(tail),
        ]);
        prop_assert!(out.error.is_some() || out.frames > 0 || tail == 0);
    }

    /// A tail that jumps backwards or past what the ring can hold poisons
    /// the ring with `CounterOutOfRange`.
    #[test]
    fn jumping_tail_poisons(first in 1u32..2000, jump in prop_oneof![8193u64..=u64::MAX, Just(u64::MAX)], back in any::<bool>()) {
        let mut ops = vec![Op::Send { len: first, meta_len: 0, stream: 1, seed: 1 }];
        ops.push(if back { Op::SetTail(0) } else { Op::SetTail(jump) });
        // The tail moved backwards (below what the consumer has seen) or
        // past head + capacity.
        let out = Hostile::run(4096, &ops);
        let is_range = matches!(out.error, Some(RingError::CounterOutOfRange { .. }));
        prop_assert!(is_range, "{:?}", out);
        prop_assert_eq!(out.messages, 1);
    }
}

/// A honest run through the harness delivers everything in both directions.
#[test]
fn harness_honest_run() {
    let ops: Vec<Op> = (0..40)
        .flat_map(|i| {
            [
                Op::Send {
                    len: i * 997,
                    meta_len: i,
                    stream: i as u64,
                    seed: i as u64,
                },
                Op::ProxySend { len: i * 331 },
            ]
        })
        .collect();
    let out = Hostile::run(4096, &ops);
    assert_eq!(out.messages, 40);
    assert_eq!(out.app_messages, 40);
    assert_eq!(out.error, None);
    assert!(!out.tampered);
}

/// The proxy's producer refuses a forged head of the app (past its tail)
/// instead of overwriting unread data.
#[test]
fn forged_head_poisons_proxy_producer() {
    let out = Hostile::run(
        4096,
        &[
            Op::ProxySend { len: 100 },
            Op::PeerHead { delta: 4096 },
            // Needs more room than the producer's cached head allows: it
            // re-reads the head and finds it past its own tail.
            Op::ProxySend { len: 4000 },
        ],
    );
    assert_eq!(out.app_messages, 1);
    assert!(
        matches!(
            out.proxy_tx_error,
            Some(RingError::CounterOutOfRange { read: 4224, .. })
        ),
        "{out:?}"
    );
}
