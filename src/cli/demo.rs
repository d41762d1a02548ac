//! `soclink demo`: the full loop on loopback with nothing but this binary.
//!
//! In a directory of its own it creates development certificates, starts a relay on
//! 127.0.0.1 (a free port), starts an agent tailing a log file it writes itself with
//! realistic, varied lines, shows progress until every line is stored, prints where the
//! store files are and a few stored events, and stops both cleanly.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::config;

/// A realistic, varied syslog-style line: several programs and message templates.
pub fn sample_line(n: u64) -> String {
    const HOSTS: [&str; 4] = ["web-01", "web-02", "db-01", "fw-edge"];
    let host = HOSTS[(n % 4) as usize];
    let ip = format!("10.{}.{}.{}", (n / 65536) % 256, (n / 256) % 256, n % 256);
    let (sec, min, hour) = (n % 60, (n / 60) % 60, (n / 3600) % 24);
    let ts = format!("Nov 26 {hour:02}:{min:02}:{sec:02}");
    match n % 7 {
        0 => format!(
            "{ts} {host} sshd[{}]: Accepted publickey for admin from {ip} port {} ssh2: ED25519 SHA256:{:016x}",
            1000 + n % 30000,
            1024 + n % 64000,
            n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ),
        1 => format!(
            "{ts} {host} sshd[{}]: Failed password for invalid user test{} from {ip} port {} ssh2",
            1000 + n % 30000,
            n % 97,
            1024 + n % 64000
        ),
        2 => format!(
            "{ip} - - [26/Nov/2026:{hour:02}:{min:02}:{sec:02} +0800] \"GET /api/v1/items/{} HTTP/1.1\" {} {} \"-\" \"Mozilla/5.0 (X11; Linux x86_64)\"",
            n % 10007,
            [200, 200, 304, 404, 500][(n % 5) as usize],
            200 + n % 9000
        ),
        3 => format!(
            "{ts} {host} kernel: [{}.{:06}] UFW BLOCK IN=eth0 OUT= SRC={ip} DST=192.0.2.10 LEN={} PROTO=TCP SPT={} DPT={}",
            n / 100,
            n % 1_000_000,
            40 + n % 1400,
            1024 + n % 60000,
            [22, 80, 443, 3389, 445][(n % 5) as usize]
        ),
        4 => format!(
            "{ts} {host} CRON[{}]: (root) CMD (/usr/local/bin/backup.sh --target s3://bucket/{} )",
            2000 + n % 5000,
            n % 13
        ),
        5 => format!(
            "{ts} {host} postfix/smtpd[{}]: NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 <user{}@example.gov.tw>: Relay access denied",
            3000 + n % 4000,
            n % 500
        ),
        _ => format!(
            "{ts} {host} systemd[1]: Started session-{}.scope - Session {} of User u{}.",
            n % 100_000,
            n % 100_000,
            n % 50
        ),
    }
}

