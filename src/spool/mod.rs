//! # The spool: soclink's one durability boundary
//!
//! A durable, segmented, append-only queue of opaque records on disk. The agent puts
//! every sealed batch here (`meta` = the JSON of a [`crate::batch::BatchMeta`],
//! `payload` = its gzip member) before any source checkpoint moves; the shipper reads
//! records in order and frees them only after the relay acknowledged them. A
//! forwarding relay uses one too. The spool never looks inside `meta` or `payload`.
//!
//! Invariants it keeps:
//! - a record counts as durable only after its segment was `fsync`ed ([`Spool::commit`]);
//!   a committed record survives any crash, byte for byte;
//! - sequence numbers start at 1, grow by one per append and are **never reused**, even
//!   after every segment was deleted or recovery had to discard damaged bytes;
//! - after `ack(n)` returned, no record `<= n` is handed out by [`Spool::read`] again,
//!   even across restarts;
//! - recovery never panics and never deletes bytes it cannot prove were uncommitted:
//!   damaged files are renamed to `*.corrupt`, not removed.
//!
//! ## Design constraints
//!
//! - records are written sequentially and never span two segment files;
//! - a record's `meta` + `payload` is at most 256 MiB ([`MAX_RECORD_BYTES`]);
//!   readers check every length against that bound and the file size before allocating;
//! - all integers are little-endian; every record, segment header and ledger is
//!   checksummed (CRC32, IEEE);
//! - one [`Spool`] owns a directory at a time: open takes an exclusive `flock` on
//!   `<dir>/lock` and fails with [`SpoolError::Locked`] otherwise; share the `Spool`
//!   (it is `Clone + Send + Sync`) instead of opening twice.
//!
//! ## On-disk layout
//!
//! ```text
//! <dir>/00000000000000000001.seg   segment whose first record has seq 1
//! <dir>/00000000000000004711.seg   the newest segment: the only one written to
//! <dir>/acked                      the ack ledger
//! <dir>/acked.tmp                  a ledger being written (ignored and removed on open)
//! <dir>/lock                       flock held while the spool is open
//! <dir>/*.corrupt                  quarantined files, kept for an operator to inspect
//! ```
//!
//! ### Segment header
//!
//! ```text
//! segment_header:            32 bytes
//!   magic:       [u8; 8]     "SOCLSPOL"
//!   version:     u32         1
//!   flags:       u32         0
//!   first_seq:   u64         must equal the number in the file name
//!   crc:         u32         CRC32 of the 24 bytes above
//!   reserved:    u32         0
//! ```
//!
//! ### Record
//!
//! Records follow the header back to back, with no padding:
//!
//! ```text
//! record:
//!   magic:       [u8; 4]     "SLR\xA7" — lets recovery find the next record after damage
//!   crc:         u32         CRC32 of every byte from `seq` to the end of `payload`
//!   seq:         u64         strictly increasing within and across segments
//!   time_ms:     u64         wall clock at append (Unix ms), for the age in SpoolStats
//!   meta_len:    u32
//!   payload_len: u32         meta_len + payload_len <= 256 MiB
//!   meta:        [u8; meta_len]
//!   payload:     [u8; payload_len]
//! ```
//!
//! A candidate record is valid only if its magic matches, its lengths are within the
//! bound and inside the file, its CRC matches, and its `seq` is above the previous valid
//! record's and below the `first_seq` of the next segment whose header is valid (a
//! segment that recovery removes or quarantines bounds nothing, so recovery is
//! idempotent). The magic and the CRC covering the length fields make
//! resynchronisation reliable: a random position passes all checks with probability
//! about 2^-64.
//!
//! ### Ack ledger
//!
//! ```text
//! acked:                     40 bytes
//!   magic:        [u8; 8]    "SOCLACKD"
//!   version:      u32        1
//!   flags:        u32        0
//!   acked:        u64        every record <= acked was acknowledged by the receiver
//!   checkpointed: u64        the sources' checkpoint files cover every record <= this
//!   crc:          u32        CRC32 of the 32 bytes above
//!   reserved:     u32        0
//! ```
//!
//! The ledger is replaced atomically: write `acked.tmp`, `fsync` it, rename it over
//! `acked`, `fsync` the directory. A crash leaves either the old or the new ledger.
//!
//! ## Writing and committing
//!
//! [`Spool::append`] encodes a record into an in-memory buffer (flushed to the file
//! every 1 MiB) and returns its seq; it is **not** durable. [`Spool::commit`] writes the
//! buffer, `fsync`s the newest segment and, if a segment file was created since the last
//! commit, the directory; only then does `durable_seq` (and [`Spool::watch_durable`])
//! move. Many appends share one commit (group commit). When the newest segment has
//! reached `segment_size`, the next append first `fsync`s it and starts a new one, so an
//! older segment is always complete on disk before a newer one exists.
//!
//! If any write or `fsync` fails, the spool stops accepting writes ([`SpoolError::Failed`]):
//! after a failed `fsync` the kernel may have dropped the dirty pages, so only a reopen,
//! which rescans what really is on disk, can say what is durable.
//!
//! A full disk (`ENOSPC`, `EDQUOT`) is the exception, because it is expected and
//! passes: when an append or a commit hits it, every record appended since the last
//! commit is discarded — cut off the newest segment (and segments started since then
//! are removed) — and [`SpoolError::NoSpace`] is returned with the spool still usable.
//! Nothing discarded was durable or handed out, so its seqs are given again. A ledger
//! write that hits it leaves the old ledger in place and returns the same error.
//!
//! ## Deleting acknowledged records
//!
//! Only whole segments are deleted. Let `limit = min(acked, checkpointed)` when the spool
//! was opened with [`SpoolOptions::gate_on_checkpoint`], else `limit = acked`. A segment
//! file may be deleted exactly when
//!
//! 1. it is not the newest segment (which is never deleted: its name and records carry
//!    the sequence counter across restarts), and
//! 2. `next_segment.first_seq - 1 <= limit`, i.e. every record it can hold is `<= limit`,
//! 3. and the ledger recording that `limit` is already durable (it is written first).
//!
//! The gate exists for the agent: after a crash its sources replay the records above
//! their checkpoint to learn where to resume, so those must outlive their ack. A relay
//! never checkpoints and opens without the gate.
//!
//! ## Recovery
//!
//! [`Spool::open`] scans every segment in seq order:
//! - a segment shorter than its header is a torn creation: if it is the newest it held
//!   nothing committed (a commit syncs the header with the records) and is removed;
//! - a segment whose header is invalid is renamed to `*.corrupt` (quarantined);
//! - a damaged record followed by a valid one is skipped and counted, with one
//!   `tracing::warn!` per damaged region; scanning resumes at the next valid record;
//! - damaged bytes at the end of the newest segment (a torn write) are truncated, and
//!   the truncation is `fsync`ed;
//! - every segment kept is `fsync`ed, so what recovery hands out is durable.
//!
//! The next seq is `max(acked, newest record seq) + 1`, raised past anything recovery
//! discarded (assuming each discarded 32 bytes could have been a record) so a seq that
//! may already have been sent is never reused; if such a raise is not implied by the
//! files that remain, an empty segment named after the new next seq is created to
//! persist it. Sequences therefore have gaps only where recovery discarded bytes.
//!
//! A segment or ledger that is intact but carries a newer format version makes open
//! fail with [`SpoolError::Corrupt`]: a downgrade must not quarantine or rewrite data.
//!
//! A corrupt ledger is quarantined and replaced by `acked = checkpointed = 0`: every
//! present record is handed out again. That re-sends rather than loses: the relay
//! dedupes by seq, and the newest segment still fixes the next seq.

