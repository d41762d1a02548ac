//! Incident records (guideline 3.1(二): report within one hour of discovery) and their
//! durable store.
//!
//! On disk, one folder per incident, named by its id (one safe path component):
//!
//! ```text
//! <state_dir>/incidents/.lock                 advisory lock held while a record changes
//! <state_dir>/incidents/<id>/record.json      Incident (below), replaced atomically
//! <state_dir>/incidents/<id>/closing-report   copy of the closing report (after `close`)
//! <state_dir>/incidents/<id>/bundle.tar.gz    evidence bundle (levels 3 and 4)
//! ```
//!
//! Invariant: `record.json` is only ever replaced whole (temp, fsync, rename, fsync dir)
//! under the store lock, so a crash or a concurrent CLI and agent never leave a torn or
//! lost-update record, and the timeline only grows.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::fs::{Fs, LockGuard, RealFs, write_atomic};

/// Longest `--details` text kept in a record.
pub const MAX_DETAILS_BYTES: u64 = 64 * 1024;
/// Longest summary (one line, shown in lists).
pub const MAX_SUMMARY_BYTES: usize = 1024;
/// Largest closing report copied into the incident folder.
pub const MAX_REPORT_BYTES: u64 = 16 << 20;
/// Largest record.json read back (details + timeline leave ample room).
const MAX_RECORD_BYTES: u64 = 4 << 20;
/// How far in the future a discovery time may lie (clock skew between people and hosts).
const FUTURE_SLACK: Duration = Duration::from_secs(300);
/// The guideline's reporting deadline after discovery.
pub const REPORT_DEADLINE: Duration = Duration::from_secs(3600);

/// Errors callers branch on (unknown id vs bad input vs disk trouble).
#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("incident level must be 1, 2, 3 or 4 (got {0})")]
    InvalidLevel(u8),
    #[error("invalid incident: {0}")]
    Invalid(String),
    #[error("invalid time {value:?}: {reason} (expected RFC 3339, e.g. 2026-11-26T09:30:00+08:00)")]
    InvalidTime { value: String, reason: String },
    #[error("details file {path}: {reason}")]
    Details { path: PathBuf, reason: String },
    #[error("no incident {0:?} (see `soclink incident list`)")]
    NotFound(String),
    #[error("{0:?} is not an incident id (expected e.g. INC-20261126-0001-a3f9)")]
    BadId(String),
    #[error("incident {0} is already closed")]
    AlreadyClosed(String),
    #[error("incident record {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IncidentError + use<> {
    let path = path.to_path_buf();
    move |source| IncidentError::Io { what, path, source }
}

