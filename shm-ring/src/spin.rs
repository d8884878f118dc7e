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

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

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

/// Messages sent smaller than this earn no extra polling.
pub const FOLLOW_FROM: u64 = 64 << 10;
/// Polling earned per KiB sent, in ns. Here a 1 MiB copy between the two
/// cores takes ~55 µs; an app that reads a 1 MiB answer, checks it and
/// sends the next 1 MiB request takes 165–230 µs while both sides poll,
/// and 240–480 µs while they sleep (a wake-up, then copies into cold
/// caches): the poll must outlast the latter, or a probe (below) cannot
/// bring polling back once it stopped. 1 MiB earns 820 µs; only a miss
/// costs all of it, and misses shrink it.
pub const FOLLOW_NS_PER_KIB: u64 = 800;
/// The most extra polling one wait earns, in µs.
pub const FOLLOW_MAX_US: u32 = 2_000;

/// A longer poll for a side that sent a large message (at least
/// [`FOLLOW_FROM`] bytes since its last wait): the reply cannot come before
/// the peer has copied it, and sleeping through that copy costs more than
/// the poll (a doorbell wake-up, then copies into caches gone cold: 1 MiB
/// echoed with the general budgets took twice as long as spinning).
/// The poll is `sent × FOLLOW_NS_PER_KIB`, up to [`FOLLOW_MAX_US`], times
/// a fraction that adapts like an [`AdaptiveSpin`] (in sixteenths: halved
/// on each miss, so a peer that takes large messages and goes quiet stops
/// it after five, then a probe every [`PROBE_EVERY`]).
#[derive(Debug)]
pub struct FollowPoll {
    /// Sixteenths of the bytes' poll time to use.
    scale: AdaptiveSpin,
    /// The running count of bytes sent as of the last wait.
    mark: AtomicU64,
}

impl Clone for FollowPoll {
    /// A fresh fraction (as [`AdaptiveSpin`]'s clone), the same mark.
    fn clone(&self) -> Self {
        FollowPoll {
            scale: self.scale.clone(),
            mark: AtomicU64::new(self.mark.load(Relaxed)),
        }
    }
}

/// One follow poll, from [`FollowPoll::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowPlan {
    /// µs to poll before sleeping
    pub budget_us: u32,
    sixteenths: u32,
}

impl FollowPoll {
    /// `enabled: false` never polls; `adaptive: false` always polls the
    /// whole time.
    pub fn new(enabled: bool, adaptive: bool) -> FollowPoll {
        FollowPoll {
            scale: AdaptiveSpin::new(if enabled { 16 } else { 0 }, adaptive),
            mark: AtomicU64::new(0),
        }
    }

    /// The poll of a wait, given `sent_total`, the running count of bytes
    /// sent to the peer so far (e.g. [`crate::Producer::bytes_sent`]): what
    /// went since the last wait may earn a poll longer than `at_least_us`
    /// (the poll the caller would make anyway).
    pub fn start(&self, sent_total: u64, at_least_us: u32) -> Option<FollowPlan> {
        let sent = sent_total.wrapping_sub(self.mark.swap(sent_total, Relaxed));
        if sent < FOLLOW_FROM || self.scale.max() == 0 {
            return None;
        }
        let want = (sent / 1024)
            .saturating_mul(FOLLOW_NS_PER_KIB)
            .div_ceil(1000)
            .min(u64::from(FOLLOW_MAX_US)) as u32;
        if want <= at_least_us {
            return None;
        }
        let f = self.scale.budget();
        (f > 0).then(|| FollowPlan {
            budget_us: (want * f / 16).max(at_least_us),
            sixteenths: f,
        })
    }

    /// The wait ended after `used_us` of polling.
    pub fn hit(&self, p: FollowPlan, used_us: u32) {
        let used = u64::from(used_us) * u64::from(p.sixteenths) / u64::from(p.budget_us.max(1));
        self.scale
            .hit(used.min(u64::from(p.sixteenths)) as u32, p.sixteenths);
    }

    /// The wait polled its whole budget and then slept.
    pub fn missed(&self, p: FollowPlan) {
        self.scale.missed(p.sixteenths);
    }
}

