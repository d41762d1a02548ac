//! Command-line arguments and entry points for `soclink incident ...` and
//! `soclink bundle verify`, so main.rs only wires them:
//!
//! ```text
//! Cmd::Incident(a) => soclink::cli::incident::run_incident(&a, &settings, &link),
//! Cmd::Bundle(a) => soclink::cli::incident::run_bundle(&a),
//! ```
//!
//! Exit codes follow main.rs: 0 success, 1 failure (including a bundle that does not
//! verify), 2 invalid configuration or usage.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::agent::incident::bundle::{BundleInputs, build_bundle};
use crate::incident::record::{
    DeclareRequest, IncidentError, IncidentStore, LinkStatus, format_time, parse_time,
    read_details, render_list, render_show,
};
use crate::incident::verify::verify_bundle;
use crate::incident::{IncidentSettings, needs_bundle};

/// `soclink incident`.
#[derive(Debug, Args)]
pub struct IncidentArgs {
    /// Agent configuration file (for its state_dir, identity and sources).
    #[arg(short, long, global = true, default_value = "/etc/soclink/agent.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub cmd: IncidentCmd,
}

#[derive(Debug, Subcommand)]
pub enum IncidentCmd {
    /// Record a security incident (guideline 3.1(二): report within 1 hour of
    /// discovery). Levels in auto_bundle_levels (default 3 and 4) also build an
    /// evidence bundle of the logs around it.
    Declare(DeclareArgs),
    /// List incidents with their 1-hour deadline and delivery status.
    List,
    /// Show one incident: record, bundle and timeline.
    Show {
        /// Incident id, e.g. INC-20261126-0001-a3f9.
        id: String,
    },
    /// Close an incident with its closing report (guideline 4.1(三)4).
    Close(CloseArgs),
}

#[derive(Debug, Args)]
pub struct DeclareArgs {
    /// Impact level, 1 (least) to 4 (most severe).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub level: u8,
    /// One-line summary.
    #[arg(long)]
    pub summary: String,
    /// When the incident was discovered, RFC 3339 (e.g. 2026-11-26T09:30:00+08:00);
    /// default now. The deadline is one hour after it.
    #[arg(long)]
    pub discovered_at: Option<String>,
    /// A text file with the details (at most 64 KiB).
    #[arg(long)]
    pub details: Option<PathBuf>,
    /// Ask the center for support.
    #[arg(long)]
    pub support_requested: bool,
    /// Other agencies are affected.
    #[arg(long)]
    pub affects_other_agencies: bool,
    /// Critical infrastructure is affected.
    #[arg(long)]
    pub affects_critical_infrastructure: bool,
    /// A reporting drill (guideline 5.2): marked as a drill everywhere.
    #[arg(long)]
    pub drill: bool,
    /// Do not build an evidence bundle even for level 3 or 4.
    #[arg(long)]
    pub no_bundle: bool,
}

#[derive(Debug, Args)]
pub struct CloseArgs {
    pub id: String,
    /// The closing report (history, damage, impact, measures).
    #[arg(long)]
    pub report: PathBuf,
    /// When service was recovered, RFC 3339; default now.
    #[arg(long)]
    pub recovered_at: Option<String>,
}

/// `soclink bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    pub cmd: BundleCmd,
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Check an evidence bundle: safe archive, manifest last, every member's size and
    /// SHA-256 as the manifest says. Needs nothing but the file.
    Verify { file: PathBuf },
}

fn usage(e: IncidentError) -> Result<ExitCode> {
    eprintln!("error: {e}");
    Ok(ExitCode::from(2))
}

