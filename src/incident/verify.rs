//! `soclink bundle verify`: check an evidence bundle against its manifest, standalone
//! (no config, no state), in one streaming pass.
//!
//! Invariant: a bundle passes only if it is a plain archive of regular files with safe,
//! unique, UTF-8 relative names, within the limits, ending with `manifest.json`, and
//! every member matches its manifest entry (size and SHA-256) and vice versa. Hostile
//! input (path tricks, links, devices, gzip bombs, huge member counts) is refused with
//! the offending member named; memory stays bounded (only the manifest is held whole).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::GzDecoder;
use sha2::{Digest, Sha256};

use super::{MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_MEMBERS, MAX_NAME_BYTES, hex};
use crate::agent::incident::bundle::Manifest;

/// Bounds on what a verifier accepts.
#[derive(Debug, Clone, Copy)]
pub struct VerifyLimits {
    /// Decompressed bytes (tar stream) at most: the gzip-bomb bound.
    pub max_decompressed: u64,
    pub max_members: u64,
}

impl Default for VerifyLimits {
    fn default() -> Self {
        VerifyLimits {
            max_decompressed: 64 << 30,
            max_members: MAX_MEMBERS,
        }
    }
}

/// What a good bundle holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Members checked, not counting the manifest.
    pub members: u64,
    /// Their total size.
    pub bytes: u64,
    pub manifest_sha256: String,
    pub incident_id: String,
    /// `agent.id` of the manifest: who built it (the relay compares it with the
    /// identity of the certificate that delivered it).
    pub agent_id: String,
    pub drill: bool,
    pub left_out: u64,
    pub errors: u64,
}

/// Why a bundle failed; [`VerifyError::member`] names the member when there is one.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("not a valid tar.gz: {0}")]
    Corrupt(String),
    #[error("member {member:?}: refused: {reason}")]
    Hostile { member: String, reason: String },
    #[error("member name refused: {0}")]
    BadName(String),
    #[error("decompressed size exceeds {limit} bytes (a gzip bomb?)")]
    TooLarge { limit: u64 },
    #[error("more than {limit} members")]
    TooManyMembers { limit: u64 },
    #[error("{0}: a bundle holds nothing outside its archive")]
    Trailing(&'static str),
    #[error("no manifest.json in the bundle")]
    ManifestMissing,
    #[error("member {member:?} comes after manifest.json (the manifest must be last)")]
    AfterManifest { member: String },
    #[error("manifest.json is invalid: {0}")]
    ManifestInvalid(String),
    #[error("member {member:?}: {reason}")]
    Mismatch { member: String, reason: String },
    #[error("member {member:?} is listed in the manifest but missing from the bundle")]
    Missing { member: String },
    #[error("member {member:?} is in the bundle but not listed in the manifest")]
    Unlisted { member: String },
}

impl VerifyError {
    /// The member the error is about, when there is one.
    pub fn member(&self) -> Option<&str> {
        match self {
            VerifyError::Hostile { member, .. }
            | VerifyError::AfterManifest { member }
            | VerifyError::Mismatch { member, .. }
            | VerifyError::Missing { member }
            | VerifyError::Unlisted { member } => Some(member),
            _ => None,
        }
    }
}

/// Counts decompressed bytes and fails past a limit.
struct Limited<R> {
    inner: R,
    count: u64,
    limit: u64,
    tripped: bool,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            self.tripped = true;
            return Err(io::Error::other("decompressed size limit exceeded"));
        }
        Ok(n)
    }
}

/// A member name as a builder makes it: relative, `/`-separated, no empty, `.` or `..`
/// components, no control characters, bounded.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("name longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.starts_with('/') {
        return Err("absolute path".into());
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return Err("control character or backslash in name".into());
    }
    for part in name.split('/') {
        match part {
            ".." => return Err("'..' in path".into()),
            "." | "" => return Err("empty or '.' path component".into()),
            _ => {}
        }
    }
    Ok(())
}

fn corrupt(e: impl std::fmt::Display) -> VerifyError {
    VerifyError::Corrupt(e.to_string())
}

/// Verify the bundle at `path` with the default limits.
pub fn verify_bundle(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_bundle_with(path, VerifyLimits::default())
}

