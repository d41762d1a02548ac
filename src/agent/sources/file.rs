//! The file source: tails files matched by globs, across rotation and truncation.
//!
//! Invariants it keeps:
//! - A file is known by `(device, inode)` plus a fingerprint of its first bytes, never
//!   by its name: a renamed file keeps being read to its end; a new file at the old name
//!   is a new file; a reused inode with other content is a new file.
//! - `offset` (the checkpoint) only ever points just after a complete line that is in a
//!   batch; a partial last line waits in memory, bounded by `max_line_bytes`.
//! - Memory per file is bounded: one shared read buffer per source, and at most
//!   `max_line_bytes` of pending partial line per file.
//! - A file that left its path (rotated or deleted) stays open until it has been idle
//!   for `rotate_wait`, so writers that keep appending until they reopen lose nothing.
//! - Descriptors are bounded by `max_open_files`: beyond it, the least recently active
//!   file that is idle at its end and still at its path is closed ("parked") and
//!   reopened, checked by inode and fingerprint, when its size changes. Files that left
//!   their path are never parked: they may be gone by the time we would reopen them.
//!   A file rotated away while the agent was down is found again by inode in the
//!   directory it was in, and read to its end.
//!
//! The source runs on a plain thread (file reads block) and blocks on the bounded
//! channel to the pipeline when it is full: that is how a full spool pauses it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use notify::Watcher;
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::SealedBatch;
use super::checkpoint::FilePos;
use super::guard::ReadGuard;
use crate::config::{FileSourceConfig, StartAt};
use crate::event::{FilePrefix, encode_file_line};
use crate::util::now_rfc3339;

/// Fingerprint covers up to this many leading bytes.
const FP_MAX: usize = 256;
/// Read size; large reads make line splitting and syscalls cheap.
const READ_CHUNK: usize = 1 << 20;
/// A read turn that took less than this is steady traffic, not a backlog.
const SMALL_TURN: u64 = 64 << 10;
/// At most this much is read from one file before looking at the others (fairness).
const MAX_READ_PER_TURN: u64 = 16 << 20;
/// Longest sleep when nothing happens; bounds latency when inotify is unavailable.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Files the watcher opened early that wait for the source loop; beyond this the rescan
/// opens them, so a burst of creations cannot take unbounded descriptors.
const EARLY_QUEUE: usize = 128;
/// At most one "files vanished" warning per source per this period.
const VANISHED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Counters shown by `soclink status`.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub lines: AtomicU64,
    pub bytes: AtomicU64,
    pub truncated: AtomicU64,
    pub files: AtomicU64,
    pub errors: AtomicU64,
    /// New files that were gone before they could be opened (deleted, or renamed to a
    /// name the globs do not match), and parked files deleted before being reopened.
    pub vanished: AtomicU64,
}

/// Batch limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_bytes: u64,
    pub max_delay: Duration,
}

/// Expand include globs, drop excluded paths; only regular files (a symlink to one is
/// listed: whether it is read is for [`ReadGuard::open`] to say).
pub fn expand(include: &[String], exclude: &[glob::Pattern]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for pattern in include {
        let Ok(paths) = glob::glob(pattern) else {
            continue;
        };
        for path in paths.flatten() {
            if is_excluded(&path, exclude) || !path.is_file() {
                continue;
            }
            if seen.insert(path.clone()) {
                out.push(path);
            }
        }
    }
    out
}

/// A pattern without `/` matches the file name (`*.gz`); one with `/` the whole path.
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

type Key = (u64, u64);

struct Tracked {
    file: File,
    /// The name the file had when first tracked (goes into events and checkpoints).
    path: String,
    key: Key,
    fp_len: u32,
    fp: u64,
    /// Just after the last complete line handed to a batch.
    offset: u64,
    /// Bytes read so far (offset + pending partial line + discarded overflow).
    read_pos: u64,
    /// Start of a line whose newline has not arrived yet, at most max_line_bytes.
    partial: Vec<u8>,
    /// The pending line exceeded max_line_bytes; the rest is skipped until its newline.
    overflow: bool,
    last_data: Instant,
    /// Still found at a path matched by the globs (false: rotated away or deleted).
    at_path: bool,
    /// Where the file was last seen; a parked file is reopened from here.
    seen_at: PathBuf,
    at_eof: bool,
}

/// A file closed to stay within `max_open_files`: it was idle at its end (no partial
/// line) and at a matched path. Everything needed to reopen it where it stopped.
struct Parked {
    path: String,
    seen_at: PathBuf,
    fp_len: u32,
    fp: u64,
    offset: u64,
    /// Size at the last rescan: a size other than `offset` means there is something to read
    /// (or it was truncated), so it is reopened.
    len: u64,
}

