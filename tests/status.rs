//! `soclink status` against real processes, and the control socket against hostile
//! clients.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use common::{AgentProc, Pki, RelayProc, bin, file_source, line, upstream_toml};
use soclink::ops::control::{self, ControlError, Handler, HandlerFuture};

/// Run `soclink status` with `args`; (exit code, stdout, stderr).
fn status(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("status")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(socket: &Path) -> Option<Value> {
    let (code, out, _) = status(&["--json", "--socket", socket.to_str().unwrap()]);
    if code != 0 {
        return None;
    }
    Some(serde_json::from_str(&out).expect("status --json prints JSON"))
}

/// Poll the status at `socket` until `pred` holds.
fn wait_status(
    socket: &Path,
    what: &str,
    log: impl Fn() -> String,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(v) = status_json(socket) {
            if pred(&v) {
                return v;
            }
            last = Some(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out waiting for {what}; last status: {:#}\nlog:\n{}",
        last.unwrap_or(Value::Null),
        log()
    );
}

#[test]
fn agent_and_relay_status_follow_delivery_and_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir);
    let mut relay = RelayProc::new(dir, &pki, "relay1", "");
    relay.start();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("app.log");
    let mut text = String::new();
    let mut raw_bytes = 0u64;
    const N: u64 = 500;
    for n in 0..N {
        let l = line("st", n);
        raw_bytes += l.len() as u64;
        text.push_str(&l);
        text.push('\n');
    }
    std::fs::write(&log, &text).unwrap();
    let udp_port = common::free_port();
    let sources = format!(
        "{}\n[[source]]\nname = \"net\"\ntype = \"syslog\"\nlisten = [\"udp://127.0.0.1:{udp_port}\"]\n",
        file_source("app", &[&logs.join("*.log")], "")
    );
    let mut agent = AgentProc::new(
        dir,
        &sources,
        &upstream_toml(&pki, &relay.address(), "test-agent"),
    );
    agent.start();
    let sock = dir.join("control.sock");
    // Once the agent answers, its syslog listener is bound.
    wait_status(
        &sock,
        "the agent's control socket",
        || agent.log(),
        |_| true,
    );
    let msgs = [
        "<34>Nov 26 01:02:03 fw-01 sshd[42]: Failed password for root",
        "<13>1 2026-11-26T01:02:03Z fw-01 app - - - hello",
        "<165>Nov 26 01:02:04 fw-01 kernel: eth0 link up",
    ];
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for m in msgs {
        udp.send_to(m.as_bytes(), ("127.0.0.1", udp_port)).unwrap();
    }
    let udp_bytes: usize = msgs.iter().map(|m| m.len()).sum();

    let v = wait_status(
        &sock,
        "all lines delivered",
        || agent.log(),
        |v| {
            v["sources"][0]["lines"] == N
            && v["sources"][1]["lines"] == 3
                && v["spool"]["depth_batches"] == 0
                && v["spool"]["durable_seq"].as_u64() > Some(0)
                && v["upstream"]["connected"] == true
            // The shipper records the ack just after the spool frees the batches.
            && v["upstream"]["acked_seq"] == v["spool"]["durable_seq"]
        },
    );
    assert_eq!(v["role"], "agent");
    assert_eq!(v["id"], "test-agent");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let src = &v["sources"][0];
    assert_eq!(src["name"], "app");
    assert_eq!(src["type"], "file");
    assert_eq!(
        src["bytes"], raw_bytes,
        "bytes = line bytes without newlines"
    );
    assert_eq!(src["errors"], 0);
    assert_eq!(src["truncated"], 0);
    assert_eq!(src["files"], 1);
    assert_eq!(src["drops"], Value::Null);
    let net = &v["sources"][1];
    assert_eq!(net["name"], "net");
    assert_eq!(net["type"], "syslog");
    assert_eq!(net["bytes"], udp_bytes as u64);
    assert_eq!(net["drops"], 0);
    assert_eq!(net["parse_errors"], 0);
    assert_eq!(net["files"], Value::Null);
    assert_eq!(v["spool"]["acked_seq"], v["spool"]["durable_seq"]);
    assert_eq!(v["spool"]["full"], false);
    let up = &v["upstream"];
    assert_eq!(up["address"], relay.address());
    assert_eq!(up["relay_id"], "relay1");
    assert_eq!(up["down_since"], Value::Null);
    assert_eq!(up["last_error"], Value::Null);
    assert!(up["last_ack"].is_string(), "{up}");

    // The human table says the same.
    let (code, table, err) = status(&["--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("agent \"test-agent\""), "{table}");
    assert!(
        table.contains("  NAME  TYPE    LINES     BYTES  ERRORS  TRUNCATED  OTHER\n"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "  app   file      {N}  43.1 KiB       0          0  files=1\n"
        )),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "  net   syslog      3  {:>8}       0          0  drops=0 parse_errors=0\n",
            format!("{udp_bytes} B")
        )),
        "{table}"
    );
    assert!(table.contains("connected to relay \"relay1\""), "{table}");

    // The relay, found through its config file: the agent is connected, under its
    // certificate identity, with what it stored.
    let relay_sock = relay.dir.join("relay.sock");
    let r = wait_status(
        &relay_sock,
        "the agent at the relay",
        || relay.log(),
        |r| r["agents"][0]["streams"][0]["stored_seq"] == v["spool"]["durable_seq"],
    );
    assert_eq!(r["role"], "relay");
    assert_eq!(r["id"], "relay1");
    let conns = r["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{r:#}");
    assert_eq!(conns[0]["identity"], "test-agent");
    assert!(
        conns[0]["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(conns[0]["batches"].as_u64().unwrap() >= 1);
    let a = &r["agents"][0];
    assert_eq!(a["identity"], "test-agent");
    assert_eq!(a["connected"], true);
    assert!(a["last_seen"].is_string(), "{a}");
    assert_eq!(a["streams"][0]["stream"], "logs");
    assert!(a["stored_bytes"].as_u64().unwrap() > 0);
    assert_eq!(r["upstream"], Value::Null);
    assert_eq!(
        r["spool"],
        Value::Null,
        "a storing relay has no forwarding spool"
    );
    let (code, table, err) = status(&["-c", relay.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("relay \"relay1\""), "{table}");
    assert!(table.contains("CONNECTIONS (1)"), "{table}");
    assert!(table.contains("test-agent"), "{table}");
    assert!(table.contains("connected"), "{table}");

    // Relay gone: the agent says the link is down, since when, and why.
    relay.stop();
    let v = wait_status(
        &sock,
        "the link reported down",
        || agent.log(),
        |v| v["upstream"]["connected"] == false && v["upstream"]["last_error"].is_string(),
    );
    assert!(v["upstream"]["down_since"].is_string(), "{v:#}");
    assert!(v["upstream"]["reconnects"].as_u64().unwrap() >= 1);
    assert_eq!(
        v["upstream"]["relay_id"], "relay1",
        "the last relay seen is kept"
    );
    let (code, table, _) = status(&["-c", agent.config.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(table.contains("DOWN for"), "{table}");
    assert!(table.contains("last error"), "{table}");

    // The relay's socket is gone with it.
    let (code, _, err) = status(&["--socket", relay_sock.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not running"), "{err}");
    agent.stop();
    assert!(!sock.exists(), "the agent removes its socket when it stops");
}

#[test]
fn status_without_a_running_agent_exits_1_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("missing").join("control.sock");
    let (code, out, err) = status(&["--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert_eq!(
        err.trim(),
        format!(
            "soclink: soclink agent is not running (no control socket at {})",
            sock.display()
        )
    );
    let (code, _, err) = status(&["--json", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not running"), "{err}");
}

// ---------------------------------------------------------------------------------------
// The control socket itself
// ---------------------------------------------------------------------------------------

fn access() -> control::Access {
    control::Access {
        operator_group: "soclink-operators".into(),
    }
}

/// Echoes `status` requests; knows nothing else.
struct Echo;

impl Handler for Echo {
    fn handle(&self, req: Value, _caller: control::Caller) -> HandlerFuture<'_> {
        Box::pin(async move {
            match control::cmd_of(&req) {
                "status" => Ok(json!({"echo": req})),
                other => Err(control::unknown_command(other, &["status"])),
            }
        })
    }
}

/// Send raw bytes, half-close, return the answer line parsed.
async fn raw(sock: &Path, bytes: &[u8]) -> Value {
    let s = UnixStream::connect(sock).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let bytes = bytes.to_vec();
    // The server may answer and close before taking everything: writing can fail.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
    });
    let mut out = Vec::new();
    rd.read_to_end(&mut out).await.unwrap();
    writer.abort();
    assert_eq!(
        out.last(),
        Some(&b'\n'),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    serde_json::from_slice(&out).unwrap()
}

fn start(
    dir: &Path,
) -> (
    std::path::PathBuf,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let sock = dir.join("run").join("ctl.sock");
    let stop = CancellationToken::new();
    let st = stop.clone();
    let s2 = sock.clone();
    let h = tokio::spawn(async move {
        control::serve(&s2, access(), Arc::new(Echo), st)
            .await
            .unwrap();
    });
    (sock, stop, h)
}

async fn wait_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while UnixStream::connect(sock).await.is_err() {
        assert!(Instant::now() < deadline, "control socket did not come up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_survives_hostile_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let (sock, stop, server) = start(tmp.path());
    wait_socket(&sock).await;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    // A silent client holds a connection (and a permit) while everything else goes on.
    let silent = {
        let sock = sock.clone();
        tokio::spawn(async move {
            let mut s = UnixStream::connect(&sock).await.unwrap();
            let t = Instant::now();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            (t.elapsed(), out)
        })
    };

    // 1 MiB without a newline.
    let big = vec![b'x'; 1 << 20];
    let v = raw(&sock, &big).await;
    assert_eq!(
        v,
        json!({"ok": false, "error": "request longer than 65536 bytes"})
    );
    // 1 MiB inside a JSON string, newline at the end.
    let mut big_json = br#"{"cmd":"status","x":""#.to_vec();
    big_json.extend(std::iter::repeat_n(b'a', 1 << 20));
    big_json.extend(b"\"}\n");
    let v = raw(&sock, &big_json).await;
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("longer than"));

    let v = raw(&sock, b"{\"cmd\": \"stat\n").await;
    assert_eq!(v["ok"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("the request is not JSON"),
        "{v}"
    );
    let v = raw(&sock, b"\xff\xfe\x00garbage\n").await;
    assert_eq!(v["ok"], false);
    // Nesting deep enough to overflow a naive recursive parser's stack.
    let mut deep = vec![b'['; 60_000];
    deep.push(b'\n');
    let v = raw(&sock, &deep).await;
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().unwrap().contains("recursion limit"),
        "{v}"
    );
    let v = raw(&sock, b"[1,2,3]\n").await;
    assert_eq!(
        v,
        json!({"ok": false, "error": "the request must be a JSON object with a string \"cmd\""})
    );
    let v = raw(&sock, b"{\"cmd\": 7}\n").await;
    assert_eq!(v["ok"], false);
    let v = raw(&sock, b"\n").await;
    assert_eq!(v["ok"], false);
    let v = raw(&sock, b"").await;
    assert_eq!(v["ok"], false);
    let v = raw(&sock, b"{\"cmd\":\"self-destruct\"}\n").await;
    assert_eq!(
        v,
        json!({"ok": false, "error": "unknown command \"self-destruct\" (this soclink serves: status)"})
    );
    // A request without its newline, ended by the client closing its side, is served.
    let v = raw(&sock, b"{\"cmd\":\"status\"}").await;
    assert_eq!(v, json!({"ok": true, "data": {"echo": {"cmd": "status"}}}));

    // 100 concurrent clients, more than MAX_CLIENTS: every one gets its own answer.
    let mut clients = Vec::new();
    for i in 0..100u64 {
        let sock = sock.clone();
        clients.push(tokio::spawn(async move {
            control::request(&sock, &json!({"cmd": "status", "i": i}))
                .await
                .map(|d| d["echo"]["i"].as_u64())
        }));
    }
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.await.unwrap().unwrap(), Some(i as u64));
    }

    // The silent client is answered with a timeout error, not kept forever.
    let (took, out) = silent.await.unwrap();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v,
        json!({"ok": false, "error": "no complete request within 5s"})
    );

    // Typed client errors.
    match control::request(&sock, &json!({"cmd": "nope"})).await {
        Err(ControlError::Remote(e)) => assert!(e.starts_with("unknown command \"nope\""), "{e}"),
        other => panic!("expected Remote, got {other:?}"),
    }
    let missing = tmp.path().join("nowhere.sock");
    let e = control::request(&missing, &json!({"cmd": "status"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlError::NotRunning { path } if *path == missing),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "soclink agent is not running (no control socket at {})",
            missing.display()
        )
    );

    stop.cancel();
    server.await.unwrap();
    assert!(!sock.exists(), "the socket file is removed on shutdown");
    let e = control::request(&sock, &json!({"cmd": "status"}))
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::NotRunning { .. }), "{e:?}");
}

#[tokio::test]
async fn stale_socket_is_replaced_but_a_live_one_and_other_files_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("ctl.sock");
    // A socket left behind by a process that died: nobody listens on it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let e = control::request(&sock, &json!({"cmd": "status"}))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ControlError::NotRunning { .. }),
        "connection refused = not running: {e:?}"
    );
    let first = control::bind(&sock, "soclink-operators").await.unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(control::run(first, access(), Arc::new(Echo), stop.clone()));
    let v = control::request(&sock, &json!({"cmd": "status"}))
        .await
        .unwrap();
    assert_eq!(v, json!({"echo": {"cmd": "status"}}));

    // A second server must not steal the socket of a live one.
    let e = control::bind(&sock, "soclink-operators").await.unwrap_err();
    assert!(
        format!("{e:#}").contains("another process is serving"),
        "{e:#}"
    );
    let v = control::request(&sock, &json!({"cmd": "status"}))
        .await
        .unwrap();
    assert_eq!(v, json!({"echo": {"cmd": "status"}}));
    stop.cancel();
    server.await.unwrap();

    // Never delete a regular file that happens to sit at the path.
    let file = tmp.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let e = control::bind(&file, "soclink-operators").await.unwrap_err();
    assert!(format!("{e:#}").contains("is not a socket"), "{e:#}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[tokio::test]
async fn permission_denied_says_what_to_do() {
    // root ignores file modes: nothing to test then.
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
        == 0
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("ctl.sock");
    let l = control::bind(&sock, "soclink-operators").await.unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o000)).unwrap();
    let e = control::request(&sock, &json!({"cmd": "status"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlError::PermissionDenied { path } if *path == sock),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("run as root or as a member of group soclink")
    );
    drop(l);
}

