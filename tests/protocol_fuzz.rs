//! Property tests for the frame codec: arbitrary bytes never panic the decoders nor
//! make them allocate past the limits, and every frame survives encode → decode.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use proptest::prelude::*;
use soclink::batch::Origin;
use soclink::protocol::{
    Ack, Batch, BatchHeader, ErrorCode, ErrorFrame, Frame, Hello, HelloAck, Limits, ProtocolError,
    Refuse, ResumePoint, decode, encode, read_frame, verify_batch, write_frame,
};
use tokio::io::{AsyncRead, ReadBuf};

/// Serves `data` a few bytes at a time and records the largest buffer the decoder
/// offered to fill: the decoder's body buffer is at least that large, so this bounds
/// what it allocated.
struct SpyReader {
    data: Vec<u8>,
    pos: usize,
    step: usize,
    max_offered: usize,
}

impl AsyncRead for SpyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        me.max_offered = me.max_offered.max(buf.remaining());
        let n = me.step.min(buf.remaining()).min(me.data.len() - me.pos);
        buf.put_slice(&me.data[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Small limits so that "past the limit" is reachable by generated inputs.
const SMALL: Limits = Limits {
    max_frame: 4096,
    max_control: 512,
};

/// Bytes that often look like a frame: a plausible prefix (known or unknown type, any
/// length) followed by random body bytes, or nothing structured at all.
fn frameish() -> impl Strategy<Value = Vec<u8>> {
    let types = prop_oneof![
        Just(0x01u8),
        Just(0x02),
        Just(0x03),
        Just(0x10),
        Just(0x11),
        Just(0x20),
        Just(0x21),
        Just(0x7F),
        any::<u8>()
    ];
    let lens = prop_oneof![0u32..64, 0u32..5000, any::<u32>()];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (lens, types, proptest::collection::vec(any::<u8>(), 0..600)).prop_map(
            |(len, ty, body)| {
                let mut v = len.to_be_bytes().to_vec();
                v.push(ty);
                v.extend(body);
                v
            }
        ),
    ]
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

/// Names the relay accepts as path components (see `BatchHeader::validate`).
fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_\\p{Han}][a-zA-Z0-9._@ \\p{Han}-]{0,10}[a-z0-9]"
}

fn day() -> impl Strategy<Value = String> {
    "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
}

fn origin() -> impl Strategy<Value = Option<Origin>> {
    proptest::option::of(
        (name(), name(), any::<u64>()).prop_map(|(agent, stream, seq)| Origin {
            agent,
            stream,
            seq,
        }),
    )
}