pub mod format;
pub mod peek;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

pub use self::format::MAX_RECORD_BYTES;
use self::format::{DecodeError, Ledger, RECORD_HEADER_LEN, RECORD_MAGIC, SEGMENT_HEADER_LEN};
pub use crate::fs::{Fs, FsFile, RealFs};

/// Name of the ack ledger inside the spool directory.
pub const LEDGER_FILE: &str = "acked";
const LEDGER_TMP: &str = "acked.tmp";
/// Held (flock) while a [`Spool`] is open: two writers would corrupt each other.
const LOCK_FILE: &str = "lock";
const SEGMENT_SUFFIX: &str = ".seg";
const CORRUPT_SUFFIX: &str = ".corrupt";
/// Appended records are written to the file once this much is buffered.
const FLUSH_BYTES: usize = 1024 * 1024;
/// Largest append buffer kept between flushes.
const KEEP_PENDING: usize = 256 << 10;
/// Read size when scanning for the next valid record after damage.
const SCAN_CHUNK: usize = 64 * 1024;

/// How a spool is sized and whether deletion waits for source checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Bytes on disk at which [`Spool::is_full`] turns true and appends are refused.
    pub max_size: u64,
    /// Size at which a new segment file is started (default 64 MiB). Clamped to at most
    /// half of `max_size`, so acknowledging everything always frees the spool below
    /// `max_size`.
    pub segment_size: u64,
    /// When true, a segment is deleted only once its records are both acknowledged and
    /// covered by [`Spool::set_checkpointed`] (the agent). When false (the default, for
    /// the relay), the checkpoint position is recorded but does not hold segments back.
    pub gate_on_checkpoint: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            max_size: 1024 * 1024 * 1024,
            segment_size: 64 * 1024 * 1024,
            gate_on_checkpoint: false,
        }
    }
}

/// One record as handed out by the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub meta: Vec<u8>,
    pub payload: Vec<u8>,
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut off the end of the newest segment (an incomplete record).
    pub truncated_bytes: u64,
    /// Damaged regions skipped inside segments (each was at least one record).
    pub corrupt_records: u64,
    /// Files renamed to `*.corrupt` (their new paths).
    pub quarantined: Vec<PathBuf>,
    /// Human-readable account of every repair, for the operator's log.
    pub messages: Vec<String>,
}

impl Recovery {
    /// True when open found nothing to repair.
    pub fn is_clean(&self) -> bool {
        self.messages.is_empty()
    }
}

/// A snapshot of the spool's positions and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolStats {
    /// Smallest present record above `acked` (committed or not); `next_seq` if none.
    pub first_unacked: u64,
    /// Seq the next append will get.
    pub next_seq: u64,
    /// Highest durable seq; 0 = none.
    pub durable_seq: u64,
    pub acked: u64,
    pub checkpointed: u64,
    /// Bytes of all segment files, including appended but unflushed records.
    pub bytes: u64,
    pub segments: usize,
    /// Age of the record `first_unacked`, from the wall-clock time stored in it.
    pub oldest_unacked_age: Option<Duration>,
}