/// Run `soclink incident ...`. `settings` come from the agent configuration; `link`
/// says whether the upstream is down (from the running agent, when known).
pub fn run_incident(
    args: &IncidentArgs,
    settings: &IncidentSettings,
    link: &LinkStatus,
) -> Result<ExitCode> {
    let cfg = match crate::config::load_agent(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    // Opened only where needed: an operator declaring through the agent's socket need
    // not be able to read the agent's state directory.
    let open_store = || IncidentStore::open(&cfg.state_dir);
    let now = crate::clock::now();
    let mut out = std::io::stdout().lock();
    match &args.cmd {
        IncidentCmd::List => {
            let store = open_store()?;
            write!(out, "{}", render_list(&store.list()?, now, link))?;
        }
        IncidentCmd::Show { id } => match open_store()?.get(id) {
            Ok(inc) => write!(out, "{}", render_show(&inc, now, link))?,
            Err(e @ (IncidentError::NotFound(_) | IncidentError::BadId(_))) => return usage(e),
            Err(e) => return Err(e.into()),
        },
        IncidentCmd::Declare(d) => {
            // Through the running agent when there is one: it records the incident as
            // its own user, with the caller's name, and ships it at once. Only when no
            // agent runs at all is it recorded here, and shipped when the agent starts:
            // a slow, busy or refusing agent is an error, never a silent local record.
            match declare_via_agent(&cfg.control_socket, d) {
                Ok(Some(inc)) => {
                    writeln!(
                        out,
                        "declared {}{} (level {}), {}",
                        inc.id,
                        if inc.drill { " [DRILL]" } else { "" },
                        inc.level,
                        inc.deadline_text(now)
                    )?;
                    if needs_bundle(inc.level, &settings.auto_bundle_levels) && !d.no_bundle {
                        writeln!(
                            out,
                            "the agent is building the evidence bundle and ships it ahead of routine logs; follow it with `soclink incident show {}`",
                            inc.id
                        )?;
                    }
                    if let Some(since) = link.upstream_down_since {
                        writeln!(
                            out,
                            "UPSTREAM DOWN since {}: the incident is recorded on disk and NOT yet delivered; report by other means now{}",
                            format_time(since),
                            link.center_contact
                                .as_deref()
                                .map(|c| format!(": {c}"))
                                .unwrap_or_default()
                        )?;
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                Ok(None) => {}
                Err(DeclareFailed::Refused(e)) => {
                    eprintln!("error: the agent refused the declaration: {e}");
                    return Ok(ExitCode::from(2));
                }
                Err(DeclareFailed::Unreachable(e)) => {
                    eprintln!(
                        "error: {e}\nthe incident is NOT recorded. Retry; if the agent stays unreachable, report by other means now{}",
                        link.center_contact
                            .as_deref()
                            .map(|c| format!(" ({c})"))
                            .unwrap_or_default()
                    );
                    return Ok(ExitCode::from(1));
                }
            }
            let store = open_store()?;
            let mut req = DeclareRequest::new(d.level, d.summary.clone());
            req.discovered_at = match d.discovered_at.as_deref().map(parse_time).transpose() {
                Ok(t) => t,
                Err(e) => return usage(e),
            };
            if let Some(p) = &d.details {
                req.details = match read_details(p) {
                    Ok(t) => t,
                    Err(e) => return usage(e),
                };
            }
            req.support_requested = d.support_requested;
            req.affects_other_agencies = d.affects_other_agencies;
            req.affects_critical_infrastructure = d.affects_critical_infrastructure;
            req.drill = d.drill;
            let inc = match store.declare(req, &crate::identity::of_agent(&cfg), &cfg.host) {
                Ok(i) => i,
                Err(e @ (IncidentError::Invalid(_) | IncidentError::InvalidLevel(_))) => {
                    return usage(e);
                }
                Err(e) => return Err(e.into()),
            };
            writeln!(
                out,
                "declared {}{} (level {}), {}",
                inc.id,
                if inc.drill { " [DRILL]" } else { "" },
                inc.level,
                inc.deadline_text(now)
            )?;
            if d.no_bundle {
                std::fs::write(
                    store
                        .incident_dir(&inc.id)?
                        .join(crate::incident::NO_BUNDLE_MARKER),
                    b"",
                )?;
            }
            if needs_bundle(inc.level, &settings.auto_bundle_levels) && !d.no_bundle {
                let path = store.bundle_path(&inc.id)?;
                let inputs = BundleInputs::from_config(&cfg);
                // Tells a running agent's outbox that this bundle is being built here.
                let marker = store
                    .incident_dir(&inc.id)?
                    .join(crate::incident::BUILDING_MARKER);
                let held =
                    crate::agent::incident::outbox::mark_building(&store.incident_dir(&inc.id)?);
                if let Err(e) = &held {
                    tracing::warn!(
                        "cannot mark {} while building it ({e}); a running agent may build the same bundle",
                        marker.display()
                    );
                }
                let built = build_bundle(
                    &path,
                    &inc,
                    &inputs,
                    settings.window,
                    settings.max_bundle_size,
                )
                .with_context(|| format!("building the evidence bundle of {}", inc.id));
                let recorded = built.and_then(|s| Ok((store.record_bundle(&inc.id, &s)?, s)));
                let _ = std::fs::remove_file(&marker);
                drop(held);
                let (_, summary) = recorded?;
                writeln!(
                    out,
                    "evidence bundle {} ({} bytes, {} members, {} left out, {} errors)\nmanifest sha256 {}",
                    summary.path.display(),
                    summary.size,
                    summary.members,
                    summary.left_out,
                    summary.errors,
                    summary.manifest_sha256
                )?;
            }
            if let Some(since) = link.upstream_down_since {
                writeln!(
                    out,
                    "UPSTREAM DOWN since {}: the incident is recorded on disk and NOT yet delivered; report by other means now{}",
                    format_time(since),
                    link.center_contact
                        .as_deref()
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                )?;
            }
        }
        IncidentCmd::Close(c) => {
            let store = open_store()?;
            let recovered_at = match c.recovered_at.as_deref().map(parse_time).transpose() {
                Ok(t) => t.unwrap_or(now),
                Err(e) => return usage(e),
            };
            match store.close(&c.id, &c.report, recovered_at) {
                Ok(inc) => writeln!(out, "closed {}", inc.id)?,
                Err(
                    e @ (IncidentError::NotFound(_)
                    | IncidentError::BadId(_)
                    | IncidentError::AlreadyClosed(_)
                    | IncidentError::Invalid(_)),
                ) => return usage(e),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Run `soclink bundle ...`: exit 0 when the bundle verifies, 1 (naming the member)
/// when it does not.
pub fn run_bundle(args: &BundleArgs) -> Result<ExitCode> {
    match &args.cmd {
        BundleCmd::Verify { file } => match verify_bundle(file) {
            Ok(r) => {
                println!(
                    "OK {}: incident {}{}, {} members ({} bytes) match the manifest (sha256 {}); {} left out, {} errors recorded at build time",
                    file.display(),
                    r.incident_id,
                    if r.drill { " [DRILL]" } else { "" },
                    r.members,
                    r.bytes,
                    r.manifest_sha256,
                    r.left_out,
                    r.errors
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("FAILED {}: {e}", file.display());
                Ok(ExitCode::from(1))
            }
        },
    }
}

/// Why a declaration through the agent failed.
enum DeclareFailed {
    /// The agent answered no (bad input, or the caller may not declare).
    Refused(String),
    /// The agent runs but did not answer (slow, busy, the socket not ours to use).
    Unreachable(String),
}

/// Ask the running agent to record the incident. `Ok(None)`: no agent runs (no socket,
/// or nobody listens on it).
fn declare_via_agent(
    socket: &Path,
    d: &DeclareArgs,
) -> Result<Option<crate::incident::record::Incident>, DeclareFailed> {
    let details = match &d.details {
        Some(p) => read_details(p).map_err(|e| DeclareFailed::Refused(e.to_string()))?,
        None => String::new(),
    };
    if let Some(t) = &d.discovered_at {
        parse_time(t).map_err(|e| DeclareFailed::Refused(e.to_string()))?;
    }
    let req = serde_json::json!({
        "cmd": "incident_declare",
        "level": d.level,
        "summary": d.summary,
        "details": details,
        "discovered_at": d.discovered_at,
        "support_requested": d.support_requested,
        "affects_other_agencies": d.affects_other_agencies,
        "affects_critical_infrastructure": d.affects_critical_infrastructure,
        "drill": d.drill,
        "no_bundle": d.no_bundle,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DeclareFailed::Unreachable(format!("cannot start the async runtime: {e}")))?;
    match rt.block_on(crate::ops::control::request(socket, &req)) {
        Ok(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| DeclareFailed::Unreachable(format!("unexpected answer: {e}"))),
        Err(crate::ops::control::ControlError::NotRunning { .. }) => Ok(None),
        Err(crate::ops::control::ControlError::Remote(e)) => Err(DeclareFailed::Refused(e)),
        Err(e) => Err(DeclareFailed::Unreachable(e.to_string())),
    }
}

/// The agent side of `incident_declare` (control socket): record the incident in
/// `state_dir` and return it as JSON. The outbox ships it and builds the bundle.
pub fn declare_from_json(
    state_dir: &Path,
    agent_id: &str,
    host: &str,
    req: &serde_json::Value,
    declared_by: crate::incident::record::DeclaredBy,
) -> Result<serde_json::Value, String> {
    let level = req["level"]
        .as_u64()
        .and_then(|l| u8::try_from(l).ok())
        .ok_or("`level` must be 1 to 4")?;
    let summary = req["summary"].as_str().ok_or("`summary` is required")?;
    let mut r = DeclareRequest::new(level, summary.to_string());
    r.details = req["details"].as_str().unwrap_or_default().to_string();
    r.discovered_at = match req["discovered_at"].as_str() {
        Some(t) => Some(parse_time(t).map_err(|e| e.to_string())?),
        None => None,
    };
    let flag = |k: &str| req[k].as_bool().unwrap_or(false);
    r.support_requested = flag("support_requested");
    r.affects_other_agencies = flag("affects_other_agencies");
    r.affects_critical_infrastructure = flag("affects_critical_infrastructure");
    r.drill = flag("drill");
    r.declared_by = Some(declared_by);
    let store = IncidentStore::open(state_dir).map_err(|e| e.to_string())?;
    let inc = store
        .declare(r, agent_id, host)
        .map_err(|e| e.to_string())?;
    if flag("no_bundle") {
        let dir = store.incident_dir(&inc.id).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(crate::incident::NO_BUNDLE_MARKER), b"")
            .map_err(|e| e.to_string())?;
    }
    serde_json::to_value(&inc).map_err(|e| e.to_string())
}
