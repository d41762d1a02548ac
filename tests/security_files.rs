//! A watched directory cannot exfiltrate files (issue 17, item 6): with real agent and
//! relay processes, `ln -s <agent key> <watched dir>/zz.log` is neither shipped nor
//! bundled; neither is a hard link to the key, nor the key named by a glob outright;
//! a symlink allowed by `follow_symlinks = "within_includes"` is read, and the bundle's
//! manifest records where it led.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn bundle_bytes(path: &Path) -> Vec<(String, Vec<u8>)> {
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap());
    let mut ar = tar::Archive::new(gz);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut b = Vec::new();
        e.read_to_end(&mut b).unwrap();
        out.push((name, b));
    }
    out
}

#[test]
fn the_agents_key_is_neither_shipped_nor_bundled() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let adir = dir.path().join("agent");
    let logs = adir.join("logs");
    let linked = adir.join("linked");
    let elsewhere = adir.join("elsewhere");
    for d in [&logs, &linked, &elsewhere] {
        std::fs::create_dir_all(d).unwrap();
    }
    let upstream = upstream_toml(&pki, &relay.address(), "files-agent");
    let key = pki.dir.join("files-agent-client-key.pem");
    let key_pem = std::fs::read_to_string(&key).unwrap();
    // The body of the key: what must never appear in the store or a bundle.
    let secret: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(secret.len() > 40);

    let expected = append(&logs.join("app.log"), 0, 300, "app");
    std::os::unix::fs::symlink(&key, logs.join("zz.log")).unwrap();
    std::fs::hard_link(&key, logs.join("hard.log")).unwrap();
    // Allowed: a link to a file the includes also match.
    let via = append(&elsewhere.join("real.txt"), 0, 40, "via-link");
    std::os::unix::fs::symlink(elsewhere.join("real.txt"), linked.join("alias.log")).unwrap();
    // Refused even so: a link out of the includes.
    std::os::unix::fs::symlink(&key, linked.join("key.log")).unwrap();
    let sources = format!(
        "{}{}{}",
        file_source("app", &[&logs.join("*.log")], ""),
        file_source(
            "linked",
            &[&linked.join("*.log"), &elsewhere.join("*.txt")],
            "follow_symlinks = \"within_includes\""
        ),
        // The key named outright: the agent never reads its own key, whatever the globs.
        file_source("keys", &[&pki.dir.join("files-agent-client-*.pem")], ""),
    );
    let mut agent = AgentProc::new(&adir, &sources, &upstream);
    agent.start();
    let evs = wait_store(&relay, "files-agent", T, "app and linked lines", |e| {
        e.len() >= expected.len() + via.len()
    });
    // Give the refused files every chance to be read (several rescans).
    std::thread::sleep(Duration::from_secs(2));
    let evs2 = relay.events("files-agent");
    assert_eq!(
        evs.len(),
        evs2.len(),
        "more events arrived: something else was read"
    );
    let mut all = expected.clone();
    all.extend(via.iter().cloned());
    assert_exactly_once(&evs2, &all);
    for e in &evs2 {
        let m = String::from_utf8_lossy(&message(e)).into_owned();
        assert!(
            !m.contains("PRIVATE KEY") && !secret.contains(&m),
            "shipped: {e}"
        );
    }
    let log = agent.log();
    for what in [
        "zz.log is a symbolic link",
        "hard.log is the agent's own",
        "key.log leads to",
        "files-agent-client-key.pem is the agent's own",
    ] {
        assert!(
            log.contains(what),
            "agent log does not say {what:?}:\n{log}"
        );
    }

    // A level 4 incident: its bundle holds none of it either.
    let out = Command::new(bin())
        .args(["incident", "declare", "-c"])
        .arg(&agent.config)
        .args(["--level", "4", "--summary", "exfiltration attempt"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("INC-"))
        .unwrap()
        .to_string();
    let idir = relay.store.join("files-agent").join("incidents").join(&id);
    let deadline = Instant::now() + T;
    while !idir.join("bundle.tar.gz").exists() {
        assert!(
            Instant::now() < deadline,
            "no bundle; relay log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let members = bundle_bytes(&idir.join("bundle.tar.gz"));
    for (name, bytes) in &members {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(&secret) && !text.contains("PRIVATE KEY"),
            "bundle member {name} holds the key"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(idir.join("manifest.json")).unwrap()).unwrap();
    let left: Vec<(String, String)> = manifest["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["path"].as_str().unwrap().to_string(),
                l["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (file, why) in [
        (logs.join("zz.log"), "symbolic link"),
        (logs.join("hard.log"), "agent's own"),
        (linked.join("key.log"), "include patterns do not match"),
        (key.clone(), "agent's own"),
    ] {
        let file = file.display().to_string();
        assert!(
            left.iter().any(|(p, r)| *p == file && r.contains(why)),
            "{file} not left out for {why:?}: {left:?}"
        );
    }
    // The allowed link is bundled, and the manifest says where it led.
    let alias = manifest["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["original_path"] == linked.join("alias.log").display().to_string())
        .unwrap_or_else(|| panic!("alias.log not bundled: {manifest:#}"));
    assert_eq!(
        alias["target"],
        elsewhere.join("real.txt").display().to_string()
    );
    agent.stop();
    relay.stop();
}
