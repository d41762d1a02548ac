//! Intel items at the relay, stored under `<store_dir>/<agent>/intel/`:
//!
//! ```text
//! <period-start>.json.gz                      one period's item, verified (see crate::intel::item)
//! <start>.partial-<cut>.json.gz               a `run-now` preview of an open period
//! <name>.<sha256 prefix>.part                 chunks written at their offsets while it arrives
//! <name>.rejected, <name>.rejected.txt        an item that arrived whole but failed verification
//! ```
//!
//! The first complete copy of a name is kept: an agent that crashed between queueing
//! an item and recording that it did queues it again, and the copy is acknowledged
//! without being written (so each period is stored exactly once).

use std::fs;
use std::path::Path;

use super::incidents::{Outcome, file_sha256, write_chunk};
use crate::util::{create_dir_all_durable, sync_dir, write_atomic};

/// The most record bytes an item may announce (the agent's `max_upload_size` ≤ 4 GiB).
const MAX_RECORDS_BYTES: u64 = 4 << 30;

/// Store one chunk of the item `name`; `Err` means nothing durable happened.
pub fn store_chunk(
    store_dir: &Path,
    agent: &str,
    name: &str,
    offset: u64,
    total: u64,
    sha256: &str,
    payload: &[u8],
) -> Result<Outcome, String> {
    if !crate::intel::valid_item_name(name) {
        return Err(format!("intel item name {name:?} is not <period>.json.gz"));
    }
    let dir = store_dir.join(agent).join(crate::intel::SOURCE);
    create_dir_all_durable(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let fin = dir.join(name);
    if fin.exists() {
        return Ok(Outcome::Stored(format!(
            "intel item {name} (already stored)"
        )));
    }
    // Two different copies of one name (see the module doc) never mix their chunks.
    let part = dir.join(format!(
        "{name}.{}.part",
        sha256.get(..16).unwrap_or(sha256)
    ));
    let Some(len) = write_chunk(&part, offset, total, payload)? else {
        return Ok(Outcome::Stored(format!(
            "intel item {name} chunk at {offset} of {total}"
        )));
    };
    let reason = if len != total {
        Some(format!("item is {len} bytes, expected {total}"))
    } else {
        match file_sha256(&part) {
            Ok(h) if h == sha256 => fs::File::open(&part)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    crate::intel::item::verify(std::io::BufReader::new(f), MAX_RECORDS_BYTES)
                })
                .err(),
            Ok(h) => Some(format!("item SHA-256 is {h}, the agent announced {sha256}")),
            Err(e) => Some(format!("cannot read the item back: {e}")),
        }
    };
    match reason {
        None => {
            fs::rename(&part, &fin).map_err(|e| e.to_string())?;
            sync_dir(&dir).map_err(|e| e.to_string())?;
            Ok(Outcome::IntelComplete(fin))
        }
        Some(why) => {
            let rejected = dir.join(format!("{name}.rejected"));
            fs::rename(&part, &rejected).map_err(|e| e.to_string())?;
            write_atomic(&dir.join(format!("{name}.rejected.txt")), why.as_bytes())
                .map_err(|e| e.to_string())?;
            Ok(Outcome::IntelRejected(why))
        }
    }
}
