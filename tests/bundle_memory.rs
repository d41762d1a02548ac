//! The bundle streams: building one from a 300 MB file (and verifying it) leaves the
//! process's peak resident memory (VmHWM) nearly where it was. Its own test binary, so
//! no other test's allocations blur the figure.

mod bundle_common;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::{Instant, SystemTime};

use bundle_common::*;
use soclink::agent::incident::bundle::{BundleInputs, FileSourceInput, build_bundle};
use soclink::incident::verify_bundle;

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// A file of `size` bytes: mostly holes (reads as zeros, costs no disk) with a log line
/// written every 4 MiB, so the content is not trivially one value.
fn sparse_log(path: &std::path::Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut w = BufWriter::new(f);
    use std::io::{Seek, SeekFrom};
    let mut off = 0;
    while off + 4096 < size {
        w.seek(SeekFrom::Start(off)).unwrap();
        writeln!(
            w,
            "{off:016x} sshd[42]: Failed password for root from 203.0.113.9"
        )
        .unwrap();
        off += 4 << 20;
    }
    w.into_inner()
        .unwrap()
        .set_modified(SystemTime::now())
        .unwrap();
}

fn build_and_measure(size: u64) {
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 4, false);
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    sparse_log(&logs.join("huge.log"), size);
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.file_sources = vec![FileSourceInput {
        name: "huge".into(),
        include: vec![format!("{}/huge.log", logs.display())],
        exclude: vec![],
        follow_symlinks: Default::default(),
    }];
    let out = dir.path().join("huge.tar.gz");
    let before = vm_hwm_kib();
    let t = Instant::now();
    let summary = build_bundle(&out, &inc, &inputs, 72 * HOUR, 4 << 30).unwrap();
    let built = t.elapsed();
    let after_build = vm_hwm_kib();
    let t = Instant::now();
    let report = verify_bundle(&out).unwrap();
    let verified = t.elapsed();
    let after_verify = vm_hwm_kib();
    assert_eq!(summary.members, 1);
    assert_eq!(report.bytes, size);
    eprintln!(
        "bundle of {size} bytes -> {} bytes gz: build {built:?}, verify {verified:?}; VmHWM {before} KiB -> {after_build} KiB (build) -> {after_verify} KiB (verify): growth {} KiB",
        summary.size,
        after_verify - before
    );
    assert!(
        after_verify - before < 32 * 1024,
        "peak RSS grew by {} KiB building and verifying a {size}-byte bundle",
        after_verify - before
    );
}

#[test]
fn building_a_300_mb_bundle_keeps_memory_flat() {
    build_and_measure(300_000_000);
}

/// The 2 GiB run, by hand: `cargo test --release --test bundle_memory -- --ignored`.
#[test]
#[ignore]
fn building_a_2_gib_bundle_keeps_memory_flat() {
    build_and_measure(2 << 30);
}
