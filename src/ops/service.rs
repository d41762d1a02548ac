//! Talking to the service manager: sd_notify (READY, RELOADING, STOPPING, STATUS) and
//! the watchdog.
//!
//! Invariant: outside systemd (no `NOTIFY_SOCKET`) every function here is a no-op, and
//! no failure to notify ever stops or slows the agent or relay: a lost datagram costs
//! at most a status line, never a log line.
//!
//! Watchdog design: systemd restarts a service that stops sending `WATCHDOG=1`. A
//! timer that pets unconditionally would only prove the timer runs, so the pet is tied
//! to the work: the task doing the work (the agent's spool write stage, the relay's
//! storage probe) calls [`Heartbeat::beat`] at least every [`HEARTBEAT_EVERY`], even
//! when idle, and the watchdog task pets only while that heartbeat is younger than
//! [`HEARTBEAT_STALE`]. A write stage stuck on a dead disk, or a runtime whose threads
//! are all blocked, stops the pets, and systemd restarts soclink within
//! `HEARTBEAT_STALE + WatchdogSec`; recovery on restart then decides what is durable.

use crate::util::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use systemd::daemon;
use tokio_util::sync::CancellationToken;

use crate::agent::sources::file::SourceStats;
use crate::agent::sources::journald::JournaldStats;
use crate::agent::sources::syslog::SyslogStats;
use crate::relay::server::Peers;
use crate::ship::UpstreamStatus;
use crate::spool::{Spool, SpoolStats};

/// The working task beats at least this often, also when it has nothing to do.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A heartbeat older than this means the work is stuck: stop petting the watchdog.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(5);
/// How often STATUS= is refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);
/// STATUS= is one line; a longer one (e.g. a long TLS error) is cut here.
const STATUS_MAX_CHARS: usize = 400;

/// Set once a notification failed, so a vanished socket logs once, not every second.
static NOTIFY_FAILED: AtomicBool = AtomicBool::new(false);

fn notify(state: &[(&str, &str)]) {
    if let Err(e) = daemon::notify(state.iter())
        && !NOTIFY_FAILED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!("cannot notify the service manager (further failures are not logged): {e}");
    }
}

/// `READY=1`: start-up is finished (also sent after a reload).
pub fn ready() {
    notify(&[(daemon::STATE_READY, "1")]);
}

/// `STOPPING=1`: a graceful shutdown has begun.
pub fn stopping() {
    notify(&[(daemon::STATE_STOPPING, "1")]);
}

/// `RELOADING=1`: a reload (SIGHUP) has begun; follow it with [`ready`].
pub fn reloading() {
    notify(&[(daemon::STATE_RELOADING, "1")]);
}

/// `STATUS=...`: one line shown by `systemctl status`. Newlines and NULs become
/// spaces (they would end or break the datagram's field) and it is cut to a bound.
pub fn status(text: &str) {
    notify(&[(daemon::STATE_STATUS, &one_line(text))]);
}

/// `WATCHDOG=1`.
pub fn pet() {
    notify(&[(daemon::STATE_WATCHDOG, "1")]);
}

/// The watchdog timeout systemd expects pets within (`WATCHDOG_USEC`, honouring
/// `WATCHDOG_PID` as `sd_watchdog_enabled` does); None when there is no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    match daemon::watchdog_enabled() {
        Ok(0) => None,
        Ok(usec) => Some(Duration::from_micros(usec)),
        Err(e) => {
            tracing::warn!("ignoring an invalid watchdog setting: {e}");
            None
        }
    }
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == '\n' || c == '\r' || c == '\0' {
                ' '
            } else {
                c
            }
        })
        .take(STATUS_MAX_CHARS)
        .collect()
}

/// Proof of progress from the task that does the work; cheap to clone and to beat.
#[derive(Clone)]
pub struct Heartbeat {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new()
    }
}