/// Errors of the spool. Callers branch on `Full` (wait for acks) and `Failed` (reopen).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {} is in use by another process (or another Spool in this one)", path.display())]
    Locked { path: PathBuf },
    #[error("spool I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool is full: {bytes} bytes on disk, limit {max_size}")]
    Full { bytes: u64, max_size: u64 },
    #[error("record of {size} bytes exceeds the spool's limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// A file recovery must not repair, e.g. one written by a newer format version:
    /// opening is refused so nothing is quarantined or rewritten by mistake.
    #[error("unusable spool file {}: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot mark seq {seq} as {what}: only records up to {durable} are durable")]
    BeyondDurable {
        what: &'static str,
        seq: u64,
        durable: u64,
    },
    #[error("spool stopped accepting writes after an I/O failure ({0}); reopen it to recover")]
    Failed(String),
    /// The disk is full: every record appended since the last commit was discarded
    /// (cut off the file); the spool stays usable. Append them again once there is room.
    #[error("no space left for the spool on {}: {source}", path.display())]
    NoSpace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SpoolError {
    /// True for an I/O error meaning "the disk is full" (which passes, unlike others).
    fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
    }

    fn into_no_space(self) -> SpoolError {
        match self {
            SpoolError::Io { path, source } => SpoolError::NoSpace { path, source },
            other => other,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where one record lives; the in-memory index that makes reads cheap.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    time_ms: u64,
    offset: u64,
    /// Whole record length, header included (<= 32 + 256 MiB, fits u32).
    len: u32,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// File length, including buffered bytes not yet written (newest segment only).
    len: u64,
    entries: Vec<Entry>,
}

struct Inner {
    dir: PathBuf,
    fs: Arc<dyn Fs>,
    opts: SpoolOptions,
    /// Sorted by `first_seq`; the last one is the newest, the only one written to.
    segments: Vec<Segment>,
    /// Append handle of `segments.last()`, when there is one.
    active: Option<Box<dyn FsFile>>,
    /// Encoded records appended but not yet written to `active`.
    pending: Vec<u8>,
    /// A segment file was created since the last directory fsync.
    dir_dirty: bool,
    next_seq: u64,
    durable_seq: u64,
    acked: u64,
    checkpointed: u64,
    bytes: u64,
    /// Cached read handle of a non-newest segment, keyed by its `first_seq`, so
    /// sequential reads do not reopen files.
    reader: Option<(u64, Box<dyn FsFile>)>,
    failed: Option<String>,
    /// Exclusive lock on the directory, released when the last clone is dropped.
    _lock: crate::fs::LockGuard,
}

struct Shared {
    inner: Mutex<Inner>,
    durable_tx: watch::Sender<u64>,
    acked_tx: watch::Sender<u64>,
}

/// Handle to an open spool; clones share it.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("stats", &self.stats())
            .finish()
    }
}

