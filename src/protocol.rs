//! Wire frames between agent and relay (carried inside mutual TLS).
//!
//! This module owns the byte layout of everything that crosses the connection and the
//! limits that keep a hostile or broken peer from making us allocate, inflate or parse
//! without bound. Invariant: **no input makes [`read_frame`], [`decode`] or
//! [`verify_batch`] panic or allocate more than the configured [`Limits`]**; every bad
//! input is a typed error.
//!
//! # Frame layout
//!
//! ```text
//! struct Frame {
//!     len:  u32,        // big-endian; length of `type` + `body` (so >= 1)
//!     type: u8,         // FrameType
//!     body: [u8; len-1],
//! }
//!
//! type 0x01 Hello     body = JSON {"versions":[1],"agent_version":"0.1.0","streams":["s1",..]}
//! type 0x02 HelloAck  body = JSON {"version":1,"relay_id":"..","relay_version":"..",
//!                                  "resume":[{"stream":"s1","last_seq":41},..]}
//! type 0x03 Refuse    body = JSON {"reason":"..","versions":[..relay's versions..]}
//! type 0x10 Batch     body = struct BatchBody {
//!                         header_len: u32,             // big-endian, <= Limits::max_control
//!                         header: [u8; header_len],    // JSON BatchHeader
//!                         gzip: [u8; ..],              // rest of the frame: the spooled
//!                                                      // gzip member, byte for byte
//!                     }
//! type 0x11 Ack       body = JSON {"stream":"s1","seq":42}
//! type 0x20 Ping      body = u64 big-endian nonce
//! type 0x21 Pong      body = u64 big-endian nonce (echoes the Ping)
//! type 0x7F Error     body = JSON {"code":"batch_rejected","message":".."}
//! ```
//!
//! Control frames (everything except `Batch`) are bounded by [`Limits::max_control`];
//! a `Batch` frame by [`Limits::max_frame`]. The length is checked **before** any buffer
//! is allocated, and the body buffer grows only as bytes actually arrive. Header fields
//! that the relay turns into paths (`stream`, `source`, `day`, the origin's names) are
//! validated when the frame is decoded ([`BatchHeader::validate`]); the gzip payload is
//! checked by [`verify_batch`] before anything is stored.
//!
//! # Conversation
//!
//! The agent speaks first with `Hello`; the relay answers `HelloAck` (the highest
//! version both support, plus the last sequence it stored for each announced stream,
//! so the agent resumes right after it) or `Refuse` naming both sides' versions. Then
//! the agent sends `Batch` frames (a window of them may be unacknowledged) and the relay
//! sends `Ack { stream, seq }` once every batch of that stream up to `seq` is durable on
//! its side. Either side may `Ping`; the other answers `Pong` with the same nonce. The
//! relay sends `Error` right before closing a connection it will not continue.
//!
//! The relay keys streams by (identity, stream) where identity is the client
//! certificate's identity ([`crate::tls::peer_identity`]) — never a name the client
//! states. A forwarding relay sends batches of its own spool stream and carries the
//! original (agent, stream, seq) in [`BatchHeader::origin`]; the top relay dedupes on the
//! origin and acknowledges the hop's own (stream, seq). See docs/PROTOCOL.md.

use std::io::{self, Read};

use bytes::Bytes;
use flate2::bufread::GzDecoder;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::batch::{BatchMeta, Origin};

/// Protocol versions this build speaks, in no particular order.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];

/// Default bound for a whole frame (a batch of up to this many compressed bytes).
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024 * 1024;
/// Default bound for control frames and for a batch header.
pub const DEFAULT_MAX_CONTROL: u32 = 1024 * 1024;

/// Size of `len` + `type`.
const PREFIX_LEN: usize = 5;
/// Initial body buffer: large enough for typical control frames, small enough that a
/// peer that declares a huge frame and then stalls costs little.
const INITIAL_BODY_CAPACITY: usize = 64 * 1024;

/// Hard limits applied while reading frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `len` for a `Batch` frame.
    pub max_frame: u32,
    /// Largest accepted `len` for any other frame, and largest batch header.
    pub max_control: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: DEFAULT_MAX_FRAME,
            max_control: DEFAULT_MAX_CONTROL,
        }
    }
}

impl Limits {
    /// The bound for a frame of type `ty`.
    pub fn for_type(&self, ty: FrameType) -> u32 {
        match ty {
            FrameType::Batch => self.max_frame,
            _ => self.max_control.min(self.max_frame),
        }
    }
}