/// Polling before a sleep, in µs, for a side that answers (the proxy's
/// sessions): an [`AdaptiveSpin`] for waits in general and a
/// [`FollowPoll`] after a large answer, whose next request cannot come
/// before the app copied it. `max_us == 0` never polls.
#[derive(Debug, Clone)]
pub struct IdlePoll {
    base: AdaptiveSpin,
    follow: FollowPoll,
}

/// One wait's poll, from [`IdlePoll::start`]: report how it ended to
/// [`IdlePoll::hit`] or [`IdlePoll::missed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollPlan {
    /// µs to poll before sleeping
    pub budget_us: u32,
    follow: Option<FollowPlan>,
}

impl IdlePoll {
    /// General budget `max_us`; `adaptive: false` polls all of it (and the
    /// whole follow poll) before every sleep.
    pub fn new(max_us: u32, adaptive: bool) -> IdlePoll {
        IdlePoll {
            base: AdaptiveSpin::new(max_us, adaptive),
            follow: FollowPoll::new(max_us > 0, adaptive),
        }
    }

    /// The poll of a wait, given the running count of bytes sent to the
    /// peer so far (see [`FollowPoll::start`]).
    pub fn start(&self, sent_total: u64) -> PollPlan {
        match self.follow.start(sent_total, self.base.max()) {
            Some(f) => PollPlan {
                budget_us: f.budget_us,
                follow: Some(f),
            },
            None => PollPlan {
                budget_us: self.base.budget(),
                follow: None,
            },
        }
    }

    /// The wait ended after `used_us` of polling.
    pub fn hit(&self, p: PollPlan, used_us: u32) {
        match p.follow {
            Some(f) => self.follow.hit(f, used_us),
            None => self.base.hit(used_us, p.budget_us),
        }
    }

    /// The wait polled its whole budget and then slept.
    pub fn missed(&self, p: PollPlan) {
        match p.follow {
            Some(f) => self.follow.missed(f),
            None => self.base.missed(p.budget_us),
        }
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
    fn a_large_message_sent_earns_a_longer_poll_that_adapts() {
        // Each poll is given the running count of bytes sent: `send(n)`
        // sends n more, then starts a wait.
        fn sender(p: &IdlePoll) -> impl Fn(u64) -> PollPlan + '_ {
            let total = std::cell::Cell::new(0u64);
            move |n| {
                total.set(total.get() + n);
                p.start(total.get())
            }
        }
        let p = IdlePoll::new(20, true);
        let send = sender(&p);
        // Small messages: the general budget.
        assert_eq!(send(1024).budget_us, 20);
        assert_eq!(send(FOLLOW_FROM - 1).budget_us, 20);
        // 1 MiB: 820 µs.
        let big = send(1 << 20);
        assert_eq!(big.budget_us, 820);
        // Ended late in it: kept.
        p.hit(big, 600);
        assert_eq!(send(1 << 20).budget_us, 820);
        // Capped.
        assert_eq!(send(1 << 40).budget_us, FOLLOW_MAX_US);
        // Nothing sent since the last wait: the general budget.
        assert_eq!(send(0).budget_us, 20);
        // Missed five times: no follow poll (the general budget, untouched
        // by the follow misses), then a probe every PROBE_EVERY.
        for want in [820, 410, 205, 102] {
            let b = send(1 << 20);
            assert_eq!(b.budget_us, want);
            p.missed(b);
        }
        // 820/16 = 51 µs, the fifth.
        let b = send(1 << 20);
        assert_eq!(b.budget_us, 51);
        p.missed(b);
        let plans: Vec<u32> = (0..PROBE_EVERY).map(|_| send(1 << 20).budget_us).collect();
        assert!(plans.contains(&820), "{plans:?}");
        // The general budget learned nothing from the follow polls.
        assert_eq!(send(0).budget_us, 20);
        // No polling at all stays so.
        let none = IdlePoll::new(0, true);
        assert_eq!(sender(&none)(1 << 20).budget_us, 0);
        // Fixed: always the whole follow poll.
        let fixed = IdlePoll::new(20, false);
        let send_fixed = sender(&fixed);
        for _ in 0..10 {
            let b = send_fixed(1 << 20);
            assert_eq!(b.budget_us, 820);
            fixed.missed(b);
        }
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
