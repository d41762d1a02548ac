//! More hostile input against a running relay (and a running agent's syslog listener),
//! one test per class of issue 10 item 5 that `relay_hostile.rs` does not cover: frame
//! lengths, truncation and trailing garbage; concatenated gzip members; nested and
//! type-confused JSON; NUL and invalid UTF-8 in every header field; path traversal in
//! names; 10,000 dropped connections; CRL expiry; odd client certificates; oversized
//! syslog. Each checks the specific refusal, that the relay stays up with bounded
//! memory, and that a witness agent delivers every line exactly once meanwhile.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use soclink::certs::{CertKind, IssueParams};
use soclink::protocol::{ErrorCode, Frame};
use tokio::io::AsyncWriteExt;

/// A relay, a witness agent delivering to it, and a certificate for the attacker
/// (identity `hostile`).
struct Rig {
    dir: tempfile::TempDir,
    pki: Pki,
    relay: RelayProc,
    witness: Witness,
    rss0: u64,
    cfg: Arc<rustls::ClientConfig>,
    rt: tokio::runtime::Runtime,
}

impl Rig {
    fn new(relay_extra: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let mut relay = RelayProc::new(dir.path(), &pki, "relay", relay_extra);
        relay.start();
        let mut witness = Witness::start(dir.path(), &pki, &relay);
        witness.write(200);
        witness.check(&relay);
        let rss0 = proc_kib(relay.pid(), "VmRSS");
        let (c, k) = pki.issue("hostile", CertKind::Client);
        let cfg = client_config(&pki, &c, &k);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Rig {
            dir,
            pki,
            relay,
            witness,
            rss0,
            cfg,
            rt,
        }
    }

    /// Sends `bytes` after Hello and returns every frame the relay sends back until it
    /// closes (the attack's visible refusal).
    fn send(&self, bytes: &[u8]) -> Vec<Frame> {
        let addr = self.relay.address();
        self.rt.block_on(async {
            let s = tls_connect(&addr, self.cfg.clone()).await.unwrap();
            exchange(s, bytes, false).await
        })
    }

    /// The one error frame the relay answered `bytes` with.
    fn refusal(&self, bytes: &[u8]) -> (ErrorCode, String) {
        let frames = self.send(bytes);
        match frames.last() {
            Some(Frame::Error(e)) => (e.code, e.message.clone()),
            other => panic!("expected an Error frame, got {other:?} (all: {frames:?})"),
        }
    }

    /// Witness still delivers exactly once, the relay runs, its peak memory stayed
    /// within `growth_mib` of the start; then stop everything.
    fn finish(mut self, growth_mib: u64) {
        self.witness.write(300);
        self.witness.check(&self.relay);
        assert!(
            self.relay
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
                .is_none(),
            "relay must still run:\n{}",
            self.relay.log()
        );
        let hwm = proc_kib(self.relay.pid(), "VmHWM");
        assert!(
            hwm < self.rss0 + growth_mib * 1024,
            "relay peak memory {hwm} KiB, started at {} KiB",
            self.rss0
        );
        self.witness.agent.stop();
        self.relay.stop();
    }
}

/// Writes `bytes` and collects the answers until an Error frame (or an Ack, if
/// `until_ack`), or until the relay closes.
async fn exchange(
    mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    bytes: &[u8],
    until_ack: bool,
) -> Vec<Frame> {
    // The relay may close before reading everything: a failed write is part of the test.
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut frames = Vec::new();
    let deadline = Duration::from_secs(15);
    while let Ok(Ok(f)) = tokio::time::timeout(
        deadline,
        soclink::protocol::read_frame(&mut s, &Default::default()),
    )
    .await
    {
        let stop = matches!(f, Frame::Error(_)) || (until_ack && matches!(f, Frame::Ack(_)));
        frames.push(f);
        if stop {
            break;
        }
    }
    frames
}

fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut v = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    v.push(ty);
    v.extend_from_slice(body);
    v
}

