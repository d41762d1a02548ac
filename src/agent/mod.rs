//! The agent: wires sources → compression → spool (→ shipper) and owns shutdown.
//!
//! ```text
//! source threads --SealedBatch--> compressor --(ordered handles)--> spool writer
//!                                 (blocking pool, both cores)        append, fsync,
//!                                                                    cursor → checkpoints
//! ```
//!
//! Ordering and durability: batches are compressed in parallel but appended in the
//! order they were sealed; a source's position advances (in memory, then in the
//! checkpoint file) only after the batch holding its lines was fsynced into the spool.
//! The checkpoint file may lag: the spool keeps every record the file does not yet
//! reflect and [`Agent::open`] replays their cursors.

pub mod incident;
pub mod intel;
pub mod reload;
pub mod sources;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::incident::bundle::BundleInputs;
use crate::agent::incident::outbox::{Outbox, PRIORITY_STREAM};
use crate::agent::sources::SealedBatch;
use crate::agent::sources::checkpoint::{Checkpoints, FilePos};
use crate::agent::sources::file::{BatchLimits, FileSource, SourceStats};
use crate::agent::sources::journald::JournaldSource;
use crate::agent::sources::syslog::{self, SyslogLimits, SyslogListen, SyslogSource};
use crate::batch::BatchMeta;
use crate::config::{AgentConfig, SourceKind, SyslogSourceConfig};
use crate::ops::status::{AgentHandles, SourceCounters};
use crate::ship::{Lane, Shipper};
use crate::spool::{Spool, SpoolOptions};
use crate::tls::ReloadableClientConfig;

/// The stream name of an agent's routine log spool on the wire.
pub const LOG_STREAM: &str = "logs";

/// How often the checkpoint file is rewritten while batches flow.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Most batches appended before one fsync (group commit).
const GROUP_MAX: usize = 32;

/// How often appending is retried while the spool's disk is full.
const NO_SPACE_RETRY: Duration = Duration::from_secs(1);

/// What appending one group of batches did.
enum Appended {
    /// `done` is durable (with seqs); `rest` did not fit under `max_size` (spool full).
    Committed {
        done: Vec<(u64, BatchMeta)>,
        rest: Vec<Compressed>,
    },
    /// The disk is full: the spool discarded everything of the group; here it is back.
    NoSpace { group: Vec<Compressed>, why: String },
}

/// A batch after compression, waiting to be appended.
struct Compressed {
    meta: BatchMeta,
    gzip: Vec<u8>,
}

/// How crate::agent::reload runs a generation.
pub struct Supervisor {
    /// Receives the handles a reload needs, once the generation runs.
    pub started: tokio::sync::oneshot::Sender<Started>,
    /// The process's shutdown (the generation's token is its child).
    pub process: CancellationToken,
}

/// What a running generation hands to crate::agent::reload.
pub struct Started {
    /// The upstream certificates, reloadable in place (None without `[upstream]`).
    pub tls: Option<Arc<ReloadableClientConfig>>,
}

/// Live figures shared with status reporting.
#[derive(Default)]
pub struct AgentStats {
    pub sources: Vec<(String, Arc<SourceStats>)>,
}

/// The agent's on-disk state, opened and recovered.
pub struct Agent {
    cfg: AgentConfig,
    spool: Spool,
    /// Incident records, reports and evidence bundles: shipped before routine logs.
    priority: Spool,
    checkpoints: Checkpoints,
    recovery: crate::ops::status::RecoveryStatus,
    _lock: File,
}

/// Compress NDJSON into one gzip member (no name, zero mtime: same bytes every time).
pub fn compress(raw: &[u8], level: u32) -> Vec<u8> {
    crate::pool::gzip_into(raw, level, Vec::with_capacity(raw.len() / 4 + 64))
}

