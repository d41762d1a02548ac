//! Splitting a TCP (or TLS) byte stream into syslog messages, per RFC 6587.
//!
//! Two framings exist and senders do not announce which they use, so the first byte of
//! a connection decides: a digit starts an octet count (`<len> <msg>`), anything else
//! means messages end with LF (also accepted: `CRLF`, and NUL as terminator).
//! Once a connection is known to be LF-framed it stays so (a message that starts with
//! digits is not mistaken for a count); an octet-counted connection that sends a frame
//! starting with a non-digit has that one frame read up to its LF, as rsyslog does.
//!
//! An octet-counted frame of length 0 is handed on as an empty message (as an empty UDP
//! datagram is); in LF framing, empty lines between messages are separators (`\r\n\0`
//! trailers), not messages.
//!
//! Invariant: memory per connection is bounded by `max_message_bytes` whatever the
//! sender declares or sends. A longer message is cut to that size and reported as
//! truncated; the rest of it is read and discarded (a declared 4 GiB frame costs
//! nothing but the time to read it). A count with more than 10 digits is not a count:
//! the connection is closed with [`FrameError`].

/// A count longer than this many digits ends the connection (10 digits hold 4 GiB).
pub const MAX_COUNT_DIGITS: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("octet count has more than {MAX_COUNT_DIGITS} digits")]
    CountTooLong,
    #[error("octet count is not followed by a space")]
    BadCount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Nothing seen yet.
    Unknown,
    OctetCounted,
    LfDelimited,
}

#[derive(Debug)]
enum State {
    /// Between frames.
    Start,
    /// Reading the digits of an octet count.
    Count { value: u64, digits: u32 },
    /// Reading the body of an octet-counted frame: `remaining` bytes still to come.
    Body { remaining: u64 },
    /// Reading an LF-terminated frame.
    Line,
}

/// Incremental decoder for one connection.
#[derive(Debug)]
pub struct Framer {
    max: usize,
    framing: Framing,
    state: State,
    /// The part of the current message received so far, at most `max` bytes.
    buf: Vec<u8>,
    /// The current message exceeded `max`: the rest of it is being discarded.
    overflow: bool,
    /// Reading the first count of the connection: its digits are also in `buf`, so
    /// that a first message that merely starts with digits can still be read as a line.
    probing: bool,
    /// The last byte read of an LF-framed line was a CR, not yet in `buf`: dropped if
    /// the terminator comes next (CRLF split across reads), kept otherwise. Holding it
    /// back keeps the message and its `truncated` flag independent of how TCP
    /// segmented the stream (a line of exactly `max` bytes plus CR is not truncated).
    cr: bool,
}

