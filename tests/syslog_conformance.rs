//! Other implementations' syslog test vectors, sent over real TCP and UDP to a running
//! `soclink agent`, and every stored event compared with the peer's expectation.
//!
//! The vectors are not part of this project (they come from the peers' own test suites,
//! under their licences): point `SOCLINK_SYSLOG_VECTORS` at a directory of JSON files,
//! each `{"vectors": [...]}` with, per vector, `input_b64`, `class` (`rfc5424`,
//! `rfc3164`, `lenient`, `reject`), `expect` (the peer's fields, `outcome`
//! `parsed`/`rejected`) and `informational` (+ `why_informational`) where the peer's
//! expectation is its own choice rather than the RFCs'. Then:
//!
//! ```sh
//! SOCLINK_SYSLOG_VECTORS=<dir> cargo test --release --test syslog_conformance -- --ignored --nocapture
//! ```
//!
//! Each vector ends in one of:
//! - **matched**: soclink parsed it with the peer's fields, or refused it as the peer does
//!   (with the whole input kept in `message` and `parse_error` set);
//! - **refused, input kept**: the peer parsed it, soclink refused it and kept it whole;
//! - **deviation**: soclink parses what the peer rejects, for a reason the RFCs give
//!   (printed with each); only two rules qualify, see [`deviation`];
//! - **mismatched**: anything else, a failure unless the vector is informational.
//!
//! How soclink's fields map to the peers': `app` `%MNEMONIC` = soclink's `msgid`
//! `MNEMONIC` (Cisco); a BOM opening the message is ignored on both sides (go-syslog
//! keeps it, syslog-ng drops it, soclink drops it before UTF-8); a timestamp without a
//! year is compared by month, day and time in the listener's zone (`Europe/Paris`, the
//! zone of syslog-ng's tests), since its year is inferred from the real receive time.

mod common;

use std::collections::BTreeMap;
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use base64::Engine;
use common::*;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde_json::Value;

const ZONE: &str = "Europe/Paris";

struct Vector {
    id: String,
    class: String,
    input: Vec<u8>,
    expect: Value,
    informational: Option<String>,
}

fn load(dir: &std::path::Path) -> Vec<Vector> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        for v in v["vectors"].as_array().unwrap_or(&Vec::new()) {
            let b64 = v["input_b64"].as_str().unwrap();
            out.push(Vector {
                id: v["id"].as_str().unwrap_or("?").to_string(),
                class: v["class"].as_str().unwrap_or("?").to_string(),
                input: base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
                expect: v["expect"].clone(),
                informational: v["informational"]
                    .as_bool()
                    .unwrap_or(false)
                    .then(|| v["why_informational"].as_str().unwrap_or("").to_string()),
            });
        }
    }
    assert!(!out.is_empty(), "no vectors in {}", dir.display());
    out
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Matched,
    RefusedKept,
    Deviation(&'static str),
    Mismatched(String),
}

fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b)
}

/// RFC 5424 SD (raw, escapes kept) as {SD-ID: {name: value}}, escapes removed.
fn sd_map(raw: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let b = raw.as_bytes();
    let mut i = 0;
    while b.get(i) == Some(&b'[') {
        i += 1;
        let start = i;
        while !matches!(b[i], b' ' | b']') {
            i += 1;
        }
        let id = raw[start..i].to_string();
        let params: &mut BTreeMap<String, String> = out.entry(id).or_default();
        while b[i] == b' ' {
            i += 1;
            let start = i;
            while b[i] != b'=' {
                i += 1;
            }
            let name = raw[start..i].to_string();
            i += 1;
            let mut value = Vec::new();
            if b[i] == b'"' {
                i += 1;
                loop {
                    match b[i] {
                        b'\\' if matches!(b[i + 1], b'"' | b'\\' | b']') => {
                            value.push(b[i + 1]);
                            i += 2;
                        }
                        b'"' => {
                            i += 1;
                            break;
                        }
                        c => {
                            value.push(c);
                            i += 1;
                        }
                    }
                }
            } else {
                while !matches!(b[i], b' ' | b']') {
                    value.push(b[i]);
                    i += 1;
                }
            }
            params.insert(name, String::from_utf8(value).unwrap());
        }
        i += 1; // ]
    }
    out
}

