//! The Event record and its NDJSON encoding.
//!
//! Every event is one JSON object on one line:
//!
//! ```text
//! {"ts":"2026-11-26T01:02:03.123456789Z",   // when soclink collected it (UTC, ns)
//!  "host":"web-01", "source":"system",      // collecting host, configured source name
//!  "path":"/var/log/syslog","offset":1234,  // file sources: file and byte offset of the line
//!  "message":"..."                          // the line, when it is valid UTF-8
//!  "message_base64":"..."                   // otherwise: the exact original bytes
//!  "truncated":true}                        // only when the line exceeded max_line_bytes
//! ```
//!
//! Encoding writes straight into the batch buffer: the fields shared by a whole read
//! (ts, host, source, path) are escaped once into a prefix, so a line costs one escape
//! of its message and no allocation.

use base64::Engine;

/// The part of an event shared by all lines of one read of one file, pre-encoded.
pub struct FilePrefix {
    /// `{"ts":"..","host":..,"source":..,"path":..,"offset":`
    bytes: Vec<u8>,
}

impl FilePrefix {
    pub fn new(ts: &str, host: &str, source: &str, path: &str) -> FilePrefix {
        let mut bytes = Vec::with_capacity(96 + path.len());
        bytes.extend_from_slice(b"{\"ts\":");
        push_json_str(&mut bytes, ts);
        bytes.extend_from_slice(b",\"host\":");
        push_json_str(&mut bytes, host);
        bytes.extend_from_slice(b",\"source\":");
        push_json_str(&mut bytes, source);
        bytes.extend_from_slice(b",\"path\":");
        push_json_str(&mut bytes, path);
        bytes.extend_from_slice(b",\"offset\":");
        FilePrefix { bytes }
    }
}

/// Append one file event (and its newline) to `out`.
pub fn encode_file_line(
    out: &mut Vec<u8>,
    prefix: &FilePrefix,
    offset: u64,
    line: &[u8],
    truncated: bool,
) {
    out.extend_from_slice(&prefix.bytes);
    push_u64(out, offset);
    push_message(out, line);
    if truncated {
        out.extend_from_slice(b",\"truncated\":true");
    }
    out.extend_from_slice(b"}\n");
}

/// `,"message":"..."` for UTF-8, `,"message_base64":"..."` for anything else.
pub fn push_message(out: &mut Vec<u8>, line: &[u8]) {
    match std::str::from_utf8(line) {
        Ok(s) => {
            out.extend_from_slice(b",\"message\":");
            push_json_str(out, s);
        }
        Err(_) => {
            out.extend_from_slice(b",\"message_base64\":\"");
            let start = out.len();
            let encoded_len = base64::encoded_len(line.len(), true).unwrap_or(0);
            out.resize(start + encoded_len, 0);
            let written = base64::engine::general_purpose::STANDARD
                .encode_slice(line, &mut out[start..])
                .unwrap_or(0);
            out.truncate(start + written);
            out.push(b'"');
        }
    }
}

fn push_u64(out: &mut Vec<u8>, v: u64) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(v).as_bytes());
}

/// Append `s` as a JSON string literal. Hand-rolled because it is the hottest loop of
/// the agent: [`clean_len`] finds the next byte to escape eight bytes at a time, and
/// the run before it is copied in one go.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    loop {
        let rest = b.get(start..).unwrap_or_default();
        let n = clean_len(rest);
        out.extend_from_slice(rest.get(..n).unwrap_or_default());
        let Some(&c) = rest.get(n) else {
            break;
        };
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(c >> 4) as usize],
                HEX[(c & 0xf) as usize],
            ]),
        }
        start += n + 1;
    }
    out.push(b'"');
}

/// Whether a byte must be escaped in a JSON string (as [`push_json_str`] writes it).
fn needs_escape(c: u8) -> bool {
    c < 0x20 || c == b'"' || c == b'\\' || c == 0x7f
}

