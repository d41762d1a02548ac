//! The systemd journal source: reads journal entries with libsystemd (the local system
//! journal, or every journal file in a configured directory), encodes each as one NDJSON
//! event and seals them into batches that carry the journal cursor of their last entry.
//!
//! Invariants it keeps:
//! - The cursor in a sealed batch is the cursor of the last entry in that batch; the
//!   agent checkpoints it only once the batch is durable, so a restart resumes exactly
//!   after the last durable entry: nothing lost, nothing repeated.
//! - A saved cursor whose entry no longer exists (the journal was vacuumed) resumes at the
//!   oldest entry after it, and the possible loss is logged and counted in `gaps`.
//! - A batch never spans two UTC days of the entries' own timestamps.
//! - One event is bounded: `MESSAGE` is cut at [`MAX_MESSAGE`], any other value at
//!   [`MAX_FIELD`], all other values together at [`MAX_FIELDS_TOTAL`] (and at most
//!   [`MAX_FIELD_COUNT`] fields); an event that lost
//!   bytes says `"truncated":true`. Journal values are arbitrary bytes and are never
//!   trusted to be UTF-8.
//!
//! Event shape (keys in this order; a key whose journal field is absent, or does not have
//! the expected form, is left out and the value stays in `fields`):
//!
//! ```text
//! {"ts":"2026-11-26T01:02:03.123456000Z",  // __REALTIME_TIMESTAMP (the journal has µs)
//!  "host":"web-01","source":"journal",     // the agent's host, the source name
//!  "unit":"sshd.service",                  // _SYSTEMD_UNIT
//!  "priority":6,"pid":1234,                // PRIORITY, _PID as numbers
//!  "comm":"sshd","hostname":"web-01",      // _COMM, _HOSTNAME
//!  "boot_id":"…","cursor":"s=…;i=…",       // _BOOT_ID, the entry's journal cursor
//!  "message":"…" | "message_base64":"…",   // MESSAGE ("" when the entry has none)
//!  "truncated":true,                        // only when a bound cut something
//!  "fields":{"SYSLOG_IDENTIFIER":"sshd",   // every other field, by name
//!            "COREDUMP_base64":"AAEC",     // a value that is not UTF-8: NAME_base64
//!            "TAG":["a","b"]}}             // a field present several times: an array
//! ```
//!
//! Journal field names are upper case, so the lower-case `_base64` suffix cannot collide
//! with a real field. A promoted key takes the first value of its field; further values
//! of the same field stay in `fields`.
//!
//! The journal handle is not `Send`: it is opened inside [`JournaldSource::run`], on the
//! source's own thread, which blocks on the bounded channel to the pipeline when it is
//! full (that is how a full spool pauses reading).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use systemd::journal::{self, Journal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::SealedBatch;
use super::file::BatchLimits;
use crate::config::{JournaldSourceConfig, StartAt};
use crate::event::{push_json_str, push_message};
use crate::util::day_of;

/// Longest `MESSAGE` kept in one event.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Longest value of any other field kept in one event.
pub const MAX_FIELD: usize = 64 << 10;
/// All values other than `MESSAGE` of one event together.
pub const MAX_FIELDS_TOTAL: usize = 1 << 20;
/// Most fields kept per event (journald itself writes at most 1024).
pub const MAX_FIELD_COUNT: usize = 4096;
/// Longest sleep in `sd_journal_wait`: bounds how late `stop` and `max_delay` are seen.
const WAIT: Duration = Duration::from_millis(200);
/// Entries read between two looks at `stop` and `max_delay`.
const BURST: usize = 4096;
/// Pause before retrying to open the journal (e.g. its directory does not exist yet).
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// First second of the year 10000: RFC 3339 cannot say later times (humantime refuses).
const MAX_REALTIME_USEC: u64 = 253_402_300_800 * 1_000_000 - 1;

/// Counters shown by `soclink status`.
#[derive(Debug, Default)]
pub struct JournaldStats {
    /// Entries encoded into batches.
    pub entries: AtomicU64,
    /// NDJSON bytes encoded.
    pub bytes: AtomicU64,
    /// Failed journal calls (open, read, wait).
    pub errors: AtomicU64,
    /// Resumptions where the saved cursor's entry was gone (entries may have been lost).
    pub gaps: AtomicU64,
}

