//! Fuzz target bodies: one function per parser that takes untrusted bytes.
//!
//! Each `fn(&[u8])` here must return normally for every input: a panic is a bug, either
//! in the code under test or in an invariant checked below (every target checks more
//! than "no panic": round trips, differential models, bounds). Memory is bounded by the
//! limits each target passes to the code under test, never by the input's claims.
//!
//! Two drivers share these bodies: the cargo-fuzz wrappers in `fuzz/fuzz_targets/`
//! (nightly, libFuzzer) and the stable `tests/fuzz_targets.rs`, which replays the
//! committed corpus and runs a seeded mutational loop under `cargo test`. [`TARGETS`]
//! is the single list both use; [`Target::seeds`] makes valid inputs with the crate's
//! own encoders so the mutators start from the real formats.
//!
//! Not a stable API: hidden from the docs, for the fuzz drivers only.

use std::io::{Cursor, Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use flate2::Compression;
use flate2::write::GzEncoder;

/// One fuzz target: its name (also the cargo-fuzz target and corpus folder name), its
/// body, and a generator of valid seed inputs.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target (adding one: see `fuzz/README.md`).
pub const TARGETS: &[Target] = &[
    Target {
        name: "syslog_rfc3164",
        run: syslog_rfc3164,
        seeds: seeds_rfc3164,
    },
    Target {
        name: "syslog_rfc5424",
        run: syslog_rfc5424,
        seeds: seeds_rfc5424,
    },
    Target {
        name: "syslog_octet_framer",
        run: syslog_octet_framer,
        seeds: seeds_octet_framer,
    },
    Target {
        name: "syslog_lf_framer",
        run: syslog_lf_framer,
        seeds: seeds_lf_framer,
    },
    Target {
        name: "protocol_frames",
        run: protocol_frames,
        seeds: seeds_protocol_frames,
    },
    Target {
        name: "batch_inflate",
        run: batch_inflate,
        seeds: seeds_batch_inflate,
    },
    Target {
        name: "spool_recovery",
        run: spool_recovery,
        seeds: seeds_spool_recovery,
    },
    Target {
        name: "checkpoints",
        run: checkpoints,
        seeds: seeds_checkpoints,
    },
    Target {
        name: "bundle_verify",
        run: bundle_verify,
        seeds: seeds_bundle_verify,
    },
    Target {
        name: "control_request",
        run: control_request,
        seeds: seeds_control_request,
    },
    Target {
        name: "config_toml",
        run: config_toml,
        seeds: seeds_config_toml,
    },
    Target {
        name: "tls_pem",
        run: tls_pem,
        seeds: seeds_tls_pem,
    },
    Target {
        name: "relay_store_state",
        run: relay_store_state,
        seeds: seeds_relay_store_state,
    },
    Target {
        name: "incident_record",
        run: incident_record,
        seeds: seeds_incident_record,
    },
    Target {
        name: "event_encode",
        run: event_encode,
        seeds: seeds_event_encode,
    },
    Target {
        name: "intel_items",
        run: intel_items,
        seeds: seeds_intel_items,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// Chunk lengths 1..=17 from a small LCG, so one input byte picks a whole segmentation.
fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x100;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) as usize % 17 + 1).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let o = outer.as_ptr_range();
    let i = inner.as_ptr_range();
    inner.is_empty() || (i.start >= o.start && i.end <= o.end)
}

// ---------------------------------------------------------------------------------------
// Syslog parsers
// ---------------------------------------------------------------------------------------

/// Parses `msg` and checks what `parse` promises: fields borrow from the input, header
/// fields hold no control characters, a failed parse keeps the whole input, and the
/// encoded event is one JSON line whose message decodes back to the same bytes.
fn check_syslog(msg: &[u8]) {
    use crate::agent::sources::syslog::{Format, encode_syslog_event, parse};
    let p = parse(msg);
    assert!(within(msg, p.message), "message is not part of the input");
    if p.parse_error.is_some() {
        assert_eq!(p.message, msg, "a failed parse must keep the whole input");
    }
    if p.format == Format::Unknown {
        assert_eq!(p.message, msg, "an unrecognised message must be kept whole");
    }
    if let Some(pri) = p.pri {
        assert!(pri <= 191, "PRI {pri} out of range");
        assert_eq!(p.facility, Some(pri >> 3));
        assert_eq!(p.severity, Some(pri & 7));
    }
    if let Some(st) = p.stamp {
        assert!(p.timestamp.is_some(), "a stamp without its text");
        // Any stamp maps to UTC or to nothing, in a zone with DST, without panicking, and
        // a mapped one formats to the fixed-width `ts`.
        let received = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_764_115_200);
        let zone = jiff::tz::TimeZone::get("Europe/Paris").unwrap_or(jiff::tz::TimeZone::UTC);
        if let Some(t) = crate::agent::sources::syslog::DeviceClock::new(zone).to_utc(&st, received)
        {
            let mut ts = String::new();
            crate::agent::sources::syslog::format_utc(t, &mut ts);
            assert_eq!(ts.len(), 30, "{ts}");
        }
    }
    let header = [
        p.timestamp,
        p.hostname,
        p.app,
        p.procid,
        p.msgid,
        p.sequence,
    ];
    for f in header.into_iter().flatten() {
        assert!(
            within(msg, f.as_bytes()),
            "field {f:?} is not part of the input"
        );
        assert!(
            !f.chars().any(char::is_control),
            "header field {f:?} holds a control character"
        );
    }
    if let Some(sd) = p.structured_data {
        assert!(within(msg, sd.as_bytes()), "SD is not part of the input");
    }
    let mut out = Vec::new();
    encode_syslog_event(
        &mut out,
        "2026-11-26T00:00:00Z",
        "h",
        "s",
        "1.2.3.4:5",
        &p,
        false,
    );
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    assert_eq!(out.last(), Some(&b'\n'));
    let v: serde_json::Value = serde_json::from_slice(&out).expect("event is not JSON");
    assert_eq!(
        crate::event::message_bytes(&v).as_deref(),
        Some(p.message),
        "message does not round-trip"
    );
}

