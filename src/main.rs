//! The `soclink` command line: parse arguments, set up logging, call the library.
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use soclink::config;

#[derive(Parser)]
#[command(
    name = "soclink",
    version,
    about = "Log collection agent and SOC relay: tails logs, spools them durably, ships them over mutual TLS, stores them exactly once.",
    long_about = "soclink collects system and device logs on agency hosts (agent) and receives them at a SOC or the national technical service center (relay).\n\nStart here:\n  soclink demo                          the whole loop on loopback, in a temporary directory\n  soclink check-config -c agent.toml    validate a config and say what it will collect\n  soclink agent -c /etc/soclink/agent.toml\n  soclink relay -c /etc/soclink/relay.toml"
)]
struct Cli {
    /// Format of soclink's own log messages (on stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: tail the configured sources into the spool and ship it upstream.
    Agent {
        /// Agent configuration file.
        #[arg(short, long, default_value = "/etc/soclink/agent.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file (agent or relay), listing every problem with its
    /// line and column; on success print what it will do.
    CheckConfig {
        #[arg(short, long)]
        config: PathBuf,
        /// Which kind of file it is (default: guessed from its keys).
        #[arg(long, value_enum)]
        kind: Option<Kind>,
    },
    /// Run the relay: accept agents over mutual TLS and store (or forward) what they send.
    Relay {
        /// Relay configuration file.
        #[arg(short, long, default_value = "/etc/soclink/relay.toml")]
        config: PathBuf,
    },
    /// Declare, list, show and close security incidents (the guideline's 1-hour report;
    /// levels 3 and 4 also build and ship an evidence bundle).
    Incident(soclink::cli::incident::IncidentArgs),
    /// Evidence bundles: `soclink bundle verify FILE`.
    Bundle(soclink::cli::incident::BundleArgs),
    /// Certificates for trying soclink out.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Show the whole loop on loopback: certificates, a relay, an agent tailing
    /// generated logs, and the stored result. Needs nothing but this binary.
    Demo {
        /// Where to put the demo's files (default: a new temporary directory, kept).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// How many sample log lines to generate.
        #[arg(long, default_value_t = 20_000)]
        lines: u64,
    },
    /// Measure the compression alone, as the agent does it (1 MiB batches, one gzip
    /// member each), for the benchmark's baseline.
    BenchCompress {
        file: PathBuf,
        #[arg(long, default_value_t = 6)]
        level: u32,
        #[arg(long, default_value_t = 1 << 20)]
        batch_bytes: usize,
    },
    /// Benchmark the relay under many concurrent agents: for each count, a fresh relay
    /// process, N client certificates, N spools of already-compressed batches shipped by
    /// N shippers in this process at once. Prints one JSON line per count.
    BenchFanin {
        /// Comma-separated agent counts.
        #[arg(long, default_value = "1,10,50,200")]
        agents: String,
        /// Total uncompressed volume per count, in MB, split evenly across the agents.
        #[arg(long, default_value_t = 512)]
        total_mb: u64,
        /// Lines per batch.
        #[arg(long, default_value_t = 2000)]
        batch_lines: usize,
        /// Where the relays' stores and the spools go (default: a temporary directory).
        #[arg(long)]
        work: Option<PathBuf>,
    },
    /// Show what a running agent (or relay) is doing: sources, spool, upstream link;
    /// for a relay its connected agents. Exit 1 if it is not running.
    Status {
        /// The control socket (default: the config's `control_socket`, else the agent's).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Agent or relay configuration file to read `control_socket` from.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the status as JSON (stable field names) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the agent's on-disk spool.
    Spool {
        #[command(subcommand)]
        cmd: SpoolCmd,
    },
    /// Periodic SOC intelligence uploads to the center (`[intel]` in the agent's config).
    /// The agent uploads one item per period by itself; `soclink status` shows the last
    /// period delivered and the next one due.
    Intel {
        #[command(subcommand)]
        cmd: IntelCmd,
    },
}

#[derive(Subcommand)]
enum IntelCmd {
    /// Upload the open period so far now, marked partial (for drills and checks). It is
    /// a preview: the period's full item still follows when the period ends, with all of
    /// its records. Asks the running agent through its control socket.
    RunNow {
        /// Agent configuration file to read `control_socket` from.
        #[arg(short, long, default_value = "/etc/soclink/agent.toml")]
        config: PathBuf,
        /// The control socket (overrides the config's).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the queued item as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Kind {
    Agent,
    Relay,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write a throwaway CA, a relay certificate (localhost, 127.0.0.1, ::1) and an agent
    /// certificate into DIR. For trying things out only: use your center's CA in
    /// production.
    Dev {
        #[arg(long)]
        out: PathBuf,
        /// Common Name of the agent certificate (its identity at the relay).
        #[arg(long, default_value = "demo-agent")]
        agent_name: String,
    },
}

#[derive(Subcommand)]
enum SpoolCmd {
    /// Print the spooled, not yet acknowledged events as NDJSON. Read-only: safe while
    /// the agent runs.
    Dump {
        /// The agent's state_dir (the spool is in its `spool/` folder).
        #[arg(long)]
        state_dir: PathBuf,
        /// Print one line per batch (sequence and metadata) instead of the events.
        #[arg(long)]
        batches: bool,
        /// Include batches already acknowledged but not yet deleted.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let malloc_note = if matches!(cli.cmd, Cmd::Agent { .. }) {
        reexec_with_malloc_tunables()
    } else {
        None
    };
    // The demo narrates on stdout; its components' own logs would drown it.
    let default_level = if matches!(cli.cmd, Cmd::Demo { .. } | Cmd::BenchFanin { .. }) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    if let Some(note) = malloc_note {
        tracing::warn!("{note}");
    }
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("soclink: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The glibc malloc setting the agent runs with; see [`reexec_with_malloc_tunables`].
const MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=131072:glibc.malloc.arena_max=2";

/// glibc raises its mmap threshold the first time a large block is freed (up to 32 MiB):
/// from then on every 1 MiB batch buffer comes from a per-thread arena, and each arena
/// keeps what was freed in it. Measured on the benchmark: an 18 MiB heap peak held 60 MiB
/// RSS, about 5 MiB in each of ten arenas. A fixed threshold keeps blocks of 128 KiB and
/// more in their own mappings, returned to the kernel when freed, at the cost of a page
/// fault per 4 KiB of each new buffer (see bench/README.md). Two arenas (one per core)
/// instead of one per thread, up to 16: in the 60-minute soak each blocking thread the
/// runtime added under a catch-up brought its own arena, +1 MiB of heap that stayed after
/// the burst; with two, the heap stays flat. glibc reads the settings only
/// at start-up and `mallopt` is out of reach without `unsafe`, so the agent re-executes
/// itself once (same pid, same arguments) with `GLIBC_TUNABLES` extended. An operator's
/// own `glibc.malloc.mmap_threshold` is left alone, and so is a non-glibc build.
/// Returns why it could not, for the log; on success it does not return.
fn reexec_with_malloc_tunables() -> Option<String> {
    use std::os::unix::process::CommandExt;
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return None;
    }
    let current = match std::env::var("GLIBC_TUNABLES") {
        Ok(v) if v.contains("glibc.malloc.mmap_threshold") => return None,
        Ok(v) if !v.is_empty() => format!("{v}:{MALLOC_TUNABLES}"),
        Ok(_) | Err(std::env::VarError::NotPresent) => MALLOC_TUNABLES.to_string(),
        Err(std::env::VarError::NotUnicode(_)) => return None,
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    let err = cmd.args(args).env("GLIBC_TUNABLES", current).exec();
    Some(format!(
        "cannot re-execute /proc/self/exe with GLIBC_TUNABLES={MALLOC_TUNABLES} ({err}); running with glibc's default malloc settings, which may hold more memory after bursts"
    ))
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SOCLINK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        // Compression, spool and store I/O run on the blocking pool; a few threads keep
        // both cores busy, and every extra thread would get its own malloc arena.
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Agent { config } => {
            let cfg = match config::load_agent(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let rt = runtime()?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                soclink::agent::reload::run_agent(&config, cfg, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Relay { config } => {
            let cfg = match config::load_relay(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let rt = runtime()?;
            rt.block_on(async {
                let listeners = soclink::relay::bind(&cfg).await?;
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                soclink::relay::run(cfg, listeners, shutdown.clone(), |h| {
                    spawn_relay_reload(h.tls.clone(), shutdown.clone())
                })
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Certs {
            cmd: CertsCmd::Dev { out, agent_name },
        } => {
            let c = soclink::certs::write_dev_certs(&out, &agent_name)?;
            eprintln!(
                "WARNING: these certificates are for trying soclink out only. In production, use certificates issued by your center's CA."
            );
            println!(
                "CA certificate:     {}  (give it to relays and agents as `ca`)",
                c.ca.display()
            );
            println!(
                "CA key:             {}  (keep it secret; only for issuing more)",
                c.ca_key.display()
            );
            println!(
                "relay certificate:  {}  key {}",
                c.relay.display(),
                c.relay_key.display()
            );
            println!(
                "agent certificate:  {}  key {}  (identity {agent_name:?})",
                c.agent.display(),
                c.agent_key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { dir, lines } => {
            let rt = runtime()?;
            rt.block_on(soclink::cli::demo::run(dir, lines))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status {
            socket,
            config,
            json,
        } => Ok(soclink::ops::status::cli(socket, config, json)),
        Cmd::CheckConfig { config, kind } => check_config(&config, kind),
        Cmd::Intel {
            cmd:
                IntelCmd::RunNow {
                    config,
                    socket,
                    json,
                },
        } => Ok(soclink::intel::run_now_cli(&config, socket, json)),
        Cmd::Incident(args) => {
            let cfg = config::load_agent(&args.config).ok();
            let settings = cfg.as_ref().map(|c| c.incident.clone()).unwrap_or_default();
            // Ask the running agent whether its upstream link is down, so the output can
            // say plainly that the incident is not delivered yet.
            let (running, down_since) = match &cfg {
                Some(c) => agent_link(&c.control_socket),
                None => (false, None),
            };
            if cfg.is_some() && !running {
                eprintln!(
                    "note: the soclink agent is not running (no answer on its control socket): the incident is recorded on this host and is shipped when the agent starts. Report by other means now if it must reach the center within the hour."
                );
            }
            let link = soclink::incident::record::LinkStatus {
                upstream_down_since: down_since,
                center_contact: settings.center_contact.clone(),
            };
            soclink::cli::incident::run_incident(&args, &settings, &link)
        }
        Cmd::Bundle(args) => soclink::cli::incident::run_bundle(&args),
        Cmd::BenchCompress {
            file,
            level,
            batch_bytes,
        } => bench_compress(&file, level, batch_bytes),
        Cmd::BenchFanin {
            agents,
            total_mb,
            batch_lines,
            work,
        } => {
            let tmp = tempfile::tempdir()?;
            let work = work.unwrap_or_else(|| tmp.path().to_path_buf());
            let counts: Vec<usize> = agents
                .split(',')
                .map(|a| a.trim().parse())
                .collect::<Result<_, _>>()
                .context("--agents must be a comma-separated list of numbers")?;
            let rt = runtime()?;
            rt.block_on(async {
                for n in counts {
                    let row =
                        soclink::cli::bench::run_one(&work, n, total_mb * 1_000_000, batch_lines)
                            .await?;
                    println!("{}", serde_json::to_string(&row)?);
                }
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Spool {
            cmd:
                SpoolCmd::Dump {
                    state_dir,
                    batches,
                    all,
                },
        } => spool_dump(&state_dir, batches, all),
    }
}

fn check_config(path: &std::path::Path, kind: Option<Kind>) -> Result<ExitCode> {
    let kind = kind.unwrap_or_else(|| guess_kind(path));
    let result = match kind {
        Kind::Agent => config::load_agent(path).map(|c| c.summary()),
        Kind::Relay => config::load_relay(path).map(|c| c.summary()),
    };
    match result {
        Ok(summary) => {
            println!("{}: OK", path.display());
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{}: {} problem{} found",
                path.display(),
                e.problems.len(),
                if e.problems.len() == 1 { "" } else { "s" }
            );
            Ok(ExitCode::from(2))
        }
    }
}

/// A relay config has `store_dir`, `listen` or a top-level `ca`; an agent's has sources.
fn guess_kind(path: &std::path::Path) -> Kind {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Kind::Agent;
    };
    match text.parse::<toml::Table>() {
        Ok(t)
            if !t.contains_key("source")
                && (t.contains_key("store_dir")
                    || t.contains_key("listen")
                    || t.contains_key("ca")) =>
        {
            Kind::Relay
        }
        _ => Kind::Agent,
    }
}

fn spool_dump(state_dir: &std::path::Path, batches: bool, all: bool) -> Result<ExitCode> {
    let dir = state_dir.join("spool");
    let from = if all {
        0
    } else {
        soclink::spool::peek::acked(&dir) + 1
    };
    let records = soclink::spool::peek::records(&dir, from)
        .with_context(|| format!("cannot read the spool in {}", dir.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for rec in &records {
        if batches {
            out.write_all(format!("{{\"seq\":{},\"meta\":", rec.seq).as_bytes())?;
            out.write_all(&rec.meta)?;
            out.write_all(format!(",\"gzip_bytes\":{}}}\n", rec.payload.len()).as_bytes())?;
        } else {
            let mut dec = flate2::read::GzDecoder::new(&rec.payload[..]);
            std::io::copy(&mut dec, &mut out)
                .with_context(|| format!("batch {} does not inflate", rec.seq))?;
        }
    }
    out.flush()?;
    eprintln!("{} batches", records.len());
    Ok(ExitCode::SUCCESS)
}

fn bench_compress(file: &std::path::Path, level: u32, batch_bytes: usize) -> Result<ExitCode> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut buf = vec![0u8; batch_bytes.max(1)];
    let (mut raw, mut gz) = (0u64, 0u64);
    let t = std::time::Instant::now();
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = f.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        raw += n as u64;
        gz += soclink::agent::compress(&buf[..n], level).len() as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"level\":{level},\"raw_bytes\":{raw},\"gzip_bytes\":{gz},\"seconds\":{secs:.3},\"mb_per_s\":{:.1}}}",
        raw as f64 / secs / 1e6
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether the agent answers on its control socket, and since when its upstream link
/// is down (None: up, unknown, or no upstream).
fn agent_link(socket: &std::path::Path) -> (bool, Option<std::time::SystemTime>) {
    let req = serde_json::json!({"cmd": "status"});
    match soclink::ops::control::request_blocking(socket, &req) {
        Ok(v) => {
            let down = serde_json::from_value::<soclink::ops::status::Status>(v)
                .ok()
                .and_then(|s| match s {
                    soclink::ops::status::Status::Agent(a) => a.upstream.and_then(|u| u.down_since),
                    _ => None,
                });
            (true, down)
        }
        Err(_) => (false, None),
    }
}

/// SIGTERM and SIGINT both mean: stop gracefully.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
}

/// SIGHUP on the relay: reload its certificate, key and CA.
fn spawn_relay_reload(
    tls: std::sync::Arc<soclink::tls::ReloadableServerConfig>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered now, before READY=1, so an early SIGHUP cannot kill the relay.
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    soclink::ops::service::reloading(); // service: RELOADING=1 .. READY=1
                    match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                        Err(e) => tracing::error!("SIGHUP: keeping the old certificates: {e}"),
                    }
                    soclink::ops::service::ready();
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
}