/// Why the journal could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum JournaldError {
    #[error("journal directory {0:?} is not valid UTF-8 (libsystemd takes a C string)")]
    NonUtf8Directory(PathBuf),
    #[error("cannot open the journal: {0}")]
    Open(systemd::Error),
    #[error("cannot add a journal match {0:?}: {1}")]
    Match(String, systemd::Error),
}

/// The batch being filled.
struct Open {
    raw: Vec<u8>,
    events: u32,
    day: String,
    started: Option<Instant>,
    /// Cursor of the last entry in `raw`.
    cursor: Option<String>,
}

/// One field of the current entry, as ranges into the scratch arena.
struct Field {
    name: (usize, usize),
    value: (usize, usize),
}

pub struct JournaldSource {
    name: String,
    host: String,
    cfg: JournaldSourceConfig,
    limits: BatchLimits,
    /// The saved cursor to resume after (consumed by `position`).
    cursor: Option<String>,
    out: mpsc::Sender<SealedBatch>,
    stop: CancellationToken,
    stats: Arc<JournaldStats>,
    /// After seeking to a saved cursor: the first entry read is checked against it.
    resume: Option<String>,
    batch: Open,
    /// Copies of the current entry's fields (libsystemd's slices die at the next call).
    arena: Vec<u8>,
    fields: Vec<Field>,
    /// The current event before it joins a batch.
    ev: Vec<u8>,
    /// False once the pipeline is gone: nothing more can be delivered.
    alive: bool,
}

