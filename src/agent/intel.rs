//! The agent's intel task: stages alert records, closes periods into items, ships them
//! and remembers where it is across restarts.
//!
//! On disk, under `<state_dir>/intel/`:
//!
//! ```text
//! staging/            a spool of staged record batches; each record's meta holds when it
//!                     was staged and the file cursor after it (so a crash replays it)
//! checkpoints.json    file positions of the include files (may lag staging/)
//! state.json          the open period, staging consumed through seq S, the summary
//!                     counts so far, the items queued but not yet acknowledged, the
//!                     last delivered
//! outbox/<name>       item files queued for the relay, deleted once acknowledged
//! ```
//!
//! Closing period P: (1) build `outbox/<name>` from the staged records of P, (2) append
//! it in chunks to the priority spool and commit, (3) write `state.json` (P closed,
//! consumed through S, queue += item), (4) acknowledge S in staging. A crash before (3)
//! closes P again after the restart from the same staged records; the relay keeps the
//! first copy of an item name, so it is stored once. A crash after (3) repeats (4).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::sources::SealedBatch;
use crate::agent::sources::checkpoint::Checkpoints;
use crate::batch::Item;
use crate::fs::{Fs, FsWriter, RealFs, read_all, write_atomic};
use crate::incident::record::format_time;
use crate::intel::{IntelSettings, SOURCE, from_unix, item, item_name, period_start, unix};
use crate::ops::status::AgentHandles;
use crate::spool::{Spool, SpoolOptions};

/// How often the state file is rewritten while only the counts change.
const PERSIST_EVERY: Duration = Duration::from_secs(5);
/// Missed periods closed one by one after a long outage; beyond this many, the rest of
/// the gap becomes one item (so `every = "1s"` and a month offline stay bounded).
const MAX_CATCH_UP: u64 = 10_000;

/// Counters of one source over a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub lines: u64,
    pub bytes: u64,
    pub errors: u64,
    pub truncated: u64,
    pub drops: u64,
    pub parse_errors: u64,
}

/// What the agent measured during the open period (persisted, so a restart keeps it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acc {
    pub running_seconds: u64,
    /// Agent starts during the period (0: it ran throughout or not at all).
    pub restarts: u64,
    pub sources: BTreeMap<String, Counts>,
    pub upstream_connected_seconds: u64,
    /// Times the upstream link went down.
    pub upstream_outages: u64,
}

/// An item in the priority spool, not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub name: String,
    pub period_start: String,
    pub period_end: String,
    pub partial: bool,
    pub records: u64,
    pub bytes: u64,
    pub sha256: String,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The last item the relay acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    pub name: String,
    pub period_start: String,
    pub period_end: String,
    pub partial: bool,
    pub records: u64,
    pub acknowledged_at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    every_secs: u64,
    /// Start (Unix seconds) of the period now collecting.
    open_start: u64,
    /// Staging records up to this seq are in closed items.
    consumed_through: u64,
    acc: Acc,
    queue: Vec<Queued>,
    last_delivered: Option<Delivered>,
    /// Items delivered since the state file was created.
    delivered_total: u64,
}

/// What `soclink status` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IntelStatus {
    pub every_secs: u64,
    /// The period collecting now, and when it closes (the next item is due).
    pub open_period_start: String,
    pub next_due: String,
    /// Records staged for the open period so far.
    pub staged_records: u64,
    pub queued: Vec<Queued>,
    pub last_delivered: Option<Delivered>,
    pub delivered_total: u64,
    pub last_error: Option<String>,
    /// Damaged files set aside when the task started (relative to the state dir).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<String>,
}

/// Where the collector reads the time (a test drives it by hand).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// A `run-now` request and where its answer goes.
pub type RunNow = oneshot::Sender<Result<Queued, String>>;

/// What the rest of the agent holds of the intel task.
#[derive(Clone)]
pub struct IntelHandle {
    pub status: Arc<Mutex<IntelStatus>>,
    pub run_now: mpsc::Sender<RunNow>,
}

/// The meta of a staged record.
#[derive(Debug, Serialize, Deserialize)]
struct Staged {
    /// Unix milliseconds when it was staged: decides its period.
    at_ms: u64,
    events: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursor: Option<serde_json::Value>,
}

