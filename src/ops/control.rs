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
//! [`MAX_REQUEST_BYTES`] per client, or stop serving. At most [`MAX_CLIENTS_PER_USER`]
//! clients of one Unix user and [`MAX_CLIENTS`] in all are served at once; past either
//! bound a client is answered `{"ok":false,"busy":true,...}` at once (never left waiting
//! in the backlog, so a flood of half-open clients of one user cannot make another
//! user's `status` or `incident declare` time out). A client that does not send its
//! request within [`READ_TIMEOUT`] is answered with an error and dropped.
//!
//! Access control, in two layers:
//! - the file system: the socket is mode 0660, owned by the operator group
//!   (`operator_group`, default `soclink-operators`) when it exists and the process may
//!   give the socket to it;
//! - the kernel's word on the caller (`SO_PEERCRED`): root, the service's own user, and
//!   members of the operator group (primary or supplementary, through NSS) are served;
//!   anyone else is refused with a message naming the user and the group, whatever the
//!   socket's mode.
//!
//! Every request served is recorded as a [`ControlAction`] (who, what, the outcome) in
//! the service's log: `status` at debug level, every other command at info.

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
/// Clients served at once, all users together.
pub const MAX_CLIENTS: usize = 256;
/// Clients of one Unix user served at once.
pub const MAX_CLIENTS_PER_USER: usize = 16;

/// A boxed future, so handlers stay object-safe (`Arc<dyn Handler>`).
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, String>> + Send + 'a>>;

/// Answers control requests. `req` is a JSON object whose `cmd` is a string; an
/// implementation matches on it and answers `Err("unknown command …")` otherwise (see
/// [`unknown_command`]). `Ok(data)` becomes `{"ok":true,"data":data}`. `caller` is who
/// sent it, already checked against the [`Access`] policy.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Value, caller: Caller) -> HandlerFuture<'_>;
}

/// Who is on the other end of a control connection, as the kernel says (SO_PEERCRED).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The user name (NSS), or the uid as a number when it has none.
    pub user: String,
}

/// One request served on a control socket: the typed audit record (logged today;
/// shipped as an audit event by a later issue).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControlAction {
    #[serde(with = "crate::incident::record::rfc3339")]
    pub at: std::time::SystemTime,
    pub cmd: String,
    pub caller: Caller,
    /// `None`: served; `Some(reason)`: answered with an error.
    pub error: Option<String>,
}

impl ControlAction {
    fn log(&self) {
        let outcome = self.error.as_deref().unwrap_or("ok");
        if self.cmd == "status" {
            tracing::debug!(target: "soclink::audit", cmd = %self.cmd, user = %self.caller.user, uid = self.caller.uid, pid = ?self.caller.pid, outcome, "control action");
        } else {
            tracing::info!(target: "soclink::audit", cmd = %self.cmd, user = %self.caller.user, uid = self.caller.uid, pid = ?self.caller.pid, outcome, "control action: {} by {} (uid {})", self.cmd, self.caller.user, self.caller.uid);
        }
    }
}

/// Who may use a control socket: root, the process's own user, and the members of
/// `operator_group`.
#[derive(Debug, Clone)]
pub struct Access {
    pub operator_group: String,
}

impl Access {
    /// Check `caller` (blocking: NSS may ask a directory service).
    fn check(&self, caller: &Caller) -> Result<(), String> {
        use nix::unistd::{Gid, Group, Uid, User, geteuid, getgrouplist};
        if caller.uid == 0 || Uid::from_raw(caller.uid) == geteuid() {
            return Ok(());
        }
        let group = Group::from_name(&self.operator_group).ok().flatten();
        let Some(group) = group else {
            return Err(format!(
                "permission denied: user {} (uid {}) may not use this socket: only root and the service's user may, because the operator group {:?} does not exist (create it and add the user: see docs/OPERATIONS.md)",
                caller.user, caller.uid, self.operator_group
            ));
        };
        if Gid::from_raw(caller.gid) == group.gid {
            return Ok(());
        }
        let member = User::from_uid(Uid::from_raw(caller.uid))
            .ok()
            .flatten()
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name).ok()?;
                getgrouplist(&name, u.gid).ok()
            })
            .is_some_and(|groups| groups.contains(&group.gid));
        if member {
            Ok(())
        } else {
            Err(format!(
                "permission denied: user {} (uid {}) is not in the operator group {:?} (add it with `usermod -aG {} {}` and log in again)",
                caller.user, caller.uid, self.operator_group, self.operator_group, caller.user
            ))
        }
    }
}

/// The caller of a connected stream (blocking: the user name comes from NSS).
fn caller_of(cred: &tokio::net::unix::UCred) -> Caller {
    let uid = cred.uid();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    Caller {
        uid,
        gid: cred.gid(),
        pid: cred.pid(),
        user,
    }
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
        "permission denied on the control socket {}: run as root or as a member of the operator group (soclink-operators unless operator_group says otherwise)",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error("the control socket did not answer within {}s", CLIENT_TIMEOUT.as_secs())]
    Timeout,
    #[error("the control socket is busy: {0}")]
    Busy(String),
    #[error("{0}")]
    Remote(String),
    #[error("control protocol error: {0}")]
    Protocol(String),
}