impl JournaldSource {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        host: String,
        cfg: JournaldSourceConfig,
        limits: BatchLimits,
        cursor: Option<String>,
        out: mpsc::Sender<SealedBatch>,
        stop: CancellationToken,
        stats: Arc<JournaldStats>,
    ) -> JournaldSource {
        JournaldSource {
            name,
            host,
            cfg,
            limits,
            cursor,
            out,
            stop,
            stats,
            resume: None,
            batch: Open {
                raw: Vec::new(),
                events: 0,
                day: String::new(),
                started: None,
                cursor: None,
            },
            arena: Vec::new(),
            fields: Vec::new(),
            ev: Vec::new(),
            alive: true,
        }
    }

    /// Blocking: runs on its own thread until `stop`; then seals what is buffered.
    pub fn run(mut self) {
        let Some(mut j) = self.open_retrying() else {
            return;
        };
        self.position(&mut j);
        // A journal that keeps failing fails every WAIT: warn once a minute, not each time.
        let warn = crate::util::LogLimiter::default();
        while self.alive && !self.stop.is_cancelled() {
            let mut read = 0;
            let mut failed = false;
            while read < BURST && self.alive {
                match j.next() {
                    Ok(0) => break,
                    Ok(_) => {
                        self.entry(&mut j);
                        read += 1;
                    }
                    Err(e) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(repeated) = warn.check("next") {
                            tracing::warn!(source = %self.name, "cannot read the next journal entry: {e}{repeated}");
                        }
                        failed = true;
                        break;
                    }
                }
            }
            if self.batch_due() {
                self.seal();
            }
            if failed {
                self.sleep(WAIT);
            } else if read < BURST && self.alive && !self.stop.is_cancelled() {
                // Caught up: wait for the journal to change. `wait` also picks up journal
                // files added to (or removed from) the directory.
                if let Err(e) = j.wait(Some(self.next_wait())) {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(repeated) = warn.check("wait") {
                        tracing::warn!(source = %self.name, "waiting for the journal failed: {e}{repeated}");
                    }
                    self.sleep(WAIT);
                }
            }
        }
        self.seal();
    }

    fn open_retrying(&mut self) -> Option<Journal> {
        let mut logged = false;
        loop {
            match self.open() {
                Ok(j) => {
                    if logged {
                        tracing::info!(source = %self.name, "journal opened");
                    }
                    return Some(j);
                }
                Err(e @ JournaldError::NonUtf8Directory(_)) => {
                    // A configuration that can never work: say so once, do not spin.
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(source = %self.name, "{e}; this source stays idle");
                    return None;
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if !logged {
                        tracing::warn!(source = %self.name, "{e}; retrying every {REOPEN_DELAY:?}");
                        logged = true;
                    }
                    if self.sleep(REOPEN_DELAY) {
                        return None;
                    }
                }
            }
        }
    }

    fn open(&self) -> Result<Journal, JournaldError> {
        let mut j = match &self.cfg.directory {
            Some(dir) => {
                let Some(d) = dir.to_str() else {
                    return Err(JournaldError::NonUtf8Directory(dir.clone()));
                };
                journal::OpenDirectoryOptions::default()
                    .open_directory(d)
                    .map_err(JournaldError::Open)?
            }
            None => journal::OpenOptions::default()
                .local_only(true)
                .open()
                .map_err(JournaldError::Open)?,
        };
        // Bounds how much of a compressed value libsystemd decompresses for us.
        if let Err(e) = j.set_data_threshold(MAX_MESSAGE + 64) {
            tracing::debug!(source = %self.name, "cannot set the journal data threshold: {e}");
        }
        // libsystemd ORs matches of the same field and ANDs different fields, which is
        // exactly "any of these units" AND "any of these priorities".
        for unit in &self.cfg.units {
            j.match_add("_SYSTEMD_UNIT", unit.as_bytes().to_vec())
                .map_err(|e| JournaldError::Match(format!("_SYSTEMD_UNIT={unit}"), e))?;
        }
        if let Some(max) = self.cfg.max_priority {
            for p in 0..=max {
                j.match_add("PRIORITY", p.to_string())
                    .map_err(|e| JournaldError::Match(format!("PRIORITY={p}"), e))?;
            }
        }
        Ok(j)
    }

    /// Where reading begins: after the saved cursor, else at head or tail.
    fn position(&mut self, j: &mut Journal) {
        if let Some(c) = self.cursor.take() {
            match j.seek_cursor(c.as_str()) {
                Ok(()) => {
                    self.resume = Some(c);
                    return;
                }
                Err(e) => {
                    // Reading everything again beats losing anything.
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %self.name, cursor = %c, "cannot seek to the saved journal cursor ({e}); reading from the oldest entry");
                }
            }
            self.seek(j, StartAt::Beginning);
            return;
        }
        self.seek(j, self.cfg.start_at);
    }

    fn seek(&self, j: &mut Journal, at: StartAt) {
        let r = match at {
            StartAt::Beginning => j.seek_head(),
            // Step onto the last entry so the next `next` is the first new one (right
            // after a tail seek, libsystemd versions disagree on what `next` returns).
            StartAt::End => j.seek_tail().and_then(|()| j.previous().map(|_| ())),
        };
        if let Err(e) = r {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = %self.name, "cannot seek in the journal: {e}");
        }
    }

    /// The journal is on an entry: encode it into the open batch.
    fn entry(&mut self, j: &mut Journal) {
        if let Some(c) = self.resume.take() {
            match j.test_cursor(c.as_str()) {
                // The entry the checkpoint points at: already delivered.
                Ok(true) => return,
                Ok(false) => {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %self.name, cursor = %c, "the saved journal cursor no longer exists (journal vacuumed or rotated away?): resuming at the oldest entry after it; entries in between may be lost");
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %self.name, "cannot compare the saved journal cursor: {e}");
                }
            }
        }
        let usec = match j.timestamp_usec() {
            Ok(u) => u,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.name, "journal entry without a readable timestamp ({e}); using the receive time");
                crate::clock::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            }
        };
        let cursor = match j.cursor() {
            Ok(c) => Some(c),
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.name, "journal entry without a cursor: {e}");
                None
            }
        };
        let truncated = self.collect_fields(j);
        let ts = format_ts(usec);
        self.encode(&ts, cursor.as_deref(), truncated);

        let day = day_of(&ts);
        if self.batch.events > 0
            && (self.batch.day != day || self.batch.raw.len() + self.ev.len() > self.max_bytes())
        {
            self.seal();
        }
        if self.batch.events == 0 {
            self.batch.day.clear();
            self.batch.day.push_str(day);
            self.batch.started = Some(Instant::now());
        }
        self.batch.raw.extend_from_slice(&self.ev);
        self.batch.events += 1;
        if cursor.is_some() {
            self.batch.cursor = cursor;
        }
        self.stats.entries.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(self.ev.len() as u64, Ordering::Relaxed);
        if self.batch.raw.len() >= self.max_bytes() {
            self.seal();
        }
    }

    fn max_bytes(&self) -> usize {
        usize::try_from(self.limits.max_bytes).unwrap_or(usize::MAX)
    }

    /// Copy the entry's fields into the arena within the bounds; true if any were cut.
    fn collect_fields(&mut self, j: &mut Journal) -> bool {
        self.arena.clear();
        self.fields.clear();
        let mut truncated = false;
        let mut others = 0usize;
        let mut seen_message = false;
        j.restart_data();
        loop {
            let f = match j.enumerate_data() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %self.name, "cannot read a journal entry's fields: {e}");
                    truncated = true;
                    break;
                }
            };
            let name = f.name();
            let value = f.value().unwrap_or(&[]);
            // Only the first MESSAGE gets the large bound; every other value, repeated
            // MESSAGEs included, shares MAX_FIELDS_TOTAL, so a crafted entry with
            // thousands of fields cannot make one event large.
            let is_message = name == b"MESSAGE" && !seen_message;
            let cap = if is_message {
                seen_message = true;
                MAX_MESSAGE
            } else {
                if others >= MAX_FIELDS_TOTAL || self.fields.len() >= MAX_FIELD_COUNT {
                    truncated = true;
                    continue;
                }
                MAX_FIELD.min(MAX_FIELDS_TOTAL - others)
            };
            if value.len() > cap {
                truncated = true;
            }
            let keep = value.get(..cap).unwrap_or(value);
            if !is_message {
                others += keep.len() + name.len();
            }
            let n0 = self.arena.len();
            self.arena.extend_from_slice(name);
            let v0 = self.arena.len();
            self.arena.extend_from_slice(keep);
            self.fields.push(Field {
                name: (n0, v0),
                value: (v0, self.arena.len()),
            });
        }
        // Group repeated fields; stable, so values keep their journal order.
        let arena = &self.arena;
        self.fields
            .sort_by(|a, b| slice(arena, a.name).cmp(slice(arena, b.name)));
        truncated
    }

    /// Encode the collected entry into `self.ev`.
    fn encode(&mut self, ts: &str, cursor: Option<&str>, truncated: bool) {
        let arena = &self.arena;
        let fields = &self.fields;
        let ev = &mut self.ev;
        ev.clear();
        // Index of the first value of each promoted field, if it has the expected form.
        let find = |name: &[u8]| fields.iter().position(|f| slice(arena, f.name) == name);
        let text = |i: Option<usize>| {
            i.and_then(|i| fields.get(i))
                .and_then(|f| std::str::from_utf8(slice(arena, f.value)).ok())
                .map(|s| s.to_string())
        };
        let unit_i = find(b"_SYSTEMD_UNIT").filter(|&i| text(Some(i)).is_some());
        let prio_i = find(b"PRIORITY").filter(|&i| number(text(Some(i))).is_some_and(|p| p <= 7));
        let pid_i = find(b"_PID").filter(|&i| number(text(Some(i))).is_some());
        let comm_i = find(b"_COMM").filter(|&i| text(Some(i)).is_some());
        let host_i = find(b"_HOSTNAME").filter(|&i| text(Some(i)).is_some());
        let boot_i = find(b"_BOOT_ID").filter(|&i| text(Some(i)).is_some());
        let msg_i = find(b"MESSAGE");

        ev.extend_from_slice(b"{\"ts\":");
        push_json_str(ev, ts);
        ev.extend_from_slice(b",\"host\":");
        push_json_str(ev, &self.host);
        ev.extend_from_slice(b",\"source\":");
        push_json_str(ev, &self.name);
        for (key, i) in [
            ("unit", unit_i),
            ("priority", prio_i),
            ("pid", pid_i),
            ("comm", comm_i),
            ("hostname", host_i),
            ("boot_id", boot_i),
        ] {
            let Some(v) = text(i) else { continue };
            ev.extend_from_slice(b",\"");
            ev.extend_from_slice(key.as_bytes());
            ev.extend_from_slice(b"\":");
            match key {
                "priority" | "pid" => {
                    let mut b = itoa::Buffer::new();
                    ev.extend_from_slice(b.format(number(Some(v)).unwrap_or(0)).as_bytes());
                }
                _ => push_json_str(ev, &v),
            }
        }
        if let Some(c) = cursor {
            ev.extend_from_slice(b",\"cursor\":");
            push_json_str(ev, c);
        }
        let msg = msg_i
            .and_then(|i| fields.get(i))
            .map_or(&[][..], |f| slice(arena, f.value));
        push_message(ev, msg);
        if truncated {
            ev.extend_from_slice(b",\"truncated\":true");
        }
        ev.extend_from_slice(b",\"fields\":{");
        let promoted = [unit_i, prio_i, pid_i, comm_i, host_i, boot_i, msg_i];
        let mut first_key = true;
        let mut i = 0;
        while i < fields.len() {
            let name = fields.get(i).map_or(&[][..], |f| slice(arena, f.name));
            let mut end = i;
            while fields
                .get(end)
                .is_some_and(|f| slice(arena, f.name) == name)
            {
                end += 1;
            }
            let group: Vec<&[u8]> = (i..end)
                .filter(|k| !promoted.contains(&Some(*k)))
                .filter_map(|k| fields.get(k).map(|f| slice(arena, f.value)))
                .collect();
            i = end;
            if group.is_empty() {
                continue;
            }
            if !first_key {
                ev.push(b',');
            }
            first_key = false;
            let name = String::from_utf8_lossy(name);
            let binary = group.iter().any(|v| std::str::from_utf8(v).is_err());
            if binary {
                push_json_str(ev, &format!("{name}_base64"));
            } else {
                push_json_str(ev, &name);
            }
            ev.push(b':');
            if group.len() > 1 {
                ev.push(b'[');
            }
            for (n, v) in group.iter().enumerate() {
                if n > 0 {
                    ev.push(b',');
                }
                match std::str::from_utf8(v) {
                    Ok(s) if !binary => push_json_str(ev, s),
                    _ => push_json_str(ev, &base64::engine::general_purpose::STANDARD.encode(v)),
                }
            }
            if group.len() > 1 {
                ev.push(b']');
            }
        }
        ev.extend_from_slice(b"}}\n");
    }

    fn batch_due(&self) -> bool {
        self.batch
            .started
            .is_some_and(|s| s.elapsed() >= self.limits.max_delay)
    }

    fn next_wait(&self) -> Duration {
        let mut wait = WAIT;
        if let Some(started) = self.batch.started {
            wait = wait.min(self.limits.max_delay.saturating_sub(started.elapsed()));
        }
        wait.max(Duration::from_millis(1))
    }

    /// Hand the open batch to the pipeline (blocks while the pipeline is full).
    fn seal(&mut self) {
        if self.batch.events == 0 {
            return;
        }
        let batch = SealedBatch {
            source: self.name.clone(),
            day: std::mem::take(&mut self.batch.day),
            events: std::mem::take(&mut self.batch.events),
            raw: std::mem::take(&mut self.batch.raw),
            cursor: self.batch.cursor.take().map(serde_json::Value::String),
        };
        self.batch.started = None;
        if self.out.blocking_send(batch).is_err() {
            tracing::debug!(source = %self.name, "pipeline closed; the journal source stops");
            self.alive = false;
        }
    }

    /// Sleep up to `d`, waking early on `stop`; true if stopped.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while !self.stop.is_cancelled() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        true
    }
}

fn slice(arena: &[u8], (a, b): (usize, usize)) -> &[u8] {
    arena.get(a..b).unwrap_or(&[])
}

fn number(s: Option<String>) -> Option<u64> {
    s.and_then(|s| s.parse::<u64>().ok())
}

/// RFC 3339 UTC with nanoseconds (the journal has microseconds: `.123456000`).
fn format_ts(usec: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_micros(usec.min(MAX_REALTIME_USEC));
    humantime::format_rfc3339_nanos(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ts_has_microseconds_and_never_panics() {
        assert_eq!(
            format_ts(1_764_118_923_123_456),
            "2025-11-26T01:02:03.123456000Z"
        );
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(format_ts(u64::MAX), "9999-12-31T23:59:59.999999000Z");
    }
}
