//! Source checkpoints: where each source resumes after a restart.
//!
//! On disk (`<state_dir>/checkpoints.json`), replaced atomically (temp, fsync, rename,
//! fsync dir):
//!
//! ```text
//! soclink-checkpoints v1 crc32=<8 hex digits of the JSON below>\n
//! { "spool_seq": u64,                       // every spooled batch <= this is reflected
//!   "sources": { "<source>": { "<dev>:<ino>": FilePos, ... }, ... } }
//! ```
//!
//! The rule that makes "exactly once into the spool" hold: a batch carries its sources'
//! positions *inside* its spool record, so after a crash the positions are
//! `checkpoint file ⊕ cursors of the spooled batches with seq > spool_seq`. The spool
//! keeps those records until this file has been written past them
//! (`Spool::set_checkpointed`), so the replay always finds them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fs::{Fs, RealFs, read_all, write_atomic};

const MAGIC: &str = "soclink-checkpoints v1 crc32=";

/// Resume position of one file, identified by device, inode and a fingerprint of its
/// first bytes (inode numbers are reused; the fingerprint tells a new file apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePos {
    pub dev: u64,
    pub ino: u64,
    /// How many leading bytes the fingerprint covers (0: file was empty when first seen).
    pub fp_len: u32,
    pub fp: u64,
    /// The name the file had when first tracked; where to look for it after a restart.
    pub path: String,
    /// Byte offset just after the last line that is durable in the spool.
    pub offset: u64,
    /// The source stopped tracking this file (rotated away and read to its end, or
    /// deleted): forget it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

impl FilePos {
    pub fn key(&self) -> String {
        format!("{}:{}", self.dev, self.ino)
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoints {
    pub spool_seq: u64,
    /// File sources: position of every tracked file, by `dev:ino`.
    pub sources: BTreeMap<String, BTreeMap<String, FilePos>>,
    /// Other sources with a single resume token (the journal's cursor).
    #[serde(default)]
    pub cursors: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint file {path} is corrupt ({why})")]
    Corrupt { path: PathBuf, why: String },
}

impl Checkpoints {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("checkpoints.json")
    }

    /// Load the checkpoint file; a missing file is an empty checkpoint.
    pub fn load(path: &Path) -> Result<Checkpoints, CheckpointError> {
        Self::load_with(&RealFs, path)
    }

    /// [`Checkpoints::load`] through a file-system seam (the crash model uses SimFs).
    pub fn load_with(fs: &dyn Fs, path: &Path) -> Result<Checkpoints, CheckpointError> {
        let bytes = match read_all(fs, path) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(Checkpoints::default()),
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::decode(&bytes).map_err(|why| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            why,
        })
    }

    /// [`Checkpoints::load_with`], but a file that cannot be read or fails its checks
    /// is renamed aside (`checkpoints.json.corrupt`, `.corrupt.1`, ... so an earlier
    /// copy is never overwritten) and an empty checkpoint returned with the error and
    /// where the file went: a damaged checkpoint must not stop the agent (a service
    /// manager would restart it into the same error forever). The caller logs it once
    /// and shows it in status. If even the rename fails, the agent still starts; the
    /// next checkpoint write replaces the file.
    pub fn load_or_quarantine(
        fs: &dyn Fs,
        path: &Path,
    ) -> (Checkpoints, Option<(CheckpointError, Option<PathBuf>)>) {
        match Self::load_with(fs, path) {
            Ok(c) => (c, None),
            Err(e) => {
                let moved = crate::fs::sealed::set_aside(fs, path);
                (Checkpoints::default(), Some((e, moved)))
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoints, String> {
        let body = crate::fs::sealed::unseal(MAGIC, bytes)?;
        serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain maps of strings and integers cannot fail.
        crate::fs::sealed::seal(MAGIC, &serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        self.store_with(&RealFs, path)
    }

    pub fn store_with(&self, fs: &dyn Fs, path: &Path) -> std::io::Result<()> {
        write_atomic(fs, path, &self.encode())
    }

    /// Bring positions up to date with the spool: apply the cursors of every batch
    /// still in the spool past `spool_seq` (the file may lag the spool; see the module
    /// doc). Returns how many batches were replayed.
    pub fn replay(&mut self, spool: &crate::spool::Spool) -> Result<u64, crate::spool::SpoolError> {
        let mut replayed = 0;
        for rec in spool.records_from(self.spool_seq + 1) {
            let rec = rec?;
            if let Ok(meta) = serde_json::from_slice::<crate::batch::BatchMeta>(&rec.meta)
                && let Some(cursor) = &meta.cursor
            {
                self.apply(&meta.source, cursor);
            }
            self.spool_seq = rec.seq;
            replayed += 1;
        }
        Ok(replayed)
    }

    /// Apply the cursor a source attached to a batch: a list of file positions (file
    /// sources), or any other value, kept whole (e.g. the journal cursor string).
    pub fn apply(&mut self, source: &str, cursor: &serde_json::Value) {
        if !cursor.is_array() {
            self.cursors.insert(source.to_string(), cursor.clone());
            return;
        }
        let Ok(positions) = serde_json::from_value::<Vec<FilePos>>(cursor.clone()) else {
            tracing::warn!(source, "ignoring an unreadable cursor in a spooled batch");
            return;
        };
        let files = self.sources.entry(source.to_string()).or_default();
        for p in positions {
            if p.gone {
                files.remove(&p.key());
            } else {
                files.insert(p.key(), p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(ino: u64, offset: u64, gone: bool) -> FilePos {
        FilePos {
            dev: 1,
            ino,
            fp_len: 3,
            fp: 9,
            path: "/x".into(),
            offset,
            gone,
        }
    }

    #[test]
    fn roundtrip_and_corruption_detected() {
        let mut c = Checkpoints {
            spool_seq: 7,
            ..Default::default()
        };
        c.apply(
            "s",
            &serde_json::to_value(vec![pos(1, 10, false), pos(2, 5, false)]).unwrap(),
        );
        c.apply("s", &serde_json::to_value(vec![pos(2, 0, true)]).unwrap());
        let bytes = c.encode();
        assert_eq!(Checkpoints::decode(&bytes).unwrap(), c);
        assert_eq!(c.sources["s"].len(), 1);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            if let Ok(d) = Checkpoints::decode(&b) {
                assert_eq!(d, c, "flip at {i} went unnoticed");
            }
        }
    }
}