impl Framer {
    pub fn new(max_message_bytes: usize) -> Framer {
        Framer {
            max: max_message_bytes.max(1),
            framing: Framing::Unknown,
            state: State::Start,
            buf: Vec::new(),
            overflow: false,
            probing: false,
            cr: false,
        }
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Feed bytes; `emit(message, truncated)` is called for every complete message.
    /// Messages that lie whole inside `data` are passed without copying.
    pub fn push(
        &mut self,
        mut data: &[u8],
        mut emit: impl FnMut(&[u8], bool),
    ) -> Result<(), FrameError> {
        while !data.is_empty() {
            match self.state {
                State::Start => {
                    let c = data[0];
                    if matches!(c, b'\n' | b'\r' | b'\0') {
                        data = &data[1..]; // stray separators between frames
                        continue;
                    }
                    let counted = c.is_ascii_digit() && self.framing != Framing::LfDelimited;
                    if counted {
                        self.probing = self.framing == Framing::Unknown;
                        self.state = State::Count {
                            value: 0,
                            digits: 0,
                        };
                    } else {
                        if self.framing == Framing::Unknown {
                            self.framing = Framing::LfDelimited;
                        }
                        self.state = State::Line;
                    }
                }
                State::Count { value, digits } => {
                    let c = data[0];
                    let is_count = c == b' ' && digits > 0;
                    let digit_ok = c.is_ascii_digit() && digits < MAX_COUNT_DIGITS;
                    if !is_count && !digit_ok {
                        if !self.probing {
                            return Err(if c.is_ascii_digit() {
                                FrameError::CountTooLong
                            } else {
                                FrameError::BadCount
                            });
                        }
                        // `123: *Mar 1 ...` (no PRI) opening a connection: not a count
                        // but the first line of an LF-framed stream. The digits read so
                        // far are in `buf`; `c` is read again as part of the line.
                        self.probing = false;
                        self.framing = Framing::LfDelimited;
                        self.state = State::Line;
                        continue;
                    }
                    data = &data[1..];
                    if is_count {
                        self.buf.clear();
                        self.overflow = false;
                        self.probing = false;
                        self.framing = Framing::OctetCounted;
                        // `0 `: a frame the sender declared empty (RFC 6587 requires a
                        // nonzero count). It is still a message that arrived, like an
                        // empty UDP datagram: handed on, to be kept as an event with
                        // `parse_error` ("empty message"), so one rule holds for both.
                        self.state = if value == 0 {
                            emit(&[], false);
                            State::Start
                        } else {
                            State::Body { remaining: value }
                        };
                    } else {
                        if self.probing {
                            // Kept as the start of a line, should it turn out to be one.
                            self.keep(&[c]);
                        }
                        self.state = State::Count {
                            value: value * 10 + u64::from(c - b'0'),
                            digits: digits + 1,
                        };
                    }
                }
                State::Body { remaining } => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(data.len());
                    let (piece, rest) = data.split_at(take);
                    data = rest;
                    let left = remaining - take as u64;
                    if left == 0 && self.buf.is_empty() && !self.overflow {
                        // Fast path: the whole frame is in this read.
                        let cut = piece.len() > self.max;
                        emit(&piece[..piece.len().min(self.max)], cut);
                    } else {
                        self.keep(piece);
                        if left == 0 {
                            emit(&self.buf, self.overflow);
                            self.buf.clear();
                            self.overflow = false;
                        }
                    }
                    self.state = if left == 0 {
                        State::Start
                    } else {
                        State::Body { remaining: left }
                    };
                }
                State::Line => match memchr::memchr2(b'\n', b'\0', data) {
                    Some(end) => {
                        let piece = &data[..end];
                        data = &data[end + 1..];
                        if self.buf.is_empty() && !self.overflow && !self.cr {
                            let line = strip_cr(piece);
                            let cut = line.len() > self.max;
                            emit(&line[..line.len().min(self.max)], cut);
                        } else {
                            if std::mem::take(&mut self.cr) && !piece.is_empty() {
                                self.keep(b"\r");
                            }
                            self.keep(strip_cr(piece));
                            emit(&self.buf, self.overflow);
                            self.buf.clear();
                            self.overflow = false;
                        }
                        self.state = State::Start;
                    }
                    None => {
                        if std::mem::take(&mut self.cr) {
                            self.keep(b"\r");
                        }
                        let body = match data.strip_suffix(b"\r") {
                            Some(body) => {
                                self.cr = true;
                                body
                            }
                            None => data,
                        };
                        self.keep(body);
                        data = &[];
                    }
                },
            }
        }
        Ok(())
    }