#[test]
fn forwarding_relay_reports_its_upstream_link() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir);
    let mut top = RelayProc::new(dir, &pki, "top", "trusted_forwarders = [\"mid\"]");
    top.start();
    let mut mid = RelayProc::new(
        dir,
        &pki,
        "mid",
        &upstream_toml(&pki, &top.address(), "mid"),
    );
    mid.start();
    let mid_sock = mid.dir.join("relay.sock");
    let m = wait_status(
        &mid_sock,
        "mid connected upstream",
        || mid.log(),
        |m| m["upstream"]["connected"] == true,
    );
    assert_eq!(m["id"], "mid");
    assert_eq!(m["upstream"]["address"], top.address());
    assert_eq!(m["upstream"]["relay_id"], "top");
    assert_eq!(m["agents"], json!([]));
    assert_eq!(m["spool"]["depth_batches"], 0);
    assert_eq!(m["spool"]["full"], false);
    let t = wait_status(
        &top.dir.join("relay.sock"),
        "mid at top",
        || top.log(),
        |t| t["connections"][0]["identity"] == "mid",
    );
    assert_eq!(t["agents"][0]["identity"], "mid");
    assert_eq!(t["agents"][0]["connected"], true);
    let (code, table, err) = status(&["-c", mid.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains(&format!(
            "UPSTREAM {}\n  state       connected to relay \"top\"\n",
            top.address()
        )),
        "{table}"
    );
    assert!(
        table.contains("\nFORWARDING SPOOL\n  depth       0 batches"),
        "{table}"
    );
    top.stop();
    let m = wait_status(
        &mid_sock,
        "mid's link down",
        || mid.log(),
        |m| m["upstream"]["connected"] == false && m["upstream"]["down_since"].is_string(),
    );
    assert!(m["upstream"]["last_error"].is_string(), "{m:#}");
    mid.stop();
}

#[tokio::test]
async fn shutdown_leaves_a_successors_socket_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (sock, stop, server) = start(tmp.path());
    wait_socket(&sock).await;
    // Someone else took the path over (e.g. a new instance after ours hung).
    std::fs::remove_file(&sock).unwrap();
    let successor = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    stop.cancel();
    server.await.unwrap();
    assert!(
        sock.exists(),
        "the successor's socket must survive our shutdown"
    );
    drop(successor);
}