/// Send one request and return the `data` of a successful answer. A `busy` answer is
/// retried, with a short growing pause, until [`CLIENT_TIMEOUT`]; then it is the error.
pub async fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        let left = CLIENT_TIMEOUT.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, exchange(path, req)).await {
            Err(_) => return Err(ControlError::Timeout),
            Ok(Err(ControlError::Busy(why))) => {
                if started.elapsed() + pause >= CLIENT_TIMEOUT {
                    return Err(ControlError::Busy(why));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Ok(r) => return r,
        }
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
    // A server that answers without reading (busy) may have closed already: its
    // answer is still there to read, so a failed write is only reported without one.
    let sent = stream.write_all(&line).await;
    let mut buf = Vec::new();
    let mut rd = BufReader::new(stream).take(MAX_RESPONSE_BYTES as u64 + 1);
    let read = rd.read_until(b'\n', &mut buf).await;
    if buf.is_empty()
        && let Err(e) = sent
    {
        return Err(ControlError::Protocol(format!(
            "cannot send the request: {e}"
        )));
    }
    read.map_err(|e| ControlError::Protocol(format!("cannot read the answer: {e}")))?;
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
    let error = || {
        resp.get("error")
            .and_then(Value::as_str)
            .unwrap_or("unspecified error")
            .to_string()
    };
    match resp.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(resp.get("data").cloned().unwrap_or(Value::Null)),
        Some(false) if resp.get("busy").and_then(Value::as_bool) == Some(true) => {
            Err(ControlError::Busy(error()))
        }
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
    access: Access,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) -> Result<()> {
    let listener = bind(path, &access.operator_group).await?;
    let ours = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .ok();
    tracing::info!(
        "control socket listening on {} (root, this service's user and group {:?})",
        path.display(),
        access.operator_group
    );
    run(listener, access, handler, shutdown).await;
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
    access: Access,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = serve(&path, access, handler, shutdown).await {
            tracing::error!("control socket disabled (`soclink status` will not work): {e:#}");
        }
    })
}

/// Create the socket: parent directory, stale-file removal, bind, mode, group.
pub async fn bind(path: &Path, group: &str) -> Result<UnixListener> {
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
    match nix::unistd::Group::from_name(group).ok().flatten() {
        // Fails unless we are root or a member of the group (the units add the service
        // to it); the peer check below still lets root and the service's user in.
        Some(g) => {
            if let Err(e) = std::os::unix::fs::chown(path, None, Some(g.gid.as_raw())) {
                tracing::warn!(
                    "cannot give {} to the operator group {group}: {e}; only root and this service's user can use it",
                    path.display()
                );
            }
        }
        None => tracing::debug!(
            "no group {group}: the control socket {} serves root and this service's user only",
            path.display()
        ),
    }
    Ok(listener)
}

/// Serve an already-bound listener until `shutdown` (tests drive this directly).
pub async fn run(
    listener: UnixListener,
    access: Access,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) {
    let all = Arc::new(Semaphore::new(MAX_CLIENTS));
    let per_user: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>> = Arc::default();
    let access = Arc::new(access);
    loop {
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
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control socket: cannot tell who connected ({e}); closing");
                continue;
            }
        };
        let uid = cred.uid();
        // Past a bound, answer busy at once: the client says so instead of timing out.
        let Ok(permit) = all.clone().try_acquire_owned() else {
            tokio::spawn(busy(stream, "too many clients"));
            continue;
        };
        let slot = {
            let mut m = crate::util::lock(&per_user);
            let n = m.entry(uid).or_insert(0);
            if *n >= MAX_CLIENTS_PER_USER {
                None
            } else {
                *n += 1;
                Some(UserSlot {
                    uid,
                    map: per_user.clone(),
                })
            }
        };
        let Some(slot) = slot else {
            tokio::spawn(busy(stream, "too many clients of this user"));
            continue;
        };
        let (handler, access) = (handler.clone(), access.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            connection(stream, cred, access, handler).await;
        });
    }
}

/// A client of one user being served; frees its place when dropped.
struct UserSlot {
    uid: u32,
    map: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut m = crate::util::lock(&self.map);
        if let Some(n) = m.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// Answer `busy` without reading the request.
async fn busy(mut stream: UnixStream, why: &str) {
    let resp = json!({"ok": false, "busy": true, "error": format!("{why} at once ({MAX_CLIENTS_PER_USER} per user, {MAX_CLIENTS} in all); retry in a moment")});
    let mut out = resp.to_string().into_bytes();
    out.push(b'\n');
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

async fn connection(
    stream: UnixStream,
    cred: tokio::net::unix::UCred,
    access: Arc<Access>,
    handler: Arc<dyn Handler>,
) {
    let checked = tokio::task::spawn_blocking(move || {
        let caller = caller_of(&cred);
        let allowed = access.check(&caller);
        (caller, allowed)
    })
    .await;
    let Ok((caller, allowed)) = checked else {
        return;
    };
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
            Ok(req) => {
                let cmd = cmd_of(&req).chars().take(64).collect::<String>();
                let answer = match &allowed {
                    Ok(()) => handler.handle(req, caller.clone()).await,
                    Err(e) => Err(e.clone()),
                };
                ControlAction {
                    at: crate::clock::now(),
                    cmd,
                    caller: caller.clone(),
                    error: answer.as_ref().err().cloned(),
                }
                .log();
                answer
            }
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
