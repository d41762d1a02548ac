//! (to be written)
//!
//! - [`store`]: the durable store: appends each batch's gzip member exactly once to
//!   `<store>/<agent-id>/<source>/<YYYY-MM-DD>.ndjson.gz`, crash-safe.

pub mod store;
