//! Incident items at the relay: records, closing reports and evidence bundles, stored
//! under `<store_dir>/<agent>/incidents/<incident>/`:
//!
//! ```text
//! record.json          the latest incident record the agent sent (replaced atomically)
//! report.json          the closing report with the agent's timeline
//! bundle.tar.gz.part   chunks written at their offsets while the bundle arrives
//! bundle.tar.gz        the whole bundle, once its SHA-256 and every manifest hash match
//! manifest.json        the bundle's manifest, beside it for operators
//! bundle.rejected.txt  why a bundle that arrived whole was refused (then kept as
//!                      bundle.tar.gz.rejected for inspection, never as evidence)
//! ```
//!
//! Every write is idempotent (the same chunk at the same offset, the same record
//! replaced) and fsynced before the caller commits the stream position, so a crash
//! between the two only causes the same write again when the agent resends.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::batch::Item;
use crate::util::{create_dir_all_durable, sync_dir, write_atomic};

/// Largest incident record or report accepted (inflated).
const MAX_RECORD: u64 = 4 << 20;

/// What happened to an item, for the relay's log.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Stored(String),
    BundleComplete(PathBuf),
    BundleRejected(String),
    IntelComplete(PathBuf),
    IntelRejected(String),
}

pub fn incident_dir(store_dir: &Path, agent: &str, incident: &str) -> PathBuf {
    store_dir.join(agent).join("incidents").join(incident)
}