/// Take the state directory's lock so two agents never share a spool.
pub fn lock_state_dir(state_dir: &Path) -> Result<File> {
    crate::util::create_dir_all_durable(state_dir)
        .with_context(|| format!("cannot create state_dir {}", state_dir.display()))?;
    let path = state_dir.join("lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another soclink process is using state_dir {} (lock {} is held)",
            state_dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

impl Agent {
    /// Lock the state directory, recover the spool and rebuild source positions.
    pub fn open(cfg: AgentConfig) -> Result<Agent> {
        let lock = lock_state_dir(&cfg.state_dir)?;
        let spool_dir = cfg.state_dir.join("spool");
        let (spool, recovery) = Spool::open(
            &spool_dir,
            SpoolOptions {
                max_size: cfg.spool.max_size,
                // Segments must outlive the checkpoint file's view of them (replay).
                gate_on_checkpoint: true,
                ..SpoolOptions::default()
            },
        )
        .with_context(|| format!("cannot open the spool in {}", spool_dir.display()))?;
        for m in &recovery.messages {
            tracing::warn!("spool recovery: {m}");
        }
        let pdir = cfg.state_dir.join("priority");
        let (priority, precovery) = Spool::open(
            &pdir,
            SpoolOptions {
                // A whole bundle must fit, with room for records around it.
                max_size: cfg.incident.max_bundle_size.saturating_mul(2) + (256 << 20),
                ..SpoolOptions::default()
            },
        )
        .with_context(|| format!("cannot open the priority spool in {}", pdir.display()))?;
        for m in &precovery.messages {
            tracing::warn!("priority spool recovery: {m}");
        }
        let mut report = crate::ops::status::RecoveryStatus::default();
        for r in [&recovery, &precovery] {
            report.torn_bytes += r.truncated_bytes;
            report.corrupt_records += r.corrupt_records;
            report.quarantined.extend(r.quarantined.iter().map(|p| {
                p.strip_prefix(&cfg.state_dir)
                    .unwrap_or(p)
                    .display()
                    .to_string()
            }));
        }
        let ck_path = Checkpoints::path(&cfg.state_dir);
        let (mut checkpoints, reset) =
            Checkpoints::load_or_quarantine(&crate::fs::RealFs, &ck_path);
        if let Some((e, aside)) = reset {
            report.checkpoint_reset = Some(e.to_string());
            let shown = aside
                .as_deref()
                .map_or("(could not be moved aside)".into(), |a| {
                    a.strip_prefix(&cfg.state_dir)
                        .unwrap_or(a)
                        .display()
                        .to_string()
                });
            report.quarantined.push(shown.clone());
            tracing::error!(
                "{e}; moved it to {shown} and starting without checkpoints (files are read again per start_at; the relay drops nothing it already has only if sequences match, so expect duplicates of recent lines)"
            );
        }
        for aside in
            crate::agent::incident::outbox::quarantine_damaged(&crate::fs::RealFs, &cfg.state_dir)
        {
            report.quarantined.push(
                aside
                    .strip_prefix(&cfg.state_dir)
                    .unwrap_or(&aside)
                    .display()
                    .to_string(),
            );
        }
        let replayed = checkpoints.replay(&spool)?;
        if replayed > 0 {
            tracing::info!(
                "replayed the positions of {replayed} spooled batches newer than the checkpoint file"
            );
        }
        Ok(Agent {
            cfg,
            spool,
            priority,
            checkpoints,
            recovery: report,
            _lock: lock,
        })
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Run sources and the pipeline until `shutdown`; then stop sources, spool what
    /// they hold, write checkpoints and return. SIGHUP reloads the upstream certificates.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        self.run_generation(shutdown, None).await
    }

    /// [`Agent::run`] as one generation of `soclink agent` under `supervisor` (see
    /// crate::agent::reload), which owns SIGHUP: no handler is installed here, and the
    /// supervisor receives the handles a reload needs once everything is bound and
    /// running. An error before that means nothing was started (no source, no shipper,
    /// no listener is left behind).
    pub async fn run_generation(
        self,
        shutdown: CancellationToken,
        supervisor: Option<Supervisor>,
    ) -> Result<()> {
        let (on_started, process) = match supervisor {
            Some(s) => (Some(s.started), Some(s.process)),
            None => (None, None),
        };
        let Agent {
            cfg,
            spool,
            priority,
            checkpoints,
            recovery,
            _lock,
        } = self;
        let started = Instant::now(); // control: uptime
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        // Each waiting batch is up to batch_max_bytes of memory; one per core keeps the
        // compressors fed (more only raised the peak RSS, not the throughput).
        let (tx, rx) = mpsc::channel::<SealedBatch>(cpus);
        let stop_sources = CancellationToken::new();
        // An early return (a failed start) must not leave source threads running.
        let _stop_sources_on_return = stop_sources.clone().drop_guard();
        let mut threads = Vec::new();
        let mut stats = AgentStats::default();
        let mut ctl_sources = Vec::new(); // control: live counters for `soclink status`
        let mut tasks = Vec::new();
        let mut counters = Vec::new(); // service: events read, for STATUS=
        let limits = BatchLimits {
            max_bytes: cfg.spool.batch_max_bytes,
            max_delay: cfg.spool.batch_max_delay,
        };
        // Bind and load whatever can fail before any source starts, so a start (or a
        // reload) that fails leaves nothing running: syslog listeners, the upstream
        // certificates, the metrics port.
        let mut syslog_bound = HashMap::new();
        for s in &cfg.sources {
            if let SourceKind::Syslog(scfg) = &s.kind {
                let src = syslog_source(&s.name, &cfg.host, scfg, limits, tx.clone())
                    .await
                    .with_context(|| format!("source {:?}", s.name))?;
                syslog_bound.insert(s.name.clone(), src);
            }
        }
        let shipper = match &cfg.upstream {
            Some(up) => Some(Shipper::with_lanes(
                up.clone(),
                vec![
                    Lane {
                        stream: PRIORITY_STREAM.to_string(),
                        spool: priority.clone(),
                    },
                    Lane {
                        stream: LOG_STREAM.to_string(),
                        spool: spool.clone(),
                    },
                ],
            )?),
            None => None,
        };
        let metrics_listener = match cfg.metrics.listen {
            Some(addr) => Some(crate::ops::metrics::bind(addr).await?), // metrics
            None => None,
        };
        for s in &cfg.sources {
            let name = s.name.clone();
            match &s.kind {
                SourceKind::File(fcfg) => {
                    let positions: Vec<FilePos> = checkpoints
                        .sources
                        .get(&s.name)
                        .map(|m| m.values().cloned().collect())
                        .unwrap_or_default();
                    let st = Arc::new(SourceStats::default());
                    stats.sources.push((s.name.clone(), st.clone()));
                    ctl_sources.push((name.clone(), SourceCounters::File(st.clone()))); // control
                    counters.push(crate::ops::service::SourceCounter::File(st.clone()));
                    let src = FileSource::new(
                        s.name.clone(),
                        cfg.host.clone(),
                        fcfg.clone(),
                        limits,
                        positions,
                        tx.clone(),
                        stop_sources.clone(),
                        st,
                    );
                    threads.push(
                        std::thread::Builder::new()
                            .name(format!("file-{name}"))
                            .spawn(move || src.run())
                            .context("cannot start a source thread")?,
                    );
                }
                SourceKind::Journald(jcfg) => {
                    let jst = Arc::default(); // control, service
                    ctl_sources.push((name.clone(), SourceCounters::Journald(Arc::clone(&jst))));
                    counters.push(crate::ops::service::SourceCounter::Journald(Arc::clone(
                        &jst,
                    )));
                    let cursor = checkpoints
                        .cursors
                        .get(&s.name)
                        .and_then(|c| c.as_str())
                        .map(str::to_string);
                    let src = JournaldSource::new(
                        s.name.clone(),
                        cfg.host.clone(),
                        jcfg.clone(),
                        limits,
                        cursor,
                        tx.clone(),
                        stop_sources.clone(),
                        jst.clone(), // control: keep a handle for status
                    );
                    threads.push(
                        std::thread::Builder::new()
                            .name(format!("journal-{name}"))
                            .spawn(move || src.run())
                            .context("cannot start a source thread")?,
                    );
                }
                SourceKind::Syslog(_) => {
                    // Bound above, for every syslog source.
                    let Some(src) = syslog_bound.remove(&s.name) else {
                        continue;
                    };
                    ctl_sources.push((name.clone(), SourceCounters::Syslog(src.stats.clone()))); // control
                    counters.push(crate::ops::service::SourceCounter::Syslog(
                        src.stats.clone(),
                    ));
                    tasks.push(tokio::spawn(src.run(stop_sources.clone())));
                }
            }
        }
        drop(tx);
        let (htx, hrx) = mpsc::channel::<JoinHandle<Compressed>>(cpus + 1);
        let level = cfg.spool.compression_level;
        let compressor = tokio::spawn(compress_stage(rx, htx, level, cpus));
        let heartbeat = crate::ops::service::Heartbeat::new(); // service: watchdog
        let writer = tokio::spawn(write_stage(
            hrx,
            spool.clone(),
            checkpoints,
            Checkpoints::path(&cfg.state_dir),
            shutdown.clone(),
            heartbeat.clone(),
        ));
        let ship_stop = CancellationToken::new();
        let _ship_stop_on_return = ship_stop.clone().drop_guard();
        let mut ctl_link = None; // control
        let mut upstream_status = None;
        let mut tls = None;
        let shipper = match shipper {
            Some(shipper) => {
                ctl_link = Some(shipper.status()); // control
                upstream_status = Some(shipper.status()); // service: STATUS=
                tls = Some(shipper.tls());
                let st = ship_stop.clone();
                Some(tokio::spawn(async move { shipper.run(st).await }))
            }
            None => None,
        };
        if on_started.is_none() {
            // service: registered before READY=1, so an early SIGHUP cannot kill the agent.
            match &tls {
                Some(tls) => spawn_reload_on_hup(tls.clone(), shutdown.clone()),
                None => crate::ops::service::spawn_idle_reload(shutdown.clone()),
            }
        }
        let outbox = Outbox {
            sent: Default::default(),
            state_dir: cfg.state_dir.clone(),
            spool: priority.clone(),
            settings: cfg.incident.clone(),
            inputs: BundleInputs::from_config(&cfg),
            ship: cfg.upstream.is_some(),
            fs: Arc::new(crate::fs::RealFs),
        };
        let outbox_task = tokio::spawn(outbox.run(ship_stop.clone()));
        // control: `soclink status` (see crate::ops::status).
        let ctl_up = cfg
            .upstream
            .as_ref()
            .map(|u| u.address.clone())
            .zip(ctl_link);
        let mut ctl = AgentHandles::new(&cfg, ctl_sources, spool.clone(), ctl_up, started);
        ctl.recovery = Arc::new(recovery);
        // intel: the periodic upload task and its include-file tailer (see crate::intel).
        let intel_task = match &cfg.intel {
            Some(settings) => {
                let (itx, irx) = mpsc::channel::<SealedBatch>(2);
                let (ntx, nrx) = mpsc::channel(4);
                let (settings, cfg2, prio, handles) =
                    (settings.clone(), cfg.clone(), priority.clone(), ctl.clone());
                let collector = tokio::task::spawn_blocking(move || {
                    crate::agent::intel::Collector::open(
                        &settings,
                        &cfg2.id,
                        &cfg2.host,
                        &cfg2.state_dir,
                        prio,
                        handles,
                    )
                    .map(|c| (c, settings))
                })
                .await??;
                let (collector, settings) = collector;
                ctl.intel = Some(crate::agent::intel::IntelHandle {
                    status: collector.status(),
                    run_now: ntx,
                });
                let src = FileSource::new(
                    crate::intel::SOURCE.to_string(),
                    cfg.host.clone(),
                    collector.files(&settings),
                    limits,
                    collector.positions(),
                    itx,
                    stop_sources.clone(),
                    Arc::default(),
                );
                threads.push(
                    std::thread::Builder::new()
                        .name("intel-files".into())
                        .spawn(move || src.run())
                        .context("cannot start the intel file thread")?,
                );
                Some(tokio::spawn(crate::agent::intel::run(
                    collector,
                    irx,
                    nrx,
                    ship_stop.clone(),
                )))
            }
            None => None,
        };
        // metrics: Prometheus endpoint over the same handles (see crate::ops::metrics).
        let metrics_task = metrics_listener.map(|l| {
            let figures = crate::ops::metrics::Figures::Agent(ctl.clone()); // metrics
            tokio::spawn(crate::ops::metrics::run(l, figures, shutdown.clone())) // metrics
        });
        let control_task = crate::ops::control::spawn(
            cfg.control_socket.clone(),
            crate::ops::control::Access {
                operator_group: cfg.operator_group.clone(),
            },
            Arc::new(ctl),
            shutdown.clone(),
        );
        tracing::info!(
            "agent {:?} started: {} source(s), state in {}",
            cfg.id,
            cfg.sources.len(),
            cfg.state_dir.display()
        );
        // service: READY=1 (the upstream link may still be connecting), STATUS=, watchdog.
        let figures = crate::ops::service::AgentFigures {
            sources: counters,
            spool: spool.clone(),
            upstream: upstream_status,
        };
        crate::ops::service::agent_started(figures, heartbeat, shutdown.clone());
        if let Some(on_started) = on_started {
            let _ = on_started.send(Started { tls });
        }
        let mut writer = writer;
        let failed = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = &mut writer => Some(r),
        };
        if let Some(r) = failed {
            // The pipeline cannot continue (e.g. the spool's disk failed): stop everything
            // so the service manager restarts us and recovery runs. Positions never moved
            // past what is durable, so nothing is lost.
            stop_sources.cancel();
            ship_stop.cancel();
            let err = match r {
                Ok(Ok(())) => anyhow::anyhow!("the spool writer stopped unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => e.into(),
            };
            tracing::error!("pipeline failed: {err:#}");
            return Err(err.context("the agent's pipeline failed"));
        }
        // service: STOPPING=1, unless this generation ends for a reload (systemd would
        // take STOPPING=1 for the service stopping).
        if process.as_ref().is_none_or(|p| p.is_cancelled()) {
            crate::ops::service::stopping();
        }
        tracing::info!("stopping: sealing and spooling what the sources hold");
        stop_sources.cancel();
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await?;
        for t in tasks {
            let _ = t.await;
        }
        compressor.await?;
        writer.await??;
        // Give the link a moment to get the last batches acknowledged; anything still
        // unacknowledged stays in the spool for the next start.
        ship_stop.cancel();
        let _ = outbox_task.await;
        if let Some(t) = intel_task {
            let _ = t.await;
        }
        if let Some(s) = shipper {
            s.await??;
        }
        // The next generation (a reload) binds the same socket path and port.
        let _ = control_task.await;
        if let Some(m) = metrics_task {
            let _ = m.await;
        }
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

async fn compress_stage(
    mut rx: mpsc::Receiver<SealedBatch>,
    out: mpsc::Sender<JoinHandle<Compressed>>,
    level: u32,
    cpus: usize,
) {
    // At most one compression per core: more cannot go faster, and each one holds a
    // batch, its output, a deflate state and a blocking thread, which a backlog would
    // otherwise multiply.
    let cores = Arc::new(tokio::sync::Semaphore::new(cpus.max(1)));
    while let Some(b) = rx.recv().await {
        let Ok(core) = cores.clone().acquire_owned().await else {
            break;
        };
        let h = tokio::task::spawn_blocking(move || {
            let _core = core;
            let out = crate::pool::GZIP.take(crate::pool::gzip_bound(b.raw.len()));
            let gzip = crate::pool::gzip_into(&b.raw, level, out);
            let raw_bytes = b.raw.len() as u64;
            crate::pool::BATCHES.give(b.raw);
            Compressed {
                meta: BatchMeta {
                    source: b.source,
                    day: b.day,
                    events: b.events,
                    raw_bytes,
                    origin: None,
                    item: None,
                    cursor: b.cursor,
                },
                gzip,
            }
        });
        if out.send(h).await.is_err() {
            break;
        }
    }
}

async fn write_stage(
    mut rx: mpsc::Receiver<JoinHandle<Compressed>>,
    spool: Spool,
    mut checkpoints: Checkpoints,
    ck_path: PathBuf,
    shutdown: CancellationToken,
    heartbeat: crate::ops::service::Heartbeat,
) -> Result<()> {
    let mut last_store = Instant::now();
    let mut dirty = false;
    let mut full_logged = false;
    // A spool hovering at its limit fills and drains every few batches: say so once a
    // minute, not at each turn.
    let warn = crate::util::LogLimiter::default();
    let mut no_space_logged = false;
    let mut acked = spool.watch_acked();
    loop {
        // service: beat for the watchdog at least every second, also when idle.
        heartbeat.beat();
        crate::pool::trim_idle();
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = tokio::time::sleep(crate::ops::service::HEARTBEAT_EVERY) => continue,
        };
        let Some(first) = first else {
            break;
        };
        let mut group = vec![first.await?];
        while group.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(h) => group.push(h.await?),
                Err(_) => break,
            }
        }
        while !group.is_empty() {
            // A full spool pauses everything upstream of here: the channel fills and
            // the source threads block. Nothing is lost: their files are their buffer.
            while spool.is_full() {
                // Acknowledged segments are deleted only once the checkpoint file covers
                // them: write it now, or a full spool would wait for itself.
                if dirty {
                    dirty = !store_checkpoints(&spool, &checkpoints, &ck_path).await?;
                    last_store = Instant::now();
                }
                if !full_logged {
                    if let Some(repeated) = warn.check("full") {
                        tracing::warn!(
                            "spool is full ({} bytes): sources are paused until the upstream acknowledges batches{repeated}",
                            spool.stats().bytes
                        );
                    }
                    full_logged = true;
                }
                heartbeat.beat(); // service: a full spool is waiting, not stuck
                tokio::select! {
                    r = acked.changed() => { if r.is_err() { break; } }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => {
                        // Unspooled batches are dropped: their positions never advanced,
                        // so the sources read those lines again after the restart.
                        let _ = store_checkpoints(&spool, &checkpoints, &ck_path).await?;
                        return Ok(());
                    }
                }
            }
            if full_logged {
                if let Some(repeated) = warn.check("room") {
                    tracing::info!("spool has room again: sources resume{repeated}");
                }
                full_logged = false;
            }
            let sp = spool.clone();
            match tokio::task::spawn_blocking(move || append_group(&sp, group)).await?? {
                Appended::Committed { done, rest } => {
                    if no_space_logged {
                        tracing::info!("the spool's disk has room again: sources resume");
                        no_space_logged = false;
                    }
                    dirty |= !done.is_empty();
                    apply_done(&mut checkpoints, done);
                    group = rest;
                }
                Appended::NoSpace { group: back, why } => {
                    // Like a full spool: sources wait (their files are their buffer) and
                    // nothing moves past what is durable. Freed space is noticed within
                    // a second; acks may free it too, so only the first time is logged.
                    if !no_space_logged {
                        tracing::error!(
                            "{why}: the pipeline is paused, sources wait; retrying every {}s until there is room",
                            NO_SPACE_RETRY.as_secs()
                        );
                        no_space_logged = true;
                    }
                    group = back;
                    heartbeat.beat(); // service: waiting for space, not stuck
                    tokio::select! {
                        _ = tokio::time::sleep(NO_SPACE_RETRY) => {}
                        _ = shutdown.cancelled() => {
                            // As for a full spool: unspooled batches are read again.
                            let _ = store_checkpoints(&spool, &checkpoints, &ck_path).await?;
                            return Ok(());
                        }
                    }
                }
            }
        }
        if dirty && last_store.elapsed() >= CHECKPOINT_EVERY {
            dirty = !store_checkpoints(&spool, &checkpoints, &ck_path).await?;
            last_store = Instant::now();
        }
    }
    let _ = store_checkpoints(&spool, &checkpoints, &ck_path).await?;
    Ok(())
}

/// Append a group and commit it. A full disk hands the whole group back (the spool
/// discarded whatever of it was appended); any other spool error is fatal.
fn append_group(sp: &Spool, group: Vec<Compressed>) -> Result<Appended> {
    use crate::spool::SpoolError;
    let mut done = Vec::with_capacity(group.len());
    let mut full_at = None;
    for (i, c) in group.iter().enumerate() {
        let meta = serde_json::to_vec(&c.meta)?;
        match sp.append(&meta, &c.gzip) {
            Ok(seq) => done.push((seq, c.meta.clone())),
            Err(SpoolError::Full { .. }) => {
                full_at = Some(i);
                break;
            }
            Err(e @ SpoolError::NoSpace { .. }) => {
                let why = e.to_string();
                return Ok(Appended::NoSpace { group, why });
            }
            Err(e) => return Err(e.into()),
        }
    }
    match sp.commit() {
        Ok(_) => {}
        Err(e @ SpoolError::NoSpace { .. }) => {
            let why = e.to_string();
            return Ok(Appended::NoSpace { group, why });
        }
        Err(e) => return Err(e.into()),
    }
    // Durable now: the appended batches' buffers go back to the pool for reuse.
    let keep = full_at.unwrap_or(group.len());
    let mut it = group.into_iter();
    for c in it.by_ref().take(keep) {
        crate::pool::GZIP.give(c.gzip);
    }
    let rest = it.collect();
    Ok(Appended::Committed { done, rest })
}

fn apply_done(checkpoints: &mut Checkpoints, done: Vec<(u64, BatchMeta)>) {
    for (seq, meta) in done {
        if let Some(cursor) = &meta.cursor {
            checkpoints.apply(&meta.source, cursor);
        }
        checkpoints.spool_seq = seq;
    }
}

/// Write the checkpoint file, then record it in the spool; false if the disk was full.
/// That is not fatal: the file may lag (the spool keeps what it does not cover, and
/// open replays it).
async fn store_checkpoints(spool: &Spool, ck: &Checkpoints, path: &Path) -> Result<bool> {
    let ck = ck.clone();
    let path = path.to_path_buf();
    let spool = spool.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<()> {
        ck.store(&path)
            .with_context(|| format!("cannot write checkpoints {}", path.display()))?;
        spool.set_checkpointed(ck.spool_seq)?;
        Ok(())
    })
    .await?;
    match r {
        Err(e) if is_disk_full(&e) => {
            tracing::warn!("{e:#}; the checkpoint file lags until there is room");
            Ok(false)
        }
        r => r.map(|()| true),
    }
}

