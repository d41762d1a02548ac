//! The evidence bundle builder (guideline 4.1(二)7): a tar.gz of the logs of the
//! incident window, host facts and a manifest of SHA-256 hashes.
//!
//! The manifest (`manifest.json`, always the last member):
//!
//! ```text
//! Manifest {
//!     format: "soclink-bundle/1",
//!     created_at, window_from, window_to: RFC 3339,
//!     agent: { id, host, version },
//!     drill: bool,                       copied from the incident
//!     incident: Incident,                the record as declared
//!     size_cap: u64,
//!     members: [ { path, size, sha256, kind: file|journal|host, source?, original_path?,
//!                  target?, mtime?, first?, last?, note? } ],
//!     left_out: [ { path, size?, reason } ],
//!     errors:   [ { what, error } ],
//! }
//! ```
//!
//! Invariants: the archive streams from source files to the gzip file (memory does not
//! grow with the data); each member's size is fixed when it is opened and exactly that
//! many bytes are written (a file that grows is cut at the recorded length, one that
//! shrinks is zero-filled and says so), and its hash is taken from the very bytes
//! written; a member that would push the bundle past its cap is left out and named in
//! the manifest; the output appears at its path only once complete (temp + rename).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::hostfacts;
use crate::agent::sources::guard::{Opened, ReadGuard, Refused};
use crate::config::{AgentConfig, SourceKind};
use crate::incident::record::{Incident, format_time, rfc3339};
use crate::incident::{MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_MEMBERS, MAX_NAME_BYTES, hex};

