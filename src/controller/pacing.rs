//! How long discovery waits before it asks Forgejo for jobs again: `poll_interval_min` while jobs
//! wait or were seen recently, doubling towards `poll_interval` once the host has been idle for a
//! while, with jitter so hosts started together do not poll in step. Pure: `daemon.rs` tells it what
//! each round saw, and the pause it returns is slept. The request rate itself is capped elsewhere
//! ([`super::joblist::JobLister`]): this only decides how often discovery wants a list.

use std::time::{Duration, Instant};

/// The discovery loop's pacing (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Pacing {
    min: Duration,
    max: Duration,
    /// The last round that saw activity (or the start).
    last_active: Instant,
    /// The pause chosen last (before jitter).
    current: Duration,
}

/// Share of the pause that is jitter: each pause is drawn from ±10 % around it.
const JITTER: f64 = 0.1;

impl Pacing {
    /// Starts fast: a daemon that has just started catches up with a backlog at once.
    pub fn new(min: Duration, max: Duration, now: Instant) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            last_active: now,
            current: min,
        }
    }

    /// How long activity counts as "recent": twice the idle interval, so a burst's next job (a
    /// workflow's dependent job, a retry) is found fast, and an idle host settles within a minute
    /// with the default 15 s.
    pub fn recent(&self) -> Duration {
        self.max * 2
    }

    /// The pause after a round at `now` (before jitter). `active`: jobs wait in the queue, or the
    /// round found a new one, or a job ended since the round before. Active or recently active →
    /// the minimum; idle for longer than [`Pacing::recent`] → twice the pause before, up to the
    /// maximum.
    pub fn next(&mut self, now: Instant, active: bool) -> Duration {
        if active {
            self.last_active = now;
        }
        self.current = if now.saturating_duration_since(self.last_active) < self.recent() {
            self.min
        } else {
            (self.current * 2).min(self.max)
        };
        self.current
    }

    /// `pause` with jitter, `unit` drawn uniformly from `[0, 1)`: within ±10 %, never below the
    /// minimum nor above the maximum.
    pub fn jittered(&self, pause: Duration, unit: f64) -> Duration {
        let factor = 1.0 + JITTER * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        pause.mul_f64(factor).clamp(self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(15);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn fast_while_busy_and_recently_busy_then_doubling_to_the_maximum() {
        let t0 = Instant::now();
        let mut p = Pacing::new(MIN, MAX, t0);
        // Just started: fast, as if jobs had been seen.
        assert_eq!(p.next(t0 + secs(1), false), MIN);
        // Busy: fast.
        assert_eq!(p.next(t0 + secs(10), true), MIN);
        // Idle, but busy 29 s ago (recent = 30 s): still fast.
        assert_eq!(p.next(t0 + secs(39), false), MIN);
        // Idle past the window: 2, 4, 8, then capped at 15.
        let mut at = t0 + secs(40);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let d = p.next(at, false);
            seen.push(d.as_secs());
            at += d;
        }
        assert_eq!(seen, [2, 4, 8, 15, 15, 15]);
        // A job appears: back to the minimum at once.
        assert_eq!(p.next(at, true), MIN);
        assert_eq!(p.next(at + MIN, false), MIN);
    }

    #[test]
    fn a_minimum_above_the_maximum_is_both() {
        let t0 = Instant::now();
        let mut p = Pacing::new(secs(5), secs(2), t0);
        assert_eq!(p.next(t0 + secs(100), false), secs(5));
        assert_eq!(p.jittered(secs(5), 0.99), secs(5));
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_the_bounds() {
        let p = Pacing::new(MIN, MAX, Instant::now());
        let d = secs(10);
        assert_eq!(p.jittered(d, 0.5), d);
        assert_eq!(p.jittered(d, 0.0), Duration::from_secs(9));
        let hi = p.jittered(d, 0.999_999);
        assert!(hi > secs(10) && hi <= Duration::from_secs(11), "{hi:?}");
        // Never below the minimum (the rate the operator allowed) nor above the maximum.
        assert_eq!(p.jittered(MIN, 0.0), MIN);
        assert_eq!(p.jittered(MAX, 0.999), MAX);
    }
}
