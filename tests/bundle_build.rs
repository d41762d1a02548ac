//! Evidence bundles built from real files: members byte-identical to the sources,
//! hashes confirmed by coreutils `sha256sum`, rotated siblings in and out of the window,
//! the size cap, the journal member, drills, and the bundle verifier on good output.

mod bundle_common;
mod journald_common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use bundle_common::*;
use flate2::Compression;
use flate2::write::GzEncoder;
use soclink::agent::incident::bundle::{
    BundleInputs, FileSourceInput, JournalSourceInput, MemberKind, build_bundle, sanitize_path,
};
use soclink::incident::{needs_bundle, verify_bundle};

fn gz(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Two file sources with rotations; returns (inputs, [(path, bytes) expected in]).
fn two_sources(root: &Path) -> (BundleInputs, Vec<(std::path::PathBuf, Vec<u8>)>) {
    let now = SystemTime::now();
    let a = root.join("a");
    let b = root.join("b");
    let app = (
        a.join("app.log"),
        b"GET /index.html 200\nPOST /login 401\n".to_vec(),
    );
    let app1 = (a.join("app.log.1"), b"yesterday's lines\n".to_vec());
    let app2 = (a.join("app.log.2.gz"), gz(b"two days ago\n"));
    let old = a.join("app.log.3.gz");
    let web = (b.join("web.log"), vec![0xff, 0xfe, b'\n', 0, 1, 2]);
    let web_rot = (b.join("web.log-20261125"), b"rotated by date\n".to_vec());
    write_file(&app.0, &app.1, now);
    write_file(&app1.0, &app1.1, now - 20 * HOUR);
    write_file(&app2.0, &app2.1, now - 44 * HOUR);
    // Ten days old: outside a 72 h window.
    write_file(&old, &gz(b"ancient\n"), now - 240 * HOUR);
    write_file(&web.0, &web.1, now - HOUR);
    write_file(&web_rot.0, &web_rot.1, now - 30 * HOUR);
    // Excluded by the source's pattern.
    write_file(&b.join("debug.log"), b"noise\n", now);
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.file_sources = vec![
        FileSourceInput {
            name: "app".into(),
            include: vec![format!("{}/app.log", a.display())],
            exclude: vec![],
            follow_symlinks: Default::default(),
        },
        FileSourceInput {
            name: "web".into(),
            include: vec![format!("{}/*.log", b.display())],
            exclude: vec![glob::Pattern::new("debug.log").unwrap()],
            follow_symlinks: Default::default(),
        },
    ];
    (inputs, vec![app, app1, app2, web, web_rot])
}

fn member_name(source: &str, p: &Path) -> String {
    format!("files/{source}/{}", sanitize_path(p))
}

#[test]
fn level_3_bundle_holds_original_bytes_and_sha256sum_agrees() {
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 3, false);
    assert!(needs_bundle(inc.level, &[3, 4]));
    let (inputs, expected) = two_sources(&dir.path().join("logs"));
    let out = dir.path().join("bundle.tar.gz");
    let summary = build_bundle(&out, &inc, &inputs, 72 * HOUR, 1 << 30).unwrap();
    assert_eq!(summary.members, 5);
    assert_eq!(summary.errors, 0);
    assert_eq!(summary.size, fs::metadata(&out).unwrap().len());

    let m = manifest(&out);
    assert_eq!(m.incident, inc);
    assert!(!m.drill);
    assert_eq!(m.agent.id, "agent-7");
    assert_eq!(m.members.len(), 5);
    // Newest first.
    let sources = ["app", "app", "app", "web", "web"];
    for ((path, bytes), source) in expected.iter().zip(sources) {
        let name = member_name(source, path);
        let entry = m
            .members
            .iter()
            .find(|e| e.path == name)
            .unwrap_or_else(|| panic!("{name} missing from {:#?}", m.members));
        assert_eq!(entry.size, bytes.len() as u64);
        assert_eq!(entry.kind, MemberKind::File);
        assert_eq!(entry.original_path.as_deref(), Some(path.to_str().unwrap()));
        assert!(entry.mtime.is_some());
    }
    // The ten-day-old rotation and the excluded file are not in; the old one is named.
    assert!(!m.members.iter().any(|e| e.path.ends_with("app.log.3.gz")));
    assert!(!m.members.iter().any(|e| e.path.ends_with("debug.log")));
    let left = m
        .left_out
        .iter()
        .find(|l| l.path.ends_with("app.log.3.gz"))
        .unwrap();
    assert!(left.reason.contains("before the window"), "{}", left.reason);

    // Extract with GNU tar, compare bytes, let coreutils check the hashes.
    let x = dir.path().join("x");
    fs::create_dir(&x).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&out)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    for ((path, bytes), source) in expected.iter().zip(sources) {
        assert_eq!(&fs::read(x.join(member_name(source, path))).unwrap(), bytes);
    }
    let list: String = m
        .members
        .iter()
        .map(|e| format!("{}  {}\n", e.sha256, e.path))
        .collect();
    fs::write(x.join("SHA256SUMS"), list).unwrap();
    let out_sum = Command::new("sha256sum")
        .args(["--strict", "-c", "SHA256SUMS"])
        .current_dir(&x)
        .output()
        .unwrap();
    assert!(
        out_sum.status.success(),
        "{}",
        String::from_utf8_lossy(&out_sum.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out_sum.stdout)
            .matches(": OK")
            .count(),
        5
    );
    // The manifest hash returned is that of the member as stored.
    let mani = fs::read(x.join("manifest.json")).unwrap();
    let sum = Command::new("sha256sum")
        .arg(x.join("manifest.json"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&sum.stdout).starts_with(&summary.manifest_sha256),
        "{} vs {}",
        String::from_utf8_lossy(&sum.stdout),
        summary.manifest_sha256
    );
    assert!(!mani.is_empty());

    let report = verify_bundle(&out).unwrap();
    assert_eq!(report.members, 5);
    assert_eq!(report.manifest_sha256, summary.manifest_sha256);
    assert_eq!(report.incident_id, inc.id);
    // No partial file is left behind.
    assert_eq!(
        fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial"))
            .count(),
        0
    );
}

