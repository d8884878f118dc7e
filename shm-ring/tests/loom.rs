//! loom models of the ring protocol and the doorbell.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 \
//!     cargo test -p meshshm-ring --test loom --release
//! ```
//!
//! Under `--cfg loom` the crate's atomics come from loom (`src/sync.rs`), so
//! loom explores the interleavings and the weak-memory outcomes of every
//! counter, flag and fence the crate touches.
//!
//! What loom cannot see: the ring's data area is plain memory reached through
//! raw pointers, which loom does not track (it only models its own atomics
//! and `UnsafeCell`s). The frame bytes are still checked for content and
//! order, but that only checks the logic (offsets, padding, wrap-around), not
//! the memory ordering of the bytes. To check SYNC POINT A (the producer's
//! release store of `tail` makes the frame's bytes visible to the consumer
//! that acquires it), the models below write a *shadow* of each frame into a
//! loom atomic with `Relaxed` ordering just before the frame is committed, and
//! the consumer reads it back with `Relaxed` after it has peeked the frame.
//! Only the ring's own release/acquire pair can make that relaxed read see the
//! value; if the pair were weakened, loom would let the read return the stale
//! 0 and the model would fail.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use meshshm_ring::{
    heap_doorbell, heap_ring, Bell, Consumer, FrameHeader, FrameKind, Producer, RingError,
    WaitOutcome, WANT_DATA, WANT_ROOM,
};

/// Payload of frame `i`: `len` bytes of a pattern that depends on `i`.
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

/// A value that stands for frame `i`'s bytes in the shadow atomics.
fn shadow_value(i: usize, len: usize) -> u64 {
    ((i as u64) << 32) | len as u64 | 1 << 63
}

/// Producer side of the protocol model: push `sizes` in order, publishing
/// after every frame whose index is in `publish_after` (and when the ring is
/// full, so the consumer can make room), then at the end.
fn produce(mut tx: Producer, sizes: &[usize], publish_after: &[usize], shadow: &[AtomicU64]) {
    for (i, &n) in sizes.iter().enumerate() {
        let body = payload(i, n);
        loop {
            match tx.reserve(n) {
                Ok(mut g) => {
                    g.write_at(0, &body);
                    // Stands for the bytes just written (see the file comment).
                    shadow[i].store(shadow_value(i, n), Ordering::Relaxed);
                    g.commit(FrameHeader::single(
                        FrameKind::Request,
                        i as u64,
                        0,
                        n as u32,
                    ));
                    break;
                }
                Err(RingError::Full) => {
                    tx.publish();
                    thread::yield_now();
                }
                Err(e) => panic!("producer: {e}"),
            }
        }
        if publish_after.contains(&i) {
            tx.publish();
        }
    }
    tx.publish();
}

/// Consumer side: take `sizes.len()` frames, check each one's header, bytes
/// and shadow, and hand room back every `release_batch` frames (and whenever
/// the ring is empty, so a full producer can go on).
fn consume(mut rx: Consumer, sizes: &[usize], release_batch: usize, shadow: &[AtomicU64]) {
    let mut got = 0;
    while got < sizes.len() {
        let Some(f) = rx.peek().expect("honest producer") else {
            rx.publish();
            thread::yield_now();
            continue;
        };
        let n = sizes[got];
        let h = *f.header();
        assert_eq!(h.stream_id, got as u64, "frames out of order");
        assert_eq!(h.kind, FrameKind::Request);
        assert_eq!(h.len as usize, n, "torn or misplaced header");
        assert_eq!(f.payload(), &payload(got, n)[..], "torn payload");
        assert_eq!(
            shadow[got].load(Ordering::Relaxed),
            shadow_value(got, n),
            "frame visible before its bytes (SYNC POINT A)"
        );
        f.release();
        got += 1;
        if got % release_batch == 0 {
            rx.publish();
        }
    }
    rx.publish();
    // Nothing more than what was sent.
    assert!(rx.peek().expect("honest producer").is_none());
}

