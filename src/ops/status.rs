//! `soclink status`: what a running agent or relay reports about itself, how it is
//! gathered from live handles, and how it is shown.
//!
//! - [`AgentHandles`] / [`RelayHandles`] hold clones of the live counters (`Arc`s the
//!   running components update) and take a [`Status`] snapshot on request; they are the
//!   control socket's [`Handler`](crate::ops::control::Handler) for `{"cmd":"status"}`.
//! - [`Status`] is the stable `--json` output (field names are a contract: add fields,
//!   never rename them). Times are RFC 3339 UTC strings, durations whole seconds, sizes
//!   bytes.
//! - [`render_agent`] / [`render_relay`] turn a snapshot into an aligned human table.
//!
//! Taking a snapshot only reads counters and takes locks briefly; it never holds up the
//! pipeline. The spool's and the store's locks can be held across an fsync, so
//! snapshots are taken on the blocking pool, never on an async worker.

use crate::util::lock;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::sources::file::SourceStats;
use crate::agent::sources::journald::JournaldStats;
use crate::agent::sources::syslog::SyslogStats;
use crate::config::{AgentConfig, RelayConfig};
use crate::ops::control::{self, ControlError, Handler, HandlerFuture};
use crate::relay::server::Peers;
use crate::relay::sink::file::Store;
use crate::ship::UpstreamStatus;
use crate::spool::Spool;

/// A status snapshot of either role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Status {
    Agent(AgentStatus),
    Relay(RelayStatus),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub id: String,
    pub version: String,
    /// When this snapshot was taken (ages in the table are relative to it).
    #[serde(with = "rfc3339")]
    pub generated_at: SystemTime,
    pub uptime_secs: u64,
    pub sources: Vec<SourceStatus>,
    pub spool: SpoolStatus,
    /// `null` when the agent has no `[upstream]` (it only spools).
    pub upstream: Option<LinkStatus>,
    /// What the agent repaired or set aside when it opened its state at start.
    #[serde(default)]
    pub recovery: RecoveryStatus,
    /// Absent when `[intel]` is not configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intel: Option<Box<crate::agent::intel::IntelStatus>>,
}

/// Damage found and handled when the agent opened its state directory (the last start
/// or reload): every item was detected, set aside or cut, and logged once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    /// Bytes of an incomplete last record cut off the spools (a crash mid-write).
    pub torn_bytes: u64,
    /// Damaged records skipped inside spool segments.
    pub corrupt_records: u64,
    /// Files moved aside (renamed `*.corrupt`), relative to the state directory.
    pub quarantined: Vec<String>,
    /// Set when the checkpoint file was unreadable and moved aside: why.
    pub checkpoint_reset: Option<String>,
}

impl RecoveryStatus {
    pub fn is_clean(&self) -> bool {
        *self == RecoveryStatus::default()
    }
}

/// One source's counters since the agent started. Fields a source type does not have
/// are `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub name: String,
    /// `file`, `syslog` or `journald`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Lines (file), messages (syslog) or entries (journald) turned into events.
    pub lines: u64,
    /// Bytes of those lines as read, without line terminators (journald: NDJSON bytes).
    pub bytes: u64,
    pub errors: u64,
    pub truncated: u64,
    /// Syslog UDP datagrams dropped because the pipeline was full.
    pub drops: Option<u64>,
    /// Files the file source has opened.
    pub files: Option<u64>,
    /// Syslog messages that did not parse (kept raw).
    pub parse_errors: Option<u64>,
    /// Journald resumptions whose saved cursor was gone (entries may be missing).
    pub gaps: Option<u64>,
    /// Files gone before the file source could open or reopen them (deleted, or
    /// renamed out of its globs): lines written to them after that were not collected.
    #[serde(default)]
    pub vanished: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpoolStatus {
    /// Batches durable in the spool and not yet acknowledged upstream.
    pub depth_batches: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub acked_seq: u64,
    pub durable_seq: u64,
    pub oldest_unacked_age_secs: Option<u64>,
    /// True while the spool is full and the sources are paused.
    pub full: bool,
}

