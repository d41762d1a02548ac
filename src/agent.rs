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

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::batch::BatchMeta;
use crate::config::{AgentConfig, SourceKind, SyslogSourceConfig};
use crate::incident::bundle::BundleInputs;
use crate::incident::outbox::{Outbox, PRIORITY_STREAM};
use crate::ship::{Lane, Shipper};
use crate::sources::SealedBatch;
use crate::sources::checkpoint::{Checkpoints, FilePos};
use crate::sources::file::{BatchLimits, FileSource, SourceStats};
use crate::sources::journald::JournaldSource;
use crate::sources::syslog::{self, SyslogLimits, SyslogListen, SyslogSource};
use crate::spool::{Spool, SpoolOptions};
use crate::status::{AgentHandles, SourceCounters};
use crate::tls::ReloadableClientConfig;

/// The stream name of an agent's routine log spool on the wire.
pub const LOG_STREAM: &str = "logs";

/// How often the checkpoint file is rewritten while batches flow.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Most batches appended before one fsync (group commit).
const GROUP_MAX: usize = 32;

/// Batches appended (with their seqs), and the ones left over when the spool filled up.
type Appended = (Vec<(u64, BatchMeta)>, Vec<Compressed>);

/// A batch after compression, waiting to be appended.
struct Compressed {
    meta: BatchMeta,
    gzip: Vec<u8>,
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
        let ck_path = Checkpoints::path(&cfg.state_dir);
        let mut checkpoints = match Checkpoints::load(&ck_path) {
            Ok(c) => c,
            Err(e) => {
                let aside = ck_path.with_extension("json.corrupt");
                let _ = std::fs::rename(&ck_path, &aside);
                tracing::error!(
                    "{e}; moved it to {} and starting without checkpoints (files are read again per start_at; the relay drops nothing it already has only if sequences match, so expect duplicates of recent lines)",
                    aside.display()
                );
                Checkpoints::default()
            }
        };
        let mut replayed = 0;
        for rec in spool.records_from(checkpoints.spool_seq + 1) {
            let rec = rec?;
            if let Ok(meta) = serde_json::from_slice::<BatchMeta>(&rec.meta)
                && let Some(cursor) = &meta.cursor
            {
                checkpoints.apply(&meta.source, cursor);
            }
            checkpoints.spool_seq = rec.seq;
            replayed += 1;
        }
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
            _lock: lock,
        })
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Run sources and the pipeline until `shutdown`; then stop sources, spool what
    /// they hold, write checkpoints and return.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Agent {
            cfg,
            spool,
            priority,
            checkpoints,
            _lock,
        } = self;
        let started = Instant::now(); // control: uptime
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        // Each waiting batch is up to batch_max_bytes of memory; one per core keeps the
        // compressors fed (more only raised the peak RSS, not the throughput).
        let (tx, rx) = mpsc::channel::<SealedBatch>(cpus);
        let stop_sources = CancellationToken::new();
        let mut threads = Vec::new();
        let mut stats = AgentStats::default();
        let mut ctl_sources = Vec::new(); // control: live counters for `soclink status`
        let mut tasks = Vec::new();
        let mut counters = Vec::new(); // service: events read, for STATUS=
        let limits = BatchLimits {
            max_bytes: cfg.spool.batch_max_bytes,
            max_delay: cfg.spool.batch_max_delay,
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
                    counters.push(crate::service::SourceCounter::File(st.clone()));
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
                    counters.push(crate::service::SourceCounter::Journald(Arc::clone(&jst)));
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
                SourceKind::Syslog(scfg) => {
                    let src = syslog_source(&s.name, &cfg.host, scfg, limits, tx.clone())
                        .await
                        .with_context(|| format!("source {:?}", s.name))?;
                    ctl_sources.push((name.clone(), SourceCounters::Syslog(src.stats.clone()))); // control
                    counters.push(crate::service::SourceCounter::Syslog(src.stats.clone()));
                    tasks.push(tokio::spawn(src.run(stop_sources.clone())));
                }
            }
        }
        drop(tx);
        let (htx, hrx) = mpsc::channel::<JoinHandle<Compressed>>(cpus + 1);
        let level = cfg.spool.compression_level;
        let compressor = tokio::spawn(compress_stage(rx, htx, level));
        let heartbeat = crate::service::Heartbeat::new(); // service: watchdog
        let writer = tokio::spawn(write_stage(
            hrx,
            spool.clone(),
            checkpoints,
            Checkpoints::path(&cfg.state_dir),
            shutdown.clone(),
            heartbeat.clone(),
        ));
        let ship_stop = CancellationToken::new();
        let mut ctl_link = None; // control
        let mut upstream_status = None;
        let shipper = match &cfg.upstream {
            Some(up) => {
                let shipper = Shipper::with_lanes(
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
                )?;
                ctl_link = Some(shipper.status()); // control
                upstream_status = Some(shipper.status()); // service: STATUS=
                let tls = shipper.tls();
                spawn_reload_on_hup(tls, shutdown.clone());
                let st = ship_stop.clone();
                Some(tokio::spawn(async move { shipper.run(st).await }))
            }
            None => None,
        };
        let outbox = Outbox {
            sent: Default::default(),
            state_dir: cfg.state_dir.clone(),
            spool: priority.clone(),
            settings: cfg.incident.clone(),
            inputs: BundleInputs::from_config(&cfg),
            ship: cfg.upstream.is_some(),
        };
        let outbox_task = tokio::spawn(outbox.run(ship_stop.clone()));
        // control: `soclink status` (see crate::status).
        let ctl_up = cfg
            .upstream
            .as_ref()
            .map(|u| u.address.clone())
            .zip(ctl_link);
        let ctl = AgentHandles::new(&cfg, ctl_sources, spool.clone(), ctl_up, started);
        if let Some(addr) = cfg.metrics.listen {
            // metrics: Prometheus endpoint over the same handles (see crate::metrics).
            let figures = crate::metrics::Figures::Agent(ctl.clone()); // metrics
            crate::metrics::start(addr, figures, shutdown.clone()).await?; // metrics
        }
        crate::control::spawn(cfg.control_socket.clone(), Arc::new(ctl), shutdown.clone());
        tracing::info!(
            "agent {:?} started: {} source(s), state in {}",
            cfg.id,
            cfg.sources.len(),
            cfg.state_dir.display()
        );
        // service: READY=1 (the upstream link may still be connecting), STATUS=, watchdog.
        let figures = crate::service::AgentFigures {
            sources: counters,
            spool: spool.clone(),
            upstream: upstream_status,
        };
        crate::service::agent_started(figures, heartbeat, shutdown.clone());
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
        crate::service::stopping(); // service: STOPPING=1
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
        if let Some(s) = shipper {
            s.await??;
        }
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

