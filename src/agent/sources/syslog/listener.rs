//! The syslog listeners: UDP sockets, TCP and TLS acceptors, and the one batcher that
//! owns the open batch.
//!
//! Every connection (and every UDP socket) parses and encodes what it reads into a
//! [`Chunk`] — all events of one read, stamped with one receive time — and sends it to
//! the batcher over a bounded channel. That channel is where backpressure happens:
//!
//! - TCP/TLS: a full channel makes the connection task wait in `send`, so it stops
//!   reading; the kernel's buffers fill and the sender is slowed down. Nothing is lost.
//! - UDP: a datagram cannot wait. When the channel is full the chunk is dropped, the
//!   drop is counted in `udp_drops` and reported (a warning at most every 10 s).
//!   Datagrams the kernel drops before we read them (socket receive buffer full) are
//!   not visible here; Linux counts them as `UdpRcvbufErrors` in /proc/net/snmp, and
//!   `net.core.rmem_default` sizes that buffer.
//!
//! Bounds: `max_connections` open TCP/TLS connections in total (more are accepted and
//! closed at once, counted in `rejected_connections`); `idle_timeout` without data
//! closes a connection; a TLS handshake must finish within `handshake_timeout`; each
//! connection holds at most one read buffer and `max_message_bytes` of partial message.
//!
//! Batches carry `cursor: None`: syslog cannot be replayed, data is acknowledged to the
//! sender by the kernel only, so what is received is handed on as soon as it is batched.
//!
//! Time: each event's `ts` is the device's timestamp mapped to UTC by the connection's
//! [`DeviceClock`] (the source's `timezone`, the year inferred from the receive time),
//! `received` the receive time. Batches are filed by the UTC day of the *receive* time,
//! through the same [`DayFiler`] the file source uses: a late message, or a device whose
//! clock is hours or days off, never reopens a closed day's store file (its `ts` says
//! when it happened), and the agent's own clock stepping back across midnight by up to
//! 12 hours keeps the later day.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::framing::Framer;
use super::parse::parse;
use super::timestamp::{DeviceClock, format_utc};
use super::{ListenAddr, Proto, SyslogStats, encode_syslog_event_at};
use crate::agent::sources::SealedBatch;
use crate::agent::sources::file::BatchLimits;
use crate::clock::DayFiler;

/// Bytes asked of the kernel per TCP/TLS read (one TLS record). It also bounds a chunk:
/// the tiniest messages (`<13>a\n`) encode to about 25 times their size.
const READ_BUF: usize = 16 * 1024;
/// Larger than any UDP payload (65,527 bytes over IPv6), so no datagram is cut short.
const UDP_BUF: usize = 65_536;
/// Ready datagrams gathered into one chunk before handing it on.
const UDP_CHUNK_BYTES: usize = 256 * 1024;
const UDP_CHUNK_MESSAGES: u32 = 512;
/// How often a repeated warning (drops, rejections) may be logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A bound socket, ready to serve.
pub enum SyslogListen {
    Udp(UdpSocket),
    Tcp(TcpListener),
    /// TLS per RFC 5425 (octet-counted frames, though LF framing is accepted too). The
    /// caller builds the config: whether client certificates are required is its call.
    Tls(TcpListener, Arc<rustls::ServerConfig>),
}

impl SyslogListen {
    /// Bind `addr`; a `tls://` address needs `tls`, the others ignore it.
    pub async fn bind(
        addr: &ListenAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<SyslogListen> {
        Ok(match addr.proto {
            Proto::Udp => SyslogListen::Udp(UdpSocket::bind(addr.addr).await?),
            Proto::Tcp => SyslogListen::Tcp(TcpListener::bind(addr.addr).await?),
            Proto::Tls => {
                let cfg = tls.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("tls://{} needs tls_cert and tls_key", addr.addr),
                    )
                })?;
                SyslogListen::Tls(TcpListener::bind(addr.addr).await?, cfg)
            }
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            SyslogListen::Udp(s) => s.local_addr(),
            SyslogListen::Tcp(l) | SyslogListen::Tls(l, _) => l.local_addr(),
        }
    }
}