/// RFC 3339 timestamps in records and manifests (UTC, nanoseconds: a record read back
/// equals the one written).
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_nanos(*t).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_time(&s).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<SystemTime>`.
    pub mod option {
        use std::time::SystemTime;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&humantime::format_rfc3339_nanos(*t).to_string()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            let s = Option::<String>::deserialize(d)?;
            s.map(|s| super::super::parse_time(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// `2026-11-26T01:02:03Z`.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Parse RFC 3339 with any offset (`Z`, `+08:00`); operators in Taiwan type local time.
pub fn parse_time(s: &str) -> Result<SystemTime, IncidentError> {
    let odt = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|e| IncidentError::InvalidTime {
            value: s.to_string(),
            reason: e.to_string(),
        })?;
    let t = SystemTime::from(odt);
    // Every renderer formats with humantime, which cannot show (panics on) earlier times.
    if t < SystemTime::UNIX_EPOCH {
        return Err(IncidentError::InvalidTime {
            value: s.to_string(),
            reason: "before 1970-01-01T00:00:00Z".into(),
        });
    }
    Ok(t)
}

/// `HH:MM UTC` of a time, for deadlines shown to people.
pub fn clock_utc(t: SystemTime) -> String {
    let s = format_time(t);
    format!("{} UTC", s.get(11..16).unwrap_or(&s))
}

/// `41m`, `1h05m`, `2d03h`, `30s`: short durations for status columns.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86400, (s % 86400) / 3600)
    }
}

/// What happened to an incident, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Declared,
    BundleBuilt,
    Delivered,
    Acknowledged,
    Recovered,
    Closed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Declared => "declared",
            EventKind::BundleBuilt => "bundle_built",
            EventKind::Delivered => "delivered",
            EventKind::Acknowledged => "acknowledged",
            EventKind::Recovered => "recovered",
            EventKind::Closed => "closed",
        }
    }
}

/// One timeline entry: the record a drill report (5.2) and a closing report (4.1(三)4)
/// are built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEvent {
    pub event: EventKind,
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    #[serde(default)]
    pub detail: String,
}

impl TimelineEvent {
    pub fn new(event: EventKind, at: SystemTime, detail: impl Into<String>) -> TimelineEvent {
        TimelineEvent {
            event,
            at,
            detail: detail.into(),
        }
    }

    pub fn now(event: EventKind, detail: impl Into<String>) -> TimelineEvent {
        TimelineEvent::new(event, crate::clock::now(), detail)
    }
}

/// The evidence bundle as the record remembers it (the manifest hash ties them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub path: PathBuf,
    pub size: u64,
    pub members: u64,
    pub left_out: u64,
    pub manifest_sha256: String,
}

/// An incident record (`record.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// `INC-YYYYMMDD-NNNN-xxxx`: one safe path component (folder names here and at the relay).
    pub id: String,
    /// 1 (least) .. 4 (most severe), as the guideline defines them.
    pub level: u8,
    pub summary: String,
    #[serde(default)]
    pub details: String,
    #[serde(with = "rfc3339")]
    pub discovered_at: SystemTime,
    #[serde(with = "rfc3339")]
    pub declared_at: SystemTime,
    /// discovered_at + 1 h: the guideline's reporting deadline.
    #[serde(with = "rfc3339")]
    pub deadline: SystemTime,
    pub support_requested: bool,
    pub affects_other_agencies: bool,
    pub affects_critical_infrastructure: bool,
    /// Guideline 5.2 drills run the whole path and say so everywhere.
    pub drill: bool,
    pub agent_id: String,
    pub host: String,
    pub timeline: Vec<TimelineEvent>,
    #[serde(default)]
    pub bundle: Option<BundleRecord>,
    /// File name of the closing report inside the incident folder.
    #[serde(default)]
    pub closing_report: Option<String>,
    /// The Unix user who declared it through the control socket (from SO_PEERCRED);
    /// absent when it was recorded by the CLI without a running agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_by: Option<DeclaredBy>,
}

/// Who declared an incident, as the kernel told the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredBy {
    /// The user name (NSS), or the uid as a number when it has none.
    pub user: String,
    pub uid: u32,
}

/// How the deadline stands at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remaining {
    Left(Duration),
    Overdue(Duration),
}

impl Incident {
    pub fn remaining(&self, now: SystemTime) -> Remaining {
        match self.deadline.duration_since(now) {
            Ok(d) => Remaining::Left(d),
            Err(e) => Remaining::Overdue(e.duration()),
        }
    }

    /// `deadline 02:13 UTC (in 41m)` or `deadline 02:13 UTC, OVERDUE by 12m`.
    pub fn deadline_text(&self, now: SystemTime) -> String {
        match self.remaining(now) {
            Remaining::Left(d) => {
                format!(
                    "deadline {} (in {})",
                    clock_utc(self.deadline),
                    short_duration(d)
                )
            }
            Remaining::Overdue(d) => format!(
                "deadline {}, OVERDUE by {}",
                clock_utc(self.deadline),
                short_duration(d)
            ),
        }
    }

    /// The last time `event` happened, if it did.
    pub fn last(&self, event: EventKind) -> Option<&TimelineEvent> {
        self.timeline.iter().rev().find(|e| e.event == event)
    }

    pub fn is_closed(&self) -> bool {
        self.last(EventKind::Closed).is_some()
    }