/// Smallest cap accepted: room for the manifest and a few small members.
const MIN_CAP: u64 = 1 << 20;
/// Most left-out or error entries listed one by one; beyond, they are counted.
const MAX_LISTED: usize = 10_000;
/// Members stop being admitted when the manifest estimate reaches the manifest limit
/// less this, so the left-out list that follows still fits.
const MANIFEST_MEMBERS_SLACK: u64 = 1 << 20;
/// Listing stops this far below the manifest limit (room for the closing counts).
const MANIFEST_LIST_SLACK: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "bundle size cap {cap} bytes is too small (at least {min} bytes are needed for the manifest)"
    )]
    CapTooSmall { cap: u64, min: u64 },
    #[error("manifest: {0}")]
    Manifest(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BundleError + use<> {
    let path = path.to_path_buf();
    move |source| BundleError::Io { what, path, source }
}

/// A file source as the bundle sees it.
#[derive(Debug, Clone)]
pub struct FileSourceInput {
    pub name: String,
    pub include: Vec<String>,
    pub exclude: Vec<glob::Pattern>,
    /// The source's symlink policy (crate::sources::guard), the same as when tailing.
    pub follow_symlinks: crate::config::FollowSymlinks,
}

/// A journald source as the bundle sees it.
#[derive(Debug, Clone)]
pub struct JournalSourceInput {
    pub name: String,
    /// A directory of journal files; None: the system journal.
    pub directory: Option<PathBuf>,
}

/// What goes into a bundle besides the incident.
#[derive(Debug, Clone)]
pub struct BundleInputs {
    pub agent_id: String,
    pub host: String,
    pub agent_version: String,
    pub file_sources: Vec<FileSourceInput>,
    pub journal_sources: Vec<JournalSourceInput>,
    /// The `journalctl` to run (tests point it elsewhere).
    pub journalctl: PathBuf,
    /// Gather `host/` facts (tests of other parts turn them off for speed).
    pub host_facts: bool,
    /// End of the window; None: now.
    pub now: Option<SystemTime>,
    /// The agent's own keys, certificates and state: never bundled, whatever the
    /// sources' globs match.
    pub protected: Vec<PathBuf>,
}

impl BundleInputs {
    pub fn new(agent_id: &str, host: &str) -> BundleInputs {
        BundleInputs {
            agent_id: agent_id.to_string(),
            host: host.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            file_sources: Vec::new(),
            journal_sources: Vec::new(),
            journalctl: PathBuf::from("journalctl"),
            host_facts: true,
            now: None,
            protected: Vec::new(),
        }
    }

    /// The file and journald sources of an agent configuration.
    pub fn from_config(cfg: &AgentConfig) -> BundleInputs {
        let mut inputs = BundleInputs::new(&crate::identity::of_agent(cfg), &cfg.host);
        for s in &cfg.sources {
            match &s.kind {
                SourceKind::File(f) => {
                    inputs.protected.clone_from(&f.protected);
                    inputs.file_sources.push(FileSourceInput {
                        name: s.name.clone(),
                        include: f.include.clone(),
                        exclude: f.exclude.clone(),
                        follow_symlinks: f.follow_symlinks,
                    })
                }
                SourceKind::Journald(j) => inputs.journal_sources.push(JournalSourceInput {
                    name: s.name.clone(),
                    directory: j.directory.clone(),
                }),
                SourceKind::Syslog(_) => {}
            }
        }
        inputs
    }
}

/// What [`build_bundle`] made; the caller writes it into the incident record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSummary {
    pub path: PathBuf,
    /// Size of the .tar.gz on disk.
    pub size: u64,
    /// Members before the manifest.
    pub members: u64,
    pub left_out: u64,
    pub errors: u64,
    pub manifest_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    pub id: String,
    pub host: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberKind {
    File,
    Journal,
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestMember {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub kind: MemberKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_path: Option<String>,
    /// Where `original_path` really led when it differs (a symlink followed under
    /// `follow_symlinks = "within_includes"`, or a link in the pattern's literal part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<String>,
    /// Journal members: first and last entry time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftOut {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleProblem {
    pub what: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    #[serde(with = "rfc3339")]
    pub created_at: SystemTime,
    #[serde(with = "rfc3339")]
    pub window_from: SystemTime,
    #[serde(with = "rfc3339")]
    pub window_to: SystemTime,
    pub agent: AgentIdentity,
    pub drill: bool,
    pub incident: Incident,
    pub size_cap: u64,
    pub members: Vec<ManifestMember>,
    pub left_out: Vec<LeftOut>,
    pub errors: Vec<BundleProblem>,
}

pub const FORMAT: &str = "soclink-bundle/1";

/// A reader that hashes and counts what passes through it, and yields exactly `len`
/// bytes: the source is cut there if it grew, and zero-filled if it shrank (a tar
/// header's size must match its data, or every later member is misread).
struct ExactHashingReader<R> {
    inner: R,
    remaining: u64,
    zero_filled: u64,
    hasher: Sha256,
    inner_done: bool,
    error: Option<io::Error>,
}

impl<R: Read> ExactHashingReader<R> {
    fn new(inner: R, len: u64) -> Self {
        ExactHashingReader {
            inner,
            remaining: len,
            zero_filled: 0,
            hasher: Sha256::new(),
            inner_done: false,
            error: None,
        }
    }
}

impl<R: Read> Read for ExactHashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining.min(buf.len() as u64)).unwrap_or(buf.len());
        // want <= buf.len() by the min above.
        let dst = &mut buf[..want];
        let n = if self.inner_done {
            0
        } else {
            match self.inner.read(dst) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(e) => {
                    // Keep the archive well formed; the error goes into the manifest.
                    self.error = Some(e);
                    0
                }
            }
        };
        let n = if n == 0 {
            self.inner_done = true;
            dst.fill(0);
            self.zero_filled += want as u64;
            want
        } else {
            n
        };
        // n <= dst.len(): a reader never reports more than it was given room for.
        self.hasher.update(&dst[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Make a relative, safe member path from an arbitrary path: no `..`, no leading `/`,
/// no NUL or control characters, bounded length.
pub fn sanitize_path(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        let raw = match c {
            Component::Normal(s) => s.to_string_lossy(),
            Component::ParentDir => "__".into(),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
        };
        let mut s: String = raw
            .chars()
            .map(|ch| {
                if ch.is_control() || ch == '\\' {
                    '_'
                } else {
                    ch
                }
            })
            .collect();
        if s == ".." || s == "." || s.is_empty() {
            s = "__".into();
        }
        parts.push(s);
    }
    if parts.is_empty() {
        parts.push("_".into());
    }
    parts.join("/")
}

/// Cut a member name to [`MAX_NAME_BYTES`] on a char boundary, keeping it unique with a
/// short hash of the full name.
fn bound_name(name: String) -> String {
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    let digest = hex(&Sha256::digest(name.as_bytes()));
    let keep = MAX_NAME_BYTES - 20;
    let mut cut = keep;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    // cut < name.len() (name is longer than MAX_NAME_BYTES) and on a char boundary.
    format!("{}~{}", &name[..cut], digest.get(..16).unwrap_or(&digest))
}

/// A candidate file for the bundle.
struct Candidate {
    source: String,
    path: PathBuf,
    mtime: SystemTime,
    /// Index of its source's guard.
    guard: usize,
    /// Matched by the globs (else a rotated sibling of a matched file).
    matched: bool,
}

/// Regular files of each directory seen, names sorted: listed once per directory, so
/// finding the rotations of every file in a folder of thousands stays O(n log n).
#[derive(Default)]
struct DirListings(HashMap<PathBuf, Vec<OsString>>);

impl DirListings {
    /// Rotated siblings of `path`: same directory, name starting with its file name and
    /// then `.`, `-` or `_` (`app.log.1`, `app.log.2.gz`, `app.log-20261125`; not
    /// `app.logger`), regular files only (a symlink could point anywhere).
    fn rotated_siblings(&mut self, path: &Path) -> Vec<PathBuf> {
        let (Some(dir), Some(base)) = (path.parent(), path.file_name()) else {
            return Vec::new();
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let names = self.0.entry(dir.to_path_buf()).or_insert_with(|| {
            let mut v: Vec<OsString> = fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                        .map(|e| e.file_name())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        });
        let base = base.as_encoded_bytes();
        let start = names.partition_point(|n| n.as_encoded_bytes() <= base);
        names
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take_while(|n| n.as_encoded_bytes().starts_with(base))
            .filter(|n| {
                matches!(
                    n.as_encoded_bytes().get(base.len()),
                    Some(b'.' | b'-' | b'_')
                )
            })
            .map(|n| dir.join(n))
            .collect()
    }
}

fn is_excluded(path: &Path, exclude: &[glob::Pattern]) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    exclude.iter().any(|p| {
        if p.as_str().contains('/') {
            p.matches_path(path)
        } else {
            p.matches(name)
        }
    })
}

/// The archive being written plus the bookkeeping for the manifest.
struct Writer {
    tar: tar::Builder<GzEncoder<BufWriter<File>>>,
    tmp_path: PathBuf,
    /// Uncompressed tar bytes so far (headers + padded data): the cap is applied to this,
    /// which bounds the compressed size from above for all but incompressible input.
    written: u64,
    budget: u64,
    cap: u64,
    names: HashSet<String>,
    manifest_members: Vec<ManifestMember>,
    left_out: Vec<LeftOut>,
    errors: Vec<BundleProblem>,
    /// An upper bound on the manifest's size so far (pretty JSON, worst-case escaping):
    /// it is charged against the cap, and keeps the manifest under MAX_MANIFEST_BYTES.
    manifest_est: u64,
    /// Left-out and error entries past MAX_LISTED (or the manifest limit): counted only.
    left_out_more: u64,
    errors_more: u64,
}

/// Bytes a member of `size` with name `name` takes in the tar stream.
fn tar_cost(name: &str, size: u64) -> u64 {
    let padded = size.div_ceil(512).saturating_mul(512);
    // GNU long-name extension: one header plus the padded name.
    let long = if name.len() >= 100 {
        512 + (name.len() as u64 + 1).div_ceil(512) * 512
    } else {
        0
    };
    512 + long + padded
}

impl Writer {
    fn unique_name(&mut self, name: String) -> String {
        let name = bound_name(name);
        if !self.names.contains(&name) {
            return name;
        }
        for i in 1u32.. {
            let n = format!("{name}~{i}");
            if !self.names.contains(&n) {
                return n;
            }
        }
        name
    }

    /// Whether a member fits (with its manifest entry, and the manifest itself, under
    /// the cap); if not, record it as left out and log it. `extra` is the length of the
    /// other strings its manifest entry carries (original path, source).
    fn admit(&mut self, name: &str, size: u64, extra: usize) -> bool {
        if self.manifest_members.len() as u64 >= MAX_MEMBERS - 1 {
            self.leave_out(
                name,
                Some(size),
                format!("member count limit {MAX_MEMBERS} reached"),
                true,
            );
            return false;
        }
        let entry = 768 + 2 * name.len() as u64 + 6 * extra as u64;
        let manifest = self.manifest_est + entry;
        if manifest > MAX_MANIFEST_BYTES - MANIFEST_MEMBERS_SLACK {
            self.leave_out(
                name,
                Some(size),
                format!("manifest size limit {MAX_MANIFEST_BYTES} reached"),
                true,
            );
            return false;
        }
        let total = self
            .written
            .saturating_add(tar_cost(name, size))
            .saturating_add(tar_cost(MANIFEST_NAME, manifest));
        if total > self.budget {
            self.leave_out(
                name,
                Some(size),
                format!("bundle size cap {} reached", self.cap),
                true,
            );
            return false;
        }
        self.manifest_est = manifest;
        true
    }

    /// Whether another list entry of `cost` bytes may still go into the manifest.
    fn may_list(&self, listed: usize, cost: u64) -> bool {
        listed < MAX_LISTED && self.manifest_est + cost <= MAX_MANIFEST_BYTES - MANIFEST_LIST_SLACK
    }

    fn leave_out(&mut self, path: &str, size: Option<u64>, reason: String, loud: bool) {
        if loud {
            match size {
                Some(s) => tracing::warn!(path, size = s, %reason, "evidence bundle: left out"),
                None => tracing::warn!(path, %reason, "evidence bundle: left out"),
            }
        }
        let cost = 256 + 6 * path.len() as u64 + 6 * reason.len() as u64;
        if !self.may_list(self.left_out.len(), cost) {
            self.left_out_more += 1;
            return;
        }
        self.manifest_est += cost;
        self.left_out.push(LeftOut {
            path: path.to_string(),
            size,
            reason,
        });
    }

    fn error(&mut self, what: String, error: String) {
        tracing::warn!(%what, %error, "evidence bundle");
        let cost = 256 + 6 * what.len() as u64 + 6 * error.len() as u64;
        if !self.may_list(self.errors.len(), cost) {
            self.errors_more += 1;
            return;
        }
        self.manifest_est += cost;
        self.errors.push(BundleProblem { what, error });
    }

    /// Append `size` bytes from `reader` as `name`; returns the hash and how many bytes
    /// had to be zero-filled.
    fn append(
        &mut self,
        name: &str,
        size: u64,
        mtime: SystemTime,
        reader: impl Read,
    ) -> Result<(String, u64, Option<io::Error>), BundleError> {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(
            mtime
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        let mut r = ExactHashingReader::new(reader, size);
        self.tar
            .append_data(&mut header, name, &mut r)
            .map_err(io_err("writing", &self.tmp_path))?;
        self.written += tar_cost(name, size);
        self.names.insert(name.to_string());
        Ok((hex(&r.hasher.finalize()), r.zero_filled, r.error))
    }

    fn add_bytes(
        &mut self,
        name: String,
        bytes: &[u8],
        kind: MemberKind,
    ) -> Result<(), BundleError> {
        let name = self.unique_name(name);
        if !self.admit(&name, bytes.len() as u64, 0) {
            return Ok(());
        }
        let (sha, _, _) = self.append(&name, bytes.len() as u64, crate::clock::now(), bytes)?;
        self.manifest_members.push(ManifestMember {
            path: name,
            size: bytes.len() as u64,
            sha256: sha,
            kind,
            source: None,
            original_path: None,
            target: None,
            mtime: None,
            first: None,
            last: None,
            note: None,
        });
        Ok(())
    }

    fn add_file(&mut self, c: &Candidate, guard: &ReadGuard) -> Result<(), BundleError> {
        let name = self.unique_name(format!(
            "files/{}/{}",
            sanitize_path(Path::new(&c.source)),
            sanitize_path(&c.path)
        ));
        let shown = c.path.display().to_string();
        let opened = if c.matched {
            guard.open(&c.path)
        } else {
            guard
                .open_known(&c.path)
                .map(|file| Opened { file, target: None })
        };
        let (file, target) = match opened {
            Ok(o) => (o.file, o.target.map(|t| t.display().to_string())),
            Err(Refused::Io(e)) => {
                self.error(format!("opening {shown}"), e.to_string());
                return Ok(());
            }
            Err(e) => {
                self.leave_out(&shown, None, e.to_string(), true);
                return Ok(());
            }
        };
        // The size is fixed now, from the open file: later growth is not evidence of the
        // window and would not match the header.
        let (size, mtime) = match file.metadata() {
            // Replaced by something else since it was listed: a device or FIFO has no
            // fixed size to copy.
            Ok(m) if !m.is_file() => {
                self.error(
                    format!("opening {shown}"),
                    "no longer a regular file".into(),
                );
                return Ok(());
            }
            Ok(m) => (m.len(), m.modified().unwrap_or(c.mtime)),
            Err(e) => {
                self.error(format!("stat {shown}"), e.to_string());
                return Ok(());
            }
        };
        if !self.admit(&name, size, shown.len() + c.source.len()) {
            return Ok(());
        }
        let (sha, zero_filled, err) = self.append(&name, size, mtime, file.take(size))?;
        let mut note = None;
        if zero_filled > 0 {
            let why = err.map_or_else(|| "file shrank while read".to_string(), |e| e.to_string());
            note = Some(format!("last {zero_filled} bytes are zero-filled: {why}"));
            self.error(
                format!("reading {shown}"),
                format!("{zero_filled} bytes zero-filled: {why}"),
            );
        }
        self.manifest_members.push(ManifestMember {
            path: name,
            size,
            sha256: sha,
            kind: MemberKind::File,
            source: Some(c.source.clone()),
            original_path: Some(shown),
            target,
            mtime: Some(format_time(mtime)),
            first: None,
            last: None,
            note,
        });
        Ok(())
    }

    fn add_journal(
        &mut self,
        src: &JournalSourceInput,
        journalctl: &Path,
        since: SystemTime,
        scratch_dir: &Path,
    ) -> Result<(), BundleError> {
        let name = self.unique_name(format!(
            "journal/{}.export",
            sanitize_path(Path::new(&src.name))
        ));
        // Tar needs a member's size before its data, and journalctl's output size is
        // unknown until it ends: spool it to a scratch file (disk, not memory), bounded
        // by what is left of the budget.
        let room = self.budget.saturating_sub(
            self.written
                .saturating_add(tar_cost(&name, 0))
                .saturating_add(tar_cost(MANIFEST_NAME, self.manifest_est + 4096)),
        );
        let scratch = match tempfile::tempfile_in(scratch_dir) {
            Ok(f) => f,
            Err(e) => {
                self.error(
                    format!("journal {}", src.name),
                    format!("scratch file: {e}"),
                );
                return Ok(());
            }
        };
        let since_arg = format!(
            "--since=@{}",
            since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        );
        let mut cmd = Command::new(journalctl);
        cmd.arg("--output=export").arg(&since_arg).arg("--no-pager");
        if let Some(d) = &src.directory {
            cmd.arg("--directory").arg(d);
        }
        let run = spool_command(cmd, scratch, room);
        let (mut scratch, stats) = match run {
            Ok(v) => v,
            Err(e) => {
                self.error(
                    format!("journal {} ({})", src.name, journalctl.display()),
                    e,
                );
                return Ok(());
            }
        };
        if stats.over_budget {
            self.leave_out(
                &name,
                None,
                format!(
                    "journal export larger than the {} bytes left — bundle size cap {} reached",
                    room, self.cap
                ),
                true,
            );
            return Ok(());
        }
        if let Err(e) = io::Seek::seek(&mut scratch, io::SeekFrom::Start(0)) {
            self.error(format!("journal {}", src.name), e.to_string());
            return Ok(());
        }
        let extra = src.name.len() + src.directory.as_ref().map_or(0, |d| d.as_os_str().len());
        if !self.admit(&name, stats.bytes, extra) {
            return Ok(());
        }
        let (sha, _, _) = self.append(&name, stats.bytes, crate::clock::now(), scratch)?;
        let micros = |u: u64| format_time(SystemTime::UNIX_EPOCH + Duration::from_micros(u));
        self.manifest_members.push(ManifestMember {
            path: name,
            size: stats.bytes,
            sha256: sha,
            kind: MemberKind::Journal,
            source: Some(src.name.clone()),
            original_path: src.directory.as_ref().map(|d| d.display().to_string()),
            target: None,
            mtime: None,
            first: stats.first_us.map(micros),
            last: stats.last_us.map(micros),
            note: Some(format!("entries: {}; {since_arg}", stats.entries)),
        });
        Ok(())
    }
}

#[derive(Default)]
struct SpoolStats {
    bytes: u64,
    over_budget: bool,
    entries: u64,
    first_us: Option<u64>,
    last_us: Option<u64>,
}

/// Tracks `__REALTIME_TIMESTAMP=` among the first lines of each entry of a journal
/// export stream (journalctl puts it right after `__CURSOR=`), across buffer
/// boundaries, keeping at most one short line. Binary field values are never looked at
/// past an entry's first lines, so they cannot fake a timestamp there.
struct ExportScanner {
    /// Index of the current line within its entry.
    line_no: u32,
    line: Vec<u8>,
    in_line: bool,
    skipping_line: bool,
}

impl ExportScanner {
    fn new() -> Self {
        ExportScanner {
            line_no: 0,
            line: Vec::new(),
            in_line: false,
            skipping_line: false,
        }
    }

    fn feed(&mut self, data: &[u8], stats: &mut SpoolStats) {
        const KEY: &[u8] = b"__REALTIME_TIMESTAMP=";
        for &b in data {
            if b == b'\n' {
                if !self.in_line {
                    // An empty line ends an entry.
                    self.line_no = 0;
                    continue;
                }
                if !self.skipping_line
                    && let Some(v) = self.line.strip_prefix(KEY)
                    && let Some(us) = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok())
                {
                    stats.entries += 1;
                    stats.first_us = Some(stats.first_us.map_or(us, |f: u64| f.min(us)));
                    stats.last_us = Some(stats.last_us.map_or(us, |l: u64| l.max(us)));
                }
                self.in_line = false;
                self.skipping_line = false;
                self.line.clear();
                self.line_no = self.line_no.saturating_add(1);
                continue;
            }
            if !self.in_line {
                self.in_line = true;
                self.skipping_line = self.line_no >= 4;
            }
            if !self.skipping_line {
                if self.line.len() < 64 {
                    self.line.push(b);
                } else {
                    self.skipping_line = true;
                }
            }
        }
    }
}

/// Run `cmd`, copying its stdout into `out` up to `limit` bytes.
fn spool_command(mut cmd: Command, out: File, limit: u64) -> Result<(File, SpoolStats), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run: {e}"))?;
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr {
            let _ = s.take(4096).read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).trim().to_string()
    });
    let mut stats = SpoolStats::default();
    let mut scanner = ExportScanner::new();
    let mut w = BufWriter::new(out);
    let mut copy_err = None;
    if let Some(mut stdout) = child.stdout.take() {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    copy_err = Some(e.to_string());
                    break;
                }
            };
            if stats.bytes + n as u64 > limit {
                stats.over_budget = true;
                break;
            }
            // n <= buf.len(): read never reports more than the buffer.
            let chunk = &buf[..n];
            scanner.feed(chunk, &mut stats);
            if let Err(e) = w.write_all(chunk) {
                copy_err = Some(format!("scratch file: {e}"));
                break;
            }
            stats.bytes += n as u64;
        }
    }
    if stats.over_budget || copy_err.is_some() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let stderr = err_reader.join().unwrap_or_default();
    if let Some(e) = copy_err {
        return Err(e);
    }
    if !stats.over_budget && !status.success() {
        return Err(format!("exited with {status}: {stderr}"));
    }
    let file = w
        .into_inner()
        .map_err(|e| format!("scratch file: {}", e.error()))?;
    Ok((file, stats))
}