fn pri_of(e: &Value) -> Option<u64> {
    const FAC: [&str; 24] = [
        "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
        "authpriv", "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2",
        "local3", "local4", "local5", "local6", "local7",
    ];
    const SEV: [&str; 8] = [
        "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
    ];
    let (fac, sev) = (e["facility"].as_str()?, e["severity"].as_str()?);
    let f = FAC.iter().position(|f| *f == fac)?;
    let s = SEV.iter().position(|s| *s == sev)?;
    Some((f * 8 + s) as u64)
}

/// `syslog_ts` names its year (RFC 3339, or a BSD timestamp with one).
fn has_year(syslog_ts: &str) -> bool {
    syslog_ts.as_bytes().get(4) == Some(&b'-')
        || syslog_ts
            .split_whitespace()
            .any(|w| w.len() == 4 && w.bytes().all(|c| c.is_ascii_digit()))
}

/// The UTC offset a `syslog_ts` states, if it states one.
fn stated_offset(syslog_ts: &str) -> Option<i64> {
    if syslog_ts.ends_with('Z') || syslog_ts.ends_with(" UTC") {
        return Some(0);
    }
    let tail = syslog_ts.get(syslog_ts.len().checked_sub(6)?..)?;
    let b = tail.as_bytes();
    if matches!(b[0], b'+' | b'-') && b[3] == b':' {
        let secs = tail[1..3].parse::<i64>().ok()? * 3600 + tail[4..6].parse::<i64>().ok()? * 60;
        return Some(if b[0] == b'-' { -secs } else { secs });
    }
    None
}

fn check_timestamp(e: &Value, want: &Value, zone: &TimeZone) -> Result<(), String> {
    let kind = want["kind"].as_str().unwrap_or("");
    let syslog_ts = e["syslog_ts"].as_str();
    if kind == "none" {
        return match syslog_ts {
            None if e["ts"] == e["received"] => Ok(()),
            _ => Err(format!("timestamp: expected none, got {syslog_ts:?}")),
        };
    }
    let Some(syslog_ts) = syslog_ts else {
        return Err("timestamp: none parsed".into());
    };
    let ts: Timestamp = e["ts"].as_str().unwrap().parse().unwrap();
    let local = ts.to_zoned_datetime(zone.clone());
    let usec = i64::from(local.subsec_nanosecond()) / 1000;
    let wall = format!(
        "{:02}:{:02}:{:02}",
        local.hour(),
        local.minute(),
        local.second()
    );
    let field = |k: &str| want.get(k).filter(|v| !v.is_null());
    let check_wall = || -> Result<(), String> {
        let same = field("month").is_none_or(|m| m.as_i64() == Some(local.month().into()))
            && field("day").is_none_or(|d| d.as_i64() == Some(local.day().into()))
            && field("time").is_none_or(|t| t.as_str() == Some(wall.as_str()))
            && field("usec").is_none_or(|u| u.as_i64() == Some(usec));
        if same {
            Ok(())
        } else {
            Err(format!(
                "timestamp: expected {want}, got {local} ({syslog_ts:?})"
            ))
        }
    };
    match kind {
        "rfc3339" => {
            let v = want["value"].as_str().unwrap();
            let instant: Timestamp = v.parse().unwrap();
            if instant != ts || syslog_ts != v {
                return Err(format!(
                    "timestamp: expected {v}, got ts {ts} from {syslog_ts:?}"
                ));
            }
            Ok(())
        }
        "wall" => check_wall(),
        "epoch" => {
            let offset =
                stated_offset(syslog_ts).unwrap_or_else(|| i64::from(zone.to_offset(ts).seconds()));
            if field("ofs").is_some_and(|o| o.as_i64() != Some(offset)) {
                return Err(format!(
                    "timestamp offset: expected {want}, got {offset} ({syslog_ts:?})"
                ));
            }
            if has_year(syslog_ts) {
                let sec = want["sec"].as_i64().unwrap();
                let us = want["usec"].as_i64().unwrap_or(0);
                if ts.as_second() != sec || i64::from(ts.subsec_nanosecond()) / 1000 != us {
                    return Err(format!(
                        "timestamp: expected {sec}.{us:06}, got {ts} ({syslog_ts:?})"
                    ));
                }
                Ok(())
            } else {
                check_wall()
            }
        }
        other => Err(format!("unknown timestamp kind {other}")),
    }
}

