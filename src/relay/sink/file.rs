//! The relay's durable store: appends each acknowledged batch's gzip member, unchanged,
//! to `<store>/<agent-id>/<source>/<YYYY-MM-DD>.ndjson.gz`, **exactly once** across
//! crashes (SIGKILL or power loss) at any moment.
//!
//! The store owns the store files and the dedupe state; the relay owns the batches
//! until [`Store::commit`] returns, and acknowledges only after that.
//!
//! # Invariant
//!
//! After any crash and [`Store::open`], every store file holds exactly the gzip members
//! of the batches that were committed (hence possibly acknowledged), once each, in
//! arrival order, and [`Store::stored_seq`] is the highest committed sequence of each
//! stream. Everything else was never acknowledged, is cut away, and the agent resends it.
//!
//! # On disk
//!
//! One state file per agent, `<state_dir>/dedupe/<agent-id>.state`, so a commit
//! rewrites only the agents it touched (group commit: many agents, one state-dir fsync):
//!
//! ```text
//! struct StateFile {
//!     header: "soclink-store-state v1 crc32=<8 lowercase hex> len=<decimal>\n",
//!     body:   [u8; len],            // JSON, CRC-32 (IEEE) of exactly these bytes
//! }
//! struct Body {                     // JSON object
//!     version: 1,
//!     agent: String,                // must equal the file name's agent id
//!     streams: { <stream>: u64 },   // highest committed seq per stream
//!     files: [ { source: String, day: "YYYY-MM-DD",
//!                len: u64,          // durable length: bytes of committed batches
//!                touched_unix: u64 } ],  // last append (relay clock), for pruning
//!     bytes: u64,                   // gzip bytes committed in total (status)
//!     last_write_unix_ms: u64 | null,
//!     dedupe_reset: {               // absent unless rule 5 reset this agent
//!         at_unix_ms: u64, reason: String, quarantined: String,  // file set aside
//!         streams: { <stream>: u64 },  // first seq stored after the reset
//!     } | absent,
//! }
//! ```
//!
//! # Rules
//!
//! 1. **Intent before the first byte.** Before the first append to a store file that is
//!    not in the agent's state (a new file, or an old one whose entry was pruned), the
//!    state is rewritten with that file at its current length (0 if absent). Hence a
//!    store file that is *not* in the state holds only committed batches, and every file
//!    that may hold uncommitted bytes is in the state with a length that cuts them off.
//!    The same happens when a file no longer has its recorded length (an operator moved
//!    it away while the relay ran), so an append never leaves a hole. Cost: one extra
//!    state write per new (agent, source, day), e.g. per source at each UTC midnight.
//! 2. **Commit order.** `commit` fsyncs each touched store file once; for each file
//!    that got its first bytes, its source dir, agent dir and the store root (even if
//!    they existed: the process that created them may have died before syncing them);
//!    then writes each touched agent's state (temp, fsync, rename) and fsyncs the state
//!    dir once.
//!    Only then may the relay acknowledge. A crash before the rename leaves the previous
//!    state, whose lengths cut off the new bytes; after it, the bytes are already durable.
//! 3. **Open cuts back.** On open, every file in a state that is longer than its
//!    recorded length is truncated to it (fsynced). Shorter or missing files (damage or
//!    an operator who archived them) are reported in [`StoreRecovery`] and the entry is
//!    corrected, so a later append never leaves a hole.
//! 4. **Failures.** An I/O error during `commit`, or an append whose torn tail cannot be
//!    cut off, poisons the store ([`StoreError::Poisoned`]): drop it and [`Store::open`]
//!    again, which applies rule 3. Nothing is acknowledged in between.
//! 5. **Corrupt state is quarantined, the agent's dedupe restarts.** A state file with a
//!    bad header, length, CRC, JSON, or an unsafe name inside (or whose file name is not
//!    an agent id) is renamed aside to `<name>.corrupt` (`.corrupt.1`, ... if taken),
//!    reported once in [`StoreRecovery::quarantined`] and logged once; every other agent
//!    is opened as usual. Refusing to start would be a crash loop under a service
//!    manager and would stop the store for *every* agent. Why not rebuild: the store
//!    files hold the batches' gzip members only, without agent sequence numbers, so
//!    they cannot tell which batches were acknowledged, and trusting a damaged
//!    position could only err in two ways: too high drops new batches as duplicates
//!    (silent loss), too low stores some batches twice. So the agent restarts at
//!    position 0: its files are kept exactly as they are (nothing that may have been
//!    acknowledged is cut; the next append to each file records an intent at its
//!    current length, rule 1), the relay's HelloAck says 0, the agent resumes after its
//!    own acknowledged position, and its first batch per stream is accepted as a gap.
//!    Duplicates are then possible only for batches the relay had stored but whose
//!    acknowledgement the agent never saw: at most the agent's in-flight window
//!    ([`crate::ship::WINDOW_BATCHES`]) per stream, from the first seq stored after the
//!    reset. [`Store::dedupe_resets`] reports that range per stream (`soclink status`).
//!    If a crash also left an unacknowledged torn tail in one of that agent's files, it
//!    stays (without the state nothing can prove it was unacknowledged).
//! 6. **Bounded.** Entries of files not appended to for [`PRUNE_AFTER`] are pruned at
//!    commit (rule 1 brings them back safely); per agent at most [`MAX_STREAMS`] streams
//!    and [`MAX_FILES`] file entries; state files larger than [`MAX_STATE_BYTES`] are
//!    refused as corrupt.
//!
//! [`Store::stored_seq`] and [`Store::agents`] report committed data only; dedupe in
//! [`Store::append`] also counts appends not yet committed. One process at a time:
//! [`Store::open`] holds an exclusive lock on `<state_dir>/store.lock`.
//!
//! Names (agent, source) are single safe path components (not empty, at most
//! [`MAX_NAME_BYTES`] bytes, no leading `.`, no `/` or `\`, no control characters); `day` must be a real date.
//! Source names `incidents` and `intel` are reserved: those folders hold incident
//! records and SOC uploads in the same agent directory.
//!
//! All writes go through the [`StoreFs`] seam, so tests can model power loss.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Longest agent, source or stream name, in bytes; leaves room for suffixes within the
/// usual 255-byte file name limit.
pub const MAX_NAME_BYTES: usize = 200;
/// Streams per agent; bounds the state (an authenticated agent could invent streams).
pub const MAX_STREAMS: usize = 1024;
/// File entries per agent kept in the state at once.
pub const MAX_FILES: usize = 8192;
/// A file entry not appended to for this long is dropped from the state.
pub const PRUNE_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);
/// Largest state file accepted on open.
pub const MAX_STATE_BYTES: u64 = 16 * 1024 * 1024;
/// Source names that would collide with other folders of `<store>/<agent-id>/`.
pub const RESERVED_SOURCE_NAMES: [&str; 2] = ["incidents", "intel"];