fn ring_model(sizes: &'static [usize], publish_after: &'static [usize], release_batch: usize) {
    loom::model(move || {
        let (tx, rx) = heap_ring(4096);
        let shadow: Arc<Vec<AtomicU64>> =
            Arc::new((0..sizes.len()).map(|_| AtomicU64::new(0)).collect());
        let s2 = shadow.clone();
        let p = thread::spawn(move || produce(tx, sizes, publish_after, &s2));
        consume(rx, sizes, release_batch, &shadow);
        p.join().unwrap();
    });
}

/// Three 1528-byte frames do not fit in 4096 bytes: the third needs the
/// consumer to release the first, then goes behind a `Pad` frame at offset
/// 3056 and lands at offset 0. The last two frames are published together.
#[test]
fn ring_wrap_with_pad_frame() {
    ring_model(&[1500, 1500, 1500, 40], &[0, 1], 1);
}

/// A frame of more than half the ring (3024 of 4096 bytes) behind one of
/// 2024: it cannot fit before the end, so the producer writes the 2072-byte
/// pad on its own (the ring is then full: `Full` with the pad committed),
/// publishes it, and waits until the consumer has released the first frame
/// and the pad to put the big one at offset 0.
#[test]
fn ring_frame_larger_than_half_waits_behind_its_pad() {
    ring_model(&[2000, 3000, 40], &[0], 1);
}

/// 2048 + 2032 bytes leave a 16-byte gap at the end, too small for a pad
/// header: both sides skip it by rule. The consumer releases in pairs, so
/// the producer must wait for a batched head store.
#[test]
fn ring_wrap_with_end_gap() {
    ring_model(&[2024, 2008, 100, 0], &[1], 2);
}

/// Many small frames through one batched publish, then a wrap: the head and
/// tail caches of both sides go stale and are re-read.
#[test]
fn ring_small_frames_batched() {
    ring_model(&[1000, 1000, 1000, 8, 1000, 16], &[2, 4], 2);
}

/// The doorbell: the waiter blocks on the futex bell until a flag set by the
/// notifier is visible. Under loom the futex wait is a loop that yields until
/// `seq` moves (src/doorbell.rs); a lost wake-up leaves the waiter yielding
/// forever, which loom reports (it exceeds the branch limit).
#[test]
fn doorbell_no_lost_wakeup() {
    loom::model(|| {
        let (waiter, notifier) = heap_doorbell(Bell::Futex, 0);
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let n = thread::spawn(move || {
            f2.store(true, Ordering::Release);
            notifier.notify();
        });
        let out = waiter
            .wait_until(|| flag.load(Ordering::Acquire), None, None)
            .unwrap();
        assert_eq!(out, WaitOutcome::Ready);
        assert!(flag.load(Ordering::Acquire));
        n.join().unwrap();
    });
}

/// Two rounds on one doorbell: the second wait must not be satisfied or
/// blocked by the first round's leftovers (`sleeping` flag, `seq` value).
#[test]
fn doorbell_two_rounds() {
    loom::model(|| {
        let (waiter, notifier) = heap_doorbell(Bell::Futex, 0);
        let level = Arc::new(AtomicU32::new(0));
        let l2 = level.clone();
        let n = thread::spawn(move || {
            for v in 1..=2 {
                l2.store(v, Ordering::Release);
                notifier.notify();
            }
        });
        for want in 1..=2 {
            let out = waiter
                .wait_until(|| level.load(Ordering::Acquire) >= want, None, None)
                .unwrap();
            assert_eq!(out, WaitOutcome::Ready);
        }
        n.join().unwrap();
    });
}