/// Compare one stored event with the peer's expectation.
fn compare(v: &Vector, e: &Value, zone: &TimeZone) -> Outcome {
    let refused = e.get("parse_error").is_some();
    let kept = message(e) == v.input;
    if v.expect["outcome"] == "rejected" {
        return match (refused, kept) {
            (true, true) => Outcome::Matched,
            (true, false) => Outcome::Mismatched("refused without keeping the input".into()),
            (false, _) => deviation(e).map_or_else(
                || Outcome::Mismatched(format!("the peer rejects it; soclink parsed {e}")),
                Outcome::Deviation,
            ),
        };
    }
    if refused {
        return if kept {
            Outcome::RefusedKept
        } else {
            Outcome::Mismatched("refused without keeping the input".into())
        };
    }
    let mut diffs = Vec::new();
    let want = &v.expect;
    if let Some(p) = want.get("pri").and_then(Value::as_u64)
        && pri_of(e) != Some(p)
    {
        diffs.push(format!("pri: expected {p}, got {:?}", pri_of(e)));
    }
    let mut expect_msgid = want.get("msgid").cloned();
    for key in ["hostname", "app", "procid"] {
        let Some(w) = want.get(key) else { continue };
        let got = e.get(key).cloned().unwrap_or(Value::Null);
        if key == "app"
            && let Some(m) = w.as_str().and_then(|a| a.strip_prefix('%'))
            && m.contains('-')
        {
            // The peer's PROGRAM is Cisco's mnemonic: soclink's msgid.
            expect_msgid = Some(Value::String(m.to_string()));
            if !got.is_null() {
                diffs.push(format!("app: expected none (mnemonic in msgid), got {got}"));
            }
            continue;
        }
        if &got != w {
            diffs.push(format!("{key}: expected {w}, got {got}"));
        }
    }
    if let Some(w) = expect_msgid {
        let got = e.get("msgid").cloned().unwrap_or(Value::Null);
        if got != w {
            diffs.push(format!("msgid: expected {w}, got {got}"));
        }
    }
    let want_msg = match (want.get("message"), want.get("message_b64")) {
        (Some(Value::String(s)), _) => Some(s.as_bytes().to_vec()),
        (Some(Value::Null), _) => Some(Vec::new()),
        (_, Some(Value::String(b))) => {
            Some(base64::engine::general_purpose::STANDARD.decode(b).unwrap())
        }
        _ => None,
    };
    if let Some(w) = want_msg {
        let got = message(e);
        if strip_bom(&got) != strip_bom(&w) {
            diffs.push(format!(
                "message: expected {:?}, got {:?}",
                String::from_utf8_lossy(&w),
                String::from_utf8_lossy(&got)
            ));
        }
    }
    let got_sd = e["sd"].as_str();
    if let Some(w) = want.get("sd") {
        let same = match (w, got_sd) {
            (Value::Null, None) => true,
            (Value::Object(_), Some(raw)) => serde_json::to_value(sd_map(raw)).unwrap() == *w,
            _ => false,
        };
        if !same {
            diffs.push(format!("sd: expected {w}, got {got_sd:?}"));
        }
    }
    if let Some(w) = want.get("sd_str")
        && (w.as_str() != got_sd)
    {
        diffs.push(format!("sd_str: expected {w}, got {got_sd:?}"));
    }
    if let Some(Value::Object(ids)) = want.get("sd_pairs") {
        let got = got_sd.map(sd_map).unwrap_or_default();
        for (id, params) in ids {
            for (name, value) in params.as_object().unwrap() {
                if got.get(id).and_then(|p| p.get(name)).map(String::as_str) != value.as_str() {
                    diffs.push(format!(
                        "sd_pairs: expected {id}.{name}={value}, got {got_sd:?}"
                    ));
                }
            }
        }
    }
    if let Some(w) = want.get("timestamp")
        && let Err(d) = check_timestamp(e, w, zone)
    {
        diffs.push(d);
    }
    if diffs.is_empty() {
        Outcome::Matched
    } else {
        Outcome::Mismatched(diffs.join("; "))
    }
}

/// What soclink parses although a peer rejects it, where the RFCs are on soclink's
/// side. Decided from the stored event, never from a list of the peers' inputs.
fn deviation(e: &Value) -> Option<&'static str> {
    // RFC 3164 4.3.2: content without a TIMESTAMP is a valid message (a receiver that
    // also takes RFC 3164 cannot refuse `<PRI>abc`); go-syslog's RFC 5424-only parser does.
    if e["format"] == "rfc3164" && e.get("syslog_ts").is_none() {
        return Some("valid RFC 3164 content without TIMESTAMP (RFC 3164 4.3.2)");
    }
    // RFC 5424 6.3.3: a backslash before any other character than `"`, `\` or `]` is a
    // plain backslash, so `\n` in a PARAM-VALUE is valid.
    let sd = e["sd"].as_str()?.as_bytes();
    let plain_backslash = sd
        .windows(2)
        .any(|w| w[0] == b'\\' && !matches!(w[1], b'"' | b'\\' | b']'));
    plain_backslash
        .then_some("a backslash before another character is a backslash (RFC 5424 6.3.3)")
}