const STATE_SUBDIR: &str = "dedupe";
const STATE_SUFFIX: &str = ".state";
const TEMP_SUFFIX: &str = ".tmp";
const CORRUPT_SUFFIX: &str = ".corrupt";
const LOCK_FILE: &str = "store.lock";
const HEADER_MAGIC: &str = "soclink-store-state v1";
/// Bounds the header line read before the body; the real header is under 64 bytes.
const MAX_HEADER_BYTES: usize = 128;

/// Where the store lives.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Root of the store files an operator reads (`zcat`, archive).
    pub store_dir: PathBuf,
    /// Private state: dedupe positions and durable lengths, and the lock file.
    pub state_dir: PathBuf,
}

/// What [`Store::append`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Written; durable after the next successful [`Store::commit`].
    Appended,
    /// `seq` is at or below the stream's position: already stored, nothing written.
    /// The relay drops it but acknowledges it.
    Duplicate,
    /// `seq` skips ahead of the stream's position: refused, nothing written.
    Gap { expected: u64 },
}

/// Which argument a name error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameField {
    Agent,
    Source,
    Stream,
}

impl std::fmt::Display for NameField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameField::Agent => "agent id",
            NameField::Source => "source name",
            NameField::Stream => "stream name",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name is not a single safe path component; nothing was written.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidName {
        field: NameField,
        /// The offending name, cut to 64 characters.
        value: String,
        reason: &'static str,
    },
    /// `day` is not a real `YYYY-MM-DD` date; nothing was written.
    #[error("invalid day {value:?}: expected a real date YYYY-MM-DD")]
    InvalidDay { value: String },
    /// A per-agent bound was reached; nothing was written.
    #[error("agent {agent:?} has too many {what} (limit {limit})")]
    LimitExceeded {
        agent: String,
        what: &'static str,
        limit: usize,
    },
    /// A state file failed its integrity checks; open quarantines it (rule 5).
    #[error("{}: corrupt store state: {reason}", path.display())]
    CorruptState { path: PathBuf, reason: String },
    /// `store_dir` and `state_dir` overlap so that names could collide.
    #[error("store options: {0}")]
    Options(String),
    /// Another process holds the store.
    #[error("{}: store is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An earlier I/O failure left memory and disk possibly apart; reopen the store.
    #[error("store is unusable after an earlier I/O failure; reopen it")]
    Poisoned,
}

/// What [`Store::open`] repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreRecovery {
    /// Files cut back to their durable length (bytes of unacknowledged batches).
    pub truncated: Vec<TruncatedFile>,
    /// Files the state knew with data that no longer exist (damage or archiving).
    pub missing: Vec<PathBuf>,
    /// Files shorter than their durable length (damage); their entry was corrected.
    pub short: Vec<TruncatedFile>,
    /// Leftover temporary state files removed.
    pub removed_temp: Vec<PathBuf>,
    /// Corrupt state files moved aside (rule 5); their agents' dedupe restarted.
    pub quarantined: Vec<QuarantinedState>,
}

/// A state file that failed its checks and was renamed aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedState {
    /// The agent whose dedupe position was lost (`None`: the file name was no agent id).
    pub agent: Option<String>,
    /// Where the file is now.
    pub aside: PathBuf,
    pub reason: String,
}

/// An agent whose dedupe state was quarantined (rule 5), kept in its new state file
/// for [`PRUNE_AFTER`] so `soclink status` shows it across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeReset {
    pub agent: String,
    pub at: SystemTime,
    pub reason: String,
    /// The quarantined file, relative to `state_dir`.
    pub quarantined: String,
    /// Per stream stored since the reset: the first seq stored after it. Batches
    /// `from ..= from + WINDOW_BATCHES - 1` may be duplicates of batches stored before.
    pub streams: Vec<ResyncedStream>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncedStream {
    pub stream: String,
    /// First seq stored after the reset.
    pub from: u64,
    /// Last seq that may duplicate one stored before the reset.
    pub through: u64,
    /// Highest seq committed now; at or past `through`, the window has passed.
    pub stored_seq: u64,
}

impl StoreRecovery {
    /// True when open found nothing to repair.
    pub fn is_clean(&self) -> bool {
        self.truncated.is_empty()
            && self.missing.is_empty()
            && self.short.is_empty()
            && self.removed_temp.is_empty()
            && self.quarantined.is_empty()
    }
}

/// A file whose length changed from `from` to `to` bytes at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedFile {
    pub path: PathBuf,
    pub from: u64,
    pub to: u64,
}

/// Status of one agent, committed data only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStoreStatus {
    pub agent: String,
    pub streams: Vec<StreamStatus>,
    /// Gzip bytes committed in total.
    pub bytes: u64,
    pub last_write: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    pub stream: String,
    pub stored_seq: u64,
}

