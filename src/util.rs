//! Small shared helpers: human-readable sizes and durations in the config, atomic file
//! replacement, directory fsync, and rate-limited warnings ([`LogLimiter`]). Each helper exists because more than one durable
//! structure needs exactly the same rule.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A byte count written as `"64KiB"`, `"20GiB"`, `"1MB"` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        if let Ok(n) = t.parse::<u64>() {
            return Ok(Size(n));
        }
        t.parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|_| {
                format!("invalid size {s:?}: expected e.g. \"64KiB\", \"1MiB\", \"20GiB\"")
            })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"64KiB\" or \"20GiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as `"500ms"`, `"1s"`, `"72h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration {s:?} ({e}): expected e.g. \"500ms\", \"1s\", \"72h\""
                ))
            })
    }
}

/// Lock a mutex, taking the data even if a panicking thread poisoned it: every mutex
/// here guards counters or handles that stay consistent across a panic.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// fsync a directory so that entries created, renamed or removed in it survive a power
/// cut (a file fsync alone does not persist its directory entry).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `path` with `bytes` atomically and durably: write a temporary sibling, fsync
/// it, rename it over `path`, fsync the directory. A crash leaves either the old or the
/// new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Create `dir` and its missing parents, fsyncing each parent whose entry was created.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Current time as RFC 3339 UTC with nanoseconds, e.g. `2026-11-26T01:02:03.123456789Z`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(crate::clock::now()).to_string()
}

/// The UTC day (`YYYY-MM-DD`) of an RFC 3339 timestamp produced by [`now_rfc3339`].
pub fn day_of(ts: &str) -> &str {
    ts.get(..10).unwrap_or(ts)
}

/// 1-based line and column of a byte offset in `text`, for error messages.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, col)
}

/// How often a repeated warning is logged at most (see [`LogLimiter`]).
pub const LOG_REPEAT_EVERY: Duration = Duration::from_secs(60);
/// Most distinct keys a [`LogLimiter`] remembers (keys can be file paths).
const LOG_LIMIT_KEYS: usize = 1024;

/// Keeps a warning raised in a loop (upstream unreachable, a file unreadable at every
/// rescan, the spool full) from flooding the journal: the first occurrence of a key is
/// logged, later ones only once per interval, with how often it repeated meanwhile.
///
/// ```text
/// 12:00:00 upstream relay:6514: connection refused; retrying in 0.2s
/// (attempts at 12:00:00.2 .. 12:00:59 are counted, not logged)
/// 12:01:05 upstream relay:6514: connection refused; retrying in 30s (repeated 9 times in the last 65s)
/// ```
pub struct LogLimiter {
    every: Duration,
    seen: std::sync::Mutex<std::collections::HashMap<String, Seen>>,
}

struct Seen {
    logged: std::time::Instant,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(LOG_REPEAT_EVERY)
    }
}

impl LogLimiter {
    pub fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            seen: Default::default(),
        }
    }

    /// An occurrence of `key`: `Some(suffix)` means log it now with `suffix` appended
    /// (empty, or ` (repeated N times in the last Ts)`); `None` means it was counted.
    pub fn check(&self, key: &str) -> Option<String> {
        self.check_at(key, std::time::Instant::now())
    }

    /// [`LogLimiter::check`] at a given time (tests).
    pub fn check_at(&self, key: &str, now: std::time::Instant) -> Option<String> {
        let mut seen = lock(&self.seen);
        if let Some(s) = seen.get_mut(key) {
            let since = now.saturating_duration_since(s.logged);
            if since < self.every {
                s.suppressed += 1;
                return None;
            }
            let n = s.suppressed;
            *s = Seen {
                logged: now,
                suppressed: 0,
            };
            return Some(if n == 0 {
                String::new()
            } else {
                format!(
                    " (repeated {} times in the last {}s)",
                    n + 1,
                    since.as_secs()
                )
            });
        }
        if seen.len() >= LOG_LIMIT_KEYS {
            // Keys past their interval would be logged anyway; forgetting them is free.
            let every = self.every;
            seen.retain(|_, s| now.saturating_duration_since(s.logged) < every);
            if seen.len() >= LOG_LIMIT_KEYS {
                seen.clear();
            }
        }
        seen.insert(
            key.to_string(),
            Seen {
                logged: now,
                suppressed: 0,
            },
        );
        Some(String::new())
    }

    /// The condition behind `key` ended: its next occurrence is news, logged at once.
    pub fn clear(&self, key: &str) {
        lock(&self.seen).remove(key);
    }

    /// [`LogLimiter::clear`] for every key (e.g. the upstream link came back).
    pub fn clear_all(&self) {
        lock(&self.seen).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_logs_first_then_one_summary_per_interval() {
        let lim = LogLimiter::new(Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(lim.check_at("refused", at(0)).as_deref(), Some(""));
        // Another key is independent.
        assert_eq!(lim.check_at("full", at(1)).as_deref(), Some(""));
        for s in 1..60 {
            assert_eq!(lim.check_at("refused", at(s)), None, "at {s}s");
        }
        assert_eq!(
            lim.check_at("refused", at(65)).as_deref(),
            Some(" (repeated 60 times in the last 65s)")
        );
        assert_eq!(lim.check_at("refused", at(70)), None);
        // The next report covers the one at 70s; after a quiet interval, a plain line.
        assert_eq!(
            lim.check_at("refused", at(200)).as_deref(),
            Some(" (repeated 2 times in the last 135s)")
        );
        assert_eq!(lim.check_at("refused", at(300)).as_deref(), Some(""));
        // Cleared: the next occurrence is logged at once.
        lim.clear("refused");
        assert_eq!(lim.check_at("refused", at(301)).as_deref(), Some(""));
        lim.clear_all();
        assert_eq!(lim.check_at("full", at(302)).as_deref(), Some(""));
    }

    #[test]
    fn log_limiter_memory_is_bounded() {
        let lim = LogLimiter::new(Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        for i in 0..10 * LOG_LIMIT_KEYS {
            assert!(lim.check_at(&format!("/var/log/{i}.log"), t0).is_some());
        }
        assert!(lock(&lim.seen).len() <= LOG_LIMIT_KEYS);
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("64KiB").unwrap().0, 64 * 1024);
        assert_eq!(Size::parse("20GiB").unwrap().0, 20 << 30);
        assert_eq!(Size::parse("1MiB").unwrap().0, 1 << 20);
        assert_eq!(Size::parse("1000").unwrap().0, 1000);
        assert!(Size::parse("lots").is_err());
    }

    #[test]
    fn line_cols() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 0), (1, 1));
    }
}
