//! The local control socket: how `soclink status` (and later `soclink incident …`)
//! talks to a running agent or relay.
//!
//! Protocol (a Unix stream socket, one request per connection):
//!
//! ```text
//! client → server   {"cmd":"status", ...}\n          one JSON object, ≤ 64 KiB, newline-terminated
//! server → client   {"ok":true,"data":<any JSON>}\n   or   {"ok":false,"error":"<why>"}\n
//! ```
//!
//! The server checks that the request is a JSON object with a string `cmd` and hands
//! it to a [`Handler`], which dispatches on `cmd` and answers `Err` for commands it does
//! not know: new commands (`incident declare`, …) are new match arms, not a new protocol.
//!
//! Invariants: no input makes the server panic, grow memory past
//! [`MAX_REQUEST_BYTES`] per client, or stop serving. At most [`MAX_CLIENTS`] clients
//! are served at once (the rest wait in the listen backlog), and a client that does not
//! send its request within [`READ_TIMEOUT`] is answered with an error and dropped.
//!
//! Access control is the file system's: the socket is mode 0660 and, when a group
//! `soclink` exists and the process may give the socket to it, owned by that group.
//! Under systemd the unit's `RuntimeDirectory=soclink` (mode 0750) and `User=`/`Group=`
//! make `/run/soclink` reachable only by root and the soclink group, which covers the
//! short window between `bind` and `chmod` as well.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Longest request line accepted (the newline included).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Longest response line the client accepts (a relay with many agents answers big).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// How long a client may take to send its request (and the server to take the answer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the client waits for the whole exchange.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering, input discarded so the answer is not lost to a reset.
const DRAIN_BYTES: u64 = 4 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection attempt may take to tell a live socket from a stale one.
const STALE_PROBE: Duration = Duration::from_secs(1);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 64;
/// Group given the socket when it exists.
pub const SOCKET_GROUP: &str = "soclink";

/// A boxed future, so handlers stay object-safe (`Arc<dyn Handler>`).
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, String>> + Send + 'a>>;

/// Answers control requests. `req` is a JSON object whose `cmd` is a string; an
/// implementation matches on it and answers `Err("unknown command …")` otherwise (see
/// [`unknown_command`]). `Ok(data)` becomes `{"ok":true,"data":data}`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Value) -> HandlerFuture<'_>;
}

/// The error a handler answers for a `cmd` it does not serve.
pub fn unknown_command(cmd: &str, known: &[&str]) -> String {
    format!(
        "unknown command {cmd:?} (this soclink serves: {})",
        known.join(", ")
    )
}

/// The `cmd` of a request the server already validated.
pub fn cmd_of(req: &Value) -> &str {
    req.get("cmd").and_then(Value::as_str).unwrap_or("")
}

/// Errors of [`request`]; the CLI turns each into a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("soclink agent is not running (no control socket at {})", path.display())]
    NotRunning { path: PathBuf },
    #[error(
        "permission denied on the control socket {}: run as root or as a member of group soclink",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error("the control socket did not answer within {}s", CLIENT_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Remote(String),
    #[error("control protocol error: {0}")]
    Protocol(String),
}

/// Send one request and return the `data` of a successful answer.
pub async fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    match tokio::time::timeout(CLIENT_TIMEOUT, exchange(path, req)).await {
        Ok(r) => r,
        Err(_) => Err(ControlError::Timeout),
    }
}

/// [`request`] from synchronous CLI code, on a small runtime of its own.
pub fn request_blocking(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ControlError::Protocol(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(request(path, req))
}

async fn exchange(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => ControlError::NotRunning {
                path: path.to_path_buf(),
            },
            ErrorKind::PermissionDenied => ControlError::PermissionDenied {
                path: path.to_path_buf(),
            },
            _ => ControlError::Protocol(format!("cannot connect to {}: {e}", path.display())),
        })?;
    let mut line =
        serde_json::to_vec(req).map_err(|e| ControlError::Protocol(format!("request: {e}")))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| ControlError::Protocol(format!("cannot send the request: {e}")))?;
    let mut buf = Vec::new();
    let mut rd = BufReader::new(stream).take(MAX_RESPONSE_BYTES as u64 + 1);
    rd.read_until(b'\n', &mut buf)
        .await
        .map_err(|e| ControlError::Protocol(format!("cannot read the answer: {e}")))?;
    if buf.len() > MAX_RESPONSE_BYTES {
        return Err(ControlError::Protocol(format!(
            "the answer is longer than {MAX_RESPONSE_BYTES} bytes"
        )));
    }
    if buf.is_empty() {
        return Err(ControlError::Protocol(
            "the server closed the connection without answering".into(),
        ));
    }
    let resp: Value = serde_json::from_slice(&buf)
        .map_err(|e| ControlError::Protocol(format!("the answer is not JSON: {e}")))?;
    match resp.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(resp.get("data").cloned().unwrap_or(Value::Null)),
        Some(false) => Err(ControlError::Remote(
            resp.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unspecified error")
                .to_string(),
        )),
        None => Err(ControlError::Protocol(
            "the answer has no \"ok\" field".into(),
        )),
    }
}