/// RFC 3164 (and the device variants): `<PRI>` from the first byte, then the rest.
pub fn syslog_rfc3164(data: &[u8]) {
    let Some((&b, rest)) = data.split_first() else {
        return check_syslog(data);
    };
    let mut msg = format!("<{}>", b % 192).into_bytes();
    msg.extend_from_slice(rest);
    check_syslog(&msg);
    // Without the synthetic PRI too: the no-PRI and bad-PRI paths.
    check_syslog(data);
}

/// RFC 5424: `<PRI>1 ` from the first byte, then the rest (header, SD, message).
pub fn syslog_rfc5424(data: &[u8]) {
    let Some((&b, rest)) = data.split_first() else {
        return;
    };
    let mut msg = format!("<{}>1 ", b % 192).into_bytes();
    msg.extend_from_slice(rest);
    check_syslog(&msg);
}

fn seeds_rfc3164() -> Vec<Vec<u8>> {
    [
        &b"\x22Oct 11 22:14:15 mymachine su[123]: 'su root' failed"[..],
        b"\x22Oct 11 22:14:15 su: no host",
        b"\x22Oct 11 2026 22:14:15 host app: year",
        b"\x22Oct  1 22:14:15.123 2026 host app: frac",
        b"\x222026-11-26T01:02:03.123+08:00 host app[1]: iso",
        b"\x0eNov 26 01:02:03 PA-220 1,2026/11/26 01:02:03,0123,TRAFFIC",
        b"\xbd123: *Mar  1 00:00:12.123: %SYS-5-CONFIG_I: Configured from console",
        b"\xbdMar  1 00:00:12 router1 123: *Mar  1 00:00:12.123 UTC: %LINK-3-UPDOWN: up",
        b"\xbddate=2026-11-26 time=01:02:03 devname=\"FGT\" devid=\"FG100\" type=\"traffic\"",
        b"\xbb7: *Nov 26 01:02:03: rtr1 %CRYPTO-4-RECVD_PKT_INV_SPI: decaps: bad spi",
        b"\xa6.Nov 26 2026 01:02:03: %PIX-6-302014: Teardown",
        b"\x0dNov 26 01:02:03 2001:db8:: sshd[5]: x",
        b"\x0d2026-11-26 09:02:03+08:00 h a: x",
        b"\x0dFeb 29 01:02:03 h a: leap",
        b"\x0dplain message without header",
        b"<999>bad pri",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

fn seeds_rfc5424() -> Vec<Vec<u8>> {
    [
        &b"\xa52026-11-26T01:02:03.1Z host app 1234 ID47 [id k=\"v\\\"]\"][id2 a=\"b\"] \xEF\xBB\xBFmsg"[..],
        b"\xa5- - - - - -",
        b"\xa52026-11-26T01:02:03+08:00 h a p m - plain",
        b"\xa52026-11-26T01:02:03Z h a p m [x@32473 iut=\"3\" eventSource=\"App\"]",
        b"\xa5bad-time h a p m - x",
        b"\xa52026-11-26T01:02:03.123456789 h a p m [Originator@6876 sub=Hostsvc opID=x] m",
        b"\xa52026-10-25T02:30:00 h a p m [a x=\"\\]\"][b] m",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

// ---------------------------------------------------------------------------------------
// Syslog TCP framing
// ---------------------------------------------------------------------------------------

type Msgs = Vec<(Vec<u8>, bool)>;

/// Feeds `pieces` to a fresh framer; returns the messages, the first error, and checks
/// the memory bound after every push.
fn run_framer(
    max: usize,
    pieces: &[&[u8]],
) -> (Msgs, Option<crate::agent::sources::syslog::FrameError>) {
    let mut f = crate::agent::sources::syslog::Framer::new(max);
    let mut out: Msgs = Vec::new();
    for p in pieces {
        let r = f.push(p, |m, cut| out.push((m.to_vec(), cut)));
        assert!(f.buffered() <= max, "framer holds {} > {max}", f.buffered());
        if let Err(e) = r {
            return (out, Some(e));
        }
    }
    f.finish(|m, cut| out.push((m.to_vec(), cut)));
    for (m, _) in &out {
        assert!(m.len() <= max, "message of {} bytes > max {max}", m.len());
    }
    (out, None)
}

/// The octet-counting framer (RFC 6587 3.4.1, with its LF fallback): the messages must
/// not depend on how TCP segmented the stream, and no message or buffer exceeds the max.
pub fn syslog_octet_framer(data: &[u8]) {
    let [a, b, stream @ ..] = data else {
        return;
    };
    let max = 1 + usize::from(*a) * 4;
    let whole = run_framer(max, &[stream]);
    let split = run_framer(max, &chunks(stream, *b));
    assert_eq!(whole, split, "result depends on segmentation");
}

/// The LF framer: after a first line that fixes LF framing, the framer must match a
/// plain model of RFC 6587 3.4.2 (LF or NUL end a message, one CR before LF is dropped,
/// stray separators between messages are skipped, longer messages are cut and marked).
pub fn syslog_lf_framer(data: &[u8]) {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let max = 1 + usize::from(*a) * 4;
    let mut stream = b"x\n".to_vec();
    stream.extend_from_slice(rest);
    let (got, err) = run_framer(max, &chunks(&stream, *b));
    assert!(err.is_none(), "LF framing never fails: {err:?}");

    let mut want: Msgs = Vec::new();
    let mut s: &[u8] = &stream;
    loop {
        while let Some((&c, r)) = s.split_first() {
            if matches!(c, b'\n' | b'\r' | b'\0') {
                s = r;
            } else {
                break;
            }
        }
        if s.is_empty() {
            break;
        }
        let (line, next, terminated) = match s.iter().position(|&c| c == b'\n' || c == b'\0') {
            Some(i) => (&s[..i], &s[i + 1..], true),
            None => (s, &[][..], false),
        };
        let line = if terminated {
            line.strip_suffix(b"\r").unwrap_or(line)
        } else {
            line
        };
        want.push((line[..line.len().min(max)].to_vec(), line.len() > max));
        s = next;
    }
    assert_eq!(got, want, "LF framer differs from the model (max {max})");
}

fn seeds_octet_framer() -> Vec<Vec<u8>> {
    vec![
        b"\x40\x07"
            .iter()
            .chain(b"11 <13>1 - - x5 hello")
            .copied()
            .collect(),
        b"\x01\x03"
            .iter()
            .chain(b"3 abc4 defg0 2 hi")
            .copied()
            .collect(),
        b"\x40\x05"
            .iter()
            .chain(b"123: *Mar 1 no pri\n5 abcde")
            .copied()
            .collect(),
        b"\x02\x09"
            .iter()
            .chain(b"20 short\n12345678901 x")
            .copied()
            .collect(),
        b"\x40\x01"
            .iter()
            .chain(b"4 ab\r\n<13>line after\n")
            .copied()
            .collect(),
    ]
}

fn seeds_lf_framer() -> Vec<Vec<u8>> {
    vec![
        b"\x40\x07"
            .iter()
            .chain(b"<13>one\n<13>two\r\n\0three\0")
            .copied()
            .collect(),
        b"\x01\x03"
            .iter()
            .chain(b"abc\r\nabcd\n\r\rx")
            .copied()
            .collect(),
        b"\x00\x02"
            .iter()
            .chain(b"12 digits first\nno end")
            .copied()
            .collect(),
    ]
}

// ---------------------------------------------------------------------------------------
// Wire protocol
// ---------------------------------------------------------------------------------------

fn fuzz_limits() -> crate::protocol::Limits {
    crate::protocol::Limits {
        max_frame: 1 << 20,
        max_control: 64 << 10,
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Frame decoding: `decode` and the streaming `read_frame` agree on every frame, and
/// every decoded frame re-encodes to bytes that decode to the same frame.
pub fn protocol_frames(data: &[u8]) {
    use crate::protocol::{decode, encode, read_frame};
    let limits = fuzz_limits();
    let mut buf = data;
    let mut reader = Cursor::new(data);
    for _ in 0..64 {
        let sync = decode(buf, &limits);
        let streamed = runtime().block_on(read_frame(&mut reader, &limits));
        match (&sync, &streamed) {
            (Ok((a, _)), Ok(b)) => assert_eq!(a, b, "decode and read_frame differ"),
            (Err(_), Err(_)) => {}
            _ => panic!("decode {sync:?} but read_frame {streamed:?}"),
        }
        let Ok((frame, used)) = sync else {
            return;
        };
        let mut again = Vec::new();
        encode(&frame, &mut again).expect("a decoded frame encodes");
        let (back, n) = decode(&again, &limits).expect("an encoded frame decodes");
        assert_eq!(back, frame, "frame does not round-trip");
        assert_eq!(n, again.len());
        buf = &buf[used..];
    }
}

fn seeds_protocol_frames() -> Vec<Vec<u8>> {
    use crate::protocol::*;
    let gz = gzip(b"{\"message\":\"a\"}\n");
    let frames = [
        Frame::Hello(Hello {
            versions: vec![1],
            agent_version: "0.1.0".into(),
            streams: vec!["main".into(), "incidents".into()],
        }),
        Frame::HelloAck(HelloAck {
            version: 1,
            relay_id: "relay-1".into(),
            relay_version: "0.1.0".into(),
            resume: vec![ResumePoint {
                stream: "main".into(),
                last_seq: 41,
            }],
        }),
        Frame::Refuse(Refuse {
            reason: "no common version".into(),
            versions: vec![1],
        }),
        Frame::Batch(Batch {
            header: BatchHeader {
                stream: "main".into(),
                seq: 42,
                source: "syslog".into(),
                day: "2026-11-26".into(),
                events: 1,
                raw_bytes: 16,
                origin: Some(crate::batch::Origin {
                    agent: "a1".into(),
                    stream: "main".into(),
                    seq: 7,
                }),
                item: Some(crate::batch::Item::BundleChunk {
                    incident: "INC-20261126-0001-abcd".into(),
                    offset: 0,
                    total: 10,
                    sha256: "0".repeat(64),
                }),
            },
            gzip: gz.into(),
        }),
        Frame::Ack(Ack {
            stream: "main".into(),
            seq: 42,
        }),
        Frame::Ping(7),
        Frame::Pong(7),
        Frame::Error(ErrorFrame {
            code: ErrorCode::BatchRejected,
            message: "bad".into(),
        }),
    ];
    let mut all = Vec::new();
    let mut out: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut v = Vec::new();
            let _ = encode(f, &mut v);
            all.extend_from_slice(&v);
            v
        })
        .collect();
    out.push(all);
    out
}

/// Bounded gzip inflation of a batch ([`crate::protocol::verify_batch`]).
///
/// Mode byte odd: the rest is NDJSON that is compressed here, so the verdict must match
/// a line-by-line model exactly. Even: the rest is the gzip member itself, 4 bytes of
/// declared raw size and 1 of event count in front; an accepted batch must inflate to
/// exactly what it declared.
pub fn batch_inflate(data: &[u8]) {
    use crate::protocol::{MAX_EVENT_LINE, verify_batch};
    const MAX_RAW: u64 = 4 << 20;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let raw = rest;
        let lines = raw.iter().filter(|&&b| b == b'\n').count();
        let model_ok = (raw.is_empty() || raw.ends_with(b"\n"))
            && raw.split(|&b| b == b'\n').rev().skip(1).all(|line| {
                line.len() <= MAX_EVENT_LINE
                    && line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
                    && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
            });
        let got = verify_batch(&gzip(raw), lines as u32, raw.len() as u64, MAX_RAW);
        assert_eq!(got.is_ok(), model_ok, "verify_batch says {got:?}");
        // A wrong declaration is always refused.
        let wrong = verify_batch(&gzip(raw), lines as u32 + 1, raw.len() as u64, MAX_RAW);
        assert!(wrong.is_err(), "accepted a wrong event count");
        return;
    }
    let [a, b, c, d, events, gz @ ..] = rest else {
        return;
    };
    let declared = u64::from(u32::from_le_bytes([*a, *b, *c, *d])) % (MAX_RAW + 16);
    let got = verify_batch(gz, u32::from(*events), declared, MAX_RAW);
    if got.is_ok() {
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .take(MAX_RAW + 1)
            .read_to_end(&mut inflated)
            .expect("an accepted batch inflates");
        assert_eq!(inflated.len() as u64, declared);
        assert_eq!(
            inflated.iter().filter(|&&b| b == b'\n').count(),
            usize::from(*events)
        );
    }
}

fn seeds_batch_inflate() -> Vec<Vec<u8>> {
    let raw = b"{\"ts\":\"2026-11-26T00:00:00Z\",\"message\":\"a\"}\n{\"x\":[1,2,{}]}\n";
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    framed.push(2);
    framed.extend_from_slice(&gzip(raw));
    let mut odd = vec![1u8];
    odd.extend_from_slice(raw);
    let mut bomb = vec![0u8];
    bomb.extend_from_slice(&1000u32.to_le_bytes());
    bomb.push(1);
    bomb.extend_from_slice(&gzip(&vec![b'{'; 100_000]));
    vec![framed, odd, bomb, b"\x01{\"a\":1}\n \n".to_vec()]
}

// ---------------------------------------------------------------------------------------
// Spool recovery
// ---------------------------------------------------------------------------------------

/// Makes the CRCs in a would-be segment right (header and every record that parses),
/// so the fuzzer reaches the record and resync logic instead of failing on checksums.
fn fix_segment_crcs(seg: &mut [u8]) {
    use crate::spool::format::{RECORD_HEADER_LEN, RECORD_MAGIC, SEGMENT_HEADER_LEN};
    if seg.len() >= SEGMENT_HEADER_LEN {
        let crc = crc32fast::hash(&seg[..24]);
        seg[24..28].copy_from_slice(&crc.to_le_bytes());
    }
    let mut pos = SEGMENT_HEADER_LEN;
    while pos + RECORD_HEADER_LEN <= seg.len() && seg[pos..pos + 4] == RECORD_MAGIC {
        let len = |at: usize| u32::from_le_bytes([seg[at], seg[at + 1], seg[at + 2], seg[at + 3]]);
        let body = len(pos + 24) as usize + len(pos + 28) as usize;
        let end = pos + RECORD_HEADER_LEN + body;
        if end > seg.len() {
            break;
        }
        let crc = crc32fast::hash(&seg[pos + 8..end]);
        seg[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

/// Spool recovery from arbitrary directory contents.
///
/// Byte 0: bit 0 a ledger file (next 40 bytes), bit 1 gate on checkpoint, bit 2 fix
/// CRCs, bit 3 an `acked.tmp`. The rest is split into segment files at each segment
/// magic; a segment is named after the first seq its header claims. Recovery must not
/// fail on damage, hand out records in increasing order above `acked`, keep working
/// (an appended, committed record survives a crash), and find the same records again on
/// the next open.
pub fn spool_recovery(data: &[u8]) {
    use crate::fs::sim::SimFs;
    use crate::spool::format::{LEDGER_LEN, SEGMENT_MAGIC};
    use crate::spool::{Spool, SpoolError, SpoolOptions};
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let fs = SimFs::new();
    let dir = Path::new("/spool");
    if flags & 1 == 1 {
        let n = rest.len().min(LEDGER_LEN);
        fs.write_durable(&dir.join("acked"), &rest[..n]);
        rest = &rest[n..];
    }
    if flags & 8 == 8 {
        fs.write_durable(&dir.join("acked.tmp"), b"junk");
    }
    let finder = memchr::memmem::Finder::new(&SEGMENT_MAGIC);
    let mut starts: Vec<usize> = finder.find_iter(rest).collect();
    if starts.first() != Some(&0) {
        starts.insert(0, 0);
    }
    starts.push(rest.len());
    for (i, w) in starts.windows(2).enumerate() {
        let mut seg = rest[w[0]..w[1]].to_vec();
        if flags & 4 == 4 {
            fix_segment_crcs(&mut seg);
        }
        let first_seq = seg.get(16..24).map_or(i as u64 + 1, |b| {
            u64::from_le_bytes(b.try_into().unwrap_or_default())
        });
        fs.write_durable(&dir.join(format!("{first_seq:020}.seg")), &seg);
    }
    let opts = SpoolOptions {
        max_size: 64 << 20,
        segment_size: 1 << 20,
        gate_on_checkpoint: flags & 2 == 2,
    };
    let open = |fs: &SimFs| Spool::open_with_fs(dir, opts.clone(), Arc::new(fs.clone()));
    let spool = match open(&fs) {
        Ok((s, _)) => s,
        // A newer format version is refused on purpose; nothing else may fail.
        Err(SpoolError::Corrupt { detail, .. }) if detail.contains("version") => return,
        Err(e) => panic!("recovery failed: {e}"),
    };
    let read_all = |s: &Spool| {
        let mut recs = Vec::new();
        let mut from = s.acked() + 1;
        while let Some(r) = s.read(from).expect("read after recovery") {
            assert!(
                r.seq >= from && r.seq > s.acked(),
                "seq {} handed out twice",
                r.seq
            );
            from = r.seq.saturating_add(1);
            recs.push(r);
            if from == u64::MAX {
                break;
            }
        }
        recs
    };
    let before = read_all(&spool);
    let seq = match spool.append(b"meta", b"payload") {
        Ok(seq) => seq,
        // The spool refuses appends past its seq space; recovery itself succeeded.
        Err(SpoolError::Failed(_)) | Err(SpoolError::Full { .. }) => return,
        Err(e) => panic!("append after recovery: {e}"),
    };
    assert!(
        before.last().is_none_or(|r| r.seq < seq),
        "seq {seq} reused"
    );
    spool.commit().expect("commit after recovery");
    drop(spool);
    fs.crash();
    let (again, rec) = open(&fs).expect("second open");
    let after = read_all(&again);
    assert_eq!(
        after.last().map(|r| r.seq),
        Some(seq),
        "committed record lost"
    );
    assert_eq!(
        &after[..after.len() - 1],
        &before[..],
        "second open found other records ({:?})",
        rec.messages
    );
}

fn seeds_spool_recovery() -> Vec<Vec<u8>> {
    use crate::spool::format::{Ledger, encode_ledger, encode_record, encode_segment_header};
    let mut seg = encode_segment_header(1).to_vec();
    for seq in 1..=3 {
        encode_record(&mut seg, seq, 1_700_000_000_000, b"{\"m\":1}", b"payload");
    }
    let mut seg2 = encode_segment_header(4).to_vec();
    encode_record(&mut seg2, 4, 1_700_000_000_000, b"m", &[7u8; 40]);
    let ledger = encode_ledger(Ledger {
        acked: 1,
        checkpointed: 1,
    });
    let mut two = vec![0u8];
    two.extend_from_slice(&seg);
    two.extend_from_slice(&seg2);
    let mut with_ledger = vec![1u8];
    with_ledger.extend_from_slice(&ledger);
    with_ledger.extend_from_slice(&seg);
    let mut torn = vec![4u8];
    torn.extend_from_slice(&seg[..seg.len() - 5]);
    vec![two, with_ledger, torn]
}

// ---------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------

/// The checkpoint file. Byte 0 odd: a correct header is made for the rest (so the JSON
/// is reached); even: the rest is the file. A decoded file must re-encode to an equal
/// one; applying any JSON cursor must not panic.
pub fn checkpoints(data: &[u8]) {
    use crate::agent::sources::checkpoint::Checkpoints;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 1 {
        let mut f = format!(
            "soclink-checkpoints v1 crc32={:08x}\n",
            crc32fast::hash(rest)
        )
        .into_bytes();
        f.extend_from_slice(rest);
        f
    } else {
        rest.to_vec()
    };
    if let Ok(mut c) = Checkpoints::decode(&file) {
        let again = Checkpoints::decode(&c.encode()).expect("an encoded checkpoint decodes");
        assert_eq!(again, c, "checkpoint does not round-trip");
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
            for (k, cursor) in v.as_object().into_iter().flatten() {
                c.apply(k, cursor);
            }
        }
    }
}

fn seeds_checkpoints() -> Vec<Vec<u8>> {
    use crate::agent::sources::checkpoint::{Checkpoints, FilePos};
    let mut c = Checkpoints {
        spool_seq: 42,
        ..Default::default()
    };
    c.apply(
        "files",
        &serde_json::to_value(vec![FilePos {
            dev: 1,
            ino: 2,
            fp_len: 64,
            fp: 99,
            path: "/var/log/a.log".into(),
            offset: 1234,
            gone: false,
        }])
        .unwrap_or_default(),
    );
    c.apply("journal", &serde_json::json!("s=abc;i=1"));
    let mut even = vec![0u8];
    even.extend_from_slice(&c.encode());
    let mut odd = vec![1u8];
    odd.extend_from_slice(&serde_json::to_vec(&c).unwrap_or_default());
    vec![even, odd]
}

// ---------------------------------------------------------------------------------------
// Evidence bundles
// ---------------------------------------------------------------------------------------

/// Bundle verification (gzip + tar + manifest), with small limits so a bomb is cut off
/// fast. Byte 0 odd: the rest is a tar stream compressed here; even: a .tar.gz.
pub fn bundle_verify(data: &[u8]) {
    use crate::incident::verify::{VerifyLimits, verify_reader};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let limits = VerifyLimits {
        max_decompressed: 4 << 20,
        max_members: 64,
    };
    let gz;
    let bytes = if mode & 1 == 1 {
        gz = gzip(rest);
        &gz[..]
    } else {
        rest
    };
    if let Ok(report) = verify_reader(Cursor::new(bytes), limits) {
        assert!(report.members <= limits.max_members);
        assert!(report.bytes <= limits.max_decompressed);
        assert_eq!(report.manifest_sha256.len(), 64);
    }
}

fn seeds_bundle_verify() -> Vec<Vec<u8>> {
    use sha2::Digest;
    let member = b"Nov 26 01:02:03 host sshd[1]: Failed password\n";
    let sha = crate::incident::hex(&sha2::Sha256::digest(member));
    let manifest = serde_json::json!({
        "format": crate::agent::incident::bundle::FORMAT,
        "created_at": "2026-11-26T01:00:00Z",
        "window_from": "2026-11-26T00:00:00Z",
        "window_to": "2026-11-26T01:00:00Z",
        "agent": {"id": "agent-1", "host": "h", "version": "0.1.0"},
        "drill": true,
        "incident": incident_json(),
        "size_cap": 1048576,
        "members": [{"path": "files/var/log/auth.log", "size": member.len(), "sha256": sha,
                     "kind": "file", "source": "auth"}],
        "left_out": [{"path": "/var/log/big", "size": 9, "reason": "cap"}],
        "errors": [{"what": "journal", "error": "none"}],
    });
    let manifest = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, body: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let _ = tar.append_data(&mut h, name, body);
    };
    add("files/var/log/auth.log", member);
    add(crate::incident::MANIFEST_NAME, &manifest);
    let tar = tar.into_inner().unwrap_or_default();
    let mut odd = vec![1u8];
    odd.extend_from_slice(&tar);
    let mut even = vec![0u8];
    even.extend_from_slice(&gzip(&tar));
    vec![odd, even]
}

// ---------------------------------------------------------------------------------------
// Control socket, config, TLS files
// ---------------------------------------------------------------------------------------

/// One control-socket request line: accepted requests are objects with a string `cmd`,
/// and survive a JSON round trip.
pub fn control_request(data: &[u8]) {
    use crate::ops::control::{cmd_of, parse_request, unknown_command};
    if let Ok(req) = parse_request(data) {
        let cmd = cmd_of(&req);
        assert_eq!(req.get("cmd").and_then(|c| c.as_str()), Some(cmd));
        let _ = unknown_command(cmd, &["status", "reload"]);
        let text = serde_json::to_vec(&req).expect("a Value serialises");
        let back = parse_request(&text).expect("a serialised request parses");
        assert!(same_json(&back, &req), "{back} != {req}");
    }
}

/// Equal JSON, except that floats may differ in their last bits: serde_json's fast
/// float parsing is not exactly round-trip (a regression input has 1.8446744073709442e27
/// come back as ...944e27), which is not a property of ours.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn seeds_control_request() -> Vec<Vec<u8>> {
    [
        &br#"{"cmd":"status"}"#[..],
        br#"{"cmd":"incident.declare","level":3,"summary":"x","drill":true}"#,
        br#"{"cmd":"bundle","incident":"INC-20261126-0001-abcd","since":"1h"}"#,
        b"  ",
        br#"[1,2]"#,
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

/// The agent and relay TOML configs: every problem is located inside the text, and a
/// valid config renders its summary.
pub fn config_toml(data: &[u8]) {
    use crate::config::{ConfigError, parse_agent, parse_relay};
    let text = String::from_utf8_lossy(data);
    let lines = text.split('\n').count();
    let check = |problems: Vec<crate::config::Problem>| {
        assert!(!problems.is_empty(), "an error without a problem");
        for p in &problems {
            assert!(p.line <= lines, "problem at line {} of {lines}", p.line);
            assert!(!p.message.is_empty());
        }
        let e = ConfigError {
            path: "fuzz.toml".into(),
            problems,
        };
        let _ = e.to_string();
    };
    match parse_agent(&text) {
        Ok(c) => {
            let _ = c.summary();
        }
        Err(p) => check(p),
    }
    match parse_relay(&text) {
        Ok(c) => {
            let _ = c.summary();
        }
        Err(p) => check(p),
    }
}

fn seeds_config_toml() -> Vec<Vec<u8>> {
    vec![
        include_bytes!("../config/agent.toml").to_vec(),
        include_bytes!("../config/relay.toml").to_vec(),
        b"[agent]\nid = \"a\"\n[[source]]\nname = \"s\"\ntype = \"syslog\"\nlisten = [\"udp://127.0.0.1:5514\"]\n".to_vec(),
    ]
}

/// A CA the PEM target verifies CRLs against when the input brings no usable root.
fn fuzz_ca() -> &'static rustls_pki_types::CertificateDer<'static> {
    static CA: OnceLock<rustls_pki_types::CertificateDer<'static>> = OnceLock::new();
    CA.get_or_init(|| {
        let ca = crate::certs::Ca::new("soclink fuzz CA").expect("a throwaway CA");
        crate::tls::certs_from_pem(ca.cert_pem.as_bytes(), Path::new("ca.pem"))
            .expect("rcgen PEM parses")
            .remove(0)
    })
}

/// PEM files as `ca`, `cert`, `key` and `crl` read them: certificates, their identity,
/// the private key (parsed by the crypto provider) and CRLs (parsed by the verifier).
pub fn tls_pem(data: &[u8]) {
    use crate::tls::{certs_from_pem, crls_from_pem, identity_from_cert, key_from_pem, provider};
    let path = Path::new("fuzz.pem");
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(certs) = certs_from_pem(data, path) {
        assert!(!certs.is_empty());
        for c in certs {
            if let Ok(id) = identity_from_cert(&c) {
                crate::tls::validate_identity(&id).expect("identity is checked");
            }
            let _ = roots.add(c);
        }
    }
    if let Ok(key) = key_from_pem(data, path) {
        let _ = provider().key_provider.load_private_key(key);
    }
    if let Ok(crls) = crls_from_pem(data, path) {
        if roots.is_empty() {
            let _ = roots.add(fuzz_ca().clone());
        }
        let _ = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .with_crls(crls)
        .build();
    }
}

fn seeds_tls_pem() -> Vec<Vec<u8>> {
    use crate::certs::{Ca, CertKind, IssueParams};
    let Ok(ca) = Ca::new("soclink fuzz CA") else {
        return Vec::new();
    };
    let Ok(leaf) = ca.issue(&IssueParams::new(
        "agent-1",
        &["agent-1.example"],
        CertKind::Client,
    )) else {
        return Vec::new();
    };
    let crl = ca.revoke(&[&leaf.der]).unwrap_or_default();
    vec![
        ca.cert_pem.clone().into_bytes(),
        format!("{}{}", leaf.cert_pem, ca.cert_pem).into_bytes(),
        leaf.key_pem.clone().into_bytes(),
        format!("{}{crl}", ca.cert_pem).into_bytes(),
    ]
}

// ---------------------------------------------------------------------------------------
// Relay store state, incident records, event encoding
// ---------------------------------------------------------------------------------------

const STATE_AGENT: &str = "agent-1";

/// A relay store's per-agent dedupe state file. Byte 0 odd: a correct header is made
/// for the rest; even: the rest is the file. A parsed state re-encodes to an equal one.
pub fn relay_store_state(data: &[u8]) {
    use crate::relay::sink::file::{encode_state, parse_state};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 1 {
        let mut f = format!(
            "soclink-store-state v1 crc32={:08x} len={}\n",
            crc32fast::hash(rest),
            rest.len()
        )
        .into_bytes();
        f.extend_from_slice(rest);
        f
    } else {
        rest.to_vec()
    };
    let path = Path::new("agent-1.state");
    if let Ok(state) = parse_state(&file, path, STATE_AGENT) {
        let bytes = encode_state(STATE_AGENT, &state).expect("a state encodes");
        let again = parse_state(&bytes, path, STATE_AGENT).expect("an encoded state parses");
        assert_eq!(again, state, "state does not round-trip");
    }
}

fn seeds_relay_store_state() -> Vec<Vec<u8>> {
    let body = br#"{"version":1,"agent":"agent-1","streams":{"main":42,"incidents":3},"files":[{"source":"syslog","day":"2026-11-26","len":1234,"touched_unix":1764115200}],"bytes":1234,"last_write_unix_ms":1764115200000}"#;
    let mut odd = vec![1u8];
    odd.extend_from_slice(body);
    let mut even = vec![0u8];
    even.extend_from_slice(
        format!(
            "soclink-store-state v1 crc32={:08x} len={}\n",
            crc32fast::hash(body),
            body.len()
        )
        .as_bytes(),
    );
    even.extend_from_slice(body);
    vec![odd, even]
}

fn incident_json() -> serde_json::Value {
    serde_json::json!({
        "id": "INC-20261126-0001-abcd",
        "level": 3,
        "summary": "ransomware on file server",
        "details": "encrypted shares",
        "discovered_at": "2026-11-26T01:00:00Z",
        "declared_at": "2026-11-26T01:05:00+08:00",
        "deadline": "2026-11-26T02:00:00Z",
        "support_requested": true,
        "affects_other_agencies": false,
        "affects_critical_infrastructure": false,
        "drill": false,
        "agent_id": "agent-1",
        "host": "fs1",
        "timeline": [
            {"event": "declared", "at": "2026-11-26T01:05:00Z", "detail": "level 3"},
            {"event": "delivered", "at": "2026-11-26T01:06:00Z", "detail": ""},
            {"event": "acknowledged", "at": "2026-11-26T02:30:00Z", "detail": "center"}
        ],
        "bundle": {"path": "bundle.tar.gz", "size": 10, "members": 1, "left_out": 0,
                   "manifest_sha256": "00"},
        "closing_report": null
    })
}

/// An incident record (`record.json`): a parsed record renders in every view and
/// survives a JSON round trip.
pub fn incident_record(data: &[u8]) {
    use crate::incident::record::{Incident, LinkStatus, render_list, render_show};
    let Ok(inc) = serde_json::from_slice::<Incident>(data) else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_115_200);
    let link = LinkStatus {
        upstream_down_since: Some(inc.declared_at),
        center_contact: Some("+886-2-0000".into()),
    };
    let _ = render_show(&inc, now, &link);
    let _ = render_list(
        std::slice::from_ref(&inc),
        inc.deadline,
        &LinkStatus::default(),
    );
    let _ = inc.deadline_text(inc.discovered_at);
    let text = serde_json::to_vec(&inc).expect("an incident serialises");
    let back: Incident = serde_json::from_slice(&text).expect("a serialised incident parses");
    assert_eq!(back, inc, "incident does not round-trip");
}

fn seeds_incident_record() -> Vec<Vec<u8>> {
    vec![serde_json::to_vec_pretty(&incident_json()).unwrap_or_default()]
}

/// The event encoder: any line (any bytes) encodes to one JSON line whose message
/// decodes back to the same bytes, with the offset and truncation flag intact.
pub fn event_encode(data: &[u8]) {
    use crate::event::{FilePrefix, encode_file_line, message_bytes, push_json_str};
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    // Split off a path so the prefix's own escaping is exercised too.
    let (path, line) = match memchr::memchr(0xff, rest) {
        Some(i) => (
            String::from_utf8_lossy(&rest[..i]).into_owned(),
            &rest[i + 1..],
        ),
        None => ("/var/log/a.log".to_string(), rest),
    };
    let prefix = FilePrefix::new("2026-11-26T00:00:00Z", "host", "src", &path);
    let offset = u64::from(flags) << 40 | rest.len() as u64;
    let truncated = flags & 1 == 1;
    let mut out = Vec::new();
    encode_file_line(&mut out, &prefix, offset, line, truncated);
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("event is not JSON");
    assert_eq!(message_bytes(&v).as_deref(), Some(line));
    assert_eq!(v.get("path").and_then(|p| p.as_str()), Some(path.as_str()));
    assert_eq!(v.get("offset").and_then(|o| o.as_u64()), Some(offset));
    assert_eq!(v.get("truncated").is_some(), truncated);
    let s = String::from_utf8_lossy(line);
    let mut js = Vec::new();
    push_json_str(&mut js, &s);
    assert_eq!(
        serde_json::from_slice::<String>(&js).ok().as_deref(),
        Some(&*s)
    );
}

fn seeds_event_encode() -> Vec<Vec<u8>> {
    vec![
        b"\x00plain line".to_vec(),
        b"\x01/var/log/\"q\".log\xffline with \x00 NUL\r and \xc3\xa9".to_vec(),
        b"\x02\xfe\xfd invalid utf8 \xe4\xb8".to_vec(),
        "\u{4}中文 \u{1b}[31m \\ \" \u{2028}".as_bytes().to_vec(),
    ]
}

/// An intel item as the relay receives it: verification never panics and stays within
/// its bound; an item that verifies, written again from its header and records,
/// verifies to the same header. The bytes as an item name never panic the name check.
pub fn intel_items(data: &[u8]) {
    use std::io::{BufRead, Read};
    if let Ok(name) = std::str::from_utf8(data) {
        let _ = crate::intel::valid_item_name(name);
    }
    let Ok(h) = crate::intel::item::verify(data, 4 << 20) else {
        return;
    };
    let mut r = std::io::BufReader::new(flate2::read::GzDecoder::new(data));
    let mut header = Vec::new();
    r.read_until(b'\n', &mut header)
        .expect("verified item inflates");
    let mut records = Vec::new();
    r.take(h.records_bytes)
        .read_to_end(&mut records)
        .expect("verified item inflates");
    let again = crate::intel::item::write(Vec::new(), &h, std::iter::once(Ok(records)))
        .expect("writing to memory");
    let h2 = crate::intel::item::verify(&again[..], 4 << 20).expect("a rewritten item verifies");
    assert_eq!(h2, h, "intel header does not round-trip");
}

fn seeds_intel_items() -> Vec<Vec<u8>> {
    use sha2::Digest;
    let records = b"{\"message\":\"alert 1\"}\n{\"message\":\"alert 2\"}\n".to_vec();
    let h = crate::intel::item::Header {
        format: crate::intel::item::FORMAT.into(),
        agent: "a".into(),
        host: "h".into(),
        period_start: "2026-11-26T03:00:00Z".into(),
        period_end: "2026-11-26T04:00:00Z".into(),
        partial: false,
        generated_at: "2026-11-26T04:00:01Z".into(),
        records: 2,
        records_bytes: records.len() as u64,
        records_sha256: crate::incident::hex(&sha2::Sha256::digest(&records)),
        records_left_out: 0,
        records_left_out_bytes: 0,
        summary: serde_json::json!({"sources": {"app": {"lines": 3}}}),
    };
    let empty = crate::intel::item::Header {
        records: 0,
        records_bytes: 0,
        records_sha256: crate::incident::hex(&sha2::Sha256::digest(b"")),
        ..h.clone()
    };
    vec![
        crate::intel::item::write(Vec::new(), &h, std::iter::once(Ok(records))).unwrap_or_default(),
        crate::intel::item::write(Vec::new(), &empty, std::iter::empty()).unwrap_or_default(),
        b"20261126T030000Z.partial-20261126T031712Z.json.gz".to_vec(),
    ]
}