/// The type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 0x01,
    HelloAck = 0x02,
    Refuse = 0x03,
    Batch = 0x10,
    Ack = 0x11,
    Ping = 0x20,
    Pong = 0x21,
    Error = 0x7F,
}

impl FrameType {
    pub fn from_byte(b: u8) -> Option<FrameType> {
        Some(match b {
            0x01 => FrameType::Hello,
            0x02 => FrameType::HelloAck,
            0x03 => FrameType::Refuse,
            0x10 => FrameType::Batch,
            0x11 => FrameType::Ack,
            0x20 => FrameType::Ping,
            0x21 => FrameType::Pong,
            0x7F => FrameType::Error,
            _ => return None,
        })
    }
}

/// First frame of a connection, agent → relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Every protocol version the agent can speak.
    pub versions: Vec<u16>,
    /// The agent's software version, for the relay's logs.
    pub agent_version: String,
    /// The streams the agent is about to send, so the relay can say where each resumes.
    #[serde(default)]
    pub streams: Vec<String>,
}

/// Where a stream resumes: the relay has durably stored everything up to `last_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub stream: String,
    pub last_seq: u64,
}

/// Relay → agent answer to [`Hello`] when a common version exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The chosen version: the highest one both sides support.
    pub version: u16,
    /// The relay's name, for the agent's logs and status.
    pub relay_id: String,
    /// The relay's software version.
    #[serde(default)]
    pub relay_version: String,
    /// For each announced stream the relay has seen: the last stored sequence. Streams
    /// absent here are new to the relay.
    #[serde(default)]
    pub resume: Vec<ResumePoint>,
}

/// Relay → agent answer to [`Hello`] when there is no common version (or the relay
/// will not talk to this agent); the relay closes after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    pub reason: String,
    /// The versions the relay supports, so the operator sees both sides.
    #[serde(default)]
    pub versions: Vec<u16>,
}

/// The compact description that travels in front of a batch's gzip bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// The sender's spool stream; `Ack`s name it.
    pub stream: String,
    /// Position in the stream; strictly increasing, starts at 1.
    pub seq: u64,
    /// Source name (a folder name in the relay store).
    pub source: String,
    /// UTC day `YYYY-MM-DD` of every event in the batch.
    pub day: String,
    /// Number of NDJSON lines.
    pub events: u32,
    /// Inflated length in bytes.
    pub raw_bytes: u64,
    /// Set only when a relay forwards a batch first spooled by another agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Set for incident records, reports and evidence-bundle chunks (absent: log events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<crate::batch::Item>,
}

impl BatchHeader {
    /// Checks the fields the relay turns into paths and dates: `stream`, `source` and
    /// the origin's `agent` and `stream` must each be one safe path component (the
    /// rule of [`crate::tls::validate_identity`]), `day` must be a `YYYY-MM-DD` date.
    /// [`decode`] and [`read_frame`] refuse a batch that fails this.
    pub fn validate(&self) -> Result<(), String> {
        let component = |what: &str, v: &str| {
            crate::tls::validate_identity(v).map_err(|e| format!("{what}: {e}"))
        };
        component("stream", &self.stream)?;
        component("source", &self.source)?;
        if let Some(o) = &self.origin {
            component("origin agent", &o.agent)?;
            component("origin stream", &o.stream)?;
        }
        if let Some(item) = &self.item {
            component("item", item.key())?;
            // Checked here, not only at the store: a bad name is the sender's fault for
            // good, and must not come back as a "retry later" error the agent obeys forever.
            if let crate::batch::Item::IntelChunk { name, .. } = item
                && !crate::intel::valid_item_name(name)
            {
                return Err(format!("intel item name {name:?} is not <period>.json.gz"));
            }
            if let Some((offset, total, sha256)) = item.chunk() {
                if offset > total {
                    return Err(format!("chunk offset {offset} beyond total {total}"));
                }
                if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err("chunk sha256 is not 64 hex digits".into());
                }
            }
        }
        if !is_day(&self.day) {
            return Err(format!("day {:?} is not a YYYY-MM-DD date", self.day));
        }
        Ok(())
    }

    /// The header for a spooled batch. The meta's `cursor` is agent-local and stays home.
    pub fn from_meta(stream: &str, seq: u64, meta: &BatchMeta) -> BatchHeader {
        BatchHeader {
            stream: stream.to_owned(),
            seq,
            source: meta.source.clone(),
            day: meta.day.clone(),
            events: meta.events,
            raw_bytes: meta.raw_bytes,
            origin: meta.origin.clone(),
            item: meta.item.clone(),
        }
    }
}