/// The file-system operations the store needs, so tests can model power loss
/// (unsynced writes and directory entries dropped). Paths are absolute or relative to
/// the process; implementations must not follow their own path logic.
pub trait StoreFs: Send + Sync {
    /// Creates one directory; `Ok(false)` if it already exists.
    fn create_dir(&self, path: &Path) -> io::Result<bool>;
    /// Length of a regular file, `None` if it does not exist.
    fn file_len(&self, path: &Path) -> io::Result<Option<u64>>;
    /// Writes `data` at `offset`, creating the file if needed (never truncating).
    fn write_at(&self, path: &Path, offset: u64, data: &[u8]) -> io::Result<()>;
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Makes the file's data durable.
    fn sync_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Reads at most `limit + 1` bytes, so callers can detect oversized files.
    fn read_limited(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>>;
    /// Creates or replaces the file with `data` (not synced).
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl StoreFs for RealFs {
    fn create_dir(&self, path: &Path) -> io::Result<bool> {
        match std::fs::create_dir(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(false),
            Err(e) => Err(e),
        }
    }
    fn file_len(&self, path: &Path) -> io::Result<Option<u64>> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Err(io::Error::other("not a regular file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn write_at(&self, path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        f.write_all_at(data, offset)
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        OpenOptions::new().write(true).open(path)?.set_len(len)
    }
    fn sync_file(&self, path: &Path) -> io::Result<()> {
        // fsync acts on the inode, so a fresh descriptor flushes earlier writes too.
        File::open(path)?.sync_data()
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
    fn read_limited(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut buf = Vec::new();
        File::open(path)?
            .take(limit.saturating_add(1))
            .read_to_end(&mut buf)?;
        Ok(buf)
    }
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        std::fs::write(path, data)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            // Names that are not UTF-8 cannot be ours; they are ignored.
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }
}

type FileKey = (String, String); // (source, day)

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileEntry {
    len: u64,
    touched_unix: u64,
}

/// The persisted facts about one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AgentState {
    streams: BTreeMap<String, u64>,
    files: BTreeMap<FileKey, FileEntry>,
    bytes: u64,
    last_write_unix_ms: Option<u64>,
    dedupe_reset: Option<ResetJson>,
}

#[derive(Serialize, Deserialize)]
struct BodyJson {
    version: u32,
    agent: String,
    streams: BTreeMap<String, u64>,
    files: Vec<FileJson>,
    bytes: u64,
    last_write_unix_ms: Option<u64>,
    // Optional, so states written before rule 5 read unchanged, and older relays
    // (which ignore unknown fields) read these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dedupe_reset: Option<ResetJson>,
}

/// Rule 5's mark in an agent's new state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ResetJson {
    at_unix_ms: u64,
    reason: String,
    quarantined: String,
    streams: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
struct FileJson {
    source: String,
    day: String,
    len: u64,
    touched_unix: u64,
}

#[derive(Debug, Default)]
struct Agent {
    /// What the state file on disk says (plus intents, which are on disk too).
    durable: AgentState,
    /// Stream positions including appends not yet committed; drives dedupe.
    pending_seq: BTreeMap<String, u64>,
    /// File lengths including appends not yet committed; where the next append goes.
    pending_len: BTreeMap<FileKey, u64>,
    pending_bytes: u64,
}

/// The relay's store. Single writer: one `Store` per store directory (a lock file in
/// `state_dir` enforces it across processes).
pub struct Store {
    fs: Arc<dyn StoreFs>,
    store_dir: PathBuf,
    dedupe_dir: PathBuf,
    agents: BTreeMap<String, Agent>,
    /// Agents with appends since the last commit.
    dirty: BTreeSet<String>,
    /// Store files written since the last commit: each gets one fsync at commit.
    files_to_sync: BTreeSet<PathBuf>,
    /// Directories that gained an entry since the last commit.
    dirs_to_sync: BTreeSet<PathBuf>,
    /// Directories known to exist, to skip `mkdir` on the hot path.
    known_dirs: HashSet<PathBuf>,
    uncommitted: usize,
    poisoned: bool,
    /// Held for the store's lifetime; the OS releases it if the process dies.
    _lock: Option<File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("store_dir", &self.store_dir)
            .field("dedupe_dir", &self.dedupe_dir)
            .field("agents", &self.agents.len())
            .field("uncommitted", &self.uncommitted)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Opens the store on the real file system, taking the store lock, and repairs it
    /// after a crash (see the module rules).
    pub fn open(opts: StoreOptions) -> Result<(Store, StoreRecovery), StoreError> {
        let fs = RealFs;
        create_dir_all(&fs, &opts.state_dir)?;
        let lock_path = opts.state_dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: lock_path });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let (mut store, recovery) = Self::open_with_fs(opts, Arc::new(fs))?;
        store._lock = Some(lock);
        Ok((store, recovery))
    }

