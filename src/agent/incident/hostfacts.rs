//! Host facts for an evidence bundle: small text snapshots of who and what the host is
//! (name, OS, kernel, boot time, clock sync, addresses, sockets, processes).
//!
//! Invariant: gathering never fails and never blocks for long: each fact is bounded in
//! size ([`MAX_FACT_BYTES`]), each external command in time ([`COMMAND_TIMEOUT`]); a
//! fact that cannot be had is returned as an error string for the manifest.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Largest single fact kept.
pub const MAX_FACT_BYTES: u64 = 4 << 20;
/// Longest an external command (ip, ss, timedatectl) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most processes listed.
const MAX_PROCESSES: usize = 20_000;

/// One fact: its member name under `host/` and its text, or why it is missing.
#[derive(Debug)]
pub struct HostFact {
    pub name: &'static str,
    pub content: Result<Vec<u8>, String>,
}

/// Every fact, in a fixed order.
pub fn gather() -> Vec<HostFact> {
    vec![
        fact("hostname.txt", hostname()),
        fact("os-release.txt", read_bounded(Path::new("/etc/os-release"))),
        fact("kernel.txt", kernel()),
        fact("boot-time.txt", boot_time()),
        fact("clock-sync.txt", clock_sync()),
        fact(
            "if_inet6.txt",
            read_bounded(Path::new("/proc/net/if_inet6")),
        ),
        fact("ip-addr.txt", run_bounded("ip", &["-o", "addr"])),
        fact("sockets-proc.txt", proc_sockets()),
        fact("ss-tulpn.txt", run_bounded("ss", &["-tulpn"])),
        fact("processes.txt", processes()),
    ]
}

fn fact(name: &'static str, content: Result<Vec<u8>, String>) -> HostFact {
    HostFact { name, content }
}

/// Read at most [`MAX_FACT_BYTES`] of a file.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_FACT_BYTES).read_to_end(&mut buf))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(buf)
}

fn read_small(path: &str) -> Result<String, String> {
    read_bounded(Path::new(path)).map(|b| String::from_utf8_lossy(&b).trim().to_string())
}

fn hostname() -> Result<Vec<u8>, String> {
    let h = hostname::get().map_err(|e| e.to_string())?;
    let mut v = h.to_string_lossy().into_owned().into_bytes();
    v.push(b'\n');
    Ok(v)
}

fn kernel() -> Result<Vec<u8>, String> {
    let mut s = String::new();
    for (k, p) in [
        ("ostype", "/proc/sys/kernel/ostype"),
        ("osrelease", "/proc/sys/kernel/osrelease"),
        ("version", "/proc/sys/kernel/version"),
    ] {
        let v = read_small(p).unwrap_or_else(|e| format!("unavailable: {e}"));
        let _ = writeln!(s, "{k}={v}");
    }
    Ok(s.into_bytes())
}

fn boot_time() -> Result<Vec<u8>, String> {
    let stat = read_small("/proc/stat")?;
    let btime = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or("/proc/stat has no btime line")?;
    let t = std::time::UNIX_EPOCH + Duration::from_secs(btime);
    Ok(format!(
        "btime={btime}\nboot_time={}\n",
        crate::incident::record::format_time(t)
    )
    .into_bytes())
}

fn clock_sync() -> Result<Vec<u8>, String> {
    match run_bounded("timedatectl", &["show"]) {
        Ok(out) => Ok(out),
        Err(e) => {
            let synced = Path::new("/run/systemd/timesync/synchronized").exists();
            Ok(
                format!("timedatectl: {e}\n/run/systemd/timesync/synchronized exists: {synced}\n")
                    .into_bytes(),
            )
        }
    }
}