#[test]
fn level_1_and_2_need_no_bundle() {
    assert!(!needs_bundle(1, &[3, 4]));
    assert!(!needs_bundle(2, &[3, 4]));
    assert!(needs_bundle(4, &[3, 4]));
    assert!(needs_bundle(2, &[2, 3, 4]));
}

#[test]
fn size_cap_leaves_members_out_and_says_so() {
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 4, false);
    let logs = dir.path().join("logs");
    let now = SystemTime::now();
    // Three files of 1.5 MiB (incompressible enough not to matter: the cap counts tar
    // bytes): under a 4 MiB cap only the newest two fit.
    let big = |seed: u8| -> Vec<u8> {
        (0..1_572_864u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect()
    };
    write_file(&logs.join("a.log"), &big(1), now);
    write_file(&logs.join("b.log"), &big(2), now - HOUR);
    write_file(&logs.join("c.log"), &big(3), now - 2 * HOUR);
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.file_sources = vec![FileSourceInput {
        name: "big".into(),
        include: vec![format!("{}/*.log", logs.display())],
        exclude: vec![],
        follow_symlinks: Default::default(),
    }];
    let cap = 4 << 20;
    let out = dir.path().join("capped.tar.gz");
    let summary = build_bundle(&out, &inc, &inputs, 72 * HOUR, cap).unwrap();
    assert_eq!(summary.members, 2);
    assert_eq!(summary.left_out, 1);
    assert!(summary.size <= cap);
    let m = manifest(&out);
    let names: Vec<&str> = m.members.iter().map(|e| e.path.as_str()).collect();
    assert!(
        names[0].ends_with("a.log") && names[1].ends_with("b.log"),
        "{names:?}"
    );
    assert_eq!(m.left_out.len(), 1);
    let l = &m.left_out[0];
    assert!(l.path.ends_with("c.log"), "{}", l.path);
    assert_eq!(l.size, Some(1_572_864));
    assert_eq!(l.reason, format!("bundle size cap {cap} reached"));
    verify_bundle(&out).unwrap();
    // A cap too small for even the manifest is refused up front.
    assert!(build_bundle(&dir.path().join("x.tar.gz"), &inc, &inputs, HOUR, 1000).is_err());
}