    /// Opens the store through `fs` without the process lock (tests, simulations).
    pub fn open_with_fs(
        opts: StoreOptions,
        fs: Arc<dyn StoreFs>,
    ) -> Result<(Store, StoreRecovery), StoreError> {
        check_layout(&opts)?;
        create_dir_all(fs.as_ref(), &opts.store_dir)?;
        create_dir_all(fs.as_ref(), &opts.state_dir)?;
        let dedupe_dir = opts.state_dir.join(STATE_SUBDIR);
        fs.create_dir(&dedupe_dir)
            .map_err(io_err("create", &dedupe_dir))?;
        // A previous process may have created these and died before syncing their
        // entries; everything committed below them depends on those entries.
        for dir in [&opts.store_dir, &opts.state_dir] {
            if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs.sync_dir(p).map_err(io_err("fsync", p))?;
            }
        }
        fs.sync_dir(&opts.state_dir)
            .map_err(io_err("fsync", &opts.state_dir))?;
        let mut store = Store {
            fs,
            store_dir: opts.store_dir,
            dedupe_dir,
            agents: BTreeMap::new(),
            dirty: BTreeSet::new(),
            files_to_sync: BTreeSet::new(),
            dirs_to_sync: BTreeSet::new(),
            known_dirs: HashSet::new(),
            uncommitted: 0,
            poisoned: false,
            _lock: None,
        };
        let recovery = store.recover()?;
        Ok((store, recovery))
    }

    fn recover(&mut self) -> Result<StoreRecovery, StoreError> {
        let mut recovery = StoreRecovery::default();
        let mut names = self
            .fs
            .list_dir(&self.dedupe_dir)
            .map_err(io_err("list", &self.dedupe_dir))?;
        names.sort();
        // Temps first: quarantining below writes (and renames) a temp of its own.
        names.sort_by_key(|n| !n.ends_with(TEMP_SUFFIX));
        for name in names {
            let path = self.dedupe_dir.join(&name);
            if name.ends_with(TEMP_SUFFIX) {
                // A temp state never renamed: its commit did not happen.
                self.fs
                    .remove_file(&path)
                    .map_err(io_err("remove", &path))?;
                recovery.removed_temp.push(path);
                continue;
            }
            let Some(agent) = name.strip_suffix(STATE_SUFFIX) else {
                continue;
            };
            if validate_component(agent).is_err() {
                // Not ours to interpret (no agent could have written it): set aside.
                self.quarantine(
                    &path,
                    None,
                    "file name is not a valid agent id",
                    &mut recovery,
                )?;
                continue;
            }
            let state = match read_state(self.fs.as_ref(), &path, agent) {
                Ok(state) => state,
                Err(StoreError::CorruptState { reason, .. }) => {
                    // Rule 5: see the module doc for why this agent restarts at 0.
                    let state = self.quarantine(&path, Some(agent), &reason, &mut recovery)?;
                    self.agents.insert(
                        agent.to_string(),
                        Agent {
                            durable: state,
                            ..Agent::default()
                        },
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (state, changed) = self.repair_files(agent, state, &mut recovery)?;
            if changed {
                write_state(self.fs.as_ref(), &self.dedupe_dir, agent, &state)?;
                self.fs
                    .sync_dir(&self.dedupe_dir)
                    .map_err(io_err("fsync", &self.dedupe_dir))?;
            }
            self.agents.insert(
                agent.to_string(),
                Agent {
                    durable: state,
                    ..Agent::default()
                },
            );
        }
        if !recovery.removed_temp.is_empty() {
            self.fs
                .sync_dir(&self.dedupe_dir)
                .map_err(io_err("fsync", &self.dedupe_dir))?;
        }
        for t in &recovery.truncated {
            tracing::warn!(path = %t.path.display(), from = t.from, to = t.to,
                "store: cut back bytes of unacknowledged batches");
        }
        for p in &recovery.missing {
            tracing::warn!(path = %p.display(), "store: file with acknowledged data is missing");
        }
        for t in &recovery.short {
            tracing::warn!(path = %t.path.display(), recorded = t.from, actual = t.to,
                "store: file shorter than its acknowledged length");
        }
        Ok(recovery)
    }

    /// Rule 5: renames a corrupt state file aside, logs it once, and (for an agent's
    /// file) writes the agent's new state: no streams, no file entries (each file's
    /// next append records an intent at its current length, so nothing is cut), and the
    /// reset mark that `soclink status` shows.
    fn quarantine(
        &self,
        path: &Path,
        agent: Option<&str>,
        reason: &str,
        recovery: &mut StoreRecovery,
    ) -> Result<AgentState, StoreError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let taken: BTreeSet<String> = self
            .fs
            .list_dir(&self.dedupe_dir)
            .map_err(io_err("list", &self.dedupe_dir))?
            .into_iter()
            .collect();
        // Never overwrite an earlier quarantined copy: each is evidence.
        let aside_name = (0u32..)
            .map(|i| match i {
                0 => format!("{name}{CORRUPT_SUFFIX}"),
                i => format!("{name}{CORRUPT_SUFFIX}.{i}"),
            })
            .find(|n| !taken.contains(n))
            .unwrap_or_default();
        let aside = self.dedupe_dir.join(&aside_name);
        self.fs
            .rename(path, &aside)
            .map_err(io_err("rename", path))?;
        let now = SystemTime::now();
        let mut state = AgentState::default();
        match agent {
            Some(agent) => {
                tracing::error!(
                    agent,
                    "{}: corrupt store state ({reason}); moved it to {} and restarted this \
                     agent's dedupe at 0: its store files are kept as they are, its next \
                     batches are stored, and up to {} batches per stream after the reset \
                     may be duplicates (see `soclink status`)",
                    path.display(),
                    aside.display(),
                    crate::ship::WINDOW_BATCHES
                );
                state.dedupe_reset = Some(ResetJson {
                    at_unix_ms: unix_millis(now),
                    reason: reason.to_string(),
                    quarantined: format!("{STATE_SUBDIR}/{aside_name}"),
                    streams: BTreeMap::new(),
                });
                // Durable before anything of the agent is stored again: a crash
                // before it finds no state, which is the same reset minus the mark.
                write_state(self.fs.as_ref(), &self.dedupe_dir, agent, &state)?;
            }
            None => tracing::error!(
                "{}: not a store state ({reason}); moved it to {}",
                path.display(),
                aside.display()
            ),
        }
        self.fs
            .sync_dir(&self.dedupe_dir)
            .map_err(io_err("fsync", &self.dedupe_dir))?;
        recovery.quarantined.push(QuarantinedState {
            agent: agent.map(str::to_string),
            aside,
            reason: reason.to_string(),
        });
        Ok(state)
    }

    /// Agents whose dedupe was reset by rule 5 in the last [`PRUNE_AFTER`].
    pub fn dedupe_resets(&self) -> Vec<DedupeReset> {
        let window = crate::ship::WINDOW_BATCHES as u64;
        self.agents
            .iter()
            .filter_map(|(name, a)| {
                let r = a.durable.dedupe_reset.as_ref()?;
                Some(DedupeReset {
                    agent: name.clone(),
                    at: UNIX_EPOCH + Duration::from_millis(r.at_unix_ms),
                    reason: r.reason.clone(),
                    quarantined: r.quarantined.clone(),
                    streams: r
                        .streams
                        .iter()
                        .map(|(stream, from)| ResyncedStream {
                            stream: stream.clone(),
                            from: *from,
                            through: from.saturating_add(window - 1),
                            stored_seq: a.durable.streams.get(stream).copied().unwrap_or(0),
                        })
                        .collect(),
                })
            })
            .collect()
    }

    /// Notes the first seq of `stream` stored after a rule-5 reset (status only).
    fn note_resync(&mut self, agent: &str, stream: &str, seq: u64) {
        if let Some(r) = self
            .agents
            .get_mut(agent)
            .and_then(|a| a.durable.dedupe_reset.as_mut())
            && !r.streams.contains_key(stream)
            && r.streams.len() < MAX_STREAMS
        {
            r.streams.insert(stream.to_string(), seq);
        }
    }

    /// Applies rule 3 to every file of one agent's state.
    fn repair_files(
        &self,
        agent: &str,
        mut state: AgentState,
        recovery: &mut StoreRecovery,
    ) -> Result<(AgentState, bool), StoreError> {
        let mut changed = false;
        for ((source, day), entry) in state.files.iter_mut() {
            let path = self.file_path(agent, source, day);
            let actual = self.fs.file_len(&path).map_err(io_err("stat", &path))?;
            match actual {
                None => {
                    if entry.len > 0 {
                        recovery.missing.push(path);
                        entry.len = 0;
                        changed = true;
                    }
                }
                Some(len) if len > entry.len => {
                    self.fs
                        .set_len(&path, entry.len)
                        .map_err(io_err("truncate", &path))?;
                    self.fs.sync_file(&path).map_err(io_err("fsync", &path))?;
                    recovery.truncated.push(TruncatedFile {
                        path,
                        from: len,
                        to: entry.len,
                    });
                }
                Some(len) if len < entry.len => {
                    recovery.short.push(TruncatedFile {
                        path,
                        from: entry.len,
                        to: len,
                    });
                    entry.len = len;
                    changed = true;
                }
                Some(_) => {}
            }
        }
        Ok((state, changed))
    }

    /// The highest sequence of `(agent, stream)` durably stored (0 if none). The relay
    /// sends it in its HelloAck; the agent resumes after it.
    pub fn stored_seq(&self, agent: &str, stream: &str) -> u64 {
        self.agents
            .get(agent)
            .and_then(|a| a.durable.streams.get(stream))
            .copied()
            .unwrap_or(0)
    }

    /// Batches appended since the last successful commit (for group-commit sizing).
    pub fn uncommitted(&self) -> usize {
        self.uncommitted
    }

    /// Appends one batch's gzip member to its store file; durable only after
    /// [`Store::commit`]. `seq` must continue the stream: at or below its position is a
    /// [`AppendOutcome::Duplicate`], beyond position + 1 a [`AppendOutcome::Gap`]
    /// (nothing written either way; `seq` 0, never valid, counts as a duplicate).
    /// Typed errors, with nothing written and the store still usable, for unsafe names
    /// ([`StoreError::InvalidName`], [`StoreError::InvalidDay`]) and per-agent bounds.
    pub fn append(
        &mut self,
        agent: &str,
        stream: &str,
        seq: u64,
        source: &str,
        day: &str,
        gzip: &[u8],
    ) -> Result<AppendOutcome, StoreError> {
        self.append_inner(agent, stream, seq, source, day, gzip, false)
    }

    /// Like [`Store::append`], but a `seq` beyond position + 1 is written too (and the
    /// stream's position jumps to it). For a sender whose missing batches can never
    /// come (lost to damage on its side, or a stream this store never saw): refusing
    /// would stall that sender forever, while exactly-once still holds for everything
    /// else. The caller logs the gap; a [`AppendOutcome::Gap`] is still returned for a
    /// `seq` that was *not* written only when nothing else applies.
    pub fn append_accepting_gap(
        &mut self,
        agent: &str,
        stream: &str,
        seq: u64,
        source: &str,
        day: &str,
        gzip: &[u8],
    ) -> Result<AppendOutcome, StoreError> {
        self.append_inner(agent, stream, seq, source, day, gzip, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn append_inner(
        &mut self,
        agent: &str,
        stream: &str,
        seq: u64,
        source: &str,
        day: &str,
        gzip: &[u8],
        accept_gap: bool,
    ) -> Result<AppendOutcome, StoreError> {
        validate_name(NameField::Agent, agent)?;
        validate_name(NameField::Stream, stream)?;
        validate_name(NameField::Source, source)?;
        if RESERVED_SOURCE_NAMES.contains(&source) {
            return Err(invalid(NameField::Source, source, "reserved name"));
        }
        validate_day(day)?;
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }

        let known = self.agents.get(agent);
        let current = known
            .and_then(|a| {
                a.pending_seq
                    .get(stream)
                    .or_else(|| a.durable.streams.get(stream))
            })
            .copied()
            .unwrap_or(0);
        if seq <= current {
            return Ok(AppendOutcome::Duplicate);
        }
        // current < seq, so current + 1 cannot overflow.
        if seq - current > 1 && !accept_gap {
            return Ok(AppendOutcome::Gap {
                expected: current + 1,
            });
        }
        if let Some(a) = known {
            let new_stream =
                !a.durable.streams.contains_key(stream) && !a.pending_seq.contains_key(stream);
            let pending_new = a
                .pending_seq
                .keys()
                .filter(|k| !a.durable.streams.contains_key(*k))
                .count();
            if new_stream && a.durable.streams.len() + pending_new >= MAX_STREAMS {
                return Err(StoreError::LimitExceeded {
                    agent: agent.to_string(),
                    what: "streams",
                    limit: MAX_STREAMS,
                });
            }
        }

        let key: FileKey = (source.to_string(), day.to_string());
        let path = self.file_path(agent, source, day);
        let offset = self.offset_for(agent, &key, &path)?;
        if offset == 0 {
            // First bytes of the file (new, or lost in a crash): its entry and those of
            // its directories must be durable before the commit records its length. All
            // three are synced even if they already exist: an earlier process may have
            // created them and died before syncing them.
            self.ensure_dirs(agent, source)?;
            let agent_dir = self.store_dir.join(agent);
            self.dirs_to_sync.insert(agent_dir.join(source));
            self.dirs_to_sync.insert(agent_dir);
            self.dirs_to_sync.insert(self.store_dir.clone());
        }

        if let Err(e) = self.fs.write_at(&path, offset, gzip) {
            // Cut the torn tail; if even that fails, memory and disk may disagree. A
            // file that was never created has no tail.
            match self.fs.set_len(&path, offset) {
                Ok(()) => {}
                Err(e2) if offset == 0 && e2.kind() == io::ErrorKind::NotFound => {}
                Err(_) => self.poisoned = true,
            }
            return Err(io_err("write", &path)(e));
        }
        let end = offset.saturating_add(gzip.len() as u64);
        let a = self.agents.entry(agent.to_string()).or_default();
        a.pending_len.insert(key, end);
        a.pending_seq.insert(stream.to_string(), seq);
        a.pending_bytes = a.pending_bytes.saturating_add(gzip.len() as u64);
        self.files_to_sync.insert(path);
        self.dirty.insert(agent.to_string());
        self.uncommitted += 1;
        self.note_resync(agent, stream, seq);
        Ok(AppendOutcome::Appended)
    }

    /// The stream's position including appends not yet committed.
    pub fn position(&self, agent: &str, stream: &str) -> u64 {
        self.agents
            .get(agent)
            .and_then(|a| {
                a.pending_seq
                    .get(stream)
                    .or_else(|| a.durable.streams.get(stream))
            })
            .copied()
            .unwrap_or(0)
    }

    /// Records that `seq` of `stream` was stored *outside* the log layout (an incident
    /// record or bundle chunk the caller already wrote and fsynced): the dedupe
    /// position moves with the next [`Store::commit`], nothing is appended. Gaps are
    /// accepted (see [`Store::append_accepting_gap`]).
    pub fn advance(
        &mut self,
        agent: &str,
        stream: &str,
        seq: u64,
    ) -> Result<AppendOutcome, StoreError> {
        validate_name(NameField::Agent, agent)?;
        validate_name(NameField::Stream, stream)?;
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let current = self
            .agents
            .get(agent)
            .and_then(|a| {
                a.pending_seq
                    .get(stream)
                    .or_else(|| a.durable.streams.get(stream))
            })
            .copied()
            .unwrap_or(0);
        if seq <= current {
            return Ok(AppendOutcome::Duplicate);
        }
        let a = self.agents.entry(agent.to_string()).or_default();
        a.pending_seq.insert(stream.to_string(), seq);
        self.dirty.insert(agent.to_string());
        self.uncommitted += 1;
        self.note_resync(agent, stream, seq);
        Ok(AppendOutcome::Appended)
    }

    /// Where the next append to `key` goes; records an intent first (rule 1) when the
    /// file is not in the agent's state, or no longer has its recorded length (an
    /// operator moved it away while the relay ran): appending at the recorded offset
    /// would leave a hole, and open would later take uncommitted bytes as durable.
    fn offset_for(&mut self, agent: &str, key: &FileKey, path: &Path) -> Result<u64, StoreError> {
        let mut recorded = None;
        if let Some(a) = self.agents.get(agent) {
            if let Some(len) = a.pending_len.get(key) {
                return Ok(*len);
            }
            recorded = a.durable.files.get(key).map(|e| e.len);
            if recorded.is_none() && a.durable.files.len() >= MAX_FILES {
                return Err(StoreError::LimitExceeded {
                    agent: agent.to_string(),
                    what: "store files in use",
                    limit: MAX_FILES,
                });
            }
        }
        let len = self
            .fs
            .file_len(path)
            .map_err(io_err("stat", path))?
            .unwrap_or(0);
        match recorded {
            Some(r) if r == len => return Ok(len),
            Some(r) => tracing::warn!(path = %path.display(), recorded = r, actual = len,
                "store: file changed behind the relay's back; continuing after its current end"),
            None => {}
        }
        let mut intent = self
            .agents
            .get(agent)
            .map(|a| a.durable.clone())
            .unwrap_or_default();
        intent.files.insert(
            key.clone(),
            FileEntry {
                len,
                touched_unix: unix_secs(crate::clock::now()),
            },
        );
        // On failure the old or the new state is on disk; both are safe (an intent for
        // a file never written to only cuts nothing), so the store stays usable.
        write_state(self.fs.as_ref(), &self.dedupe_dir, agent, &intent)?;
        self.fs
            .sync_dir(&self.dedupe_dir)
            .map_err(io_err("fsync", &self.dedupe_dir))?;
        self.agents.entry(agent.to_string()).or_default().durable = intent;
        Ok(len)
    }

    fn ensure_dirs(&mut self, agent: &str, source: &str) -> Result<(), StoreError> {
        let agent_dir = self.store_dir.join(agent);
        let source_dir = agent_dir.join(source);
        // The caller syncs them and their parents (see `append`).
        for dir in [agent_dir, source_dir] {
            if self.known_dirs.contains(&dir) {
                continue;
            }
            self.fs.create_dir(&dir).map_err(io_err("create", &dir))?;
            self.known_dirs.insert(dir);
        }
        Ok(())
    }

    /// Makes every append since the last commit durable (rule 2). Only after this
    /// returns `Ok` may the relay acknowledge those batches. On error the store is
    /// poisoned: reopen it.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        if self.dirty.is_empty() && self.dirs_to_sync.is_empty() {
            return Ok(());
        }
        let result = self.commit_inner();
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn commit_inner(&mut self) -> Result<(), StoreError> {
        for path in &self.files_to_sync {
            self.fs.sync_file(path).map_err(io_err("fsync", path))?;
        }
        // Deepest first is not required (all precede the state write) but keeps a new
        // file's entry durable no later than its parents'.
        for dir in self.dirs_to_sync.iter().rev() {
            self.fs.sync_dir(dir).map_err(io_err("fsync", dir))?;
        }
        let now = crate::clock::now();
        let now_unix = unix_secs(now);
        let mut next: Vec<(String, AgentState)> = Vec::with_capacity(self.dirty.len());
        for name in &self.dirty {
            let Some(a) = self.agents.get(name) else {
                continue;
            };
            let mut s = a.durable.clone();
            for (stream, seq) in &a.pending_seq {
                s.streams.insert(stream.clone(), *seq);
            }
            for (key, len) in &a.pending_len {
                s.files.insert(
                    key.clone(),
                    FileEntry {
                        len: *len,
                        touched_unix: now_unix,
                    },
                );
            }
            s.bytes = s.bytes.saturating_add(a.pending_bytes);
            s.last_write_unix_ms = Some(unix_millis(now));
            prune(&mut s, now_unix);
            write_state(self.fs.as_ref(), &self.dedupe_dir, name, &s)?;
            next.push((name.clone(), s));
        }
        self.fs
            .sync_dir(&self.dedupe_dir)
            .map_err(io_err("fsync", &self.dedupe_dir))?;
        for (name, s) in next {
            if let Some(a) = self.agents.get_mut(&name) {
                a.durable = s;
                a.pending_seq.clear();
                a.pending_len.clear();
                a.pending_bytes = 0;
            }
        }
        self.dirty.clear();
        self.files_to_sync.clear();
        self.dirs_to_sync.clear();
        self.uncommitted = 0;
        Ok(())
    }

    /// Committed status per agent, for `soclink status`.
    pub fn agents(&self) -> Vec<AgentStoreStatus> {
        self.agents
            .iter()
            .map(|(name, a)| AgentStoreStatus {
                agent: name.clone(),
                streams: a
                    .durable
                    .streams
                    .iter()
                    .map(|(s, q)| StreamStatus {
                        stream: s.clone(),
                        stored_seq: *q,
                    })
                    .collect(),
                bytes: a.durable.bytes,
                last_write: a
                    .durable
                    .last_write_unix_ms
                    .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
            })
            .collect()
    }

    /// The store file of `(agent, source, day)`; names must be validated.
    fn file_path(&self, agent: &str, source: &str, day: &str) -> PathBuf {
        self.store_dir
            .join(agent)
            .join(source)
            .join(format!("{day}.ndjson.gz"))
    }
}

/// Drops entries not appended to for [`PRUNE_AFTER`]; called only when no append of
/// the agent is pending, so every entry's length equals its file's.
fn prune(s: &mut AgentState, now_unix: u64) {
    let horizon = now_unix.saturating_sub(PRUNE_AFTER.as_secs());
    s.files.retain(|_, e| e.touched_unix >= horizon);
    if s.dedupe_reset
        .as_ref()
        .is_some_and(|r| r.at_unix_ms / 1000 < horizon)
    {
        s.dedupe_reset = None;
    }
}

/// Refuses layouts where an agent directory could be the state directory or the other
/// way round (compared by path, as configured).
fn check_layout(opts: &StoreOptions) -> Result<(), StoreError> {
    let (store, state) = (&opts.store_dir, &opts.state_dir);
    if let Ok(rest) = state.strip_prefix(store) {
        let hidden = rest
            .components()
            .next()
            .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with('.'));
        if !hidden {
            return Err(StoreError::Options(format!(
                "state_dir {} is inside store_dir {} where an agent id could collide with \
                 it; use a separate directory (or one whose name starts with '.')",
                state.display(),
                store.display()
            )));
        }
    }
    if store.starts_with(state.join(STATE_SUBDIR)) || store == &state.join(LOCK_FILE) {
        return Err(StoreError::Options(format!(
            "store_dir {} collides with the store's own files in state_dir {}",
            store.display(),
            state.display()
        )));
    }
    Ok(())
}

