//! Packaging: the systemd units are hardened (systemd-analyze security must rate each
//! 2.0 or lower, "OK") and agree with the built-in defaults; the Debian package built
//! from `[package.metadata.deb]` in Cargo.toml has the right contents, installs, runs
//! and removes cleanly; the README's test command installs exactly what `.ci/run`
//! installs.
//!
//! The package tests build a .deb and install it with dpkg (as root), so they run only
//! when asked: `SOCLINK_PACKAGE_TESTS=1` or in CI (`CI` set). They stage the package
//! with `dpkg-deb --build` from the metadata's asset list (no extra tool needed);
//! `cargo_deb_builds_the_staged_package` (run by hand, `--ignored`) checks that
//! `cargo deb --no-build` builds the same file list.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNITS: [&str; 2] = ["soclink-agent.service", "soclink-relay.service"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn unit_path(name: &str) -> PathBuf {
    repo().join("packaging/systemd").join(name)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The unit's value for `key` (last assignment wins, as in systemd).
fn directive(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(str::to_string)
}

#[test]
fn units_pass_systemd_analyze_security_at_2_or_lower() {
    let tool = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        tool.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: install the Debian package `systemd`"
    );
    for name in UNITS {
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(unit_path(name)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A misspelt hardening directive is ignored by systemd with only a warning.
        assert!(
            !stderr.contains("Unknown key") && !stderr.contains("ignoring"),
            "{name}: systemd ignores part of the unit:\n{stderr}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let prefix = format!("Overall exposure level for {name}: ");
        let line = stdout
            .lines()
            .find_map(|l| l.trim_start_matches("→ ").strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no exposure line for {name}:\n{stdout}"));
        let mut words = line.split_whitespace();
        let level: f64 = words.next().unwrap().parse().unwrap();
        let verdict = words.next().unwrap();
        println!("{name}: overall exposure level {level} {verdict}");
        assert!(
            level <= 2.0 && verdict == "OK",
            "{name} is rated {line}; the full report:\n{stdout}"
        );
    }
}

#[test]
fn units_agree_with_the_built_in_defaults() {
    use soclink::config::{
        DEFAULT_CONTROL_SOCKET, DEFAULT_RELAY_CONTROL_SOCKET, DEFAULT_RELAY_STATE_DIR,
        DEFAULT_STATE_DIR,
    };
    let agent = std::fs::read_to_string(unit_path(UNITS[0])).unwrap();
    let relay = std::fs::read_to_string(unit_path(UNITS[1])).unwrap();
    // Agent and relay run as different users, each with its own runtime directory.
    for (unit, role, state, user, runtime) in [
        (&agent, "agent", DEFAULT_STATE_DIR, "soclink", "soclink"),
        (
            &relay,
            "relay",
            DEFAULT_RELAY_STATE_DIR,
            "soclink-relay",
            "soclink-relay",
        ),
    ] {
        assert_eq!(directive(unit, "Type").as_deref(), Some("notify"));
        assert_eq!(
            directive(unit, "ExecStart"),
            Some(format!(
                "/usr/bin/soclink {role} -c /etc/soclink/{role}.toml"
            ))
        );
        assert_eq!(
            directive(unit, "ExecReload").as_deref(),
            Some("/bin/kill -HUP $MAINPID")
        );
        assert!(directive(unit, "WatchdogSec").is_some());
        assert_eq!(directive(unit, "User").as_deref(), Some(user));
        assert_eq!(directive(unit, "Group").as_deref(), Some(user));
        assert_eq!(directive(unit, "ProtectSystem").as_deref(), Some("strict"));
        // ProtectSystem=strict: the state directory is writable only because it is
        // the unit's StateDirectory.
        assert_eq!(
            Some(format!(
                "/var/lib/{}",
                directive(unit, "StateDirectory").unwrap()
            )),
            Some(state.to_string())
        );
        assert_eq!(
            directive(unit, "RuntimeDirectory").as_deref(),
            Some(runtime)
        );
        // No capability by default, for either.
        assert_eq!(
            directive(unit, "CapabilityBoundingSet").as_deref(),
            Some("")
        );
        assert_eq!(directive(unit, "AmbientCapabilities").as_deref(), Some(""));
        // The relay must see callers of its control socket as they are.
        assert_eq!(directive(unit, "PrivateUsers"), None);
    }
    assert_eq!(
        Path::new(DEFAULT_CONTROL_SOCKET).parent(),
        Some(Path::new("/run/soclink"))
    );
    assert_eq!(
        Path::new(DEFAULT_RELAY_CONTROL_SOCKET).parent(),
        Some(Path::new("/run/soclink-relay"))
    );
    // The agent reads the logs' groups; both give their sockets to the operators.
    assert_eq!(
        directive(&agent, "SupplementaryGroups").as_deref(),
        Some("adm systemd-journal soclink-operators")
    );
    assert_eq!(
        directive(&relay, "SupplementaryGroups").as_deref(),
        Some("soclink-operators")
    );
    // CAP_NET_BIND_SERVICE only through the drop-in a syslog port below 1024 needs,
    // which is the file the agent names when such a bind fails.
    let dropin =
        std::fs::read_to_string(repo().join("packaging/systemd/syslog-low-port.conf")).unwrap();
    assert_eq!(
        directive(&dropin, "AmbientCapabilities").as_deref(),
        Some("CAP_NET_BIND_SERVICE")
    );
    assert_eq!(
        directive(&dropin, "CapabilityBoundingSet").as_deref(),
        Some("CAP_NET_BIND_SERVICE")
    );
    assert!(
        deb_metadata()["assets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a[1].as_str()
                == Some(soclink::agent::LOW_PORT_DROPIN_DOC.trim_start_matches('/'))),
        "the .deb installs the drop-in where the agent says"
    );
    // LimitNOFILE fits the default max_connections, the busy answers and the spares.
    let nofile: u64 = directive(&relay, "LimitNOFILE").unwrap().parse().unwrap();
    let default = soclink::config::parse_relay("ca = \"c\"\ncert = \"c\"\nkey = \"k\"\n")
        .unwrap()
        .max_connections as u64;
    assert!(
        nofile
            >= default
                + soclink::relay::admission::OVERFLOW_SLOTS as u64
                + soclink::relay::admission::SPARE_DESCRIPTORS,
        "LimitNOFILE={nofile} for max_connections={default}"
    );
}

// ---------------------------------------------------------------------------------------
// The Debian package
// ---------------------------------------------------------------------------------------

fn package_tests_enabled() -> bool {
    // Opt-in, not a missing tool: the test installs a package on the machine it runs on.
    // CI (`CI` set, whatever its value) always runs it.
    let on = std::env::var("SOCLINK_PACKAGE_TESTS").is_ok_and(|v| v == "1")
        || std::env::var_os("CI").is_some();
    if !on {
        eprintln!("skipped: set SOCLINK_PACKAGE_TESTS=1 (or CI) to build and install the .deb");
    }
    on
}

/// `[package.metadata.deb]` of Cargo.toml.
fn deb_metadata() -> toml::Table {
    let text = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let mut t: toml::Table = text.parse().unwrap();
    let package = t.remove("package").unwrap();
    package["metadata"]["deb"].as_table().unwrap().clone()
}

struct Asset {
    source: PathBuf,
    dest: String,
    mode: u32,
}

fn assets(meta: &toml::Table) -> Vec<Asset> {
    meta["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a: Vec<&str> = a
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            // cargo-deb maps target/release/ to the built binaries; so do we.
            let source = match a[0].strip_prefix("target/release/") {
                Some("soclink") => PathBuf::from(common::bin()),
                Some(other) => panic!("unexpected binary asset {other}"),
                None => repo().join(a[0]),
            };
            Asset {
                source,
                dest: a[1].to_string(),
                mode: u32::from_str_radix(a[2], 8).unwrap(),
            }
        })
        .collect()
}

/// Stage the package tree from the metadata and build it with dpkg-deb.
fn build_with_dpkg_deb(meta: &toml::Table, out: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = out.join("staged");
    for a in assets(meta) {
        let dest = root.join(&a.dest);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&a.source, &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(a.mode)).unwrap();
    }
    let debian = root.join("DEBIAN");
    std::fs::create_dir_all(&debian).unwrap();
    let scripts = repo().join(meta["maintainer-scripts"].as_str().unwrap());
    for s in ["postinst", "prerm", "postrm"] {
        std::fs::copy(scripts.join(s), debian.join(s)).unwrap();
        std::fs::set_permissions(debian.join(s), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let conffiles: Vec<&str> = meta["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    std::fs::write(debian.join("conffiles"), conffiles.join("\n") + "\n").unwrap();
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    let description = meta["extended-description"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let control = format!(
        "Package: soclink\nVersion: {}-1\nArchitecture: {}\nSection: {}\nPriority: {}\nMaintainer: {}\nDepends: {}\nDescription: log collection agent and SOC relay\n {description}\n",
        env!("CARGO_PKG_VERSION"),
        String::from_utf8_lossy(&arch.stdout).trim(),
        meta["section"].as_str().unwrap(),
        meta["priority"].as_str().unwrap(),
        meta["maintainer"].as_str().unwrap(),
        meta["depends"].as_str().unwrap(),
    );
    std::fs::write(debian.join("control"), control).unwrap();
    let deb = out.join("soclink-staged.deb");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-z1", "--build"])
        .arg(&root)
        .arg(&deb));
    deb
}

/// The regular files (and their modes) in a .deb, from `dpkg-deb -c`.
fn deb_files(deb: &Path) -> BTreeSet<(String, String)> {
    let out = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            let mut w = l.split_whitespace();
            let mode = w.next().unwrap().to_string();
            let path = w.last().unwrap().trim_start_matches('.').to_string();
            (path, mode)
        })
        .collect()
}

/// `cargo deb --no-build` reusing the test's release binary (None: not installed).
fn build_with_cargo_deb(out: &Path) -> Option<PathBuf> {
    let bin = Path::new(common::bin());
    let target_dir = bin.parent()?.parent()?;
    // The profile whose binary the test runs: cargo deb packages that very file.
    let profile = match bin.parent()?.file_name()?.to_str()? {
        "debug" => "dev",
        other => other,
    };
    let probe = Command::new("cargo").args(["deb", "--version"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return None;
    }
    let deb = out.join("soclink-cargo-deb.deb");
    run(Command::new("cargo")
        .args(["deb", "--no-build", "--fast", "--profile", profile, "-o"])
        .arg(&deb)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", target_dir));
    Some(deb)
}

/// State directories the package's tmpfiles.d creates (and purge keeps, by design).
const STATE_DIRS: [&str; 2] = ["/var/lib/soclink", "/var/lib/soclink-relay"];

/// Purges the package even when an assertion fails half-way, and removes the (empty)
/// state directories the test created.
struct Installed {
    created: Vec<&'static str>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "soclink"]).output();
        for d in &self.created {
            // Fails, and keeps it, unless it is empty.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The files (and modes) the package installs.
fn packaged_files() -> BTreeSet<(String, String)> {
    [
        ("/usr/bin/soclink", "-rwxr-xr-x"),
        ("/lib/systemd/system/soclink-agent.service", "-rw-r--r--"),
        ("/lib/systemd/system/soclink-relay.service", "-rw-r--r--"),
        ("/usr/lib/sysusers.d/soclink.conf", "-rw-r--r--"),
        ("/usr/lib/tmpfiles.d/soclink.conf", "-rw-r--r--"),
        (
            "/usr/share/doc/soclink/examples/syslog-low-port.conf",
            "-rw-r--r--",
        ),
        ("/etc/soclink/agent.toml", "-rw-r--r--"),
        ("/etc/soclink/relay.toml", "-rw-r--r--"),
        ("/usr/share/doc/soclink/OPERATIONS.md", "-rw-r--r--"),
        ("/usr/share/doc/soclink/README.md", "-rw-r--r--"),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect()
}

/// `cargo deb` (the release path, `cargo install cargo-deb`) builds the same package as
/// the staging above. Not part of CI, which does not install cargo-deb: run it by hand
/// with `cargo test --release --test packaging -- --ignored`.
#[test]
#[ignore = "needs cargo-deb (cargo install cargo-deb); run with --ignored"]
fn cargo_deb_builds_the_staged_package() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = deb_metadata();
    let built = build_with_cargo_deb(tmp.path())
        .expect("cargo deb is not installed: cargo install cargo-deb");
    let mut theirs = deb_files(&built);
    // cargo-deb writes a copyright file from the metadata.
    theirs.remove(&(
        "/usr/share/doc/soclink/copyright".to_string(),
        "-rw-r--r--".to_string(),
    ));
    assert_eq!(
        theirs,
        packaged_files(),
        "cargo deb and the staged package differ"
    );
    let info = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&built)
        .arg("Depends"));
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        meta["depends"].as_str().unwrap()
    );
}

#[test]
fn deb_builds_installs_runs_and_removes() {
    if !package_tests_enabled() {
        return;
    }
    let started = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let meta = deb_metadata();
    let staged = build_with_dpkg_deb(&meta, tmp.path());
    let files = deb_files(&staged);
    let expected = packaged_files();
    assert_eq!(files, expected);
    let deb = staged;
    println!("package built in {:?}", started.elapsed());

    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "installing the package needs root (CI runs as root)"
    );
    assert!(
        !Command::new("dpkg")
            .args(["-s", "soclink"])
            .output()
            .unwrap()
            .status
            .success(),
        "soclink is already installed on this machine: refusing to replace it from a test"
    );
    let guard = Installed {
        created: STATE_DIRS
            .into_iter()
            .filter(|d| !Path::new(d).exists())
            .collect(),
    };
    println!("installing {}", deb.display());
    run(Command::new("dpkg").arg("-i").arg(&deb));

    let version = run(Command::new("/usr/bin/soclink").arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("soclink {}", env!("CARGO_PKG_VERSION"))
    );
    for (path, _) in &expected {
        assert!(Path::new(path).is_file(), "{path} is not installed");
    }
    assert_eq!(
        std::fs::read("/etc/soclink/agent.toml").unwrap(),
        std::fs::read(repo().join("config/agent.toml")).unwrap()
    );
    // The shipped agent configuration is valid as it is.
    run(Command::new("/usr/bin/soclink").args(["check-config", "-c", "/etc/soclink/agent.toml"]));
    // postinst made both users and the operators' group; the configuration directory
    // is readable by all (keys in it are protected by their own mode).
    run(Command::new("getent").args(["passwd", "soclink"]));
    run(Command::new("getent").args(["passwd", "soclink-relay"]));
    run(Command::new("getent").args(["group", "soclink-operators"]));
    let stat = run(Command::new("stat").args(["-c", "%U:%G %a", "/etc/soclink"]));
    assert_eq!(
        String::from_utf8_lossy(&stat.stdout).trim(),
        "root:root 755"
    );
    // postinst applies tmpfiles.d where systemd-tmpfiles exists (the units also create
    // these at start through StateDirectory=).
    let tmpfiles = Command::new("systemd-tmpfiles").arg("--version").output();
    let tmpfiles = tmpfiles.is_ok_and(|o| o.status.success());
    // CI installs systemd (.ci/run): there the tmpfiles check must run.
    assert!(
        tmpfiles || std::env::var_os("CI").is_none(),
        "systemd-tmpfiles is missing (Debian package systemd)"
    );
    for (d, owner) in STATE_DIRS
        .into_iter()
        .zip(["soclink:soclink 750", "soclink-relay:soclink-relay 750"])
        .filter(|_| tmpfiles)
    {
        let stat = run(Command::new("stat").args(["-c", "%U:%G %a", d]));
        assert_eq!(String::from_utf8_lossy(&stat.stdout).trim(), owner);
    }
    // ... and enabled nothing: the configuration has no certificates yet.
    for unit in UNITS {
        let wants = Path::new("/etc/systemd/system/multi-user.target.wants").join(unit);
        assert!(!wants.exists(), "{unit} was enabled by the package");
    }

    run(Command::new("dpkg").args(["-r", "soclink"]));
    assert!(!Path::new("/usr/bin/soclink").exists());
    assert!(!Path::new("/lib/systemd/system/soclink-agent.service").exists());
    // Removal keeps the operator's configuration; purge removes it.
    assert!(Path::new("/etc/soclink/agent.toml").exists());
    run(Command::new("dpkg").args(["--purge", "soclink"]));
    assert!(!Path::new("/etc/soclink/agent.toml").exists());
    // Purge never deletes spooled or stored data.
    for d in STATE_DIRS.into_iter().filter(|_| tmpfiles) {
        assert!(Path::new(d).is_dir(), "purge removed {d}");
    }
    drop(guard);
    println!(
        "package built, installed and removed in {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// The README's test command and CI
// ---------------------------------------------------------------------------------------

/// The installers whose package lists must agree. A new kind (say `npm install -g`) is
/// one more line here.
const INSTALLERS: &[(&str, &[&str])] = &[
    ("apt-get", &["apt-get", "install"]),
    ("apt", &["apt", "install"]),
    ("pip", &["pip", "install"]),
    ("pip", &["pip3", "install"]),
    ("pip", &["python3", "-m", "pip", "install"]),
    ("cargo install", &["cargo", "install"]),
];

/// Packages per installer in a shell text: the words after each `<installer> install`
/// that are not options, up to the end of that command (`&&`, `;`, `|`, a redirection,
/// a comment or the end of the line). `apt` and `apt-get` count as one installer.
fn installed_packages(text: &str) -> std::collections::BTreeMap<&'static str, BTreeSet<String>> {
    let mut out: std::collections::BTreeMap<&'static str, BTreeSet<String>> = Default::default();
    for line in text.lines() {
        let line = line.split(" #").next().unwrap_or_default();
        if line.trim_start().starts_with('#') {
            continue;
        }
        for command in line.split(['&', ';', '|']) {
            let words: Vec<&str> = command.split_whitespace().collect();
            for (kind, prefix) in INSTALLERS {
                let Some(at) = words.windows(prefix.len()).position(|w| w == *prefix) else {
                    continue;
                };
                let kind = if *kind == "apt" { "apt-get" } else { *kind };
                let set = out.entry(kind).or_default();
                for w in &words[at + prefix.len()..] {
                    if w.starts_with('>') || w.starts_with('<') || w.contains(">/") {
                        break;
                    }
                    if !w.starts_with('-') {
                        set.insert((*w).to_string());
                    }
                }
            }
        }
    }
    out
}

/// The README's test command: the fenced block holding `cargo test --release`.
fn readme_test_block() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```")
        .skip(1)
        .step_by(2)
        .filter(|b| {
            b.lines()
                .any(|l| l.trim_end().ends_with("cargo test --release"))
        })
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "the README must have exactly one test command block ending in `cargo test --release`"
    );
    blocks[0].to_string()
}

#[test]
fn package_lists_are_read_from_shell_text() {
    let got = installed_packages(
        "apt-get install -y -qq a b-c >/dev/null\n# apt-get install commented\n\
         apt-get update && apt install -y d && pip install --break-system-packages e==1 # why\n\
         cargo test --release",
    );
    let want: std::collections::BTreeMap<&str, BTreeSet<String>> = [
        ("apt-get", ["a", "b-c", "d"].map(String::from).into()),
        ("pip", ["e==1"].map(String::from).into()),
    ]
    .into();
    assert_eq!(got, want);
}

/// Regression: the README's command lacked `faketime`, which `.ci/run` installs, and
/// `tests/clock_jumps.rs` then skipped on a machine set up from the README.
#[test]
fn readme_test_command_installs_what_ci_installs() {
    let readme = readme_test_block();
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    let (from_readme, from_ci) = (installed_packages(&readme), installed_packages(&ci));
    assert!(
        from_ci
            .get("apt-get")
            .is_some_and(|p| p.contains("faketime")),
        "{from_ci:?}"
    );
    assert_eq!(
        from_readme, from_ci,
        "the README's test command and .ci/run must install the same packages (README.md \"Test\", .ci/run)"
    );
    // And run the same tests.
    let test_line = |t: &str| {
        t.lines()
            .map(str::trim)
            .filter(|l| l.contains("cargo test"))
            .map(|l| l.rsplit("&& ").next().unwrap_or(l).to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(test_line(&readme), test_line(&ci));
}