/// Verify the bundle at `path`.
pub fn verify_bundle_with(path: &Path, limits: VerifyLimits) -> Result<VerifyReport, VerifyError> {
    let file = File::open(path).map_err(|source| VerifyError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    verify_reader(BufReader::with_capacity(256 * 1024, file), limits)
}

/// [`verify_bundle_with`] on the bundle's bytes from any buffered reader.
pub(crate) fn verify_reader<R: BufRead>(
    reader: R,
    limits: VerifyLimits,
) -> Result<VerifyReport, VerifyError> {
    let mut limited = Limited {
        inner: GzDecoder::new(reader),
        count: 0,
        limit: limits.max_decompressed,
        tripped: false,
    };
    let result = scan(&mut limited, limits).and_then(|r| no_trailing(&mut limited).map(|()| r));
    if limited.tripped {
        return Err(VerifyError::TooLarge {
            limit: limits.max_decompressed,
        });
    }
    result
}

/// Nothing may hide after the archive: the rest of the gzip member must be tar padding
/// (zeros), and no second gzip member or other bytes may follow it.
fn no_trailing<R: BufRead>(limited: &mut Limited<GzDecoder<R>>) -> Result<(), VerifyError> {
    let mut rest = [0u8; 8192];
    loop {
        let n = limited.read(&mut rest).map_err(corrupt)?;
        if n == 0 {
            break;
        }
        // n <= rest.len(): read never reports more than the buffer.
        if rest[..n].iter().any(|&b| b != 0) {
            return Err(VerifyError::Trailing(
                "data after the end of the tar archive",
            ));
        }
    }
    let file = limited.inner.get_mut();
    if !file.fill_buf().map_err(corrupt)?.is_empty() {
        return Err(VerifyError::Trailing(
            "bytes after the end of the gzip stream",
        ));
    }
    Ok(())
}

struct Seen {
    size: u64,
    sha256: String,
}

fn scan(reader: &mut impl Read, limits: VerifyLimits) -> Result<VerifyReport, VerifyError> {
    let mut archive = tar::Archive::new(reader);
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut manifest_bytes: Option<Vec<u8>> = None;
    let mut count = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        count += 1;
        if count > limits.max_members {
            return Err(VerifyError::TooManyMembers {
                limit: limits.max_members,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let name = match String::from_utf8(raw) {
            Ok(n) => n,
            Err(e) => {
                return Err(VerifyError::BadName(format!(
                    "{:?} is not valid UTF-8",
                    String::from_utf8_lossy(e.as_bytes())
                )));
            }
        };
        if let Some(m) = &manifest_bytes {
            let _ = m;
            return Err(VerifyError::AfterManifest { member: name });
        }
        let kind = entry.header().entry_type();
        if !matches!(kind, tar::EntryType::Regular) {
            let what = match kind {
                tar::EntryType::Symlink => "a symbolic link".to_string(),
                tar::EntryType::Link => "a hard link".to_string(),
                tar::EntryType::Char | tar::EntryType::Block => "a device".to_string(),
                tar::EntryType::Fifo => "a FIFO".to_string(),
                tar::EntryType::Directory => "a directory".to_string(),
                other => format!("of type {:?}", other.as_byte() as char),
            };
            return Err(VerifyError::Hostile {
                member: name,
                reason: format!("is {what}; a bundle holds regular files only"),
            });
        }
        if let Err(reason) = check_name(&name) {
            return Err(VerifyError::Hostile {
                member: name,
                reason,
            });
        }
        if seen.contains_key(&name) || (name == MANIFEST_NAME && manifest_bytes.is_some()) {
            return Err(VerifyError::Hostile {
                member: name,
                reason: "duplicate name".into(),
            });
        }
        let declared = entry.header().size().map_err(corrupt)?;
        if name == MANIFEST_NAME {
            if declared > MAX_MANIFEST_BYTES {
                return Err(VerifyError::Hostile {
                    member: name,
                    reason: format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
                });
            }
            let mut m = Vec::new();
            (&mut entry)
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut m)
                .map_err(corrupt)?;
            if m.len() as u64 != declared {
                return Err(corrupt(format!("{name}: truncated")));
            }
            manifest_bytes = Some(m);
            continue;
        }
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(format!("{name}: {e}"))),
            };
            // n <= buf.len(): read never reports more than the buffer.
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        if size != declared {
            return Err(corrupt(format!(
                "{name}: truncated ({size} of {declared} bytes)"
            )));
        }
        order.push(name.clone());
        seen.insert(
            name,
            Seen {
                size,
                sha256: hex(&hasher.finalize()),
            },
        );
    }
    let Some(manifest_bytes) = manifest_bytes else {
        return Err(VerifyError::ManifestMissing);
    };
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| VerifyError::ManifestInvalid(e.to_string()))?;
    if manifest.format != crate::agent::incident::bundle::FORMAT {
        return Err(VerifyError::ManifestInvalid(format!(
            "unknown format {:?}",
            manifest.format
        )));
    }
    let mut listed = HashSet::new();
    let mut bytes = 0u64;
    for m in &manifest.members {
        if !listed.insert(m.path.as_str()) {
            return Err(VerifyError::ManifestInvalid(format!(
                "{:?} is listed twice",
                m.path
            )));
        }
        let Some(s) = seen.get(&m.path) else {
            return Err(VerifyError::Missing {
                member: m.path.clone(),
            });
        };
        if s.size != m.size {
            return Err(VerifyError::Mismatch {
                member: m.path.clone(),
                reason: format!("size {} but the manifest says {}", s.size, m.size),
            });
        }
        if !s.sha256.eq_ignore_ascii_case(&m.sha256) {
            return Err(VerifyError::Mismatch {
                member: m.path.clone(),
                reason: format!("SHA-256 {} but the manifest says {}", s.sha256, m.sha256),
            });
        }
        bytes += s.size;
    }
    if let Some(extra) = order.iter().find(|n| !listed.contains(n.as_str())) {
        return Err(VerifyError::Unlisted {
            member: extra.clone(),
        });
    }
    Ok(VerifyReport {
        members: manifest.members.len() as u64,
        bytes,
        manifest_sha256: hex(&Sha256::digest(&manifest_bytes)),
        incident_id: manifest.incident.id.clone(),
        agent_id: manifest.agent.id.clone(),
        drill: manifest.drill,
        left_out: manifest.left_out.len() as u64,
        errors: manifest.errors.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("files/a/var/log/x").is_ok());
        assert!(check_name("/etc/passwd").is_err());
        assert!(check_name("a/../../b").is_err());
        assert!(check_name("a//b").is_err());
        assert!(check_name("a/\u{7}").is_err());
    }
}