/// The real use: a consumer sleeps on the doorbell until the ring has data;
/// the producer publishes and notifies. Checks that the ring's counters and
/// the doorbell's fences together lose no wake-up.
#[test]
fn ring_with_doorbell() {
    loom::model(|| {
        let (mut tx, mut rx) = heap_ring(4096);
        let (waiter, notifier) = heap_doorbell(Bell::Futex, 0);
        let p = thread::spawn(move || {
            for i in 0..2u64 {
                tx.try_push(
                    FrameHeader::single(FrameKind::Ping, i, 0, 8),
                    &[&[i as u8; 8]],
                )
                .unwrap();
                tx.publish();
                notifier.notify();
            }
        });
        for i in 0..2u64 {
            let out = waiter
                .wait_until(|| rx.has_data().expect("honest producer"), None, None)
                .unwrap();
            assert_eq!(out, WaitOutcome::Ready);
            let f = rx.peek().unwrap().expect("has_data said so");
            assert_eq!(f.header().stream_id, i);
            assert_eq!(f.payload(), &[i as u8; 8]);
            f.release();
            rx.publish();
        }
        p.join().unwrap();
    });
}

/// Wake reasons: a waiter that announced it waits only for room is woken
/// by `notify_room` alone, and one that waits for data is not kept asleep
/// by a `notify_room` (that neither rings it nor clears its announcement)
/// before the data's `notify`.
#[test]
fn doorbell_wake_reasons() {
    loom::model(|| {
        let (mut waiter, notifier) = heap_doorbell(Bell::Futex, 0);
        waiter.set_want(WANT_ROOM);
        let room = Arc::new(AtomicBool::new(false));
        let data = Arc::new(AtomicBool::new(false));
        let woke = Arc::new(AtomicBool::new(false));
        let (r2, d2, w2) = (room.clone(), data.clone(), woke.clone());
        let n = thread::spawn(move || {
            r2.store(true, Ordering::Release);
            notifier.notify_room();
            // Nothing else wakes the first wait: only notify_room can.
            while !w2.load(Ordering::Acquire) {
                thread::yield_now();
            }
            notifier.notify_room();
            d2.store(true, Ordering::Release);
            notifier.notify();
        });
        let out = waiter
            .wait_until(|| room.load(Ordering::Acquire), None, None)
            .unwrap();
        assert_eq!(out, WaitOutcome::Ready);
        woke.store(true, Ordering::Release);
        waiter.set_want(WANT_DATA);
        let out = waiter
            .wait_until(|| data.load(Ordering::Acquire), None, None)
            .unwrap();
        assert_eq!(out, WaitOutcome::Ready);
        n.join().unwrap();
    });
}

/// An app-side caller that waits for room while the app's reader sleeps for
/// data (the async client's line for room): it widens the reader's
/// announcement with `WANT_ROOM` and looks at the ring, once when it starts
/// and again after each look of the reader (which comes after the reader's
/// announcement). Either the caller sees the room the proxy made, or the
/// proxy's `notify_room` rings the reader: never neither. The reader
/// announces `WANT_ROOM` itself only if it saw the caller in line.
#[test]
fn doorbell_widened_sleep_gets_the_room_ring() {
    // (The caller's wait for the reader's look is a yield loop.)
    model_wide(|| {
        let (waiter, notifier) = heap_doorbell(Bell::Futex, 0);
        let waiter = Arc::new(waiter);
        let room = Arc::new(AtomicBool::new(false));
        let in_line = Arc::new(AtomicBool::new(false));
        let looked = Arc::new(AtomicBool::new(false));
        let found = Arc::new(AtomicBool::new(false));
        let (w2, r2, i2, l2, f2) = (
            waiter.clone(),
            room.clone(),
            in_line.clone(),
            looked.clone(),
            found.clone(),
        );
        let caller = thread::spawn(move || {
            i2.store(true, Ordering::SeqCst);
            w2.widen_sleep(WANT_ROOM);
            if !r2.load(Ordering::SeqCst) {
                while !l2.load(Ordering::SeqCst) {
                    thread::yield_now();
                }
                w2.widen_sleep(WANT_ROOM);
                if !r2.load(Ordering::SeqCst) {
                    // No room seen: only the proxy's ring may end the
                    // reader's sleep now.
                    return;
                }
            }
            // The caller found room and goes on; the reader need not be
            // woken (the model's end, not part of the protocol).
            f2.store(true, Ordering::SeqCst);
            w2.interrupt();
        });
        let r3 = room.clone();
        let proxy = thread::spawn(move || {
            r3.store(true, Ordering::SeqCst);
            notifier.notify_room();
        });
        let want = if in_line.load(Ordering::SeqCst) {
            WANT_DATA | WANT_ROOM
        } else {
            WANT_DATA
        };
        let token = waiter.announce_sleep_for(want);
        looked.store(true, Ordering::SeqCst);
        if !found.load(Ordering::SeqCst) {
            waiter.block(token, None, None).unwrap();
        }
        waiter.cancel_sleep();
        caller.join().unwrap();
        proxy.join().unwrap();
    });
}

