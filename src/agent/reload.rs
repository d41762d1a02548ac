//! `soclink agent` as a series of generations: SIGHUP re-reads the config file and, when
//! it changed, replaces the running agent with one built from the new file, in the same
//! process (same PID, so `ExecReload=/bin/kill -HUP $MAINPID` works).
//!
//! What a SIGHUP does, in order:
//! 1. `RELOADING=1`; read and validate the file as `check-config` does, and load the
//!    certificates it names. Any problem: log `SIGHUP: keeping the running config:
//!    <file:line:col: reason>`, `READY=1`, and the running generation carries on.
//! 2. A changed `id` or `state_dir` is refused the same way: the spool, checkpoints and
//!    identity live there, and moving them is a restart's job.
//! 3. The same config: reload the upstream certificates in place (the files may have
//!    been replaced). With a syslog TLS listener the generation is replaced instead,
//!    because those listeners read their certificates only when they bind.
//! 4. A changed config: end the running generation exactly as a clean stop does
//!    (sources seal what they hold, it is spooled, checkpoints are written; what the
//!    relay has not acknowledged stays in the spool), then open the state directory
//!    again and run the new config. Its sources resume from the checkpoints, so no line
//!    is lost or read twice; a new file source begins per its `start_at`. If the new
//!    generation cannot start (e.g. a port is taken), the previous config is started
//!    again and the error is logged.
//!
//! Invariant: at most one generation runs at a time — the next one is opened only after
//! the previous one returned, which releases the state_dir lock, the control socket,
//! the metrics port and the syslog listeners.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, Started, Supervisor};
use crate::config::{self, AgentConfig, SourceKind};

/// What a SIGHUP should do with a freshly read config.
#[derive(Debug)]
pub enum Reload {
    /// Keep the running config; the reason says what is wrong, with file:line:col.
    Keep(String),
    /// The same config: reload certificates in place.
    Unchanged,
    /// Replace the running generation; the text says what changed.
    Apply(Box<AgentConfig>, String),
}

/// Run the agent for `cfg` (read from `path`) until `shutdown`, reloading on SIGHUP.
pub async fn run_agent(path: &Path, cfg: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    // Registered before the first READY=1: SIGHUP's default action would kill the agent.
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut cfg = cfg;
    // The config that ran before a reload, to go back to if the new one cannot start.
    let mut previous: Option<AgentConfig> = None;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let generation = shutdown.child_token();
        let (started_tx, started_rx) = oneshot::channel();
        let sup = Supervisor {
            started: started_tx,
            process: shutdown.clone(),
        };
        let run = Agent::open(cfg.clone())
            .map(|agent| tokio::spawn(agent.run_generation(generation.clone(), Some(sup))));
        let (mut task, started) = match run {
            Ok(mut task) => match started_rx.await {
                Ok(s) => (task, s),
                Err(_) => {
                    // Nothing of it is running: run_generation fails before it starts.
                    generation.cancel();
                    let e = joined((&mut task).await)
                        .err()
                        .unwrap_or_else(|| anyhow!("the agent stopped before it started"));
                    cfg = fall_back(&mut previous, e)?;
                    continue;
                }
            },
            Err(e) => {
                cfg = fall_back(&mut previous, e)?;
                continue;
            }
        };
        if previous.take().is_some() {
            tracing::info!("SIGHUP: the new config is running");
        }
        let next = loop {
            tokio::select! {
                r = &mut task => {
                    generation.cancel();
                    return joined(r);
                }
                Some(()) = hup.recv() => {
                    crate::ops::service::reloading(); // RELOADING=1 .. READY=1
                    match decide(path, &cfg) {
                        Reload::Keep(reason) => {
                            tracing::error!("SIGHUP: keeping the running config: {reason}");
                            crate::ops::service::ready();
                        }
                        Reload::Unchanged => {
                            reload_in_place(&started);
                            crate::ops::service::ready();
                        }
                        Reload::Apply(new, what) => {
                            tracing::info!("SIGHUP: applying the new config ({what}): stopping the running generation");
                            break *new;
                        }
                    }
                }
            }
        };
        generation.cancel();
        joined(task.await).context("the running generation did not stop cleanly")?;
        previous = Some(std::mem::replace(&mut cfg, next));
    }
}

fn joined(r: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(anyhow::Error::from)?
}

/// A new config failed to start: go back to the previous one, or give up at first start.
fn fall_back(previous: &mut Option<AgentConfig>, e: anyhow::Error) -> Result<AgentConfig> {
    match previous.take() {
        Some(p) => {
            tracing::error!(
                "SIGHUP: the new config cannot start: {e:#}; starting the previous config again"
            );
            Ok(p)
        }
        None => Err(e),
    }
}

fn reload_in_place(started: &Started) {
    match &started.tls {
        Some(tls) => match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: config unchanged; TLS certificates reloaded"),
            Err(e) => tracing::error!("SIGHUP: keeping the old certificates: {e}"),
        },
        None => {
            tracing::info!("SIGHUP: config unchanged; no [upstream], so no certificates to reload")
        }
    }
}