/// Bind the control socket at `path` and serve `handler` until `shutdown`; then remove
/// the socket file. Fails if the socket cannot be bound or another process answers on it.
pub async fn serve(
    path: &Path,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) -> Result<()> {
    let listener = bind(path).await?;
    let ours = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .ok();
    tracing::info!("control socket listening on {}", path.display());
    run(listener, handler, shutdown).await;
    // Only remove what is still our socket: a successor may have replaced it already.
    let now = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .ok();
    if ours.is_some() && now == ours {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// [`serve`] on a task; a failure is logged, not fatal (collecting logs matters more
/// than being able to show their status).
/// The task ends once the socket is closed and removed, so awaiting it lets a successor
/// (the agent's next generation after a reload) bind the same path.
pub fn spawn(
    path: PathBuf,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = serve(&path, handler, shutdown).await {
            tracing::error!("control socket disabled (`soclink status` will not work): {e:#}");
        }
    })
}

/// Create the socket: parent directory, stale-file removal, bind, mode, group.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let probe = tokio::time::timeout(STALE_PROBE, UnixStream::connect(path)).await;
            match probe {
                // Refused: a socket left by a process that died without cleaning up.
                Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove the stale socket {}", path.display())
                    })?
                }
                Ok(Err(e)) => {
                    return Err(e).with_context(|| {
                        format!("cannot check whether {} is in use", path.display())
                    });
                }
                // Accepted, or a listener too busy to accept: someone is there.
                Ok(Ok(_)) | Err(_) => bail!(
                    "another process is serving the control socket {} (is soclink already running?)",
                    path.display()
                ),
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot inspect {}", path.display()));
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    if let Some(gid) = group_id(SOCKET_GROUP) {
        // Fails unless we are root or a member of the group; the runtime directory's
        // ownership (systemd) is the fallback, so this is only worth a debug line.
        if let Err(e) = std::os::unix::fs::chown(path, None, Some(gid)) {
            tracing::debug!(
                "cannot give {} to group {SOCKET_GROUP}: {e}",
                path.display()
            );
        }
    }
    Ok(listener)
}

/// The gid of `name` from /etc/group (no libc: the crate forbids unsafe code).
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != name {
            return None;
        }
        f.next()?;
        f.next()?.parse().ok()
    })
}

/// Serve an already-bound listener until `shutdown` (tests drive this directly).
pub async fn run(listener: UnixListener, handler: Arc<dyn Handler>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        // A permit before accepting: past MAX_CLIENTS, clients wait in the backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            connection(stream, handler).await;
        });
    }
}

async fn connection(stream: UnixStream, handler: Arc<dyn Handler>) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    let answer = match tokio::time::timeout(READ_TIMEOUT, rd.read_until(b'\n', &mut line)).await {
        Err(_) => Err(format!(
            "no complete request within {}s",
            READ_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("cannot read the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => {
            Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(Ok(_)) => match parse_request(&line) {
            Ok(req) => handler.handle(req).await,
            Err(e) => Err(e),
        },
    };
    let resp = match answer {
        Ok(data) => json!({"ok": true, "data": data}),
        Err(error) => json!({"ok": false, "error": error}),
    };
    let mut out = serde_json::to_vec(&resp)
        .unwrap_or_else(|_| br#"{"ok":false,"error":"cannot encode the answer"}"#.to_vec());
    out.push(b'\n');
    // The client may be gone or stuck; neither may hold a permit forever.
    let sent = tokio::time::timeout(READ_TIMEOUT, async {
        wr.write_all(&out).await?;
        wr.shutdown().await
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        // Closing a Unix socket with unread input resets the connection, and the client
        // may then lose the answer it has not read yet: discard what it still sends
        // (an over-long request), within a bound.
        let mut rest = rd.into_inner();
        let mut sink = tokio::io::sink();
        let _ = tokio::time::timeout(
            DRAIN_TIMEOUT,
            tokio::io::copy(&mut (&mut rest).take(DRAIN_BYTES), &mut sink),
        )
        .await;
    }
}

pub(crate) fn parse_request(line: &[u8]) -> Result<Value, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err("empty request: send one JSON object such as {\"cmd\":\"status\"}".into());
    }
    let req: Value =
        serde_json::from_slice(line).map_err(|e| format!("the request is not JSON: {e}"))?;
    match req.get("cmd") {
        Some(Value::String(_)) => Ok(req),
        _ => Err("the request must be a JSON object with a string \"cmd\"".into()),
    }
}