impl Heartbeat {
    /// A heartbeat that is fresh now.
    pub fn new() -> Heartbeat {
        Heartbeat {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn beat(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }
}

/// Pet the watchdog every half timeout while `hb` is fresh; returns at once when
/// systemd set no watchdog.
pub fn spawn_watchdog(hb: Heartbeat, shutdown: CancellationToken) {
    let Some(timeout) = watchdog_interval() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut withheld = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let age = hb.age();
            if age < HEARTBEAT_STALE {
                if withheld {
                    tracing::info!("the pipeline made progress again: watchdog pings resume");
                    withheld = false;
                }
                pet();
            } else if !withheld {
                tracing::error!(
                    "no progress for {}s: withholding the watchdog ping, so systemd restarts soclink if this lasts {}ms more",
                    age.as_secs(),
                    timeout.as_millis()
                );
                withheld = true;
            }
        }
    });
}

/// A source's event counter, whatever the source type.
#[derive(Clone)]
pub enum SourceCounter {
    File(Arc<SourceStats>),
    Journald(Arc<JournaldStats>),
    Syslog(Arc<SyslogStats>),
}

impl SourceCounter {
    /// Events (lines, journal entries, syslog messages) read so far.
    pub fn events(&self) -> u64 {
        match self {
            SourceCounter::File(s) => s.lines.load(Ordering::Relaxed),
            SourceCounter::Journald(s) => s.entries.load(Ordering::Relaxed),
            SourceCounter::Syslog(s) => s.received.load(Ordering::Relaxed),
        }
    }
}

/// What the agent's STATUS= line is made of.
pub struct AgentFigures {
    pub sources: Vec<SourceCounter>,
    pub spool: Spool,
    pub upstream: Option<Arc<Mutex<UpstreamStatus>>>,
}

/// The agent's STATUS= line, e.g.
/// `120 lines/s, spool 3 batches (1.2 MiB) unacknowledged, upstream connected to relay "center"`.
pub fn agent_status_line(
    lines_per_sec: u64,
    spool: &SpoolStats,
    upstream: Option<&UpstreamStatus>,
) -> String {
    format!(
        "{lines_per_sec} lines/s, spool {} batches ({}) unacknowledged, {}",
        spool.next_seq.saturating_sub(spool.first_unacked),
        bytesize::ByteSize(spool.bytes),
        upstream_text(upstream, crate::clock::now())
    )
}

/// The relay's STATUS= line.
pub fn relay_status_line(connections: usize, upstream: Option<&UpstreamStatus>) -> String {
    let mut s = format!("{connections} agent connection(s)");
    if let Some(u) = upstream {
        s.push_str(", forwarding: ");
        s.push_str(&upstream_text(Some(u), crate::clock::now()));
    }
    s
}

fn upstream_text(upstream: Option<&UpstreamStatus>, now: SystemTime) -> String {
    let Some(u) = upstream else {
        return "no upstream configured (batches stay in the spool)".to_string();
    };
    if u.connected {
        return match &u.relay_id {
            Some(id) => format!("upstream connected to relay {id:?}"),
            None => "upstream connected".to_string(),
        };
    }
    match (u.down_since, &u.last_error) {
        (Some(t), err) => {
            let secs = now.duration_since(t).unwrap_or_default().as_secs();
            match err {
                Some(e) => format!("upstream down for {secs}s: {e}"),
                None => format!("upstream down for {secs}s"),
            }
        }
        (None, _) => "upstream connecting".to_string(),
    }
}

