//! The wall clock: the one place soclink reads the time of day.
//!
//! Wall time is for what a person or another host reads as a date: event and timeline
//! timestamps, the UTC day that partitions the store, incident discovery times and
//! deadlines, intel period boundaries, certificate validity. It jumps when an operator,
//! NTP or a bad RTC steps the system clock, so nothing that *waits* or *measures* uses
//! it: batch delays, backoff, ack and idle timeouts, rate limits and lock staleness run
//! on `Instant` / `tokio::time` (monotonic) or, across processes, on file locks.
//!
//! Unit tests set and jump this clock per thread ([`fake`]); integration tests move the
//! real processes' clock with libfaketime (`tests/clock_jumps.rs`), which also covers
//! the reads this crate does not make itself (rustls checking certificate dates).

use std::time::{SystemTime, UNIX_EPOCH};

/// The current wall-clock time.
pub fn now() -> SystemTime {
    #[cfg(test)]
    if let Some(t) = fake::get() {
        return t;
    }
    SystemTime::now()
}

/// The current wall-clock time in Unix milliseconds (0 before the epoch).
pub fn unix_ms() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Picks the UTC day a source files its data under: the day of the collection time,
/// except that a step of the clock back by at most [`DayFiler::HOLD`] keeps the latest
/// day seen. Without it, a step back across midnight would append the lines read next
/// to the previous day's store file, ahead of lines of the same file already stored
/// under the later day: a reader going through the days would see them out of order.
/// A larger step back is taken as the correction of a clock that was far ahead, and
/// followed, so one wrong reading cannot pin the day for good.
#[derive(Debug, Default)]
pub struct DayFiler {
    /// The latest collection time seen (RFC 3339, fixed width, so it orders as text).
    latest: String,
}

impl DayFiler {
    pub const HOLD: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

    /// The day to file data collected at `ts` (an RFC 3339 time as `util::now_rfc3339`
    /// writes it) under.
    pub fn day(&mut self, ts: &str) -> &str {
        let keep = ts < self.latest.as_str() && {
            let parse = |s: &str| humantime::parse_rfc3339(s).ok();
            match (parse(ts), parse(&self.latest)) {
                (Some(t), Some(l)) => l.duration_since(t).is_ok_and(|d| d <= Self::HOLD),
                _ => false,
            }
        };
        if !keep {
            self.latest.clear();
            self.latest.push_str(ts);
        }
        crate::util::day_of(&self.latest)
    }
}

/// A per-thread settable clock for unit tests: code run on the test's thread sees it,
/// other threads keep the real one (tests running in parallel do not disturb each other).
#[cfg(test)]
pub mod fake {
    use std::cell::Cell;
    use std::time::{Duration, SystemTime};

    thread_local! {
        static NOW: Cell<Option<SystemTime>> = const { Cell::new(None) };
    }

    pub(super) fn get() -> Option<SystemTime> {
        NOW.with(Cell::get)
    }

    /// Holds this thread's clock at a time until dropped.
    pub struct Fake(());

    /// Stop this thread's clock at `t`.
    pub fn set(t: SystemTime) -> Fake {
        NOW.with(|c| c.set(Some(t)));
        Fake(())
    }

    impl Fake {
        /// Step the clock by `secs` (negative: backwards), as a clock step does.
        pub fn jump(&self, secs: i64) {
            let d = Duration::from_secs(secs.unsigned_abs());
            NOW.with(|c| {
                let t = c.get().unwrap_or_else(SystemTime::now);
                c.set(Some(if secs < 0 { t - d } else { t + d }));
            });
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            NOW.with(|c| c.set(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Regression: lines read after a step back across midnight went to the previous
    /// day's store file, before lines of the same file filed under the later day.
    #[test]
    fn day_partition_kept_across_backward_step_over_midnight() {
        let mut d = DayFiler::default();
        assert_eq!(d.day("2026-11-26T23:59:59.000000000Z"), "2026-11-26");
        assert_eq!(d.day("2026-11-27T00:00:01.000000000Z"), "2026-11-27");
        // Back an hour: still the 27th, for as long as the clock is behind.
        assert_eq!(d.day("2026-11-26T23:00:02.000000000Z"), "2026-11-27");
        assert_eq!(d.day("2026-11-26T23:59:00.000000000Z"), "2026-11-27");
        // Forward a day: the new day at once.
        assert_eq!(d.day("2026-11-28T00:00:03.000000000Z"), "2026-11-28");
        // Back more than HOLD (a clock that was far ahead is corrected): follow it.
        assert_eq!(d.day("2026-11-27T00:00:04.000000000Z"), "2026-11-27");
        assert_eq!(d.day("2026-11-27T00:00:05.000000000Z"), "2026-11-27");
    }

    #[test]
    fn fake_clock_steps_both_ways_on_this_thread_only() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_764_115_200);
        let f = fake::set(t0);
        assert_eq!(now(), t0);
        f.jump(-3600);
        assert_eq!(now(), t0 - Duration::from_secs(3600));
        f.jump(86_400);
        assert_eq!(unix_ms(), (1_764_115_200 - 3600 + 86_400) * 1000);
        let other = std::thread::spawn(now).join().unwrap();
        assert_ne!(other, now(), "another thread sees the real clock");
        drop(f);
        assert_ne!(now(), t0 + Duration::from_secs(86_400 - 3600));
    }
}
