//! The agent's incident outbox: puts incident records, evidence bundles and closing
//! reports into the priority spool, and notes in each incident's timeline when the
//! relay acknowledged them.
//!
//! It scans `state_dir/incidents` every second, so it ships whatever `soclink incident`
//! recorded, whether the agent was running at the time or not (guideline 3.1(三): act
//! within the hour even when the network is down, deliver when it is back). What was
//! enqueued is remembered per incident in `outbox.json` beside the record, sealed with
//! a checksum ([`crate::fs::sealed`]):
//!
//! ```text
//! soclink-outbox v1 crc32=<8 hex digits>
//! { "record_sha256": "<hex of the record as last enqueued>", "record_seq": u64,
//!   "bundle_first_seq": u64, "bundle_last_seq": u64, "report_seq": u64 }
//! ```
//!
//! Enqueueing is idempotent at the relay (a record replaces the previous one; a chunk
//! is written at its offset), so a crash between enqueueing and writing `outbox.json`
//! only sends the same thing twice. That is also how a damaged `outbox.json` is
//! recovered: it is set aside and everything of that incident is sent again. Trusting
//! it instead could mark an incident delivered on an acknowledgement of another batch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::bundle::{BundleInputs, build_bundle};
use crate::batch::{BatchMeta, Item};
use crate::fs::{Fs, read_all, write_atomic};
use crate::incident::record::{EventKind, Incident, IncidentStore, TimelineEvent};
use crate::incident::{IncidentSettings, needs_bundle};
use crate::spool::Spool;

/// Bundle chunk size in the priority spool and on the wire.
pub const CHUNK: usize = 4 << 20;
/// The wire stream of the priority lane.
pub const PRIORITY_STREAM: &str = "priority";

const MAGIC: &str = "soclink-outbox v1 crc32=";
const STATE_FILE: &str = "outbox.json";

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutboxState {
    #[serde(default)]
    record_sha256: String,
    #[serde(default)]
    record_seq: u64,
    #[serde(default)]
    bundle_first_seq: u64,
    #[serde(default)]
    bundle_last_seq: u64,
    #[serde(default)]
    report_seq: u64,
}

impl OutboxState {
    fn encode(&self) -> Vec<u8> {
        // Strings and integers only: serializing cannot fail.
        crate::fs::sealed::seal(MAGIC, &serde_json::to_vec(self).unwrap_or_default())
    }
}

/// An incident's outbox state: `None` if there is none yet, `Err` (why) if the file is
/// damaged or unreadable.
fn load_state(fs: &dyn Fs, path: &Path) -> Result<Option<OutboxState>, String> {
    let Some(bytes) = read_all(fs, path).map_err(|e| format!("cannot read: {e}"))? else {
        return Ok(None);
    };
    let body = crate::fs::sealed::unseal(MAGIC, &bytes)?;
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| format!("bad JSON: {e}"))
}

/// Move a damaged outbox state aside and log it once; where it went (or `path`, if it
/// could not be moved: the next write replaces it).
fn set_aside(fs: &dyn Fs, path: &Path, incident: &str, why: &str) -> PathBuf {
    let aside = crate::fs::sealed::set_aside(fs, path);
    let note = match &aside {
        Some(a) => format!("moved it to {}", a.display()),
        None => "it could not be moved aside".into(),
    };
    tracing::error!(
        incident,
        "{}: {why}; {note} and sending the incident's record, bundle and report again",
        path.display()
    );
    aside.unwrap_or_else(|| path.to_path_buf())
}

/// At agent start: set aside every damaged `outbox.json` under `state_dir/incidents`
/// and log it once; returns where each went (or the file itself, if it could not be
/// moved), for `soclink status`.
pub fn quarantine_damaged(fs: &dyn Fs, state_dir: &Path) -> Vec<PathBuf> {
    let dir = state_dir.join("incidents");
    let mut out = Vec::new();
    for id in fs.list_dirs(&dir).unwrap_or_default() {
        let path = dir.join(&id).join(STATE_FILE);
        if let Err(why) = load_state(fs, &path) {
            out.push(set_aside(fs, &path, &id, &why));
        }
    }
    out
}