/// Send every vector over one TCP connection (octet counting: the vectors hold LF) and,
/// one datagram each, over UDP; returns the events of each source in arrival order.
fn run_agent(vectors: &[Vector]) -> (Vec<Value>, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let tcp = free_port();
    let udp = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let sources = format!(
        "[[source]]\nname = \"tcp\"\ntype = \"syslog\"\nlisten = [\"tcp://127.0.0.1:{tcp}\"]\ntimezone = \"{ZONE}\"\n\n\
         [[source]]\nname = \"udp\"\ntype = \"syslog\"\nlisten = [\"udp://127.0.0.1:{udp}\"]\ntimezone = \"{ZONE}\"\n"
    );
    let mut agent = AgentProc::new(dir.path(), &sources, "");
    agent.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", tcp)) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("agent not listening: {e}\n{}", agent.log()),
        }
    };
    let mut frames = Vec::new();
    for v in vectors {
        frames.extend_from_slice(format!("{} ", v.input.len()).as_bytes());
        frames.extend_from_slice(&v.input);
    }
    std::io::Write::write_all(&mut stream, &frames).unwrap();
    drop(stream);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, v) in vectors.iter().enumerate() {
        sock.send_to(&v.input, ("127.0.0.1", udp)).unwrap();
        if i % 16 == 15 {
            std::thread::sleep(Duration::from_millis(2)); // UDP has no backpressure
        }
    }
    let n = vectors.len();
    let evs = wait_events(&agent, Duration::from_secs(30), "every vector", |e| {
        e.iter().filter(|e| e["source"] == "tcp").count() >= n
            && e.iter().filter(|e| e["source"] == "udp").count() >= n
    });
    agent.stop();
    let of = |s: &str| -> Vec<Value> { evs.iter().filter(|e| e["source"] == s).cloned().collect() };
    (of("tcp"), of("udp"))
}