    /// Reported in the guideline's sense: the center acknowledged it.
    fn report_status(&self, now: SystemTime) -> String {
        if let Some(ack) = self.last(EventKind::Acknowledged) {
            return match ack.at.duration_since(self.deadline) {
                Ok(late) if !late.is_zero() => format!(
                    "acknowledged {} (late by {})",
                    clock_utc(ack.at),
                    short_duration(late)
                ),
                _ => format!("acknowledged {} (within deadline)", clock_utc(ack.at)),
            };
        }
        let mut s = String::new();
        if let Some(d) = self.last(EventKind::Delivered) {
            let _ = write!(s, "delivered {}, not yet acknowledged; ", clock_utc(d.at));
        } else {
            s.push_str("not yet delivered; ");
        }
        s.push_str(&self.deadline_text(now));
        s
    }
}

/// What `incident declare` asks for.
#[derive(Debug, Clone)]
pub struct DeclareRequest {
    pub level: u8,
    pub summary: String,
    pub details: String,
    /// None: now.
    pub discovered_at: Option<SystemTime>,
    pub support_requested: bool,
    pub affects_other_agencies: bool,
    pub affects_critical_infrastructure: bool,
    pub drill: bool,
    /// The caller on the control socket, when declared through it.
    pub declared_by: Option<DeclaredBy>,
}

impl DeclareRequest {
    pub fn new(level: u8, summary: impl Into<String>) -> DeclareRequest {
        DeclareRequest {
            level,
            summary: summary.into(),
            details: String::new(),
            discovered_at: None,
            support_requested: false,
            affects_other_agencies: false,
            affects_critical_infrastructure: false,
            drill: false,
            declared_by: None,
        }
    }
}

/// Read a `--details` file, refusing more than [`MAX_DETAILS_BYTES`] (never reads more).
pub fn read_details(path: &Path) -> Result<String, IncidentError> {
    let err = |reason: String| IncidentError::Details {
        path: path.to_path_buf(),
        reason,
    };
    let f = File::open(path).map_err(|e| err(e.to_string()))?;
    let mut buf = Vec::new();
    f.take(MAX_DETAILS_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| err(e.to_string()))?;
    if buf.len() as u64 > MAX_DETAILS_BYTES {
        return Err(err(format!(
            "longer than {} bytes: attach large material as a file to the closing report",
            MAX_DETAILS_BYTES
        )));
    }
    String::from_utf8(buf).map_err(|_| err("not UTF-8 text".into()))
}

/// An id is safe when it is exactly what [`IncidentStore::declare`] makes.
pub fn is_valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    let all =
        |r: std::ops::Range<usize>, ok: fn(&u8) -> bool| b.get(r).is_some_and(|s| s.iter().all(ok));
    b.len() == 22
        && id.starts_with("INC-")
        && all(4..12, u8::is_ascii_digit)
        && b.get(12) == Some(&b'-')
        && all(13..17, u8::is_ascii_digit)
        && b.get(17) == Some(&b'-')
        && all(18..22, |c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// Incident records under `<state_dir>/incidents/`.
#[derive(Clone)]
pub struct IncidentStore {
    dir: PathBuf,
    /// Where the records live (the real file system, or a simulated one in tests).
    fs: Arc<dyn Fs>,
}

impl std::fmt::Debug for IncidentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncidentStore")
            .field("dir", &self.dir)
            .finish()
    }
}

impl IncidentStore {
    /// Open (creating) the store in an agent's state directory.
    pub fn open(state_dir: &Path) -> Result<IncidentStore, IncidentError> {
        IncidentStore::open_with_fs(state_dir, Arc::new(RealFs))
    }

    /// [`IncidentStore::open`] on the file system `fs`.
    pub fn open_with_fs(state_dir: &Path, fs: Arc<dyn Fs>) -> Result<IncidentStore, IncidentError> {
        let dir = state_dir.join("incidents");
        fs.create_dir_all_durable(&dir)
            .map_err(io_err("creating", &dir))?;
        Ok(IncidentStore { dir, fs })
    }

