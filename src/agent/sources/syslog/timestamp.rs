//! Placing a device's timestamp in time: the full UTC `ts` of a syslog event.
//!
//! RFC 3164 timestamps (`Oct 11 22:14:15`) carry neither year nor zone, and devices in
//! Taiwan send their local time (UTC+8). A [`DeviceClock`] holds the listener's zone
//! (`timezone` in the source's config, default the host's) and maps a [`Stamp`] to UTC:
//!
//! - a zone in the timestamp wins (`Z`, `+08:00`, Cisco's `UTC`); otherwise the wall
//!   time is read in the listener's zone, from the IANA time-zone database (`jiff`: the
//!   system's `/usr/share/zoneinfo` when present, else the copy built into soclink);
//! - a missing year is the one that puts the timestamp closest to the receive time, as
//!   rsyslog and syslog-ng infer it: `Dec 31 23:59:59` received on 1 January lands in
//!   the old year, `Jan  1 00:00:01` received on 31 December in the new one;
//! - a wall time that a daylight-saving change makes ambiguous (it happened twice) or
//!   impossible (it was skipped) takes, of the instants it can mean, the one closest to
//!   the receive time, by the same rule.
//!
//! The result is always an instant a reader can compare across devices; how far it is
//! from the receive time (a device clock hours off) is visible in the event, which keeps
//! both (`ts` and `received`), and the device's own text in `syslog_ts`.

use std::time::SystemTime;

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};

use super::parse::{Stamp, StampZone};

/// Maps device timestamps to UTC for one listener (one per connection task: it keeps a
/// one-entry cache of the last local-time offset, which is what makes repeated
/// timestamps of one device cost no time-zone lookup).
#[derive(Debug, Clone)]
pub struct DeviceClock {
    zone: TimeZone,
    /// (year, month, day, hour, minute, receive year) → UTC offset in seconds, for a
    /// wall time that was unambiguous in `zone`.
    last: Option<(CacheKey, i32)>,
}

type CacheKey = (i16, i8, i8, i8, i8);

impl DeviceClock {
    pub fn new(zone: TimeZone) -> DeviceClock {
        DeviceClock { zone, last: None }
    }

    pub fn zone(&self) -> &TimeZone {
        &self.zone
    }

    /// The UTC instant `stamp` stands for, received at `received`; None when it names
    /// no representable instant (RFC 3339 allows years 0000..=9999 only).
    pub fn to_utc(&mut self, stamp: &Stamp, received: SystemTime) -> Option<Timestamp> {
        let received = Timestamp::try_from(received).ok()?;
        self.utc_at(stamp, received)
    }

    /// [`Self::to_utc`] with the receive time already converted (once per read).
    pub fn utc_at(&mut self, stamp: &Stamp, received: Timestamp) -> Option<Timestamp> {
        let fixed = match stamp.zone {
            StampZone::Utc => Some(Offset::UTC),
            StampZone::Offset(secs) => Some(Offset::from_seconds(secs).ok()?),
            StampZone::Local => None,
        };
        let years: &[i16] = &[-1, 0, 1];
        let (base, candidates) = match stamp.year {
            Some(y) => (y, &[0i16][..]),
            None => {
                let here = match fixed {
                    Some(o) => o.to_datetime(received),
                    None => self.zone.to_datetime(received),
                };
                (here.year(), years)
            }
        };
        let mut best: Option<Timestamp> = None;
        let mut consider = |t: Timestamp| {
            let far = |t: Timestamp| t.duration_since(received).unsigned_abs();
            if best.is_none_or(|b| far(t) < far(b)) {
                best = Some(t);
            }
        };
        for dy in candidates {
            let Some(year) = base.checked_add(*dy) else {
                continue;
            };
            let Ok(dt) = DateTime::new(
                year,
                stamp.month,
                stamp.day,
                stamp.hour,
                stamp.minute,
                stamp.second,
                stamp.nanos,
            ) else {
                continue; // 29 February of a common year
            };
            if let Some(o) = fixed {
                if let Ok(t) = o.to_timestamp(dt) {
                    consider(t);
                }
                continue;
            }
            for t in self.local(dt) {
                consider(t);
            }
        }
        if best.is_none() && stamp.year.is_none() && stamp.month == 2 && stamp.day == 29 {
            // 29 February with no leap year around the receive time: the last one before.
            let mut y = base - 2;
            while !(y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)) && y > base - 9 {
                y -= 1;
            }
            let with_year = Stamp {
                year: Some(y),
                ..*stamp
            };
            return self.utc_at(&with_year, received);
        }
        // 0000-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z, the years RFC 3339 can write.
        best.filter(|t| (-62_167_219_200..=253_402_300_799).contains(&t.as_second()))
    }

    /// The instants a wall time in the listener's zone can mean (two around a DST
    /// change), from the cache when the minute was seen unambiguous just before.
    fn local(&mut self, dt: DateTime) -> impl Iterator<Item = Timestamp> {
        let key = (dt.year(), dt.month(), dt.day(), dt.hour(), dt.minute());
        if let Some((k, secs)) = self.last
            && k == key
            && let Ok(o) = Offset::from_seconds(secs)
            && let Ok(t) = o.to_timestamp(dt)
        {
            return [Some(t), None].into_iter().flatten();
        }
        let amb = self.zone.to_ambiguous_timestamp(dt);
        match amb.offset() {
            AmbiguousOffset::Unambiguous { offset } => {
                self.last = Some((key, offset.seconds()));
                [offset.to_timestamp(dt).ok(), None].into_iter().flatten()
            }
            AmbiguousOffset::Gap { before, after } | AmbiguousOffset::Fold { before, after } => {
                [before.to_timestamp(dt).ok(), after.to_timestamp(dt).ok()]
                    .into_iter()
                    .flatten()
            }
        }
    }
}

