//! Roles on the host (issue 17, item 7), with real Unix users made for the test: a user
//! outside the operator group cannot declare an incident (neither through the socket's
//! mode nor, with the mode opened up, past the agent's SO_PEERCRED check); a member
//! can, and the record names them; one user's flood of half-open clients does not make
//! another user's declaration time out or fall back to a local record.
//!
//! Needs root (to create users and groups); under `CI` it fails rather than skip.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// Throwaway users and a group, removed when dropped.
struct Accounts {
    group: String,
    member: String,
    outsider: String,
}

impl Accounts {
    fn create() -> Accounts {
        let tag = format!("{:x}", std::process::id() ^ (seed() as u32));
        let a = Accounts {
            group: format!("slops{tag}"),
            member: format!("slin{tag}"),
            outsider: format!("slout{tag}"),
        };
        run(Command::new("groupadd").arg(&a.group));
        for (user, groups) in [(&a.member, Some(&a.group)), (&a.outsider, None)] {
            let mut c = Command::new("useradd");
            c.args(["-M", "-N", "-s", "/usr/sbin/nologin"]);
            if let Some(g) = groups {
                c.args(["-G", g]);
            }
            run(c.arg(user));
        }
        a
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for u in [&self.member, &self.outsider] {
            let _ = Command::new("userdel").arg(u).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

fn run(c: &mut Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// `soclink incident declare` as `user` (its groups from the group database).
fn declare_as(bin: &Path, user: &str, config: &Path, summary: &str) -> Output {
    // runuser sets the user's primary group and supplementary groups (initgroups).
    Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(bin)
        .args(["incident", "declare", "-c"])
        .arg(config)
        .args(["--level", "2", "--summary", summary])
        .output()
        .unwrap()
}

fn incidents(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("incidents"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("record.json").exists())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn only_operators_declare_and_are_recorded_by_name() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root to create users and groups, and CI runs it"
        );
        eprintln!("skipped: needs root");
        return;
    }
    let accounts = Accounts::create();
    let dir = tempfile::tempdir().unwrap();
    // The test users must reach the binary, the config and the socket's directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("soclink");
    std::fs::copy(common::bin(), &bin).unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    append(&logs.join("app.log"), 0, 10, "roles");
    let mut agent = AgentProc::new(
        dir.path(),
        &file_source("app", &[&logs.join("app.log")], ""),
        "",
    );
    // A top-level key: before the tables.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let text = format!("operator_group = {:?}\n{text}", accounts.group);
    std::fs::write(&agent.config, text).unwrap();
    std::fs::set_permissions(&agent.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    agent.start();
    let sock = dir.path().join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The socket belongs to the operator group, mode 0660.
    let st = run(Command::new("stat").args(["-c", "%G %a"]).arg(&sock));
    assert_eq!(
        String::from_utf8_lossy(&st.stdout).trim(),
        format!("{} 660", accounts.group)
    );

    // Outside the group: the socket's mode stops the user...
    let out = declare_as(&bin, &accounts.outsider, &agent.config, "outsider 1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        err.contains("NOT recorded"),
        "no silent local record: {err}"
    );
    // ... and with the mode opened up, the agent's SO_PEERCRED check does.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = declare_as(&bin, &accounts.outsider, &agent.config, "outsider 2");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("user {} (uid", accounts.outsider))
            && err.contains("is not in the operator group"),
        "{err}"
    );
    assert!(
        incidents(&agent.state).is_empty(),
        "an outsider's incident was recorded"
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).unwrap();

    // Root floods the socket with half-open clients; the member is served regardless.
    let flood: Vec<std::os::unix::net::UnixStream> = (0..300)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&sock).ok())
        .collect();
    assert!(flood.len() > 250);
    let t = Instant::now();
    let out = declare_as(&bin, &accounts.member, &agent.config, "member declares");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert!(took < Duration::from_secs(3), "declaring took {took:?}");
    drop(flood);
    let recorded = incidents(&agent.state);
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(recorded[0].join("record.json")).unwrap()).unwrap();
    assert_eq!(record["summary"], "member declares");
    assert_eq!(record["declared_by"]["user"], accounts.member.as_str());
    // The agent recorded the file as its own user (root here), not the caller's.
    let owner = run(Command::new("stat")
        .args(["-c", "%U"])
        .arg(recorded[0].join("record.json")));
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), "root");
    // Every control action is in the agent's log with the user's name.
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "control action: incident_declare by {}",
            accounts.member
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("by {}", accounts.outsider))
            && log.contains("is not in the operator group"),
        "the refused attempt is recorded too:\n{log}"
    );
    agent.stop();
    drop(accounts);
}