fn proc_sockets() -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for p in [
        "/proc/net/tcp",
        "/proc/net/tcp6",
        "/proc/net/udp",
        "/proc/net/udp6",
    ] {
        out.extend_from_slice(format!("== {p}\n").as_bytes());
        match read_bounded(Path::new(p)) {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => out.extend_from_slice(format!("unavailable: {e}\n").as_bytes()),
        }
        if out.len() as u64 > MAX_FACT_BYTES {
            out.truncate(usize::try_from(MAX_FACT_BYTES).unwrap_or(usize::MAX));
            break;
        }
    }
    Ok(out)
}

/// `pid uid name cmdline`, one line per process.
fn processes() -> Result<Vec<u8>, String> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .map_err(|e| format!("/proc: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut out = String::new();
    // An analyst must know when the list cannot be whole (systemd's ProtectProc=).
    if let Some(note) = fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| proc_hidden(&m))
    {
        let _ = writeln!(out, "# PARTIAL: {note}");
    }
    out.push_str("PID\tUID\tNAME\tCMDLINE\n");
    for pid in pids.into_iter().take(MAX_PROCESSES) {
        // A process may exit between listing and reading: skip it quietly.
        let Ok(status) = read_small(&format!("/proc/{pid}/status")) else {
            continue;
        };
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let mut cmd = Vec::new();
        if let Ok(f) = File::open(format!("/proc/{pid}/cmdline")) {
            let _ = f.take(4096).read_to_end(&mut cmd);
        }
        let cmd: String = String::from_utf8_lossy(&cmd)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let _ = writeln!(out, "{pid}\t{uid}\t{name}\t{}", cmd.trim_end());
        if out.len() as u64 > MAX_FACT_BYTES {
            out.push_str("... truncated\n");
            break;
        }
    }
    Ok(out.into_bytes())
}

/// Why `/proc` (as mounted for this process, from `/proc/self/mountinfo`) may hide
/// other processes: its `hidepid=` option, which systemd's `ProtectProc=invisible` (or
/// `noaccess`, `ptraceable`) sets. `None` when every process is visible.
pub fn proc_hidden(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        // `id parent major:minor root mountpoint opts [optional...] - fstype source super`
        let (left, right) = l.split_once(" - ")?;
        if left.split(' ').nth(4)? != "/proc" {
            return None;
        }
        let mut r = right.split(' ');
        if r.next()? != "proc" {
            return None;
        }
        let sup = r.nth(1)?;
        let hide = sup
            .split(',')
            .find_map(|o| o.strip_prefix("hidepid="))
            .filter(|v| !matches!(*v, "0" | "off"))?;
        Some(format!(
            "/proc is mounted with hidepid={hide} (systemd ProtectProc=): processes of other users that this service ({}) may not trace are not listed",
            if nix::unistd::geteuid().is_root() {
                "running as root, so few if any are hidden"
            } else {
                "not running as root"
            }
        ))
    })
}

/// Run a command for its stdout, bounded in time and size; not found, failed or timed
/// out is an error string.
pub fn run_bounded(program: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{program}: no stdout"));
    };
    // Read on a thread so a command that never finishes cannot hold us past the timeout.
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = stdout.take(MAX_FACT_BYTES).read_to_end(&mut buf);
        r.map(|_| buf)
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if start.elapsed() > COMMAND_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("{program}: timed out after {COMMAND_TIMEOUT:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("{program}: {e}")),
        }
    };
    let status = status?;
    let out = reader
        .join()
        .map_err(|_| format!("{program}: reader failed"))?
        .map_err(|e| format!("{program}: {e}"))?;
    if !status.success() {
        return Err(format!("{program} {}: {status}", args.join(" ")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidepid_is_noticed() {
        let plain = "22 27 0:20 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw\n";
        assert_eq!(proc_hidden(plain), None);
        let hidden = "22 27 0:20 / /sys rw shared:7 - sysfs sysfs rw\n\
                      1204 1187 0:20 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw,hidepid=invisible,subset=pid\n";
        assert!(proc_hidden(hidden).unwrap().contains("hidepid=invisible"));
    }
}
