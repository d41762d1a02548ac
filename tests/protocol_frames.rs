//! The wire format byte for byte, its limits, and batch verification against hostile
//! gzip (bombs, concatenated members, bad CRC, bad JSON, lying counts).

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::{Compress, Compression, FlushCompress};
use soclink::batch::Origin;
use soclink::protocol::{
    Ack, Batch, BatchError, BatchHeader, ErrorCode, ErrorFrame, Frame, FrameType, Hello, HelloAck,
    Limits, ProtocolError, Refuse, ResumePoint, SUPPORTED_VERSIONS, decode, encode, negotiate,
    read_frame, verify_batch, write_frame,
};
use tokio::io::BufReader;

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn enc(f: &Frame) -> Vec<u8> {
    let mut v = Vec::new();
    encode(f, &mut v).unwrap();
    v
}

async fn read_all(bytes: &[u8], limits: &Limits) -> Vec<Result<Frame, ProtocolError>> {
    let mut r = BufReader::new(bytes);
    let mut out = Vec::new();
    loop {
        let f = read_frame(&mut r, limits).await;
        let stop = f.is_err();
        out.push(f);
        if stop {
            return out;
        }
    }
}

fn batch_frame(gzip: Vec<u8>) -> Frame {
    Frame::Batch(Batch {
        header: BatchHeader {
            stream: "files".into(),
            seq: 7,
            source: "auth".into(),
            day: "2026-11-26".into(),
            events: 2,
            raw_bytes: 20,
            origin: None,
            item: None,
        },
        gzip: Bytes::from(gzip),
    })
}

#[test]
fn ack_and_batch_layout_is_exact() {
    let ack = enc(&Frame::Ack(Ack {
        stream: "s".into(),
        seq: 5,
    }));
    let json = br#"{"stream":"s","seq":5}"#;
    let mut want = ((json.len() + 1) as u32).to_be_bytes().to_vec();
    want.push(0x11);
    want.extend_from_slice(json);
    assert_eq!(ack, want);

    let f = batch_frame(vec![0x1f, 0x8b, 0xAA]);
    let bytes = enc(&f);
    let header = br#"{"stream":"files","seq":7,"source":"auth","day":"2026-11-26","events":2,"raw_bytes":20}"#;
    let mut want = ((1 + 4 + header.len() + 3) as u32).to_be_bytes().to_vec();
    want.push(0x10);
    want.extend_from_slice(&(header.len() as u32).to_be_bytes());
    want.extend_from_slice(header);
    want.extend_from_slice(&[0x1f, 0x8b, 0xAA]);
    assert_eq!(bytes, want);
    let (back, used) = decode(&bytes, &Limits::default()).unwrap();
    assert_eq!((back, used), (f, bytes.len()));
}

#[tokio::test]
async fn every_frame_roundtrips_through_the_async_codec() {
    let frames = vec![
        Frame::Hello(Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            agent_version: "0.1.0".into(),
            streams: vec!["files".into(), "incidents".into()],
        }),
        Frame::HelloAck(HelloAck {
            version: 1,
            relay_id: "center".into(),
            relay_version: "0.1.0".into(),
            resume: vec![ResumePoint {
                stream: "files".into(),
                last_seq: 41,
            }],
        }),
        Frame::Refuse(Refuse {
            reason: "no".into(),
            versions: vec![1],
        }),
        batch_frame(gz(b"{\"a\":1}\n{\"b\":2}\n")),
        Frame::Batch(Batch {
            header: BatchHeader {
                origin: Some(Origin {
                    agent: "agent-01".into(),
                    stream: "files".into(),
                    seq: 99,
                }),
                ..match batch_frame(vec![]) {
                    Frame::Batch(b) => b.header,
                    _ => unreachable!(),
                }
            },
            gzip: Bytes::from_static(b"x"),
        }),
        Frame::Ack(Ack {
            stream: "files".into(),
            seq: 7,
        }),
        Frame::Ping(1),
        Frame::Pong(u64::MAX),
        Frame::Error(ErrorFrame {
            code: ErrorCode::BatchRejected,
            message: "line 3 is not valid JSON".into(),
        }),
    ];
    let (mut a, b) = tokio::io::duplex(1024);
    let sent = frames.clone();
    let writer = tokio::spawn(async move {
        for f in &sent {
            write_frame(&mut a, f).await.unwrap();
        }
    });
    let mut r = BufReader::new(b);
    for f in &frames {
        assert_eq!(&read_frame(&mut r, &Limits::default()).await.unwrap(), f);
    }
    writer.await.unwrap();
    assert!(matches!(
        read_frame(&mut r, &Limits::default()).await,
        Err(ProtocolError::Closed)
    ));
}