async fn compress_stage(
    mut rx: mpsc::Receiver<SealedBatch>,
    out: mpsc::Sender<JoinHandle<Compressed>>,
    level: u32,
) {
    while let Some(b) = rx.recv().await {
        let h = tokio::task::spawn_blocking(move || {
            let out = crate::pool::GZIP.take(b.raw.len() / 4 + 64);
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
    heartbeat: crate::service::Heartbeat,
) -> Result<()> {
    let mut last_store = Instant::now();
    let mut dirty = false;
    let mut full_logged = false;
    let mut acked = spool.watch_acked();
    loop {
        // service: beat for the watchdog at least every second, also when idle.
        heartbeat.beat();
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = tokio::time::sleep(crate::service::HEARTBEAT_EVERY) => continue,
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
                    store_checkpoints(&spool, &checkpoints, &ck_path).await?;
                    last_store = Instant::now();
                    dirty = false;
                }
                if !full_logged {
                    tracing::warn!(
                        "spool is full ({} bytes): sources are paused until the upstream acknowledges batches",
                        spool.stats().bytes
                    );
                    full_logged = true;
                }
                heartbeat.beat(); // service: a full spool is waiting, not stuck
                tokio::select! {
                    r = acked.changed() => { if r.is_err() { break; } }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => {
                        // Unspooled batches are dropped: their positions never advanced,
                        // so the sources read those lines again after the restart.
                        store_checkpoints(&spool, &checkpoints, &ck_path).await?;
                        return Ok(());
                    }
                }
            }
            if full_logged {
                tracing::info!("spool has room again: sources resume");
                full_logged = false;
            }
            let sp = spool.clone();
            let (appended, rest) = tokio::task::spawn_blocking(move || -> Result<Appended> {
                let mut appended = Vec::with_capacity(group.len());
                let mut items = group.into_iter();
                for c in items.by_ref() {
                    let meta = serde_json::to_vec(&c.meta)?;
                    match sp.append(&meta, &c.gzip) {
                        Ok(seq) => {
                            appended.push((seq, c.meta));
                            crate::pool::GZIP.give(c.gzip);
                        }
                        Err(crate::spool::SpoolError::Full { .. }) => {
                            let mut rest = vec![c];
                            rest.extend(items);
                            sp.commit()?;
                            return Ok((appended, rest));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                sp.commit()?;
                Ok((appended, Vec::new()))
            })
            .await??;
            dirty |= !appended.is_empty();
            apply_done(&mut checkpoints, appended);
            group = rest;
        }
        if dirty && last_store.elapsed() >= CHECKPOINT_EVERY {
            store_checkpoints(&spool, &checkpoints, &ck_path).await?;
            last_store = Instant::now();
            dirty = false;
        }
    }
    store_checkpoints(&spool, &checkpoints, &ck_path).await?;
    Ok(())
}

fn apply_done(checkpoints: &mut Checkpoints, done: Vec<(u64, BatchMeta)>) {
    for (seq, meta) in done {
        if let Some(cursor) = &meta.cursor {
            checkpoints.apply(&meta.source, cursor);
        }
        checkpoints.spool_seq = seq;
    }
}

async fn store_checkpoints(spool: &Spool, ck: &Checkpoints, path: &Path) -> Result<()> {
    let ck = ck.clone();
    let path = path.to_path_buf();
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        ck.store(&path)
            .with_context(|| format!("cannot write checkpoints {}", path.display()))?;
        spool.set_checkpointed(ck.spool_seq)?;
        Ok(())
    })
    .await?
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
                    crate::service::reloading(); // service: RELOADING=1 .. READY=1
                    match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                        Err(e) => tracing::error!("SIGHUP: keeping the old certificates: {e}"),
                    }
                    crate::service::ready();
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// Bind a syslog source's listeners (so a port in use fails the start, clearly).
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
        let bound = SyslogListen::bind(&addr, tls)
            .await
            .with_context(|| format!("cannot listen on {l}"))?;
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
    })
}