impl Tracked {
    fn pos(&self, gone: bool) -> FilePos {
        FilePos {
            dev: self.key.0,
            ino: self.key.1,
            fp_len: self.fp_len,
            fp: self.fp,
            path: self.path.clone(),
            offset: self.offset,
            gone,
        }
    }
}

/// The batch being filled.
struct Open {
    raw: Vec<u8>,
    events: u32,
    day: String,
    started: Option<Instant>,
    cursor: HashMap<Key, FilePos>,
    days: crate::clock::DayFiler,
}

pub struct FileSource {
    name: String,
    host: String,
    cfg: FileSourceConfig,
    limits: BatchLimits,
    out: mpsc::Sender<SealedBatch>,
    stop: CancellationToken,
    stats: Arc<SourceStats>,
    files: HashMap<Key, Tracked>,
    parked: HashMap<Key, Parked>,
    /// `stats.vanished` when it was last logged, and when.
    vanished_logged: (u64, Option<Instant>),
    batch: Open,
    buf: Vec<u8>,
    /// Most bytes one read has written into `buf` since it was allocated: its pages
    /// stay resident after that (see `read_file`).
    buf_touched: usize,
    /// Checkpointed positions not yet matched to a file (startup only).
    known: HashMap<Key, FilePos>,
    first_scan: bool,
    /// A file that cannot be opened or read fails again at every rescan: warn once a
    /// minute per file, not every few hundred milliseconds.
    warn: crate::util::LogLimiter,
    /// What may be opened as a log (symlink policy, the agent's own files).
    guard: Arc<ReadGuard>,
}