fn batch_frame(header_json: &[u8], gzip: &[u8]) -> Vec<u8> {
    let mut body = (header_json.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(header_json);
    body.extend_from_slice(gzip);
    frame(0x10, &body)
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

const NDJSON: &[u8] = b"{\"message\":\"hostile line\"}\n";

/// A well-formed header as JSON, for tests to break one field of.
fn header(seq: u64, source: &str) -> serde_json::Value {
    serde_json::json!({
        "stream": "logs", "seq": seq, "source": source, "day": "2026-11-26",
        "events": 1, "raw_bytes": NDJSON.len(),
    })
}

fn good_batch(seq: u64, source: &str) -> Vec<u8> {
    batch_frame(header(seq, source).to_string().as_bytes(), &gz(NDJSON))
}

#[test]
fn frame_lengths_truncation_and_garbage_after_a_valid_frame() {
    let rig = Rig::new("");
    for (bytes, want) in [
        // 4 GiB, and "negative" if read as i32.
        (vec![0xff, 0xff, 0xff, 0xff, 0x10], "exceeds the limit"),
        (vec![0x80, 0, 0, 0, 0x20], "exceeds the limit"),
        (vec![0, 0, 0, 0, 0x20], "length 0"),
        (vec![0, 0, 0, 9, 0xee], "unknown frame type byte 0xee"),
        // A Batch whose header length runs past the frame.
        (frame(0x10, &[0xff, 0xff, 0xff, 0xf0, b'{']), "header"),
    ] {
        let (code, msg) = rig.refusal(&bytes);
        assert_eq!(code, ErrorCode::ProtocolViolation, "{msg}");
        assert!(msg.contains(want), "{bytes:02x?}: {msg}");
    }
    // Truncated: a Ping that promises 100 bytes, sends 10, then closes its side.
    let addr = rig.relay.address();
    let frames = rig.rt.block_on(async {
        let mut s = tls_connect(&addr, rig.cfg.clone()).await.unwrap();
        s.write_all(&[0, 0, 0, 101, 0x20]).await.unwrap();
        s.write_all(&[7; 10]).await.unwrap();
        s.shutdown().await.unwrap();
        exchange(s, &[], false).await
    });
    match frames.last() {
        Some(Frame::Error(e)) => assert!(e.message.contains("truncated"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    // A valid batch with garbage right behind it in the same write: the batch is
    // stored and acknowledged, then the garbage is refused.
    let mut bytes = good_batch(1, "garbage");
    bytes.extend_from_slice(b"\x00\x00\x00\x09\xeeGARBAGE!");
    let frames = rig.send(&bytes);
    assert!(
        matches!(&frames[..], [Frame::Ack(a), Frame::Error(e)]
            if a.seq == 1 && e.message.contains("unknown frame type")),
        "{frames:?}"
    );
    let evs = rig.relay.events("hostile");
    assert_exactly_once(&evs, &[b"hostile line".to_vec()]);
    rig.finish(64);
}

#[test]
fn concatenated_gzip_member_bombs_are_refused() {
    let rig = Rig::new("");
    let first = gz(NDJSON);
    // A valid member followed by one inflating to 256 MiB.
    let mut bomb = first.clone();
    {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![b'{'; 1 << 20];
        for _ in 0..256 {
            e.write_all(&zeros).unwrap();
        }
        bomb.extend_from_slice(&e.finish().unwrap());
    }
    // A valid member followed by 20,000 empty members.
    let mut many = first.clone();
    let empty = gz(b"");
    for _ in 0..20_000 {
        many.extend_from_slice(&empty);
    }
    let h = header(1, "bomb").to_string();
    for payload in [&bomb, &many] {
        let (code, msg) = rig.refusal(&batch_frame(h.as_bytes(), payload));
        assert_eq!(code, ErrorCode::BatchRejected, "{msg}");
        assert!(msg.contains("after the gzip member"), "{msg}");
    }
    // One member declaring 1 TiB of raw bytes is refused before inflating.
    let mut big = header(1, "bomb");
    big["raw_bytes"] = serde_json::json!(1u64 << 40);
    let (code, msg) = rig.refusal(&batch_frame(big.to_string().as_bytes(), &first));
    assert_eq!(code, ErrorCode::BatchRejected, "{msg}");
    assert!(msg.contains("more than the limit"), "{msg}");
    assert!(rig.relay.events("hostile").is_empty());
    assert!(rig.relay.log().contains("after the gzip member"));
    rig.finish(128);
}

#[test]
fn deeply_nested_and_type_confused_json_is_refused() {
    let rig = Rig::new("");
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // Hello: 100,000 levels deep must not overflow the relay's stack.
    let addr = rig.relay.address();
    let deep_hello = format!(
        "{{\"versions\":[1],\"agent_version\":\"x\",\"streams\":{}}}",
        nested(100_000)
    );
    let frames = rig.rt.block_on(async {
        let s = tls_open(&addr, rig.cfg.clone()).await;
        exchange(s, &frame(0x01, deep_hello.as_bytes()), false).await
    });
    assert!(frames.is_empty(), "{frames:?}");
    // Batch headers: nested, wrong types, out of range, not an object.
    let confused = [
        format!("{{\"stream\":{}}}", nested(100_000)),
        r#"{"stream":1,"seq":1,"source":"s","day":"2026-11-26","events":1,"raw_bytes":1}"#.into(),
        r#"{"stream":"l","seq":"1","source":"s","day":"2026-11-26","events":1,"raw_bytes":1}"#.into(),
        r#"{"stream":"l","seq":-1,"source":"s","day":"2026-11-26","events":1,"raw_bytes":1}"#.into(),
        r#"{"stream":"l","seq":1,"source":"s","day":"2026-11-26","events":1e99,"raw_bytes":1}"#.into(),
        r#"{"stream":"l","seq":1,"source":"s","day":"2026-11-26","events":1,"raw_bytes":18446744073709551616}"#.into(),
        r#"{"stream":"l","seq":1,"source":"s","day":20261126,"events":1,"raw_bytes":1}"#.into(),
        r#"{"stream":"l","seq":1,"source":"s","day":"2026-11-26","events":1,"raw_bytes":1,"origin":"x"}"#.into(),
        r#"{"stream":"l","seq":1,"source":"s","day":"2026-11-26","events":1,"raw_bytes":1,"item":[1]}"#.into(),
        "[]".into(),
        "null".into(),
    ];
    for h in &confused {
        let (code, msg) = rig.refusal(&batch_frame(h.as_bytes(), &gz(NDJSON)));
        assert_eq!(code, ErrorCode::ProtocolViolation, "{msg}");
        assert!(
            msg.contains("malformed Batch frame"),
            "{}: {msg}",
            &h[..h.len().min(80)]
        );
    }
    // NDJSON lines: valid JSON that is not an object is refused; an object nested
    // 10,000 deep is valid JSON, checked without recursion, and stored as sent.
    let line = "[\"type\",\"confused\"]\n";
    let mut h = header(1, "json");
    h["raw_bytes"] = serde_json::json!(line.len());
    let (code, msg) = rig.refusal(&batch_frame(h.to_string().as_bytes(), &gz(line.as_bytes())));
    assert_eq!(code, ErrorCode::BatchRejected, "{msg}");
    assert!(msg.contains("not a JSON object"), "{msg}");
    let deep = format!("{}1{}\n", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    h["raw_bytes"] = serde_json::json!(deep.len());
    let addr = rig.relay.address();
    let frames = rig.rt.block_on(async {
        let s = tls_connect(&addr, rig.cfg.clone()).await.unwrap();
        exchange(
            s,
            &batch_frame(h.to_string().as_bytes(), &gz(deep.as_bytes())),
            true,
        )
        .await
    });
    assert!(
        matches!(&frames[..], [Frame::Ack(a)] if a.seq == 1),
        "{frames:?}"
    );
    assert!(rig.relay.log().contains("bad Hello"));
    rig.finish(64);
}

/// TLS and nothing else: for tests that send their own Hello.
async fn tls_open(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

#[test]
fn nul_and_invalid_utf8_in_every_header_field_are_refused() {
    let rig = Rig::new("");
    let base = header(1, "s");
    let chunk = serde_json::json!({"offset":0,"total":1,"sha256":"0".repeat(64)});
    // (where the bad string goes, the JSON with a marker to replace)
    let mut cases: Vec<(&str, serde_json::Value)> = Vec::new();
    for field in ["stream", "source", "day"] {
        let mut h = base.clone();
        h[field] = "MARK".into();
        cases.push((field, h));
    }
    for field in ["agent", "stream"] {
        let mut h = base.clone();
        h["origin"] = serde_json::json!({"agent":"a","stream":"s","seq":1});
        h["origin"][field] = "MARK".into();
        cases.push((field, h));
    }
    for kind in ["incident_record", "incident_report"] {
        let mut h = base.clone();
        h["item"] = serde_json::json!({"type": kind, "incident": "MARK"});
        cases.push((kind, h));
    }
    let mut h = base.clone();
    h["item"] = chunk.clone();
    h["item"]["type"] = "intel_chunk".into();
    h["item"]["name"] = "MARK".into();
    cases.push(("intel name", h));
    for (what, h) in &cases {
        let text = h.to_string();
        for bad in [&b"a\\u0000b"[..], b"a\xffb", b"a\xc0\xafb", b"a\\nb"] {
            let mut json = Vec::new();
            let (pre, post) = text.split_once("MARK").unwrap();
            json.extend_from_slice(pre.as_bytes());
            json.extend_from_slice(bad);
            json.extend_from_slice(post.as_bytes());
            let (code, msg) = rig.refusal(&batch_frame(&json, &gz(NDJSON)));
            assert_eq!(code, ErrorCode::ProtocolViolation, "{what}: {msg}");
            assert!(msg.contains("malformed Batch frame"), "{what}: {msg}");
        }
    }
    // Hello fields: a stream with NUL, and an agent_version that would forge a line
    // in the relay's log.
    let addr = rig.relay.address();
    for hello in [
        &br#"{"versions":[1],"agent_version":"x","streams":["a\u0000"]}"#[..],
        br#"{"versions":[1],"agent_version":"x","streams":["a\xff"]}"#,
        br#"{"versions":[1],"agent_version":"1.0\nERROR FORGED relay shutting down","streams":[]}"#,
    ] {
        let frames = rig.rt.block_on(async {
            let s = tls_open(&addr, rig.cfg.clone()).await;
            exchange(s, &frame(0x01, hello), false).await
        });
        assert!(frames.is_empty(), "{frames:?}");
    }
    let log = rig.relay.log();
    assert!(
        !log.lines().any(|l| l.starts_with("ERROR FORGED")),
        "a Hello forged a relay log line:\n{log}"
    );
    assert_eq!(log.matches("bad Hello").count(), 3, "{log}");
    assert!(rig.relay.events("hostile").is_empty());
    rig.finish(64);
}

#[test]
fn path_traversal_reserved_and_odd_names() {
    let rig = Rig::new("");
    let long = "x".repeat(129);
    // Refused as a source, an incident id or an intel item name.
    let mut refused = Vec::new();
    for bad in [
        "..",
        ".",
        "/etc/passwd",
        "a/b",
        "..\\..\\x",
        ".hidden",
        "-rf",
        long.as_str(),
    ] {
        refused.push(("source", header(1, bad)));
        let mut h = header(1, "s");
        h["item"] = serde_json::json!({"type":"incident_record","incident":bad});
        refused.push(("incident", h));
    }
    for (what, h) in &refused {
        let (code, msg) = rig.refusal(&batch_frame(h.to_string().as_bytes(), &gz(NDJSON)));
        assert_eq!(code, ErrorCode::ProtocolViolation, "{what} {h}: {msg}");
        assert!(msg.contains("malformed Batch frame"), "{what}: {msg}");
    }
    // Odd but safe names are stored, strictly inside the store.
    let mut seq = 0;
    let y128 = "y".repeat(128);
    let odd = ["日誌-α", "CON", "NUL", "aux.txt", "null", y128.as_str()];
    for name in odd {
        seq += 1;
        let addr = rig.relay.address();
        let frames = rig.rt.block_on(async {
            let s = tls_connect(&addr, rig.cfg.clone()).await.unwrap();
            exchange(s, &good_batch(seq, name), true).await
        });
        assert!(
            matches!(&frames[..], [Frame::Ack(a)] if a.seq == seq),
            "{name}: {frames:?}"
        );
        assert!(
            rig.relay.store.join("hostile").join(name).is_dir(),
            "{name}"
        );
    }
    let stored = rig.relay.events("hostile");
    assert_eq!(stored.len(), odd.len());
    // Client certificate identities: unsafe ones are refused at connect, a non-ASCII
    // one is an ordinary agent.
    let addr = rig.relay.address();
    let z200 = "z".repeat(200);
    for cn in ["..", "a/b", ".", z200.as_str()] {
        let p = IssueParams::new(cn, &[], CertKind::Client);
        let (c, k) = rig.pki.issue_with(&format!("cn{}", cn.len()), &p);
        let r = rig
            .rt
            .block_on(tls_connect(&addr, client_config(&rig.pki, &c, &k)));
        assert!(r.is_err(), "CN {cn:?} must be refused");
    }
    let p = IssueParams::new("機關-01", &[], CertKind::Client);
    let (c, k) = rig.pki.issue_with("cn-unicode", &p);
    let s = rig
        .rt
        .block_on(tls_connect(&addr, client_config(&rig.pki, &c, &k)))
        .unwrap();
    let frames = rig.rt.block_on(exchange(s, &good_batch(1, "s"), true));
    assert!(matches!(&frames[..], [Frame::Ack(_)]), "{frames:?}");
    assert_eq!(rig.relay.events("機關-01").len(), 1);
    let log = rig.relay.log();
    assert_eq!(log.matches("refusing client").count(), 4, "{log}");
    // Nothing escaped the store.
    let mut top: Vec<_> = std::fs::read_dir(rig.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["certs", "relay", "witness"]);
    rig.finish(64);
}

/// Was a bug: an intel item name that is a safe path component but not
/// `<period>.json.gz` passed decoding and failed only at the store, which answered
/// `unavailable` ("retry later"), so a sender retried it forever.
#[test]
fn intel_item_with_a_bad_name_is_refused_not_retried_as_unavailable() {
    let rig = Rig::new("");
    let chunk = |name: &str| serde_json::json!({"type":"intel_chunk","name":name,"offset":0,"total":1,"sha256":"0".repeat(64)});
    let mut refused = Vec::new();
    // Intel item names must be `<period>.json.gz`: anything else, including a safe
    // file name, is the sender's fault for good.
    for bad in [
        "../20261126T000000Z.json.gz",
        "evil.json.gz",
        "passwd",
        "20261126T000000Z.json",
    ] {
        let mut h = header(1, "s");
        h["item"] = chunk(bad);
        refused.push(("intel item", h));
    }
    for (what, h) in &refused {
        let (code, msg) = rig.refusal(&batch_frame(h.to_string().as_bytes(), &gz(NDJSON)));
        assert_eq!(code, ErrorCode::ProtocolViolation, "{what} {h}: {msg}");
        assert!(
            msg.contains("is not <period>.json.gz") || msg.contains("item:"),
            "{msg}"
        );
    }
    rig.finish(64);
}

#[test]
fn ten_thousand_connections_opened_and_dropped() {
    let rig = Rig::new("");
    let addr = rig.relay.address();
    let t0 = Instant::now();
    let opened = rig.rt.block_on(async {
        let mut opened = 0;
        for _ in 0..20 {
            let mut wave = Vec::new();
            for _ in 0..500 {
                let a = addr.clone();
                wave.push(tokio::spawn(async move {
                    tokio::net::TcpStream::connect(a).await.is_ok()
                }));
            }
            for w in wave {
                opened += usize::from(w.await.unwrap());
            }
        }
        opened
    });
    let took = t0.elapsed();
    assert_eq!(opened, 10_000);
    eprintln!("10,000 connections opened and dropped in {took:?}");
    // The relay still accepts a real agent right away, and its memory comes back.
    rig.rt
        .block_on(tls_connect(&addr, rig.cfg.clone()))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let rss = proc_kib(rig.relay.pid(), "VmRSS");
    let hwm = proc_kib(rig.relay.pid(), "VmHWM");
    eprintln!(
        "relay RSS {} KiB before, {rss} KiB after, peak {hwm} KiB",
        rig.rss0
    );
    assert!(
        rss < rig.rss0 + 48 * 1024,
        "{rss} KiB after, {} before",
        rig.rss0
    );
    rig.finish(128);
}

#[test]
fn crl_expired_fails_closed_and_unreadable_crl_stops_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let crl = dir.path().join("certs").join("ca.crl.pem");
    let (lc, lk) = pki.issue("lost", CertKind::Client);
    let lost = soclink::tls::load_certs(&lc).unwrap().remove(0);
    let expired = pki
        .ca
        .revoke_until(&[&lost], SystemTime::now() - Duration::from_secs(60))
        .unwrap();
    std::fs::write(&crl, &expired).unwrap();
    let crls = format!("crls = [{:?}]", crl.to_str().unwrap());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", &crls);
    relay.start();
    // Nobody gets in while the CRL is expired, not even a good agent.
    let mut witness = Witness::start(dir.path(), &pki, &relay);
    witness.write(100);
    wait_log(&relay, "CRL configured here has expired");
    assert!(relay.events("witness").is_empty());
    // A fresh CRL and a reload let the good agent in; the revoked one stays out.
    std::fs::write(&crl, pki.ca.revoke(&[&lost]).unwrap()).unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &relay.pid().to_string()])
            .status()
            .unwrap()
            .success()
    );
    witness.check(&relay);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Err(e) = rt.block_on(tls_connect(&relay.address(), client_config(&pki, &lc, &lk))) else {
        panic!("a revoked certificate must be refused")
    };
    assert!(e.contains("revoked"), "{e}");
    wait_log(&relay, "has been revoked");
    witness.agent.stop();
    relay.stop();
    // A CRL that cannot be read, or holds no CRL, keeps the relay from starting.
    for (content, want) in [
        (None, "ca.crl.pem"),
        (Some("garbage"), "no certificate revocation list"),
    ] {
        match content {
            None => std::fs::remove_file(&crl).unwrap(),
            Some(c) => std::fs::write(&crl, c).unwrap(),
        }
        let mut child = std::process::Command::new(bin())
            .args(["relay", "-c"])
            .arg(&relay.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the relay started with an unusable CRL ({want})");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string_sync(&mut err);
        assert!(!status.success());
        assert!(err.contains(want), "{err}");
    }
}

/// The relay logs a refusal after the client has seen it: poll for the line.
fn wait_log(relay: &RelayProc, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.log().contains(want) {
        assert!(
            Instant::now() < deadline,
            "relay log must say {want:?}:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

trait ReadAll {
    fn read_to_string_sync(&mut self, s: &mut String);
}
impl<R: std::io::Read> ReadAll for R {
    fn read_to_string_sync(&mut self, s: &mut String) {
        std::io::Read::read_to_string(self, s).unwrap();
    }
}

#[test]
fn not_yet_valid_and_server_only_client_certificates_are_refused() {
    let rig = Rig::new("");
    let addr = rig.relay.address();
    let mut p = IssueParams::new("future", &[], CertKind::Client);
    p.not_before = SystemTime::now() + Duration::from_secs(86400);
    p.not_after = SystemTime::now() + Duration::from_secs(2 * 86400);
    let (fc, fk) = rig.pki.issue_with("future", &p);
    // A certificate for a server (serverAuth only) presented as a client.
    let p = IssueParams::new("serveronly", &["localhost"], CertKind::Server);
    let (sc, sk) = rig.pki.issue_with("serveronly", &p);
    for (c, k, want) in [(fc, fk, "not valid yet"), (sc, sk, "extended key usage")] {
        let r = rig
            .rt
            .block_on(tls_connect(&addr, client_config(&rig.pki, &c, &k)));
        assert!(r.is_err(), "{want}: must be refused");
        wait_log(&rig.relay, want);
    }
    assert!(rig.relay.events("future").is_empty());
    assert!(rig.relay.events("serveronly").is_empty());
    rig.finish(64);
}

#[test]
fn oversized_syslog_messages_and_octet_counts_against_a_running_agent() {
    let dir = tempfile::tempdir().unwrap();
    let tcp = free_port();
    let mut agent = AgentProc::new(
        dir.path(),
        &format!(
            "[[source]]\nname = \"devices\"\ntype = \"syslog\"\nlisten = [\"tcp://127.0.0.1:{tcp}\"]\n"
        ),
        "",
    );
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", tcp)).is_err() {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss0 = proc_kib(agent.child.as_ref().unwrap().id(), "VmRSS");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let witness: Vec<Vec<u8>> = (0..2000)
        .map(|i| format!("witness id={i}").into_bytes())
        .collect();
    rt.block_on(async {
        let addr = format!("127.0.0.1:{tcp}");
        // The witness: a device sending octet-counted messages throughout.
        let w = witness.clone();
        let a = addr.clone();
        let good = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
            for chunk in w.chunks(100) {
                let mut buf = Vec::new();
                for m in chunk {
                    let msg = [b"<13>1 - - - - - - ".as_slice(), m].concat();
                    buf.extend_from_slice(format!("{} ", msg.len()).as_bytes());
                    buf.extend_from_slice(&msg);
                }
                s.write_all(&buf).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        // An absurd octet count.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(b"99999999999 x").await;
        drop(s);
        // 4 GiB declared, 32 MiB sent: cut, never allocated.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(b"4294967295 <13>id=huge ").await;
        let z = vec![b'z'; 1 << 20];
        for _ in 0..32 {
            if s.write_all(&z).await.is_err() {
                break;
            }
        }
        drop(s);
        // A 16 MiB LF-framed message with no newline.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(b"<13>id=nolf ").await;
        for _ in 0..16 {
            if s.write_all(&z).await.is_err() {
                break;
            }
        }
        drop(s);
        good.await.unwrap();
    });
    let evs = wait_events(&agent, Duration::from_secs(30), "witness lines", |e| {
        e.iter()
            .filter(|e| message(e).starts_with(b"witness"))
            .count()
            >= witness.len()
    });
    let (mine, theirs): (Vec<_>, Vec<_>) = evs
        .into_iter()
        .partition(|e| message(e).starts_with(b"witness"));
    assert_exactly_once(&mine, &witness);
    for e in &theirs {
        assert!(
            message(e).len() <= 64 * 1024,
            "an event exceeds the message limit"
        );
    }
    assert!(
        theirs.iter().any(|e| e["truncated"] == true),
        "the huge message is kept, truncated"
    );
    let pid = agent.child.as_ref().unwrap().id();
    let hwm = proc_kib(pid, "VmHWM");
    assert!(
        hwm < rss0 + 96 * 1024,
        "agent peak {hwm} KiB, started at {rss0} KiB"
    );
    assert!(
        agent.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "agent must still run:\n{}",
        agent.log()
    );
    agent.stop();
}
