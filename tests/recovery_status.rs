//! Damage found at start is handled and visible: a flipped byte inside a spool segment,
//! a garbage checkpoint file and an incident's outbox state that is not sealed are
//! detected, set aside or skipped, logged, and shown by `soclink status` (table and
//! JSON), while the agent keeps running.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn status(agent: &AgentProc, json: bool) -> Option<String> {
    let mut cmd = Command::new(bin());
    cmd.arg("status").arg("-c").arg(&agent.config);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn damaged_spool_and_checkpoints_are_set_aside_and_shown_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let text: String = (0..4000).map(|n| line("a", n) + "\n").collect();
    std::fs::write(&log, &text).unwrap();
    let mut agent = AgentProc::new(dir.path(), &file_source("app", &[&log], ""), "");
    agent.start();
    wait_events(&agent, Duration::from_secs(30), "4000 lines spooled", |e| {
        e.len() >= 4000
    });
    agent.stop();

    // A byte flipped in the middle of the first segment, and a checkpoint file that is
    // not one.
    let mut segs: Vec<PathBuf> = std::fs::read_dir(agent.state.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&segs[0], &bytes).unwrap();
    std::fs::write(agent.state.join("checkpoints.json"), b"{ not a checkpoint").unwrap();
    // An incident declared while the agent was down, with an outbox state written by
    // someone else (plain JSON, no checksum) that claims the record went out as seq 1.
    let out = Command::new(bin())
        .args([
            "incident",
            "declare",
            "--level",
            "2",
            "--summary",
            "test",
            "-c",
        ])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let incident = std::fs::read_dir(agent.state.join("incidents"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| !n.starts_with('.'))
        .expect("an incident folder");
    let outbox = agent
        .state
        .join("incidents")
        .join(&incident)
        .join("outbox.json");
    std::fs::write(&outbox, br#"{"record_sha256":"","record_seq":1}"#).unwrap();

    agent.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    let json = loop {
        if let Some(j) = status(&agent, true) {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "no status; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let r = &v["recovery"];
    assert!(r["corrupt_records"].as_u64().unwrap() >= 1, "{r}");
    assert!(
        r["quarantined"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q == "checkpoints.json.corrupt"),
        "{r}"
    );
    assert!(
        r["quarantined"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q.as_str() == Some(&format!("incidents/{incident}/outbox.json.corrupt"))),
        "{r}"
    );
    assert!(
        r["checkpoint_reset"].as_str().unwrap().contains("corrupt"),
        "{r}"
    );
    assert!(agent.state.join("checkpoints.json.corrupt").exists());
    let table = status(&agent, false).unwrap();
    assert!(table.contains("RECOVERY AT START"), "{table}");
    assert!(table.contains("checkpoints reset"), "{table}");
    // Still running a while later: damage never turns into a crash loop.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "agent exited; log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert_eq!(
        log.matches("starting without checkpoints").count(),
        1,
        "the checkpoint damage is logged once:\n{log}"
    );
    assert_eq!(
        log.matches("sending the incident's record, bundle and report again")
            .count(),
        1,
        "the outbox damage is logged once:\n{log}"
    );
    // Set aside as found (the resend is in tests/incident_model.rs; this agent has
    // no upstream).
    assert_eq!(
        std::fs::read(outbox.with_extension("json.corrupt")).unwrap(),
        br#"{"record_sha256":"","record_seq":1}"#
    );
    assert!(log.contains("spool recovery:"), "{log}");
    agent.stop();
}
