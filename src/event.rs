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
/// the agent: runs of bytes that need no escaping are copied in one go.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(c >> 4) as usize],
                HEX[(c & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
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

    proptest::proptest! {
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
