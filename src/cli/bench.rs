//! `soclink bench-fanin`: the relay under many concurrent agents (the scaling table of
//! the benchmark).
//!
//! For each agent count N it starts a fresh `soclink relay` process, issues N client
//! certificates from a throwaway CA, fills N spools with already-compressed batches
//! (a fixed total volume split evenly), then starts N real [`Shipper`]s in this
//! process at once and stops the clock when the relay has acknowledged every batch.
//! It reports throughput, the relay's CPU seconds per GB and its peak RSS. Loopback
//! only; the senders share the machine with the relay, as in the end-to-end benchmark.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::batch::BatchMeta;
use crate::certs::{Ca, CertKind, IssueParams};
use crate::config::UpstreamConfig;
use crate::ship::Shipper;
use crate::spool::{Spool, SpoolOptions};

/// One row of the table.
#[derive(Debug, serde::Serialize)]
pub struct Row {
    pub agents: usize,
    pub batches: u64,
    pub raw_bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub relay_cpu_s_per_gb: f64,
    pub relay_peak_rss_mib: f64,
}

/// Lines of one batch: varied, like real logs, each a JSON event.
fn batch(lines: usize, salt: usize) -> (Vec<u8>, u32) {
    let mut raw = Vec::with_capacity(lines * 180);
    for n in 0..lines {
        let k = n + salt * lines;
        raw.extend_from_slice(
            format!(
                "{{\"ts\":\"2026-11-26T01:02:03.{:09}Z\",\"host\":\"web-{:02}\",\"source\":\"app\",\"message\":\"sshd[{}]: Failed password for user{} from 10.{}.{}.{} port {} ssh2\"}}\n",
                k % 1_000_000_000,
                k % 37,
                1000 + k % 7919,
                k % 503,
                k % 256,
                (k / 256) % 256,
                (k * 7) % 256,
                1024 + k % 60000
            )
            .as_bytes(),
        );
    }
    (raw, lines as u32)
}

fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = s.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports in USER_HZ, 100 on every mainstream architecture.
    ticks / 100.0
}

fn proc_hwm_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

struct RelayChild(Child);

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Run one agent count: `total_raw` bytes in batches of `batch_lines` lines.
pub async fn run_one(
    work: &Path,
    agents: usize,
    total_raw: u64,
    batch_lines: usize,
) -> Result<Row> {
    let dir = work.join(format!("fanin-{agents}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ca = Ca::new("fan-in bench CA")?;
    let write = |name: &str, s: &str| -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, s)?;
        // soclink refuses keys others can read; certificates need no more either.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        Ok(p)
    };
    let ca_pem = write("ca.pem", &ca.cert_pem)?;
    let relay = ca.issue(&IssueParams::new(
        "localhost",
        &["localhost", "127.0.0.1"],
        CertKind::Server,
    ))?;
    let relay_cert = write("relay.pem", &relay.cert_pem)?;
    let relay_key = write("relay-key.pem", &relay.key_pem)?;
    let port = free_port()?;
    let cfg = format!(
        "id = \"fanin-relay\"\nlisten = [\"127.0.0.1:{port}\"]\nstate_dir = {:?}\nstore_dir = {:?}\ncontrol_socket = {:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        dir.join("relay-state"),
        dir.join("store"),
        dir.join("relay.sock"),
        ca_pem,
        relay_cert,
        relay_key
    );
    let relay_cfg = write("relay.toml", &cfg)?;
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["relay", "-c"])
        .arg(&relay_cfg)
        .env("SOCLINK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("relay.log"))?)
        .spawn()
        .context("cannot start the relay")?;
    let relay_child = RelayChild(child);
    let pid = relay_child.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the relay did not start; see {}",
                dir.join("relay.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Spools filled before the clock starts: the relay receives as fast as it can take.
    let (raw, events) = batch(batch_lines, 0);
    let gz = crate::agent::compress(&raw, 1);
    let per_agent = (total_raw / raw.len() as u64 / agents as u64).max(1);
    let day = crate::util::day_of(&crate::util::now_rfc3339()).to_string();
    let meta = serde_json::to_vec(&BatchMeta {
        source: "app".into(),
        day,
        events,
        raw_bytes: raw.len() as u64,
        origin: None,
        item: None,
        cursor: None,
    })?;
    let mut shippers = Vec::new();
    for i in 0..agents {
        let name = format!("fanin-{i:03}");
        let cert = ca.issue(&IssueParams::new(&name, &[], CertKind::Client))?;
        let cert_p = write(&format!("{name}.pem"), &cert.cert_pem)?;
        let key_p = write(&format!("{name}-key.pem"), &cert.key_pem)?;
        let (spool, _) = Spool::open(
            &dir.join("agents").join(&name),
            SpoolOptions {
                max_size: 64 << 30,
                ..SpoolOptions::default()
            },
        )?;
        for _ in 0..per_agent {
            spool.append(&meta, &gz)?;
        }
        spool.commit()?;
        let up = UpstreamConfig {
            address: format!("127.0.0.1:{port}"),
            server_name: "localhost".into(),
            ca: ca_pem.clone(),
            cert: cert_p,
            key: key_p,
            proxy: None,
        };
        shippers.push((Shipper::new(up, spool.clone(), "logs")?, spool));
    }
    let cpu0 = proc_cpu_secs(pid);
    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let mut spools = Vec::new();
    let mut tasks = Vec::new();
    for (s, spool) in shippers {
        spools.push(spool);
        tasks.push(tokio::spawn(s.run(stop.clone())));
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    while spools.iter().any(|s| s.acked() < per_agent) {
        if Instant::now() > deadline {
            bail!("the relay did not acknowledge everything within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu_secs(pid) - cpu0;
    let hwm = proc_hwm_mib(pid);
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    drop(relay_child);
    let batches = per_agent * agents as u64;
    let raw_total = batches * raw.len() as u64;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Row {
        agents,
        batches,
        raw_bytes: raw_total,
        seconds,
        mb_per_s: raw_total as f64 / seconds / 1e6,
        relay_cpu_s_per_gb: cpu / (raw_total as f64 / 1e9),
        relay_peak_rss_mib: hwm,
    })
}
