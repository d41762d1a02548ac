//! `bundle verify` against tampered and hostile archives: each is refused, naming the
//! member at fault, and the CLI entry exits non-zero.

mod bundle_common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use bundle_common::*;
use soclink::agent::incident::bundle::{BundleInputs, FileSourceInput, build_bundle};
use soclink::cli::incident::{BundleArgs, BundleCmd, run_bundle};
use soclink::incident::verify::verify_bundle_with;
use soclink::incident::{VerifyError, VerifyLimits, verify_bundle};

type Members = Vec<(Vec<u8>, u8, Vec<u8>)>;

/// A good bundle with two file members; returns its path and members.
fn good(dir: &Path) -> (PathBuf, Members) {
    let (_store, inc) = declare(&dir.join("state"), 3, false);
    let logs = dir.join("logs");
    write_file(
        &logs.join("auth.log"),
        b"Failed password for root\n",
        SystemTime::now(),
    );
    write_file(
        &logs.join("auth.log.1"),
        b"older line\n",
        SystemTime::now() - HOUR,
    );
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.file_sources = vec![FileSourceInput {
        name: "auth".into(),
        include: vec![format!("{}/auth.log", logs.display())],
        exclude: vec![],
        follow_symlinks: Default::default(),
    }];
    let out = dir.join("good.tar.gz");
    build_bundle(&out, &inc, &inputs, HOUR, 1 << 30).unwrap();
    verify_bundle(&out).unwrap();
    let members = read_members(&out);
    assert_eq!(members.len(), 3);
    (out, members)
}

fn name_of(members: &Members, i: usize) -> String {
    String::from_utf8(members[i].0.clone()).unwrap()
}

/// Write `members` as a new bundle and verify it; it must fail.
fn tampered(dir: &Path, members: &Members) -> (PathBuf, VerifyError) {
    let p = dir.join("bad.tar.gz");
    write_members(&p, members);
    let err = verify_bundle(&p).expect_err("tampered bundle must not verify");
    (p, err)
}

fn insert_before_manifest(members: &mut Members, m: (Vec<u8>, u8, Vec<u8>)) {
    let at = members.len() - 1;
    members.insert(at, m);
}

#[test]
fn rewritten_good_bundle_still_verifies() {
    // The rewriting helper itself must not be what fails the other tests.
    let dir = tempdir();
    let (_, members) = good(dir.path());
    let p = dir.path().join("same.tar.gz");
    write_members(&p, &members);
    verify_bundle(&p).unwrap();
}

#[test]
fn flipped_byte_names_the_member() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    members[0].2[3] ^= 0x01;
    let victim = name_of(&members, 0);
    let (p, err) = tampered(dir.path(), &members);
    assert!(matches!(err, VerifyError::Mismatch { .. }), "{err}");
    assert_eq!(err.member(), Some(victim.as_str()));
    assert!(err.to_string().contains("SHA-256"), "{err}");
    let code = run_bundle(&BundleArgs {
        cmd: BundleCmd::Verify { file: p },
    })
    .unwrap();
    assert_eq!(code, ExitCode::from(1));
}

#[test]
fn truncated_member_with_fixed_header_is_a_size_mismatch() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    members[1].2.pop();
    let victim = name_of(&members, 1);
    let (_, err) = tampered(dir.path(), &members);
    assert_eq!(err.member(), Some(victim.as_str()), "{err}");
    assert!(err.to_string().contains("size"), "{err}");
}

#[test]
fn added_member_is_unlisted() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    insert_before_manifest(
        &mut members,
        (
            b"files/auth/extra.log".to_vec(),
            b'0',
            b"planted\n".to_vec(),
        ),
    );
    let (_, err) = tampered(dir.path(), &members);
    assert!(matches!(err, VerifyError::Unlisted { .. }), "{err}");
    assert_eq!(err.member(), Some("files/auth/extra.log"));
}

#[test]
fn removed_member_is_missing() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    let victim = name_of(&members, 0);
    members.remove(0);
    let (_, err) = tampered(dir.path(), &members);
    assert!(matches!(err, VerifyError::Missing { .. }), "{err}");
    assert_eq!(err.member(), Some(victim.as_str()));
}

#[test]
fn dot_dot_member_is_refused() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    insert_before_manifest(
        &mut members,
        (
            b"files/../../etc/cron.d/x".to_vec(),
            b'0',
            b"* * * * * root sh\n".to_vec(),
        ),
    );
    let (_, err) = tampered(dir.path(), &members);
    assert!(matches!(err, VerifyError::Hostile { .. }), "{err}");
    assert_eq!(err.member(), Some("files/../../etc/cron.d/x"));
    assert!(err.to_string().contains("'..'"), "{err}");
}

#[test]
fn absolute_member_is_refused() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    insert_before_manifest(
        &mut members,
        (
            b"/etc/passwd".to_vec(),
            b'0',
            b"root::0:0::/:/bin/sh\n".to_vec(),
        ),
    );
    let (_, err) = tampered(dir.path(), &members);
    assert_eq!(err.member(), Some("/etc/passwd"), "{err}");
    assert!(err.to_string().contains("absolute"), "{err}");
}