/// Read `path` again and say what a SIGHUP should do, compared with `running`.
pub fn decide(path: &Path, running: &AgentConfig) -> Reload {
    let new = match config::load_agent(path) {
        Ok(c) => c,
        Err(e) => return Reload::Keep(e.to_string().replace('\n', "; ")),
    };
    if let Err(why) = load_certificates(&new) {
        return Reload::Keep(format!("{}: {why}", path.display()));
    }
    compare(running, new)
}

/// The certificates a config names must load before the running generation is stopped.
fn load_certificates(c: &AgentConfig) -> Result<(), String> {
    if let Some(up) = &c.upstream {
        crate::tls::client_config(&up.ca, &up.cert, &up.key)
            .map_err(|e| format!("[upstream] certificates: {e}"))?;
    }
    for s in &c.sources {
        if let SourceKind::Syslog(sc) = &s.kind
            && let (Some(cert), Some(key)) = (&sc.tls_cert, &sc.tls_key)
        {
            crate::agent::sources::syslog::tls_server_config(cert, key, sc.tls_ca.as_deref())
                .map_err(|e| format!("source {:?}: TLS certificates: {e}", s.name))?;
        }
    }
    Ok(())
}

/// Compare two valid configs. They are compared by their `Debug` form: every setting is
/// in it, and a setting added later is covered without this function knowing it.
pub fn compare(running: &AgentConfig, new: AgentConfig) -> Reload {
    if new.id != running.id {
        return Reload::Keep(format!(
            "changing id (from {:?} to {:?}) needs a restart",
            running.id, new.id
        ));
    }
    if new.state_dir != running.state_dir {
        return Reload::Keep(format!(
            "changing state_dir (from {} to {}) needs a restart: the spool and checkpoints live there",
            running.state_dir.display(),
            new.state_dir.display()
        ));
    }
    let sources = |c: &AgentConfig| -> BTreeMap<String, String> {
        c.sources
            .iter()
            .map(|s| (s.name.clone(), format!("{:?}", s.kind)))
            .collect()
    };
    let (old, now) = (sources(running), sources(&new));
    let mut what = Vec::new();
    let list = |names: Vec<&String>| {
        names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let added: Vec<_> = now.keys().filter(|k| !old.contains_key(*k)).collect();
    let removed: Vec<_> = old.keys().filter(|k| !now.contains_key(*k)).collect();
    let changed: Vec<_> = now
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k)
        .collect();
    if !added.is_empty() {
        what.push(format!("sources added: {}", list(added)));
    }
    if !removed.is_empty() {
        what.push(format!("sources removed: {}", list(removed)));
    }
    if !changed.is_empty() {
        what.push(format!("sources changed: {}", list(changed)));
    }
    let rest = |c: &AgentConfig| {
        let mut c = c.clone();
        c.sources.clear();
        format!("{c:?}")
    };
    if rest(running) != rest(&new) {
        what.push("other settings changed".to_string());
    }
    if what.is_empty() {
        let syslog_tls = new
            .sources
            .iter()
            .any(|s| matches!(&s.kind, SourceKind::Syslog(sc) if sc.tls_cert.is_some()));
        if !syslog_tls {
            return Reload::Unchanged;
        }
        what.push("config unchanged; restarting to reload the syslog TLS certificates".into());
    }
    Reload::Apply(Box::new(new), what.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> AgentConfig {
        let text = format!(
            "id = \"a\"\nstate_dir = \"/tmp/x\"\n\n[[source]]\nname = \"one\"\ntype = \"file\"\ninclude = [\"/tmp/x/*.log\"]\n{extra}"
        );
        config::parse_agent(&text).unwrap()
    }

    #[test]
    fn same_config_is_unchanged() {
        assert!(matches!(compare(&cfg(""), cfg("")), Reload::Unchanged));
    }

    #[test]
    fn sources_added_removed_changed_are_named() {
        let two =
            cfg("\n[[source]]\nname = \"two\"\ntype = \"file\"\ninclude = [\"/tmp/y/*.log\"]\n");
        match compare(&cfg(""), two.clone()) {
            Reload::Apply(_, what) => assert_eq!(what, "sources added: \"two\""),
            other => panic!("{other:?}"),
        }
        match compare(&two, cfg("")) {
            Reload::Apply(_, what) => assert_eq!(what, "sources removed: \"two\""),
            other => panic!("{other:?}"),
        }
        match compare(&cfg(""), cfg("start_at = \"end\"\n")) {
            Reload::Apply(_, what) => assert_eq!(what, "sources changed: \"one\""),
            other => panic!("{other:?}"),
        }
        match compare(&cfg(""), cfg("\n[spool]\nbatch_max_delay = \"2s\"\n")) {
            Reload::Apply(_, what) => assert_eq!(what, "other settings changed"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn id_and_state_dir_need_a_restart() {
        let mut other = cfg("");
        other.id = "b".into();
        match compare(&cfg(""), other) {
            Reload::Keep(why) => assert!(why.contains("changing id"), "{why}"),
            r => panic!("{r:?}"),
        }
        let mut other = cfg("");
        other.state_dir = "/tmp/elsewhere".into();
        match compare(&cfg(""), other) {
            Reload::Keep(why) => assert!(why.contains("changing state_dir"), "{why}"),
            r => panic!("{r:?}"),
        }
    }
}
