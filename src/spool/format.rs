//! Byte layouts of the spool's files: segment header, record, ack ledger.
//!
//! Everything is little-endian and fixed-size where possible, so a parser can bound
//! every allocation before it makes it. Decoders never panic and never trust a length
//! they have not checked against [`MAX_RECORD_BYTES`] and the bytes actually present.
//! The layouts are drawn as pseudo-structs in the module doc of [`super`].

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SOCLSPOL";
/// Magic at the start of every record; lets recovery resynchronise after damage.
pub const RECORD_MAGIC: [u8; 4] = *b"SLR\xA7";
/// Magic at the start of the ack ledger.
pub const LEDGER_MAGIC: [u8; 8] = *b"SOCLACKD";
/// Version of all three layouts.
pub const VERSION: u32 = 1;

pub const SEGMENT_HEADER_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = 32;
pub const LEDGER_LEN: usize = 40;

/// Largest `meta` + `payload` of one record. Checked before allocating on read, and
/// enforced on append, so a damaged length can never make recovery allocate more.
pub const MAX_RECORD_BYTES: u64 = 256 * 1024 * 1024;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(s))
}

/// Why a header or ledger was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Damaged: recovery quarantines it.
    Invalid(String),
    /// Intact but written by a newer format version: must not be touched at all.
    Version(u32),
}

impl From<&str> for DecodeError {
    fn from(s: &str) -> Self {
        DecodeError::Invalid(s.to_owned())
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Invalid(why) => f.write_str(why),
            DecodeError::Version(v) => write!(
                f,
                "format version {v} is not supported by this soclink (it reads version {VERSION})"
            ),
        }
    }
}

/// Segment header bytes for a segment whose first record will have `first_seq`.
pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    // 12..16: flags, zero.
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    // 28..32: reserved, zero.
    h
}

/// Validates a segment header; returns its `first_seq`, or why it is not valid.
pub fn decode_segment_header(h: &[u8]) -> Result<u64, DecodeError> {
    if h.len() < SEGMENT_HEADER_LEN {
        return Err(DecodeError::Invalid(format!(
            "header is {} bytes, need {SEGMENT_HEADER_LEN}",
            h.len()
        )));
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic".into());
    }
    let crc = u32_at(h, 24).ok_or("short header")?;
    if crc != crc32fast::hash(&h[0..24]) {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32_at(h, 8).ok_or("short header")?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok(u64_at(h, 16).ok_or("short header")?)
}

/// The fixed part of a record, as read from disk (not yet checksum-verified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub crc: u32,
    pub seq: u64,
    pub time_ms: u64,
    pub meta_len: u32,
    pub payload_len: u32,
}

impl RecordHeader {
    /// `meta` + `payload` length.
    pub fn body_len(&self) -> u64 {
        u64::from(self.meta_len) + u64::from(self.payload_len)
    }

    /// Whole record length on disk.
    pub fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.body_len()
    }
}

/// Parses the fixed record header; `None` if the magic is wrong or the size exceeds
/// [`MAX_RECORD_BYTES`] (so the caller never allocates for a damaged length).
pub fn decode_record_header(h: &[u8]) -> Option<RecordHeader> {
    if h.get(0..4)? != RECORD_MAGIC {
        return None;
    }
    let header = RecordHeader {
        crc: u32_at(h, 4)?,
        seq: u64_at(h, 8)?,
        time_ms: u64_at(h, 16)?,
        meta_len: u32_at(h, 24)?,
        payload_len: u32_at(h, 28)?,
    };
    (header.body_len() <= MAX_RECORD_BYTES).then_some(header)
}

/// CRC32 over the header fields after `crc` (bytes 8..32) and the body.
pub fn record_crc(header_bytes: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_bytes.get(8..RECORD_HEADER_LEN).unwrap_or(&[]));
    h.update(body);
    h.finalize()
}

/// Appends one encoded record to `out`. Callers have checked the sizes fit `u32` and
/// [`MAX_RECORD_BYTES`].
pub fn encode_record(out: &mut Vec<u8>, seq: u64, time_ms: u64, meta: &[u8], payload: &[u8]) {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&time_ms.to_le_bytes());
    h[24..28].copy_from_slice(&(meta.len() as u32).to_le_bytes());
    h[28..32].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[8..]);
    crc.update(meta);
    crc.update(payload);
    h[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(meta);
    out.extend_from_slice(payload);
}

/// The persisted acknowledgement state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    pub acked: u64,
    pub checkpointed: u64,
}

pub fn encode_ledger(l: Ledger) -> [u8; LEDGER_LEN] {
    let mut b = [0u8; LEDGER_LEN];
    b[0..8].copy_from_slice(&LEDGER_MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    // 12..16: flags, zero.
    b[16..24].copy_from_slice(&l.acked.to_le_bytes());
    b[24..32].copy_from_slice(&l.checkpointed.to_le_bytes());
    let crc = crc32fast::hash(&b[0..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_ledger(b: &[u8]) -> Result<Ledger, DecodeError> {
    if b.len() != LEDGER_LEN {
        return Err(DecodeError::Invalid(format!(
            "ledger is {} bytes, expected {LEDGER_LEN}",
            b.len()
        )));
    }
    if b[0..8] != LEDGER_MAGIC {
        return Err("bad ledger magic".into());
    }
    let crc = u32_at(b, 32).ok_or("short ledger")?;
    if crc != crc32fast::hash(&b[0..32]) {
        return Err("ledger checksum mismatch".into());
    }
    let version = u32_at(b, 8).ok_or("short ledger")?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok(Ledger {
        acked: u64_at(b, 16).ok_or("short ledger")?,
        checkpointed: u64_at(b, 24).ok_or("short ledger")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_crc_covers_every_byte() {
        let mut out = Vec::new();
        encode_record(&mut out, 7, 99, b"meta", b"payload");
        let h = decode_record_header(&out).unwrap();
        assert_eq!((h.seq, h.time_ms, h.meta_len, h.payload_len), (7, 99, 4, 7));
        assert_eq!(h.crc, record_crc(&out[..32], &out[32..]));
        for i in 8..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 1;
            let ok = decode_record_header(&bad)
                .is_some_and(|h| h.crc == record_crc(&bad[..32], &bad[32..]));
            assert!(!ok, "flip at {i} undetected");
        }
    }

    #[test]
    fn ledger_and_segment_header_roundtrip() {
        let l = Ledger {
            acked: 5,
            checkpointed: u64::MAX,
        };
        assert_eq!(decode_ledger(&encode_ledger(l)), Ok(l));
        assert_eq!(decode_segment_header(&encode_segment_header(42)), Ok(42));
        let mut b = encode_ledger(l);
        b[20] ^= 0x10;
        assert!(decode_ledger(&b).is_err());
    }
}