/// The intel task's state and files; all methods block (they fsync).
pub struct Collector {
    dir: PathBuf,
    every: u64,
    max_upload: u64,
    agent: String,
    host: String,
    state_dir: PathBuf,
    staging: Spool,
    checkpoints: Checkpoints,
    ck_dirty: bool,
    state: State,
    priority: Spool,
    handles: AgentHandles,
    /// Cumulative counters at the last sample (they restart from zero with the agent).
    last_sample: BTreeMap<String, Counts>,
    last_connected: Option<bool>,
    last_tick: Option<std::time::Instant>,
    status: Arc<Mutex<IntelStatus>>,
    first_run: bool,
    /// Damaged files set aside at start, for status.
    quarantined: Vec<String>,
    /// The wall clock was last seen before the open period's start (stepped back).
    clock_behind: bool,
    /// Every durable file of the collector goes through here (a test simulates crashes).
    fs: Arc<dyn Fs>,
    clock: Clock,
}

impl Collector {
    /// Open (and recover) the intel state; `state_dir/intel` is created if needed.
    pub fn open(
        settings: &IntelSettings,
        agent: &str,
        host: &str,
        state_dir: &Path,
        priority: Spool,
        handles: AgentHandles,
    ) -> Result<Collector> {
        Collector::open_with(
            settings,
            agent,
            host,
            state_dir,
            priority,
            handles,
            Arc::new(RealFs),
            Arc::new(crate::clock::now),
        )
    }

