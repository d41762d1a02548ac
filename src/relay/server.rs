//! The relay's TLS server: accepts agents (and downstream relays), verifies each batch,
//! hands it to the sink (the store, or the forwarding spool), and acknowledges it once
//! the sink made it durable.
//!
//! Per connection: a slot of its source address while unauthenticated and a permit
//! of the connection semaphore (past `max_connections`: answered busy at once; see
//! [`super::admission`]), a handshake timeout, an identity that looks like no other
//! agent's, an idle timeout, frame limits, and bounded inflation. A bad or hostile connection is closed with an `Error` frame and logged;
//! nothing it does reaches other connections except through the shared writer, which
//! only ever sees verified batches.
//!
//! Acknowledgements are sent in the order batches arrived, each only after the sink's
//! group commit that included it.

use crate::util::lock;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, BUSY_RETRY_SECS, OVERFLOW_SLOTS, Unauthenticated};
use super::sink::{Sink, WriteReq, WriteResult};
use crate::protocol::{
    self, Ack, ErrorCode, ErrorFrame, Frame, HelloAck, Limits, Refuse, ResumePoint,
};
use crate::tls::ReloadableServerConfig;

/// Settings of the server part of the relay.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub relay_id: String,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_batch_bytes: u64,
    /// Identities allowed to send batches on behalf of other agents (downstream relays).
    pub trusted_forwarders: Vec<String>,
}

/// Live view of connected peers for status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub identity: String,
    pub address: String,
    pub connected_since: SystemTime,
    pub last_seen: SystemTime,
    pub batches: u64,
}

#[derive(Default)]
pub struct Peers {
    next: u64,
    pub live: HashMap<u64, PeerStatus>,
    /// Last time each identity was seen, kept after it disconnects.
    pub last_seen: HashMap<String, SystemTime>,
}

pub struct Server {
    pub settings: ServerSettings,
    pub tls: Arc<ReloadableServerConfig>,
    pub sink: Sink,
    pub peers: Arc<Mutex<Peers>>,
    /// Per-address and identity checks (see [`super::admission`]).
    pub admission: Arc<Admission>,
}