/// Per-source bounds.
#[derive(Debug, Clone, Copy)]
pub struct SyslogLimits {
    /// Longer messages are cut to this and marked `"truncated":true`.
    pub max_message_bytes: usize,
    /// Open TCP + TLS connections, all listeners of the source together.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Chunks (one per read) waiting for the batcher; a full queue is backpressure.
    pub queue_chunks: usize,
}

impl Default for SyslogLimits {
    fn default() -> Self {
        SyslogLimits {
            max_message_bytes: 64 * 1024,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(10),
            queue_chunks: 64,
        }
    }
}

/// The syslog source: serves its listeners until shut down.
pub struct SyslogSource {
    /// The configured source name (goes into every event and batch).
    pub name: String,
    /// The collecting host's name (goes into every event).
    pub host: String,
    pub listeners: Vec<SyslogListen>,
    pub limits: SyslogLimits,
    pub batch: BatchLimits,
    pub out: mpsc::Sender<SealedBatch>,
    pub stats: Arc<SyslogStats>,
    /// The zone of device timestamps that carry none (the source's `timezone`).
    pub timezone: jiff::tz::TimeZone,
}

/// The events of one read (or of a few ready datagrams), all with one receive time.
struct Chunk {
    raw: Vec<u8>,
    /// The receive time (RFC 3339, UTC, ns): the batcher files the chunk by its day.
    received: String,
    received_at: jiff::Timestamp,
    /// Scratch for each event's `ts`.
    ts: String,
    events: u32,
    bytes: u64,
    parse_errors: u64,
    truncated: u64,
}

impl Chunk {
    /// A chunk received now (the wall clock: `crate::clock`).
    fn new() -> Chunk {
        let at = crate::clock::now();
        Chunk {
            raw: Vec::new(),
            received: humantime::format_rfc3339_nanos(at).to_string(),
            // A wall clock before 1970 or past 9999 (a broken RTC): no device time is
            // placed relative to it, every `ts` is then the receive time.
            received_at: jiff::Timestamp::try_from(at).unwrap_or(jiff::Timestamp::MIN),
            ts: String::new(),
            events: 0,
            bytes: 0,
            parse_errors: 0,
            truncated: 0,
        }
    }

    fn add(&mut self, ctx: &Ctx, clock: &mut DeviceClock, peer: &str, msg: &[u8], truncated: bool) {
        let parsed = parse(msg);
        // A message kept whole (not understood) is not trusted for its time either.
        let device = parsed
            .stamp
            .filter(|_| parsed.parse_error.is_none())
            .filter(|_| self.received_at != jiff::Timestamp::MIN)
            .and_then(|st| clock.utc_at(&st, self.received_at));
        self.ts.clear();
        match device {
            Some(t) => format_utc(t, &mut self.ts),
            None => self.ts.push_str(&self.received),
        }
        encode_syslog_event_at(
            &mut self.raw,
            &self.ts,
            Some(&self.received),
            &ctx.host,
            &ctx.name,
            peer,
            &parsed,
            truncated,
        );
        self.events += 1;
        self.bytes += msg.len() as u64;
        self.parse_errors += u64::from(parsed.parse_error.is_some());
        self.truncated += u64::from(truncated);
    }

    fn count(&self, stats: &SyslogStats) {
        stats
            .received
            .fetch_add(u64::from(self.events), Ordering::Relaxed);
        stats.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        stats
            .parse_errors
            .fetch_add(self.parse_errors, Ordering::Relaxed);
        stats.truncated.fetch_add(self.truncated, Ordering::Relaxed);
    }
}

/// What every listener task shares.
struct Ctx {
    name: String,
    host: String,
    zone: jiff::tz::TimeZone,
    limits: SyslogLimits,
    stats: Arc<SyslogStats>,
    tx: mpsc::Sender<Chunk>,
}

impl Ctx {
    /// Hand a chunk to the batcher, waiting while it is busy (TCP/TLS backpressure).
    async fn send(&self, chunk: Chunk) -> bool {
        if chunk.events == 0 {
            return true;
        }
        // The counters travel apart from the bytes, which the batcher takes over.
        let counted = Chunk {
            raw: Vec::new(),
            received: String::new(),
            ts: String::new(),
            ..chunk
        };
        if self.tx.send(chunk).await.is_err() {
            return false;
        }
        counted.count(&self.stats);
        true
    }
}