impl FileSource {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        host: String,
        cfg: FileSourceConfig,
        limits: BatchLimits,
        checkpoint: Vec<FilePos>,
        out: mpsc::Sender<SealedBatch>,
        stop: CancellationToken,
        stats: Arc<SourceStats>,
    ) -> FileSource {
        let guard = Arc::new(ReadGuard::new(
            &cfg.include,
            &cfg.exclude,
            cfg.follow_symlinks,
            &cfg.protected,
        ));
        FileSource {
            guard,
            name,
            host,
            cfg,
            limits,
            out,
            stop,
            stats,
            files: HashMap::new(),
            parked: HashMap::new(),
            vanished_logged: (0, None),
            batch: Open {
                raw: Vec::new(),
                events: 0,
                day: String::new(),
                started: None,
                cursor: HashMap::new(),
                days: crate::clock::DayFiler::default(),
            },
            buf: vec![0; READ_CHUNK],
            buf_touched: 0,
            known: checkpoint
                .into_iter()
                .map(|p| ((p.dev, p.ino), p))
                .collect(),
            first_scan: true,
            warn: crate::util::LogLimiter::default(),
        }
    }

    /// Run until `stop` is cancelled; then seal what is buffered and return.
    pub fn run(mut self) {
        // true: the directory changed (a rescan is due); false: data was written.
        let (wake_tx, wake_rx) = std_mpsc::channel::<bool>();
        let (early_tx, early_rx) = std_mpsc::sync_channel::<(PathBuf, File)>(EARLY_QUEUE);
        let _watcher = self.watch(wake_tx, early_tx);
        self.check_descriptor_limit();
        self.rescan();
        let mut last_scan = Instant::now();
        while !self.stop.is_cancelled() {
            self.adopt_early(&early_rx);
            let unparked = self.unpark();
            self.log_vanished(false);
            let progressed = self.read_all(&early_rx) | unparked;
            if self.stop.is_cancelled() {
                break;
            }
            let mut rescan_now = last_scan.elapsed() >= self.cfg.rescan_interval;
            if !progressed {
                self.expire_idle();
                if self.batch_due() {
                    self.seal();
                }
                let wait = self.next_wait();
                match wake_rx.recv_timeout(wait) {
                    Ok(structural) => {
                        // Appends only need the read above; a glob expansion, a stat and
                        // a fingerprint read per file on each of them cost a writer that
                        // appends line by line most of a core.
                        rescan_now |= structural;
                        while let Ok(s) = wake_rx.try_recv() {
                            rescan_now |= s;
                        }
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => {}
                }
            } else if self.batch_due() {
                self.seal();
            }
            if rescan_now {
                self.expire_idle();
                self.rescan();
                last_scan = Instant::now();
            }
        }
        self.log_vanished(true);
        self.seal();
    }

    /// inotify on the directories the globs live in; events only wake the loop.
    fn watch(
        &self,
        wake: std_mpsc::Sender<bool>,
        early: std_mpsc::SyncSender<(PathBuf, File)>,
    ) -> Option<notify::RecommendedWatcher> {
        let stats = self.stats.clone();
        let include: Vec<glob::Pattern> = self
            .cfg
            .include
            .iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .collect();
        let exclude = self.cfg.exclude.clone();
        let guard = self.guard.clone();
        let mut watcher = match notify::recommended_watcher(
            move |res: notify::Result<notify::Event>| {
                // Truncation shows up as a data write too: the periodic rescan catches it.
                let structural = res.as_ref().map_or(true, |ev| {
                    !matches!(
                        ev.kind,
                        notify::EventKind::Modify(notify::event::ModifyKind::Data(_))
                            | notify::EventKind::Access(_)
                    )
                });
                // Open a newly created (or renamed-into-place) matching file right away: under
                // fast rotation it may be renamed away again before the next rescan, and an
                // open descriptor keeps it readable whatever its name becomes.
                if let Ok(ev) = res {
                    let creates = matches!(
                        ev.kind,
                        notify::EventKind::Create(_)
                            | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
                    );
                    let created = matches!(ev.kind, notify::EventKind::Create(_));
                    if creates {
                        for p in ev.paths {
                            if !include.iter().any(|g| g.matches_path(&p))
                                || is_excluded(&p, &exclude)
                            {
                                continue;
                            }
                            match guard.open(&p) {
                                // A full queue drops the descriptor: the rescan the wake-up
                                // below triggers opens the file instead.
                                Ok(o) if o.file.metadata().is_ok_and(|m| m.is_file()) => {
                                    let _ = early.try_send((p, o.file));
                                }
                                Ok(_) => {}
                                Err(e) if created && e.is_not_found() => {
                                    stats.vanished.fetch_add(1, Ordering::Relaxed);
                                }
                                // Refusals are counted and logged by the rescan.
                                Err(_) => {}
                            }
                        }
                    }
                }
                let _ = wake.send(structural);
            },
        ) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(source = %self.name, "inotify unavailable ({e}); falling back to rescans every {:?}", self.cfg.rescan_interval);
                return None;
            }
        };
        for pattern in &self.cfg.include {
            let (dir, recursive) = watch_root(pattern);
            let mode = if recursive {
                notify::RecursiveMode::Recursive
            } else {
                notify::RecursiveMode::NonRecursive
            };
            if let Err(e) = watcher.watch(&dir, mode) {
                tracing::debug!(source = %self.name, dir = %dir.display(), "cannot watch ({e}); rescans cover it");
            }
        }
        Some(watcher)
    }

    fn next_wait(&self) -> Duration {
        let mut wait = IDLE_POLL;
        if let Some(started) = self.batch.started {
            wait = wait.min(self.limits.max_delay.saturating_sub(started.elapsed()));
        }
        wait.max(Duration::from_millis(1))
    }

    fn batch_due(&self) -> bool {
        self.batch
            .started
            .is_some_and(|s| s.elapsed() >= self.limits.max_delay)
    }

    /// Re-expand globs: pick up new files, notice files that left their path, detect
    /// truncation by fingerprint.
    fn rescan(&mut self) {
        let matched = expand(&self.cfg.include, &self.cfg.exclude);
        let mut seen: HashSet<Key> = HashSet::new();
        for path in matched {
            if let Some(e) = self.guard.refuses_link(&path) {
                self.refused(&path, &e);
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            if !seen.insert(key) {
                continue; // the same file under two matching names
            }
            if let Some(t) = self.files.get_mut(&key) {
                t.at_path = true;
                t.seen_at = path;
                continue;
            }
            if let Some(p) = self.parked.get_mut(&key) {
                p.seen_at = path;
                p.len = meta.len();
                continue;
            }
            self.open_new(&path, key, meta.len());
        }
        for t in self.files.values_mut() {
            if !seen.contains(&t.key) && t.at_path {
                t.at_path = false;
                t.last_data = Instant::now();
            }
        }
        // A parked file that left its path was rotated (or deleted): reopen it now, over
        // budget if need be, to read it to its end before it is gone for good.
        let left: Vec<Key> = self
            .parked
            .keys()
            .filter(|k| !seen.contains(k))
            .copied()
            .collect();
        for key in left {
            if let Some(p) = self.parked.remove(&key) {
                self.reopen(key, p);
            }
        }
        if self.first_scan {
            self.first_scan = false;
            self.recover_rotated_while_down();
        }
        self.check_fingerprints();
        self.stats.files.store(
            (self.files.len() + self.parked.len()) as u64,
            Ordering::Relaxed,
        );
    }

    /// Close the least recently active file that is idle at its end and still at its
    /// path; false if every open file is busy or rotated away.
    fn make_room(&mut self) -> bool {
        let victim = self
            .files
            .values()
            .filter(|t| {
                t.at_path
                    && t.at_eof
                    && t.partial.is_empty()
                    && !t.overflow
                    && t.read_pos == t.offset
            })
            .min_by_key(|t| t.last_data)
            .map(|t| t.key);
        let Some(t) = victim.and_then(|k| self.files.remove(&k)) else {
            return false;
        };
        self.parked.insert(
            t.key,
            Parked {
                path: t.path,
                seen_at: t.seen_at,
                fp_len: t.fp_len,
                fp: t.fp,
                offset: t.offset,
                len: t.read_pos,
            },
        );
        true
    }

    /// Reopen parked files whose size changed, as far as descriptors allow; true if any
    /// was reopened.
    fn unpark(&mut self) -> bool {
        let want: Vec<Key> = self
            .parked
            .iter()
            .filter(|(_, p)| p.len != p.offset)
            .map(|(k, _)| *k)
            .collect();
        let mut any = false;
        for key in want {
            if self.files.len() >= self.cfg.max_open_files && !self.make_room() {
                break;
            }
            if let Some(p) = self.parked.remove(&key) {
                self.reopen(key, p);
                any = true;
            }
        }
        any
    }

    /// Open a parked file again where it was last seen; if another file is there now, it
    /// was rotated: look for it by inode in that directory. Identity (fingerprint,
    /// truncation) is checked by `verify_identity` before the next read.
    fn reopen(&mut self, key: Key, p: Parked) {
        let same = |f: &File| f.metadata().is_ok_and(|m| (m.dev(), m.ino()) == key);
        if let Ok(file) = self.guard.open_known(&p.seen_at)
            && same(&file)
        {
            let at = p.seen_at.clone();
            self.track(file, p.path, at, key, p.fp_len, p.fp, p.offset, true);
            return;
        }
        let dir = p.seen_at.parent().unwrap_or(Path::new("/")).to_path_buf();
        if let Some((_, found, _)) = list_files(&dir).into_iter().find(|(k, _, _)| *k == key)
            && let Ok(file) = self.guard.open_known(&found)
            && same(&file)
        {
            self.track(file, p.path, found, key, p.fp_len, p.fp, p.offset, false);
            return;
        }
        self.stats.vanished.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(source = %self.name, path = %p.path, offset = p.offset, "a file closed to stay within max_open_files was deleted before it could be reopened; lines written to it after that offset were not collected");
        let pos = FilePos {
            dev: key.0,
            ino: key.1,
            fp_len: p.fp_len,
            fp: p.fp,
            path: p.path,
            offset: p.offset,
            gone: true,
        };
        self.batch.cursor.insert(key, pos);
    }

    /// Files gone before they could be opened are not errors of ours, but their lines are
    /// lost: say so, once a minute at most, with the count.
    fn log_vanished(&mut self, at_exit: bool) {
        let now = self.stats.vanished.load(Ordering::Relaxed);
        let (logged, at) = self.vanished_logged;
        if now == logged || (!at_exit && at.is_some_and(|t| t.elapsed() < VANISHED_LOG_EVERY)) {
            return;
        }
        tracing::warn!(source = %self.name, "{} file(s) matched by the globs disappeared before they could be opened (deleted, or renamed to a name the globs do not match); their lines were not collected ({now} since start)", now - logged);
        self.vanished_logged = (now, Some(Instant::now()));
    }

    /// `max_open_files` is only a safe bound if the process may open that many and more
    /// (spool, sockets, other sources); say so at start when it may not.
    fn check_descriptor_limit(&self) {
        let Some(soft) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|n| n.parse::<usize>().ok())
            })
        else {
            return;
        };
        if self.cfg.max_open_files + 128 > soft {
            tracing::warn!(source = %self.name, "max_open_files = {} leaves fewer than 128 descriptors of the process limit ({soft}) for the spool, connections and other sources: lower it or raise LimitNOFILE", self.cfg.max_open_files);
        }
    }

    /// A file opened by the watcher as soon as it appeared.
    fn adopt(&mut self, path: PathBuf, file: File) {
        let Ok(meta) = file.metadata() else {
            return;
        };
        let key = (meta.dev(), meta.ino());
        if self.files.contains_key(&key) {
            return;
        }
        if let Some(p) = self.parked.get_mut(&key) {
            p.seen_at = path;
            p.len = meta.len();
            return;
        }
        self.open_with(&path, key, meta.len(), file);
    }

    fn open_new(&mut self, path: &Path, key: Key, len: u64) {
        let key_open = format!("open {}", path.display());
        let file = match self.guard.open(path) {
            Ok(o) => {
                if let Some(t) = &o.target {
                    tracing::debug!(source = %self.name, path = %path.display(), target = %t.display(), "reading through a symlink (follow_symlinks = \"within_includes\")");
                }
                o.file
            }
            Err(e) if e.is_not_found() => return, // renamed or deleted since the glob saw it
            Err(e) => return self.refused(path, &e),
        };
        self.warn.clear(&key_open);
        self.open_with(path, key, len, file);
    }

    /// A matched path that is not read: counted as an error, warned once a minute.
    fn refused(&mut self, path: &Path, e: &dyn std::fmt::Display) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(repeated) = self.warn.check(&format!("open {}", path.display())) {
            tracing::warn!(source = %self.name, path = %path.display(), "cannot open: {e}{repeated}");
        }
    }

    fn open_with(&mut self, path: &Path, key: Key, len: u64, file: File) {
        let (fp_len, fp) = fingerprint(&file, len);
        let path_str = path.to_string_lossy().into_owned();
        let mut offset = if self.first_scan && self.cfg.start_at == StartAt::End {
            len
        } else {
            0
        };
        if let Some(known) = self.known.remove(&key)
            && known.fp_len <= fp_len
            && fp_matches(&file, known.fp_len, known.fp)
        {
            offset = if known.offset <= len {
                known.offset
            } else {
                tracing::warn!(source = %self.name, path = %path_str, "file is shorter than its checkpoint (truncated while the agent was down): reading it from the start");
                0
            };
        }
        if self.files.len() >= self.cfg.max_open_files && !self.make_room() {
            // Every open file is busy: remember where to start and open it again when a
            // descriptor is free.
            self.parked.insert(
                key,
                Parked {
                    path: path_str,
                    seen_at: path.to_path_buf(),
                    fp_len,
                    fp,
                    offset,
                    len,
                },
            );
            return;
        }
        self.track(
            file,
            path_str,
            path.to_path_buf(),
            key,
            fp_len,
            fp,
            offset,
            true,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn track(
        &mut self,
        file: File,
        path: String,
        seen_at: PathBuf,
        key: Key,
        fp_len: u32,
        fp: u64,
        offset: u64,
        at_path: bool,
    ) {
        self.files.insert(
            key,
            Tracked {
                file,
                path,
                key,
                fp_len,
                fp,
                offset,
                read_pos: offset,
                partial: Vec::new(),
                overflow: false,
                last_data: Instant::now(),
                at_path,
                seen_at,
                at_eof: false,
            },
        );
    }

    /// Checkpointed files no longer at a matching path: look for them by inode in the
    /// directory they were in (`app.log` → `app.log.1`) and read them to their end.
    fn recover_rotated_while_down(&mut self) {
        let known = std::mem::take(&mut self.known);
        let mut dirs: HashMap<PathBuf, Vec<(Key, PathBuf, u64)>> = HashMap::new();
        for (key, pos) in known {
            let dir = Path::new(&pos.path)
                .parent()
                .unwrap_or(Path::new("/"))
                .to_path_buf();
            let entries = dirs.entry(dir.clone()).or_insert_with(|| list_files(&dir));
            let found = entries.iter().find(|(k, _, _)| *k == key).cloned();
            let Some((_, found_path, len)) = found else {
                tracing::warn!(source = %self.name, path = %pos.path, offset = pos.offset, "a checkpointed file is gone (deleted or compressed while the agent was down); any lines written to it after that offset were not collected");
                continue;
            };
            let Ok(file) = self.guard.open_known(&found_path) else {
                continue;
            };
            if !fp_matches(&file, pos.fp_len, pos.fp) || len < pos.offset {
                tracing::warn!(source = %self.name, path = %pos.path, "the checkpointed inode now holds other content; not reading it");
                continue;
            }
            if len > pos.offset {
                tracing::info!(source = %self.name, path = %pos.path, now = %found_path.display(), "file was rotated while the agent was down: reading its remaining {} bytes", len - pos.offset);
            }
            self.track(
                file, pos.path, found_path, key, pos.fp_len, pos.fp, pos.offset, false,
            );
        }
    }

    /// Truncation that rewrote past our offset, and late fingerprint upgrade for files
    /// that were empty or short when first seen.
    fn check_fingerprints(&mut self) {
        let mut reset = Vec::new();
        for t in self.files.values_mut() {
            if !t.at_path {
                continue;
            }
            let Ok(meta) = t.file.metadata() else {
                continue;
            };
            if !fp_matches(&t.file, t.fp_len, t.fp) {
                reset.push(t.key);
                continue;
            }
            if (t.fp_len as usize) < FP_MAX && meta.len() > u64::from(t.fp_len) {
                let (fp_len, fp) = fingerprint(&t.file, meta.len());
                t.fp_len = fp_len;
                t.fp = fp;
            }
        }
        for key in reset {
            self.truncated(key);
        }
    }

    fn truncated(&mut self, key: Key) {
        self.read_copy_of_truncated(key);
        let Some(t) = self.files.get_mut(&key) else {
            return;
        };
        tracing::info!(source = %self.name, path = %t.path, "file was truncated (copytruncate?): reading it again from the start");
        let len = t.file.metadata().map(|m| m.len()).unwrap_or(0);
        let (fp_len, fp) = fingerprint(&t.file, len);
        t.fp_len = fp_len;
        t.fp = fp;
        t.offset = 0;
        t.read_pos = 0;
        t.partial.clear();
        t.overflow = false;
        t.at_eof = false;
        let pos = t.pos(false);
        self.batch.cursor.insert(key, pos);
    }

    /// Before each turn: a file that shrank, or whose first bytes changed, was
    /// truncated (and maybe rewritten past our offset); a short fingerprint grows with
    /// the file so a later copytruncate can be matched to its copy.
    fn verify_identity(&mut self, key: Key) {
        let Some(t) = self.files.get_mut(&key) else {
            return;
        };
        let Ok(meta) = t.file.metadata() else {
            return;
        };
        if meta.len() < t.read_pos || !fp_matches(&t.file, t.fp_len, t.fp) {
            self.truncated(key);
        } else if (t.fp_len as usize) < FP_MAX && meta.len() > u64::from(t.fp_len) {
            let (fp_len, fp) = fingerprint(&t.file, meta.len());
            t.fp_len = fp_len;
            t.fp = fp;
        }
    }

    /// copytruncate copies the file, then truncates it: lines written after our last
    /// read are only in the copy. If a file in the same directory starts with the same
    /// bytes and reaches past our offset, it is that copy: read its tail from our offset.
    fn read_copy_of_truncated(&mut self, key: Key) {
        let Some(t) = self.files.get(&key) else {
            return;
        };
        if t.fp_len == 0 || t.offset == 0 {
            return;
        }
        let dir = Path::new(&t.path)
            .parent()
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        let (offset, fp_len, fp, path) = (t.offset, t.fp_len, t.fp, t.path.clone());
        for (k, p, len) in list_files(&dir) {
            if k == key || self.files.contains_key(&k) || len < offset {
                continue;
            }
            let Ok(file) = self.guard.open_known(&p) else {
                continue;
            };
            if fp_matches(&file, fp_len, fp) {
                if len > offset {
                    tracing::info!(source = %self.name, path = %path, copy = %p.display(), "reading the last {} bytes written before copytruncate from the copy", len - offset);
                }
                self.track(file, path, p, k, fp_len, fp, offset, false);
                return;
            }
        }
    }

    /// One pass over all files; true if any data was read.
    /// Between files too: a file created and deleted while a long pass reads a backlog
    /// is only readable if its early descriptor is taken before the queue fills.
    fn read_all(&mut self, early: &std_mpsc::Receiver<(PathBuf, File)>) -> bool {
        let keys: Vec<Key> = self.files.keys().copied().collect();
        let mut progressed = false;
        for key in keys {
            if self.stop.is_cancelled() {
                break;
            }
            progressed |= self.read_file(key);
            self.adopt_early(early);
        }
        progressed
    }

    fn adopt_early(&mut self, early: &std_mpsc::Receiver<(PathBuf, File)>) {
        while let Ok((path, file)) = early.try_recv() {
            self.adopt(path, file);
        }
    }

    fn read_file(&mut self, key: Key) -> bool {
        self.verify_identity(key);
        let mut total = 0u64;
        let mut buf = std::mem::take(&mut self.buf);
        let mut progressed = false;
        while total < MAX_READ_PER_TURN && !self.stop.is_cancelled() {
            let Some(t) = self.files.get_mut(&key) else {
                break;
            };
            if t.file.seek(SeekFrom::Start(t.read_pos)).is_err() {
                break;
            }
            let n = match t.file.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(repeated) = self.warn.check(&format!("read {}", t.path)) {
                        tracing::warn!(source = %self.name, path = %t.path, "read error: {e}{repeated}");
                    }
                    break;
                }
            };
            if n == 0 {
                t.at_eof = true;
                // A file shorter than what we read was truncated in place.
                if let Ok(meta) = t.file.metadata()
                    && meta.len() < t.read_pos
                {
                    self.truncated(key);
                    continue;
                }
                break;
            }
            t.at_eof = false;
            t.last_data = Instant::now();
            total += n as u64;
            progressed = true;
            self.buf_touched = self.buf_touched.max(n);
            self.consume(key, &buf[..n]);
        }
        // A backlog (a catch-up after a full disk, a burst) fills the whole read buffer,
        // and its pages would stay resident through the quiet hours after, when appends
        // come a few KiB at a time. Once a turn reads little again, swap in a fresh
        // buffer: zeroed pages cost no memory until a read writes to them.
        if total < SMALL_TURN && self.buf_touched > SMALL_TURN as usize * 4 {
            buf = vec![0; READ_CHUNK];
            self.buf_touched = 0;
        }
        self.buf = buf;
        progressed
    }

    /// Split a chunk into lines and encode them into the open batch, sealing batches
    /// as they fill.
    fn consume(&mut self, key: Key, data: &[u8]) {
        let ts = now_rfc3339();
        let day = self.batch.days.day(&ts).to_string();
        let max = self.cfg.max_line_bytes as usize;
        let mut pos = 0usize;
        loop {
            if self.batch.events > 0 && self.batch.day != day {
                self.seal(); // a batch never spans two UTC days
            }
            if self.batch.events == 0 {
                self.batch.day.clone_from(&day);
            }
            let Some(t) = self.files.get_mut(&key) else {
                return;
            };
            let prefix = FilePrefix::new(&ts, &self.host, &self.name, &t.path);
            let c = split_lines(
                t,
                &mut self.batch,
                &prefix,
                data,
                pos,
                max,
                self.limits.max_bytes,
            );
            if c.lines > 0 {
                if self.batch.started.is_none() {
                    self.batch.started = Some(Instant::now());
                }
                self.batch.cursor.insert(key, t.pos(false));
            }
            self.stats.lines.fetch_add(c.lines, Ordering::Relaxed);
            self.stats.bytes.fetch_add(c.bytes, Ordering::Relaxed);
            self.stats
                .truncated
                .fetch_add(c.truncated, Ordering::Relaxed);
            match c.stopped_at {
                Some(p) => {
                    pos = p;
                    self.seal();
                }
                None => return,
            }
        }
    }

    /// Emit partial lines of idle files; drop rotated/deleted files read to their end.
    fn expire_idle(&mut self) {
        let now = Instant::now();
        let mut drop_keys = Vec::new();
        let keys: Vec<Key> = self.files.keys().copied().collect();
        for key in keys {
            let Some(t) = self.files.get(&key) else {
                continue;
            };
            if !t.at_eof {
                continue;
            }
            let idle = now.duration_since(t.last_data);
            let has_partial = !t.partial.is_empty() || t.overflow;
            if has_partial
                && (idle >= self.cfg.partial_line_timeout
                    || (!t.at_path && idle >= self.cfg.rotate_wait))
            {
                self.flush_partial(key);
            }
            let Some(t) = self.files.get(&key) else {
                continue;
            };
            if !t.at_path && idle >= self.cfg.rotate_wait && t.partial.is_empty() && !t.overflow {
                drop_keys.push(key);
            }
        }
        for key in drop_keys {
            if let Some(t) = self.files.remove(&key) {
                tracing::debug!(source = %self.name, path = %t.path, "finished a rotated or deleted file");
                self.batch.cursor.insert(key, t.pos(true));
            }
        }
    }

    fn flush_partial(&mut self, key: Key) {
        let ts = now_rfc3339();
        let day = self.batch.days.day(&ts).to_string();
        if self.batch.events > 0 && self.batch.day != day {
            self.seal();
        }
        if self.batch.events == 0 {
            self.batch.day = day;
        }
        let Some(t) = self.files.get_mut(&key) else {
            return;
        };
        let prefix = FilePrefix::new(&ts, &self.host, &self.name, &t.path);
        encode_file_line(
            &mut self.batch.raw,
            &prefix,
            t.offset,
            &t.partial,
            t.overflow,
        );
        self.stats.lines.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(t.partial.len() as u64, Ordering::Relaxed);
        self.stats
            .truncated
            .fetch_add(u64::from(t.overflow), Ordering::Relaxed);
        t.partial.clear();
        t.overflow = false;
        t.offset = t.read_pos;
        self.batch.events += 1;
        if self.batch.started.is_none() {
            self.batch.started = Some(Instant::now());
        }
        let p = t.pos(false);
        self.batch.cursor.insert(key, p);
    }

    /// Hand the open batch to the pipeline (blocking while the pipeline is full).
    fn seal(&mut self) {
        if self.batch.events == 0 {
            return;
        }
        let cursor: Vec<FilePos> = self.batch.cursor.drain().map(|(_, p)| p).collect();
        let sealed = SealedBatch {
            source: self.name.clone(),
            day: std::mem::take(&mut self.batch.day),
            events: self.batch.events,
            raw: std::mem::replace(&mut self.batch.raw, crate::pool::batch_buffer()),
            cursor: serde_json::to_value(cursor).ok(),
        };
        self.batch.events = 0;
        self.batch.started = None;
        if self.out.blocking_send(sealed).is_err() {
            // The pipeline is gone (shutting down): nothing was acknowledged, so the
            // checkpoint still points before these lines and they are read again.
            self.stop.cancel();
        }
    }
}