    /// The file system the store is on.
    pub fn fs(&self) -> &Arc<dyn Fs> {
        &self.fs
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of one incident (where its bundle and report belong).
    pub fn incident_dir(&self, id: &str) -> Result<PathBuf, IncidentError> {
        if !is_valid_id(id) {
            return Err(IncidentError::BadId(id.to_string()));
        }
        Ok(self.dir.join(id))
    }

    /// Where the evidence bundle of `id` is written.
    pub fn bundle_path(&self, id: &str) -> Result<PathBuf, IncidentError> {
        Ok(self.incident_dir(id)?.join("bundle.tar.gz"))
    }

    /// An exclusive advisory lock on the store, released when the guard drops; it
    /// serialises read-modify-write of records between the agent and the CLI.
    fn lock(&self) -> Result<LockGuard, IncidentError> {
        let path = self.dir.join(".lock");
        self.fs.lock(&path).map_err(io_err("locking", &path))
    }

    /// Record a new incident. Its deadline is discovered_at + 1 h.
    pub fn declare(
        &self,
        req: DeclareRequest,
        agent_id: &str,
        host: &str,
    ) -> Result<Incident, IncidentError> {
        if !(1..=4).contains(&req.level) {
            return Err(IncidentError::InvalidLevel(req.level));
        }
        let summary = req.summary.trim();
        if summary.is_empty() {
            return Err(IncidentError::Invalid(
                "the summary must not be empty".into(),
            ));
        }
        if summary.len() > MAX_SUMMARY_BYTES || summary.contains(['\n', '\r']) {
            return Err(IncidentError::Invalid(format!(
                "the summary must be one line of at most {MAX_SUMMARY_BYTES} bytes: put the rest in --details"
            )));
        }
        if req.details.len() as u64 > MAX_DETAILS_BYTES {
            return Err(IncidentError::Invalid(format!(
                "details longer than {MAX_DETAILS_BYTES} bytes"
            )));
        }
        let now = crate::clock::now();
        let discovered_at = req.discovered_at.unwrap_or(now);
        if discovered_at > now + FUTURE_SLACK {
            return Err(IncidentError::Invalid(format!(
                "discovered_at {} is in the future (now {})",
                format_time(discovered_at),
                format_time(now)
            )));
        }
        let _guard = self.lock()?;
        let (id, dir) = self.new_id_dir(now)?;
        let drill_note = if req.drill { " (DRILL)" } else { "" };
        let by_note = req
            .declared_by
            .as_ref()
            .map(|b| format!(", declared by {} (uid {})", b.user, b.uid))
            .unwrap_or_default();
        let incident = Incident {
            id,
            level: req.level,
            summary: summary.to_string(),
            details: req.details,
            discovered_at,
            declared_at: now,
            deadline: discovered_at + REPORT_DEADLINE,
            support_requested: req.support_requested,
            affects_other_agencies: req.affects_other_agencies,
            affects_critical_infrastructure: req.affects_critical_infrastructure,
            drill: req.drill,
            agent_id: agent_id.to_string(),
            host: host.to_string(),
            timeline: vec![TimelineEvent::new(
                EventKind::Declared,
                now,
                format!("level {}{drill_note}{by_note}", req.level),
            )],
            bundle: None,
            closing_report: None,
            declared_by: req.declared_by,
        };
        self.write(&dir, &incident)?;
        Ok(incident)
    }

    /// Pick `INC-<day>-<n>-<rand>` and create its folder; `create_dir` failing on an
    /// existing name makes the choice race-free even without the lock.
    fn new_id_dir(&self, now: SystemTime) -> Result<(String, PathBuf), IncidentError> {
        let ts = format_time(now);
        let day: String = ts.chars().take(10).filter(char::is_ascii_digit).collect();
        let prefix = format!("INC-{day}-");
        let mut n = 0u32;
        let entries = self
            .fs
            .list_dirs(&self.dir)
            .map_err(io_err("listing", &self.dir))?;
        for name in &entries {
            if let Some(rest) = name.strip_prefix(&prefix)
                && let Some(seq) = rest.get(..4).and_then(|s| s.parse::<u32>().ok())
            {
                n = n.max(seq);
            }
        }
        for _ in 0..16 {
            n += 1;
            let id = format!("{prefix}{:04}-{:04x}", n.min(9999), rand::random::<u16>());
            let dir = self.dir.join(&id);
            match self.fs.create_dir(&dir) {
                Ok(()) => {
                    self.fs
                        .sync_dir(&self.dir)
                        .map_err(io_err("syncing", &self.dir))?;
                    return Ok((id, dir));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("creating", &dir)(e)),
            }
        }
        Err(IncidentError::Invalid(
            "could not pick a free incident id (more than 9999 today?)".into(),
        ))
    }

    fn write(&self, dir: &Path, incident: &Incident) -> Result<(), IncidentError> {
        let path = dir.join("record.json");
        let mut bytes =
            serde_json::to_vec_pretty(incident).map_err(|e| IncidentError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        bytes.push(b'\n');
        write_atomic(&*self.fs, &path, &bytes).map_err(io_err("writing", &path))
    }

    /// One incident by id.
    pub fn get(&self, id: &str) -> Result<Incident, IncidentError> {
        let dir = self.incident_dir(id)?;
        let path = dir.join("record.json");
        let f = match self.fs.open_read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IncidentError::NotFound(id.to_string()));
            }
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let len = f
            .size()
            .map_err(io_err("reading", &path))?
            .min(MAX_RECORD_BYTES);
        let mut buf = vec![0u8; len as usize];
        let mut at = 0;
        while at < buf.len() {
            match f.read_at(at as u64, &mut buf[at..]) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) => return Err(io_err("reading", &path)(e)),
            }
        }
        buf.truncate(at);
        let inc: Incident = serde_json::from_slice(&buf).map_err(|e| IncidentError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if inc.id != id {
            return Err(IncidentError::Corrupt {
                path,
                reason: format!("record says id {:?}", inc.id),
            });
        }
        Ok(inc)
    }

    /// Every incident, oldest first. A folder that is not an incident is skipped; a
    /// corrupt record is an error (it is evidence and must not silently vanish).
    pub fn list(&self) -> Result<Vec<Incident>, IncidentError> {
        let mut ids = Vec::new();
        for name in self
            .fs
            .list_dirs(&self.dir)
            .map_err(io_err("listing", &self.dir))?
        {
            if is_valid_id(&name) && self.fs.exists(&self.dir.join(&name).join("record.json")) {
                ids.push(name);
            }
        }
        let mut out = ids
            .iter()
            .map(|id| self.get(id))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.declared_at.cmp(&b.declared_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Change a record under the lock and write it back atomically.
    fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut Incident) -> Result<(), IncidentError>,
    ) -> Result<Incident, IncidentError> {
        let _guard = self.lock()?;
        let mut inc = self.get(id)?;
        f(&mut inc)?;
        self.write(&self.incident_dir(id)?, &inc)?;
        Ok(inc)
    }

    /// Append a timeline event (delivered, acknowledged, ...).
    pub fn mark(&self, id: &str, event: TimelineEvent) -> Result<Incident, IncidentError> {
        self.update(id, |inc| {
            inc.timeline.push(event);
            Ok(())
        })
    }

    /// Remember the bundle the builder made and mark `bundle_built`.
    pub fn record_bundle(
        &self,
        id: &str,
        summary: &crate::agent::incident::bundle::BundleSummary,
    ) -> Result<Incident, IncidentError> {
        self.update(id, |inc| {
            inc.bundle = Some(BundleRecord {
                path: summary.path.clone(),
                size: summary.size,
                members: summary.members,
                left_out: summary.left_out,
                manifest_sha256: summary.manifest_sha256.clone(),
            });
            inc.timeline.push(TimelineEvent::now(
                EventKind::BundleBuilt,
                format!(
                    "{} members, {} bytes, manifest sha256 {}",
                    summary.members, summary.size, summary.manifest_sha256
                ),
            ));
            Ok(())
        })
    }

    /// Close an incident (4.1(三)4): copy the closing report into its folder, record
    /// when service was recovered and when it was closed.
    pub fn close(
        &self,
        id: &str,
        report_path: &Path,
        recovered_at: SystemTime,
    ) -> Result<Incident, IncidentError> {
        let dir = self.incident_dir(id)?;
        let current = self.get(id)?;
        if current.is_closed() {
            return Err(IncidentError::AlreadyClosed(id.to_string()));
        }
        let mut report = Vec::new();
        File::open(report_path)
            .map_err(io_err("opening closing report", report_path))?
            .take(MAX_REPORT_BYTES + 1)
            .read_to_end(&mut report)
            .map_err(io_err("reading closing report", report_path))?;
        if report.len() as u64 > MAX_REPORT_BYTES {
            return Err(IncidentError::Invalid(format!(
                "closing report {} is larger than {MAX_REPORT_BYTES} bytes",
                report_path.display()
            )));
        }
        let name = "closing-report";
        let dest = dir.join(name);
        write_atomic(&*self.fs, &dest, &report).map_err(io_err("writing", &dest))?;
        let shown = report_path.display().to_string();
        self.update(id, |inc| {
            if inc.is_closed() {
                return Err(IncidentError::AlreadyClosed(inc.id.clone()));
            }
            inc.closing_report = Some(name.to_string());
            inc.timeline.push(TimelineEvent::new(
                EventKind::Recovered,
                recovered_at,
                String::new(),
            ));
            inc.timeline.push(TimelineEvent::now(
                EventKind::Closed,
                format!("closing report {shown} ({} bytes)", report.len()),
            ));
            Ok(())
        })
    }
}