/// A warning that repeats at most every [`WARN_EVERY`], with the count since the last.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    pending: u64,
}

impl Throttle {
    /// Add `n` occurrences; returns the count to report if a warning is due now.
    fn hit(&mut self, n: u64) -> Option<u64> {
        self.pending += n;
        let due = self.last.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if !due {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.pending))
    }
}

impl SyslogSource {
    /// Serve until `shutdown` is cancelled, then close every connection, seal the open
    /// batch and return.
    pub async fn run(self, shutdown: CancellationToken) {
        let (tx, rx) = mpsc::channel(self.limits.queue_chunks.max(1));
        let batcher = tokio::spawn(batcher(self.name.clone(), rx, self.out, self.batch));
        let ctx = Arc::new(Ctx {
            name: self.name,
            host: self.host,
            zone: self.timezone,
            limits: self.limits,
            stats: self.stats,
            tx,
        });
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(self.limits.max_connections));
        for l in self.listeners {
            let ctx = Arc::clone(&ctx);
            let stop = shutdown.clone();
            match l {
                SyslogListen::Udp(sock) => {
                    tracker.spawn(udp_loop(ctx, sock, stop));
                }
                SyslogListen::Tcp(l) => {
                    let t = tracker.clone();
                    tracker.spawn(accept_loop(ctx, l, None, stop, t, Arc::clone(&permits)));
                }
                SyslogListen::Tls(l, cfg) => {
                    let t = tracker.clone();
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    let p = Arc::clone(&permits);
                    tracker.spawn(accept_loop(ctx, l, Some(acceptor), stop, t, p));
                }
            }
        }
        drop(ctx);
        shutdown.cancelled().await;
        tracker.close();
        tracker.wait().await;
        // Every sender is gone now: the batcher drains the queue, seals and ends.
        if let Err(e) = batcher.await {
            tracing::error!("syslog batcher failed: {e}");
        }
    }
}

