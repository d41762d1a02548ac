//! A read-only view of a spool directory, for `soclink spool dump` and tests while the
//! owning process runs: it takes no lock, repairs nothing and writes nothing. It reads
//! each segment front to back and stops at the first record that does not validate
//! (a record being written right now, or damage that only the owner's recovery may
//! judge), so it shows a consistent prefix of what is on disk.

use std::path::Path;

use super::format::{self, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::{LEDGER_FILE, Record};

/// The acknowledged position recorded in the ledger (0 if none or unreadable).
pub fn acked(dir: &Path) -> u64 {
    std::fs::read(dir.join(LEDGER_FILE))
        .ok()
        .and_then(|b| format::decode_ledger(&b).ok())
        .map_or(0, |l| l.acked)
}

/// Every valid record with `seq >= from`, in order.
pub fn records(dir: &Path, from: u64) -> std::io::Result<Vec<Record>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        // Not created yet: nothing spooled.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut segs: Vec<(u64, std::path::PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let first = name.strip_suffix(".seg")?.parse::<u64>().ok()?;
            Some((first, e.path()))
        })
        .collect();
    segs.sort();
    let mut out = Vec::new();
    for (_, path) in segs {
        let Ok(bytes) = std::fs::read(&path) else {
            continue; // deleted since listed (acknowledged meanwhile)
        };
        if format::decode_segment_header(&bytes).is_err() {
            continue;
        }
        let mut pos = SEGMENT_HEADER_LEN;
        while let Some(h) = bytes
            .get(pos..pos + RECORD_HEADER_LEN)
            .and_then(format::decode_record_header)
        {
            let body_start = pos + RECORD_HEADER_LEN;
            let Some(body) = usize::try_from(h.body_len())
                .ok()
                .and_then(|len| bytes.get(body_start..body_start + len))
            else {
                break;
            };
            if format::record_crc(&bytes[pos..body_start], body) != h.crc {
                break;
            }
            if h.seq >= from {
                let (meta, payload) = body.split_at(h.meta_len as usize);
                out.push(Record {
                    seq: h.seq,
                    meta: meta.to_vec(),
                    payload: payload.to_vec(),
                });
            }
            pos = body_start + body.len();
        }
    }
    Ok(out)
}