/// The upstream link (agent → relay, or relay → upstream relay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub address: String,
    pub connected: bool,
    /// The relay's id from its last HelloAck.
    pub relay_id: Option<String>,
    /// Since when the link is down (`null` while connected or before the first try).
    #[serde(with = "rfc3339_opt")]
    pub down_since: Option<SystemTime>,
    pub last_error: Option<String>,
    #[serde(with = "rfc3339_opt")]
    pub last_ack: Option<SystemTime>,
    pub acked_seq: u64,
    pub reconnects: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStatus {
    pub id: String,
    pub version: String,
    #[serde(with = "rfc3339")]
    pub generated_at: SystemTime,
    pub uptime_secs: u64,
    /// Live connections, oldest first.
    pub connections: Vec<ConnectionStatus>,
    /// Every agent seen since start or present in the store, by identity.
    pub agents: Vec<AgentSeen>,
    /// `null` when the relay stores instead of forwarding.
    pub upstream: Option<LinkStatus>,
    /// The forwarding spool (`null` when the relay stores).
    pub spool: Option<SpoolStatus>,
    /// What the store repaired or set aside at start, and agents whose dedupe was
    /// reset (those stay listed for the store's prune period, across restarts).
    #[serde(default)]
    pub recovery: RelayRecoveryStatus,
}

/// Damage the relay's store found and handled (see `relay::store`, rules 3 and 5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRecoveryStatus {
    /// Bytes of unacknowledged batches cut off store files at start (a crash).
    pub cut_bytes: u64,
    /// Store files missing or shorter than their acknowledged length at start.
    pub damaged_files: Vec<String>,
    /// Files moved aside at start (renamed `*.corrupt`), relative to `state_dir`.
    pub quarantined: Vec<String>,
    /// Agents whose dedupe state was corrupt and set aside.
    pub dedupe_resets: Vec<DedupeResetStatus>,
}

impl RelayRecoveryStatus {
    pub fn is_clean(&self) -> bool {
        *self == RelayRecoveryStatus::default()
    }

    /// The start-time part, from what the store's open repaired.
    pub fn from_store(r: &crate::relay::sink::file::StoreRecovery, state_dir: &Path) -> Self {
        let rel = |p: &Path| p.strip_prefix(state_dir).unwrap_or(p).display().to_string();
        RelayRecoveryStatus {
            cut_bytes: r
                .truncated
                .iter()
                .map(|t| t.from.saturating_sub(t.to))
                .sum(),
            damaged_files: r
                .missing
                .iter()
                .chain(r.short.iter().map(|t| &t.path))
                .map(|p| p.display().to_string())
                .collect(),
            quarantined: r.quarantined.iter().map(|q| rel(&q.aside)).collect(),
            dedupe_resets: Vec::new(),
        }
    }
}

/// An agent whose dedupe state was lost: batches it sends again that the relay had
/// already stored are stored a second time. That can only happen for the batches that
/// were in flight (unacknowledged) when the state was lost: per stream, `from` (the
/// first seq stored after the reset) through `through`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupeResetStatus {
    pub agent: String,
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    pub reason: String,
    /// The state file set aside, relative to `state_dir`.
    pub quarantined: String,
    /// False once every stream stored since the reset is past its window (streams
    /// not sent since the reset are unknown to the relay: true while there are none).
    pub duplicates_possible: bool,
    pub streams: Vec<ResyncStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub stream: String,
    pub from: u64,
    pub through: u64,
    pub stored_seq: u64,
}

