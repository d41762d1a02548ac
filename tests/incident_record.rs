//! Incident records on disk: declare, list, show, mark, close; the 1-hour deadline and
//! how it is shown; the upstream-down banner; bad input refused with typed errors; and
//! the `soclink incident` entry point driven through its clap arguments.

mod bundle_common;

use std::fs;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use bundle_common::*;
use clap::Parser;
use soclink::cli::incident::{IncidentArgs, run_incident};
use soclink::incident::record::{is_valid_id, parse_time, read_details};
use soclink::incident::{
    DeclareRequest, EventKind, IncidentError, IncidentSettings, IncidentStore, LinkStatus,
    Remaining, TimelineEvent, render_list, render_show, verify_bundle,
};

fn t(s: &str) -> SystemTime {
    parse_time(s).unwrap()
}

#[test]
fn declare_stores_a_durable_record_with_its_deadline() {
    let dir = tempdir();
    let store = IncidentStore::open(dir.path()).unwrap();
    let discovered = SystemTime::now() - Duration::from_secs(19 * 60);
    let mut req = DeclareRequest::new(2, "  phishing mail opened  ");
    req.discovered_at = Some(discovered);
    req.support_requested = true;
    req.affects_other_agencies = true;
    let inc = store.declare(req, "agent-7", "web-01").unwrap();
    assert!(is_valid_id(&inc.id), "{}", inc.id);
    assert_eq!(inc.summary, "phishing mail opened");
    assert_eq!(inc.deadline, discovered + Duration::from_secs(3600));
    assert_eq!(inc.timeline.len(), 1);
    assert_eq!(inc.timeline[0].event, EventKind::Declared);
    let path = dir
        .path()
        .join("incidents")
        .join(&inc.id)
        .join("record.json");
    let raw: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(raw["level"], 2);
    assert_eq!(raw["support_requested"], true);
    assert_eq!(raw["affects_critical_infrastructure"], false);
    assert_eq!(raw["drill"], false);
    assert_eq!(raw["timeline"][0]["event"], "declared");
    // Reopened, it reads back equal (nanosecond times survive).
    let again = IncidentStore::open(dir.path()).unwrap();
    assert_eq!(again.get(&inc.id).unwrap(), inc);
    assert_eq!(again.list().unwrap(), vec![inc.clone()]);
    // Remaining: about 41 minutes.
    match inc.remaining(SystemTime::now()) {
        Remaining::Left(d) => assert!((40 * 60..=41 * 60).contains(&d.as_secs()), "{d:?}"),
        Remaining::Overdue(d) => panic!("overdue by {d:?}"),
    }
    // A second incident the same day gets the next sequence number.
    let second = store
        .declare(DeclareRequest::new(1, "port scan"), "agent-7", "web-01")
        .unwrap();
    assert_eq!(&second.id[..13], &inc.id[..13]);
    assert_eq!(&second.id[13..17], "0002");
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn bad_input_is_refused_with_typed_errors() {
    let dir = tempdir();
    let store = IncidentStore::open(dir.path()).unwrap();
    let e = store
        .declare(DeclareRequest::new(5, "x"), "a", "h")
        .unwrap_err();
    assert!(matches!(e, IncidentError::InvalidLevel(5)));
    let e = store
        .declare(DeclareRequest::new(0, "x"), "a", "h")
        .unwrap_err();
    assert!(matches!(e, IncidentError::InvalidLevel(0)));
    let e = store
        .declare(DeclareRequest::new(1, "   "), "a", "h")
        .unwrap_err();
    assert!(matches!(e, IncidentError::Invalid(_)));
    let e = store
        .declare(DeclareRequest::new(1, "two\nlines"), "a", "h")
        .unwrap_err();
    assert!(matches!(e, IncidentError::Invalid(_)));
    let mut future = DeclareRequest::new(1, "from the future");
    future.discovered_at = Some(SystemTime::now() + Duration::from_secs(3600));
    assert!(matches!(
        store.declare(future, "a", "h").unwrap_err(),
        IncidentError::Invalid(_)
    ));
    assert!(matches!(
        parse_time("26/11/2026 09:00").unwrap_err(),
        IncidentError::InvalidTime { .. }
    ));
    // Ids are checked before they touch the file system.
    assert!(matches!(
        store.get("../../etc").unwrap_err(),
        IncidentError::BadId(_)
    ));
    assert!(matches!(
        store.get("INC-20261126-0009-abcd").unwrap_err(),
        IncidentError::NotFound(_)
    ));
    // Details: at most 64 KiB, UTF-8.
    let big = dir.path().join("big.txt");
    fs::write(&big, vec![b'a'; 64 * 1024 + 1]).unwrap();
    assert!(matches!(
        read_details(&big).unwrap_err(),
        IncidentError::Details { .. }
    ));
    fs::write(&big, vec![b'a'; 64 * 1024]).unwrap();
    assert_eq!(read_details(&big).unwrap().len(), 64 * 1024);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn timeline_marks_and_close() {
    let dir = tempdir();
    let store = IncidentStore::open(dir.path()).unwrap();
    let inc = store
        .declare(
            DeclareRequest::new(3, "ransomware note"),
            "agent-7",
            "web-01",
        )
        .unwrap();
    let delivered = inc.declared_at + Duration::from_secs(120);
    let acked = inc.declared_at + Duration::from_secs(125);
    store
        .mark(
            &inc.id,
            TimelineEvent::new(EventKind::Delivered, delivered, "relay soc-1"),
        )
        .unwrap();
    store
        .mark(
            &inc.id,
            TimelineEvent::new(EventKind::Acknowledged, acked, ""),
        )
        .unwrap();
    let report = dir.path().join("report.md");
    fs::write(&report, "# Closing report\nrestored from backup\n").unwrap();
    let recovered = inc.declared_at + Duration::from_secs(7200);
    let closed = store.close(&inc.id, &report, recovered).unwrap();
    let kinds: Vec<EventKind> = closed.timeline.iter().map(|e| e.event).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Declared,
            EventKind::Delivered,
            EventKind::Acknowledged,
            EventKind::Recovered,
            EventKind::Closed
        ]
    );
    assert_eq!(closed.timeline[3].at, recovered);
    assert_eq!(
        fs::read(
            dir.path()
                .join("incidents")
                .join(&inc.id)
                .join("closing-report")
        )
        .unwrap(),
        fs::read(&report).unwrap()
    );
    assert!(matches!(
        store.close(&inc.id, &report, recovered).unwrap_err(),
        IncidentError::AlreadyClosed(_)
    ));
    let shown = render_show(
        &store.get(&inc.id).unwrap(),
        SystemTime::now(),
        &LinkStatus::default(),
    );
    assert!(shown.contains("acknowledged"), "{shown}");
    assert!(shown.contains("closed"), "{shown}");
    assert!(shown.contains("  delivered     relay soc-1\n"), "{shown}");
    assert!(shown.contains("status       closed "), "{shown}");
}

