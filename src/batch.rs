//! Batches: the unit that is compressed, spooled, shipped, acknowledged and stored.
//!
//! A batch is NDJSON (one encoded [`crate::event`] per line) compressed **once** into
//! a single gzip member. It is described by a [`BatchMeta`], which the spool keeps next
//! to the gzip bytes and the wire protocol turns into the batch frame's header.

use serde::{Deserialize, Serialize};

/// What the spool stores next to a batch's gzip bytes (JSON-encoded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMeta {
    /// Source name from the config; becomes a folder name at the relay.
    pub source: String,
    /// UTC day (`YYYY-MM-DD`) the batch is filed under: that of its events' collection
    /// time (for syslog the receive time, not the device's); a batch never spans two days, so
    /// the relay appends it to exactly one store file.
    pub day: String,
    /// Number of events (NDJSON lines) in the batch; the relay checks it.
    pub events: u32,
    /// Uncompressed length in bytes; the relay bounds inflation by it.
    pub raw_bytes: u64,
    /// Set when the batch was received from someone else (a forwarding relay): the
    /// original agent identity and stream position, which the top relay dedupes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// What the payload is when it is not routine log events (incident records and
    /// evidence bundles travel in the priority lane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<Item>,
    /// Source-specific resume position after this batch (e.g. file offsets). Opaque to
    /// everything but the source that wrote it; lets a restart resume exactly after the
    /// last durable batch even when the checkpoint file is older.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<serde_json::Value>,
}

/// Identity and position of a batch as first spooled by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub agent: String,
    pub stream: String,
    pub seq: u64,
}

/// A spooled item that is not a batch of log events.
///
/// The relay stores these under `<store>/<agent>/incidents/<incident>/` instead of the
/// log layout. `IncidentRecord` and `IncidentReport` payloads are one gzip member of
/// one JSON line (so they verify like any batch); a `BundleChunk` payload is raw bytes
/// of the evidence bundle (a tar.gz), at `offset` of `total`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Item {
    IncidentRecord {
        incident: String,
    },
    IncidentReport {
        incident: String,
    },
    BundleChunk {
        incident: String,
        offset: u64,
        total: u64,
        /// SHA-256 (hex) of the whole bundle file; checked when the last chunk is in.
        sha256: String,
    },
    /// A chunk of one periodic SOC intelligence upload (see [`crate::intel`]): raw
    /// bytes of the item file `name` (a `.json.gz`), stored at the relay under
    /// `<store>/<agent>/intel/<name>`.
    IntelChunk {
        name: String,
        offset: u64,
        total: u64,
        /// SHA-256 (hex) of the whole item file; checked when the last chunk is in.
        sha256: String,
    },
}

impl Item {
    /// The path component the relay files this item under: the incident id, or the
    /// intel item's file name.
    pub fn key(&self) -> &str {
        match self {
            Item::IncidentRecord { incident }
            | Item::IncidentReport { incident }
            | Item::BundleChunk { incident, .. } => incident,
            Item::IntelChunk { name, .. } => name,
        }
    }

    /// `(offset, total, sha256)` of a chunk of a file shipped in pieces: raw bytes,
    /// checked as a whole when the last piece is in (not NDJSON like a batch).
    pub fn chunk(&self) -> Option<(u64, u64, &str)> {
        match self {
            Item::BundleChunk {
                offset,
                total,
                sha256,
                ..
            }
            | Item::IntelChunk {
                offset,
                total,
                sha256,
                ..
            } => Some((*offset, *total, sha256)),
            _ => None,
        }
    }
}