/// `mkdir -p` through the seam, fsyncing each parent that gained an entry.
fn create_dir_all(fs: &dyn StoreFs, dir: &Path) -> Result<(), StoreError> {
    let created = match fs.create_dir(dir) {
        Ok(created) => created,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => create_dir_all(fs, parent)?,
                None => return Err(io_err("create", dir)(e)),
            }
            fs.create_dir(dir).map_err(io_err("create", dir))?
        }
        Err(e) => return Err(io_err("create", dir)(e)),
    };
    if created && let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs.sync_dir(p).map_err(io_err("fsync", p))?;
    }
    Ok(())
}

/// The bytes of an agent's state file: a header line (magic, CRC32 and length of the
/// body) followed by the JSON body.
pub(crate) fn encode_state(agent: &str, s: &AgentState) -> io::Result<Vec<u8>> {
    let body = BodyJson {
        version: 1,
        agent: agent.to_string(),
        streams: s.streams.clone(),
        files: s
            .files
            .iter()
            .map(|((source, day), e)| FileJson {
                source: source.clone(),
                day: day.clone(),
                len: e.len,
                touched_unix: e.touched_unix,
            })
            .collect(),
        bytes: s.bytes,
        last_write_unix_ms: s.last_write_unix_ms,
        dedupe_reset: s.dedupe_reset.clone(),
    };
    let json = serde_json::to_vec(&body).map_err(io::Error::other)?;
    let mut data = format!(
        "{HEADER_MAGIC} crc32={:08x} len={}\n",
        crc32fast::hash(&json),
        json.len()
    )
    .into_bytes();
    data.extend_from_slice(&json);
    Ok(data)
}