#[test]
fn unknown_error_code_from_a_newer_peer_is_kept() {
    let json = br#"{"code":"quota_exceeded","message":"m"}"#;
    let mut bytes = ((json.len() + 1) as u32).to_be_bytes().to_vec();
    bytes.push(0x7F);
    bytes.extend_from_slice(json);
    let (f, _) = decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(
        f,
        Frame::Error(ErrorFrame {
            code: ErrorCode::Unknown,
            message: "m".into()
        })
    );
}

#[tokio::test]
async fn frame_claiming_4_gib_is_refused_before_reading_the_body() {
    let bytes = [0xFF, 0xFF, 0xFF, 0xFF, 0x10];
    let limits = Limits::default();
    assert!(matches!(
        decode(&bytes, &limits),
        Err(ProtocolError::FrameTooLarge {
            len: 0xFFFF_FFFF,
            ty: FrameType::Batch,
            ..
        })
    ));
    let got = read_all(&bytes, &limits).await;
    assert!(
        matches!(
            got[0],
            Err(ProtocolError::FrameTooLarge {
                len: 0xFFFF_FFFF,
                ..
            })
        ),
        "{got:?}"
    );
    // A control frame is bounded by the smaller control limit.
    let mut ping = ((limits.max_control + 1).to_be_bytes()).to_vec();
    ping.push(0x20);
    assert!(matches!(
        decode(&ping, &limits),
        Err(ProtocolError::FrameTooLarge {
            ty: FrameType::Ping,
            ..
        })
    ));
}

#[tokio::test]
async fn zero_length_and_unknown_type_are_typed_errors() {
    let limits = Limits::default();
    assert!(matches!(
        decode(&[0, 0, 0, 0, 0x11], &limits),
        Err(ProtocolError::EmptyFrame)
    ));
    let got = read_all(&[0, 0, 0, 0, 0x11], &limits).await;
    assert!(matches!(got[0], Err(ProtocolError::EmptyFrame)));
    assert!(matches!(
        decode(&[0, 0, 0, 1, 0x99], &limits),
        Err(ProtocolError::UnknownType(0x99))
    ));
}

#[tokio::test]
async fn truncated_frame_is_a_typed_error() {
    let limits = Limits::default();
    let full = enc(&batch_frame(gz(b"{}\n")));
    for cut in [1, 4, 5, full.len() - 1] {
        let part = &full[..cut];
        assert!(
            matches!(decode(part, &limits), Err(ProtocolError::Truncated { .. })),
            "cut at {cut}"
        );
        let got = read_all(part, &limits).await;
        assert!(
            matches!(got[0], Err(ProtocolError::Truncated { .. })),
            "cut at {cut}: {got:?}"
        );
    }
    // Nothing at all: a clean close, not a truncation.
    assert!(matches!(
        read_all(&[], &limits).await[0],
        Err(ProtocolError::Closed)
    ));
}

#[tokio::test]
async fn garbage_after_a_valid_frame() {
    let limits = Limits::default();
    let mut bytes = enc(&Frame::Ping(3));
    let valid = bytes.len();
    bytes.extend_from_slice(&[0, 0, 0, 2, 0xEE, 0xEE]);
    let (f, used) = decode(&bytes, &limits).unwrap();
    assert_eq!((f, used), (Frame::Ping(3), valid));
    assert!(matches!(
        decode(&bytes[used..], &limits),
        Err(ProtocolError::UnknownType(0xEE))
    ));
    let got = read_all(&bytes, &limits).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].as_ref().unwrap(), &Frame::Ping(3));
    assert!(matches!(got[1], Err(ProtocolError::UnknownType(0xEE))));
}