    /// [`Collector::open`] on the file system `fs` and the clock `clock`.
    #[allow(clippy::too_many_arguments)]
    pub fn open_with(
        settings: &IntelSettings,
        agent: &str,
        host: &str,
        state_dir: &Path,
        priority: Spool,
        handles: AgentHandles,
        fs: Arc<dyn Fs>,
        clock: Clock,
    ) -> Result<Collector> {
        let dir = state_dir.join("intel");
        fs.create_dir_all_durable(&dir.join("outbox"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let (staging, rec) = Spool::open_with_fs(
            &dir.join("staging"),
            SpoolOptions {
                // Room for a few periods at the upload cap while the link is down.
                max_size: settings.max_upload_size.saturating_mul(4).max(64 << 20),
                segment_size: settings.staging_segment_size,
                gate_on_checkpoint: true,
            },
            fs.clone(),
        )
        .with_context(|| format!("cannot open the intel staging spool in {}", dir.display()))?;
        for m in &rec.messages {
            tracing::warn!("intel staging recovery: {m}");
        }
        let rel = |p: &Path| p.strip_prefix(state_dir).unwrap_or(p).display().to_string();
        let mut quarantined: Vec<String> = rec.quarantined.iter().map(|p| rel(p)).collect();
        let ck_path = Checkpoints::path(&dir);
        let (mut checkpoints, reset) = Checkpoints::load_or_quarantine(&*fs, &ck_path);
        if let Some((e, aside)) = reset {
            let shown = aside
                .as_deref()
                .map_or("(could not be moved aside)".into(), rel);
            tracing::error!(
                "{e}; moved it to {shown}; intel files are read again from their start_at position"
            );
            quarantined.push(shown);
        }
        for r in staging.records_from(checkpoints.spool_seq + 1) {
            let r = r?;
            if let Ok(m) = serde_json::from_slice::<Staged>(&r.meta)
                && let Some(c) = &m.cursor
            {
                checkpoints.apply(SOURCE, c);
            }
            checkpoints.spool_seq = r.seq;
        }
        let every = settings.every.as_secs().max(1);
        let now = unix(clock());
        let state_path = dir.join("state.json");
        let mut state = match read_all(&*fs, &state_path) {
            Ok(Some(b)) => serde_json::from_slice::<State>(&b).unwrap_or_else(|e| {
                let aside = dir.join("state.json.corrupt");
                let _ = fs.rename(&state_path, &aside);
                quarantined.push(rel(&aside));
                tracing::error!(
                    "{}: {e}; moved to {} and starting a new schedule at the current period",
                    state_path.display(),
                    aside.display()
                );
                State::default()
            }),
            Ok(None) | Err(_) => State::default(),
        };
        let first_run = state.every_secs == 0;
        if first_run {
            state.open_start = period_start(now, every);
        } else {
            state.acc.restarts += 1;
            if state.every_secs != every {
                tracing::info!(
                    "intel: the period changed from {}s to {every}s; the open period ends at the next {every}s boundary",
                    state.every_secs
                );
            }
        }
        state.every_secs = every;
        // A crash after state.json but before the staging acknowledgement.
        if state.consumed_through > staging.acked()
            && state.consumed_through <= staging.stats().durable_seq
        {
            staging.ack(state.consumed_through)?;
        }
        // Item files of a close that a crash cut short before `state.json` named them
        // (their chunks, if queued, are in the priority spool): nothing deletes them
        // later, and a partial's name is never cut again.
        let outbox = dir.join("outbox");
        for name in fs.list_dir(&outbox).unwrap_or_default() {
            if !state.queue.iter().any(|q| q.name == name) {
                let _ = fs.remove_file(&outbox.join(&name));
            }
        }
        let status = Arc::new(Mutex::new(IntelStatus::default()));
        let c = Collector {
            dir,
            every,
            max_upload: settings.max_upload_size,
            agent: agent.to_string(),
            host: host.to_string(),
            state_dir: state_dir.to_path_buf(),
            staging,
            checkpoints,
            ck_dirty: false,
            state,
            priority,
            handles,
            last_sample: BTreeMap::new(),
            last_connected: None,
            last_tick: None,
            status,
            first_run,
            quarantined,
            clock_behind: false,
            fs,
            clock,
        };
        c.save()?;
        c.publish(None);
        Ok(c)
    }

    /// Where the include files resume.
    pub fn positions(&self) -> Vec<crate::agent::sources::checkpoint::FilePos> {
        self.checkpoints
            .sources
            .get(SOURCE)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The include files' settings for this start: `start_at = "end"` applies to the
    /// very first start only; after that, a file that appeared while the agent was down
    /// (a rotation) is new and read from its beginning.
    pub fn files(&self, settings: &IntelSettings) -> crate::config::FileSourceConfig {
        let mut f = settings.files.clone();
        if !self.first_run {
            f.start_at = crate::config::StartAt::Beginning;
        }
        f
    }

    pub fn status(&self) -> Arc<Mutex<IntelStatus>> {
        self.status.clone()
    }

    pub fn staging_full(&self) -> bool {
        self.staging.is_full()
    }

    /// Stage a batch of alert records durably, in the period of now.
    pub fn stage(&mut self, b: &SealedBatch) -> Result<()> {
        let at_ms = (self.clock)()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let meta = serde_json::to_vec(&Staged {
            at_ms,
            events: b.events,
            cursor: b.cursor.clone(),
        })?;
        let seq = self.staging.append(&meta, &b.raw)?;
        self.staging.commit()?;
        if let Some(c) = &b.cursor {
            self.checkpoints.apply(SOURCE, c);
        }
        self.checkpoints.spool_seq = seq;
        self.ck_dirty = true;
        Ok(())
    }

    /// When the open period ends (a change of `every` ends it at the new grid).
    fn open_end(&self) -> u64 {
        period_start(self.state.open_start, self.every) + self.every
    }

    /// Once a second: count, close what is due, note acknowledgements, persist.
    pub fn tick(&mut self) -> Result<()> {
        self.sample();
        let now = unix((self.clock)());
        // A step back never reopens or re-closes a period (its item name may already be
        // at the relay, which keeps the first copy): the open period just lasts until
        // the clock reaches its end again, and takes the records staged meanwhile.
        let behind = now < self.state.open_start;
        if behind && !self.clock_behind {
            tracing::warn!(
                "intel: the wall clock ({}) is before the open period, which started {}: it was stepped back; that period stays open until {}, so none is closed twice",
                format_time(from_unix(now)),
                format_time(from_unix(self.state.open_start)),
                format_time(from_unix(self.open_end()))
            );
        }
        self.clock_behind = behind;
        let mut closed = 0;
        loop {
            let start = self.state.open_start;
            let mut end = self.open_end();
            if now < end {
                break;
            }
            let missed = (now - end) / self.every + 1;
            if missed > MAX_CATCH_UP {
                tracing::warn!(
                    "intel: {missed} periods were missed; the oldest {} go into one item",
                    missed - MAX_CATCH_UP
                );
                end += (missed - MAX_CATCH_UP) * self.every;
            }
            self.close(start, end, None)?;
            closed += 1;
        }
        if closed > 1 {
            tracing::info!("intel: caught up {closed} periods");
        }
        let mut changed = closed > 0;
        changed |= self.note_acks()?;
        if self.ck_dirty {
            self.checkpoints
                .store_with(&*self.fs, &Checkpoints::path(&self.dir))
                .context("cannot write the intel checkpoints")?;
            self.staging.set_checkpointed(self.checkpoints.spool_seq)?;
            self.ck_dirty = false;
        }
        if changed {
            self.save()?;
        }
        self.publish(None);
        Ok(())
    }

    /// `soclink intel run-now`: a partial item of the open period up to the current
    /// second (a preview: the period's full item still carries all of its records).
    pub fn run_now(&mut self) -> Result<Queued> {
        let now = unix((self.clock)());
        let start = self.state.open_start;
        let q = self.close(start, now.max(start), Some(now))?;
        self.save()?;
        self.publish(None);
        Ok(q)
    }

    /// Persist everything (at shutdown).
    pub fn finish(&mut self) -> Result<()> {
        self.sample();
        if self.ck_dirty {
            self.checkpoints
                .store_with(&*self.fs, &Checkpoints::path(&self.dir))?;
            self.staging.set_checkpointed(self.checkpoints.spool_seq)?;
        }
        self.save()
    }

    pub fn publish(&self, error: Option<String>) {
        let staged = self
            .staging
            .stats()
            .durable_seq
            .saturating_sub(self.state.consumed_through);
        let mut s = crate::util::lock(&self.status);
        *s = IntelStatus {
            every_secs: self.every,
            open_period_start: format_time(from_unix(self.state.open_start)),
            next_due: format_time(from_unix(self.open_end())),
            staged_records: staged,
            queued: self.state.queue.clone(),
            last_delivered: self.state.last_delivered.clone(),
            delivered_total: self.state.delivered_total,
            last_error: error.or_else(|| s.last_error.take()),
            quarantined: self.quarantined.clone(),
        };
    }

    fn save(&self) -> Result<()> {
        let p = self.dir.join("state.json");
        write_atomic(&*self.fs, &p, &serde_json::to_vec_pretty(&self.state)?)
            .with_context(|| format!("cannot write {}", p.display()))
    }

    /// Add what the counters gained since the last sample.
    pub fn sample(&mut self) {
        let snap = self.handles.snapshot();
        let dt = self
            .last_tick
            .replace(std::time::Instant::now())
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        // Whole seconds, rounded, so a 1 s tick counts 1 even when it fires late.
        let secs = (dt + 500) / 1000;
        let acc = &mut self.state.acc;
        acc.running_seconds += secs;
        for s in &snap.sources {
            let now = Counts {
                lines: s.lines,
                bytes: s.bytes,
                errors: s.errors,
                truncated: s.truncated,
                drops: s.drops.unwrap_or(0),
                parse_errors: s.parse_errors.unwrap_or(0),
            };
            let before = self.last_sample.get(&s.name).cloned().unwrap_or_default();
            let a = acc.sources.entry(s.name.clone()).or_default();
            let d = |n: u64, b: u64| n.saturating_sub(b);
            a.lines += d(now.lines, before.lines);
            a.bytes += d(now.bytes, before.bytes);
            a.errors += d(now.errors, before.errors);
            a.truncated += d(now.truncated, before.truncated);
            a.drops += d(now.drops, before.drops);
            a.parse_errors += d(now.parse_errors, before.parse_errors);
            self.last_sample.insert(s.name.clone(), now);
        }
        if let Some(l) = &snap.upstream {
            if l.connected {
                acc.upstream_connected_seconds += secs;
            } else if self.last_connected == Some(true) {
                acc.upstream_outages += 1;
            }
            self.last_connected = Some(l.connected);
        }
    }

    /// Build, queue and record the item of [start, end); `partial_at` for run-now.
    fn close(&mut self, start: u64, end: u64, partial_at: Option<u64>) -> Result<Queued> {
        let name = item_name(start, partial_at);
        // Which staged batches go in (in seq order; the cap leaves whole batches out).
        let end_ms = end.saturating_mul(1000);
        let mut picked: Vec<(u64, bool)> = Vec::new();
        let (mut records, mut bytes, mut left, mut left_bytes) = (0u64, 0u64, 0u64, 0u64);
        let mut hasher = Sha256::new();
        for r in self.staging.records_from(self.state.consumed_through + 1) {
            let r = r?;
            let m: Staged = serde_json::from_slice(&r.meta).unwrap_or(Staged {
                at_ms: 0,
                events: 0,
                cursor: None,
            });
            // A partial ends at its cut second too: a second run-now in the same second
            // cuts an item of the same name, which must hold the same records (the relay
            // keeps the first copy of a name).
            if m.at_ms >= end_ms {
                break;
            }
            let lines = memchr::memchr_iter(b'\n', &r.payload).count() as u64;
            let fits = bytes + r.payload.len() as u64 <= self.max_upload;
            if fits {
                hasher.update(&r.payload);
                records += lines;
                bytes += r.payload.len() as u64;
            } else {
                left += lines;
                left_bytes += r.payload.len() as u64;
            }
            picked.push((r.seq, fits));
        }
        if left > 0 {
            tracing::warn!(
                "intel item {name}: {left} records ({left_bytes} bytes) left out: over max_upload_size ({} bytes)",
                self.max_upload
            );
        }
        let header = item::Header {
            format: item::FORMAT.to_string(),
            agent: self.agent.clone(),
            host: self.host.clone(),
            period_start: format_time(from_unix(start)),
            period_end: format_time(from_unix(end)),
            partial: partial_at.is_some(),
            generated_at: format_time((self.clock)()),
            records,
            records_bytes: bytes,
            records_sha256: crate::incident::hex(&hasher.finalize()),
            records_left_out: left,
            records_left_out_bytes: left_bytes,
            summary: self.summary(start, end),
        };
        let path = self.dir.join("outbox").join(&name);
        let tmp = path.with_extension("gz.tmp");
        // A temp file left by a crash would be appended to: start from nothing.
        match self.fs.remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", tmp.display()));
            }
            _ => {}
        }
        let file = self
            .fs
            .open(&tmp, true)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let included: std::collections::HashSet<u64> =
            picked.iter().filter(|p| p.1).map(|p| p.0).collect();
        let from = picked.first().map(|p| p.0);
        let last = picked.last().map_or(0, |p| p.0);
        let staging = self.staging.clone();
        let staged = from
            .into_iter()
            .flat_map(move |f| staging.records_from(f))
            .take_while(|r| r.as_ref().map_or(true, |r| r.seq <= last))
            .filter_map(|r| match r {
                Ok(r) if included.contains(&r.seq) => Some(Ok(r.payload)),
                Ok(_) => None,
                Err(e) => Some(Err(std::io::Error::other(e))),
            });
        item::write(std::io::BufWriter::new(FsWriter(file)), &header, staged)
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .and_then(|mut f| f.0.sync())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        self.fs.rename(&tmp, &path)?;
        self.fs.sync_dir(&self.dir.join("outbox"))?;
        let (first_seq, last_seq, size) = crate::agent::incident::outbox::enqueue_file(
            &*self.fs,
            &self.priority,
            &path,
            SOURCE,
            |offset, total, sha| Item::IntelChunk {
                name: name.clone(),
                offset,
                total,
                sha256: sha.to_string(),
            },
        )?;
        let q = Queued {
            name: name.clone(),
            period_start: header.period_start.clone(),
            period_end: header.period_end.clone(),
            partial: header.partial,
            records,
            bytes: size,
            sha256: crate::fs::sha256_file(&*self.fs, &path)?,
            first_seq,
            last_seq,
        };
        self.state.queue.push(q.clone());
        if partial_at.is_none() {
            if last > 0 {
                self.state.consumed_through = last;
            }
            self.state.open_start = end;
            self.state.acc = Acc::default();
        }
        self.save()?;
        if partial_at.is_none() && last > 0 {
            self.staging.ack(last)?;
        }
        tracing::info!(
            "intel item {name} queued: {records} records, {size} bytes{}",
            if header.partial {
                " (partial, run-now)"
            } else {
                ""
            }
        );
        Ok(q)
    }

    /// What the agent itself measured over the period.
    fn summary(&self, start: u64, end: u64) -> serde_json::Value {
        let acc = &self.state.acc;
        let snap = self.handles.snapshot();
        let incidents: Vec<serde_json::Value> =
            crate::incident::record::IncidentStore::open_with_fs(&self.state_dir, self.fs.clone())
                .and_then(|s| s.list())
                .unwrap_or_default()
                .into_iter()
                .filter(|i| (start..end).contains(&unix(i.declared_at)))
                .map(|i| serde_json::json!({"id": i.id, "level": i.level, "drill": i.drill}))
                .collect();
        serde_json::json!({
            "period_seconds": end - start,
            "agent_running_seconds": acc.running_seconds,
            "agent_restarts": acc.restarts,
            "sources": acc.sources,
            "spool": {
                "depth_batches": snap.spool.depth_batches,
                "bytes": snap.spool.bytes,
                "oldest_undelivered_age_seconds": snap.spool.oldest_unacked_age_secs,
            },
            "upstream": {
                "connected_seconds": acc.upstream_connected_seconds,
                "outages": acc.upstream_outages,
            },
            "incidents_declared": incidents,
        })
    }

    /// Items the relay acknowledged leave the queue; true when any did.
    fn note_acks(&mut self) -> Result<bool> {
        let acked = self.priority.acked();
        let mut changed = false;
        while let Some(q) = self.state.queue.first() {
            if q.last_seq > acked {
                break;
            }
            let q = self.state.queue.remove(0);
            let _ = self.fs.remove_file(&self.dir.join("outbox").join(&q.name));
            tracing::info!("intel item {} acknowledged by the relay", q.name);
            self.state.last_delivered = Some(Delivered {
                name: q.name,
                period_start: q.period_start,
                period_end: q.period_end,
                partial: q.partial,
                records: q.records,
                acknowledged_at: format_time((self.clock)()),
            });
            self.state.delivered_total += 1;
            changed = true;
        }
        Ok(changed)
    }
}

/// Runs one blocking step on the pool, with the collector moved there and back.
async fn step<T: Send + 'static>(
    c: &mut Option<Collector>,
    f: impl FnOnce(&mut Collector) -> Result<T> + Send + 'static,
) -> Result<T> {
    let Some(mut owned) = c.take() else {
        anyhow::bail!("the intel task lost its state after an earlier failure; restart the agent");
    };
    let (owned, r) = tokio::task::spawn_blocking(move || {
        let r = f(&mut owned);
        (owned, r)
    })
    .await
    .map_err(|e| anyhow::anyhow!("intel task panicked: {e}"))?;
    *c = Some(owned);
    r
}