fn now_ms() -> u64 {
    crate::clock::unix_ms()
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn read_exact_at(file: &dyn FsFile, mut offset: u64, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = file.read_at(offset, buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Checks a candidate record at `pos` without keeping its body; `Some` if valid.
fn probe_record(
    file: &dyn FsFile,
    pos: u64,
    file_len: u64,
    min_seq: u64,
    below_seq: u64,
) -> std::io::Result<Option<Entry>> {
    if pos.saturating_add(RECORD_HEADER_LEN as u64) > file_len {
        return Ok(None);
    }
    let mut hdr = [0u8; RECORD_HEADER_LEN];
    read_exact_at(file, pos, &mut hdr)?;
    let Some(h) = format::decode_record_header(&hdr) else {
        return Ok(None);
    };
    if h.seq < min_seq || h.seq >= below_seq || pos + h.total_len() > file_len {
        return Ok(None);
    }
    // Stream the body through the CRC so a large record never needs one allocation.
    let mut crc = crc32fast::Hasher::new();
    crc.update(&hdr[8..]);
    let mut buf = vec![0u8; SCAN_CHUNK.min(usize::try_from(h.body_len()).unwrap_or(SCAN_CHUNK))];
    let mut at = pos + RECORD_HEADER_LEN as u64;
    let mut left = h.body_len();
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        read_exact_at(file, at, &mut buf[..n])?;
        crc.update(&buf[..n]);
        at += n as u64;
        left -= n as u64;
    }
    if crc.finalize() != h.crc {
        return Ok(None);
    }
    Ok(Some(Entry {
        seq: h.seq,
        time_ms: h.time_ms,
        offset: pos,
        // total_len <= 32 + MAX_RECORD_BYTES < u32::MAX, checked by decode_record_header.
        len: u32::try_from(h.total_len()).unwrap_or(u32::MAX),
    }))
}

/// Finds the first valid record starting at or after `from`.
fn resync(
    file: &dyn FsFile,
    from: u64,
    file_len: u64,
    min_seq: u64,
    below_seq: u64,
) -> std::io::Result<Option<Entry>> {
    let mut pos = from;
    let mut chunk = vec![0u8; SCAN_CHUNK];
    let finder = memchr::memmem::Finder::new(&RECORD_MAGIC);
    while pos + (RECORD_HEADER_LEN as u64) <= file_len {
        let n = usize::try_from(file_len - pos)
            .unwrap_or(SCAN_CHUNK)
            .min(SCAN_CHUNK);
        read_exact_at(file, pos, &mut chunk[..n])?;
        for i in finder.find_iter(&chunk[..n]) {
            if let Some(e) = probe_record(file, pos + i as u64, file_len, min_seq, below_seq)? {
                return Ok(Some(e));
            }
        }
        if pos + n as u64 >= file_len {
            break;
        }
        // Overlap by magic length - 1 so a magic split across chunks is still found.
        pos += (n - (RECORD_MAGIC.len() - 1)) as u64;
    }
    Ok(None)
}

struct Scan {
    entries: Vec<Entry>,
    /// Damaged regions (start, end) followed by a valid record.
    damaged: Vec<(u64, u64)>,
    /// Start of damaged bytes running to the end of the file.
    tail: Option<u64>,
}

fn scan_segment(
    file: &dyn FsFile,
    first_seq: u64,
    below_seq: u64,
    file_len: u64,
) -> std::io::Result<Scan> {
    let mut scan = Scan {
        entries: Vec::new(),
        damaged: Vec::new(),
        tail: None,
    };
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut min_seq = first_seq;
    while pos < file_len {
        let entry = match probe_record(file, pos, file_len, min_seq, below_seq)? {
            Some(e) => e,
            None => match resync(file, pos + 1, file_len, min_seq, below_seq)? {
                Some(e) => {
                    scan.damaged.push((pos, e.offset));
                    e
                }
                None => {
                    scan.tail = Some(pos);
                    break;
                }
            },
        };
        pos = entry.offset + u64::from(entry.len);
        min_seq = entry.seq.saturating_add(1);
        scan.entries.push(entry);
    }
    Ok(scan)
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` on the real file system, repairing
    /// what a crash or damage left behind. See the module doc for what recovery does.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> {
        Self::open_with_fs(dir, opts, Arc::new(RealFs))
    }

    /// [`Spool::open`] on any [`Fs`] (tests use [`simfs::SimFs`]).
    pub fn open_with_fs(
        dir: &Path,
        mut opts: SpoolOptions,
        fs: Arc<dyn Fs>,
    ) -> Result<(Spool, Recovery), SpoolError> {
        opts.segment_size = opts.segment_size.min(opts.max_size / 2).max(1);
        fs.create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = match fs.try_lock(&lock_path) {
            Ok(guard) => guard,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(SpoolError::Locked { path: lock_path });
            }
            Err(e) => return Err(io_err(&lock_path)(e)),
        };
        let mut rec = Recovery::default();
        let names = fs.list_dir(dir).map_err(io_err(dir))?;

        if names.iter().any(|n| n == LEDGER_TMP) {
            // Never renamed into place, so the previous ledger is the valid one.
            let p = dir.join(LEDGER_TMP);
            fs.remove_file(&p).map_err(io_err(&p))?;
        }
        let ledger = if names.iter().any(|n| n == LEDGER_FILE) {
            load_ledger(fs.as_ref(), dir, &mut rec)?
        } else {
            Ledger {
                acked: 0,
                checkpointed: 0,
            }
        };

        let mut seg_names: Vec<(u64, &String)> = names
            .iter()
            .filter_map(|n| parse_segment_name(n).map(|s| (s, n)))
            .collect();
        seg_names.sort_unstable();

        // Lowest next seq that cannot reuse a seq any file seen here may have held.
        let mut floor = ledger.acked.saturating_add(1);
        let mut segments: Vec<Segment> = Vec::new();
        let mut active: Option<Box<dyn FsFile>> = None;
        // Pass 1: headers. Segments removed or quarantined here must not bound the
        // records of the one before (`below_seq`), or the next open, no longer seeing
        // them, would accept records this one skipped: recovery must be idempotent.
        let mut headed: Vec<(u64, PathBuf, bool)> = Vec::new();
        for (i, (first_seq, name)) in seg_names.iter().enumerate() {
            let first_seq = *first_seq;
            let is_newest = i + 1 == seg_names.len();
            let path = dir.join(name);
            floor = floor.max(first_seq);
            let file = fs.open(&path, false).map_err(io_err(&path))?;
            let len = file.size().map_err(io_err(&path))?;

            if len < SEGMENT_HEADER_LEN as u64 && is_newest {
                fs.remove_file(&path).map_err(io_err(&path))?;
                rec.messages.push(format!(
                    "removed {}: {len} bytes, shorter than a segment header (torn creation, held no committed record)",
                    path.display()
                ));
                continue;
            }
            let mut hdr = [0u8; SEGMENT_HEADER_LEN];
            let header = if len < SEGMENT_HEADER_LEN as u64 {
                Err(DecodeError::Invalid(format!(
                    "{len} bytes, shorter than a segment header"
                )))
            } else {
                read_exact_at(file.as_ref(), 0, &mut hdr).map_err(io_err(&path))?;
                format::decode_segment_header(&hdr).and_then(|s| {
                    if s == first_seq {
                        Ok(s)
                    } else {
                        Err(DecodeError::Invalid(format!(
                            "header says first seq {s}, name says {first_seq}"
                        )))
                    }
                })
            };
            match header {
                Ok(_) => {}
                Err(e @ DecodeError::Version(_)) => {
                    // A newer soclink wrote this: quarantining would hide its data.
                    return Err(SpoolError::Corrupt {
                        path,
                        detail: e.to_string(),
                    });
                }
                Err(DecodeError::Invalid(why)) => {
                    floor = floor.max(first_seq.saturating_add(len / RECORD_HEADER_LEN as u64));
                    drop(file);
                    quarantine(fs.as_ref(), &path, &why, &mut rec)?;
                    continue;
                }
            }
            headed.push((first_seq, path, is_newest));
        }

        // Pass 2: records, each segment bounded by the next one that remains.
        for (i, (first_seq, path, is_newest)) in headed.iter().enumerate() {
            let (first_seq, is_newest) = (*first_seq, *is_newest);
            let path = path.clone();
            let below_seq = headed.get(i + 1).map_or(u64::MAX, |s| s.0);
            let mut file = fs.open(&path, false).map_err(io_err(&path))?;
            let len = file.size().map_err(io_err(&path))?;
            let scan =
                scan_segment(file.as_ref(), first_seq, below_seq, len).map_err(io_err(&path))?;
            for (start, end) in &scan.damaged {
                tracing::warn!(path = %path.display(), start, end, "spool: skipped damaged record bytes");
                rec.corrupt_records += 1;
                rec.messages.push(format!(
                    "skipped damaged bytes {start}..{end} of {} (at least one record lost)",
                    path.display()
                ));
            }
            let last_seq = scan
                .entries
                .last()
                .map_or(first_seq.saturating_sub(1), |e| e.seq);
            let mut seg_len = len;
            if let Some(tail) = scan.tail {
                let cut = len - tail;
                // Each discarded 32 bytes could have been a record that was sent.
                let maybe_records = cut.div_ceil(RECORD_HEADER_LEN as u64);
                floor = floor.max(last_seq.saturating_add(1).saturating_add(maybe_records));
                if is_newest {
                    file.set_len(tail).map_err(io_err(&path))?;
                    seg_len = tail;
                    rec.truncated_bytes += cut;
                    tracing::warn!(path = %path.display(), offset = tail, bytes = cut, "spool: truncated incomplete record at end of segment");
                    rec.messages.push(format!(
                        "truncated {cut} bytes of an incomplete record at offset {tail} of {}",
                        path.display()
                    ));
                } else {
                    tracing::warn!(path = %path.display(), offset = tail, bytes = cut, "spool: damaged bytes at end of segment");
                    rec.corrupt_records += 1;
                    rec.messages.push(format!(
                        "skipped {cut} damaged bytes at the end of {} (offset {tail})",
                        path.display()
                    ));
                }
            }
            // What recovery hands out must be durable, even if the previous process
            // died before its commit (its writes may still sit in the page cache).
            file.sync().map_err(io_err(&path))?;
            floor = floor.max(last_seq.saturating_add(1));
            if is_newest {
                active = Some(file);
            }
            segments.push(Segment {
                first_seq,
                path,
                len: seg_len,
                entries: scan.entries,
            });
        }
        if active.is_none() && !segments.is_empty() {
            // The newest segment was removed or quarantined: reopen the one now newest.
            if let Some(s) = segments.last() {
                active = Some(fs.open(&s.path, false).map_err(io_err(&s.path))?);
            }
        }
        fs.sync_dir(dir).map_err(io_err(dir))?;

        let bytes = segments.iter().map(|s| s.len).sum();
        let next_seq = floor;
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            fs,
            opts,
            segments,
            active,
            pending: Vec::new(),
            dir_dirty: false,
            next_seq,
            durable_seq: next_seq - 1,
            acked: ledger.acked,
            checkpointed: ledger.checkpointed,
            bytes,
            reader: None,
            failed: None,
            _lock: lock,
        };
        // The files that remain must imply next_seq by themselves, or a later restart
        // could hand out a seq recovery skipped; an empty segment named next_seq does.
        let implied = inner
            .segments
            .last()
            .map_or(ledger.acked.saturating_add(1), |s| {
                s.entries
                    .last()
                    .map_or(s.first_seq, |e| e.seq.saturating_add(1))
            });
        if next_seq > implied {
            inner.roll()?;
            inner.commit()?;
        }
        inner.release()?;

        let shared = Shared {
            durable_tx: watch::channel(inner.durable_seq).0,
            acked_tx: watch::channel(inner.acked).0,
            inner: Mutex::new(inner),
        };
        Ok((
            Spool {
                shared: Arc::new(shared),
            },
            rec,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing under this lock panics; if something did, the state is still the
        // best knowledge there is, and every write path re-checks `failed`.
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Buffered append; **not durable until [`Spool::commit`]**. Returns the record's
    /// seq. Refuses with [`SpoolError::Full`] while [`Spool::is_full`].
    pub fn append(&self, meta: &[u8], payload: &[u8]) -> Result<u64, SpoolError> {
        let mut g = self.lock();
        g.check_failed()?;
        let size = meta.len() as u64 + payload.len() as u64;
        if size > MAX_RECORD_BYTES {
            return Err(SpoolError::TooLarge {
                size,
                limit: MAX_RECORD_BYTES,
            });
        }
        if g.bytes >= g.opts.max_size {
            return Err(SpoolError::Full {
                bytes: g.bytes,
                max_size: g.opts.max_size,
            });
        }
        let r = g.append(meta, payload);
        g.note_write_failure(r)
    }

    /// Makes every appended record durable: writes the buffer, `fsync`s the newest
    /// segment, and the directory if a segment was created since the last commit.
    /// Returns the last durable seq (0 = none).
    pub fn commit(&self) -> Result<u64, SpoolError> {
        let mut g = self.lock();
        g.check_failed()?;
        let r = g.commit();
        let r = g.note_write_failure(r);
        self.shared.durable_tx.send_if_modified(|v| {
            let changed = *v != g.durable_seq;
            *v = g.durable_seq;
            changed
        });
        r
    }

    /// The first durable, unacknowledged record with seq `>= seq` (normally exactly
    /// `seq`; a larger one if `seq` was acknowledged or lost to damage — check
    /// [`Record::seq`] and continue from `record.seq + 1`). `None` if there is none yet.
    pub fn read(&self, seq: u64) -> Result<Option<Record>, SpoolError> {
        let mut g = self.lock();
        let from = seq.max(g.acked.saturating_add(1));
        g.read_present(from)
    }

    /// Every durable record still on disk with seq `>= seq`, acknowledged or not, in
    /// order: for replaying source cursors at startup and for `soclink spool dump`.
    /// Each step takes the lock briefly; records appended meanwhile are included once
    /// committed.
    pub fn records_from(&self, seq: u64) -> Records {
        Records {
            spool: self.clone(),
            next: seq,
            done: false,
        }
    }

    /// The receiver acknowledged every record `<= seq`. Persists that atomically, then
    /// deletes the segments the rule in the module doc allows. Lower values are ignored.
    pub fn ack(&self, seq: u64) -> Result<(), SpoolError> {
        let mut g = self.lock();
        g.check_failed()?;
        if seq <= g.acked {
            return Ok(());
        }
        if seq > g.durable_seq {
            return Err(SpoolError::BeyondDurable {
                what: "acknowledged",
                seq,
                durable: g.durable_seq,
            });
        }
        let ledger = Ledger {
            acked: seq,
            checkpointed: g.checkpointed,
        };
        let r = g.write_ledger(ledger);
        g.note_failure(r)?;
        g.acked = seq;
        self.shared.acked_tx.send_replace(seq);
        let r = g.release();
        g.note_failure(r)
    }

    /// The sources' checkpoint files reflect every record `<= seq`. Persisted in the
    /// ledger; with [`SpoolOptions::gate_on_checkpoint`], segments holding records above
    /// it are kept even when acknowledged. Lower values are ignored.
    pub fn set_checkpointed(&self, seq: u64) -> Result<(), SpoolError> {
        let mut g = self.lock();
        g.check_failed()?;
        if seq <= g.checkpointed {
            return Ok(());
        }
        if seq > g.durable_seq {
            return Err(SpoolError::BeyondDurable {
                what: "checkpointed",
                seq,
                durable: g.durable_seq,
            });
        }
        let ledger = Ledger {
            acked: g.acked,
            checkpointed: seq,
        };
        let r = g.write_ledger(ledger);
        g.note_failure(r)?;
        g.checkpointed = seq;
        let r = g.release();
        g.note_failure(r)
    }

    /// Highest acknowledged seq (0 = none).
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// Highest checkpointed seq as last recorded (0 = none).
    pub fn checkpointed(&self) -> u64 {
        self.lock().checkpointed
    }

    pub fn stats(&self) -> SpoolStats {
        let g = self.lock();
        let first = g.first_unacked_entry();
        SpoolStats {
            first_unacked: first.map_or(g.next_seq, |e| e.seq),
            next_seq: g.next_seq,
            durable_seq: g.durable_seq,
            acked: g.acked,
            checkpointed: g.checkpointed,
            bytes: g.bytes,
            segments: g.segments.len(),
            oldest_unacked_age: first
                .map(|e| Duration::from_millis(now_ms().saturating_sub(e.time_ms))),
        }
    }

    /// True when the segment files take `max_size` bytes or more: producers must wait
    /// (for [`Spool::watch_acked`]) — nothing is dropped.
    pub fn is_full(&self) -> bool {
        let g = self.lock();
        g.bytes >= g.opts.max_size
    }

    /// Follows the last durable seq.
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.shared.durable_tx.subscribe()
    }

    /// Follows the acknowledged seq (space may have been freed when it moves).
    pub fn watch_acked(&self) -> watch::Receiver<u64> {
        self.shared.acked_tx.subscribe()
    }

    /// The directory this spool lives in.
    pub fn dir(&self) -> PathBuf {
        self.lock().dir.clone()
    }
}

/// Iterator over present durable records; see [`Spool::records_from`].
pub struct Records {
    spool: Spool,
    next: u64,
    done: bool,
}

impl Iterator for Records {
    type Item = Result<Record, SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.spool.lock().read_present(self.next);
        match r {
            Ok(Some(rec)) => {
                self.next = rec.seq.saturating_add(1);
                self.done = rec.seq == u64::MAX;
                Some(Ok(rec))
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

fn load_ledger(fs: &dyn Fs, dir: &Path, rec: &mut Recovery) -> Result<Ledger, SpoolError> {
    let path = dir.join(LEDGER_FILE);
    let file = fs.open(&path, false).map_err(io_err(&path))?;
    let len = file.size().map_err(io_err(&path))?;
    let decoded = if len == format::LEDGER_LEN as u64 {
        let mut buf = [0u8; format::LEDGER_LEN];
        read_exact_at(file.as_ref(), 0, &mut buf).map_err(io_err(&path))?;
        format::decode_ledger(&buf)
    } else {
        Err(DecodeError::Invalid(format!(
            "{len} bytes, expected {}",
            format::LEDGER_LEN
        )))
    };
    drop(file);
    match decoded {
        Ok(l) => Ok(l),
        Err(e @ DecodeError::Version(_)) => Err(SpoolError::Corrupt {
            path,
            detail: e.to_string(),
        }),
        Err(DecodeError::Invalid(why)) => {
            quarantine(fs, &path, &why, rec)?;
            rec.messages.push(
                "ack ledger unusable: resending every record still on disk (the relay dedupes by seq)"
                    .into(),
            );
            Ok(Ledger {
                acked: 0,
                checkpointed: 0,
            })
        }
    }
}

/// Renames a damaged file to `<name>.corrupt` so an operator can inspect it.
fn quarantine(fs: &dyn Fs, path: &Path, why: &str, rec: &mut Recovery) -> Result<(), SpoolError> {
    let mut target = path.as_os_str().to_owned();
    target.push(CORRUPT_SUFFIX);
    let target = PathBuf::from(target);
    fs.rename(path, &target).map_err(io_err(path))?;
    tracing::warn!(path = %path.display(), to = %target.display(), reason = why, "spool: quarantined damaged file");
    rec.messages.push(format!(
        "quarantined {} as {}: {why}",
        path.display(),
        target.display()
    ));
    rec.quarantined.push(target);
    Ok(())
}

impl Inner {
    fn check_failed(&self) -> Result<(), SpoolError> {
        match &self.failed {
            Some(why) => Err(SpoolError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Remembers an I/O failure on a write path: from then on only a reopen can tell
    /// what is on disk. A full disk during a ledger write changed nothing (the old
    /// ledger stands) and is passed on as [`SpoolError::NoSpace`].
    fn note_failure<T>(&mut self, r: Result<T, SpoolError>) -> Result<T, SpoolError> {
        match r {
            Err(e) if e.is_disk_full() => Err(e.into_no_space()),
            Err(e @ SpoolError::Io { .. }) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
            r => r,
        }
    }

    /// [`Inner::note_failure`] for append and commit: a full disk discards what was
    /// appended since the last commit, so memory and files agree again.
    fn note_write_failure<T>(&mut self, r: Result<T, SpoolError>) -> Result<T, SpoolError> {
        match r {
            Err(e) if e.is_disk_full() => match self.discard_uncommitted() {
                Ok(()) => Err(e.into_no_space()),
                Err(e2) => {
                    self.failed = Some(format!("{e}; then could not cut it off: {e2}"));
                    Err(e2)
                }
            },
            r => self.note_failure(r),
        }
    }

    /// Forgets every record appended since the last commit and cuts its bytes (whole or
    /// torn) off the files: segments started since then are removed, the newest kept
    /// one is truncated to its last committed record. Those seqs are handed out again;
    /// none of them was durable, so none was ever read or sent.
    fn discard_uncommitted(&mut self) -> Result<(), SpoolError> {
        self.pending.clear();
        self.reader = None;
        // Every commit (and open) leaves next_seq == durable_seq + 1.
        let keep_next = self.durable_seq + 1;
        while let Some(seg) = self.segments.pop_if(|s| s.first_seq > keep_next) {
            self.active = None;
            self.bytes = self.bytes.saturating_sub(seg.len);
            match self.fs.remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&seg.path)(e)),
            }
            self.dir_dirty = true;
        }
        if let Some(seg) = self.segments.last_mut() {
            let i = seg.entries.partition_point(|e| e.seq < keep_next);
            let len = seg.entries.get(i).map_or(seg.len, |e| e.offset);
            seg.entries.truncate(i);
            self.bytes = self.bytes.saturating_sub(seg.len - len);
            seg.len = len;
            let path = seg.path.clone();
            if self.active.is_none() {
                self.active = Some(self.fs.open(&path, false).map_err(io_err(&path))?);
            }
            if let Some(file) = self.active.as_mut() {
                // Shrinking needs no free space; the sync makes the cut survive a crash.
                file.set_len(len).map_err(io_err(&path))?;
                file.sync().map_err(io_err(&path))?;
            }
        }
        self.next_seq = keep_next;
        Ok(())
    }

    fn append(&mut self, meta: &[u8], payload: &[u8]) -> Result<u64, SpoolError> {
        if self.next_seq == u64::MAX {
            // Only reachable from a crafted file; never wrap and reuse a seq.
            return Err(SpoolError::Failed("sequence numbers exhausted".into()));
        }
        let total = RECORD_HEADER_LEN as u64 + meta.len() as u64 + payload.len() as u64;
        let roll = match self.segments.last() {
            None => true,
            Some(s) => {
                s.len > SEGMENT_HEADER_LEN as u64
                    && s.len.saturating_add(total) > self.opts.segment_size
            }
        };
        if roll {
            self.roll()?;
        }
        let seq = self.next_seq;
        let time_ms = now_ms();
        let Some(seg) = self.segments.last_mut() else {
            // roll() always leaves a newest segment.
            return Err(SpoolError::Failed("no segment to append to".into()));
        };
        seg.entries.push(Entry {
            seq,
            time_ms,
            offset: seg.len,
            len: u32::try_from(total).unwrap_or(u32::MAX),
        });
        seg.len += total;
        self.bytes += total;
        format::encode_record(&mut self.pending, seq, time_ms, meta, payload);
        self.next_seq += 1;
        if self.pending.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(seq)
    }

    fn active_path(&self) -> PathBuf {
        self.segments
            .last()
            .map_or_else(|| self.dir.clone(), |s| s.path.clone())
    }

    fn flush(&mut self) -> Result<(), SpoolError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.active_path();
        let Some(file) = self.active.as_mut() else {
            return Err(SpoolError::Failed("buffered records but no segment".into()));
        };
        file.append(&self.pending).map_err(io_err(&path))?;
        self.pending.clear();
        // A catch-up (groups of whole batches) or one large record (a 4 MiB bundle
        // chunk) grows the buffer, and its pages would stay resident through the quiet
        // hours after; steady traffic commits a few KiB at a time. Reallocating after a
        // large flush costs page faults worth well under 1 % of compressing what it held.
        if self.pending.capacity() > KEEP_PENDING {
            self.pending = Vec::new();
        }
        Ok(())
    }

    /// Finishes the newest segment (durably, so older segments are always complete on
    /// disk) and starts a new one named after `next_seq`.
    fn roll(&mut self) -> Result<(), SpoolError> {
        self.flush()?;
        let path = self.active_path();
        if let Some(file) = self.active.as_mut() {
            file.sync().map_err(io_err(&path))?;
        }
        let first_seq = self.next_seq;
        let path = self.dir.join(segment_name(first_seq));
        let mut file = self.fs.open(&path, true).map_err(io_err(&path))?;
        // A leftover file of that name can only hold uncommitted bytes.
        let header = file
            .set_len(0)
            .and_then(|()| file.append(&format::encode_segment_header(first_seq)));
        if let Err(e) = header {
            // Not in `segments` yet: a file left behind would claim seqs at reopen.
            drop(file);
            let _ = self.fs.remove_file(&path);
            return Err(io_err(&path)(e));
        }
        self.dir_dirty = true;
        self.active = Some(file);
        self.segments.push(Segment {
            first_seq,
            path,
            len: SEGMENT_HEADER_LEN as u64,
            entries: Vec::new(),
        });
        self.bytes += SEGMENT_HEADER_LEN as u64;
        Ok(())
    }

    fn commit(&mut self) -> Result<u64, SpoolError> {
        if self.durable_seq == self.next_seq - 1 && self.pending.is_empty() && !self.dir_dirty {
            // Nothing appended or created since the last commit: an idle commit is free.
            return Ok(self.durable_seq);
        }
        self.flush()?;
        let path = self.active_path();
        if let Some(file) = self.active.as_mut() {
            file.sync().map_err(io_err(&path))?;
        }
        if self.dir_dirty {
            self.fs.sync_dir(&self.dir).map_err(io_err(&self.dir))?;
            self.dir_dirty = false;
        }
        self.durable_seq = self.next_seq - 1;
        Ok(self.durable_seq)
    }

    fn write_ledger(&mut self, ledger: Ledger) -> Result<(), SpoolError> {
        let tmp = self.dir.join(LEDGER_TMP);
        let mut file = self.fs.open(&tmp, true).map_err(io_err(&tmp))?;
        file.set_len(0).map_err(io_err(&tmp))?;
        file.append(&format::encode_ledger(ledger))
            .map_err(io_err(&tmp))?;
        file.sync().map_err(io_err(&tmp))?;
        drop(file);
        let path = self.dir.join(LEDGER_FILE);
        self.fs.rename(&tmp, &path).map_err(io_err(&path))?;
        self.fs.sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        // That directory sync also made any new segment's entry durable.
        self.dir_dirty = false;
        Ok(())
    }

    /// Deletes every segment the rule in the module doc allows.
    fn release(&mut self) -> Result<(), SpoolError> {
        let limit = if self.opts.gate_on_checkpoint {
            self.acked.min(self.checkpointed)
        } else {
            self.acked
        };
        let mut removed = false;
        while self.segments.len() >= 2 && self.segments[1].first_seq - 1 <= limit {
            let seg = self.segments.remove(0);
            if self.reader.as_ref().is_some_and(|r| r.0 == seg.first_seq) {
                self.reader = None;
            }
            match self.fs.remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.segments.insert(0, seg);
                    return Err(io_err(&self.dir)(e));
                }
            }
            self.bytes = self.bytes.saturating_sub(seg.len);
            removed = true;
        }
        if removed {
            self.fs.sync_dir(&self.dir).map_err(io_err(&self.dir))?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn first_unacked_entry(&self) -> Option<Entry> {
        let from = self.acked.saturating_add(1);
        let start = self
            .segments
            .partition_point(|s| s.first_seq <= from)
            .saturating_sub(1);
        self.segments.get(start..)?.iter().find_map(|s| {
            let i = s.entries.partition_point(|e| e.seq < from);
            s.entries.get(i).copied()
        })
    }

    /// First present durable record with seq >= from. Records that fail their CRC
    /// now (damage after open) are logged and skipped.
    fn read_present(&mut self, from: u64) -> Result<Option<Record>, SpoolError> {
        if from > self.durable_seq {
            return Ok(None);
        }
        let mut si = self
            .segments
            .partition_point(|s| s.first_seq <= from)
            .saturating_sub(1);
        while si < self.segments.len() {
            let seg = &self.segments[si];
            let mut ei = seg.entries.partition_point(|e| e.seq < from);
            while let Some(entry) = self.segments[si].entries.get(ei).copied() {
                if entry.seq > self.durable_seq {
                    return Ok(None);
                }
                if let Some(rec) = self.read_entry(si, entry)? {
                    return Ok(Some(rec));
                }
                ei += 1;
            }
            si += 1;
        }
        Ok(None)
    }

    fn read_entry(&mut self, si: usize, entry: Entry) -> Result<Option<Record>, SpoolError> {
        let Some(seg) = self.segments.get(si) else {
            return Ok(None);
        };
        let path = seg.path.clone();
        let first_seq = seg.first_seq;
        let is_newest = si + 1 == self.segments.len();
        let file: &dyn FsFile = if is_newest && self.active.is_some() {
            match self.active.as_deref() {
                Some(f) => f,
                None => return Ok(None),
            }
        } else {
            if self.reader.as_ref().is_none_or(|r| r.0 != first_seq) {
                let f = self.fs.open(&path, false).map_err(io_err(&path))?;
                self.reader = Some((first_seq, f));
            }
            match self.reader.as_ref() {
                Some((_, f)) => f.as_ref(),
                None => return Ok(None),
            }
        };
        // The shipper reads every batch it sends: a pooled buffer (it hands it back)
        // spares an mmap, a page fault per 4 KiB and a munmap per batch (crate::pool).
        let mut buf = crate::pool::GZIP.take(entry.len as usize);
        buf.resize(entry.len as usize, 0);
        read_exact_at(file, entry.offset, &mut buf).map_err(io_err(&path))?;
        let valid = format::decode_record_header(&buf).filter(|h| {
            h.seq == entry.seq
                && h.total_len() == u64::from(entry.len)
                && h.crc == format::record_crc(&buf[..RECORD_HEADER_LEN], &buf[RECORD_HEADER_LEN..])
        });
        let Some(h) = valid else {
            tracing::warn!(path = %path.display(), seq = entry.seq, offset = entry.offset, "spool: record damaged since open, skipped");
            return Ok(None);
        };
        let meta_end = RECORD_HEADER_LEN + h.meta_len as usize;
        // The header check above proved meta_end <= buf.len().
        let meta = buf.get(RECORD_HEADER_LEN..meta_end).unwrap_or(&[]).to_vec();
        // Shift the payload down in place: `split_off` would copy it into a second
        // allocation of the same size.
        buf.drain(..meta_end.min(buf.len()));
        let payload = buf;
        Ok(Some(Record {
            seq: entry.seq,
            meta,
            payload,
        }))
    }
}