#[test]
fn deadline_text_counts_down_and_says_overdue() {
    let dir = tempdir();
    let store = IncidentStore::open(dir.path()).unwrap();
    let mut req = DeclareRequest::new(2, "defacement");
    req.discovered_at = Some(SystemTime::now() - Duration::from_secs(600));
    let mut inc = store.declare(req, "a", "h").unwrap();
    inc.discovered_at = t("2026-11-26T01:13:00Z");
    inc.deadline = t("2026-11-26T02:13:00Z");
    assert_eq!(
        inc.deadline_text(t("2026-11-26T01:32:00Z")),
        "deadline 02:13 UTC (in 41m)"
    );
    assert_eq!(
        inc.deadline_text(t("2026-11-26T02:25:30Z")),
        "deadline 02:13 UTC, OVERDUE by 12m"
    );
    assert_eq!(
        inc.remaining(t("2026-11-26T02:25:00Z")),
        Remaining::Overdue(Duration::from_secs(12 * 60))
    );
    let list = render_list(
        std::slice::from_ref(&inc),
        t("2026-11-26T02:25:30Z"),
        &LinkStatus::default(),
    );
    assert!(
        list.contains("not yet delivered; deadline 02:13 UTC, OVERDUE by 12m"),
        "{list}"
    );
    assert!(list.contains(&inc.id));
    assert!(!list.contains("UPSTREAM DOWN"));
    // Acknowledged late: the list says by how much.
    inc.timeline.push(TimelineEvent::new(
        EventKind::Acknowledged,
        t("2026-11-26T02:20:00Z"),
        "",
    ));
    let list = render_list(&[inc], t("2026-11-26T02:25:30Z"), &LinkStatus::default());
    assert!(
        list.contains("acknowledged 02:20 UTC (late by 7m)"),
        "{list}"
    );
}