/// Build the evidence bundle of `incident` at `out` (a `.tar.gz`).
///
/// `window`: how far before discovery the logs reach; the window ends now.
/// `max_size`: members that would push the bundle past it are left out (and listed).
pub fn build_bundle(
    out: &Path,
    incident: &Incident,
    inputs: &BundleInputs,
    window: Duration,
    max_size: u64,
) -> Result<BundleSummary, BundleError> {
    if max_size < MIN_CAP {
        return Err(BundleError::CapTooSmall {
            cap: max_size,
            min: MIN_CAP,
        });
    }
    let now = inputs.now.unwrap_or_else(SystemTime::now);
    let window_from = incident
        .discovered_at
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let dir = out.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut tmp_name = out.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".partial");
    let tmp_path = dir.join(tmp_name);
    let file = File::create(&tmp_path).map_err(io_err("creating", &tmp_path))?;
    let gz = GzEncoder::new(
        BufWriter::with_capacity(256 * 1024, file),
        Compression::new(6),
    );
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    // gzip can grow incompressible data by ~0.03%: keep that much headroom.
    let budget = max_size - max_size / 1000;
    // The fixed part of the manifest: the incident record (details escaped at worst)
    // plus agent identity, window and framing.
    let fixed = serde_json::to_vec_pretty(incident).map_or(0, |v| v.len() as u64)
        + 6 * (inputs.agent_id.len() + inputs.host.len() + inputs.agent_version.len()) as u64
        + 16 * 1024;
    let mut w = Writer {
        tar,
        tmp_path: tmp_path.clone(),
        written: 1024, // the two zero blocks that end a tar archive
        budget,
        cap: max_size,
        names: HashSet::new(),
        manifest_members: Vec::new(),
        left_out: Vec::new(),
        errors: Vec::new(),
        manifest_est: fixed,
        left_out_more: 0,
        errors_more: 0,
    };
    let result = fill(&mut w, inputs, window_from, dir);
    let result = result.and_then(|()| finish(w, incident, inputs, window_from, now, max_size));
    let (manifest_sha256, members, left_out, errors) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp_path);
            return Err(e);
        }
    };
    fs::rename(&tmp_path, out).map_err(io_err("renaming into", out))?;
    crate::util::sync_dir(dir).map_err(io_err("syncing", dir))?;
    let size = fs::metadata(out).map_err(io_err("stat", out))?.len();
    tracing::info!(
        path = %out.display(),
        size,
        members,
        left_out,
        errors,
        manifest_sha256 = %manifest_sha256,
        "evidence bundle built"
    );
    Ok(BundleSummary {
        path: out.to_path_buf(),
        size,
        members,
        left_out,
        errors,
        manifest_sha256,
    })
}

