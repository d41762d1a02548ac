//! Sources: where events come from. Each source runs on its own thread, encodes its
//! events straight into batch buffers, and hands sealed batches (with the resume
//! positions they cover) to the agent's pipeline.

pub mod checkpoint;
pub mod file;
pub mod guard;
pub mod journald;
pub mod syslog;

/// A batch of encoded events ready to be compressed and spooled.
#[derive(Debug)]
pub struct SealedBatch {
    /// Index of the source in the config, so the pipeline can route cursors back.
    pub source: String,
    pub day: String,
    pub events: u32,
    /// NDJSON, one event per line.
    pub raw: Vec<u8>,
    /// Where the source resumes after this batch (opaque to the pipeline).
    pub cursor: Option<serde_json::Value>,
}
