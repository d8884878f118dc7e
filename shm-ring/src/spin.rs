//! How long to poll before sleeping, learned from how recent waits ended.
//!
//! Polling a ring costs a core while it lasts; sleeping on a doorbell costs a
//! wake-up (a syscall for the peer, a context switch and, across CPUs, an
//! interrupt) and its latency. When the peer answers within a few
//! microseconds (a closed loop, a burst) polling wins on both counts; when
//! it answers later (a trickle of requests) every poll is wasted CPU. An
//! [`AdaptiveSpin`] starts with its whole budget, halves it each time a
//! wait outlasts it, doubles it (up to the whole) each time a wait ends in
//! its second half, stops polling when it falls below a sixteenth, and
//! then polls with the whole budget on every [`PROBE_EVERY`]th wait, going
//! back to it when such a probe ends during the poll (a load that became
//! fast again). Waits that end early leave it as it is: a large message
//! read in fragments has many short waits and one long one per message,
//! and the short ones must not undo what the long ones taught.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// With no budget left, one wait in this many polls with the whole budget.
pub const PROBE_EVERY: u32 = 16;

/// A spin-then-sleep budget for one waiter (one thread's waits on one
/// ring). The unit (polls, microseconds) is the caller's.
#[derive(Debug)]
pub struct AdaptiveSpin {
    max: u32,
    adaptive: bool,
    /// Budget of the next wait (adaptive only).
    cur: AtomicU32,
    /// Waits since the budget ran out (adaptive only).
    idle_waits: AtomicU32,
}

impl AdaptiveSpin {
    /// Budget `max`; `adaptive: false` polls with all of it before every
    /// sleep, whatever the waits did.
    pub fn new(max: u32, adaptive: bool) -> AdaptiveSpin {
        AdaptiveSpin {
            max,
            adaptive,
            cur: AtomicU32::new(max),
            idle_waits: AtomicU32::new(0),
        }
    }

    /// The largest budget.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Whether the budget follows the waits.
    pub fn adaptive(&self) -> bool {
        self.adaptive
    }

    /// How long the next wait may poll before it sleeps.
    pub fn budget(&self) -> u32 {
        if !self.adaptive {
            return self.max;
        }
        let c = self.cur.load(Relaxed);
        if c > 0 || self.max == 0 {
            return c;
        }
        let n = self.idle_waits.load(Relaxed) + 1;
        if n >= PROBE_EVERY {
            self.idle_waits.store(0, Relaxed);
            self.max
        } else {
            self.idle_waits.store(n, Relaxed);
            0
        }
    }

    /// The wait ended while it polled, after `used` of its `budget`.
    pub fn hit(&self, used: u32, budget: u32) {
        if !self.adaptive || self.max == 0 {
            return;
        }
        let c = self.cur.load(Relaxed);
        if c == 0 {
            // A probe that paid off.
            self.cur.store(self.max, Relaxed);
        } else if used > budget / 2 {
            self.cur.store(c.saturating_mul(2).min(self.max), Relaxed);
        }
    }

    /// The wait polled for `spent` (its budget) and then had to sleep.
    pub fn missed(&self, spent: u32) {
        if self.adaptive && spent > 0 {
            let half = spent / 2;
            let next = if half < self.max / 16 || half == 0 {
                0
            } else {
                half
            };
            self.cur.store(next, Relaxed);
        }
    }
}

impl Clone for AdaptiveSpin {
    /// A fresh budget with the same bounds (what one waiter learned does not
    /// carry over to another).
    fn clone(&self) -> Self {
        AdaptiveSpin::new(self.max, self.adaptive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_always_polls_the_whole_budget() {
        let s = AdaptiveSpin::new(100, false);
        for _ in 0..40 {
            s.missed(100);
            assert_eq!(s.budget(), 100);
        }
    }

    #[test]
    fn halves_on_misses_stops_then_probes() {
        let s = AdaptiveSpin::new(160, true);
        assert_eq!(s.budget(), 160);
        s.missed(160);
        assert_eq!(s.budget(), 80);
        s.missed(80);
        assert_eq!(s.budget(), 40);
        s.missed(40);
        assert_eq!(s.budget(), 20);
        s.missed(20);
        assert_eq!(s.budget(), 10);
        s.missed(10);
        // 5 < 160/16: stop polling, but probe every PROBE_EVERY waits.
        let budgets: Vec<u32> = (0..2 * PROBE_EVERY).map(|_| s.budget()).collect();
        let probes = budgets.iter().filter(|&&b| b == 160).count();
        assert_eq!(probes, 2);
        assert_eq!(
            budgets.iter().filter(|&&b| b == 0).count(),
            budgets.len() - 2
        );
        assert_eq!(budgets[PROBE_EVERY as usize - 1], 160);
    }

    #[test]
    fn late_hits_double_early_hits_keep_a_probe_restores() {
        let s = AdaptiveSpin::new(64, true);
        s.missed(64);
        s.missed(32);
        assert_eq!(s.budget(), 16);
        // Ended early in the poll: no change.
        s.hit(3, 16);
        assert_eq!(s.budget(), 16);
        // Ended in the second half: double.
        s.hit(9, 16);
        assert_eq!(s.budget(), 32);
        s.hit(30, 32);
        s.hit(60, 64);
        assert_eq!(s.budget(), 64);
        for _ in 0..10 {
            let b = s.budget();
            s.missed(b);
        }
        assert_eq!(s.budget(), 0);
        // A miss with nothing polled teaches nothing.
        s.missed(0);
        let probe = (0..PROBE_EVERY).map(|_| s.budget()).max();
        assert_eq!(probe, Some(64));
        s.hit(1, 64);
        assert_eq!(s.budget(), 64);
    }

    #[test]
    fn one_long_wait_among_short_ones_stops_the_polling() {
        // A large answer: one wait for its start (longer than the budget),
        // then short waits for its fragments.
        let s = AdaptiveSpin::new(100, true);
        let mut polled = 0u64;
        for _ in 0..50 {
            let b = s.budget();
            polled += u64::from(b);
            s.missed(b);
            for _ in 0..8 {
                let b = s.budget();
                if b > 0 {
                    polled += 2;
                    s.hit(2, b);
                }
            }
        }
        // Whole budget first, then halving, then one probe in 16 waits
        // (8 in 9 of them restoring it): under half of 50 x 100.
        assert!(polled < 2500, "{polled}");
    }

    #[test]
    fn zero_never_polls() {
        let s = AdaptiveSpin::new(0, true);
        for _ in 0..3 * PROBE_EVERY {
            assert_eq!(s.budget(), 0);
        }
        s.hit(0, 0);
        assert_eq!(s.budget(), 0);
    }

    #[test]
    fn clone_starts_fresh() {
        let s = AdaptiveSpin::new(32, true);
        s.missed(32);
        s.missed(16);
        let c = s.clone();
        assert_eq!(c.budget(), 32);
        assert_eq!(s.budget(), 8);
    }
}