#[test]
fn upstream_down_is_said_plainly_with_the_center_contact() {
    let dir = tempdir();
    let store = IncidentStore::open(dir.path()).unwrap();
    let inc = store
        .declare(DeclareRequest::new(4, "core switch down"), "a", "h")
        .unwrap();
    let now = inc.declared_at + Duration::from_secs(5 * 60);
    let link = LinkStatus {
        upstream_down_since: Some(inc.declared_at - Duration::from_secs(29 * 60)),
        center_contact: Some("N-CERT 02-1234-5678, soc@example.gov.tw".into()),
    };
    let list = render_list(std::slice::from_ref(&inc), now, &link);
    assert!(list.starts_with("UPSTREAM DOWN since "), "{list}");
    assert!(list.contains("(34m ago)"), "{list}");
    assert!(list.contains("1 incident(s) not yet delivered"), "{list}");
    assert!(
        list.contains("N-CERT 02-1234-5678, soc@example.gov.tw"),
        "{list}"
    );
    let show = render_show(&inc, now, &link);
    assert!(show.contains("UPSTREAM DOWN"), "{show}");
    assert!(show.contains("deadline"), "{show}");
    let no_contact = LinkStatus {
        upstream_down_since: link.upstream_down_since,
        center_contact: None,
    };
    assert!(render_list(&[inc], now, &no_contact).contains("no center contact is configured"));
}

#[derive(Parser)]
struct Top {
    #[command(subcommand)]
    cmd: TopCmd,
}

#[derive(clap::Subcommand)]
enum TopCmd {
    Incident(IncidentArgs),
}

fn incident_cli(args: &[&str]) -> ExitCode {
    let top = Top::try_parse_from(std::iter::once("soclink").chain(args.iter().copied())).unwrap();
    let TopCmd::Incident(a) = top.cmd;
    let settings = IncidentSettings {
        max_bundle_size: 64 << 20,
        ..IncidentSettings::default()
    };
    run_incident(&a, &settings, &LinkStatus::default()).unwrap()
}

#[test]
fn cli_declare_level_3_builds_a_verified_bundle_and_level_1_does_not() {
    let dir = tempdir();
    let state = dir.path().join("state");
    let logs = dir.path().join("logs");
    write_file(
        &logs.join("auth.log"),
        b"Failed password\n",
        SystemTime::now(),
    );
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        format!(
            "id = \"web-01\"\nstate_dir = \"{}\"\n\n[[source]]\nname = \"auth\"\ntype = \"file\"\ninclude = [\"{}/auth.log\"]\n",
            state.display(),
            logs.display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let details = dir.path().join("details.txt");
    fs::write(&details, "found by the night shift\n").unwrap();
    let code = incident_cli(&[
        "incident",
        "declare",
        "-c",
        c,
        "--level",
        "3",
        "--summary",
        "web shell found",
        "--discovered-at",
        &humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(60)).to_string(),
        "--details",
        details.to_str().unwrap(),
        "--drill",
    ]);
    assert_eq!(code, ExitCode::SUCCESS);
    assert_eq!(
        incident_cli(&[
            "incident",
            "declare",
            "-c",
            c,
            "--level",
            "1",
            "--summary",
            "scan"
        ]),
        ExitCode::SUCCESS
    );
    let store = IncidentStore::open(&state).unwrap();
    let all = store.list().unwrap();
    assert_eq!(all.len(), 2);
    let (l3, l1) = (&all[0], &all[1]);
    assert_eq!((l3.level, l1.level), (3, 1));
    assert!(l3.drill && !l1.drill);
    assert_eq!(l3.details, "found by the night shift\n");
    let b = l3.bundle.as_ref().expect("level 3 has a bundle");
    assert_eq!(b.members, 1 + 10 - l3_missing_facts(&b.path));
    assert!(l3.last(EventKind::BundleBuilt).is_some());
    let report = verify_bundle(&b.path).unwrap();
    assert_eq!(report.manifest_sha256, b.manifest_sha256);
    assert!(report.drill);
    assert!(l1.bundle.is_none());
    assert!(!store.bundle_path(&l1.id).unwrap().exists());
    // Usage errors exit 2; show and list succeed.
    assert_eq!(
        incident_cli(&["incident", "show", "-c", c, "INC-20261126-0099-abcd"]),
        ExitCode::from(2)
    );
    assert_eq!(
        incident_cli(&["incident", "show", "-c", c, &l3.id]),
        ExitCode::SUCCESS
    );
    assert_eq!(
        incident_cli(&["incident", "list", "-c", c]),
        ExitCode::SUCCESS
    );
    let report_file = dir.path().join("closing.txt");
    fs::write(&report_file, "done\n").unwrap();
    assert_eq!(
        incident_cli(&[
            "incident",
            "close",
            "-c",
            c,
            &l3.id,
            "--report",
            report_file.to_str().unwrap()
        ]),
        ExitCode::SUCCESS
    );
    assert!(store.get(&l3.id).unwrap().is_closed());
}

/// Host facts that could not be had on this machine are errors, not members.
fn l3_missing_facts(bundle: &std::path::Path) -> u64 {
    bundle_common::manifest(bundle)
        .errors
        .iter()
        .filter(|e| e.what.starts_with("host fact"))
        .count() as u64
}
