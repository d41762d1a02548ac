//! Incidents: records with their 1-hour reporting deadline, evidence bundles, and the
//! standalone bundle verifier.
//!
//! - [`record`]: the incident record, its timeline, the durable store under
//!   `<state_dir>/incidents/`, deadline arithmetic and the human renderers.
//! - [`bundle`]: builds the evidence bundle (tar.gz, streamed to disk, manifest last).
//! - [`hostfacts`]: small text facts about the host that go into a bundle.
//! - [`verify`]: checks a bundle against its manifest and refuses hostile archives.
//! - [`cli`]: clap arguments and `run_*` entry points for `soclink incident` and
//!   `soclink bundle`.
//!
//! The bundle format (also what the relay verifies before acknowledging):
//!
//! ```text
//! bundle.tar.gz = gzip(tar(
//!     host/<fact>.txt ...                     small text facts, failures in the manifest
//!     journal/<source>.export ...             `journalctl --output=export` of the window
//!     files/<source>/<sanitised path> ...     original bytes of log files and rotations
//!     manifest.json                           ALWAYS last: Manifest (see bundle.rs)
//! ))
//! ```
//!
//! Invariant: every member before `manifest.json` is listed in it with its exact size
//! and SHA-256, computed from the very bytes written into the archive.

/// Present in an incident's folder while a process builds its bundle.
pub const BUILDING_MARKER: &str = "bundle.building";

/// Present when the declaration asked for no evidence bundle (`--no-bundle`).
pub const NO_BUNDLE_MARKER: &str = "no-bundle";

pub mod record;
pub mod verify;

use std::time::Duration;

pub use record::{
    DeclareRequest, EventKind, Incident, IncidentError, IncidentStore, LinkStatus, Remaining,
    TimelineEvent, render_list, render_show,
};
pub use verify::{VerifyError, VerifyLimits, VerifyReport, verify_bundle};

/// Most members a bundle may hold (builder and verifier agree).
pub const MAX_MEMBERS: u64 = 100_000;
/// Largest manifest.json (builder and verifier agree).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Longest member name, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// The manifest's member name.
pub const MANIFEST_NAME: &str = "manifest.json";

/// Incident settings the integrator takes from the agent configuration.
#[derive(Debug, Clone)]
pub struct IncidentSettings {
    /// Levels whose declaration builds an evidence bundle (guideline 4.1(二)7: 3 and 4).
    pub auto_bundle_levels: Vec<u8>,
    /// `incident.max_bundle_size`.
    pub max_bundle_size: u64,
    /// How far before discovery the bundle reaches.
    pub window: Duration,
    /// How to reach the center when the link is down (phone, e-mail).
    pub center_contact: Option<String>,
}

impl Default for IncidentSettings {
    fn default() -> Self {
        IncidentSettings {
            auto_bundle_levels: vec![3, 4],
            max_bundle_size: 2 << 30,
            window: Duration::from_secs(72 * 3600),
            center_contact: None,
        }
    }
}

/// Whether declaring an incident of `level` builds an evidence bundle.
pub fn needs_bundle(level: u8, auto_levels: &[u8]) -> bool {
    auto_levels.contains(&level)
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}