fn frame() -> impl Strategy<Value = Frame> {
    let header = (
        name(),
        any::<u64>(),
        name(),
        day(),
        any::<u32>(),
        any::<u64>(),
        origin(),
    )
        .prop_map(
            |(stream, seq, source, day, events, raw_bytes, origin)| BatchHeader {
                stream,
                seq,
                source,
                day,
                events,
                raw_bytes,
                origin,
                item: None,
            },
        );
    let code = prop_oneof![
        Just(ErrorCode::BatchRejected),
        Just(ErrorCode::ProtocolViolation),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::ShuttingDown),
        Just(ErrorCode::Unknown),
    ];
    prop_oneof![
        (
            proptest::collection::vec(any::<u16>(), 0..4),
            text(),
            proptest::collection::vec(name(), 0..4)
        )
            .prop_map(|(versions, agent_version, streams)| Frame::Hello(Hello {
                versions,
                agent_version,
                streams
            })),
        (
            any::<u16>(),
            text(),
            text(),
            proptest::collection::vec((text(), any::<u64>()), 0..4)
        )
            .prop_map(
                |(version, relay_id, relay_version, r)| Frame::HelloAck(HelloAck {
                    version,
                    relay_id,
                    relay_version,
                    resume: r
                        .into_iter()
                        .map(|(stream, last_seq)| ResumePoint { stream, last_seq })
                        .collect(),
                })
            ),
        (text(), proptest::collection::vec(any::<u16>(), 0..4))
            .prop_map(|(reason, versions)| Frame::Refuse(Refuse { reason, versions })),
        (header, proptest::collection::vec(any::<u8>(), 0..700)).prop_map(|(header, gzip)| {
            Frame::Batch(Batch {
                header,
                gzip: Bytes::from(gzip),
            })
        }),
        (text(), any::<u64>()).prop_map(|(stream, seq)| Frame::Ack(Ack { stream, seq })),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        (code, text()).prop_map(|(code, message)| Frame::Error(ErrorFrame { code, message })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_never_panics(bytes in frameish()) {
        match decode(&bytes, &SMALL) {
            Ok((_, used)) => prop_assert!(used <= bytes.len() && used >= 5),
            Err(ProtocolError::FrameTooLarge { len, max, .. }) => prop_assert!(len > max),
            Err(_) => {}
        }
    }

    #[test]
    fn read_frame_never_panics_nor_over_allocates(bytes in frameish(), step in 1usize..64) {
        let len = bytes.len();
        let mut r = SpyReader { data: bytes, pos: 0, step, max_offered: 0 };
        let rt = runtime();
        // Default limits (64 MiB frames): a huge declared length must not turn into a
        // huge buffer; the buffer follows what actually arrives.
        let _ = rt.block_on(read_frame(&mut r, &Limits::default()));
        prop_assert!(r.max_offered <= 64 * 1024 + 2 * len + 64, "offered {}", r.max_offered);
        let mut r = SpyReader { data: r.data, pos: 0, step, max_offered: 0 };
        let _ = rt.block_on(read_frame(&mut r, &SMALL));
        prop_assert!(r.max_offered <= SMALL.max_frame as usize, "offered {}", r.max_offered);
        // Never more than the declared body.
        if let Some(p) = r.data.first_chunk::<4>() {
            let declared = u32::from_be_bytes(*p) as usize;
            prop_assert!(r.max_offered <= declared.max(5), "offered {} for {}", r.max_offered, declared);
        }
    }

    #[test]
    fn async_and_sync_decoders_agree(bytes in frameish()) {
        let rt = runtime();
        let mut r = SpyReader { data: bytes.clone(), pos: 0, step: 7, max_offered: 0 };
        let a = rt.block_on(read_frame(&mut r, &SMALL));
        let s = decode(&bytes, &SMALL);
        match (a, s) {
            (Ok(a), Ok((s, used))) => {
                prop_assert_eq!(a, s);
                prop_assert_eq!(r.pos, used);
            }
            (Err(_), Err(_)) => {}
            (a, s) => prop_assert!(false, "async {:?} vs sync {:?}", a, s),
        }
    }

    #[test]
    fn frames_roundtrip(f in frame()) {
        let mut bytes = Vec::new();
        encode(&f, &mut bytes).unwrap();
        let (back, used) = decode(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(&back, &f);
        prop_assert_eq!(used, bytes.len());

        let rt = runtime();
        let mut written = Vec::new();
        rt.block_on(write_frame(&mut written, &f)).unwrap();
        prop_assert_eq!(&written, &bytes);
        let mut r = SpyReader { data: written, pos: 0, step: 13, max_offered: 0 };
        prop_assert_eq!(rt.block_on(read_frame(&mut r, &Limits::default())).unwrap(), f);
    }

    #[test]
    fn verify_batch_never_panics(gzip in proptest::collection::vec(any::<u8>(), 0..400), events in 0u32..4, raw in 0u64..2000) {
        let _ = verify_batch(&gzip, events, raw, 1 << 20);
        // Mostly-valid gzip with a flipped byte.
        let mut g = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&gzip).unwrap();
            e.finish().unwrap()
        };
        let at = (raw as usize) % g.len();
        g[at] ^= 0x5A;
        let _ = verify_batch(&g, events, gzip.len() as u64, 1 << 20);
    }
}