pub async fn run(dir: Option<PathBuf>, lines: u64) -> Result<()> {
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => tempfile::Builder::new()
            .prefix("soclink-demo-")
            .tempdir()?
            .keep(),
    };
    println!("soclink demo in {}", dir.display());
    let certs = dir.join("certs");
    crate::certs::write_dev_certs(&certs, "demo-agent").context("cannot create certificates")?;
    println!(
        "  1. created a throwaway CA, a relay certificate and an agent certificate (demo-agent) in {}",
        certs.display()
    );

    let relay_cfg = config::parse_relay(&format!(
        "id = \"demo-relay\"\nlisten = [\"127.0.0.1:0\"]\nstate_dir = {:?}\nstore_dir = {:?}\ncontrol_socket = {:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        path(&dir.join("relay-state")),
        path(&dir.join("store")),
        path(&dir.join("relay.sock")),
        path(&certs.join("ca.pem")),
        path(&certs.join("relay.pem")),
        path(&certs.join("relay-key.pem")),
    ))
    .map_err(|p| anyhow::anyhow!("demo relay config: {p:?}"))?;
    let listeners = crate::relay::bind(&relay_cfg).await?;
    let addr = listeners[0].local_addr()?;
    let store_dir = relay_cfg.store_dir.clone();
    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(crate::relay::run(
        relay_cfg,
        listeners,
        relay_stop.clone(),
        |_| {},
    ));
    println!(
        "  2. relay listening on {addr} (mutual TLS 1.3), storing into {}",
        store_dir.display()
    );

    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join("app.log");
    let agent_text = format!(
        "id = \"demo-agent\"\nstate_dir = {:?}\ncontrol_socket = {:?}\n\n[[source]]\nname = \"app\"\ntype = \"file\"\ninclude = [{:?}]\n\n[spool]\nbatch_max_delay = \"200ms\"\n\n[upstream]\naddress = \"{addr}\"\nserver_name = \"localhost\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        path(&dir.join("agent-state")),
        path(&dir.join("agent.sock")),
        path(&logs.join("*.log")),
        path(&certs.join("ca.pem")),
        path(&certs.join("agent.pem")),
        path(&certs.join("agent-key.pem")),
    );
    std::fs::write(dir.join("agent.toml"), &agent_text)?;
    let agent_cfg = config::parse_agent(&agent_text)
        .map_err(|p| anyhow::anyhow!("demo agent config: {p:?}"))?;
    let agent = Agent::open(agent_cfg)?;
    let agent_stop = CancellationToken::new();
    let agent_task = tokio::spawn(agent.run(agent_stop.clone()));
    println!(
        "  3. agent tailing {} and shipping to {addr} (config: {})",
        path(&logs.join("*.log")),
        dir.join("agent.toml").display()
    );

    // Write the sample log in bursts, as a busy service would.
    let writer = {
        let log = log.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let mut n = 0;
            while n < lines {
                let mut buf = String::new();
                for _ in 0..(lines - n).min(2000) {
                    buf.push_str(&sample_line(n));
                    buf.push('\n');
                    n += 1;
                }
                f.write_all(buf.as_bytes())?;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
    };
    println!("  4. writing {lines} sample log lines...");
    let started = Instant::now();
    let store_file = store_dir.join("demo-agent").join("app").join(format!(
        "{}.ndjson.gz",
        crate::util::day_of(&crate::util::now_rfc3339())
    ));
    let mut stored = 0;
    let mut last_print = Instant::now();
    while stored < lines {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stored = count_lines(&store_file);
        if last_print.elapsed() >= Duration::from_millis(750) || stored >= lines {
            println!(
                "     {:>6.1}s  stored {stored:>7} / {lines} lines",
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the demo did not store every line within 2 minutes (stored {stored} of {lines})"
            );
        }
    }
    writer.await??;
    println!(
        "  5. every line arrived exactly once, in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // A level 3 incident drill: record, evidence bundle, priority lane, verification.
    let store = crate::incident::record::IncidentStore::open(&dir.join("agent-state"))?;
    let mut req = crate::incident::record::DeclareRequest::new(
        3,
        "demo drill: suspicious logins on web-01".to_string(),
    );
    req.drill = true;
    let inc = store.declare(req, "demo-agent", "demo-host")?;
    println!(
        "  6. declared incident {} (level 3, DRILL), {}",
        inc.id,
        inc.deadline_text(crate::clock::now())
    );
    println!("     the agent builds the evidence bundle and ships it ahead of routine logs...");
    let idir = store_dir.join("demo-agent").join("incidents").join(&inc.id);
    let t = Instant::now();
    loop {
        let acked = std::fs::read(idir.join("record.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| {
                v["timeline"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|e| e["event"] == "acknowledged"))
            });
        if acked {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the incident was not acknowledged within a minute");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bundle = idir.join("bundle.tar.gz");
    let report = crate::incident::verify::verify_bundle(&bundle)
        .map_err(|e| anyhow::anyhow!("the stored bundle does not verify: {e}"))?;
    println!(
        "  7. the relay verified and stored the bundle ({} members, {} bytes) in {:.1}s",
        report.members,
        std::fs::metadata(&bundle).map(|m| m.len()).unwrap_or(0),
        t.elapsed().as_secs_f64()
    );
    agent_stop.cancel();
    agent_task.await??;
    relay_stop.cancel();
    relay.await??;

    let gz = std::fs::metadata(&store_file).map(|m| m.len()).unwrap_or(0);
    let raw = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    println!(
        "\nStored: {} ({gz} bytes of gzip for {raw} bytes of log)",
        store_file.display()
    );
    println!("Read it with:  zcat {} | head", store_file.display());
    println!(
        "Incident:      {} (record.json, bundle.tar.gz, manifest.json)",
        idir.display()
    );
    println!("First stored events:");
    let f = std::fs::File::open(&store_file)?;
    let rd = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(f));
    for l in rd.lines().take(3) {
        println!("  {}", l?);
    }
    println!(
        "\nThe demo's files stay in {} (remove with: rm -r {}).",
        dir.display(),
        dir.display()
    );
    Ok(())
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn count_lines(store_file: &Path) -> u64 {
    let Ok(f) = std::fs::File::open(store_file) else {
        return 0;
    };
    let mut rd = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(f));
    let mut n = 0;
    let mut buf = Vec::new();
    while let Ok(k) = rd.read_until(b'\n', &mut buf) {
        if k == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            n += 1;
        }
        buf.clear();
    }
    n
}