/// ENOSPC or EDQUOT anywhere in the chain.
fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::spool::SpoolError>(),
            Some(crate::spool::SpoolError::NoSpace { .. })
        ) || c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        })
    })
}

/// Positions by source, for status and tests.
pub fn positions(ck: &Checkpoints) -> HashMap<String, Vec<FilePos>> {
    ck.sources
        .iter()
        .map(|(k, v)| (k.clone(), v.values().cloned().collect()))
        .collect()
}

/// SIGHUP: re-read the TLS certificate and key (rotation without a restart). A failed
/// reload keeps the old ones and says why.
fn spawn_reload_on_hup(tls: Arc<ReloadableClientConfig>, shutdown: CancellationToken) {
    // service: register now, before READY=1, so an early SIGHUP cannot kill the agent.
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    crate::ops::service::reloading(); // service: RELOADING=1 .. READY=1
                    match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                        Err(e) => tracing::error!("SIGHUP: keeping the old certificates: {e}"),
                    }
                    crate::ops::service::ready();
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// Bind a syslog source's listeners (so a port in use fails the start, clearly).
/// Where the .deb installs the drop-in that grants CAP_NET_BIND_SERVICE.
pub const LOW_PORT_DROPIN_DOC: &str = "/usr/share/doc/soclink/examples/syslog-low-port.conf";

