//! The relay: the receiving end of the agents' links.
//!
//! - [`server`]: TLS listener, per-connection protocol, verification, acknowledgements.
//! - [`sink`]: the single writer that makes batches durable (store or forwarding spool).
//! - [`store`]: the store layout of ARCHITECTURE.md with exactly-once dedupe.
//! - [`admission`]: per-address limits before authentication, "busy" past
//!   `max_connections`, and the look-alike check on identities.
//!
//! Without `[upstream]` the relay stores what it receives; with it, the relay spools
//! what it receives and ships it upstream with its own certificate, keeping each
//! batch's origin (agent, stream, sequence) so the top relay stores it exactly once.

pub mod admission;
pub mod incidents;
pub mod intel;
pub mod server;
pub mod sink;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::ship::{Shipper, UpstreamStatus};
use crate::spool::{Spool, SpoolOptions};
use crate::tls::{ReloadableServerConfig, ServerOptions, TlsFiles};
use server::{Peers, Server, ServerSettings};
use sink::Sink;
use sink::file::{Store, StoreOptions};

/// Handles a running relay exposes (status, reload).
pub struct RelayHandles {
    pub peers: Arc<Mutex<Peers>>,
    pub tls: Arc<ReloadableServerConfig>,
    pub upstream: Option<Arc<Mutex<UpstreamStatus>>>,
    pub sink: Sink,
}

/// Bind the configured listen addresses.
pub async fn bind(cfg: &RelayConfig) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in &cfg.listen {
        out.push(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a}"))?,
        );
    }
    Ok(out)
}

/// Run the relay on already-bound listeners until `shutdown`.
pub async fn run(
    cfg: RelayConfig,
    listeners: Vec<TcpListener>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(RelayHandles),
) -> Result<()> {
    let tls = Arc::new(
        ReloadableServerConfig::new(
            TlsFiles {
                ca: cfg.ca.clone(),
                cert: cfg.cert.clone(),
                key: cfg.key.clone(),
            },
            ServerOptions {
                tls12: false,
                crls: cfg.crls.clone(),
            },
        )
        .context("cannot load the relay's TLS certificates")?,
    );
    admission::fit_descriptors(cfg.max_connections);
    crate::util::create_dir_all_durable(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    let _lock = crate::agent::lock_state_dir(&cfg.state_dir)?;
    let mut shipper_task = None;
    let mut upstream_status = None;
    let mut ctl_spool = None; // control
    let mut ctl_recovery = crate::ops::status::RelayRecoveryStatus::default(); // control
    let (sink, writer) = match &cfg.upstream {
        None => {
            let (store, recovery) = Store::open(StoreOptions {
                store_dir: cfg.store_dir.clone(),
                state_dir: cfg.state_dir.clone(),
            })
            .context("cannot open the store")?;
            // The store logged each item once; status shows them.
            ctl_recovery =
                crate::ops::status::RelayRecoveryStatus::from_store(&recovery, &cfg.state_dir);
            Sink::store(store, cfg.store_dir.clone())?
        }
        Some(up) => {
            let dir = cfg.state_dir.join("spool");
            let (spool, recovery) = Spool::open(
                &dir,
                SpoolOptions {
                    max_size: cfg.spool.max_size,
                    ..SpoolOptions::default()
                },
            )
            .with_context(|| format!("cannot open the forwarding spool in {}", dir.display()))?;
            for m in &recovery.messages {
                tracing::warn!("spool recovery: {m}");
            }
            let shipper = Shipper::new(up.clone(), spool.clone(), "fwd")?;
            upstream_status = Some(shipper.status());
            ctl_spool = Some(spool.clone()); // control: forwarding backlog for status
            let sd = shutdown.clone();
            shipper_task = Some(tokio::spawn(async move { shipper.run(sd).await }));
            Sink::forward(spool)?
        }
    };
    let peers = Arc::new(Mutex::new(Peers::default()));
    // Every agent folder already in the store counts: a new identity that looks like
    // one of them is refused (crate::identity).
    let (identities, clashes) = match &cfg.upstream {
        None => crate::identity::Identities::from_store_dir(&cfg.store_dir),
        Some(_) => (crate::identity::Identities::default(), Vec::new()),
    };
    for (a, b) in clashes {
        tracing::warn!(
            "the store holds agents {a:?} and {b:?}, whose names look alike; new look-alikes are refused, these two stay as they are"
        );
    }
    let trusted_forwarders = cfg
        .trusted_forwarders
        .iter()
        .filter_map(|f| match crate::identity::normalize(f) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!("trusted_forwarders: {e}; ignored");
                None
            }
        })
        .collect();
    let admission = admission::Admission::new(identities, cfg.max_unauthenticated_per_address);
    let server = Arc::new(Server {
        settings: ServerSettings {
            relay_id: cfg.id.clone(),
            max_connections: cfg.max_connections,
            handshake_timeout: cfg.handshake_timeout,
            idle_timeout: cfg.idle_timeout,
            max_batch_bytes: cfg.max_batch_bytes,
            trusted_forwarders,
        },
        tls: tls.clone(),
        sink: sink.clone(),
        peers: peers.clone(),
        admission,
    });
    for l in &listeners {
        if let Ok(a) = l.local_addr() {
            tracing::info!("relay {:?} listening on {a}", cfg.id);
        }
    }
    // control: `soclink status` (see crate::ops::status).
    let ctl_up = cfg
        .upstream
        .as_ref()
        .map(|u| u.address.clone())
        .zip(upstream_status.clone());
    let ctl = crate::ops::status::spawn_relay_control(
        &cfg,
        peers.clone(),
        sink.store_handle(),
        ctl_up.zip(ctl_spool),
        ctl_recovery,
        shutdown.clone(),
    );
    if let Some(addr) = cfg.metrics.listen {
        // metrics: Prometheus endpoint over the same handles (see crate::ops::metrics).
        crate::ops::metrics::start(
            addr,
            crate::ops::metrics::Figures::Relay(ctl),
            shutdown.clone(),
        )
        .await?;
    }
    let (sd_peers, sd_upstream) = (peers.clone(), upstream_status.clone()); // service
    on_ready(RelayHandles {
        peers,
        tls,
        upstream: upstream_status,
        sink: sink.clone(),
    });
    // service: READY=1 after bind, store open and on_ready (SIGHUP handler), watchdog.
    let heartbeat = crate::ops::service::Heartbeat::new();
    crate::ops::service::relay_started(sd_peers, sd_upstream, heartbeat.clone(), shutdown.clone());
    // The writer stops only on a storage failure: then the relay stops too, so that a
    // restart's recovery decides what is durable.
    let writer_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let failed = writer_failed.clone();
        let shutdown = shutdown.clone();
        let probe = sink.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                }
                if probe.is_closed() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    shutdown.cancel();
                    return;
                }
                heartbeat.beat(); // service: the writer is alive and the runtime runs
            }
        });
    }
    server.run(listeners, shutdown.clone()).await;
    crate::ops::service::stopping(); // service: STOPPING=1
    sink.stop();
    drop(sink);
    // The server's connections hold sink clones; they end with their tasks.
    if let Some(t) = shipper_task {
        let _ = t.await;
    }
    let _ = tokio::task::spawn_blocking(move || {
        // The writer ends once every sender is gone; don't hang shutdown on a straggler.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !writer.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    })
    .await;
    if writer_failed.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!("the relay stopped because its storage failed (see the errors above)");
    }
    tracing::info!("relay stopped");
    Ok(())
}