/// Length of the prefix of `b` that needs no escaping. Whole 8-byte words are tested at
/// once for a byte below 0x20, a quote, a backslash or 0x7f with the "has zero byte"
/// and "has byte less than n" word tests. Those can flag a byte above a true match
/// (a borrow runs upwards) but never below one, so the lowest flagged byte is the
/// first that needs escaping.
fn clean_len(b: &[u8]) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(LO) & !v;
    let mut words = b.chunks_exact(8);
    let mut n = 0;
    for w in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        let x = u64::from_le_bytes(word);
        let hits = (x.wrapping_sub(LO * 0x20) & !x
            | has_zero(x ^ (LO * u64::from(b'"')))
            | has_zero(x ^ (LO * u64::from(b'\\')))
            | has_zero(x ^ (LO * 0x7f)))
            & HI;
        if hits != 0 {
            return n + (hits.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    n + words
        .remainder()
        .iter()
        .position(|&c| needs_escape(c))
        .unwrap_or(words.remainder().len())
}

/// Recover the original bytes of an event's message (`message` or `message_base64`).
pub fn message_bytes(event: &serde_json::Value) -> Option<Vec<u8>> {
    if let Some(m) = event.get("message").and_then(|m| m.as_str()) {
        return Some(m.as_bytes().to_vec());
    }
    let b64 = event.get("message_base64")?.as_str()?;
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(line: &[u8]) -> serde_json::Value {
        let p = FilePrefix::new("2026-01-01T00:00:00Z", "h\"1", "s", "/var/log/\u{7f}x");
        let mut out = Vec::new();
        encode_file_line(&mut out, &p, 42, line, false);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(message_bytes(&v).unwrap(), line);
        v
    }

    #[test]
    fn utf8_and_control_bytes_roundtrip() {
        let v = roundtrip("tab\there \"quoted\" back\\slash \u{0}\u{1f} 中文".as_bytes());
        assert_eq!(v["offset"], 42);
        assert_eq!(v["host"], "h\"1");
        assert!(v.get("truncated").is_none());
    }

    #[test]
    fn invalid_utf8_goes_to_base64() {
        let v = roundtrip(b"\xff\xfe bad \x00 bytes");
        assert!(v.get("message").is_none());
        assert!(v.get("message_base64").is_some());
    }

    /// The byte-at-a-time encoder `push_json_str` replaced: the output must not change.
    fn reference_json_str(s: &str) -> Vec<u8> {
        let mut out = vec![b'"'];
        for c in s.bytes() {
            match c {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
                _ => out.push(c),
            }
        }
        out.push(b'"');
        out
    }

    #[test]
    fn every_byte_value_at_every_word_position_escapes_as_before() {
        for c in (0u8..0x80).map(char::from).chain(['é', '中', '\u{10ffff}']) {
            for pos in 0..20 {
                let mut s: String = "abcdefghijklmnopqrstu".chars().take(pos).collect();
                s.push(c);
                // Bytes next to an escaped one that the word test can flag falsely
                // (a borrow from below turns 0x20 into 0x1f, '#' into '"' ...).
                for next in [
                    ' ', '!', '#', ']', '"', '\\', '\u{1f}', '\u{7f}', '\u{80}', 'x',
                ] {
                    let mut s = s.clone();
                    s.push(next);
                    s.push_str("xyz0123456789");
                    let mut out = Vec::new();
                    push_json_str(&mut out, &s);
                    assert_eq!(out, reference_json_str(&s), "{s:?}");
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn escaping_is_unchanged(s in "[ -~\t\r\n\u{0}-\u{1f}\u{7f}é中]{0,64}") {
            let mut out = Vec::new();
            push_json_str(&mut out, &s);
            proptest::prop_assert_eq!(out, reference_json_str(&s));
        }
        #[test]
        fn any_bytes_roundtrip(line in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            roundtrip(&line);
        }
        #[test]
        fn any_string_roundtrip(s in ".*") {
            roundtrip(s.as_bytes());
        }
    }
}