#[test]
fn symlink_member_is_refused() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    insert_before_manifest(
        &mut members,
        (b"files/auth/link".to_vec(), b'2', Vec::new()),
    );
    let (_, err) = tampered(dir.path(), &members);
    assert_eq!(err.member(), Some("files/auth/link"), "{err}");
    assert!(err.to_string().contains("symbolic link"), "{err}");
}

#[test]
fn hardlink_device_and_fifo_members_are_refused() {
    for (kind, word) in [(b'1', "hard link"), (b'3', "device"), (b'6', "FIFO")] {
        let dir = tempdir();
        let (_, mut members) = good(dir.path());
        insert_before_manifest(&mut members, (b"files/auth/odd".to_vec(), kind, Vec::new()));
        let (_, err) = tampered(dir.path(), &members);
        assert_eq!(err.member(), Some("files/auth/odd"), "{err}");
        assert!(err.to_string().contains(word), "{err}");
    }
}

#[test]
fn duplicate_name_is_refused() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    let dup = members[0].clone();
    let name = name_of(&members, 0);
    insert_before_manifest(&mut members, dup);
    let (_, err) = tampered(dir.path(), &members);
    assert_eq!(err.member(), Some(name.as_str()), "{err}");
    assert!(err.to_string().contains("duplicate"), "{err}");
}

#[test]
fn member_after_manifest_is_refused() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    members.push((b"files/auth/late.log".to_vec(), b'0', b"x".to_vec()));
    let (_, err) = tampered(dir.path(), &members);
    assert!(matches!(err, VerifyError::AfterManifest { .. }), "{err}");
    assert_eq!(err.member(), Some("files/auth/late.log"));
}

#[test]
fn missing_manifest_is_refused() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    members.pop();
    let (_, err) = tampered(dir.path(), &members);
    assert!(matches!(err, VerifyError::ManifestMissing), "{err}");
}

#[test]
fn non_utf8_name_is_refused() {
    let dir = tempdir();
    let (_, mut members) = good(dir.path());
    insert_before_manifest(
        &mut members,
        (b"files/auth/\xff\xfe.log".to_vec(), b'0', b"x".to_vec()),
    );
    let (_, err) = tampered(dir.path(), &members);
    assert!(matches!(err, VerifyError::BadName(_)), "{err}");
}

#[test]
fn gzip_bomb_bound_and_member_count_bound() {
    let dir = tempdir();
    let (p, _) = good(dir.path());
    let err = verify_bundle_with(
        &p,
        VerifyLimits {
            max_decompressed: 2048,
            max_members: 100,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::TooLarge { limit: 2048 }),
        "{err}"
    );
    let err = verify_bundle_with(
        &p,
        VerifyLimits {
            max_decompressed: 1 << 30,
            max_members: 2,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::TooManyMembers { limit: 2 }),
        "{err}"
    );
}

#[test]
fn garbage_is_not_a_bundle() {
    let dir = tempdir();
    let p = dir.path().join("junk.tar.gz");
    std::fs::write(&p, b"\x1f\x8bnot really gzip").unwrap();
    assert!(matches!(verify_bundle(&p), Err(VerifyError::Corrupt(_))));
    let code = run_bundle(&BundleArgs {
        cmd: BundleCmd::Verify {
            file: dir.path().join("absent.tar.gz"),
        },
    })
    .unwrap();
    assert_eq!(code, ExitCode::from(1));
}

#[test]
fn trailing_data_after_the_archive_is_refused() {
    use std::io::Write;
    let dir = tempdir();
    let (p, members) = good(dir.path());
    // A second gzip member appended to a good bundle.
    let extra = dir.path().join("extra.tar.gz");
    write_members(&extra, &members[..1]);
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(&std::fs::read(&extra).unwrap()).unwrap();
    drop(f);
    let err = verify_bundle(&p).unwrap_err();
    assert!(matches!(err, VerifyError::Trailing(_)), "{err}");
}

#[test]
fn rotated_sibling_rule_does_not_take_unrelated_files() {
    let dir = tempdir();
    let (_store, inc) = declare(&dir.path().join("state"), 3, false);
    let logs = dir.path().join("logs");
    for name in ["app", "app.1", "app-2", "application.log", "apple"] {
        write_file(&logs.join(name), name.as_bytes(), SystemTime::now());
    }
    let mut inputs = BundleInputs::new("agent-7", "web-01");
    inputs.host_facts = false;
    inputs.file_sources = vec![FileSourceInput {
        name: "s".into(),
        include: vec![format!("{}/app", logs.display())],
        exclude: vec![],
        follow_symlinks: Default::default(),
    }];
    let out = dir.path().join("s.tar.gz");
    build_bundle(&out, &inc, &inputs, HOUR, 1 << 30).unwrap();
    let mut names: Vec<String> = manifest(&out)
        .members
        .iter()
        .map(|m| m.path.rsplit('/').next().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["app", "app-2", "app.1"]);
}
