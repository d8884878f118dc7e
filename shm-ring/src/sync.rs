//! The one facade through which the ring touches atomics, so that loom can
//! replace them under `--cfg loom` (see `tests/loom.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
pub(crate) fn spin_hint() {
    loom::thread::yield_now();
}
#[cfg(not(loom))]
pub(crate) fn spin_hint() {
    std::hint::spin_loop();
}