/// `YYYY-MM-DD` with a month 01–12 and a day 01–31 (the store file name; calendar
/// exactness is the batcher's business, path safety is ours).
fn is_day(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let num = |r: std::ops::Range<usize>| {
        b.get(r)
            .map(|d| d.iter().fold(0u32, |n, c| n * 10 + u32::from(c - b'0')))
            .unwrap_or(0)
    };
    b.len() == 10
        && digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && (1..=12).contains(&num(5..7))
        && (1..=31).contains(&num(8..10))
}

/// A batch on the wire: header plus the gzip member exactly as spooled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub header: BatchHeader,
    pub gzip: Bytes,
}

/// Relay → agent: every batch of `stream` up to and including `seq` is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub stream: String,
    pub seq: u64,
}

/// Why the relay is closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A batch failed verification (bad gzip, bad JSON, wrong counts).
    BatchRejected,
    /// A frame broke the protocol (unexpected type, out-of-order sequence, ...).
    ProtocolViolation,
    /// The relay cannot store right now (disk full, I/O error); retry later.
    Unavailable,
    /// The relay is shutting down; retry later.
    ShuttingDown,
    /// The relay refuses the certificate's identity (ambiguous, unsafe, or like another
    /// agent's); retrying does not help until the certificate changes.
    Forbidden,
    /// A code this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// Relay → agent, right before closing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Refuse(Refuse),
    Batch(Batch),
    Ack(Ack),
    Ping(u64),
    Pong(u64),
    Error(ErrorFrame),
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::HelloAck(_) => FrameType::HelloAck,
            Frame::Refuse(_) => FrameType::Refuse,
            Frame::Batch(_) => FrameType::Batch,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Error(_) => FrameType::Error,
        }
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection cleanly between two frames.
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame truncated: expected {expected} bytes, got {got}")]
    Truncated { expected: u64, got: u64 },
    #[error("frame with length 0 (a frame holds at least its type byte)")]
    EmptyFrame,
    #[error("{ty:?} frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { ty: FrameType, len: u64, max: u64 },
    #[error("unknown frame type byte 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed {ty:?} frame: {reason}")]
    BadBody { ty: FrameType, reason: String },
}

/// Picks the highest version in both lists, or explains why there is none, naming both
/// sides' versions so an operator knows which end to upgrade.
pub fn negotiate(agent: &[u16], relay: &[u16]) -> Result<u16, String> {
    agent
        .iter()
        .filter(|v| relay.contains(v))
        .max()
        .copied()
        .ok_or_else(|| {
            format!(
                "no common protocol version: the agent speaks {agent:?}, the relay speaks \
                 {relay:?}; upgrade the older side"
            )
        })
}

fn bad(ty: FrameType, reason: impl ToString) -> ProtocolError {
    ProtocolError::BadBody {
        ty,
        reason: reason.to_string(),
    }
}

fn json_body<T: Serialize>(ty: FrameType, v: &T) -> Result<Vec<u8>, ProtocolError> {
    serde_json::to_vec(v).map_err(|e| bad(ty, e))
}

/// Serialises everything but a batch's gzip bytes: returns the frame prefix plus body
/// (or plus batch header), and the payload slice still to be written after it.
fn encode_head(frame: &Frame) -> Result<(Vec<u8>, &[u8]), ProtocolError> {
    let ty = frame.frame_type();
    let (body, payload): (Vec<u8>, &[u8]) = match frame {
        Frame::Hello(h) => (json_body(ty, h)?, &[]),
        Frame::HelloAck(h) => (json_body(ty, h)?, &[]),
        Frame::Refuse(r) => (json_body(ty, r)?, &[]),
        Frame::Ack(a) => (json_body(ty, a)?, &[]),
        Frame::Error(e) => (json_body(ty, e)?, &[]),
        Frame::Ping(n) | Frame::Pong(n) => (n.to_be_bytes().to_vec(), &[]),
        Frame::Batch(b) => {
            let header = json_body(ty, &b.header)?;
            let hlen = u32::try_from(header.len()).map_err(|_| bad(ty, "header too large"))?;
            let mut body = Vec::with_capacity(4 + header.len());
            body.extend_from_slice(&hlen.to_be_bytes());
            body.extend_from_slice(&header);
            (body, &b.gzip[..])
        }
    };
    let total = 1u64 + body.len() as u64 + payload.len() as u64;
    let len = u32::try_from(total).map_err(|_| ProtocolError::FrameTooLarge {
        ty,
        len: total,
        max: u64::from(u32::MAX),
    })?;
    let mut head = Vec::with_capacity(PREFIX_LEN + body.len());
    head.extend_from_slice(&len.to_be_bytes());
    head.push(ty as u8);
    head.extend_from_slice(&body);
    Ok((head, payload))
}