pub struct Outbox {
    /// What was enqueued, also kept in memory: if `outbox.json` cannot be written (an
    /// incident folder made by another user), the same items are not enqueued again
    /// every second.
    pub sent: std::sync::Mutex<std::collections::HashMap<String, OutboxState>>,
    pub state_dir: PathBuf,
    pub spool: Spool,
    pub settings: IncidentSettings,
    pub inputs: BundleInputs,
    /// Ship at all (false without `[upstream]`: records stay local, nothing to send to).
    pub ship: bool,
    /// The file system of the records and of `outbox.json` (`RealFs`; simulated in
    /// tests). The bundle builder and its `bundle.building` marker use `std::fs`.
    pub fs: Arc<dyn Fs>,
}

impl Outbox {
    pub async fn run(self, shutdown: CancellationToken) {
        let me = std::sync::Arc::new(self);
        // A pass runs every second: a lasting problem is warned about once a minute.
        let warn = std::sync::Arc::new(crate::util::LogLimiter::default());
        loop {
            let (m, w) = (me.clone(), warn.clone());
            match tokio::task::spawn_blocking(move || m.scan_warning(&w)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let msg = format!("incident outbox: {e:#}");
                    if let Some(repeated) = warn.check(&msg) {
                        tracing::warn!("{msg}{repeated}");
                    }
                }
                Err(e) => tracing::error!("incident outbox task failed: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One pass over every incident.
    pub fn scan(&self) -> Result<()> {
        self.scan_warning(&crate::util::LogLimiter::default())
    }

    /// [`Outbox::scan`], warning about an incident through `warn`.
    fn scan_warning(&self, warn: &crate::util::LogLimiter) -> Result<()> {
        let dir = self.state_dir.join("incidents");
        if !self.fs.exists(&dir) {
            return Ok(());
        }
        let store = IncidentStore::open_with_fs(&self.state_dir, self.fs.clone())?;
        for inc in store.list()? {
            if let Err(e) = self.one(&store, inc) {
                let msg = format!("incident outbox: {e:#}");
                if let Some(repeated) = warn.check(&msg) {
                    tracing::warn!("{msg}{repeated}");
                }
            }
        }
        Ok(())
    }

    fn one(&self, store: &IncidentStore, mut inc: Incident) -> Result<()> {
        let idir = store.incident_dir(&inc.id)?;
        let st_path = idir.join(STATE_FILE);
        let cached = crate::util::lock(&self.sent).get(&inc.id).cloned();
        let mut st: OutboxState = match cached {
            Some(st) => st,
            None => match load_state(&*self.fs, &st_path) {
                Ok(st) => st.unwrap_or_default(),
                // Damaged since the start-up check: the same recovery.
                Err(why) => {
                    set_aside(&*self.fs, &st_path, &inc.id, &why);
                    OutboxState::default()
                }
            },
        };
        let before = st.clone();

        // Acknowledgements first: they change the record, which is then sent again.
        let acked = self.spool.acked();
        if self.ship {
            let has = |inc: &Incident, k: EventKind| inc.timeline.iter().any(|e| e.event == k);
            if st.record_seq > 0 && acked >= st.record_seq && !has(&inc, EventKind::Delivered) {
                inc = store.mark(
                    &inc.id,
                    TimelineEvent::now(EventKind::Delivered, "incident record stored by the relay"),
                )?;
                tracing::info!(incident = %inc.id, "incident record delivered to the relay");
            }
            let done_seq = if st.bundle_last_seq > 0 {
                st.bundle_last_seq
            } else if inc.bundle.is_none()
                && !needs_bundle(inc.level, &self.settings.auto_bundle_levels)
            {
                st.record_seq
            } else {
                0
            };
            if done_seq > 0 && acked >= done_seq && !has(&inc, EventKind::Acknowledged) {
                let what = if st.bundle_last_seq > 0 {
                    "evidence bundle verified and stored by the relay"
                } else {
                    "incident acknowledged by the relay"
                };
                inc = store.mark(&inc.id, TimelineEvent::now(EventKind::Acknowledged, what))?;
                tracing::info!(incident = %inc.id, "{what}");
            }
        }

        // The record, whenever it changed (declared, bundle built, marks, closed).
        if self.ship {
            let compact = serde_json::to_vec(&inc)?;
            let sha = crate::incident::hex(&Sha256::digest(&compact));
            if sha != st.record_sha256 {
                let mut line = compact;
                line.push(b'\n');
                st.record_seq = self.enqueue_json(&inc.id, &line, false)?;
                st.record_sha256 = sha;
            }
        }

        // The evidence bundle: built here when the CLI did not (agent-side declare).
        let bundle_path = store.bundle_path(&inc.id)?;
        if inc.bundle.is_none()
            && needs_bundle(inc.level, &self.settings.auto_bundle_levels)
            && !self.fs.exists(&bundle_path)
            && !being_built(&idir)
            && !self
                .fs
                .exists(&idir.join(crate::incident::NO_BUNDLE_MARKER))
        {
            let summary = build_bundle(
                &bundle_path,
                &inc,
                &self.inputs,
                self.settings.window,
                self.settings.max_bundle_size,
            )
            .with_context(|| format!("building the evidence bundle of {}", inc.id))?;
            store.record_bundle(&inc.id, &summary)?;
            tracing::info!(incident = %inc.id, "evidence bundle built: {} bytes, {} members", summary.size, summary.members);
            // The record changed; the next pass sends it again.
        }
        if self.ship
            && inc.bundle.is_some()
            && st.bundle_last_seq == 0
            && self.fs.exists(&bundle_path)
        {
            let (first, last) = self.enqueue_bundle(&inc.id, &bundle_path)?;
            st.bundle_first_seq = first;
            st.bundle_last_seq = last;
        }

        // The closing report, once.
        if self.ship
            && st.report_seq == 0
            && let Some(name) = &inc.closing_report
        {
            let text = read_all(&*self.fs, &idir.join(name))
                .ok()
                .flatten()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let report = serde_json::json!({
                "incident": inc.id,
                "drill": inc.drill,
                "report": text,
                "timeline": inc.timeline,
                "discovered_at": crate::incident::record::format_time(inc.discovered_at),
                "declared_at": crate::incident::record::format_time(inc.declared_at),
            });
            let mut line = serde_json::to_vec(&report)?;
            line.push(b'\n');
            st.report_seq = self.enqueue_json(&inc.id, &line, true)?;
        }

        if st != before {
            crate::util::lock(&self.sent).insert(inc.id.clone(), st.clone());
            write_atomic(&*self.fs, &st_path, &st.encode()).with_context(|| {
                format!(
                    "cannot write {} (incident folders must be writable by the agent's user: run `soclink incident` as that user)",
                    st_path.display()
                )
            })?;
        }
        Ok(())
    }

    fn meta(&self, item: Item, events: u32, raw_bytes: u64) -> BatchMeta {
        BatchMeta {
            source: "incidents".into(),
            day: crate::util::day_of(&crate::util::now_rfc3339()).to_string(),
            events,
            raw_bytes,
            origin: None,
            item: Some(item),
            cursor: None,
        }
    }

    /// A record or report: one gzip member of one JSON line, like any batch.
    fn enqueue_json(&self, id: &str, line: &[u8], report: bool) -> Result<u64> {
        let item = if report {
            Item::IncidentReport {
                incident: id.to_string(),
            }
        } else {
            Item::IncidentRecord {
                incident: id.to_string(),
            }
        };
        let meta = serde_json::to_vec(&self.meta(item, 1, line.len() as u64))?;
        let gz = crate::agent::compress(line, 6);
        let seq = self.spool.append(&meta, &gz)?;
        self.spool.commit()?;
        Ok(seq)
    }

    /// The bundle in chunks; returns the first and last seq.
    fn enqueue_bundle(&self, id: &str, path: &Path) -> Result<(u64, u64)> {
        let (first, last, total) = enqueue_file(
            &*self.fs,
            &self.spool,
            path,
            "incidents",
            |offset, total, sha| Item::BundleChunk {
                incident: id.to_string(),
                offset,
                total,
                sha256: sha.to_string(),
            },
        )?;
        tracing::info!(incident = %id, "evidence bundle queued for the relay: {total} bytes in {} chunks", last - first + 1);
        Ok((first, last))
    }
}

/// Put a file into `spool` in [`CHUNK`]-sized records (waiting while the spool is
/// full), each described by `item(offset, total, sha256)`; commits. Returns the first
/// and last seq and the file's size.
pub fn enqueue_file(
    fs: &dyn Fs,
    spool: &Spool,
    path: &Path,
    source: &str,
    item: impl Fn(u64, u64, &str) -> Item,
) -> Result<(u64, u64, u64)> {
    let f = fs.open_read(path)?;
    let total = f.size()?;
    let sha = crate::fs::sha256_file(fs, path)?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let (mut first, mut last) = (0, 0);
    loop {
        let mut n = 0;
        while n < CHUNK {
            let k = f.read_at(offset + n as u64, &mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 && offset > 0 {
            break;
        }
        let meta = BatchMeta {
            source: source.to_string(),
            day: crate::util::day_of(&crate::util::now_rfc3339()).to_string(),
            events: 0,
            raw_bytes: n as u64,
            origin: None,
            item: Some(item(offset, total, &sha)),
            cursor: None,
        };
        let meta = serde_json::to_vec(&meta)?;
        while spool.is_full() {
            std::thread::sleep(Duration::from_millis(200));
        }
        let seq = spool.append(&meta, &buf[..n])?;
        if first == 0 {
            first = seq;
        }
        last = seq;
        offset += n as u64;
        if n < CHUNK {
            break;
        }
    }
    spool.commit()?;
    Ok((first, last, total))
}

/// When the incident was last acknowledged, for status output.
pub fn last_ack(inc: &Incident) -> Option<SystemTime> {
    inc.timeline
        .iter()
        .rev()
        .find(|e| e.event == EventKind::Acknowledged)
        .map(|e| e.at)
}

/// Marks the bundle of `idir` as being built by this process until the returned file
/// is dropped: the marker appears already locked (created aside, locked, renamed in), so
/// an agent never finds it unlocked while the build runs.
pub fn mark_building(idir: &Path) -> std::io::Result<std::fs::File> {
    let marker = idir.join(crate::incident::BUILDING_MARKER);
    let tmp = marker.with_extension("building.tmp");
    let f = std::fs::File::create(&tmp)?;
    if let Err(e) = f.lock() {
        // Then the agent falls back to the marker's age (see `being_built`).
        tracing::warn!("cannot lock {}: {e}", tmp.display());
    }
    std::fs::rename(&tmp, &marker)?;
    Ok(f)
}

/// Another process (the CLI) is building this bundle right now: it holds the marker's
/// lock, which dies with it, so a marker left by a crash is unlocked. The lock, not the
/// marker's age, decides because a wall-clock age is wrong after the clock is stepped
/// (a build of the last hour looked abandoned after a step forward, and a marker
/// "from the future" after a step back). Where locks are unsupported, a marker touched
/// within an hour either way of now counts as live.
fn being_built(idir: &Path) -> bool {
    let marker = idir.join(crate::incident::BUILDING_MARKER);
    let Ok(f) = std::fs::File::open(&marker) else {
        return false;
    };
    match f.try_lock_shared() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(_)) => {
            f.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
                let now = crate::clock::now();
                let age = now.duration_since(t).unwrap_or_else(|e| e.duration());
                age < Duration::from_secs(3600)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the marker's wall-clock age decided, so a clock stepped a day forward
    /// (or an hour back) during a CLI build made the agent build the same bundle too.
    #[test]
    fn bundle_being_built_survives_clock_steps() {
        let dir = tempfile::tempdir().unwrap();
        let held = mark_building(dir.path()).unwrap();
        let marker = dir.path().join(crate::incident::BUILDING_MARKER);
        let f = std::fs::File::options().write(true).open(&marker).unwrap();
        let now = SystemTime::now();
        for (step, mtime) in [
            ("a day forward", now - Duration::from_secs(86_400)),
            ("an hour back", now + Duration::from_secs(3600)),
        ] {
            f.set_modified(mtime).unwrap();
            assert!(
                being_built(dir.path()),
                "a live build looked abandoned after the clock stepped {step}"
            );
        }
        drop(held);
        assert!(
            !being_built(dir.path()),
            "a marker whose builder is gone (a crash) is ignored"
        );
        assert!(!being_built(&dir.path().join("missing")));
    }
}