fn write_state(
    fs: &dyn StoreFs,
    dedupe_dir: &Path,
    agent: &str,
    s: &AgentState,
) -> Result<(), StoreError> {
    let path = dedupe_dir.join(format!("{agent}{STATE_SUFFIX}"));
    let tmp = dedupe_dir.join(format!("{agent}{STATE_SUFFIX}{TEMP_SUFFIX}"));
    let data = encode_state(agent, s).map_err(io_err("encode", &path))?;
    fs.write_file(&tmp, &data).map_err(io_err("write", &tmp))?;
    fs.sync_file(&tmp).map_err(io_err("fsync", &tmp))?;
    fs.rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    Ok(())
}

fn corrupt(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::CorruptState {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_state(fs: &dyn StoreFs, path: &Path, agent: &str) -> Result<AgentState, StoreError> {
    let data = fs
        .read_limited(path, MAX_STATE_BYTES)
        .map_err(io_err("read", path))?;
    parse_state(&data, path, agent)
}

/// Decodes and checks a state file's bytes; `path` only names the file in errors.
pub(crate) fn parse_state(data: &[u8], path: &Path, agent: &str) -> Result<AgentState, StoreError> {
    if data.len() as u64 > MAX_STATE_BYTES {
        return Err(corrupt(path, "larger than the state size limit"));
    }
    let head_end = memchr::memchr(b'\n', &data[..data.len().min(MAX_HEADER_BYTES)])
        .ok_or_else(|| corrupt(path, "missing header line"))?;
    let (head, rest) = data.split_at(head_end);
    // rest starts with the '\n' found above.
    let body = rest.get(1..).unwrap_or_default();
    let head = std::str::from_utf8(head).map_err(|_| corrupt(path, "header is not text"))?;
    let fields = head
        .strip_prefix(HEADER_MAGIC)
        .and_then(|r| r.strip_prefix(" crc32="))
        .and_then(|r| r.split_once(" len="))
        .ok_or_else(|| corrupt(path, "bad header (not a soclink store state v1)"))?;
    // Exactly the digits the writer emits: a flipped bit that `from_str_radix` would
    // still accept (an upper-case hex digit, a '+') is damage too.
    let lower_hex =
        |f: &str| f.len() == 8 && f.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let decimal = |f: &str| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit());
    if !lower_hex(fields.0) {
        return Err(corrupt(path, "bad CRC field"));
    }
    let crc = u32::from_str_radix(fields.0, 16).map_err(|_| corrupt(path, "bad CRC field"))?;
    let len: usize = fields
        .1
        .parse()
        .ok()
        .filter(|_| decimal(fields.1))
        .ok_or_else(|| corrupt(path, "bad length field"))?;
    if body.len() != len {
        return Err(corrupt(
            path,
            format!(
                "body is {} bytes, header says {len} (torn write?)",
                body.len()
            ),
        ));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt(path, "CRC mismatch"));
    }
    let b: BodyJson =
        serde_json::from_slice(body).map_err(|e| corrupt(path, format!("bad JSON: {e}")))?;
    if b.version != 1 {
        return Err(corrupt(path, format!("unknown version {}", b.version)));
    }
    if b.agent != agent {
        return Err(corrupt(path, "agent id inside differs from the file name"));
    }
    if b.streams.len() > MAX_STREAMS || b.files.len() > MAX_FILES {
        return Err(corrupt(path, "more entries than the limits allow"));
    }
    if b.streams
        .keys()
        .any(|s| validate_name(NameField::Stream, s).is_err())
    {
        return Err(corrupt(path, "invalid stream name inside"));
    }
    if let Some(r) = &b.dedupe_reset
        && (r.streams.len() > MAX_STREAMS
            || r.streams
                .keys()
                .any(|s| validate_name(NameField::Stream, s).is_err()))
    {
        return Err(corrupt(path, "invalid dedupe_reset inside"));
    }
    let mut files = BTreeMap::new();
    for f in b.files {
        // Names inside become paths that open truncates: never trust them unchecked.
        if validate_name(NameField::Source, &f.source).is_err() || validate_day(&f.day).is_err() {
            return Err(corrupt(path, "invalid source or day inside"));
        }
        files.insert(
            (f.source, f.day),
            FileEntry {
                len: f.len,
                touched_unix: f.touched_unix,
            },
        );
    }
    Ok(AgentState {
        streams: b.streams,
        files,
        bytes: b.bytes,
        last_write_unix_ms: b.last_write_unix_ms,
        dedupe_reset: b.dedupe_reset,
    })
}

