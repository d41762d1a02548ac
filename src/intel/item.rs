//! The intel item file: what one period's upload is, on the agent's disk, on the wire
//! (in chunks) and in the relay's store.
//!
//! ```text
//! <period-start>.json.gz = gzip(
//!   {"format":"soclink-intel/1", "agent":.., "host":.., "period_start":.., "period_end":..,
//!    "partial":false, "generated_at":.., "records":N, "records_bytes":B,
//!    "records_sha256":"<hex of every byte after this line>", "records_left_out":0,
//!    "records_left_out_bytes":0, "summary":{..}}\n
//!   <record>\n ...      one file event per alert line (see crate::event), as staged
//! )
//! ```
//!
//! [`verify`] checks a whole item in bounded memory: one gzip stream, a header line of
//! at most [`MAX_HEADER`] bytes, then exactly `records_bytes` bytes of records whose
//! SHA-256 and line count match the header, then the end.

use std::io::{BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` every header carries.
pub const FORMAT: &str = "soclink-intel/1";
/// Largest header line (the summary is small; this bounds a hostile one).
pub const MAX_HEADER: u64 = 1 << 20;

/// The first line of an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub agent: String,
    pub host: String,
    pub period_start: String,
    pub period_end: String,
    /// Cut by `soclink intel run-now` before the period ended: a preview, which does not
    /// take the records out of the period's full item.
    pub partial: bool,
    pub generated_at: String,
    /// Lines after the header.
    pub records: u64,
    pub records_bytes: u64,
    pub records_sha256: String,
    /// Records of the period not included because of `max_upload_size`.
    pub records_left_out: u64,
    pub records_left_out_bytes: u64,
    pub summary: serde_json::Value,
}

/// Write the gzip item: the header line, then each chunk of records as given. The
/// header's record figures must describe exactly these chunks.
pub fn write<W: Write>(
    out: W,
    header: &Header,
    records: impl Iterator<Item = std::io::Result<Vec<u8>>>,
) -> std::io::Result<W> {
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(6));
    let mut line = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    line.push(b'\n');
    gz.write_all(&line)?;
    for chunk in records {
        gz.write_all(&chunk?)?;
    }
    gz.finish()
}

/// Check an item: gzip, header, records hash, count and length. `max_records_bytes`
/// bounds what a header may claim (and so the inflation).
pub fn verify<R: Read>(input: R, max_records_bytes: u64) -> Result<Header, String> {
    let gz = flate2::read::GzDecoder::new(input);
    let mut r = BufReader::new(gz);
    let mut line = Vec::new();
    (&mut r)
        .take(MAX_HEADER + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("item does not inflate: {e}"))?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() as u64 > MAX_HEADER {
            format!("header line longer than {MAX_HEADER} bytes")
        } else {
            "item ends inside its header line".to_string()
        });
    }
    let h: Header =
        serde_json::from_slice(&line).map_err(|e| format!("header is not an intel header: {e}"))?;
    if h.format != FORMAT {
        return Err(format!(
            "unknown format {:?} (expected {FORMAT:?})",
            h.format
        ));
    }
    if h.records_bytes > max_records_bytes {
        return Err(format!(
            "header claims {} bytes of records, more than the {max_records_bytes} accepted",
            h.records_bytes
        ));
    }
    let mut hasher = Sha256::new();
    let (mut bytes, mut lines, mut last) = (0u64, 0u64, b'\n');
    let mut buf = vec![0u8; 64 << 10];
    // One byte past the claim tells "longer than announced" from "exactly that long".
    let mut body = (&mut r).take(h.records_bytes + 1);
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| format!("records do not inflate: {e}"))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        if bytes > h.records_bytes {
            return Err(format!(
                "records are longer than the {} bytes the header announces",
                h.records_bytes
            ));
        }
        hasher.update(&buf[..n]);
        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        last = buf[n - 1];
    }
    if bytes != h.records_bytes {
        return Err(format!(
            "records are {bytes} bytes, the header announces {}",
            h.records_bytes
        ));
    }
    if last != b'\n' {
        return Err("the last record has no newline".into());
    }
    if lines != h.records {
        return Err(format!(
            "{lines} records, the header announces {}",
            h.records
        ));
    }
    let sha = crate::incident::hex(&hasher.finalize());
    if sha != h.records_sha256 {
        return Err(format!(
            "records SHA-256 is {sha}, the header announces {}",
            h.records_sha256
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(records: &[u8]) -> Header {
        Header {
            format: FORMAT.into(),
            agent: "a".into(),
            host: "h".into(),
            period_start: "2026-11-26T03:00:00Z".into(),
            period_end: "2026-11-26T04:00:00Z".into(),
            partial: false,
            generated_at: "2026-11-26T04:00:01Z".into(),
            records: records.iter().filter(|b| **b == b'\n').count() as u64,
            records_bytes: records.len() as u64,
            records_sha256: crate::incident::hex(&Sha256::digest(records)),
            records_left_out: 0,
            records_left_out_bytes: 0,
            summary: serde_json::json!({}),
        }
    }

    fn item(h: &Header, records: &[u8]) -> Vec<u8> {
        write(Vec::new(), h, std::iter::once(Ok(records.to_vec()))).unwrap()
    }

    #[test]
    fn round_trip_and_every_lie_is_caught() {
        let recs = b"{\"message\":\"a\"}\n{\"message\":\"b\"}\n";
        let h = header(recs);
        assert_eq!(verify(&item(&h, recs)[..], 1 << 20).unwrap(), h);
        let empty = header(b"");
        assert_eq!(verify(&item(&empty, b"")[..], 1 << 20).unwrap(), empty);

        let mut more = h.clone();
        more.records = 3;
        assert!(
            verify(&item(&more, recs)[..], 1 << 20)
                .unwrap_err()
                .contains("3")
        );
        let mut sha = h.clone();
        sha.records_sha256 = "00".repeat(32);
        assert!(
            verify(&item(&sha, recs)[..], 1 << 20)
                .unwrap_err()
                .contains("SHA-256")
        );
        let mut short = h.clone();
        short.records_bytes -= 1;
        assert!(
            verify(&item(&short, recs)[..], 1 << 20)
                .unwrap_err()
                .contains("longer")
        );
        let mut long = h.clone();
        long.records_bytes += 10;
        assert!(
            verify(&item(&long, recs)[..], 1 << 20)
                .unwrap_err()
                .contains("announces")
        );
        assert!(
            verify(&item(&h, recs)[..], 4)
                .unwrap_err()
                .contains("accepted")
        );
        let mut fmt = h.clone();
        fmt.format = "x".into();
        assert!(
            verify(&item(&fmt, recs)[..], 1 << 20)
                .unwrap_err()
                .contains("format")
        );
        let gz = item(&h, recs);
        assert!(verify(&gz[..gz.len() - 9], 1 << 20).is_err());
        assert!(verify(&b"not gzip"[..], 1 << 20).is_err());
    }
}