/// What the renderers know about the link to the center (3.1(三)).
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// Since when the upstream could not be reached; None: up (or unknown).
    pub upstream_down_since: Option<SystemTime>,
    /// How to reach the center by other means (phone, e-mail), from the config.
    pub center_contact: Option<String>,
}

fn link_banner(out: &mut String, link: &LinkStatus, now: SystemTime, pending: usize) {
    let Some(since) = link.upstream_down_since else {
        return;
    };
    let ago = now.duration_since(since).unwrap_or_default();
    let _ = writeln!(
        out,
        "UPSTREAM DOWN since {} ({} ago): nothing can reach the center now.",
        format_time(since),
        short_duration(ago)
    );
    if pending > 0 {
        let _ = writeln!(
            out,
            "{pending} incident(s) not yet delivered: they are kept on disk and sent when the link returns, but the 1-hour deadline still runs."
        );
    }
    match &link.center_contact {
        Some(c) => {
            let _ = writeln!(out, "Report by other means now (guideline 3.1(三)): {c}");
        }
        None => {
            let _ = writeln!(
                out,
                "Report by other means now (guideline 3.1(三)); no center contact is configured."
            );
        }
    }
    out.push('\n');
}

fn flags(inc: &Incident) -> String {
    let mut f = Vec::new();
    if inc.drill {
        f.push("DRILL");
    }
    if inc.support_requested {
        f.push("support requested");
    }
    if inc.affects_other_agencies {
        f.push("affects other agencies");
    }
    if inc.affects_critical_infrastructure {
        f.push("affects critical infrastructure");
    }
    f.join(", ")
}