#[derive(Default)]
struct Consumed {
    lines: u64,
    bytes: u64,
    truncated: u64,
    /// Set when the batch filled up: where in the chunk to continue after sealing.
    stopped_at: Option<usize>,
}

/// The hot loop: find newlines with memchr, encode each complete line straight into the
/// batch, keep the unterminated rest as the file's partial line (bounded by `max`).
/// `data[from..]` is the unread part of a chunk that starts at `t.read_pos`.
fn split_lines(
    t: &mut Tracked,
    batch: &mut Open,
    prefix: &FilePrefix,
    data: &[u8],
    from: usize,
    max: usize,
    batch_max: u64,
) -> Consumed {
    let mut c = Consumed::default();
    let base = t.read_pos - from as u64;
    let mut pos = from;
    while let Some(nl) = memchr::memchr(b'\n', &data[pos..]) {
        let end = pos + nl;
        let line_start = t.offset;
        if t.partial.is_empty() && !t.overflow {
            let line = strip_cr(&data[pos..end]);
            let cut = line.len() > max;
            let line = if cut { &line[..max] } else { line };
            encode_file_line(&mut batch.raw, prefix, line_start, line, cut);
            c.truncated += u64::from(cut);
            c.bytes += line.len() as u64;
        } else {
            let room = max.saturating_sub(t.partial.len());
            let piece = &data[pos..end];
            if piece.len() > room {
                t.overflow = true;
            }
            t.partial.extend_from_slice(&piece[..piece.len().min(room)]);
            if !t.overflow && t.partial.last() == Some(&b'\r') {
                t.partial.pop();
            }
            encode_file_line(&mut batch.raw, prefix, line_start, &t.partial, t.overflow);
            c.truncated += u64::from(t.overflow);
            c.bytes += t.partial.len() as u64;
            t.partial.clear();
            t.overflow = false;
        }
        c.lines += 1;
        batch.events += 1;
        pos = end + 1;
        t.offset = base + pos as u64;
        t.read_pos = t.offset;
        if batch.raw.len() as u64 >= batch_max {
            c.stopped_at = (pos < data.len()).then_some(pos);
            return c;
        }
    }
    let rest = &data[pos..];
    if !rest.is_empty() {
        let room = max.saturating_sub(t.partial.len());
        if rest.len() > room {
            t.overflow = true;
        }
        t.partial.extend_from_slice(&rest[..rest.len().min(room)]);
    }
    t.read_pos = base + data.len() as u64;
    c
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The directory to watch for a pattern: its longest glob-free prefix.
fn watch_root(pattern: &str) -> (PathBuf, bool) {
    let mut root = PathBuf::new();
    let mut recursive = false;
    let comps: Vec<&str> = pattern.split('/').collect();
    for (i, c) in comps.iter().enumerate() {
        if c.contains(['*', '?', '[']) {
            recursive = comps[i..].len() > 1;
            return (
                if root.as_os_str().is_empty() {
                    "/".into()
                } else {
                    root
                },
                recursive,
            );
        }
        if i + 1 == comps.len() {
            break; // the file name itself: watch its directory
        }
        if c.is_empty() {
            root.push("/");
        } else {
            root.push(c);
        }
    }
    if root.as_os_str().is_empty() {
        root.push("/");
    }
    let _ = &mut recursive;
    (root, recursive)
}

fn list_files(dir: &Path) -> Vec<(Key, PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then(|| ((m.dev(), m.ino()), e.path(), m.len()))
        })
        .collect()
}