impl DedupeResetStatus {
    fn from_store(r: crate::relay::sink::file::DedupeReset) -> Self {
        let streams: Vec<ResyncStatus> = r
            .streams
            .into_iter()
            .map(|x| ResyncStatus {
                stream: x.stream,
                from: x.from,
                through: x.through,
                stored_seq: x.stored_seq,
            })
            .collect();
        DedupeResetStatus {
            agent: r.agent,
            at: r.at,
            reason: r.reason,
            quarantined: r.quarantined,
            duplicates_possible: streams.is_empty()
                || streams.iter().any(|x| x.stored_seq < x.through),
            streams,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// The identity from the client certificate.
    pub identity: String,
    pub address: String,
    #[serde(with = "rfc3339")]
    pub since: SystemTime,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    /// Batches received on this connection.
    pub batches: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSeen {
    pub identity: String,
    pub connected: bool,
    /// Last frame from it since this relay started (`null`: only known from the store).
    #[serde(with = "rfc3339_opt")]
    pub last_seen: Option<SystemTime>,
    /// Highest sequence stored per stream (empty when forwarding).
    pub streams: Vec<StreamSeq>,
    /// Compressed bytes stored (`null` when forwarding).
    pub stored_bytes: Option<u64>,
    #[serde(with = "rfc3339_opt")]
    pub last_write: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamSeq {
    pub stream: String,
    pub stored_seq: u64,
}

// ---------------------------------------------------------------------------------------
// Live handles
// ---------------------------------------------------------------------------------------

/// A source's live counters, by source type.
#[derive(Clone)]
pub enum SourceCounters {
    File(Arc<SourceStats>),
    Syslog(Arc<SyslogStats>),
    Journald(Arc<JournaldStats>),
}

/// The upstream link's live status and where it points.
#[derive(Clone)]
pub struct LinkHandle {
    pub address: String,
    pub status: Arc<Mutex<UpstreamStatus>>,
}

/// An upstream's address and its shipper's live status.
pub type Upstream = (String, Arc<Mutex<UpstreamStatus>>);

/// What a running agent shares with the control socket (clones are cheap: handles).
#[derive(Clone)]
pub struct AgentHandles {
    pub id: String,
    /// The identity incidents are recorded under ([`crate::identity::of_agent`]).
    pub identity: String,
    /// Where incidents declared through the socket are recorded (by the agent's user).
    pub state_dir: std::path::PathBuf,
    pub host: String,
    pub sources: Vec<(String, SourceCounters)>,
    pub spool: Spool,
    pub spool_max_bytes: u64,
    pub upstream: Option<LinkHandle>,
    pub started: Instant,
    /// The intel task, when `[intel]` is configured.
    pub intel: Option<crate::agent::intel::IntelHandle>,
    pub recovery: Arc<RecoveryStatus>,
}

/// What a running relay shares with the control socket.
pub struct RelayHandles {
    pub id: String,
    pub peers: Arc<Mutex<Peers>>,
    /// The store (`None` when forwarding).
    pub store: Option<Arc<Mutex<Store>>>,
    pub upstream: Option<LinkHandle>,
    /// The forwarding spool and its size limit (`None` when storing).
    pub spool: Option<(Spool, u64)>,
    pub started: Instant,
    /// What the store's open repaired (dedupe resets are read live from the store).
    pub recovery: RelayRecoveryStatus,
}

impl AgentHandles {
    /// `upstream` is the relay's address and the shipper's status.
    pub fn new(
        cfg: &AgentConfig,
        sources: Vec<(String, SourceCounters)>,
        spool: Spool,
        upstream: Option<Upstream>,
        started: Instant,
    ) -> AgentHandles {
        AgentHandles {
            id: cfg.id.clone(),
            identity: crate::identity::of_agent(cfg),
            state_dir: cfg.state_dir.clone(),
            host: cfg.host.clone(),
            sources,
            spool,
            spool_max_bytes: cfg.spool.max_size,
            upstream: upstream.map(|(address, status)| LinkHandle { address, status }),
            started,
            intel: None,
            recovery: Arc::default(),
        }
    }
}

/// Serve the relay's control socket on a task (see [`control::spawn`]); `forwarding`
/// is the upstream address, the shipper's status and the forwarding spool. Returns the
/// handles, for the metrics endpoint to share.
pub fn spawn_relay_control(
    cfg: &RelayConfig,
    peers: Arc<Mutex<Peers>>,
    store: Option<Arc<Mutex<Store>>>,
    forwarding: Option<(Upstream, Spool)>,
    recovery: RelayRecoveryStatus,
    shutdown: tokio_util::sync::CancellationToken,
) -> Arc<RelayHandles> {
    let (upstream, spool) = match forwarding {
        Some(((address, status), spool)) => (
            Some(LinkHandle { address, status }),
            Some((spool, cfg.spool.max_size)),
        ),
        None => (None, None),
    };
    let h = Arc::new(RelayHandles {
        id: cfg.id.clone(),
        peers,
        store,
        upstream,
        spool,
        started: Instant::now(),
        recovery,
    });
    control::spawn(
        cfg.control_socket.clone(),
        control::Access {
            operator_group: cfg.operator_group.clone(),
        },
        Arc::new(RelayControl(h.clone())),
        shutdown,
    );
    h
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl SourceCounters {
    fn snapshot(&self, name: &str) -> SourceStatus {
        let base = |kind: &str| SourceStatus {
            name: name.to_string(),
            kind: kind.to_string(),
            lines: 0,
            bytes: 0,
            errors: 0,
            truncated: 0,
            drops: None,
            files: None,
            parse_errors: None,
            gaps: None,
            vanished: None,
        };
        match self {
            SourceCounters::File(s) => SourceStatus {
                lines: get(&s.lines),
                bytes: get(&s.bytes),
                errors: get(&s.errors),
                truncated: get(&s.truncated),
                files: Some(get(&s.files)),
                vanished: Some(get(&s.vanished)),
                ..base("file")
            },
            SourceCounters::Syslog(s) => SourceStatus {
                lines: get(&s.received),
                bytes: get(&s.bytes),
                errors: get(&s.connection_errors),
                truncated: get(&s.truncated),
                drops: Some(get(&s.udp_drops)),
                parse_errors: Some(get(&s.parse_errors)),
                ..base("syslog")
            },
            SourceCounters::Journald(s) => SourceStatus {
                lines: get(&s.entries),
                bytes: get(&s.bytes),
                errors: get(&s.errors),
                gaps: Some(get(&s.gaps)),
                ..base("journald")
            },
        }
    }
}

impl LinkHandle {
    fn snapshot(&self) -> LinkStatus {
        let s = lock(&self.status).clone();
        LinkStatus {
            address: self.address.clone(),
            connected: s.connected,
            relay_id: s.relay_id,
            down_since: s.down_since,
            last_error: s.last_error,
            last_ack: s.last_ack,
            acked_seq: s.acked_seq,
            reconnects: s.reconnects,
        }
    }
}

fn spool_status(spool: &Spool, max_bytes: u64) -> SpoolStatus {
    let sp = spool.stats();
    SpoolStatus {
        depth_batches: sp.durable_seq.saturating_sub(sp.acked),
        bytes: sp.bytes,
        max_bytes,
        acked_seq: sp.acked,
        durable_seq: sp.durable_seq,
        oldest_unacked_age_secs: sp.oldest_unacked_age.map(|d| d.as_secs()),
        full: spool.is_full(),
    }
}

impl AgentHandles {
    /// Blocking: takes the spool's lock, which its writer holds across an fsync.
    pub fn snapshot(&self) -> AgentStatus {
        AgentStatus {
            id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generated_at: crate::clock::now(),
            uptime_secs: self.started.elapsed().as_secs(),
            sources: self
                .sources
                .iter()
                .map(|(name, c)| c.snapshot(name))
                .collect(),
            spool: spool_status(&self.spool, self.spool_max_bytes),
            upstream: self.upstream.as_ref().map(LinkHandle::snapshot),
            recovery: (*self.recovery).clone(),
            intel: self
                .intel
                .as_ref()
                .map(|i| Box::new(lock(&i.status).clone())),
        }
    }
}

impl RelayHandles {
    /// Blocking: takes the store's lock, which its writer holds across an fsync.
    pub fn snapshot(&self) -> RelayStatus {
        let (mut connections, mut last_seen): (Vec<ConnectionStatus>, Vec<(String, SystemTime)>) = {
            let p = lock(&self.peers);
            (
                p.live
                    .values()
                    .map(|c| ConnectionStatus {
                        identity: c.identity.clone(),
                        address: c.address.clone(),
                        since: c.connected_since,
                        last_seen: c.last_seen,
                        batches: c.batches,
                    })
                    .collect(),
                p.last_seen.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            )
        };
        connections.sort_by(|a, b| (a.since, &a.identity).cmp(&(b.since, &b.identity)));
        last_seen.sort();
        let (stored, resets) = self
            .store
            .as_ref()
            .map(|s| {
                let st = lock(s);
                (st.agents(), st.dedupe_resets())
            })
            .unwrap_or_default();
        let mut recovery = self.recovery.clone();
        recovery.dedupe_resets = resets
            .into_iter()
            .map(DedupeResetStatus::from_store)
            .collect();
        let mut agents: std::collections::BTreeMap<String, AgentSeen> = Default::default();
        let entry = |agents: &mut std::collections::BTreeMap<String, AgentSeen>, id: &str| {
            agents
                .entry(id.to_string())
                .or_insert_with(|| AgentSeen {
                    identity: id.to_string(),
                    connected: false,
                    last_seen: None,
                    streams: Vec::new(),
                    stored_bytes: None,
                    last_write: None,
                })
                .clone()
        };
        for (id, t) in &last_seen {
            let mut a = entry(&mut agents, id);
            a.last_seen = Some(*t);
            agents.insert(id.clone(), a);
        }
        for s in stored {
            let mut a = entry(&mut agents, &s.agent);
            a.streams = s
                .streams
                .into_iter()
                .map(|x| StreamSeq {
                    stream: x.stream,
                    stored_seq: x.stored_seq,
                })
                .collect();
            a.stored_bytes = Some(s.bytes);
            a.last_write = s.last_write;
            agents.insert(s.agent, a);
        }
        for c in &connections {
            if let Some(a) = agents.get_mut(&c.identity) {
                a.connected = true;
            }
        }
        RelayStatus {
            id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generated_at: crate::clock::now(),
            uptime_secs: self.started.elapsed().as_secs(),
            connections,
            agents: agents.into_values().collect(),
            upstream: self.upstream.as_ref().map(LinkHandle::snapshot),
            spool: self.spool.as_ref().map(|(s, max)| spool_status(s, *max)),
            recovery,
        }
    }
}

const COMMANDS: &[&str] = &["status", "incident_declare", "intel_run_now"];

impl Handler for AgentHandles {
    fn handle(&self, req: Value, caller: control::Caller) -> HandlerFuture<'_> {
        Box::pin(async move {
            match control::cmd_of(&req) {
                "status" => {
                    // The spool's lock is held across its fsyncs: wait on the blocking pool.
                    let h = self.clone();
                    let st = tokio::task::spawn_blocking(move || h.snapshot())
                        .await
                        .map_err(|e| format!("status failed: {e}"))?;
                    serde_json::to_value(Status::Agent(st))
                        .map_err(|e| format!("cannot encode the status: {e}"))
                }
                "incident_declare" => {
                    // Recorded by the agent itself, so the files belong to its user and
                    // its outbox can update them; the outbox builds the bundle.
                    let (dir, id, host) = (
                        self.state_dir.clone(),
                        self.identity.clone(),
                        self.host.clone(),
                    );
                    let by = crate::incident::record::DeclaredBy {
                        user: caller.user,
                        uid: caller.uid,
                    };
                    tokio::task::spawn_blocking(move || {
                        crate::cli::incident::declare_from_json(&dir, &id, &host, &req, by)
                    })
                    .await
                    .map_err(|e| format!("declare failed: {e}"))?
                }
                "intel_run_now" => {
                    let Some(intel) = &self.intel else {
                        return Err("this agent has no [intel] section in its config".into());
                    };
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    intel
                        .run_now
                        .send(tx)
                        .await
                        .map_err(|_| "the intel task is not running".to_string())?;
                    let q = rx
                        .await
                        .map_err(|_| "the intel task stopped".to_string())??;
                    serde_json::to_value(q).map_err(|e| e.to_string())
                }
                other => Err(control::unknown_command(other, COMMANDS)),
            }
        })
    }
}

/// The relay's handler (an `Arc` inside so the snapshot can move to the blocking pool).
pub struct RelayControl(pub Arc<RelayHandles>);

impl Handler for RelayControl {
    fn handle(&self, req: Value, _caller: control::Caller) -> HandlerFuture<'_> {
        Box::pin(async move {
            match control::cmd_of(&req) {
                "status" => {
                    let h = self.0.clone();
                    let st = tokio::task::spawn_blocking(move || h.snapshot())
                        .await
                        .map_err(|e| format!("status failed: {e}"))?;
                    serde_json::to_value(Status::Relay(st))
                        .map_err(|e| format!("cannot encode the status: {e}"))
                }
                other => Err(control::unknown_command(other, COMMANDS)),
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Human rendering
// ---------------------------------------------------------------------------------------

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `200s` → `3m 20s`; two units at most.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (d_, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d_ > 0 {
        format!("{d_}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

/// `3m ago`, relative to the snapshot time; `-` for none.
fn ago(now: SystemTime, t: Option<SystemTime>) -> String {
    match t {
        None => "-".into(),
        Some(t) => match now.duration_since(t) {
            Ok(d) => format!("{} ago", human_duration(d)),
            Err(_) => "just now".into(),
        },
    }
}

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Left-aligned text columns, numbers right-aligned, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>], numeric: &[bool]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let right = numeric.get(i).copied().unwrap_or(false);
            let cell = if right {
                format!("{c:>w$}")
            } else {
                format!("{c:<w$}")
            };
            out.push_str(&cell);
            out.push_str("  ");
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn render_link(out: &mut String, now: SystemTime, l: &LinkStatus) {
    out.push_str(&format!("\nUPSTREAM {}\n", l.address));
    let relay = l.relay_id.as_deref().unwrap_or("?");
    if l.connected {
        out.push_str(&format!("  state       connected to relay {relay:?}\n"));
    } else {
        let down = match l.down_since {
            Some(t) => format!(
                "DOWN for {} (since {})",
                ago(now, Some(t)).trim_end_matches(" ago"),
                stamp(t)
            ),
            None => "not connected yet".into(),
        };
        out.push_str(&format!("  state       {down}\n"));
    }
    if let Some(e) = &l.last_error {
        out.push_str(&format!("  last error  {e}\n"));
    }
    out.push_str(&format!(
        "  last ack    {} (up to batch {})\n",
        ago(now, l.last_ack),
        l.acked_seq
    ));
    out.push_str(&format!("  reconnects  {}\n", l.reconnects));
}

/// The agent's status as a table for people.
pub fn render_agent(s: &AgentStatus) -> String {
    let now = s.generated_at;
    let mut out = format!(
        "agent {:?}  (soclink {}, up {})\n\nSOURCES\n",
        s.id,
        s.version,
        human_duration(Duration::from_secs(s.uptime_secs))
    );
    if s.sources.is_empty() {
        out.push_str("  (none configured)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .sources
            .iter()
            .map(|x| {
                let mut other = Vec::new();
                let opt = [
                    ("files", x.files),
                    ("drops", x.drops),
                    ("parse_errors", x.parse_errors),
                    ("gaps", x.gaps),
                    // Only once something vanished: the common case is none.
                    ("vanished", x.vanished.filter(|n| *n > 0)),
                ];
                for (k, v) in opt {
                    if let Some(v) = v {
                        other.push(format!("{k}={v}"));
                    }
                }
                vec![
                    x.name.clone(),
                    x.kind.clone(),
                    x.lines.to_string(),
                    human_bytes(x.bytes),
                    x.errors.to_string(),
                    x.truncated.to_string(),
                    other.join(" "),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "NAME",
                "TYPE",
                "LINES",
                "BYTES",
                "ERRORS",
                "TRUNCATED",
                "OTHER",
            ],
            &rows,
            &[false, false, true, true, true, true, false],
        ));
    }
    render_spool(&mut out, "SPOOL", &s.spool);
    match &s.upstream {
        Some(l) => render_link(&mut out, now, l),
        None => {
            out.push_str("\nUPSTREAM none (no [upstream] configured: logs stay in the spool)\n")
        }
    }
    if let Some(i) = &s.intel {
        render_intel(&mut out, i);
    }
    if !s.recovery.is_clean() {
        let r = &s.recovery;
        out.push_str("\nRECOVERY AT START (damage found, handled, logged)\n");
        out.push_str(&format!(
            "  spool       {} torn byte(s) cut, {} corrupt record(s) skipped\n",
            r.torn_bytes, r.corrupt_records
        ));
        for q in &r.quarantined {
            out.push_str(&format!("  set aside   {q}\n"));
        }
        if let Some(why) = &r.checkpoint_reset {
            out.push_str(&format!("  checkpoints reset: {why}\n"));
        }
    }
    out
}

fn render_intel(out: &mut String, i: &crate::agent::intel::IntelStatus) {
    out.push_str(&format!(
        "\nINTEL (every {})\n",
        human_duration(Duration::from_secs(i.every_secs))
    ));
    out.push_str(&format!(
        "  open        since {}, {} batch{} of records staged\n",
        i.open_period_start,
        i.staged_records,
        if i.staged_records == 1 { "" } else { "es" }
    ));
    out.push_str(&format!("  next due    {}\n", i.next_due));
    out.push_str(&match &i.last_delivered {
        Some(d) => format!(
            "  delivered   {} .. {}{} ({} records), acknowledged {}\n",
            d.period_start,
            d.period_end,
            if d.partial { " partial" } else { "" },
            d.records,
            d.acknowledged_at
        ),
        None => "  delivered   none yet\n".to_string(),
    });
    if let Some(q) = i.queued.first() {
        out.push_str(&format!(
            "  waiting     {} item(s) for the relay, oldest {} .. {}\n",
            i.queued.len(),
            q.period_start,
            q.period_end
        ));
    }
    if let Some(e) = &i.last_error {
        out.push_str(&format!("  error       {e}\n"));
    }
    for q in &i.quarantined {
        out.push_str(&format!("  set aside   {q} (damaged, at start)\n"));
    }
}

fn render_spool(out: &mut String, title: &str, sp: &SpoolStatus) {
    out.push_str(&format!("\n{title}\n"));
    out.push_str(&format!(
        "  depth       {} batch{} not yet acknowledged (durable up to {}, acknowledged up to {})\n",
        sp.depth_batches,
        if sp.depth_batches == 1 { "" } else { "es" },
        sp.durable_seq,
        sp.acked_seq
    ));
    out.push_str(&format!(
        "  size        {} of {}\n",
        human_bytes(sp.bytes),
        human_bytes(sp.max_bytes)
    ));
    out.push_str(&format!(
        "  oldest      {}\n",
        sp.oldest_unacked_age_secs.map_or("-".into(), |a| format!(
            "{} old",
            human_duration(Duration::from_secs(a))
        ))
    ));
    if sp.full {
        out.push_str("  state       FULL: new batches wait until the upstream acknowledges\n");
    }
}

/// The relay's status as a table for people.
pub fn render_relay(s: &RelayStatus) -> String {
    let now = s.generated_at;
    let mut out = format!(
        "relay {:?}  (soclink {}, up {})\n\nCONNECTIONS ({})\n",
        s.id,
        s.version,
        human_duration(Duration::from_secs(s.uptime_secs)),
        s.connections.len()
    );
    if s.connections.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .connections
            .iter()
            .map(|c| {
                vec![
                    c.identity.clone(),
                    c.address.clone(),
                    ago(now, Some(c.since)),
                    ago(now, Some(c.last_seen)),
                    c.batches.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["IDENTITY", "ADDRESS", "CONNECTED", "LAST SEEN", "BATCHES"],
            &rows,
            &[false, false, false, false, true],
        ));
    }
    out.push_str(&format!("\nAGENTS ({})\n", s.agents.len()));
    if s.agents.is_empty() {
        out.push_str("  (none yet)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .agents
            .iter()
            .map(|a| {
                vec![
                    a.identity.clone(),
                    if a.connected { "connected" } else { "-" }.into(),
                    ago(now, a.last_seen),
                    a.streams
                        .iter()
                        .map(|x| format!("{}={}", x.stream, x.stored_seq))
                        .collect::<Vec<_>>()
                        .join(" "),
                    a.stored_bytes.map_or("-".into(), human_bytes),
                    ago(now, a.last_write),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "IDENTITY",
                "STATE",
                "LAST SEEN",
                "STORED SEQ",
                "STORED",
                "LAST WRITE",
            ],
            &rows,
            &[false, false, false, false, true, false],
        ));
    }
    match &s.upstream {
        Some(l) => render_link(&mut out, now, l),
        None => out.push_str("\nUPSTREAM none (this relay stores what it receives)\n"),
    }
    if let Some(sp) = &s.spool {
        render_spool(&mut out, "FORWARDING SPOOL", sp);
    }
    if !s.recovery.is_clean() {
        render_relay_recovery(&mut out, &s.recovery);
    }
    out
}

fn render_relay_recovery(out: &mut String, r: &RelayRecoveryStatus) {
    out.push_str("\nRECOVERY (damage found, handled, logged)\n");
    if r.cut_bytes > 0 {
        out.push_str(&format!(
            "  store       {} byte(s) of unacknowledged batches cut at start\n",
            r.cut_bytes
        ));
    }
    for f in &r.damaged_files {
        out.push_str(&format!(
            "  damaged     {f} (missing or shorter than stored)\n"
        ));
    }
    for q in &r.quarantined {
        out.push_str(&format!("  set aside   {q}\n"));
    }
    for d in &r.dedupe_resets {
        out.push_str(&format!(
            "  DEDUPE RESET {:?} at {}: {}\n    state moved to {}; {}\n",
            d.agent,
            humantime::format_rfc3339_seconds(d.at),
            d.reason,
            d.quarantined,
            if d.duplicates_possible {
                "DUPLICATES POSSIBLE for the batches in flight at the reset"
            } else {
                "window passed: exactly once again"
            }
        ));
        if d.streams.is_empty() {
            out.push_str(&format!(
                "    no batch stored since: the first {} per stream may repeat stored ones\n",
                crate::ship::WINDOW_BATCHES
            ));
        }
        for x in &d.streams {
            out.push_str(&format!(
                "    stream {:?}: #{}..#{} may be duplicates (stored up to #{})\n",
                x.stream, x.from, x.through, x.stored_seq
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The CLI
// ---------------------------------------------------------------------------------------

/// The control socket a config file names: its `control_socket`, else the default of
/// its kind (guessed from its keys, as `check-config` does). Only that key is read, so
/// `status` works for users who cannot read the certificates the config names.
pub fn socket_from_config(path: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let t: toml::Table = text
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    if let Some(v) = t.get("control_socket") {
        return v
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| format!("{}: control_socket must be a string", path.display()));
    }
    let relay = !t.contains_key("source")
        && (t.contains_key("store_dir") || t.contains_key("listen") || t.contains_key("ca"));
    Ok(PathBuf::from(if relay {
        crate::config::DEFAULT_RELAY_CONTROL_SOCKET
    } else {
        crate::config::DEFAULT_CONTROL_SOCKET
    }))
}

/// Ask the process behind `socket` for its status and render it.
pub async fn fetch(socket: &Path, json: bool) -> Result<String, ControlError> {
    let data = control::request(socket, &serde_json::json!({"cmd": "status"})).await?;
    if json {
        // Re-encoded from the typed struct when it parses, so the field order is stable.
        let v = serde_json::from_value::<Status>(data.clone())
            .ok()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(data);
        return serde_json::to_string_pretty(&v).map_err(|e| ControlError::Protocol(e.to_string()));
    }
    match serde_json::from_value::<Status>(data) {
        Ok(Status::Agent(a)) => Ok(render_agent(&a)),
        Ok(Status::Relay(r)) => Ok(render_relay(&r)),
        Err(e) => Err(ControlError::Protocol(format!(
            "unexpected status format (a different soclink version?): {e}; try --json"
        ))),
    }
}

/// `soclink status`: print the table or JSON; exit 1 with a clear message when the
/// process is not running or cannot be asked, 2 when the config cannot be read.
pub fn cli(socket: Option<PathBuf>, config: Option<PathBuf>, json: bool) -> ExitCode {
    let socket = match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => match socket_from_config(&c) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("soclink: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => PathBuf::from(crate::config::DEFAULT_CONTROL_SOCKET),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soclink: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fetch(&socket, json)) {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("soclink: {e}");
            ExitCode::from(1)
        }
    }
}

/// `SystemTime` as an RFC 3339 UTC string with milliseconds.
mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

mod rfc3339_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => humantime::parse_rfc3339(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_duration(Duration::from_secs(59)), "59s");
        assert_eq!(human_duration(Duration::from_secs(200)), "3m 20s");
        assert_eq!(human_duration(Duration::from_secs(7320)), "2h 2m");
        assert_eq!(human_duration(Duration::from_secs(90_000)), "1d 1h");
    }

    #[test]
    fn agent_table_and_json_round_trip() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let st = AgentStatus {
            id: "web-01".into(),
            version: "0.1.0".into(),
            generated_at: now,
            uptime_secs: 200,
            sources: vec![SourceStatus {
                name: "app".into(),
                kind: "file".into(),
                lines: 1000,
                bytes: 88_000,
                errors: 0,
                truncated: 2,
                drops: None,
                files: Some(1),
                parse_errors: None,
                gaps: None,
                vanished: None,
            }],
            spool: SpoolStatus {
                depth_batches: 3,
                bytes: 4096,
                max_bytes: 1 << 30,
                acked_seq: 9,
                durable_seq: 12,
                oldest_unacked_age_secs: Some(65),
                full: false,
            },
            upstream: Some(LinkStatus {
                address: "relay:6514".into(),
                connected: false,
                relay_id: Some("r1".into()),
                down_since: Some(now - Duration::from_secs(180)),
                last_error: Some("connection refused".into()),
                last_ack: None,
                acked_seq: 9,
                reconnects: 4,
            }),
            intel: None,
            recovery: Default::default(),
        };
        let text = render_agent(&st);
        assert!(
            text.contains("agent \"web-01\"  (soclink 0.1.0, up 3m 20s)"),
            "{text}"
        );
        assert!(
            text.contains("  NAME  TYPE  LINES     BYTES  ERRORS  TRUNCATED  OTHER\n"),
            "{text}"
        );
        assert!(
            text.contains("  app   file   1000  85.9 KiB       0          2  files=1\n"),
            "{text}"
        );
        assert!(
            text.contains("DOWN for 3m 0s (since 2023-11-14T22:10:20Z)"),
            "{text}"
        );
        assert!(
            text.contains("  last error  connection refused\n"),
            "{text}"
        );
        assert!(text.contains("  oldest      1m 5s old\n"), "{text}");
        let v = serde_json::to_value(Status::Agent(st.clone())).unwrap();
        assert_eq!(v["role"], "agent");
        assert_eq!(v["generated_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["upstream"]["last_ack"], Value::Null);
        assert_eq!(v["sources"][0]["type"], "file");
        let back: Status = serde_json::from_value(v).unwrap();
        let Status::Agent(back) = back else {
            panic!("role changed")
        };
        assert_eq!(back.upstream, st.upstream);
        assert_eq!(back.sources, st.sources);
    }
}