/// Appends the encoded frame to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let (head, payload) = encode_head(frame)?;
    out.reserve(head.len() + payload.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    Ok(())
}

/// Writes one frame and flushes. A batch's gzip bytes are written straight from the
/// caller's buffer, never copied into a frame buffer.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), ProtocolError> {
    let (head, payload) = encode_head(frame)?;
    w.write_all(&head).await?;
    if !payload.is_empty() {
        w.write_all(payload).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Checks the 5-byte prefix against the limits; returns the type and body length.
fn check_prefix(
    prefix: [u8; PREFIX_LEN],
    limits: &Limits,
) -> Result<(FrameType, usize), ProtocolError> {
    let [a, b, c, d, t] = prefix;
    let len = u32::from_be_bytes([a, b, c, d]);
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    let ty = FrameType::from_byte(t).ok_or(ProtocolError::UnknownType(t))?;
    let max = limits.for_type(ty);
    if len > max {
        return Err(ProtocolError::FrameTooLarge {
            ty,
            len: u64::from(len),
            max: u64::from(max),
        });
    }
    // u32 -> usize cannot truncate on the 32/64-bit targets we build for; `len >= 1`.
    Ok((ty, (len - 1) as usize))
}

/// Reads one frame. Pass a buffered reader (e.g. `tokio::io::BufReader`) for speed.
///
/// Not cancellation safe: dropping the future mid-frame loses the bytes already read
/// and desynchronises the stream. Read frames in one dedicated task (or loop), not in a
/// `select!` branch that another branch can win.
///
/// Memory: the body buffer is bounded by the limit for the frame's type and grows only
/// as bytes arrive, so a peer that declares a large frame and stalls costs at most
/// 64 KiB plus what it actually sent.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
) -> Result<Frame, ProtocolError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut got = 0;
    while got < PREFIX_LEN {
        // `got < PREFIX_LEN` in the loop, so the range is never empty.
        let n = r.read(prefix.get_mut(got..).unwrap_or_default()).await?;
        if n == 0 {
            if got == 0 {
                return Err(ProtocolError::Closed);
            }
            return Err(ProtocolError::Truncated {
                expected: PREFIX_LEN as u64,
                got: got as u64,
            });
        }
        got += n;
    }
    let (ty, body_len) = check_prefix(prefix, limits)?;
    let body = read_body(r, body_len).await?;
    decode_body(ty, Bytes::from(body), limits)
}

/// Reads exactly `len` bytes. The buffer starts at 64 KiB and doubles only when full,
/// never past `len` (`reserve_exact`), so it stays within both the declared length and
/// twice what the peer actually sent.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>, ProtocolError> {
    let mut body: Vec<u8> = Vec::new();
    let mut filled = 0;
    while filled < len {
        if filled == body.len() {
            let grow = body.len().max(INITIAL_BODY_CAPACITY).min(len - body.len());
            body.reserve_exact(grow);
            body.resize(body.len() + grow, 0);
        }
        // `filled < body.len()` here: the buffer was just grown when it was full.
        let buf = body.get_mut(filled..).unwrap_or_default();
        let n = r.read(buf).await?;
        if n == 0 {
            return Err(ProtocolError::Truncated {
                expected: (PREFIX_LEN + len) as u64,
                got: (PREFIX_LEN + filled) as u64,
            });
        }
        filled += n;
    }
    Ok(body)
}