fn invalid(field: NameField, value: &str, reason: &'static str) -> StoreError {
    StoreError::InvalidName {
        field,
        value: value.chars().take(64).collect(),
        reason,
    }
}

/// Why `name` is not a single safe path component, if it is not.
fn validate_component(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return Err("too long");
    }
    if name.starts_with('.') {
        return Err("starts with '.' (includes '.' and '..')");
    }
    if name.contains(['/', '\\']) {
        return Err("contains a path separator");
    }
    if name.chars().any(char::is_control) {
        return Err("contains a control character or NUL");
    }
    Ok(())
}

fn validate_name(field: NameField, name: &str) -> Result<(), StoreError> {
    let check = if field == NameField::Stream {
        // A stream is only a key in the state, but keep it bounded and printable.
        if name.is_empty() {
            Err("empty")
        } else if name.len() > MAX_NAME_BYTES {
            Err("too long")
        } else if name.chars().any(char::is_control) {
            Err("contains a control character or NUL")
        } else {
            Ok(())
        }
    } else {
        validate_component(name)
    };
    check.map_err(|reason| invalid(field, name, reason))
}

/// Accepts only a real calendar date `YYYY-MM-DD` (proleptic Gregorian, year >= 1).
fn validate_day(day: &str) -> Result<(), StoreError> {
    let bad = || StoreError::InvalidDay {
        value: day.chars().take(64).collect(),
    };
    let b = day.as_bytes();
    // Indexing cannot panic: the length is checked first.
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = b.get(r)?;
        if !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else {
        return Err(bad());
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if y == 0 || d == 0 || d > days {
        return Err(bad());
    }
    Ok(())
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_checked_against_the_calendar() {
        for ok in [
            "2026-01-31",
            "2024-02-29",
            "2000-02-29",
            "0001-01-01",
            "9999-12-31",
        ] {
            assert!(validate_day(ok).is_ok(), "{ok}");
        }
        for bad in [
            "2026-13-45",
            "2026-02-29",
            "1900-02-29",
            "2026-04-31",
            "0000-01-01",
            "2026-1-01",
            "2026-01-1",
            "2026/01/01",
            "+026-01-01",
            "2026-01-01\n",
            "",
            "２０２６-01-01",
        ] {
            assert!(validate_day(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prune_drops_only_stale_entries() {
        let mut s = AgentState::default();
        let now = 10 * 24 * 3600;
        let fresh = now - PRUNE_AFTER.as_secs();
        s.files.insert(
            ("a".into(), "2026-01-01".into()),
            FileEntry {
                len: 5,
                touched_unix: fresh,
            },
        );
        s.files.insert(
            ("a".into(), "2026-01-02".into()),
            FileEntry {
                len: 5,
                touched_unix: fresh - 1,
            },
        );
        prune(&mut s, now);
        assert_eq!(
            s.files.keys().cloned().collect::<Vec<_>>(),
            vec![("a".to_string(), "2026-01-01".to_string())]
        );
    }
}
