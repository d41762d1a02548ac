//! The systemd journal source (being built): reads journal entries with libsystemd and
//! resumes at the cursor of the last durable batch.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::SealedBatch;
use super::file::BatchLimits;
use crate::config::JournaldSourceConfig;

/// Counters shown by `soclink status`.
#[derive(Debug, Default)]
pub struct JournaldStats {
    pub entries: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
}

pub struct JournaldSource {
    name: String,
}

impl JournaldSource {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        _host: String,
        _cfg: JournaldSourceConfig,
        _limits: BatchLimits,
        _cursor: Option<String>,
        _out: mpsc::Sender<SealedBatch>,
        _stop: CancellationToken,
        _stats: Arc<JournaldStats>,
    ) -> JournaldSource {
        JournaldSource { name }
    }

    /// Blocking: runs on its own thread until `stop`.
    pub fn run(self) {
        tracing::error!(source = %self.name, "the journald source is not available in this build");
    }
}