    /// The connection ended: hand over a message that was cut short (an LF-framed last
    /// line without its LF, or an octet-counted frame shorter than declared, which is
    /// reported as truncated). Bytes the sender got into our kernel are never dropped.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8], bool)) {
        match self.state {
            State::Line if !self.buf.is_empty() || self.overflow || self.cr => {
                if std::mem::take(&mut self.cr) {
                    self.keep(b"\r");
                }
                emit(&self.buf, self.overflow);
            }
            State::Body { .. } => emit(&self.buf, true),
            _ => {}
        }
        self.buf.clear();
        self.overflow = false;
        self.cr = false;
        self.state = State::Start;
    }

    /// Bytes of a partial message currently held.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn keep(&mut self, piece: &[u8]) {
        let room = self.max.saturating_sub(self.buf.len());
        if piece.len() > room {
            self.overflow = true;
        }
        self.buf.extend_from_slice(&piece[..piece.len().min(room)]);
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Frames = Vec<(Vec<u8>, bool)>;

    fn frames(max: usize, chunks: &[&[u8]]) -> (Frames, Result<(), FrameError>) {
        let mut f = Framer::new(max);
        let mut out = Vec::new();
        for c in chunks {
            if let Err(e) = f.push(c, |m, t| out.push((m.to_vec(), t))) {
                return (out, Err(e));
            }
        }
        f.finish(|m, t| out.push((m.to_vec(), t)));
        (out, Ok(()))
    }

    fn msgs(v: &[(&str, bool)]) -> Frames {
        v.iter().map(|(m, t)| (m.as_bytes().to_vec(), *t)).collect()
    }

    #[test]
    fn octet_counted_split_anywhere() {
        let stream = b"5 <1>ab3 <2>11 <3>hello world";
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            let (out, r) = frames(100, &[a, b]);
            assert!(r.is_ok());
            assert_eq!(
                out,
                msgs(&[
                    ("<1>ab", false),
                    ("<2>", false),
                    ("<3>hello wo", false),
                    ("rld", false)
                ]),
                "split {split}"
            );
        }
    }

    #[test]
    fn lf_delimited_with_crlf_and_nul() {
        let (out, r) = frames(100, &[b"<1>a\r\n<2>b\0<3>c\n\n<4>tail"]);
        assert!(r.is_ok());
        assert_eq!(
            out,
            msgs(&[
                ("<1>a", false),
                ("<2>b", false),
                ("<3>c", false),
                ("<4>tail", false)
            ])
        );
    }

    #[test]
    fn lf_connection_never_switches_to_counting() {
        let (out, _) = frames(100, &[b"<1>a\n12 not a count\n"]);
        assert_eq!(out, msgs(&[("<1>a", false), ("12 not a count", false)]));
    }

    /// Regression: an empty TCP frame was dropped while an empty UDP datagram was kept.
    #[test]
    fn empty_octet_counted_frame_is_a_message() {
        let (out, r) = frames(64, &[b"0 3 abc0 "]);
        assert!(r.is_ok());
        assert_eq!(out, msgs(&[("", false), ("abc", false), ("", false)]));
    }

    #[test]
    fn octet_connection_accepts_an_lf_frame() {
        let (out, _) = frames(100, &[b"3 <1><2>lf\n4 <3>x"]);
        assert_eq!(
            out,
            msgs(&[("<1>", false), ("<2>lf", false), ("<3>x", false)])
        );
    }

    #[test]
    fn first_message_starting_with_digits_is_a_line() {
        let (out, _) = frames(1, &[b"000\0"]);
        assert_eq!(out, msgs(&[("0", true)]));
        let (out, r) = frames(100, &[b"12", b"3: *Mar  1 x\n", b"5 <1>a\n"]);
        assert!(r.is_ok());
        assert_eq!(out, msgs(&[("123: *Mar  1 x", false), ("5 <1>a", false)]));
        // A count split across reads is still a count.
        let (out, _) = frames(100, &[b"1", b"0", b" ", b"<1>abcdefg"]);
        assert_eq!(out, msgs(&[("<1>abcdefg", false)]));
    }

    /// Found by fuzzing (`fuzz/regressions/syslog_*_framer/`): a line of exactly `max`
    /// bytes whose CRLF was split across two reads was reported as truncated, and a CR
    /// ending one read counted against `max`; the result must not depend on segmentation.
    #[test]
    fn crlf_split_across_reads_marked_truncated() {
        let want = msgs(&[
            ("x", false),
            ("abc", false),
            ("ab\r", false),
            ("a\rb", false),
        ]);
        let whole: &[&[u8]] = &[b"x\nabc\r\nab\r\r\na\rb\n"];
        assert_eq!(frames(3, whole).0, want);
        let split: &[&[u8]] = &[b"x\nabc\r", b"\nab\r", b"\r", b"\na\r", b"b\n"];
        assert_eq!(frames(3, split).0, want);
        // A CR that ends the connection is part of the last (unterminated) line.
        assert_eq!(
            frames(3, &[b"x\nab\r"]).0,
            msgs(&[("x", false), ("ab\r", false)])
        );
        assert_eq!(
            frames(2, &[b"x\nab\r"]).0,
            msgs(&[("x", false), ("ab", true)])
        );
    }

    #[test]
    fn oversized_frames_are_cut() {
        let (out, _) = frames(4, &[b"10 0123456789", b"2 ab"]);
        assert_eq!(out, msgs(&[("0123", true), ("ab", false)]));
        let (out, _) = frames(4, &[b"10 01234", b"56789", b"2 ab"]);
        assert_eq!(out, msgs(&[("0123", true), ("ab", false)]));
        let (out, _) = frames(4, &[b"<1>abcdef\n<2>\n", b"<3>xy", b"zzzz\n"]);
        assert_eq!(out, msgs(&[("<1>a", true), ("<2>", false), ("<3>x", true)]));
    }

    #[test]
    fn huge_declared_count_allocates_nothing() {
        let mut f = Framer::new(16);
        let mut n = 0;
        f.push(b"4294967296 ", |_, _| n += 1).unwrap();
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..64 {
            f.push(&chunk, |_, _| n += 1).unwrap();
            assert!(f.buffered() <= 16);
        }
        assert_eq!(n, 0);
        let mut got = Vec::new();
        f.finish(|m, t| got.push((m.to_vec(), t)));
        assert_eq!(got, vec![(b"x".repeat(16), true)]);
    }

    #[test]
    fn absurd_counts_close_the_connection() {
        assert_eq!(
            frames(8, &[b"1 a12345678901 x"]).1,
            Err(FrameError::CountTooLong)
        );
        // On a fresh connection, eleven digits are the start of a line, not a count.
        let (out, r) = frames(100, &[b"12345678901 x\n"]);
        assert!(r.is_ok());
        assert_eq!(out, msgs(&[("12345678901 x", false)]));
        assert_eq!(frames(8, &[b"5 abcde12x"]).1, Err(FrameError::BadCount));
        // 10 digits is still a count: 9999999999 bytes declared, cut at 8.
        assert!(frames(8, &[b"9999999999 abc"]).1.is_ok());
    }
}