#[test]
fn drill_is_marked_in_record_and_manifest() {
    let dir = tempdir();
    let (store, inc) = declare(&dir.path().join("state"), 3, true);
    assert!(inc.drill);
    let raw = fs::read_to_string(
        dir.path()
            .join("state/incidents")
            .join(&inc.id)
            .join("record.json"),
    )
    .unwrap();
    assert!(raw.contains("\"drill\": true"), "{raw}");
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    let out = store.bundle_path(&inc.id).unwrap();
    let summary = build_bundle(&out, &inc, &inputs, HOUR, 1 << 30).unwrap();
    let members = read_members(&out);
    let manifest_text = String::from_utf8(members.last().unwrap().2.clone()).unwrap();
    assert!(manifest_text.contains("\"drill\": true"), "{manifest_text}");
    assert!(manifest(&out).drill);
    assert!(manifest(&out).incident.drill);
    let after = store.record_bundle(&inc.id, &summary).unwrap();
    assert_eq!(
        after.bundle.as_ref().unwrap().manifest_sha256,
        summary.manifest_sha256
    );
    assert!(verify_bundle(&out).unwrap().drill);
}

#[test]
fn host_facts_are_small_text_members_and_never_fatal() {
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 3, false);
    let inputs = BundleInputs::new("agent-7", "web-01");
    let out = dir.path().join("facts.tar.gz");
    build_bundle(&out, &inc, &inputs, HOUR, 1 << 30).unwrap();
    let m = manifest(&out);
    let host: Vec<&str> = m
        .members
        .iter()
        .filter(|e| e.kind == MemberKind::Host)
        .map(|e| e.path.as_str())
        .collect();
    for want in [
        "host/hostname.txt",
        "host/kernel.txt",
        "host/boot-time.txt",
        "host/processes.txt",
    ] {
        assert!(host.contains(&want), "{want} not in {host:?}");
    }
    let members = read_members(&out);
    let kernel = members
        .iter()
        .find(|(n, _, _)| n == b"host/kernel.txt")
        .unwrap();
    let text = String::from_utf8_lossy(&kernel.2);
    assert!(text.starts_with("ostype=Linux\n"), "{text}");
    // Whatever could not be had (ss, timedatectl...) is in errors or its own text.
    verify_bundle(&out).unwrap();
}

#[test]
fn journal_member_in_export_format() {
    if Command::new("journalctl")
        .arg("--version")
        .output()
        .is_err()
    {
        let why = "journalctl is not installed (Debian package systemd)";
        // CI installs it (.ci/run): there a missing tool is a failure, not a skip.
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED journal_member_in_export_format: {why}");
        return;
    }
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 3, false);
    let jdir = dir.path().join("journal");
    fs::create_dir(&jdir).unwrap();
    let now_us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let old_us = now_us - 100 * 3600 * 1_000_000; // before a 72 h window
    let t1 = now_us - 3600 * 1_000_000;
    let t2 = now_us - 60 * 1_000_000;
    let entries = vec![
        journald_common::Entry::new(old_us, 1, b"too old to matter"),
        journald_common::Entry::new(t1, 2, b"sshd: Failed password for root"),
        journald_common::Entry::new(t2, 3, b"sshd: Accepted password for root"),
    ];
    journald_common::place_journal(&jdir, "remote.journal", &entries);
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.journal_sources = vec![JournalSourceInput {
        name: "system".into(),
        directory: Some(jdir.clone()),
    }];
    let out = dir.path().join("j.tar.gz");
    let summary = build_bundle(&out, &inc, &inputs, 72 * HOUR, 1 << 30).unwrap();
    assert_eq!(summary.errors, 0, "{:#?}", manifest(&out).errors);
    let m = manifest(&out);
    let j = m
        .members
        .iter()
        .find(|e| e.path == "journal/system.export")
        .unwrap();
    assert_eq!(j.kind, MemberKind::Journal);
    let fmt = |us: u64| {
        humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_micros(us))
            .to_string()
    };
    assert_eq!(j.first.as_deref(), Some(fmt(t1).as_str()));
    assert_eq!(j.last.as_deref(), Some(fmt(t2).as_str()));
    let members = read_members(&out);
    let data = &members
        .iter()
        .find(|(n, _, _)| n == b"journal/system.export")
        .unwrap()
        .2;
    let text = String::from_utf8_lossy(data);
    assert!(
        text.contains("MESSAGE=sshd: Failed password for root\n"),
        "{text}"
    );
    assert!(text.contains("MESSAGE=sshd: Accepted password for root\n"));
    assert!(!text.contains("too old to matter"));
    assert!(text.contains(&format!("__REALTIME_TIMESTAMP={t1}\n")));
    assert_eq!(j.size, data.len() as u64);
    verify_bundle(&out).unwrap();
}