/// The client's owed messages (`client-shim/src/shm.rs`: `owe`,
/// `sleep_begin`, `write_owed_now`): an async sender that found the ring
/// full mid-message leaves the rest to the connection — under the send
/// lock it marks something owed, widens a sleeping reader's announcement
/// to `WANT_ROOM` and looks for room once more. The reader task, about to
/// sleep, announces `WANT_DATA`, then, if something is owed, widens its own
/// announcement and writes what is owed if it gets the send lock (a
/// sender holding it writes it first anyway). The proxy makes room and
/// rings for room. Whatever the interleaving, the owed bytes are written
/// or the sleeping reader is rung: never neither.
#[test]
fn doorbell_owed_rest_is_written_or_the_reader_rung() {
    model_wide(|| {
        let (waiter, notifier) = heap_doorbell(Bell::Futex, 0);
        let waiter = Arc::new(waiter);
        let room = Arc::new(AtomicBool::new(false));
        let owing = Arc::new(AtomicU32::new(0));
        let tx_lock = Arc::new(loom::sync::Mutex::new(()));
        let (w2, r2, o2, l2) = (waiter.clone(), room.clone(), owing.clone(), tx_lock.clone());
        let sender = thread::spawn(move || {
            let _tx = l2.lock().unwrap();
            o2.store(1, Ordering::SeqCst);
            loom::sync::atomic::fence(Ordering::SeqCst);
            w2.widen_sleep(WANT_ROOM);
            if r2.load(Ordering::SeqCst) {
                // Written: the reader need not be woken (the model's end).
                o2.store(0, Ordering::SeqCst);
                w2.interrupt();
            }
        });
        let r3 = room.clone();
        let proxy = thread::spawn(move || {
            r3.store(true, Ordering::SeqCst);
            notifier.notify_room();
        });
        // The reader task: it sleeps only if it saw nothing owed, or looked
        // for room itself; a busy send lock means "look again" (after
        // letting other tasks run), not "the sender will see to it".
        loop {
            let token = waiter.announce_sleep_for(WANT_DATA);
            if owing.load(Ordering::SeqCst) > 0 {
                waiter.widen_sleep(WANT_ROOM);
                let Ok(_tx) = tx_lock.try_lock() else {
                    waiter.cancel_sleep();
                    thread::yield_now();
                    continue;
                };
                if room.load(Ordering::SeqCst) {
                    owing.store(0, Ordering::SeqCst);
                }
            }
            if owing.load(Ordering::SeqCst) > 0 {
                // Still owed: only the proxy's ring (or the sender's write)
                // ends this sleep.
                waiter.block(token, None, None).unwrap();
            }
            waiter.cancel_sleep();
            break;
        }
        sender.join().unwrap();
        proxy.join().unwrap();
    });
}

/// `loom::model` with room for the models whose caller waits in a yield
/// loop (they take more branches than the default allows).
fn model_wide(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 100_000;
    b.check(f);
}