fn fill(
    w: &mut Writer,
    inputs: &BundleInputs,
    window_from: SystemTime,
    scratch_dir: &Path,
) -> Result<(), BundleError> {
    // Host facts first: small, and what every analyst reads first.
    if inputs.host_facts {
        for fact in hostfacts::gather() {
            match fact.content {
                Ok(bytes) => {
                    w.add_bytes(format!("host/{}", fact.name), &bytes, MemberKind::Host)?
                }
                Err(e) => w.error(format!("host fact {}", fact.name), e),
            }
        }
    }
    for j in &inputs.journal_sources {
        w.add_journal(j, &inputs.journalctl, window_from, scratch_dir)?;
    }
    // Files: newest first, so under the cap the most recent evidence is kept.
    let mut seen_inodes = HashSet::new();
    let mut candidates = Vec::new();
    let mut listings = DirListings::default();
    let guards: Vec<ReadGuard> = inputs
        .file_sources
        .iter()
        .map(|s| ReadGuard::new(&s.include, &s.exclude, s.follow_symlinks, &inputs.protected))
        .collect();
    for (gi, src) in inputs.file_sources.iter().enumerate() {
        let mut paths = Vec::new();
        for p in crate::agent::sources::file::expand(&src.include, &src.exclude) {
            let siblings = listings.rotated_siblings(&p);
            paths.push((p, true));
            paths.extend(
                siblings
                    .into_iter()
                    .filter(|s| !is_excluded(s, &src.exclude))
                    .map(|s| (s, false)),
            );
        }
        for (path, matched) in paths {
            // The guard first: a refused path is named in the manifest, not mistaken
            // for another name of a file it points to.
            let guard = &guards[gi];
            let opened = if matched {
                guard.open(&path).map(|o| o.file)
            } else {
                guard.open_known(&path)
            };
            let meta = match opened.map(|f| f.metadata()) {
                Ok(Ok(m)) if m.is_file() => m,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) | Err(Refused::Io(e)) => {
                    w.error(format!("stat {}", path.display()), e.to_string());
                    continue;
                }
                Err(e) => {
                    w.leave_out(&path.display().to_string(), None, e.to_string(), true);
                    continue;
                }
            };
            {
                use std::os::unix::fs::MetadataExt;
                if !seen_inodes.insert((meta.dev(), meta.ino())) {
                    continue;
                }
            }
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if mtime < window_from {
                let reason = format!(
                    "last modified {} — before the window (from {})",
                    format_time(mtime),
                    format_time(window_from)
                );
                w.leave_out(&path.display().to_string(), Some(meta.len()), reason, false);
                continue;
            }
            candidates.push(Candidate {
                source: src.name.clone(),
                path,
                mtime,
                guard: gi,
                matched,
            });
        }
    }
    candidates.sort_by(|a, b| b.mtime.cmp(&a.mtime).then(a.path.cmp(&b.path)));
    for c in &candidates {
        // `c.guard` is an index from enumerating `inputs.file_sources`, which `guards`
        // mirrors one to one.
        w.add_file(c, &guards[c.guard])?;
    }
    Ok(())
}