impl Server {
    /// Accept on all listeners until `shutdown`.
    pub async fn run(self: Arc<Self>, listeners: Vec<TcpListener>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.settings.max_connections));
        let mut tasks = Vec::new();
        for l in listeners {
            let me = self.clone();
            let permits = permits.clone();
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                me.accept_loop(l, permits, shutdown).await
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        permits: Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let overflow = Arc::new(Semaphore::new(OVERFLOW_SLOTS));
        let warn = crate::util::LogLimiter::default();
        loop {
            // Accept first and decide after: a full relay answers "busy" at once instead
            // of leaving agents in the kernel's backlog until their connect times out.
            let (tcp, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let Some(pending) = self.admission.unauthenticated(addr.ip()) else {
                if let Some(repeated) = warn.check(&format!("unauth {}", addr.ip())) {
                    tracing::warn!(peer = %addr, "closing: {} connections from this address are already waiting for their TLS handshake (max_unauthenticated_per_address){repeated}", self.admission.pending(addr.ip()));
                }
                continue;
            };
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    if let Some(repeated) = warn.check("busy") {
                        tracing::warn!(peer = %addr, "all {} connections (max_connections) are in use: answering busy{repeated}", self.settings.max_connections);
                    }
                    if let Ok(slot) = overflow.clone().try_acquire_owned() {
                        let me = self.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            let _pending = pending;
                            me.busy(tcp).await;
                        });
                    }
                    continue;
                }
            };
            let me = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                if let Err(e) = me.connection(tcp, addr, pending, shutdown).await {
                    tracing::info!(peer = %addr, "connection closed: {e:#}");
                }
            });
        }
    }

    /// Past `max_connections`: the handshake, then `Error(Unavailable)` with a retry
    /// hint, all within a short bound (a busy relay spends little on the overflow).
    async fn busy(&self, tcp: tokio::net::TcpStream) {
        let bound = self.settings.handshake_timeout.min(Duration::from_secs(3));
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.current());
        let _ = tokio::time::timeout(bound, async {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let (rd, mut wr) = tokio::io::split(tls);
            let mut rd = BufReader::new(rd);
            let _ = protocol::read_frame(&mut rd, &Limits::default()).await;
            let msg = format!(
                "relay busy: all {} connections (max_connections) are in use; retry in about {BUSY_RETRY_SECS} s",
                self.settings.max_connections
            );
            let _ = protocol::write_frame(&mut wr, &error(ErrorCode::Unavailable, msg)).await;
            let _ = wr.shutdown().await;
        })
        .await;
    }

    async fn connection(
        &self,
        tcp: tokio::net::TcpStream,
        addr: SocketAddr,
        pending: Unauthenticated,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.current());
        let tls = match tokio::time::timeout(self.settings.handshake_timeout, acceptor.accept(tcp))
            .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(peer = %addr, "TLS handshake refused: {}", crate::tls::explain(&e));
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(peer = %addr, "TLS handshake timed out after {:?}", self.settings.handshake_timeout);
                return Ok(());
            }
        };
        let identity = crate::tls::peer_identity(tls.get_ref().1).and_then(|id| {
            self.admission
                .identities
                .admit(&id)
                .map(|()| id)
                .map_err(crate::tls::TlsError::Identity)
        });
        let identity = match identity {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(peer = %addr, "refusing client: {e}");
                // Tell the agent why (its status shows it), after its Hello so that
                // closing does not reset the connection under the answer.
                let (rd, mut wr) = tokio::io::split(tls);
                let mut rd = BufReader::new(rd);
                let _ = tokio::time::timeout(
                    self.settings.handshake_timeout,
                    protocol::read_frame(&mut rd, &Limits::default()),
                )
                .await;
                let msg = format!("the relay refuses this certificate's identity: {e}");
                let _ = protocol::write_frame(&mut wr, &error(ErrorCode::Forbidden, msg)).await;
                let _ = wr.shutdown().await;
                return Ok(());
            }
        };
        drop(pending);
        let forwarder = self.settings.trusted_forwarders.contains(&identity);
        let (rd, mut wr) = tokio::io::split(tls);
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let limits = Limits {
            max_frame: (self
                .settings
                .max_batch_bytes
                .min(u64::from(u32::MAX) - 4096) as u32)
                .min(protocol::DEFAULT_MAX_FRAME.max(64 << 20)),
            ..Limits::default()
        };
        let hello = match tokio::time::timeout(
            self.settings.handshake_timeout,
            protocol::read_frame(&mut rd, &limits),
        )
        .await
        {
            Ok(Ok(Frame::Hello(h))) => h,
            Ok(Ok(other)) => {
                return refuse(
                    &mut wr,
                    ErrorCode::ProtocolViolation,
                    format!("expected Hello, got {:?}", other.frame_type()),
                )
                .await;
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %addr, agent = %identity, "bad Hello: {e}");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(peer = %addr, agent = %identity, "no Hello within {:?}", self.settings.handshake_timeout);
                return Ok(());
            }
        };
        let version = match protocol::negotiate(&hello.versions, protocol::SUPPORTED_VERSIONS) {
            Ok(v) => v,
            Err(reason) => {
                tracing::warn!(peer = %addr, agent = %identity, "refused: {reason}");
                protocol::write_frame(
                    &mut wr,
                    &Frame::Refuse(Refuse {
                        reason,
                        versions: protocol::SUPPORTED_VERSIONS.to_vec(),
                    }),
                )
                .await?;
                return Ok(());
            }
        };
        let resume: Vec<ResumePoint> = hello
            .streams
            .iter()
            .take(64)
            .map(|s| ResumePoint {
                stream: s.clone(),
                last_seq: self.sink.position(&identity, s),
            })
            .collect();
        protocol::write_frame(
            &mut wr,
            &Frame::HelloAck(HelloAck {
                version,
                relay_id: self.settings.relay_id.clone(),
                relay_version: env!("CARGO_PKG_VERSION").to_string(),
                resume,
            }),
        )
        .await?;
        tracing::info!(peer = %addr, agent = %identity, "agent connected (soclink {})", hello.agent_version);
        let peer_id = {
            let mut p = lock(&self.peers);
            p.next += 1;
            let id = p.next;
            let now = crate::clock::now();
            p.live.insert(
                id,
                PeerStatus {
                    identity: identity.clone(),
                    address: addr.to_string(),
                    connected_since: now,
                    last_seen: now,
                    batches: 0,
                },
            );
            p.last_seen.insert(identity.clone(), now);
            id
        };
        let result = self
            .serve(&mut rd, wr, &identity, forwarder, &limits, shutdown)
            .await;
        lock(&self.peers).live.remove(&peer_id);
        result
    }

    /// The batch loop of one connection.
    async fn serve<R: tokio::io::AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        mut wr: tokio::io::WriteHalf<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        identity: &str,
        forwarder: bool,
        limits: &Limits,
        shutdown: CancellationToken,
    ) -> Result<()> {
        // The acker writes every outgoing frame, in order: acks after their commit,
        // pongs, and the final error.
        let (otx, mut orx) = mpsc::channel::<Outgoing>(1024);
        let acker = tokio::spawn(async move {
            while let Some(o) = orx.recv().await {
                let frame = match o {
                    Outgoing::Ack { stream, seq, done } => match done.await {
                        Ok(Ok(())) => Frame::Ack(Ack { stream, seq }),
                        Ok(Err(msg)) => Frame::Error(ErrorFrame {
                            code: ErrorCode::Unavailable,
                            message: msg,
                        }),
                        Err(_) => break,
                    },
                    Outgoing::Frame(f) => *f,
                };
                let is_err = matches!(frame, Frame::Error(_));
                if protocol::write_frame(&mut wr, &frame).await.is_err() || is_err {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let result = loop {
            let frame = tokio::select! {
                r = tokio::time::timeout(self.settings.idle_timeout, protocol::read_frame(rd, limits)) => r,
                _ = shutdown.cancelled() => {
                    let _ = otx.send(Outgoing::Frame(Box::new(error(ErrorCode::ShuttingDown, "the relay is shutting down".into())))).await;
                    break Ok(());
                }
            };
            let frame = match frame {
                Err(_) => break Err(anyhow::anyhow!("idle for {:?}", self.settings.idle_timeout)),
                Ok(Err(protocol::ProtocolError::Closed)) => break Ok(()),
                Ok(Err(e)) => {
                    let _ = otx
                        .send(Outgoing::Frame(Box::new(error(
                            ErrorCode::ProtocolViolation,
                            e.to_string(),
                        ))))
                        .await;
                    break Err(e.into());
                }
                Ok(Ok(f)) => f,
            };
            match frame {
                Frame::Batch(b) => {
                    let h = b.header;
                    // Identity comes from the certificate; only trusted forwarders may
                    // speak for another agent.
                    let (agent, stream, seq) = match (&h.origin, forwarder) {
                        (None, _) => (identity.to_string(), h.stream.clone(), h.seq),
                        (Some(o), true) => match crate::identity::normalize(&o.agent) {
                            Ok(agent) => {
                                if let Err(e) = self.admission.identities.admit(&agent) {
                                    // Refusing would stall every agent behind this
                                    // forwarder; the relay the agent connects to enforces it.
                                    tracing::warn!(agent = %identity, "forwarded agent: {e}");
                                }
                                (agent, o.stream.clone(), o.seq)
                            }
                            Err(e) => {
                                let msg = format!("forwarded agent name refused: {e}");
                                tracing::warn!(agent = %identity, "{msg}");
                                let _ = otx
                                    .send(Outgoing::Frame(Box::new(error(
                                        ErrorCode::BatchRejected,
                                        msg.clone(),
                                    ))))
                                    .await;
                                break Err(anyhow::anyhow!(msg));
                            }
                        },
                        (Some(o), false) => {
                            let msg = format!(
                                "{identity:?} is not a trusted forwarder and may not send batches of agent {:?}",
                                o.agent
                            );
                            tracing::warn!(agent = %identity, "{msg}");
                            let _ = otx
                                .send(Outgoing::Frame(Box::new(error(
                                    ErrorCode::BatchRejected,
                                    msg.clone(),
                                ))))
                                .await;
                            break Err(anyhow::anyhow!(msg));
                        }
                    };
                    let gzip = b.gzip;
                    let max = self.settings.max_batch_bytes;
                    let (events, raw) = (h.events, h.raw_bytes);
                    let g2 = gzip.clone();
                    // Chunks (of a bundle or an intel item) are raw file bytes, checked
                    // as a whole when the last one is in; everything else is NDJSON.
                    let is_chunk = h.item.as_ref().is_some_and(|i| i.chunk().is_some());
                    let verified = tokio::task::spawn_blocking(move || {
                        if is_chunk {
                            Ok(())
                        } else {
                            protocol::verify_batch(&g2, events, raw, max)
                        }
                    })
                    .await?;
                    if let Err(e) = verified {
                        let msg = format!("batch {}#{} rejected: {e}", h.stream, h.seq);
                        tracing::warn!(agent = %identity, "{msg}");
                        let _ = otx
                            .send(Outgoing::Frame(Box::new(error(
                                ErrorCode::BatchRejected,
                                msg.clone(),
                            ))))
                            .await;
                        break Err(anyhow::anyhow!(msg));
                    }
                    let (tx, rx) = oneshot::channel::<WriteResult>();
                    let req = WriteReq {
                        agent,
                        stream,
                        seq,
                        source: h.source.clone(),
                        day: h.day.clone(),
                        gzip,
                        meta: h,
                        reply: tx,
                    };
                    let hop_stream = req.meta.stream.clone();
                    let hop_seq = req.meta.seq;
                    if self.sink.submit(req).await.is_err() {
                        break Err(anyhow::anyhow!("the store writer stopped"));
                    }
                    let (dtx, drx) = oneshot::channel();
                    tokio::spawn(async move {
                        let r = match rx.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err("the store writer stopped".to_string()),
                        };
                        let _ = dtx.send(r);
                    });
                    if otx
                        .send(Outgoing::Ack {
                            stream: hop_stream,
                            seq: hop_seq,
                            done: drx,
                        })
                        .await
                        .is_err()
                    {
                        break Ok(());
                    }
                    let mut p = lock(&self.peers);
                    let now = crate::clock::now();
                    p.last_seen.insert(identity.to_string(), now);
                    for peer in p.live.values_mut().filter(|x| x.identity == identity) {
                        peer.last_seen = now;
                        peer.batches += 1;
                    }
                }
                Frame::Ping(n) => {
                    let _ = otx.send(Outgoing::Frame(Box::new(Frame::Pong(n)))).await;
                }
                Frame::Pong(_) => {}
                other => {
                    let msg = format!("unexpected {:?} frame", other.frame_type());
                    let _ = otx
                        .send(Outgoing::Frame(Box::new(error(
                            ErrorCode::ProtocolViolation,
                            msg.clone(),
                        ))))
                        .await;
                    break Err(anyhow::anyhow!(msg));
                }
            }
        };
        drop(otx);
        let _ = acker.await;
        result
    }
}

enum Outgoing {
    Ack {
        stream: String,
        seq: u64,
        done: oneshot::Receiver<Result<(), String>>,
    },
    Frame(Box<Frame>),
}

fn error(code: ErrorCode, message: String) -> Frame {
    Frame::Error(ErrorFrame { code, message })
}

async fn refuse<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    code: ErrorCode,
    message: String,
) -> Result<()> {
    protocol::write_frame(wr, &error(code, message.clone())).await?;
    anyhow::bail!(message)
}