fn fingerprint(file: &File, len: u64) -> (u32, u64) {
    let n = (len as usize).min(FP_MAX);
    let mut head = vec![0u8; n];
    let got = read_exact_at(file, &mut head);
    head.truncate(got);
    (got as u32, hash64(&head))
}

fn fp_matches(file: &File, fp_len: u32, fp: u64) -> bool {
    if fp_len == 0 {
        return true;
    }
    let mut head = vec![0u8; fp_len as usize];
    read_exact_at(file, &mut head) == head.len() && hash64(&head) == fp
}

fn read_exact_at(file: &File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

fn hash64(bytes: &[u8]) -> u64 {
    let d = sha2::Sha256::digest(bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_roots() {
        assert_eq!(watch_root("/var/log/syslog"), ("/var/log".into(), false));
        assert_eq!(
            watch_root("/var/log/nginx/*.log"),
            ("/var/log/nginx".into(), false)
        );
        assert_eq!(watch_root("/var/log/*/x.log"), ("/var/log".into(), true));
    }

    #[test]
    fn exclude_by_name_or_path() {
        let ex = vec![
            glob::Pattern::new("*.gz").unwrap(),
            glob::Pattern::new("/a/skip/*").unwrap(),
        ];
        assert!(is_excluded(Path::new("/x/y.log.2.gz"), &ex));
        assert!(is_excluded(Path::new("/a/skip/z"), &ex));
        assert!(!is_excluded(Path::new("/a/keep/z"), &ex));
    }
}
