//! Shared helpers for the incident and bundle tests: an incident store in a temp dir,
//! log files with chosen mtimes, reading a bundle back, and rewriting a bundle member by
//! member (raw tar headers, so hostile names can be written too).
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use soclink::agent::incident::bundle::Manifest;
use soclink::incident::{DeclareRequest, Incident, IncidentStore};

pub const HOUR: Duration = Duration::from_secs(3600);

/// Write `bytes` to `path` and set its mtime.
pub fn write_file(path: &Path, bytes: &[u8], mtime: SystemTime) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.set_modified(mtime).unwrap();
}

/// Declare an incident of `level` in a store under `state`.
pub fn declare(state: &Path, level: u8, drill: bool) -> (IncidentStore, Incident) {
    let store = IncidentStore::open(state).unwrap();
    let mut req = DeclareRequest::new(level, "web server defaced");
    req.drill = drill;
    req.details = "index.html replaced at 09:12 local".into();
    let inc = store.declare(req, "agent-7", "web-01").unwrap();
    (store, inc)
}

/// A bundle's members in order: (name, entry type byte, data).
pub fn read_members(path: &Path) -> Vec<(Vec<u8>, u8, Vec<u8>)> {
    let mut archive = tar::Archive::new(GzDecoder::new(File::open(path).unwrap()));
    let mut out = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path_bytes().into_owned();
        let kind = e.header().entry_type().as_byte();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((name, kind, data));
    }
    out
}

pub fn manifest(path: &Path) -> Manifest {
    let members = read_members(path);
    let (name, _, data) = members.last().unwrap();
    assert_eq!(
        name, b"manifest.json",
        "manifest.json must be the last member"
    );
    serde_json::from_slice(data).unwrap()
}

/// Write members as a tar.gz, names written raw into the header (no checks), so tests
/// can make archives a careful builder refuses to make.
pub fn write_members(path: &Path, members: &[(Vec<u8>, u8, Vec<u8>)]) {
    let gz = GzEncoder::new(File::create(path).unwrap(), Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, kind, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::new(*kind));
        if name.len() < 100 {
            let raw = &mut h.as_old_mut().name;
            raw.fill(0);
            raw[..name.len()].copy_from_slice(name);
            if *kind == b'2' {
                h.set_link_name("/etc/passwd").unwrap();
            }
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
        } else {
            b.append_data(&mut h, std::str::from_utf8(name).unwrap(), &data[..])
                .unwrap();
        }
    }
    b.into_inner().unwrap().finish().unwrap();
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path_buf(p: &Path, rel: &str) -> PathBuf {
    p.join(rel)
}
