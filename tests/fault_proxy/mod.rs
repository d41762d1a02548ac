//! A TCP fault proxy for integration tests: it sits between an agent and a relay on
//! loopback and forwards bytes both ways, unless told to misbehave. The mode can be
//! switched at any moment from the test thread and applies to open connections and
//! new ones alike. The proxy never looks inside the (TLS) bytes it forwards.
//!
//! Modes ([`Mode`]): pass, stall (forward nothing either way, read nothing, so the
//! sender's socket buffers fill), half-open (read and discard client→relay bytes, send
//! nothing back, keep both sockets open), slow reader (client→relay bytes trickle at a
//! few bytes per 100 ms), added latency (each chunk waits before it is forwarded), and
//! partition (new connections are reset at once). [`FaultProxy::reset_all`] resets
//! every open connection (RST, not FIN), which [`FaultProxy::set`] also does on
//! entering a partition.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with the bytes it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Stop forwarding in both directions (and stop reading: TCP backpressure).
    Stall,
    /// Swallow client→relay bytes silently; nothing comes back; sockets stay open.
    HalfOpen,
    /// Forward client→relay at most `SLOW_BYTES` per 100 ms.
    SlowReader,
    /// Delay every forwarded chunk by this much (both directions).
    Latency(Duration),
    /// Reset new connections on accept (entering it also resets the open ones).
    Partition,
}

/// Bytes let through per 100 ms by [`Mode::SlowReader`].
pub const SLOW_BYTES: usize = 16;

pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Cancelled (and replaced) to reset every connection open at that moment.
    generation: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicU64>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream.parse().expect("upstream is ip:port");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Pass);
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let (m, g, a, s) = (
            mode.clone(),
            generation.clone(),
            accepted.clone(),
            shutdown.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    accept_loop(listener, upstream, m, g, a, s).await;
                });
            })
            .unwrap();
        FaultProxy {
            addr,
            mode,
            generation,
            accepted,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Switch mode; open connections follow at once.
    pub fn set(&self, mode: Mode) {
        eprintln!("fault proxy: {mode:?}");
        self.mode.send_replace(mode);
        if mode == Mode::Partition {
            self.reset_all();
        }
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Reset (RST) every connection open now; later ones are unaffected.
    pub fn reset_all(&self) {
        let mut g = self.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    /// Client connections accepted so far (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.reset_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    generation: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (client, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => break,
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_zero_linger();
        if *mode.borrow() == Mode::Partition {
            drop(client); // zero linger: the client sees a reset
            continue;
        }
        let kill = generation.lock().unwrap().clone();
        let rx = mode.subscribe();
        conns.spawn(async move {
            let Ok(Ok(relay)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
            else {
                return; // relay down: the client sees a reset
            };
            let _ = relay.set_zero_linger();
            let _ = relay.set_nodelay(true);
            let _ = client.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (rr, rw) = relay.into_split();
            let up = pump(cr, rw, rx.clone(), true, kill.clone());
            let down = pump(rr, cw, rx, false, kill.clone());
            let (a, b) = tokio::join!(up, down);
            // Reset or shutdown: drop without FIN so the peers see RST.
            for w in [a, b].into_iter().flatten() {
                w.forget();
            }
        });
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
}

/// One direction of one connection. Returns the write half when the connection was
/// reset (to be dropped without a FIN), None after an orderly end.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    client_to_relay: bool,
    kill: CancellationToken,
) -> Option<OwnedWriteHalf> {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        // Wait until this direction may read at all.
        loop {
            let m = *mode.borrow_and_update();
            let blocked = match m {
                Mode::Stall => true,
                Mode::HalfOpen => !client_to_relay,
                _ => false,
            };
            if !blocked {
                break;
            }
            tokio::select! {
                r = mode.changed() => if r.is_err() { return Some(to) },
                _ = kill.cancelled() => return Some(to),
            }
        }
        let m = *mode.borrow();
        let want = if m == Mode::SlowReader && client_to_relay {
            SLOW_BYTES
        } else {
            buf.len()
        };
        let n = tokio::select! {
            r = from.read(&mut buf[..want]) => match r {
                Ok(0) | Err(_) => {
                    // Half-open hides the end of the connection as well.
                    if *mode.borrow() == Mode::HalfOpen {
                        kill.cancelled().await;
                        return Some(to);
                    }
                    let _ = to.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            },
            _ = mode.changed() => continue,
            _ = kill.cancelled() => return Some(to),
        };
        // Deliver the chunk as the mode is now (it may have changed meanwhile).
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::Pass | Mode::SlowReader | Mode::Partition => break,
                Mode::Latency(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => break,
                        _ = kill.cancelled() => return Some(to),
                    }
                }
                Mode::HalfOpen if client_to_relay => {
                    // Swallowed: the client believes it was sent.
                    break;
                }
                Mode::Stall | Mode::HalfOpen => {
                    tokio::select! {
                        r = mode.changed() => if r.is_err() { return Some(to) },
                        _ = kill.cancelled() => return Some(to),
                    }
                }
            }
        }
        if *mode.borrow() == Mode::HalfOpen && client_to_relay {
            continue;
        }
        tokio::select! {
            r = to.write_all(&buf[..n]) => if r.is_err() { return Some(to) },
            _ = kill.cancelled() => return Some(to),
        }
        if *mode.borrow() == Mode::SlowReader && client_to_relay {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = kill.cancelled() => return Some(to),
            }
        }
    }
}