/// The agent's pipeline is set up: READY=1, a first STATUS=, then STATUS= every
/// [`STATUS_EVERY`] and the watchdog driven by `hb` until `shutdown`.
pub fn agent_started(figures: AgentFigures, hb: Heartbeat, shutdown: CancellationToken) {
    let up = figures.upstream.as_deref().map(|u| lock(u).clone());
    status(&format!(
        "started: {} source(s); {}",
        figures.sources.len(),
        upstream_text(up.as_ref(), crate::clock::now())
    ));
    let total = |f: &AgentFigures| f.sources.iter().map(SourceCounter::events).sum::<u64>();
    // The baseline is taken before READY=1: lines read right after it count in the
    // first rate, however late the reporting task first runs.
    let mut last = (Instant::now(), total(&figures));
    ready();
    spawn_watchdog(hb, shutdown.clone());
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(STATUS_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            let now = (Instant::now(), total(&figures));
            let secs = now.0.duration_since(last.0).as_secs_f64();
            let rate = if secs > 0.0 {
                (now.1.saturating_sub(last.1) as f64 / secs).round() as u64
            } else {
                0
            };
            last = now;
            let up = figures.upstream.as_deref().map(|u| lock(u).clone());
            status(&agent_status_line(
                rate,
                &figures.spool.stats(),
                up.as_ref(),
            ));
        }
    });
}

/// Without an upstream the agent has no certificates to reload, but SIGHUP's default
/// action would kill it: `systemctl reload` must never stop log collection. (For an agent
/// run on its own, e.g. by the demo; `soclink agent` reloads its config, see crate::agent::reload.)
pub fn spawn_idle_reload(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered before READY=1 is sent, so a reload right after start is handled.
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    reloading();
                    tracing::info!("SIGHUP: no [upstream], so no certificates to reload");
                    ready();
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// The relay is bound and its store (or forwarding spool) is open: READY=1, then
/// STATUS= with the connected agents every [`STATUS_EVERY`], and the watchdog.
pub fn relay_started(
    peers: Arc<Mutex<Peers>>,
    upstream: Option<Arc<Mutex<UpstreamStatus>>>,
    hb: Heartbeat,
    shutdown: CancellationToken,
) {
    let line = move || {
        let n = lock(&peers).live.len();
        let up = upstream.as_deref().map(|u| lock(u).clone());
        relay_status_line(n, up.as_ref())
    };
    status(&line());
    ready();
    spawn_watchdog(hb, shutdown.clone());
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(STATUS_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            status(&line());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool_stats(first_unacked: u64, next_seq: u64, bytes: u64) -> SpoolStats {
        SpoolStats {
            first_unacked,
            next_seq,
            durable_seq: next_seq.saturating_sub(1),
            acked: first_unacked.saturating_sub(1),
            checkpointed: 0,
            bytes,
            segments: 1,
            oldest_unacked_age: None,
        }
    }

    #[test]
    fn status_lines() {
        let s = spool_stats(5, 8, 2048);
        assert_eq!(
            agent_status_line(120, &s, None),
            "120 lines/s, spool 3 batches (2.0 KiB) unacknowledged, no upstream configured (batches stay in the spool)"
        );
        let up = UpstreamStatus {
            connected: true,
            relay_id: Some("center".into()),
            ..UpstreamStatus::default()
        };
        assert_eq!(
            agent_status_line(0, &s, Some(&up)),
            "0 lines/s, spool 3 batches (2.0 KiB) unacknowledged, upstream connected to relay \"center\""
        );
        let now = SystemTime::now();
        let down = UpstreamStatus {
            down_since: Some(now - Duration::from_secs(42)),
            last_error: Some("connection refused".into()),
            ..UpstreamStatus::default()
        };
        assert_eq!(
            upstream_text(Some(&down), now),
            "upstream down for 42s: connection refused"
        );
        assert_eq!(
            upstream_text(Some(&UpstreamStatus::default()), now),
            "upstream connecting"
        );
        assert_eq!(relay_status_line(2, None), "2 agent connection(s)");
    }

    #[test]
    fn status_is_one_bounded_line() {
        assert_eq!(one_line("a\nb\r\0c"), "a b  c");
        assert_eq!(one_line(&"x".repeat(10_000)).len(), STATUS_MAX_CHARS);
    }

    #[test]
    fn heartbeat_ages() {
        let hb = Heartbeat::new();
        hb.beat();
        assert!(hb.age() < HEARTBEAT_STALE);
    }
}