fn finish(
    mut w: Writer,
    incident: &Incident,
    inputs: &BundleInputs,
    window_from: SystemTime,
    now: SystemTime,
    cap: u64,
) -> Result<(String, u64, u64, u64), BundleError> {
    let members = w.manifest_members.len() as u64;
    let left_out = w.left_out.len() as u64 + w.left_out_more;
    let errors = w.errors.len() as u64 + w.errors_more;
    if w.left_out_more > 0 {
        w.left_out.push(LeftOut {
            path: "...".into(),
            size: None,
            reason: format!(
                "{} more left out (list cut at {MAX_LISTED})",
                w.left_out_more
            ),
        });
    }
    if w.errors_more > 0 {
        w.errors.push(BundleProblem {
            what: "...".into(),
            error: format!("{} more errors (list cut at {MAX_LISTED})", w.errors_more),
        });
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        created_at: crate::clock::now(),
        window_from,
        window_to: now,
        agent: AgentIdentity {
            id: inputs.agent_id.clone(),
            host: inputs.host.clone(),
            version: inputs.agent_version.clone(),
        },
        drill: incident.drill,
        incident: incident.clone(),
        size_cap: cap,
        members: std::mem::take(&mut w.manifest_members),
        left_out: std::mem::take(&mut w.left_out),
        errors: std::mem::take(&mut w.errors),
    };
    let mut bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| BundleError::Manifest(e.to_string()))?;
    bytes.push(b'\n');
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(BundleError::Manifest(format!(
            "{} bytes, more than the {MAX_MANIFEST_BYTES} a verifier accepts",
            bytes.len()
        )));
    }
    let sha = hex(&Sha256::digest(&bytes));
    w.append(
        MANIFEST_NAME,
        bytes.len() as u64,
        crate::clock::now(),
        &bytes[..],
    )?;
    let tmp = w.tmp_path.clone();
    let gz = w.tar.into_inner().map_err(io_err("finishing", &tmp))?;
    let buf = gz.finish().map_err(io_err("finishing", &tmp))?;
    let file = buf
        .into_inner()
        .map_err(|e| io_err("flushing", &tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    Ok((sha, members, left_out, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitised_names() {
        assert_eq!(
            sanitize_path(Path::new("/var/log/app.log")),
            "var/log/app.log"
        );
        assert_eq!(sanitize_path(Path::new("/a/../b")), "a/__/b");
        assert_eq!(sanitize_path(Path::new("a\u{1}b\\c")), "a_b_c");
        assert_eq!(sanitize_path(Path::new("/")), "_");
        let long = "x".repeat(3000);
        assert!(bound_name(long).len() <= MAX_NAME_BYTES);
    }

    #[test]
    fn exact_reader_cuts_and_fills() {
        let mut out = Vec::new();
        ExactHashingReader::new(&b"abcdef"[..], 3)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abc");
        let mut out = Vec::new();
        let mut r = ExactHashingReader::new(&b"ab"[..], 4);
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab\0\0");
        assert_eq!(r.zero_filled, 2);
    }

    #[test]
    fn export_scanner_finds_times_across_chunks() {
        let data = b"__CURSOR=s=1\n__REALTIME_TIMESTAMP=10\nMESSAGE=x\n\n__REALTIME_TIMESTAMP=30\nMESSAGE=__REALTIME_TIMESTAMP=99\n\n";
        let mut stats = SpoolStats::default();
        let mut s = ExportScanner::new();
        for chunk in data.chunks(5) {
            s.feed(chunk, &mut stats);
        }
        assert_eq!(
            (stats.entries, stats.first_us, stats.last_us),
            (2, Some(10), Some(30))
        );
    }
}