#[test]
fn malformed_bodies_are_typed_errors() {
    let limits = Limits::default();
    // Ping with 3 bytes of body.
    let e = decode(&[0, 0, 0, 4, 0x20, 1, 2, 3], &limits).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::BadBody {
                ty: FrameType::Ping,
                ..
            }
        ),
        "{e}"
    );
    // Batch whose header length runs past the frame.
    let e = decode(&[0, 0, 0, 6, 0x10, 0, 0, 0, 9, b'{'], &limits).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::BadBody {
                ty: FrameType::Batch,
                ..
            }
        ),
        "{e}"
    );
    // Batch with fewer than 4 body bytes.
    let e = decode(&[0, 0, 0, 2, 0x10, 0], &limits).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::BadBody {
                ty: FrameType::Batch,
                ..
            }
        ),
        "{e}"
    );
    // Hello that is not JSON.
    let e = decode(&[0, 0, 0, 2, 0x01, b'x'], &limits).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::BadBody {
                ty: FrameType::Hello,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unsafe_names_in_batch_headers_are_refused() {
    let limits = Limits::default();
    let base = match batch_frame(gz(b"{}\n")) {
        Frame::Batch(b) => b,
        _ => unreachable!(),
    };
    type Mutate = Box<dyn Fn(&mut BatchHeader)>;
    let cases: Vec<(&str, Mutate)> = vec![
        ("source", Box::new(|h| h.source = "../etc".into())),
        ("source", Box::new(|h| h.source = String::new())),
        ("stream", Box::new(|h| h.stream = "a/b".into())),
        ("day", Box::new(|h| h.day = "2026-13-01".into())),
        ("day", Box::new(|h| h.day = "../../x/".into())),
        ("day", Box::new(|h| h.day = "2026-1-011".into())),
        (
            "origin agent",
            Box::new(|h| {
                h.origin = Some(Origin {
                    agent: "..".into(),
                    stream: "s".into(),
                    seq: 1,
                })
            }),
        ),
    ];
    for (what, mutate) in cases {
        let mut b = base.clone();
        mutate(&mut b.header);
        let bytes = enc(&Frame::Batch(b));
        match decode(&bytes, &limits) {
            Err(ProtocolError::BadBody {
                ty: FrameType::Batch,
                reason,
            }) => {
                assert!(reason.starts_with(what), "{what}: {reason}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    let hello = enc(&Frame::Hello(Hello {
        versions: vec![1],
        agent_version: "x".into(),
        streams: vec!["ok".into(), "..".into()],
    }));
    assert!(matches!(
        decode(&hello, &limits),
        Err(ProtocolError::BadBody {
            ty: FrameType::Hello,
            ..
        })
    ));
}

#[test]
fn version_negotiation_names_both_sides() {
    assert_eq!(negotiate(&[1, 2], SUPPORTED_VERSIONS), Ok(1));
    let e = negotiate(&[2, 3], &[1]).unwrap_err();
    assert_eq!(
        e,
        "no common protocol version: the agent speaks [2, 3], the relay speaks [1]; upgrade the older side"
    );
}

const GOOD: &[u8] =
    b"{\"ts\":\"2026-11-26T00:00:00Z\",\"message\":\"a\"}\n{\"message\":\"b\\n\"}\n";

#[test]
fn good_batch_verifies() {
    verify_batch(&gz(GOOD), 2, GOOD.len() as u64, 1 << 20).unwrap();
    // An empty batch is one empty member.
    verify_batch(&gz(b""), 0, 0, 1 << 20).unwrap();
}

#[test]
fn lines_spanning_inflate_chunks_verify() {
    let mut raw = Vec::new();
    let long = "x".repeat(200_000);
    for i in 0..5 {
        raw.extend_from_slice(format!("{{\"i\":{i},\"m\":\"{long}\"}}\n").as_bytes());
    }
    verify_batch(&gz(&raw), 5, raw.len() as u64, 1 << 24).unwrap();
}

#[test]
fn wrong_counts_are_refused() {
    let g = gz(GOOD);
    let n = GOOD.len() as u64;
    assert_eq!(
        verify_batch(&g, 3, n, 1 << 20),
        Err(BatchError::EventCount {
            declared: 3,
            actual: 2
        })
    );
    assert_eq!(
        verify_batch(&g, 2, n + 1, 1 << 20),
        Err(BatchError::RawBytes {
            declared: n + 1,
            actual: n
        })
    );
    // Declaring fewer bytes than it holds is caught at the bound, mid-inflate.
    assert_eq!(
        verify_batch(&g, 2, n - 1, 1 << 20),
        Err(BatchError::InflatesTooLarge { bound: n - 1 })
    );
    assert_eq!(
        verify_batch(&g, 2, n, n - 1),
        Err(BatchError::DeclaredTooLarge {
            declared: n,
            max: n - 1
        })
    );
}

#[test]
fn bad_json_names_the_line() {
    let raw = b"{\"a\":1}\n{\"a\":\n{\"c\":3}\n";
    match verify_batch(&gz(raw), 3, raw.len() as u64, 1 << 20) {
        Err(BatchError::BadJson { line: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    let raw = b"{\"a\":1}\n[1,2]\n";
    assert_eq!(
        verify_batch(&gz(raw), 2, raw.len() as u64, 1 << 20),
        Err(BatchError::NotObject { line: 2 })
    );
    let raw = b"{\"a\":1}\n\n";
    assert_eq!(
        verify_batch(&gz(raw), 2, raw.len() as u64, 1 << 20),
        Err(BatchError::NotObject { line: 2 })
    );
    let raw = b"{\"a\":1}\n{\"b\":2}";
    assert_eq!(
        verify_batch(&gz(raw), 2, raw.len() as u64, 1 << 20),
        Err(BatchError::MissingFinalNewline)
    );
    let raw = b"{\"a\":1} x\n";
    assert!(matches!(
        verify_batch(&gz(raw), 1, raw.len() as u64, 1 << 20),
        Err(BatchError::BadJson { line: 1, .. })
    ));
}

#[test]
fn concatenated_members_and_trailing_bytes_are_refused() {
    let mut two = gz(b"{\"a\":1}\n");
    let first = two.len();
    two.extend_from_slice(&gz(b"{\"a\":2}\n"));
    assert_eq!(
        verify_batch(&two, 2, 16, 1 << 20),
        Err(BatchError::TrailingData(two.len() - first))
    );
    let mut junk = gz(b"{\"a\":1}\n");
    junk.push(0);
    assert_eq!(
        verify_batch(&junk, 1, 8, 1 << 20),
        Err(BatchError::TrailingData(1))
    );
}

#[test]
fn bad_crc_and_bad_gzip_are_refused() {
    let mut g = gz(GOOD);
    let crc_at = g.len() - 8;
    g[crc_at] ^= 0xFF;
    assert!(matches!(
        verify_batch(&g, 2, GOOD.len() as u64, 1 << 20),
        Err(BatchError::Gzip(_))
    ));
    let mut g = gz(GOOD);
    g.truncate(g.len() - 3);
    assert!(matches!(
        verify_batch(&g, 2, GOOD.len() as u64, 1 << 20),
        Err(BatchError::Gzip(_))
    ));
    assert!(matches!(
        verify_batch(b"not gzip", 0, 0, 1 << 20),
        Err(BatchError::Gzip(_))
    ));
    assert!(matches!(
        verify_batch(b"", 0, 0, 1 << 20),
        Err(BatchError::Gzip(_))
    ));
}

/// A real gzip of 1 GiB of valid NDJSON (`{"a":0}` lines; about 1 MiB compressed),
/// built from one full-flushed deflate segment repeated, since a full flush resets
/// the compressor.
fn gzip_bomb_1gib() -> Vec<u8> {
    const CHUNK: usize = 1 << 20;
    let lines = b"{\"a\":0}\n".repeat(CHUNK / 8);
    let segment = |c: &mut Compress| {
        let mut out = Vec::with_capacity(8192);
        let before = c.total_in();
        c.compress_vec(&lines, &mut out, FlushCompress::Full)
            .unwrap();
        assert_eq!(c.total_in() - before, CHUNK as u64);
        out
    };
    let mut c = Compress::new(Compression::best(), false);
    let seg = segment(&mut c);
    assert_eq!(segment(&mut c), seg, "full-flushed segments must repeat");
    let mut tail = Vec::with_capacity(64);
    c.compress_vec(&[], &mut tail, FlushCompress::Finish)
        .unwrap();

    let mut crc_chunk = crc32fast::Hasher::new();
    crc_chunk.update(&lines);
    let mut crc = crc32fast::Hasher::new();
    for _ in 0..1024 {
        crc.combine(&crc_chunk);
    }
    let mut g = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    for _ in 0..1024 {
        g.extend_from_slice(&seg);
    }
    g.extend_from_slice(&tail);
    g.extend_from_slice(&crc.finalize().to_le_bytes());
    g.extend_from_slice(&(1u32 << 30).to_le_bytes());
    g
}

#[test]
fn zeros_are_refused_at_the_first_byte() {
    // No newline anywhere: refused as soon as the first line cannot start an object,
    // not after carrying the whole "line".
    let g = gz(&vec![0u8; 4 << 20]);
    assert_eq!(
        verify_batch(&g, 1, 4 << 20, 1 << 30),
        Err(BatchError::NotObject { line: 1 })
    );
}

#[test]
fn gzip_bomb_is_refused_quickly() {
    let bomb = gzip_bomb_1gib();
    assert!(bomb.len() < 4 << 20, "bomb is {} bytes", bomb.len());
    let t = Instant::now();
    let events = (1u32 << 30) / 8;
    // Honest about its size but over the relay's limit: refused without inflating.
    assert_eq!(
        verify_batch(&bomb, events, 1 << 30, 64 << 20),
        Err(BatchError::DeclaredTooLarge {
            declared: 1 << 30,
            max: 64 << 20
        })
    );
    // Lying about its size: cut off one byte past the declared size.
    assert_eq!(
        verify_batch(&bomb, events, 1 << 20, 64 << 20),
        Err(BatchError::InflatesTooLarge { bound: 1 << 20 })
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn newline_free_line_is_bounded() {
    // `{` followed by 17 MiB of spaces: no newline, so the line is carried until the
    // per-line bound refuses it.
    let mut raw = vec![b' '; 17 << 20];
    raw[0] = b'{';
    // Stored (level 0) keeps this test fast in debug builds.
    let mut e = GzEncoder::new(Vec::new(), Compression::none());
    e.write_all(&raw).unwrap();
    let g = e.finish().unwrap();
    assert_eq!(
        verify_batch(&g, 1, raw.len() as u64, 1 << 30),
        Err(BatchError::LineTooLong {
            line: 1,
            max: soclink::protocol::MAX_EVENT_LINE
        })
    );
}