/// Decodes one frame from the front of `buf`; returns it and the bytes it used.
/// A buffer shorter than the frame is [`ProtocolError::Truncated`].
pub fn decode(buf: &[u8], limits: &Limits) -> Result<(Frame, usize), ProtocolError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Err(ProtocolError::Truncated {
            expected: PREFIX_LEN as u64,
            got: buf.len() as u64,
        });
    };
    let (ty, body_len) = check_prefix(*prefix, limits)?;
    let end = PREFIX_LEN + body_len;
    let Some(body) = buf.get(PREFIX_LEN..end) else {
        return Err(ProtocolError::Truncated {
            expected: end as u64,
            got: buf.len() as u64,
        });
    };
    let frame = decode_body(ty, Bytes::copy_from_slice(body), limits)?;
    Ok((frame, end))
}

fn from_json<'a, T: Deserialize<'a>>(ty: FrameType, body: &'a [u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(body).map_err(|e| bad(ty, e))
}

fn decode_body(ty: FrameType, body: Bytes, limits: &Limits) -> Result<Frame, ProtocolError> {
    Ok(match ty {
        FrameType::Hello => {
            let hello: Hello = from_json(ty, &body)?;
            // The relay logs this string: a newline in it would forge log lines.
            if hello.agent_version.len() > 128 || hello.agent_version.chars().any(char::is_control)
            {
                return Err(bad(
                    ty,
                    "agent_version is longer than 128 bytes or holds a control character",
                ));
            }
            for s in &hello.streams {
                crate::tls::validate_identity(s).map_err(|e| bad(ty, format!("stream: {e}")))?;
            }
            Frame::Hello(hello)
        }
        FrameType::HelloAck => Frame::HelloAck(from_json(ty, &body)?),
        FrameType::Refuse => Frame::Refuse(from_json(ty, &body)?),
        FrameType::Ack => Frame::Ack(from_json(ty, &body)?),
        FrameType::Error => Frame::Error(from_json(ty, &body)?),
        FrameType::Ping | FrameType::Pong => {
            let nonce: [u8; 8] = body[..]
                .try_into()
                .map_err(|_| bad(ty, format!("body is {} bytes, expected 8", body.len())))?;
            let n = u64::from_be_bytes(nonce);
            if ty == FrameType::Ping {
                Frame::Ping(n)
            } else {
                Frame::Pong(n)
            }
        }
        FrameType::Batch => {
            let Some(hlen) = body.first_chunk::<4>() else {
                return Err(bad(ty, "body shorter than its header length"));
            };
            let hlen = u32::from_be_bytes(*hlen);
            if hlen > limits.max_control {
                return Err(bad(
                    ty,
                    format!(
                        "header of {hlen} bytes exceeds the limit of {}",
                        limits.max_control
                    ),
                ));
            }
            let hend = 4 + hlen as usize;
            let header_bytes = body
                .get(4..hend)
                .ok_or_else(|| bad(ty, format!("header length {hlen} runs past the frame")))?;
            let header: BatchHeader = from_json(ty, header_bytes)?;
            header.validate().map_err(|e| bad(ty, e))?;
            // Zero-copy: the payload shares the frame's buffer.
            let gzip = body.slice(hend..);
            Frame::Batch(Batch { header, gzip })
        }
    })
}

/// Why a batch's gzip bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch declares {declared} raw bytes, more than the limit of {max}")]
    DeclaredTooLarge { declared: u64, max: u64 },
    #[error("batch inflates past its bound of {bound} bytes (gzip bomb or wrong raw_bytes)")]
    InflatesTooLarge { bound: u64 },
    #[error("not a valid gzip member (bad header, corrupt deflate data or CRC mismatch): {0}")]
    Gzip(String),
    #[error("{0} bytes after the gzip member (a batch is exactly one member)")]
    TrailingData(usize),
    #[error("line {line} is not valid JSON: {reason}")]
    BadJson { line: u64, reason: String },
    #[error("line {line} is not a JSON object")]
    NotObject { line: u64 },
    #[error("line {line} is longer than {max} bytes")]
    LineTooLong { line: u64, max: usize },
    #[error("the last line has no terminating newline")]
    MissingFinalNewline,
    #[error("batch holds {actual} events but declares {declared}")]
    EventCount { declared: u32, actual: u64 },
    #[error("batch inflates to {actual} bytes but declares {declared}")]
    RawBytes { declared: u64, actual: u64 },
}

const INFLATE_CHUNK: usize = 64 * 1024;

/// Longest accepted event line (inflated). Far above any source's line limit; it bounds
/// the buffer that carries a line split across two inflate chunks.
pub const MAX_EVENT_LINE: usize = 16 * 1024 * 1024;