async fn syslog_source(
    name: &str,
    host: &str,
    c: &SyslogSourceConfig,
    batch: BatchLimits,
    out: mpsc::Sender<SealedBatch>,
) -> Result<SyslogSource> {
    let mut listeners = Vec::new();
    for l in &c.listen {
        let addr = syslog::parse_listen(l).map_err(anyhow::Error::msg)?;
        let tls = match (addr.proto, &c.tls_cert, &c.tls_key) {
            (syslog::Proto::Tls, Some(cert), Some(key)) => Some(
                syslog::tls_server_config(cert, key, c.tls_ca.as_deref())
                    .context("cannot load the syslog TLS certificate")?,
            ),
            _ => None,
        };
        let bound = match SyslogListen::bind(&addr, tls).await {
            Ok(b) => b,
            // The units grant CAP_NET_BIND_SERVICE only through the drop-in that a
            // listener below 1024 needs; say so rather than just "permission denied".
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied && addr.addr.port() < 1024 =>
            {
                return Err(anyhow::anyhow!(
                    "cannot listen on {l}: {e}: a port below 1024 needs CAP_NET_BIND_SERVICE; under systemd install the drop-in: `install -D -m 0644 {LOW_PORT_DROPIN_DOC} /etc/systemd/system/soclink-agent.service.d/syslog-low-port.conf && systemctl daemon-reload && systemctl restart soclink-agent` (docs/OPERATIONS.md), or listen on a port of 1024 or more"
                ));
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot listen on {l}"))),
        };
        if let Ok(a) = bound.local_addr() {
            tracing::info!(source = name, "syslog listening on {l} ({a})");
        }
        listeners.push(bound);
    }
    Ok(SyslogSource {
        name: name.to_string(),
        host: host.to_string(),
        listeners,
        limits: SyslogLimits {
            max_message_bytes: c.max_message_bytes as usize,
            max_connections: c.max_connections,
            idle_timeout: c.idle_timeout,
            ..SyslogLimits::default()
        },
        batch,
        out,
        stats: Arc::default(),
        timezone: syslog_zone(name, c),
    })
}

/// The zone of a syslog source's device timestamps: `timezone`, else the host's. A host
/// whose zone cannot be found reads them as UTC, and says so, since Taiwanese devices
/// send UTC+8 and every such event would be 8 hours off.
fn syslog_zone(name: &str, c: &SyslogSourceConfig) -> jiff::tz::TimeZone {
    if let Some(tz) = &c.timezone {
        tracing::info!(
            source = name,
            "syslog: device times without a zone are read in {}",
            tz.iana_name().unwrap_or("the configured zone")
        );
        return tz.clone();
    }
    match jiff::tz::TimeZone::try_system() {
        Ok(tz) => {
            tracing::info!(
                source = name,
                "syslog: device times without a zone are read in the host's zone ({})",
                tz.iana_name().unwrap_or("from /etc/localtime")
            );
            tz
        }
        Err(e) => {
            tracing::warn!(
                source = name,
                "syslog: the host's time zone cannot be determined ({e}); device times without a zone are read as UTC: set `timezone` in the source (e.g. \"Asia/Taipei\")"
            );
            jiff::tz::TimeZone::UTC
        }
    }
}