/// `2026-11-26T01:02:03.123456789Z`: the fixed-width form every event's `ts` has (so
/// timestamps order as text); the year must be 0000..=9999 (as [`DeviceClock::to_utc`]
/// returns).
pub fn format_utc(t: Timestamp, out: &mut String) {
    // Written digit by digit: `write!` cost a tenth of the listener's CPU at 1 M msg/s.
    let d = Offset::UTC.to_datetime(t);
    let mut b = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, width: usize, v: i64| {
        let mut v = v.unsigned_abs();
        for i in (at..at + width).rev() {
            if let Some(c) = b.get_mut(i) {
                // v % 10 < 10: the cast cannot truncate.
                *c = b'0' + (v % 10) as u8;
            }
            v /= 10;
        }
    };
    put(0, 4, d.year().into());
    put(5, 2, d.month().into());
    put(8, 2, d.day().into());
    put(11, 2, d.hour().into());
    put(14, 2, d.minute().into());
    put(17, 2, d.second().into());
    put(20, 9, d.subsec_nanosecond().into());
    // Only ASCII digits and separators were written.
    out.push_str(std::str::from_utf8(&b).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::sources::syslog::parse;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    fn zone(name: &str) -> DeviceClock {
        DeviceClock::new(TimeZone::get(name).unwrap())
    }

    /// The UTC `ts` of `msg` received at `received` by a listener in `tz`.
    fn utc(tz: &str, msg: &str, received: &str) -> String {
        let p = parse(msg.as_bytes());
        assert_eq!(p.parse_error, None, "{msg}");
        let st = p.stamp.unwrap_or_else(|| panic!("no timestamp in {msg}"));
        let mut out = String::new();
        format_utc(zone(tz).to_utc(&st, at(received)).unwrap(), &mut out);
        out
    }

    #[test]
    fn taipei_local_time_is_utc_plus_8() {
        assert_eq!(
            utc(
                "Asia/Taipei",
                "<13>Nov 26 09:02:03 fw app: x",
                "2026-11-26T01:02:04Z"
            ),
            "2026-11-26T01:02:03.000000000Z"
        );
        // A zone in the message wins over the listener's.
        assert_eq!(
            utc(
                "Asia/Taipei",
                "<13>1 2026-11-26T01:02:03.5Z h a - - - x",
                "2026-11-26T01:02:04Z"
            ),
            "2026-11-26T01:02:03.500000000Z"
        );
        assert_eq!(
            utc(
                "UTC",
                "<13>2026-11-26T09:02:03+08:00 h a: x",
                "2026-11-26T01:02:04Z"
            ),
            "2026-11-26T01:02:03.000000000Z"
        );
        // Cisco's `UTC` suffix; an unknown abbreviation means the listener's zone.
        let ios = "<189>1: *Nov 26 01:02:03.250 UTC: %SYS-5-CONFIG_I: x";
        assert_eq!(
            utc("Asia/Taipei", ios, "2026-11-26T01:02:04Z"),
            "2026-11-26T01:02:03.250000000Z"
        );
        let ios = "<189>1: Nov 26 09:02:03 TPE: %SYS-5-CONFIG_I: x";
        assert_eq!(
            utc("Asia/Taipei", ios, "2026-11-26T01:02:04Z"),
            "2026-11-26T01:02:03.000000000Z"
        );
    }

    /// Regression of the issue: across New Year the year is the one closest to the
    /// receive time, both ways, in the device's zone.
    #[test]
    fn year_across_new_year() {
        // Sent 31 Dec 23:59:59 Taipei, received 1 Jan 00:00:02 Taipei: the old year.
        assert_eq!(
            utc(
                "Asia/Taipei",
                "<13>Dec 31 23:59:59 h a: x",
                "2026-12-31T16:00:02Z"
            ),
            "2026-12-31T15:59:59.000000000Z"
        );
        // Sent 1 Jan 00:00:01 Taipei by a device a little ahead, received 31 Dec: the new year.
        assert_eq!(
            utc(
                "Asia/Taipei",
                "<13>Jan  1 00:00:01 h a: x",
                "2026-12-31T15:59:58Z"
            ),
            "2026-12-31T16:00:01.000000000Z"
        );
        // In UTC the same, where the receive year flips at midnight UTC.
        assert_eq!(
            utc(
                "UTC",
                "<13>Dec 31 23:59:59 h a: x",
                "2027-01-01T00:00:00.5Z"
            ),
            "2026-12-31T23:59:59.000000000Z"
        );
        // A year in the message is taken as it is, however far from the receive time.
        assert_eq!(
            utc(
                "UTC",
                "<13>Dec 31 2020 23:59:59 h a: x",
                "2027-01-01T00:00:00Z"
            ),
            "2020-12-31T23:59:59.000000000Z"
        );
    }

    /// A device whose clock is hours off keeps its own time in `ts` (the receive time is
    /// beside it in the event); the year is still right across New Year.
    #[test]
    fn device_clock_hours_off() {
        // Device 5 h behind: says 31 Dec 20:00 Taipei when it is 1 Jan 01:00 in Taipei.
        assert_eq!(
            utc(
                "Asia/Taipei",
                "<13>Dec 31 20:00:00 h a: x",
                "2026-12-31T17:00:00Z"
            ),
            "2026-12-31T12:00:00.000000000Z"
        );
        // Device 7 h ahead: says 1 Jan 06:00 Taipei when it is 31 Dec 23:00 in Taipei.
        assert_eq!(
            utc(
                "Asia/Taipei",
                "<13>Jan  1 06:00:00 h a: x",
                "2026-12-31T15:00:00Z"
            ),
            "2026-12-31T22:00:00.000000000Z"
        );
        // A device set to UTC while the listener expects Taipei: 8 h early, as sent.
        assert_eq!(
            utc(
                "Asia/Taipei",
                "<13>Nov 26 01:02:03 h a: x",
                "2026-11-26T01:02:04Z"
            ),
            "2026-11-25T17:02:03.000000000Z"
        );
    }

    /// Daylight saving (Europe/Paris): a repeated hour takes the instant closest to the
    /// receive time; a skipped one is still mapped, never refused.
    #[test]
    fn dst_fold_and_gap() {
        let fold = "<13>Oct 25 02:30:00 h a: x";
        assert_eq!(
            utc("Europe/Paris", fold, "2026-10-25T00:31:00Z"),
            "2026-10-25T00:30:00.000000000Z"
        );
        assert_eq!(
            utc("Europe/Paris", fold, "2026-10-25T01:31:00Z"),
            "2026-10-25T01:30:00.000000000Z"
        );
        let gap = "<13>Mar 29 02:30:00 h a: x";
        let got = utc("Europe/Paris", gap, "2026-03-29T01:00:00Z");
        assert!(
            [
                "2026-03-29T00:30:00.000000000Z",
                "2026-03-29T01:30:00.000000000Z"
            ]
            .contains(&got.as_str()),
            "{got}"
        );
    }

    #[test]
    fn leap_day_without_a_year() {
        assert_eq!(
            utc("UTC", "<13>Feb 29 12:00:00 h a: x", "2028-03-01T00:00:00Z"),
            "2028-02-29T12:00:00.000000000Z"
        );
        // No leap year within a year of the receive time: the last one before it.
        assert_eq!(
            utc("UTC", "<13>Feb 29 12:00:00 h a: x", "2026-03-01T00:00:00Z"),
            "2024-02-29T12:00:00.000000000Z"
        );
    }

    #[test]
    fn cache_gives_what_the_lookup_gives() {
        let mut c = zone("America/New_York");
        let recv = at("2026-11-01T06:10:00Z");
        for msg in [
            "<13>Nov  1 00:59:00 h a: x",
            "<13>Nov  1 00:59:30 h a: x",
            "<13>Nov  1 01:30:00 h a: x", // fold
            "<13>Nov  1 01:30:10 h a: x",
            "<13>Nov  1 02:00:00 h a: x",
        ] {
            let st = parse(msg.as_bytes()).stamp.unwrap();
            let cached = c.to_utc(&st, recv).unwrap();
            let fresh = zone("America/New_York").to_utc(&st, recv).unwrap();
            assert_eq!(cached, fresh, "{msg}");
        }
    }

    #[test]
    fn out_of_range_years_are_not_mapped() {
        let p = parse(b"<13>1 0000-01-01T00:00:00+01:00 h a - - - x");
        assert!(
            zone("UTC")
                .to_utc(&p.stamp.unwrap(), SystemTime::now())
                .is_none()
        );
        let p = parse(b"<13>1 9999-12-30T00:00:00Z h a - - - x");
        assert!(
            zone("UTC")
                .to_utc(&p.stamp.unwrap(), SystemTime::now())
                .is_some()
        );
    }
}