async fn accept_loop(
    ctx: Arc<Ctx>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
) {
    let mut rejected = Throttle::default();
    loop {
        let (sock, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(source = %ctx.name, "syslog accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            ctx.stats
                .rejected_connections
                .fetch_add(1, Ordering::Relaxed);
            if let Some(n) = rejected.hit(1) {
                tracing::warn!(source = %ctx.name, %peer, rejected = n, "syslog: {} connections already open; refusing new ones", ctx.limits.max_connections);
            }
            drop(sock);
            continue;
        };
        ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
        ctx.stats.active_connections.fetch_add(1, Ordering::Relaxed);
        let ctx = Arc::clone(&ctx);
        let tls = tls.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            connection(&ctx, sock, peer, tls, stop).await;
            drop(permit);
            ctx.stats.active_connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn connection(
    ctx: &Ctx,
    sock: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let peer_str = peer_string(peer);
    let result = match tls {
        None => read_stream(ctx, sock, &peer_str, &stop).await,
        Some(acceptor) => {
            let hs = tokio::select! {
                () = stop.cancelled() => return,
                r = tokio::time::timeout(ctx.limits.handshake_timeout, acceptor.accept(sock)) => r,
            };
            match hs {
                Ok(Ok(stream)) => read_stream(ctx, stream, &peer_str, &stop).await,
                Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                Err(_) => Err("TLS handshake timed out".to_string()),
            }
        }
    };
    if let Err(e) = result {
        ctx.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(source = %ctx.name, peer = %peer_str, "syslog connection closed: {e}");
    }
}

/// Read, frame, parse and encode until EOF, idle timeout, an error or shutdown.
async fn read_stream<S: AsyncRead + Unpin>(
    ctx: &Ctx,
    mut stream: S,
    peer: &str,
    stop: &CancellationToken,
) -> Result<(), String> {
    let mut framer = Framer::new(ctx.limits.max_message_bytes);
    let mut clock = DeviceClock::new(ctx.zone.clone());
    let mut buf = vec![0u8; READ_BUF];
    let mut outcome = Ok(());
    loop {
        let read = tokio::select! {
            () = stop.cancelled() => break,
            r = tokio::time::timeout(ctx.limits.idle_timeout, stream.read(&mut buf)) => r,
        };
        let n = match read {
            Err(_) => {
                tracing::debug!(source = %ctx.name, %peer, "syslog connection idle: closing it");
                break;
            }
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            // How senders commonly hang up: TLS without close_notify, or a reset because
            // they never read what we sent (TLS 1.3 session tickets). Frames delimit
            // themselves, so nothing is cut silently: `finish` hands on a partial last
            // frame as truncated.
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                tracing::debug!(source = %ctx.name, %peer, "syslog sender hung up: {e}");
                break;
            }
            Ok(Err(e)) => {
                outcome = Err(format!("read error: {e}"));
                break;
            }
        };
        let mut chunk = Chunk::new();
        let data = buf.get(..n).unwrap_or_default();
        let framed = framer.push(data, |m, t| chunk.add(ctx, &mut clock, peer, m, t));
        if !ctx.send(chunk).await {
            return outcome; // shutting down: the batcher is gone
        }
        if let Err(e) = framed {
            outcome = Err(e.to_string());
            break;
        }
    }
    // What arrived is kept, even a last message without its terminator.
    let mut chunk = Chunk::new();
    framer.finish(|m, t| chunk.add(ctx, &mut clock, peer, m, t));
    ctx.send(chunk).await;
    outcome
}

/// `192.0.2.7:514`, also for IPv4 senders reaching a dual-stack `[::]` listener (which
/// sees them as `[::ffff:192.0.2.7]`), so one device has one address in the store.
fn peer_string(peer: SocketAddr) -> String {
    SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string()
}

/// One datagram is one message; a trailing LF/CRLF/NUL some senders add is not part of it.
fn datagram(msg: &[u8]) -> &[u8] {
    let msg = msg.strip_suffix(b"\0").unwrap_or(msg);
    let msg = msg.strip_suffix(b"\n").unwrap_or(msg);
    msg.strip_suffix(b"\r").unwrap_or(msg)
}

async fn udp_loop(ctx: Arc<Ctx>, sock: UdpSocket, stop: CancellationToken) {
    let mut buf = vec![0u8; UDP_BUF];
    let max = ctx.limits.max_message_bytes.max(1);
    let mut drops = Throttle::default();
    let mut errors = Throttle::default();
    let mut last_peer: Option<(SocketAddr, String)> = None;
    let mut clock = DeviceClock::new(ctx.zone.clone());
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => r,
        };
        let mut chunk = Chunk::new();
        let mut next = first;
        loop {
            match next {
                Ok((n, peer)) => {
                    let peer_str = match &last_peer {
                        Some((a, s)) if *a == peer => s.clone(),
                        _ => {
                            let s = peer_string(peer);
                            last_peer = Some((peer, s.clone()));
                            s
                        }
                    };
                    let msg = datagram(buf.get(..n).unwrap_or_default());
                    let cut = msg.len() > max;
                    let msg = msg.get(..msg.len().min(max)).unwrap_or_default();
                    chunk.add(&ctx, &mut clock, &peer_str, msg, cut);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if let Some(n) = errors.hit(1) {
                        tracing::warn!(source = %ctx.name, errors = n, "syslog UDP receive error: {e}");
                    }
                    break;
                }
            }
            if chunk.raw.len() >= UDP_CHUNK_BYTES || chunk.events >= UDP_CHUNK_MESSAGES {
                break;
            }
            next = sock.try_recv_from(&mut buf);
        }
        if chunk.events == 0 {
            continue;
        }
        let lost = u64::from(chunk.events);
        let counted = Chunk {
            raw: Vec::new(),
            received: String::new(),
            ts: String::new(),
            ..chunk
        };
        match ctx.tx.try_send(chunk) {
            Ok(()) => counted.count(&ctx.stats),
            Err(mpsc::error::TrySendError::Full(_)) => {
                ctx.stats.udp_drops.fetch_add(lost, Ordering::Relaxed);
                if let Some(n) = drops.hit(lost) {
                    tracing::warn!(source = %ctx.name, dropped = n, total = ctx.stats.udp_drops.load(Ordering::Relaxed), "syslog: pipeline full, UDP messages dropped");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// The batch being filled.
struct Open {
    raw: Vec<u8>,
    day: String,
    events: u32,
    deadline: Option<tokio::time::Instant>,
}

/// Owns the open batch: appends chunks, seals on size, delay and UTC day change (the
/// day of the receive time, held by [`DayFiler`] against steps back).
async fn batcher(
    name: String,
    mut rx: mpsc::Receiver<Chunk>,
    out: mpsc::Sender<SealedBatch>,
    limits: BatchLimits,
) {
    let max = usize::try_from(limits.max_bytes)
        .unwrap_or(usize::MAX)
        .max(1);
    let mut open = Open {
        raw: Vec::new(),
        day: String::new(),
        events: 0,
        deadline: None,
    };
    let lost = AtomicU64::new(0);
    let mut filer = DayFiler::default();
    loop {
        let next = match open.deadline {
            Some(d) => tokio::select! {
                c = rx.recv() => c,
                () = tokio::time::sleep_until(d) => {
                    seal(&name, &mut open, &out, &lost).await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(chunk) = next else { break };
        let day = filer.day(&chunk.received);
        let day_changed = open.events > 0 && open.day != day;
        if day_changed || (open.events > 0 && open.raw.len() + chunk.raw.len() > max) {
            seal(&name, &mut open, &out, &lost).await;
        }
        if open.events == 0 {
            // A reused buffer (see crate::pool): growing a fresh one to the batch size
            // for every batch costs page faults and copies.
            open.raw = crate::pool::batch_buffer();
            open.raw.extend_from_slice(&chunk.raw);
            open.day.clear();
            open.day.push_str(day);
            open.deadline = Some(tokio::time::Instant::now() + limits.max_delay);
        } else {
            open.raw.extend_from_slice(&chunk.raw);
        }
        open.events += chunk.events;
        if open.raw.len() >= max {
            seal(&name, &mut open, &out, &lost).await;
        }
    }
    seal(&name, &mut open, &out, &lost).await;
}

async fn seal(name: &str, open: &mut Open, out: &mpsc::Sender<SealedBatch>, lost: &AtomicU64) {
    open.deadline = None;
    if open.events == 0 {
        return;
    }
    let batch = SealedBatch {
        source: name.to_string(),
        day: std::mem::take(&mut open.day),
        events: std::mem::take(&mut open.events),
        raw: std::mem::take(&mut open.raw),
        cursor: None,
    };
    let n = batch.events;
    if out.send(batch).await.is_err() {
        // Only at shutdown, when the pipeline went away first: say so, loudly.
        let total = lost.fetch_add(u64::from(n), Ordering::Relaxed) + u64::from(n);
        tracing::error!(source = %name, events = n, total, "syslog: pipeline closed; received events could not be handed on");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(day: &str, len: usize) -> Chunk {
        Chunk {
            raw: vec![b'x'; len],
            received: format!("{day}T12:00:00.000000000Z"),
            received_at: jiff::Timestamp::UNIX_EPOCH,
            ts: String::new(),
            events: 1,
            bytes: 0,
            parse_errors: 0,
            truncated: 0,
        }
    }

    /// A real UDP listener under this thread's fake clock (a current-thread runtime runs
    /// every task here): the receive time, not the device's, files the batch, with the
    /// 12-hour hold against a step back; `ts` is the device's time in UTC.
    #[tokio::test]
    async fn new_year_in_taipei_device_clock_off_and_day_hold() {
        let t = |s: &str| humantime::parse_rfc3339(s).unwrap();
        // 1 January 2027, 00:00:02 in Taipei.
        let clock = crate::clock::fake::set(t("2026-12-31T16:00:02Z"));
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let (out, mut batches) = mpsc::channel(8);
        let source = SyslogSource {
            name: "devices".into(),
            host: "agent".into(),
            listeners: vec![SyslogListen::Udp(sock)],
            limits: SyslogLimits::default(),
            batch: BatchLimits {
                max_bytes: 1 << 20,
                max_delay: Duration::from_millis(10),
            },
            out,
            stats: Arc::default(),
            timezone: jiff::tz::TimeZone::get("Asia/Taipei").unwrap(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(source.run(stop.clone()));
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut send = async |msg: &str| {
            sender.send_to(msg.as_bytes(), addr).await.unwrap();
            let b = batches.recv().await.unwrap();
            let e: serde_json::Value = serde_json::from_slice(&b.raw).unwrap();
            (b.day, e)
        };

        // Sent at 23:59:59 on 31 December in Taipei, received 3 s later in the new year.
        let (day, e) = send("<13>Dec 31 23:59:59 fw app: last of the year").await;
        assert_eq!(e["ts"], "2026-12-31T15:59:59.000000000Z", "{e}");
        assert_eq!(e["received"], "2026-12-31T16:00:02.000000000Z");
        assert_eq!(e["syslog_ts"], "Dec 31 23:59:59");
        assert_eq!(day, "2026-12-31");
        // A device 5 hours behind: its own time, in the old year.
        let (_, e) = send("<13>Dec 31 19:00:02 fw app: slow clock").await;
        assert_eq!(e["ts"], "2026-12-31T11:00:02.000000000Z", "{e}");
        // A device 7 hours ahead, in the next year by its clock.
        let (_, e) = send("<13>Jan  1 07:00:02 fw app: fast clock").await;
        assert_eq!(e["ts"], "2026-12-31T23:00:02.000000000Z", "{e}");
        // Without a timestamp, or not understood: the receive time.
        let (_, e) = send("<13>app: no time").await;
        assert_eq!(e["ts"], e["received"]);
        let (_, e) = send("<13>1 2026-12-31T25:00:00Z h a - - - bad hour").await;
        assert_eq!(e["ts"], e["received"]);
        assert_eq!(e["parse_error"], "invalid RFC 5424 TIMESTAMP");

        // Midnight UTC passes: the new day. The agent's clock then steps back 2 hours:
        // still the new day, even for a message whose device time is the old day.
        clock.jump(8 * 3600);
        let (day, _) = send("<13>Jan  1 08:00:03 fw app: after midnight UTC").await;
        assert_eq!(day, "2027-01-01");
        clock.jump(-2 * 3600);
        let (day, e) = send("<13>Jan  1 06:00:04 fw app: clock stepped back").await;
        assert_eq!(day, "2027-01-01", "{e}");
        assert_eq!(e["received"], "2026-12-31T22:00:02.000000000Z");
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn peers_are_canonical() {
        let v4mapped: SocketAddr = "[::ffff:192.0.2.7]:514".parse().unwrap();
        assert_eq!(peer_string(v4mapped), "192.0.2.7:514");
        let v6: SocketAddr = "[2001:db8::1]:514".parse().unwrap();
        assert_eq!(peer_string(v6), "[2001:db8::1]:514");
    }

    #[test]
    fn datagram_trailers() {
        assert_eq!(datagram(b"<13>a\r\n"), b"<13>a");
        assert_eq!(datagram(b"<13>a\n\0"), b"<13>a");
        assert_eq!(datagram(b"<13>a\n\n"), b"<13>a\n");
    }

    #[tokio::test]
    async fn batches_split_at_day_boundaries_and_size() {
        let (tx, rx) = mpsc::channel(8);
        let (out_tx, mut out_rx) = mpsc::channel(8);
        let limits = BatchLimits {
            max_bytes: 100,
            max_delay: Duration::from_secs(3600),
        };
        let task = tokio::spawn(batcher("s".into(), rx, out_tx, limits));
        for (day, len) in [
            ("2026-11-26", 10),
            ("2026-11-26", 10),
            ("2026-11-27", 10),
            ("2026-11-27", 95),
            ("2026-11-27", 150),
            ("2026-11-27", 5),
        ] {
            tx.send(chunk(day, len)).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
        let mut got = Vec::new();
        while let Some(b) = out_rx.recv().await {
            assert!(b.cursor.is_none());
            assert_eq!(b.source, "s");
            got.push((b.day, b.events, b.raw.len()));
        }
        let want = [
            ("2026-11-26", 2, 20),
            ("2026-11-27", 1, 10),
            ("2026-11-27", 1, 95),
            ("2026-11-27", 1, 150),
            ("2026-11-27", 1, 5),
        ];
        let want: Vec<(String, u32, usize)> = want
            .iter()
            .map(|(d, e, l)| (d.to_string(), *e, *l))
            .collect();
        assert_eq!(got, want);
    }
}