#[test]
fn missing_journalctl_is_an_error_in_the_manifest_not_a_failure() {
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 3, false);
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.journalctl = dir.path().join("no-such-journalctl");
    inputs.journal_sources = vec![JournalSourceInput {
        name: "system".into(),
        directory: None,
    }];
    let out = dir.path().join("nj.tar.gz");
    let summary = build_bundle(&out, &inc, &inputs, HOUR, 1 << 30).unwrap();
    assert_eq!(summary.members, 0);
    assert_eq!(summary.errors, 1);
    let m = manifest(&out);
    assert!(
        m.errors[0].what.starts_with("journal system"),
        "{:?}",
        m.errors
    );
    assert!(m.errors[0].error.contains("cannot run"), "{:?}", m.errors);
    verify_bundle(&out).unwrap();
}

#[test]
fn hostile_file_names_become_safe_member_names() {
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 3, false);
    let logs = dir.path().join("logs");
    let weird = logs.join("evil\u{1b}[31m\nname.log");
    write_file(&weird, b"x\n", SystemTime::now());
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.file_sources = vec![FileSourceInput {
        name: "w".into(),
        include: vec![format!("{}/*.log", logs.display())],
        exclude: vec![],
        follow_symlinks: Default::default(),
    }];
    let out = dir.path().join("w.tar.gz");
    build_bundle(&out, &inc, &inputs, HOUR, 1 << 30).unwrap();
    let m = manifest(&out);
    assert_eq!(m.members.len(), 1);
    let name = &m.members[0].path;
    assert!(name.ends_with("/evil_[31m_name.log"), "{name}");
    assert!(!name.starts_with('/'));
    verify_bundle(&out).unwrap();
}

#[test]
fn a_file_growing_during_the_build_is_cut_at_its_size_when_opened() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 3, false);
    let logs = dir.path().join("logs");
    let path = logs.join("busy.log");
    let line = b"2026-11-26T01:00:00Z sshd[1]: Failed password for root from 198.51.100.7\n";
    let initial: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 200_000)
        .collect();
    write_file(&path, &initial, SystemTime::now());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all(line).unwrap();
                n += 1;
            }
            n
        })
    };
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.file_sources = vec![FileSourceInput {
        name: "busy".into(),
        include: vec![format!("{}", path.display())],
        exclude: vec![],
        follow_symlinks: Default::default(),
    }];
    let out = dir.path().join("busy.tar.gz");
    build_bundle(&out, &inc, &inputs, HOUR, 1 << 30).unwrap();
    stop.store(true, Ordering::Relaxed);
    let appended = writer.join().unwrap();
    // The archive is well formed and matches its manifest whatever the writer did.
    verify_bundle(&out).unwrap();
    let m = manifest(&out);
    let member = &m.members[0];
    let data = &read_members(&out)[0].2;
    assert_eq!(data.len() as u64, member.size);
    assert!(member.size >= initial.len() as u64);
    let now = fs::read(&path).unwrap();
    assert_eq!(
        &now[..data.len()],
        &data[..],
        "member is a prefix of the file"
    );
    assert!(now.len() as u64 >= member.size);
    eprintln!(
        "{} bytes at open, {} in the member, {} lines appended meanwhile",
        initial.len(),
        member.size,
        appended
    );
}

#[test]
fn thousands_of_left_out_files_are_counted_not_listed_without_end() {
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 3, false);
    let logs = dir.path().join("logs");
    let old = SystemTime::now() - 200 * HOUR;
    for i in 0..10_050 {
        write_file(&logs.join(format!("f{i:05}.log")), b"x\n", old);
    }
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.file_sources = vec![FileSourceInput {
        name: "many".into(),
        include: vec![format!("{}/*.log", logs.display())],
        exclude: vec![],
        follow_symlinks: Default::default(),
    }];
    let out = dir.path().join("many.tar.gz");
    let summary = build_bundle(&out, &inc, &inputs, 72 * HOUR, 1 << 30).unwrap();
    assert_eq!(summary.members, 0);
    assert_eq!(summary.left_out, 10_050);
    let m = manifest(&out);
    assert_eq!(m.left_out.len(), 10_001);
    assert_eq!(
        m.left_out.last().unwrap().reason,
        "50 more left out (list cut at 10000)"
    );
    verify_bundle(&out).unwrap();
}