fn status_of(inc: &Incident, now: SystemTime) -> String {
    if let Some(c) = inc.last(EventKind::Closed) {
        return format!("closed {}", format_time(c.at));
    }
    inc.report_status(now)
}

/// `soclink incident list`: one line per incident, newest last.
pub fn render_list(incidents: &[Incident], now: SystemTime, link: &LinkStatus) -> String {
    let mut out = String::new();
    let pending = incidents
        .iter()
        .filter(|i| !i.is_closed() && i.last(EventKind::Delivered).is_none())
        .count();
    link_banner(&mut out, link, now, pending);
    if incidents.is_empty() {
        out.push_str("no incidents\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<22}  {:<5}  {:<20}  {:<14}  STATUS",
        "ID", "LEVEL", "DECLARED", "BUNDLE/MEMBERS"
    );
    for inc in incidents {
        let bundle = match &inc.bundle {
            Some(b) => format!(
                "{}/{}m",
                bytesize::ByteSize(b.size).display().iec_short(),
                b.members
            ),
            None => "-".into(),
        };
        let level = if inc.drill {
            format!("{}D", inc.level)
        } else {
            inc.level.to_string()
        };
        let _ = writeln!(
            out,
            "{:<22}  {:<5}  {:<20}  {:<14}  {}",
            inc.id,
            level,
            format_time(inc.declared_at),
            bundle,
            status_of(inc, now)
        );
        let _ = writeln!(out, "{:<22}  {}", "", inc.summary);
    }
    out
}

/// `soclink incident show ID`: everything about one incident.
pub fn render_show(inc: &Incident, now: SystemTime, link: &LinkStatus) -> String {
    let mut out = String::new();
    let pending = usize::from(!inc.is_closed() && inc.last(EventKind::Delivered).is_none());
    link_banner(&mut out, link, now, pending);
    let _ = writeln!(
        out,
        "incident     {}{}",
        inc.id,
        if inc.drill { "  (DRILL)" } else { "" }
    );
    let _ = writeln!(out, "level        {}", inc.level);
    let _ = writeln!(out, "summary      {}", inc.summary);
    let _ = writeln!(out, "host         {} (agent {})", inc.host, inc.agent_id);
    if let Some(b) = &inc.declared_by {
        let _ = writeln!(out, "declared by  {} (uid {})", b.user, b.uid);
    }
    let _ = writeln!(out, "discovered   {}", format_time(inc.discovered_at));
    let _ = writeln!(out, "declared     {}", format_time(inc.declared_at));
    let _ = writeln!(out, "status       {}", status_of(inc, now));
    let f = flags(inc);
    if !f.is_empty() {
        let _ = writeln!(out, "flags        {f}");
    }
    match &inc.bundle {
        Some(b) => {
            let _ = writeln!(
                out,
                "bundle       {} ({} bytes, {} members, {} left out)\n             manifest sha256 {}",
                b.path.display(),
                b.size,
                b.members,
                b.left_out,
                b.manifest_sha256
            );
        }
        None => {
            let _ = writeln!(out, "bundle       none");
        }
    }
    out.push_str("timeline\n");
    for e in &inc.timeline {
        let _ = write!(out, "  {}  {:<13}", format_time(e.at), e.event.as_str());
        if !e.detail.is_empty() {
            let _ = write!(out, " {}", e.detail);
        }
        out.push('\n');
    }
    if !inc.details.is_empty() {
        out.push_str("details\n");
        for line in inc.details.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe_components() {
        assert!(is_valid_id("INC-20261126-0001-a3f9"));
        assert!(!is_valid_id("INC-20261126-0001-a3f9/.."));
        assert!(!is_valid_id("../INC-20261126-0001"));
        assert!(!is_valid_id("INC-20261126-0001-A3F9"));
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(short_duration(Duration::from_secs(41 * 60 + 5)), "41m");
        assert_eq!(short_duration(Duration::from_secs(3900)), "1h05m");
        assert_eq!(short_duration(Duration::from_secs(30)), "30s");
        let t = parse_time("2026-11-26T09:30:00+08:00").unwrap();
        assert_eq!(format_time(t), "2026-11-26T01:30:00Z");
        assert_eq!(clock_utc(t), "01:30 UTC");
        assert!(parse_time("yesterday").is_err());
        // Found by fuzzing (fuzz/regressions/incident_record/): rendering panicked.
        let e = parse_time("0026-11-26T02:30:00Z").unwrap_err();
        assert!(e.to_string().contains("before 1970"), "{e}");
        assert!(parse_time("1970-01-01T00:00:00Z").is_ok());
    }
}
