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

use super::incidents::{Outcome, settle_whole, write_chunk};
use crate::util::create_dir_all_durable;

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
    let why = settle_whole(
        &part,
        len,
        total,
        sha256,
        "item",
        |p| {
            let f = fs::File::open(p).map_err(|e| e.to_string())?;
            crate::intel::item::verify(std::io::BufReader::new(f), MAX_RECORDS_BYTES).map(|_| ())
        },
        &fin,
        &dir.join(format!("{name}.rejected")),
        &dir.join(format!("{name}.rejected.txt")),
    )?;
    Ok(match why {
        None => Outcome::IntelComplete(fin),
        Some(why) => Outcome::IntelRejected(why),
    })
}