/// Store one item; `Err` means nothing durable happened and the sender must retry.
pub fn store_item(
    store_dir: &Path,
    agent: &str,
    item: &Item,
    payload: &[u8],
) -> Result<Outcome, String> {
    let incident = item.key();
    crate::tls::validate_identity(incident).map_err(|e| format!("incident id: {e}"))?;
    let dir = incident_dir(store_dir, agent, incident);
    create_dir_all_durable(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    match item {
        Item::IncidentRecord { .. } | Item::IncidentReport { .. } => {
            let json = inflate_json(payload)?;
            let name = if matches!(item, Item::IncidentRecord { .. }) {
                "record.json"
            } else {
                "report.json"
            };
            let path = dir.join(name);
            write_atomic(&path, &json)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(Outcome::Stored(format!("{name} of incident {incident}")))
        }
        Item::BundleChunk {
            offset,
            total,
            sha256,
            ..
        } => store_chunk(&dir, agent, *offset, *total, sha256, payload),
        Item::IntelChunk { .. } => Err("an intel item is not an incident item".into()),
    }
}

/// The record or report: one gzip member holding one JSON object (and its newline).
fn inflate_json(payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(payload)
        .take(MAX_RECORD + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("incident record does not inflate: {e}"))?;
    if out.len() as u64 > MAX_RECORD {
        return Err(format!("incident record larger than {MAX_RECORD} bytes"));
    }
    while out.last() == Some(&b'\n') {
        out.pop();
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| format!("incident record is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("incident record is not a JSON object".into());
    }
    Ok(out)
}

fn store_chunk(
    dir: &Path,
    agent: &str,
    offset: u64,
    total: u64,
    sha256: &str,
    payload: &[u8],
) -> Result<Outcome, String> {
    let fin = dir.join("bundle.tar.gz");
    let part = dir.join("bundle.tar.gz.part");
    if fin.exists() && !part.exists() {
        // Already complete: a resent chunk after the final rename.
        return Ok(Outcome::Stored("bundle chunk (already complete)".into()));
    }
    let Some(len) = write_chunk(&part, offset, total, payload)? else {
        return Ok(Outcome::Stored(format!(
            "bundle chunk at {offset} of {total}"
        )));
    };
    // The last chunk: the whole file must hash right and verify member by member.
    let why = settle_whole(
        &part,
        len,
        total,
        sha256,
        "bundle",
        |p| verify(p, agent),
        &fin,
        &dir.join("bundle.tar.gz.rejected"),
        &dir.join("bundle.rejected.txt"),
    )?;
    match why {
        None => {
            if let Ok(m) = extract_manifest(&fin) {
                let _ = write_atomic(&dir.join("manifest.json"), &m);
            }
            Ok(Outcome::BundleComplete(fin))
        }
        Some(why) => Ok(Outcome::BundleRejected(why)),
    }
}

/// A file that arrived whole in `part` (`len` bytes): checked for its length, its
/// SHA-256 and then by `check`, and renamed to `fin`; or, refused, set aside as
/// `rejected` with the reason in `reason_file`, never presented as accepted. Returns
/// the reason when refused.
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle_whole(
    part: &Path,
    len: u64,
    total: u64,
    sha256: &str,
    what: &str,
    check: impl FnOnce(&Path) -> Result<(), String>,
    fin: &Path,
    rejected: &Path,
    reason_file: &Path,
) -> Result<Option<String>, String> {
    let reason = if len != total {
        Some(format!("{what} is {len} bytes, expected {total}"))
    } else {
        match file_sha256(part) {
            Ok(h) if h == sha256 => check(part).err(),
            Ok(h) => Some(format!(
                "{what} SHA-256 is {h}, the agent announced {sha256}"
            )),
            Err(e) => Some(format!("cannot read the {what} back: {e}")),
        }
    };
    let dir = part.parent().unwrap_or(Path::new("."));
    match reason {
        None => {
            fs::rename(part, fin).map_err(|e| e.to_string())?;
            sync_dir(dir).map_err(|e| e.to_string())?;
            Ok(None)
        }
        Some(why) => {
            fs::rename(part, rejected).map_err(|e| e.to_string())?;
            write_atomic(reason_file, why.as_bytes()).map_err(|e| e.to_string())?;
            Ok(Some(why))
        }
    }
}

/// Write one piece of a file that arrives in chunks at its offset, durably (data and
/// directory entry). Returns the file's length when this was the last piece (the one
/// ending at `total`), `None` while more are to come.
pub(crate) fn write_chunk(
    part: &Path,
    offset: u64,
    total: u64,
    payload: &[u8],
) -> Result<Option<u64>, String> {
    let end = offset
        .checked_add(payload.len() as u64)
        .filter(|e| *e <= total)
        .ok_or_else(|| format!("chunk at {offset} runs past the file's {total} bytes"))?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
        .map_err(|e| format!("cannot open {}: {e}", part.display()))?;
    f.write_all_at(payload, offset)
        .and_then(|()| f.sync_data())
        .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
    if let Some(dir) = part.parent() {
        sync_dir(dir).map_err(|e| e.to_string())?;
    }
    if end < total {
        return Ok(None);
    }
    f.metadata()
        .map(|m| Some(m.len()))
        .map_err(|e| e.to_string())
}

/// The bundle verifies, and it was built by the agent whose certificate delivered it
/// (for a forwarded bundle: the agent the trusted forwarder speaks for): an agent
/// cannot pass off evidence as another agent's.
fn verify(path: &Path, agent: &str) -> Result<(), String> {
    let report = crate::incident::verify::verify_bundle(path)
        .map_err(|e| format!("bundle verification failed: {e}"))?;
    match crate::identity::normalize(&report.agent_id) {
        Ok(id) if id == agent => Ok(()),
        _ => Err(format!(
            "the bundle's manifest names agent {:?}, but it was delivered as agent {agent:?} \
             (the identity of its certificate): refused as evidence",
            report.agent_id
        )),
    }
}

pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::incident::hex(&h.finalize()))
}

/// The manifest of a bundle that already verified (so its structure is known good).
fn extract_manifest(path: &Path) -> std::io::Result<Vec<u8>> {
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(File::open(path)?));
    let mut ar = tar::Archive::new(gz);
    for e in ar.entries()? {
        let e = e?;
        if e.path()?.as_os_str() == "manifest.json" {
            let mut out = Vec::new();
            e.take(crate::incident::MAX_MANIFEST_BYTES + 1)
                .read_to_end(&mut out)?;
            return Ok(out);
        }
    }
    Err(std::io::Error::other("no manifest.json"))
}