/// Verifies a batch's gzip bytes without trusting them: exactly one gzip member with a
/// valid CRC and nothing after it, inflating to exactly `expect_raw` bytes (and never
/// more than `min(expect_raw, max_raw)` are inflated: a bomb is cut off at the bound),
/// made of exactly `expect_events` newline-terminated lines, each a JSON object.
///
/// Memory: one 64 KiB inflate buffer plus, for a line that spans two chunks, a carry
/// buffer as long as that line (at most [`MAX_EVENT_LINE`]).
pub fn verify_batch(
    gzip: &[u8],
    expect_events: u32,
    expect_raw: u64,
    max_raw: u64,
) -> Result<(), BatchError> {
    if expect_raw > max_raw {
        return Err(BatchError::DeclaredTooLarge {
            declared: expect_raw,
            max: max_raw,
        });
    }
    let bound = expect_raw;
    let mut dec = GzDecoder::new(gzip);
    let mut chunk = vec![0u8; INFLATE_CHUNK];
    let mut carry: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    let mut lines: u64 = 0;
    loop {
        // Never ask for more than one byte past the bound: that byte proves the excess.
        let room = bound.saturating_sub(total).saturating_add(1);
        let want = usize::try_from(room).unwrap_or(usize::MAX).min(chunk.len());
        let Some(buf) = chunk.get_mut(..want) else {
            // `want <= chunk.len()` by the `min` above.
            return Err(BatchError::Gzip("internal buffer bound".into()));
        };
        let n = match dec.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BatchError::Gzip(e.to_string())),
        };
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > bound {
            return Err(BatchError::InflatesTooLarge { bound });
        }
        let data = chunk.get(..n).unwrap_or_default();
        check_lines(data, &mut carry, &mut lines)?;
    }
    let rest = dec.into_inner();
    if !rest.is_empty() {
        return Err(BatchError::TrailingData(rest.len()));
    }
    if !carry.is_empty() {
        return Err(BatchError::MissingFinalNewline);
    }
    if total != expect_raw {
        return Err(BatchError::RawBytes {
            declared: expect_raw,
            actual: total,
        });
    }
    if lines != u64::from(expect_events) {
        return Err(BatchError::EventCount {
            declared: expect_events,
            actual: lines,
        });
    }
    Ok(())
}

/// Validates complete lines in `data`, using `carry` for a line split across chunks.
fn check_lines(mut data: &[u8], carry: &mut Vec<u8>, lines: &mut u64) -> Result<(), BatchError> {
    let too_long = |line| BatchError::LineTooLong {
        line,
        max: MAX_EVENT_LINE,
    };
    while let Some(pos) = memchr::memchr(b'\n', data) {
        let (line, rest) = data.split_at(pos);
        *lines += 1;
        if carry.is_empty() {
            check_line(line, *lines)?;
        } else {
            if carry.len() + line.len() > MAX_EVENT_LINE {
                return Err(too_long(*lines));
            }
            carry.extend_from_slice(line);
            check_line(carry, *lines)?;
            carry.clear();
        }
        data = rest.get(1..).unwrap_or_default();
    }
    if !data.is_empty() {
        let line = *lines + 1;
        if carry.len() + data.len() > MAX_EVENT_LINE {
            return Err(too_long(line));
        }
        // Refuse a line that cannot be an object as soon as it starts, instead of
        // carrying it (a bomb of zeros has no newline at all).
        if carry.is_empty()
            && data
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b != b'{')
        {
            return Err(BatchError::NotObject { line });
        }
        carry.extend_from_slice(data);
    }
    Ok(())
}

fn check_line(line: &[u8], n: u64) -> Result<(), BatchError> {
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(BatchError::NotObject { line: n });
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(line)
        .map(|_| ())
        .map_err(|e| BatchError::BadJson {
            line: n,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_picks_highest_common() {
        assert_eq!(negotiate(&[1, 2, 3], &[1, 2]), Ok(2));
        let e = negotiate(&[3], &[1, 2]).unwrap_err();
        assert!(e.contains("[3]") && e.contains("[1, 2]"), "{e}");
    }

    #[test]
    fn ping_layout_is_exact() {
        let mut out = Vec::new();
        encode(&Frame::Ping(0x0102030405060708), &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 9, 0x20, 1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
