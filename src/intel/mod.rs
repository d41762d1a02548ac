//! Periodic SOC intelligence upload (guideline 4.1(一)8): every agency SOC returns its
//! monitoring data to the center on a schedule, including the periods it missed.
//!
//! - [`item`]: the item file format (one gzip member of NDJSON: a header line with the
//!   period, the summary and the SHA-256 of the records, then the records) and its
//!   bounded verifier, which the relay runs before storing an item.
//! - [`collector`]: the agent task: tails the `[intel] include` files into a staging
//!   spool, closes each clock-aligned period into one item, ships it through the
//!   priority spool, catches up missed periods after a restart, and answers
//!   `soclink intel run-now`.
//!
//! Periods are aligned to multiples of `every` since the Unix epoch (UTC), so `1h`
//! periods run 10:00–11:00 and `1d` periods start at 00:00 UTC (08:00 in Taiwan).
//! A record belongs to the period in which the agent durably staged it.

pub mod item;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::FileSourceConfig;

/// The wire/file-system name of the intel file source and of the relay's folder.
pub const SOURCE: &str = "intel";

/// `[intel]` in the agent's config.
#[derive(Debug, Clone)]
pub struct IntelSettings {
    /// Period length, whole seconds.
    pub every: Duration,
    /// The SOC output files (NDJSON alert files), tailed like a file source.
    pub files: FileSourceConfig,
    /// Largest sum of record bytes in one item; the rest is left out and counted.
    pub max_upload_size: u64,
    /// Segment size of the staging spool ([`STAGING_SEGMENT_SIZE`]; the crash model
    /// uses tiny ones, so acknowledged segments are released as often as possible).
    pub staging_segment_size: u64,
}

/// The staging spool's segment size.
pub const STAGING_SEGMENT_SIZE: u64 = 16 << 20;

/// Seconds since the epoch (0 for times before it).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Start of the period holding `t` (seconds), for periods of `every` seconds.
pub fn period_start(t: u64, every: u64) -> u64 {
    let every = every.max(1);
    t - t % every
}

/// `20261126T030000Z`: a period start as a file-name-safe UTC stamp.
pub fn compact(secs: u64) -> String {
    crate::incident::record::format_time(from_unix(secs))
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

/// The item file name of a period (`partial_at`: when `run-now` cut a partial one).
pub fn item_name(start: u64, partial_at: Option<u64>) -> String {
    match partial_at {
        None => format!("{}.json.gz", compact(start)),
        Some(at) => format!("{}.partial-{}.json.gz", compact(start), compact(at)),
    }
}

/// Whether `name` is an item name this version writes: what the relay accepts as a
/// file name under `<store>/<agent>/intel/`.
pub fn valid_item_name(name: &str) -> bool {
    fn stamp(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 16
            && b[8] == b'T'
            && b[15] == b'Z'
            && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
    }
    let Some(base) = name.strip_suffix(".json.gz") else {
        return false;
    };
    match base.split_once(".partial-") {
        None => stamp(base),
        Some((a, b)) => stamp(a) && stamp(b),
    }
}

/// `soclink intel run-now`: ask the running agent for a partial item of the open
/// period; exit 1 with the reason when it cannot, 2 when the config cannot be read.
pub fn run_now_cli(
    config: &std::path::Path,
    socket: Option<std::path::PathBuf>,
    json: bool,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let socket = match socket.map_or_else(|| crate::ops::status::socket_from_config(config), Ok) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soclink: {e}");
            return ExitCode::from(2);
        }
    };
    let req = serde_json::json!({"cmd": "intel_run_now"});
    match crate::ops::control::request_blocking(&socket, &req) {
        Ok(v) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                match serde_json::from_value::<crate::agent::intel::Queued>(v) {
                    Ok(q) => println!(
                        "queued intel item {} (partial period {} .. {}): {} records, {} bytes; `soclink status` shows when the relay acknowledges it",
                        q.name, q.period_start, q.period_end, q.records, q.bytes
                    ),
                    Err(e) => println!("queued (unexpected answer format: {e})"),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("soclink: intel run-now failed: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_align_to_the_clock() {
        // 2026-11-26T03:17:12Z
        let t = 1_795_663_032;
        assert_eq!(period_start(t, 3600) % 3600, 0);
        assert_eq!(compact(period_start(t, 3600)), "20261126T030000Z");
        assert_eq!(period_start(t, 1), t);
    }

    #[test]
    fn item_names_are_checked_strictly() {
        let t = 1_795_663_032;
        let full = item_name(period_start(t, 3600), None);
        assert_eq!(full, "20261126T030000Z.json.gz");
        assert!(valid_item_name(&full));
        let part = item_name(period_start(t, 3600), Some(t));
        assert_eq!(part, "20261126T030000Z.partial-20261126T031712Z.json.gz");
        assert!(valid_item_name(&part));
        for bad in [
            "",
            "../20261126T030000Z.json.gz",
            "20261126T030000Z.json",
            "2026112XT030000Z.json.gz",
            "20261126T030000Z.partial-.json.gz",
            "20261126T030000Z/.json.gz",
        ] {
            assert!(!valid_item_name(bad), "{bad:?}");
        }
    }
}