#[test]
#[ignore = "needs SOCLINK_SYSLOG_VECTORS=<directory of the peers' vector files>; run with --ignored"]
fn peer_vectors_over_tcp_and_udp() {
    let dir = std::env::var_os("SOCLINK_SYSLOG_VECTORS")
        .expect("set SOCLINK_SYSLOG_VECTORS to the directory of the peers' vector files");
    let vectors = load(std::path::Path::new(&dir));
    let zone = TimeZone::get(ZONE).unwrap();
    let (tcp, udp) = run_agent(&vectors);
    assert_eq!((tcp.len(), udp.len()), (vectors.len(), vectors.len()));
    let mut failures = Vec::new();
    for (transport, events) in [("TCP", &tcp), ("UDP", &udp)] {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut info_followed = 0;
        let mut info_not: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut deviations: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut refused: Vec<String> = Vec::new();
        for (v, e) in vectors.iter().zip(events.iter()) {
            let outcome = compare(v, e, &zone);
            if let Some(why) = &v.informational {
                if outcome == Outcome::Matched {
                    info_followed += 1;
                } else {
                    let why = why.split(':').next().unwrap_or(why).to_string();
                    info_not
                        .entry(why)
                        .or_default()
                        .push(format!("{} {:?}", v.id, outcome));
                }
                continue;
            }
            let key = match &outcome {
                Outcome::Matched => format!("matched ({})", v.class),
                Outcome::RefusedKept => {
                    refused.push(format!("{} ({})", v.id, e["parse_error"]));
                    format!("refused, input kept ({})", v.class)
                }
                Outcome::Deviation(why) => {
                    deviations.entry(why).or_default().push(v.id.clone());
                    format!("deviation ({})", v.class)
                }
                Outcome::Mismatched(d) => {
                    failures.push(format!(
                        "{transport} {} [{}] {:?}: {d}",
                        v.id,
                        v.class,
                        String::from_utf8_lossy(&v.input)
                    ));
                    format!("MISMATCHED ({})", v.class)
                }
            };
            *counts.entry(key).or_default() += 1;
        }
        println!("== {transport}: {} vectors", vectors.len());
        for (k, n) in &counts {
            println!("  {n:4}  {k}");
        }
        for r in &refused {
            println!("  refused, input kept: {r}");
        }
        for (why, ids) in &deviations {
            println!("  deviation: {why}: {}", ids.join(", "));
        }
        let not: usize = info_not.values().map(Vec::len).sum();
        println!("  informational: {info_followed} followed, {not} not followed");
        for (why, items) in &info_not {
            println!("    not followed ({}): {why}", items.len());
            for i in items {
                println!("      {i}");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The comparison itself, on vectors written here: it must tell a match from a
/// mismatch, or the counts above would mean nothing.
#[test]
fn comparison_tells_matches_from_mismatches() {
    let zone = TimeZone::get(ZONE).unwrap();
    let input = b"<165>1 2003-10-11T22:14:15.003Z host app - ID47 [ex@1 a=\"x\\]\"] \xEF\xBB\xBFhi"
        .to_vec();
    let event = serde_json::json!({
        "ts": "2003-10-11T22:14:15.003000000Z", "received": "2026-11-26T00:00:00.000000000Z",
        "message": "hi", "facility": "local4", "severity": "notice",
        "syslog_ts": "2003-10-11T22:14:15.003Z", "hostname": "host", "app": "app",
        "msgid": "ID47", "sd": "[ex@1 a=\"x\\]\"]", "format": "rfc5424"});
    let expect = serde_json::json!({"outcome": "parsed", "pri": 165, "hostname": "host",
        "app": "app", "procid": null, "msgid": "ID47", "message": "\u{feff}hi",
        "sd": {"ex@1": {"a": "x]"}},
        "timestamp": {"kind": "rfc3339", "value": "2003-10-11T22:14:15.003Z"}});
    let v = |expect: Value| Vector {
        id: "t".into(),
        class: "rfc5424".into(),
        input: input.clone(),
        expect,
        informational: None,
    };
    assert_eq!(compare(&v(expect.clone()), &event, &zone), Outcome::Matched);
    for (key, wrong) in [
        ("pri", serde_json::json!(166)),
        ("hostname", serde_json::json!("other")),
        ("procid", serde_json::json!("1")),
        ("message", serde_json::json!("ho")),
        ("sd", serde_json::json!({"ex@1": {"a": "x"}})),
        (
            "timestamp",
            serde_json::json!({"kind": "rfc3339", "value": "2003-10-11T22:14:15.004Z"}),
        ),
        ("timestamp", serde_json::json!({"kind": "none"})),
    ] {
        let mut e = expect.clone();
        e[key] = wrong;
        assert!(
            matches!(compare(&v(e), &event, &zone), Outcome::Mismatched(_)),
            "{key}"
        );
    }
    // A refusal matches a rejection only with the whole input kept.
    let rejected = serde_json::json!({"outcome": "rejected"});
    let b64 = base64::engine::general_purpose::STANDARD.encode(&input);
    let kept = serde_json::json!({"ts": "t", "received": "t", "message_base64": b64,
        "format": "rfc5424", "parse_error": "malformed structured data"});
    assert_eq!(
        compare(&v(rejected.clone()), &kept, &zone),
        Outcome::Matched
    );
    assert_eq!(compare(&v(expect), &kept, &zone), Outcome::RefusedKept);
    let cut = serde_json::json!({"ts": "t", "message": "hi", "parse_error": "x"});
    assert!(matches!(
        compare(&v(rejected.clone()), &cut, &zone),
        Outcome::Mismatched(_)
    ));
    assert!(matches!(
        compare(&v(rejected), &event, &zone),
        Outcome::Mismatched(_)
    ));
    // A year-less timestamp: month, day and time in the listener's zone, and its offset.
    let bsd = serde_json::json!({"ts": "2026-01-10T00:00:00.000000000Z", "received": "r",
        "message": "", "facility": "kern", "severity": "emerg", "syslog_ts": "Jan 10 01:00:00"});
    let want = |time: &str, ofs: i64| {
        serde_json::json!({"outcome": "parsed", "timestamp":
        {"kind": "epoch", "sec": 1, "usec": 0, "ofs": ofs, "month": 1, "day": 10, "time": time}})
    };
    assert_eq!(
        compare(&v(want("01:00:00", 3600)), &bsd, &zone),
        Outcome::Matched
    );
    assert!(matches!(
        compare(&v(want("02:00:00", 3600)), &bsd, &zone),
        Outcome::Mismatched(_)
    ));
    assert!(matches!(
        compare(&v(want("01:00:00", 7200)), &bsd, &zone),
        Outcome::Mismatched(_)
    ));
}
