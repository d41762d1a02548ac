//! The journald source against real journal files written by `systemd-journal-remote`:
//! every entry exactly once and byte for byte, fields, filters, day-bounded batches,
//! resume from a cursor, a vacuumed cursor, files added while running, start at the end.

mod journald_common;

use std::collections::BTreeSet;
use std::time::Duration;

use journald_common::*;
use soclink::agent::sources::journald::MAX_MESSAGE;

const T: Duration = Duration::from_secs(8);

#[test]
fn every_entry_once_with_fields_binary_messages_and_day_bounded_batches() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let mut all = entries("a", NEAR_MIDNIGHT, 5_000_000, 20_000);
    // Binary messages: NUL, invalid UTF-8, newlines, a terminal escape.
    for i in (0..all.len()).step_by(997) {
        let msg = format!("id=bin-{i} \0 nul \u{1b}[31m\nline2 ").into_bytes();
        let mut msg = msg;
        msg.extend_from_slice(b"\xff\xfe bad utf8 \x00");
        all[i].fields[0].1 = msg;
    }
    // A fully populated entry, with a repeated field and a binary non-MESSAGE field.
    all[5].fields = vec![
        (
            "MESSAGE".into(),
            "id=full \"quoted\" 中文".as_bytes().to_vec(),
        ),
        ("_HOSTNAME".into(), b"web-01".to_vec()),
        ("_SYSTEMD_UNIT".into(), b"nginx.service".to_vec()),
        ("PRIORITY".into(), b"3".to_vec()),
        ("_PID".into(), b"4242".to_vec()),
        ("_COMM".into(), b"nginx".to_vec()),
        ("SYSLOG_IDENTIFIER".into(), b"nginx".to_vec()),
        ("TAG".into(), b"one".to_vec()),
        ("TAG".into(), b"two".to_vec()),
        ("BLOB".into(), b"\x00\x01\xff".to_vec()),
    ];
    // Over the bound: kept to MAX_MESSAGE bytes and marked.
    let mut big = b"id=big ".to_vec();
    big.resize(MAX_MESSAGE + 1000, b'x');
    all[7].fields[0].1 = big;
    write_journal(&jdir.join("system.journal"), &all);

    let mut run = start(cfg(&jdir), None, 256 << 10);
    run.collect(all.len(), T);
    run.drain_for(Duration::from_millis(300));
    let evs = run.events();

    let mut expected = messages(&all);
    expected[7].truncate(MAX_MESSAGE);
    assert_messages(&evs, &expected);
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["host"], "agent-host");
        assert_eq!(e["source"], "journal");
        assert_eq!(e["boot_id"], BOOT);
        assert_eq!(e["hostname"], "web-01");
        assert!(e["cursor"].as_str().unwrap().starts_with("s="));
        assert_eq!(e.get("truncated").is_some(), i == 7, "event {i}");
        if i % 997 == 0 {
            assert!(e.get("message").is_none());
            assert!(e.get("message_base64").is_some());
        }
    }
    // ts: the entry's own µs time, RFC 3339 UTC with nanoseconds.
    assert_eq!(evs[0]["ts"], "2025-11-25T23:59:59.000000000Z");
    assert_eq!(evs[1]["ts"], "2025-11-25T23:59:59.000100000Z");
    assert_eq!(evs[19_999]["ts"], "2025-11-26T00:00:00.999900000Z");
    let plain = &evs[1];
    assert_eq!(plain["unit"], "sshd.service");
    assert_eq!(plain["priority"], 6);
    assert_eq!(plain["fields"], serde_json::json!({}));

    let full = &evs[5];
    assert_eq!(full["message"], "id=full \"quoted\" 中文");
    assert_eq!(full["unit"], "nginx.service");
    assert_eq!(full["priority"], 3);
    assert_eq!(full["pid"], 4242);
    assert_eq!(full["comm"], "nginx");
    let f = full["fields"].as_object().unwrap();
    assert_eq!(
        f.keys().cloned().collect::<Vec<_>>(),
        ["BLOB_base64", "SYSLOG_IDENTIFIER", "TAG"]
    );
    assert_eq!(f["BLOB_base64"], "AAH/");
    assert_eq!(f["SYSLOG_IDENTIFIER"], "nginx");
    let tags: BTreeSet<&str> = f["TAG"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(tags, BTreeSet::from(["one", "two"]));

    // The entries cross midnight: batches split there, by the entries' time.
    let days: BTreeSet<&str> = run.batches.iter().map(|b| b.day.as_str()).collect();
    assert_eq!(days, BTreeSet::from(["2025-11-25", "2025-11-26"]));
    assert!(run.batches.len() > 2, "max_bytes splits batches");
    for b in &run.batches {
        // One event may exceed the limit on its own; otherwise batches stay under it.
        assert!(b.raw.len() <= (256 << 10) || b.events == 1);
    }
    let stats = &run.stats;
    assert_eq!(
        stats.entries.load(std::sync::atomic::Ordering::Relaxed),
        20_000
    );
    assert_eq!(stats.gaps.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(stats.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn units_and_max_priority_filter() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let units: [&[u8]; 3] = [b"sshd.service", b"cron.service", b"nginx.service"];
    let all: Vec<Entry> = (0..600)
        .map(|i| {
            Entry::new(
                NEAR_MIDNIGHT + i * 10,
                1000 + i,
                format!("id=f-{i}").as_bytes(),
            )
            .with("_SYSTEMD_UNIT", units[(i % 3) as usize])
            .with("PRIORITY", (i % 8).to_string().as_bytes())
        })
        .collect();
    write_journal(&jdir.join("system.journal"), &all);

    let mut c = cfg(&jdir);
    c.units = vec!["sshd.service".into(), "nginx.service".into()];
    c.max_priority = Some(3);
    let want: Vec<Entry> = (0..600)
        .filter(|i| i % 3 != 1 && i % 8 <= 3)
        .map(|i| all[i as usize].clone())
        .collect();
    let mut run = start(c, None, 64 << 10);
    run.collect(want.len(), T);
    run.drain_for(Duration::from_millis(400));
    assert_messages(&run.events(), &messages(&want));

    // Units only.
    let mut c = cfg(&jdir);
    c.units = vec!["cron.service".into()];
    let want: Vec<Entry> = (0..600)
        .filter(|i| i % 3 == 1)
        .map(|i| all[i].clone())
        .collect();
    let mut run = start(c, None, 64 << 10);
    run.collect(want.len(), T);
    run.drain_for(Duration::from_millis(300));
    assert_messages(&run.events(), &messages(&want));
}

#[test]
fn restart_from_a_cursor_delivers_exactly_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let all = entries("r", NEAR_MIDNIGHT - 3_600_000_000, 1_000, 5_000);
    write_journal(&jdir.join("system.journal"), &all);

    // First run: keep only the first few batches, as if only they became durable.
    let mut run = start(cfg(&jdir), None, 16 << 10);
    run.collect(1, T);
    let mut first = run.shutdown();
    first.truncate(3);
    let done = check_batches(&first);
    let cursor = first.last().unwrap().cursor.clone().unwrap();
    let cursor = cursor.as_str().unwrap().to_string();
    assert!(done.len() < all.len());

    let mut run = start(cfg(&jdir), Some(cursor), 16 << 10);
    run.collect(all.len() - done.len(), T);
    run.drain_for(Duration::from_millis(300));
    let mut evs = done;
    evs.extend(run.events());
    assert_messages(&evs, &messages(&all));
    assert_eq!(run.stats.gaps.load(std::sync::atomic::Ordering::Relaxed), 0);

    // A cursor at the very last entry: nothing to read, nothing repeated, and what is
    // written later still arrives.
    let last = evs.last().unwrap()["cursor"].as_str().unwrap().to_string();
    let mut run = start(cfg(&jdir), Some(last), 16 << 10);
    run.drain_for(Duration::from_millis(400));
    assert_eq!(run.count(), 0);
    let later = entries("later", NEAR_MIDNIGHT, 90_000_000, 50);
    place_journal(&jdir, "later.journal", &later);
    run.collect(50, T);
    run.drain_for(Duration::from_millis(300));
    assert_messages(&run.events(), &messages(&later));
    assert_eq!(run.stats.gaps.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn a_vacuumed_cursor_resumes_at_the_oldest_entry_and_counts_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let old = entries("old", NEAR_MIDNIGHT - 7_200_000_000, 1_000, 300);
    let new = entries("new", NEAR_MIDNIGHT - 3_600_000_000, 10_000_000_000, 300);
    write_journal(&jdir.join("system@old.journal"), &old);
    write_journal(&jdir.join("system.journal"), &new);

    let mut run = start(cfg(&jdir), None, 1 << 20);
    run.collect(600, T);
    let evs = run.events();
    let mut expected = messages(&old);
    expected.extend(messages(&new));
    assert_messages(&evs, &expected);
    let cursor = evs[100]["cursor"].as_str().unwrap().to_string();
    drop(run);

    // The file holding the cursor's entry is vacuumed away.
    std::fs::remove_file(jdir.join("system@old.journal")).unwrap();
    let mut run = start(cfg(&jdir), Some(cursor), 1 << 20);
    run.collect(300, T);
    run.drain_for(Duration::from_millis(300));
    assert_messages(&run.events(), &messages(&new));
    assert_eq!(run.stats.gaps.load(std::sync::atomic::Ordering::Relaxed), 1);

    // A cursor that is not a cursor at all: everything from the oldest entry, a gap.
    let mut run = start(cfg(&jdir), Some("garbage".into()), 1 << 20);
    run.collect(300, T);
    run.drain_for(Duration::from_millis(300));
    assert_messages(&run.events(), &messages(&new));
    assert_eq!(run.stats.gaps.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn journal_files_added_while_running_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let a = entries("a", NEAR_MIDNIGHT - 3_600_000_000, 1_000, 1_000);
    write_journal(&jdir.join("a.journal"), &a);

    let mut run = start(cfg(&jdir), None, 64 << 10);
    run.collect(a.len(), T);
    // Renamed into place, whole.
    let b = entries("b", NEAR_MIDNIGHT - 1_800_000_000, 2_000_000_000, 2_000);
    place_journal(&jdir, "b.journal", &b);
    run.collect(a.len() + b.len(), T);
    // Written in place while the source watches, as journald itself does.
    let c = entries("c", NEAR_MIDNIGHT - 900_000_000, 3_000_000_000, 2_000);
    write_journal(&jdir.join("c.journal"), &c);
    run.collect(a.len() + b.len() + c.len(), T);
    run.drain_for(Duration::from_millis(400));

    let mut expected = messages(&a);
    expected.extend(messages(&b));
    expected.extend(messages(&c));
    assert_messages(&run.events(), &expected);
}

#[test]
fn start_at_end_skips_what_exists_and_reads_what_comes() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let a = entries("a", NEAR_MIDNIGHT - 3_600_000_000, 1_000, 500);
    write_journal(&jdir.join("a.journal"), &a);

    let mut c = cfg(&jdir);
    c.start_at = soclink::config::StartAt::End;
    let mut run = start(c, None, 64 << 10);
    run.drain_for(Duration::from_millis(500));
    assert_eq!(run.count(), 0);
    let b = entries("b", NEAR_MIDNIGHT - 1_800_000_000, 2_000_000_000, 300);
    place_journal(&jdir, "b.journal", &b);
    run.collect(b.len(), T);
    run.drain_for(Duration::from_millis(300));
    assert_messages(&run.events(), &messages(&b));
}

#[test]
fn a_missing_directory_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let mut run = start(cfg(&jdir), None, 64 << 10);
    run.drain_for(Duration::from_millis(300));
    std::fs::create_dir(&jdir).unwrap();
    let a = entries("a", NEAR_MIDNIGHT, 1_000, 100);
    place_journal(&jdir, "a.journal", &a);
    run.collect(a.len(), T);
    assert_messages(&run.events(), &messages(&a));
}

#[test]
fn one_event_stays_bounded_whatever_the_entry_holds() {
    use soclink::agent::sources::journald::{MAX_FIELD, MAX_FIELDS_TOTAL};
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let mut wide = Entry::new(NEAR_MIDNIGHT, 1_000, b"id=wide");
    for i in 0..40 {
        wide = wide.with(&format!("F{i:02}"), &vec![b'a' + (i % 26) as u8; 60_000]);
    }
    let all = vec![
        Entry::new(NEAR_MIDNIGHT, 999, b"id=long-field").with("BIG", &vec![b'y'; 100_000]),
        wide,
        // A second MESSAGE value does not get the MESSAGE bound.
        Entry::new(NEAR_MIDNIGHT, 1_001, &vec![b'm'; 900_000])
            .with("MESSAGE", &vec![b'n'; 900_000]),
    ];
    write_journal(&jdir.join("system.journal"), &all);
    let mut run = start(cfg(&jdir), None, 1 << 20);
    run.collect(3, T);
    let evs = run.events();
    assert_eq!(evs.len(), 3);

    assert_eq!(evs[0]["truncated"], true);
    assert_eq!(evs[0]["fields"]["BIG"].as_str().unwrap().len(), MAX_FIELD);

    let wide = &evs[1];
    assert_eq!(wide["message"], "id=wide");
    assert_eq!(wide["truncated"], true);
    let kept: usize = wide["fields"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| k.len() + v.as_str().unwrap().len())
        .sum();
    assert!(kept <= MAX_FIELDS_TOTAL + 64, "{kept}");
    assert!(kept >= MAX_FIELDS_TOTAL - 64 - 60_000, "{kept}");

    let two = &evs[2];
    assert_eq!(two["truncated"], true);
    let m = two["message"].as_str().unwrap();
    let rest = two["fields"]["MESSAGE"].as_str().unwrap();
    // Journal order of two values of one field is the file's, not the export's.
    assert_eq!(m.len() + rest.len(), 900_000 + MAX_FIELD);
    for b in &run.batches {
        assert!(b.raw.len() < 3 << 20);
    }
}