/// Stage one batch, retrying every second while staging fails (a full disk): its
/// records are never skipped, and the file source waits meanwhile. Gives up only at
/// shutdown (then the batch is read again after the restart: its position never
/// advanced).
async fn stage_until_done(
    c: &mut Option<Collector>,
    b: SealedBatch,
    stop: &CancellationToken,
) -> Result<()> {
    let b = Arc::new(b);
    let mut logged = false;
    loop {
        let b2 = b.clone();
        match step(c, move |c| c.stage(&b2)).await {
            Ok(()) => return Ok(()),
            Err(e) if stop.is_cancelled() => return Err(e),
            Err(e) => {
                if !logged {
                    tracing::error!("intel: cannot stage alert records, retrying every 1s: {e:#}");
                    logged = true;
                }
                if let Some(c) = c.as_ref() {
                    c.publish(Some(format!("{e:#}")));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Run the intel task until `stop`: staged batches from `rx`, a tick every second,
/// `run-now` requests. Errors are logged and shown in status; the task keeps going
/// (what is staged stays staged).
pub async fn run(
    collector: Collector,
    mut rx: mpsc::Receiver<SealedBatch>,
    mut run_now: mpsc::Receiver<RunNow>,
    stop: CancellationToken,
) {
    let mut c = Some(collector);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_save = std::time::Instant::now();
    loop {
        let full = c.as_ref().is_some_and(Collector::staging_full);
        let res = tokio::select! {
            b = rx.recv(), if !full => match b {
                Some(b) => stage_until_done(&mut c, b, &stop).await,
                None => { stop.cancelled().await; break; }
            },
            _ = tick.tick() => {
                let r = step(&mut c, Collector::tick).await;
                if last_save.elapsed() >= PERSIST_EVERY {
                    last_save = std::time::Instant::now();
                    let _ = step(&mut c, Collector::save_counts).await;
                }
                r
            }
            Some(reply) = run_now.recv() => {
                let r = step(&mut c, Collector::run_now).await;
                let _ = reply.send(r.as_ref().map(Clone::clone).map_err(|e| format!("{e:#}")));
                r.map(|_| ())
            }
            _ = stop.cancelled() => break,
        };
        if let Err(e) = res {
            tracing::error!("intel: {e:#}");
            if let Some(c) = &c {
                c.publish(Some(format!("{e:#}")));
            }
        }
    }
    // The sources have stopped: stage what they still send, then persist.
    while let Ok(b) = rx.try_recv() {
        if let Err(e) = stage_until_done(&mut c, b, &stop).await {
            tracing::error!("intel: {e:#}");
        }
    }
    if let Err(e) = step(&mut c, Collector::finish).await {
        tracing::error!("intel: cannot save its state at shutdown: {e:#}");
    }
}

impl Collector {
    /// The periodic save of the counts between closes.
    fn save_counts(&mut self) -> Result<()> {
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::fake;

    const H: u64 = 3600;
    /// 2025-11-26T10:00:00Z, a period boundary for `every = "1h"`.
    const B: u64 = 1_764_151_200;

    fn collector(dir: &Path) -> Collector {
        let text = format!(
            "id = \"a\"\nstate_dir = {:?}\n[[source]]\nname = \"app\"\ntype = \"file\"\ninclude = [{:?}]\n\
             [upstream]\naddress = \"127.0.0.1:9\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [intel]\nevery = \"1h\"\ninclude = [{:?}]\n",
            dir.join("state"),
            dir.join("app.log"),
            dir.join("eve.json")
        );
        let cfg = crate::config::parse_agent(&text).unwrap_or_else(|p| panic!("{p:?}"));
        let (priority, _) = Spool::open(&dir.join("spool"), SpoolOptions::default()).unwrap();
        let handles = AgentHandles::new(
            &cfg,
            Vec::new(),
            priority.clone(),
            None,
            std::time::Instant::now(),
        );
        let settings = cfg.intel.as_ref().unwrap();
        Collector::open(settings, "a", "h", &cfg.state_dir, priority, handles).unwrap()
    }

    fn batch(tag: &str) -> SealedBatch {
        SealedBatch {
            source: SOURCE.into(),
            day: "2025-11-26".into(),
            events: 1,
            raw: format!("{{\"alert\":\"{tag}\"}}\n").into_bytes(),
            cursor: None,
        }
    }

    /// (item name, records) of every item queued so far.
    fn queued(c: &Collector) -> Vec<(String, u64)> {
        c.state
            .queue
            .iter()
            .map(|q| (q.name.clone(), q.records))
            .collect()
    }

    #[test]
    fn intel_period_not_closed_twice_after_clock_steps_back() {
        let dir = tempfile::tempdir().unwrap();
        let clock = fake::set(from_unix(B - 10));
        let mut c = collector(dir.path());
        c.stage(&batch("before")).unwrap();
        clock.jump(20);
        c.tick().unwrap();
        let first = vec![(item_name(B - H, None), 1)];
        assert_eq!(queued(&c), first);

        clock.jump(-3600);
        c.stage(&batch("behind")).unwrap();
        for _ in 0..5 {
            c.tick().unwrap();
            clock.jump(60);
        }
        assert_eq!(
            queued(&c),
            first,
            "a period closed again while the clock was behind"
        );
        assert!(c.clock_behind);
        assert_eq!(c.state.open_start, B);

        // The clock reaches the open period's end again: it closes once, with the record
        // staged while the clock was behind.
        clock.jump(2 * 3600);
        c.tick().unwrap();
        c.tick().unwrap();
        assert_eq!(
            queued(&c),
            vec![(item_name(B - H, None), 1), (item_name(B, None), 1)]
        );
        assert!(!c.clock_behind);
    }

    #[test]
    fn intel_forward_step_closes_each_skipped_period_once() {
        let dir = tempfile::tempdir().unwrap();
        let clock = fake::set(from_unix(B - 10));
        let mut c = collector(dir.path());
        c.stage(&batch("before")).unwrap();
        clock.jump(86_400 + 20);
        c.tick().unwrap();
        c.stage(&batch("after")).unwrap();
        c.tick().unwrap();
        // [B-1h, B) with the record, then the 24 skipped periods, empty, once each.
        let mut want = vec![(item_name(B - H, None), 1)];
        want.extend((0..24).map(|k| (item_name(B + k * H, None), 0)));
        assert_eq!(queued(&c), want);
        assert_eq!(c.state.open_start, B + 24 * H);
        clock.jump(3600);
        c.tick().unwrap();
        assert_eq!(
            queued(&c).last().unwrap(),
            &(item_name(B + 24 * H, None), 1),
            "the record staged after the step is in the period of its staging"
        );
        assert_eq!(queued(&c).len(), 26);
    }
}
