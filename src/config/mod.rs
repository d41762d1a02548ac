//! Configuration: the agent's and the relay's TOML files, their defaults, and validation.
//!
//! Key names are a contract with users (see `config/agent.toml`). Parsing happens in two
//! steps: serde reads a raw, span-carrying form (unknown keys are errors), then
//! validation turns it into the typed config and collects *every* problem with its line
//! and column, so `soclink check-config` can list them all at once.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::util::{HumanDuration, Size, line_col};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/soclink";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/soclink/control.sock";
pub const DEFAULT_RELAY_STATE_DIR: &str = "/var/lib/soclink-relay";
pub const DEFAULT_RELAY_CONTROL_SOCKET: &str = "/run/soclink-relay/control.sock";
/// The Unix group whose members may use the control sockets (declare incidents, run
/// intel now, read status); distinct from the services' own groups.
pub const DEFAULT_OPERATOR_GROUP: &str = "soclink-operators";
/// Default bound on connections from one address before their certificate is checked.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 64;

/// One problem found in a config file, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.line == 0 {
                write!(f, "{}: error: {}", self.path.display(), p.message)?;
            } else {
                write!(
                    f,
                    "{}:{}:{}: error: {}",
                    self.path.display(),
                    p.line,
                    p.col,
                    p.message
                )?;
            }
        }
        Ok(())
    }
}

/// Collects problems while validating, translating byte spans into line/column.
struct Problems<'a> {
    text: &'a str,
    list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    fn new(text: &'a str) -> Self {
        Problems {
            text,
            list: Vec::new(),
        }
    }
    fn at(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.list.push(Problem {
            line,
            col,
            message: message.into(),
        });
    }
    fn global(&mut self, message: impl Into<String>) {
        self.list.push(Problem {
            line: 0,
            col: 0,
            message: message.into(),
        });
    }
}

// ---------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Agent identity used in logs and status (the relay uses the certificate's instead).
    pub id: String,
    /// Host name stamped into every event's `host` field.
    pub host: String,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Unix group whose members may use the control socket (besides root and the
    /// agent's own user).
    pub operator_group: String,
    pub sources: Vec<SourceConfig>,
    pub spool: SpoolSettings,
    pub upstream: Option<UpstreamConfig>,
    pub incident: IncidentSettings,
    pub metrics: MetricsSettings,
    /// `[intel]`: periodic SOC intelligence upload; `None` when the section is absent.
    pub intel: Option<crate::intel::IntelSettings>,
}

/// `[metrics]`: the Prometheus scrape endpoint (agent and relay; see crate::ops::metrics).
#[derive(Debug, Clone, Default)]
pub struct MetricsSettings {
    /// Where `GET /metrics` is served; `None` (the default): no endpoint.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[incident]`: what declaring an incident does (guideline 3.1, 4.1(二)7).
pub use crate::incident::IncidentSettings;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
}

#[derive(Debug, Clone)]
pub enum SourceKind {
    File(FileSourceConfig),
    Syslog(SyslogSourceConfig),
    Journald(JournaldSourceConfig),
}

#[derive(Debug, Clone)]
pub struct SyslogSourceConfig {
    /// `udp://host:port`, `tcp://host:port`, `tls://host:port`.
    pub listen: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// When set, TLS senders must present a certificate signed by this CA.
    pub tls_ca: Option<PathBuf>,
    pub max_message_bytes: u64,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// The zone of device timestamps that carry none (`timezone`, an IANA name);
    /// None: the host's zone, looked up when the source starts.
    pub timezone: Option<jiff::tz::TimeZone>,
}

#[derive(Debug, Clone)]
pub struct JournaldSourceConfig {
    /// A directory of journal files; None: the local system journal.
    pub directory: Option<PathBuf>,
    /// Only entries of these units (`_SYSTEMD_UNIT`); empty: all.
    pub units: Vec<String>,
    /// Only entries with `PRIORITY` <= this (0 emerg .. 7 debug).
    pub max_priority: Option<u8>,
    /// Where to begin when there is no saved cursor: "beginning" or "end".
    pub start_at: StartAt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    Beginning,
    End,
}

#[derive(Debug, Clone)]
pub struct FileSourceConfig {
    pub include: Vec<String>,
    pub exclude: Vec<glob::Pattern>,
    pub start_at: StartAt,
    pub max_line_bytes: u64,
    /// A last line without its newline is emitted after the file was idle this long.
    pub partial_line_timeout: Duration,
    /// Glob re-expansion period: the fallback for when inotify overflows or is missing.
    pub rescan_interval: Duration,
    /// How long a file that left its path (rotated or deleted) stays open after its last
    /// new byte, for writers that keep appending to it until they reopen.
    pub rotate_wait: Duration,
    /// Descriptor budget: beyond it, files idle at their end are closed and reopened
    /// (checked by inode and fingerprint) when they grow.
    pub max_open_files: usize,
    /// Whether a symlink the globs match is followed (see crate::sources::guard).
    pub follow_symlinks: FollowSymlinks,
    /// Files and directories never read as logs whatever the globs say: the agent's own
    /// keys, certificates and state. Filled in by `parse_agent`.
    pub protected: Vec<PathBuf>,
}

/// `follow_symlinks` of a file source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FollowSymlinks {
    /// A symlink is never followed (opened with O_NOFOLLOW): the default.
    #[default]
    Never,
    /// A symlink is followed only when its target also matches the source's include
    /// patterns (and no exclude pattern).
    WithinIncludes,
}

/// Default `max_open_files`: half of systemd's default soft `LimitNOFILE` (1024), so one
/// source never starves the spool, sockets and other sources of descriptors.
pub const DEFAULT_MAX_OPEN_FILES: usize = 512;

#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub max_size: u64,
    pub batch_max_bytes: u64,
    pub batch_max_delay: Duration,
    pub compression_level: u32,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `host:port` of the relay.
    pub address: String,
    /// TLS name the relay's certificate must carry.
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `host:port` of an HTTP CONNECT proxy.
    pub proxy: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: Option<Spanned<String>>,
    state_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    operator_group: Option<Spanned<String>>,
    #[serde(default)]
    source: Vec<Spanned<RawSource>>,
    #[serde(default)]
    spool: RawSpool,
    upstream: Option<Spanned<RawUpstream>>,
    incident: Option<RawIncident>,
    #[serde(default)]
    metrics: RawMetrics,
    intel: Option<Spanned<RawIntel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntel {
    every: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    include: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    start_at: Option<StartAt>,
    max_upload_size: Option<Spanned<Size>>,
    max_line_bytes: Option<Spanned<Size>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

fn metrics_settings(m: RawMetrics, p: &mut Problems) -> MetricsSettings {
    let listen = m
        .listen
        .and_then(|a| match a.get_ref().parse::<std::net::SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                p.at(
                    a.span(),
                    format!(
                        "metrics.listen {:?} must be ip:port, e.g. \"127.0.0.1:9273\"",
                        a.get_ref()
                    ),
                );
                None
            }
        });
    MetricsSettings { listen }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIncident {
    auto_bundle_levels: Option<Spanned<Vec<i64>>>,
    window: Option<HumanDuration>,
    max_bundle_size: Option<Size>,
    center_contact: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    include: Option<Vec<Spanned<String>>>,
    exclude: Option<Vec<Spanned<String>>>,
    start_at: Option<StartAt>,
    max_line_bytes: Option<Spanned<Size>>,
    partial_line_timeout: Option<HumanDuration>,
    rescan_interval: Option<Spanned<HumanDuration>>,
    rotate_wait: Option<HumanDuration>,
    max_open_files: Option<Spanned<i64>>,
    follow_symlinks: Option<FollowSymlinks>,
    // syslog
    listen: Option<Vec<Spanned<String>>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    max_message_bytes: Option<Spanned<Size>>,
    max_connections: Option<Spanned<i64>>,
    idle_timeout: Option<HumanDuration>,
    timezone: Option<Spanned<String>>,
    // journald
    directory: Option<PathBuf>,
    units: Option<Vec<String>>,
    max_priority: Option<Spanned<i64>>,
}

/// Keys each source type accepts besides `name` and `type`.
const FILE_KEYS: &[&str] = &[
    "include",
    "exclude",
    "start_at",
    "max_line_bytes",
    "partial_line_timeout",
    "rescan_interval",
    "rotate_wait",
    "max_open_files",
    "follow_symlinks",
];
const SYSLOG_KEYS: &[&str] = &[
    "listen",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "max_message_bytes",
    "max_connections",
    "idle_timeout",
    "timezone",
];
const JOURNALD_KEYS: &[&str] = &["directory", "units", "max_priority", "start_at"];

impl RawSource {
    /// Keys that are set, for "not valid for this type" errors.
    fn set_keys(&self) -> Vec<&'static str> {
        let mut k = Vec::new();
        let mut push = |set: bool, name: &'static str| {
            if set {
                k.push(name)
            }
        };
        push(self.include.is_some(), "include");
        push(self.exclude.is_some(), "exclude");
        push(self.start_at.is_some(), "start_at");
        push(self.max_line_bytes.is_some(), "max_line_bytes");
        push(self.partial_line_timeout.is_some(), "partial_line_timeout");
        push(self.rescan_interval.is_some(), "rescan_interval");
        push(self.rotate_wait.is_some(), "rotate_wait");
        push(self.max_open_files.is_some(), "max_open_files");
        push(self.follow_symlinks.is_some(), "follow_symlinks");
        push(self.listen.is_some(), "listen");
        push(self.tls_cert.is_some(), "tls_cert");
        push(self.tls_key.is_some(), "tls_key");
        push(self.tls_ca.is_some(), "tls_ca");
        push(self.max_message_bytes.is_some(), "max_message_bytes");
        push(self.max_connections.is_some(), "max_connections");
        push(self.idle_timeout.is_some(), "idle_timeout");
        push(self.timezone.is_some(), "timezone");
        push(self.directory.is_some(), "directory");
        push(self.units.is_some(), "units");
        push(self.max_priority.is_some(), "max_priority");
        k
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    max_size: Option<Spanned<Size>>,
    batch_max_bytes: Option<Spanned<Size>>,
    batch_max_delay: Option<Spanned<HumanDuration>>,
    compression_level: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Spanned<String>,
    server_name: Option<String>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    proxy: Option<Spanned<String>>,
}

/// Read and validate an agent config file.
pub fn load_agent(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = read(path)?;
    parse_agent(&text).map_err(|problems| ConfigError {
        path: path.to_path_buf(),
        problems,
    })
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        problems: vec![Problem {
            line: 0,
            col: 0,
            message: format!("cannot read config file: {e}"),
        }],
    })
}

fn toml_problem(text: &str, e: toml::de::Error) -> Vec<Problem> {
    let (line, col) = e.span().map_or((0, 0), |s| line_col(text, s.start));
    vec![Problem {
        line,
        col,
        message: e.message().trim().to_string(),
    }]
}

/// Parse and validate agent config text; every problem is returned.
pub fn parse_agent(text: &str) -> Result<AgentConfig, Vec<Problem>> {
    let raw: RawAgent = toml::from_str(text).map_err(|e| toml_problem(text, e))?;
    let mut p = Problems::new(text);
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string());
    let id = match raw.id {
        Some(id) => {
            if let Err(why) = check_name(id.get_ref()) {
                p.at(id.span(), format!("`id` {why}"));
            }
            id.into_inner()
        }
        None => host.clone(),
    };
    let mut names = HashSet::new();
    let mut sources = Vec::new();
    if raw.source.is_empty() {
        p.global("no [[source]] configured: the agent would collect nothing");
    }
    for s in raw.source {
        let span = s.span();
        let s = s.into_inner();
        if let Err(why) = check_name(s.name.get_ref()) {
            p.at(s.name.span(), format!("source `name` {why}"));
        } else if !names.insert(s.name.get_ref().clone()) {
            p.at(
                s.name.span(),
                format!("duplicate source name {:?}", s.name.get_ref()),
            );
        }
        if crate::relay::sink::file::RESERVED_SOURCE_NAMES.contains(&s.name.get_ref().as_str()) {
            p.at(
                s.name.span(),
                format!(
                    "source name {:?} is reserved (the relay keeps incidents and intel under these names)",
                    s.name.get_ref()
                ),
            );
        }
        let allowed = match s.kind.get_ref().as_str() {
            "file" => FILE_KEYS,
            "syslog" => SYSLOG_KEYS,
            "journald" => JOURNALD_KEYS,
            other => {
                p.at(
                    s.kind.span(),
                    format!("unknown source type {other:?}: supported types are \"file\", \"syslog\" and \"journald\""),
                );
                continue;
            }
        };
        let wrong: Vec<&str> = s
            .set_keys()
            .into_iter()
            .filter(|k| !allowed.contains(k))
            .collect();
        if !wrong.is_empty() {
            p.at(
                span.clone(),
                format!(
                    "source {:?} of type {:?} does not take {}",
                    s.name.get_ref(),
                    s.kind.get_ref(),
                    wrong
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            continue;
        }
        let kind = match s.kind.get_ref().as_str() {
            "file" => file_source(&s, span, &mut p).map(SourceKind::File),
            "syslog" => syslog_source(&s, span, &mut p).map(SourceKind::Syslog),
            _ => journald_source(&s, &mut p).map(SourceKind::Journald),
        };
        if let Some(kind) = kind {
            sources.push(SourceConfig {
                name: s.name.into_inner(),
                kind,
            });
        }
    }
    let spool = spool_settings(raw.spool, &mut p);
    let operator_group = operator_group(raw.operator_group, &mut p);
    let has_upstream = raw.upstream.is_some();
    let upstream = raw.upstream.and_then(|u| upstream(u, &mut p));
    let metrics = metrics_settings(raw.metrics, &mut p);
    let mut intel = raw
        .intel
        .and_then(|i| intel_settings(i, has_upstream, &mut p));
    let mut incident = IncidentSettings::default();
    if let Some(i) = raw.incident {
        if let Some(l) = i.auto_bundle_levels {
            match l
                .get_ref()
                .iter()
                .map(|v| u8::try_from(*v))
                .collect::<Result<Vec<u8>, _>>()
            {
                Ok(v) if v.iter().all(|x| (1..=4).contains(x)) => incident.auto_bundle_levels = v,
                _ => p.at(
                    l.span(),
                    "incident.auto_bundle_levels must list levels 1 to 4",
                ),
            }
        }
        if let Some(w) = i.window {
            incident.window = w.0;
        }
        if let Some(m) = i.max_bundle_size {
            incident.max_bundle_size = m.0;
        }
        incident.center_contact = i.center_contact;
    }
    if !p.list.is_empty() {
        return Err(p.list);
    }
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    // The agent never reads its own secrets or state as logs, whatever the globs say.
    let mut protected = vec![state_dir.clone()];
    if let Some(u) = &upstream {
        protected.extend([u.key.clone(), u.cert.clone(), u.ca.clone()]);
    }
    for s in &sources {
        if let SourceKind::Syslog(y) = &s.kind {
            protected.extend(
                [&y.tls_key, &y.tls_cert, &y.tls_ca]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
    }
    for s in &mut sources {
        if let SourceKind::File(f) = &mut s.kind {
            f.protected = protected.clone();
        }
    }
    if let Some(i) = &mut intel {
        i.files.protected = protected.clone();
    }
    Ok(AgentConfig {
        incident,
        id,
        host,
        state_dir,
        control_socket: raw
            .control_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
        operator_group,
        sources,
        spool,
        upstream,
        metrics,
        intel,
    })
}

fn file_source(
    s: &RawSource,
    span: std::ops::Range<usize>,
    p: &mut Problems,
) -> Option<FileSourceConfig> {
    let mut ok = true;
    let include: Vec<String> = match &s.include {
        Some(v) if !v.is_empty() => v.iter().map(|g| g.get_ref().clone()).collect(),
        _ => {
            p.at(
                span.clone(),
                format!(
                    "source {:?}: a file source needs `include` (a list of paths or globs)",
                    s.name.get_ref()
                ),
            );
            return None;
        }
    };
    let (globs_ok, exclude) = check_globs(
        s.include.as_deref().unwrap_or_default(),
        s.exclude.as_deref().unwrap_or_default(),
        p,
    );
    ok &= globs_ok;
    let max_line_bytes = s.max_line_bytes.as_ref().map_or(1 << 20, |m| m.get_ref().0);
    if let Some(m) = &s.max_line_bytes
        && !(16..=(256 << 20)).contains(&max_line_bytes)
    {
        p.at(m.span(), "max_line_bytes must be between 16B and 256MiB");
        ok = false;
    }
    let rescan_interval = s
        .rescan_interval
        .as_ref()
        .map_or(Duration::from_secs(1), |d| d.get_ref().0);
    if let Some(d) = &s.rescan_interval
        && d.get_ref().0 < Duration::from_millis(10)
    {
        p.at(d.span(), "rescan_interval must be at least 10ms");
        ok = false;
    }
    let max_open_files = match &s.max_open_files {
        Some(m) => match usize::try_from(*m.get_ref()) {
            Ok(n) if (4..=1_000_000).contains(&n) => n,
            _ => {
                p.at(m.span(), "max_open_files must be between 4 and 1000000");
                ok = false;
                DEFAULT_MAX_OPEN_FILES
            }
        },
        None => DEFAULT_MAX_OPEN_FILES,
    };
    ok.then(|| FileSourceConfig {
        include,
        exclude,
        start_at: s.start_at.unwrap_or(StartAt::Beginning),
        max_line_bytes,
        partial_line_timeout: s
            .partial_line_timeout
            .map_or(Duration::from_secs(5), |d| d.0),
        rescan_interval,
        rotate_wait: s.rotate_wait.map_or(Duration::from_secs(5), |d| d.0),
        max_open_files,
        follow_symlinks: s.follow_symlinks.unwrap_or_default(),
        protected: Vec::new(),
    })
}

/// Include patterns must be absolute, valid globs; exclude patterns valid globs.
fn check_globs(
    include: &[Spanned<String>],
    exclude: &[Spanned<String>],
    p: &mut Problems,
) -> (bool, Vec<glob::Pattern>) {
    let mut ok = true;
    for g in include {
        let pat = g.get_ref();
        if !Path::new(pat).is_absolute() {
            p.at(
                g.span(),
                format!("include pattern {pat:?} must be an absolute path"),
            );
            ok = false;
        } else if let Err(e) = glob::Pattern::new(pat) {
            p.at(g.span(), format!("bad glob {pat:?}: {e}"));
            ok = false;
        }
    }
    let mut out = Vec::new();
    for g in exclude {
        match glob::Pattern::new(g.get_ref()) {
            Ok(pat) => out.push(pat),
            Err(e) => {
                p.at(g.span(), format!("bad glob {:?}: {e}", g.get_ref()));
                ok = false;
            }
        }
    }
    (ok, out)
}

/// `[intel]`: needs `[upstream]` (it exists to send to the center).
fn intel_settings(
    raw: Spanned<RawIntel>,
    has_upstream: bool,
    p: &mut Problems,
) -> Option<crate::intel::IntelSettings> {
    let span = raw.span();
    let i = raw.into_inner();
    let mut ok = true;
    if !has_upstream {
        p.at(
            span,
            "[intel] uploads to the center and needs an [upstream] section",
        );
        ok = false;
    }
    let every = i
        .every
        .as_ref()
        .map_or(Duration::from_secs(3600), |d| d.get_ref().0);
    if let Some(d) = &i.every
        && (every < Duration::from_secs(1)
            || every > Duration::from_secs(7 * 86400)
            || every.subsec_nanos() != 0)
    {
        p.at(
            d.span(),
            "intel.every must be whole seconds between 1s and 7d (e.g. \"1h\")",
        );
        ok = false;
    }
    let (globs_ok, exclude) = check_globs(&i.include, &i.exclude, p);
    ok &= globs_ok;
    let max_upload_size = i
        .max_upload_size
        .as_ref()
        .map_or(256 << 20, |m| m.get_ref().0);
    if let Some(m) = &i.max_upload_size
        && !((1 << 10)..=(4 << 30)).contains(&max_upload_size)
    {
        p.at(
            m.span(),
            "intel.max_upload_size must be between 1KiB and 4GiB",
        );
        ok = false;
    }
    let max_line_bytes = i.max_line_bytes.as_ref().map_or(1 << 20, |m| m.get_ref().0);
    if let Some(m) = &i.max_line_bytes
        && !(16..=(256 << 20)).contains(&max_line_bytes)
    {
        p.at(
            m.span(),
            "intel.max_line_bytes must be between 16B and 256MiB",
        );
        ok = false;
    }
    ok.then(|| crate::intel::IntelSettings {
        every,
        files: FileSourceConfig {
            include: i.include.iter().map(|g| g.get_ref().clone()).collect(),
            exclude,
            // Alert files that exist at the first start hold the past, not this period.
            start_at: i.start_at.unwrap_or(StartAt::End),
            max_line_bytes,
            partial_line_timeout: Duration::from_secs(5),
            rescan_interval: Duration::from_secs(1),
            rotate_wait: Duration::from_secs(5),
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            follow_symlinks: FollowSymlinks::Never,
            protected: Vec::new(),
        },
        max_upload_size,
        staging_segment_size: crate::intel::STAGING_SEGMENT_SIZE,
    })
}

fn syslog_source(
    s: &RawSource,
    span: std::ops::Range<usize>,
    p: &mut Problems,
) -> Option<SyslogSourceConfig> {
    let mut ok = true;
    let Some(listen) = s.listen.as_ref().filter(|l| !l.is_empty()) else {
        p.at(
            span,
            format!(
                "source {:?}: a syslog source needs `listen`, e.g. [\"udp://0.0.0.0:514\", \"tcp://0.0.0.0:514\"]",
                s.name.get_ref()
            ),
        );
        return None;
    };
    let mut needs_tls = false;
    for l in listen {
        match crate::agent::sources::syslog::parse_listen(l.get_ref()) {
            Ok(a) => needs_tls |= a.proto == crate::agent::sources::syslog::Proto::Tls,
            Err(e) => {
                p.at(l.span(), e);
                ok = false;
            }
        }
    }
    if needs_tls && (s.tls_cert.is_none() || s.tls_key.is_none()) {
        p.at(
            span.clone(),
            format!(
                "source {:?}: a tls:// listener needs `tls_cert` and `tls_key`",
                s.name.get_ref()
            ),
        );
        ok = false;
    }
    let max_message_bytes = s
        .max_message_bytes
        .as_ref()
        .map_or(64 << 10, |m| m.get_ref().0);
    if let Some(m) = &s.max_message_bytes
        && !(480..=(16 << 20)).contains(&max_message_bytes)
    {
        p.at(m.span(), "max_message_bytes must be between 480B and 16MiB");
        ok = false;
    }
    let max_connections = match &s.max_connections {
        Some(m) => match usize::try_from(*m.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                p.at(m.span(), "max_connections must be a positive number");
                ok = false;
                1
            }
        },
        None => 1024,
    };
    let timezone = match &s.timezone {
        None => None,
        Some(name) => match jiff::tz::TimeZone::get(name.get_ref()) {
            Ok(tz) => Some(tz),
            Err(_) => {
                p.at(
                    name.span(),
                    format!(
                        "unknown time zone {:?}: use an IANA time zone name such as \"Asia/Taipei\" or \"UTC\" (the zone the devices' clocks are set to)",
                        name.get_ref()
                    ),
                );
                ok = false;
                None
            }
        },
    };
    ok.then(|| SyslogSourceConfig {
        listen: listen.iter().map(|l| l.get_ref().clone()).collect(),
        tls_cert: s.tls_cert.clone(),
        tls_key: s.tls_key.clone(),
        tls_ca: s.tls_ca.clone(),
        max_message_bytes,
        max_connections,
        idle_timeout: s.idle_timeout.map_or(Duration::from_secs(600), |d| d.0),
        timezone,
    })
}

fn journald_source(s: &RawSource, p: &mut Problems) -> Option<JournaldSourceConfig> {
    let max_priority = match &s.max_priority {
        Some(m) => match u8::try_from(*m.get_ref()) {
            Ok(v) if v <= 7 => Some(v),
            _ => {
                p.at(m.span(), "max_priority must be 0 (emerg) to 7 (debug)");
                return None;
            }
        },
        None => None,
    };
    Some(JournaldSourceConfig {
        directory: s.directory.clone(),
        units: s.units.clone().unwrap_or_default(),
        max_priority,
        start_at: s.start_at.unwrap_or(StartAt::Beginning),
    })
}

fn spool_settings(raw: RawSpool, p: &mut Problems) -> SpoolSettings {
    let mut s = SpoolSettings {
        max_size: 20 << 30,
        batch_max_bytes: 1 << 20,
        batch_max_delay: Duration::from_secs(1),
        compression_level: 6,
    };
    if let Some(v) = raw.max_size {
        if v.get_ref().0 < (1 << 20) {
            p.at(v.span(), "spool.max_size must be at least 1MiB");
        }
        s.max_size = v.get_ref().0;
    }
    if let Some(v) = raw.batch_max_bytes {
        if !(1024..=(64 << 20)).contains(&v.get_ref().0) {
            p.at(
                v.span(),
                "spool.batch_max_bytes must be between 1KiB and 64MiB",
            );
        }
        s.batch_max_bytes = v.get_ref().0;
    }
    if let Some(v) = raw.batch_max_delay {
        if v.get_ref().0.is_zero() {
            p.at(v.span(), "spool.batch_max_delay must be greater than zero");
        }
        s.batch_max_delay = v.get_ref().0;
    }
    if let Some(v) = raw.compression_level {
        match u32::try_from(*v.get_ref()) {
            Ok(l) if l <= 9 => s.compression_level = l,
            _ => p.at(
                v.span(),
                "spool.compression_level must be 0 (none) to 9 (smallest)",
            ),
        }
    }
    s
}

/// A value that goes into a network request verbatim (the CONNECT line, the TLS name)
/// must hold no control character: CR/LF would let it write headers of its own.
fn control_char(key: &str, value: &str) -> Option<String> {
    value.chars().find(|c| c.is_control()).map(|c| {
        format!(
            "{key} {value:?} contains the control character U+{:04X}: it would be sent verbatim (e.g. into the proxy's CONNECT request); remove it",
            c as u32
        )
    })
}

fn upstream(u: Spanned<RawUpstream>, p: &mut Problems) -> Option<UpstreamConfig> {
    let u = u.into_inner();
    let mut bad = false;
    if let Some(why) = control_char("upstream.address", u.address.get_ref()) {
        p.at(u.address.span(), why);
        bad = true;
    }
    if let Some(px) = &u.proxy
        && let Some(why) = control_char("upstream.proxy", px.get_ref())
    {
        p.at(px.span(), why);
        bad = true;
    }
    if let Some(why) = u
        .server_name
        .as_deref()
        .and_then(|n| control_char("upstream.server_name", n))
    {
        p.global(why);
        bad = true;
    }
    if bad {
        return None;
    }
    let address = u.address.get_ref().clone();
    let Some(host) = host_of(&address) else {
        p.at(
            u.address.span(),
            format!("upstream.address {address:?} must be host:port, e.g. \"center.example.gov.tw:6514\""),
        );
        return None;
    };
    let proxy = match u.proxy {
        Some(px) => match parse_proxy(px.get_ref()) {
            Ok(hp) => Some(hp),
            Err(why) => {
                p.at(px.span(), why);
                return None;
            }
        },
        None => None,
    };
    Some(UpstreamConfig {
        server_name: u.server_name.unwrap_or_else(|| host.to_string()),
        address,
        ca: u.ca,
        cert: u.cert,
        key: u.key,
        proxy,
    })
}

/// The host part of `host:port` or `[v6]:port`, if the port is valid.
pub fn host_of(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

fn parse_proxy(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .ok_or_else(|| format!("upstream.proxy {s:?} must be an http:// URL of a CONNECT proxy"))?;
    let hostport = rest.trim_end_matches('/');
    if host_of(hostport).is_none() {
        return Err(format!(
            "upstream.proxy {s:?} must name host and port, e.g. \"http://proxy.example:3128\""
        ));
    }
    Ok(hostport.to_string())
}

/// `operator_group`: a Unix group name (checked for shape only: the group may be
/// created after the config is written).
fn operator_group(raw: Option<Spanned<String>>, p: &mut Problems) -> String {
    let Some(g) = raw else {
        return DEFAULT_OPERATOR_GROUP.to_string();
    };
    let name = g.get_ref();
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        p.at(
            g.span(),
            format!("operator_group {name:?} must be a Unix group name (letters, digits, '_', '-', '.'; at most 32)"),
        );
    }
    g.into_inner()
}

/// Names that become folder names at the relay must be one safe path component.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 128 {
        return Err("must be at most 128 bytes".into());
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!(
            "{name:?} must not start with '.' or '-' (it becomes a folder name at the relay)"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}: use letters, digits, '.', '_' and '-' only (it becomes a folder name at the relay)"
        ));
    }
    Ok(())
}

impl AgentConfig {
    /// A one-paragraph summary of what this agent will do, for `check-config`.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "Agent {:?} on host {:?} keeps its spool and checkpoints in {} (spool limit {}).",
            self.id,
            self.host,
            self.state_dir.display(),
            Size(self.spool.max_size)
        );
        out.push_str(&format!(
            " It collects {} source{}:",
            self.sources.len(),
            if self.sources.len() == 1 { "" } else { "s" }
        ));
        for (i, s) in self.sources.iter().enumerate() {
            match &s.kind {
                SourceKind::File(f) => {
                    let matching =
                        crate::agent::sources::file::expand(&f.include, &f.exclude).len();
                    out.push_str(&format!(
                        "{} {:?} tails files matching {}{} ({} matching now), starting at the {} of files it has never seen, lines up to {}",
                        if i == 0 { "" } else { ";" },
                        s.name,
                        f.include.join(", "),
                        if f.exclude.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " except {}",
                                f.exclude.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
                            )
                        },
                        matching,
                        match f.start_at {
                            StartAt::Beginning => "beginning",
                            StartAt::End => "end",
                        },
                        Size(f.max_line_bytes)
                    ));
                }
                SourceKind::Syslog(c) => out.push_str(&format!(
                    "{} {:?} receives syslog on {} (messages up to {}, at most {} connections, device times without a zone read as {})",
                    if i == 0 { "" } else { ";" },
                    s.name,
                    c.listen.join(", "),
                    Size(c.max_message_bytes),
                    c.max_connections,
                    match &c.timezone {
                        Some(tz) => tz.iana_name().unwrap_or("the configured zone").to_string(),
                        None => "the host's time zone".to_string(),
                    }
                )),
                SourceKind::Journald(c) => out.push_str(&format!(
                    "{} {:?} reads the systemd journal{}{}{}",
                    if i == 0 { "" } else { ";" },
                    s.name,
                    c.directory
                        .as_ref()
                        .map(|d| format!(" in {}", d.display()))
                        .unwrap_or_else(|| " of this system".into()),
                    if c.units.is_empty() {
                        String::new()
                    } else {
                        format!(" for units {}", c.units.join(", "))
                    },
                    c.max_priority
                        .map(|p| format!(" up to priority {p}"))
                        .unwrap_or_default()
                )),
            }
        }
        out.push_str(&format!(
            ". Events are batched up to {} or {} and gzip-compressed once at level {}.",
            Size(self.spool.batch_max_bytes),
            HumanDuration(self.spool.batch_max_delay),
            self.spool.compression_level
        ));
        match &self.upstream {
            Some(u) => out.push_str(&format!(
                " Batches are shipped over mutual TLS to {} (certificate name {:?}){}.",
                u.address,
                u.server_name,
                u.proxy
                    .as_ref()
                    .map(|p| format!(" through the HTTP proxy {p}"))
                    .unwrap_or_default()
            )),
            None => out.push_str(
                " There is no [upstream]: batches stay in the local spool (see `soclink spool dump`).",
            ),
        }
        if let Some(i) = &self.intel {
            out.push_str(&format!(
                " Every {} an intel item goes to the center with a summary of the period and the records of {} include pattern(s) (at most {} of records per item).",
                HumanDuration(i.every),
                i.files.include.len(),
                crate::util::Size(i.max_upload_size)
            ));
        }
        out.push_str(&self.metrics.summary());
        out
    }
}

impl MetricsSettings {
    /// The sentence `check-config` adds when the endpoint is on.
    fn summary(&self) -> String {
        self.listen
            .map(|a| format!(" Prometheus metrics are served on http://{a}/metrics."))
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------------------

/// The validated relay configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub listen: Vec<String>,
    pub state_dir: PathBuf,
    pub store_dir: PathBuf,
    pub control_socket: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Identity of this relay when it forwards (defaults to the host name).
    pub id: String,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// Largest decompressed batch accepted: the gzip-bomb bound.
    pub max_batch_bytes: u64,
    pub upstream: Option<UpstreamConfig>,
    pub spool: SpoolSettings,
    /// PEM CRL files; client certificates listed there are refused.
    pub crls: Vec<PathBuf>,
    /// Certificate identities (downstream relays) allowed to send batches on behalf of
    /// other agents. Anyone else can only ever send its own.
    pub trusted_forwarders: Vec<String>,
    pub metrics: MetricsSettings,
    /// Connections from one IP address that may be in the TLS handshake (not yet
    /// authenticated) at once; past it, new ones from that address are closed.
    pub max_unauthenticated_per_address: usize,
    /// Unix group whose members may use the control socket (besides root and the
    /// relay's own user).
    pub operator_group: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    #[serde(default)]
    crls: Vec<PathBuf>,
    #[serde(default)]
    trusted_forwarders: Vec<String>,
    id: Option<Spanned<String>>,
    listen: Option<Vec<Spanned<String>>>,
    state_dir: Option<PathBuf>,
    store_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    max_connections: Option<Spanned<i64>>,
    max_unauthenticated_per_address: Option<Spanned<i64>>,
    operator_group: Option<Spanned<String>>,
    handshake_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    max_batch_bytes: Option<Spanned<Size>>,
    upstream: Option<Spanned<RawUpstream>>,
    #[serde(default)]
    spool: RawSpool,
    #[serde(default)]
    metrics: RawMetrics,
}

pub fn load_relay(path: &Path) -> Result<RelayConfig, ConfigError> {
    let text = read(path)?;
    parse_relay(&text).map_err(|problems| ConfigError {
        path: path.to_path_buf(),
        problems,
    })
}

pub fn parse_relay(text: &str) -> Result<RelayConfig, Vec<Problem>> {
    let raw: RawRelay = toml::from_str(text).map_err(|e| toml_problem(text, e))?;
    let mut p = Problems::new(text);
    let listen: Vec<String> = match raw.listen {
        Some(l) => {
            for a in &l {
                if a.get_ref().parse::<std::net::SocketAddr>().is_err() {
                    p.at(
                        a.span(),
                        format!(
                            "listen address {:?} must be ip:port, e.g. \"0.0.0.0:6514\" or \"[::]:6514\"",
                            a.get_ref()
                        ),
                    );
                }
            }
            l.into_iter().map(|a| a.into_inner()).collect()
        }
        None => vec!["0.0.0.0:6514".to_string()],
    };
    let id = match raw.id {
        Some(id) => {
            if let Err(why) = check_name(id.get_ref()) {
                p.at(id.span(), format!("`id` {why}"));
            }
            id.into_inner()
        }
        None => hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "relay".to_string()),
    };
    let max_connections = match raw.max_connections {
        Some(m) => match usize::try_from(*m.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                p.at(m.span(), "max_connections must be a positive number");
                1
            }
        },
        None => 4096,
    };
    let max_unauthenticated_per_address = match raw.max_unauthenticated_per_address {
        Some(m) => match usize::try_from(*m.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                p.at(
                    m.span(),
                    "max_unauthenticated_per_address must be a positive number",
                );
                1
            }
        },
        None => DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
    };
    let operator_group = operator_group(raw.operator_group, &mut p);
    let max_batch_bytes = raw
        .max_batch_bytes
        .as_ref()
        .map_or(256 << 20, |m| m.get_ref().0);
    let spool = spool_settings(raw.spool, &mut p);
    let upstream = raw.upstream.and_then(|u| upstream(u, &mut p));
    let metrics = metrics_settings(raw.metrics, &mut p);
    if !p.list.is_empty() {
        return Err(p.list);
    }
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RELAY_STATE_DIR));
    Ok(RelayConfig {
        listen,
        store_dir: raw.store_dir.unwrap_or_else(|| state_dir.join("store")),
        state_dir,
        control_socket: raw
            .control_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RELAY_CONTROL_SOCKET)),
        ca: raw.ca,
        cert: raw.cert,
        key: raw.key,
        id,
        max_connections,
        handshake_timeout: raw
            .handshake_timeout
            .map_or(Duration::from_secs(10), |d| d.0),
        idle_timeout: raw.idle_timeout.map_or(Duration::from_secs(300), |d| d.0),
        max_batch_bytes,
        upstream,
        spool,
        crls: raw.crls,
        trusted_forwarders: raw.trusted_forwarders,
        metrics,
        max_unauthenticated_per_address,
        operator_group,
    })
}

impl RelayConfig {
    pub fn summary(&self) -> String {
        format!(
            "Relay listening on {} for agents whose certificates are signed by {}; it stores what arrives under {} (state in {}), accepting at most {} connections and batches up to {} decompressed.{}",
            self.listen.join(", "),
            self.ca.display(),
            self.store_dir.display(),
            self.state_dir.display(),
            self.max_connections,
            Size(self.max_batch_bytes),
            match &self.upstream {
                Some(u) => format!(
                    " Everything received is spooled and forwarded to {}.",
                    u.address
                ),
                None => String::new(),
            }
        ) + &self.metrics.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "web-01"
state_dir = "/tmp/x"

[[source]]
name = "system"
type = "file"
include = ["/var/log/syslog", "/var/log/nginx/*.log"]
exclude = ["*.gz"]
start_at = "end"
max_line_bytes = "64KiB"

[spool]
max_size = "1GiB"
batch_max_bytes = "512KiB"
batch_max_delay = "250ms"
compression_level = 1
"#;

    #[test]
    fn parses_contract_keys() {
        let c = parse_agent(GOOD).unwrap();
        assert_eq!(c.id, "web-01");
        assert_eq!(c.sources.len(), 1);
        let SourceKind::File(f) = &c.sources[0].kind else {
            panic!("expected a file source")
        };
        assert_eq!(f.max_line_bytes, 64 << 10);
        assert_eq!(f.start_at, StartAt::End);
        assert_eq!(c.spool.batch_max_delay, Duration::from_millis(250));
        assert_eq!(c.spool.compression_level, 1);
        assert_eq!(c.spool.max_size, 1 << 30);
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_validated() {
        assert_eq!(parse_agent(GOOD).unwrap().metrics.listen, None);
        let c = parse_agent(&format!("{GOOD}\n[metrics]\nlisten = \"127.0.0.1:9273\"\n")).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9273".parse().unwrap()));
        assert!(
            c.summary()
                .ends_with(" Prometheus metrics are served on http://127.0.0.1:9273/metrics."),
            "{}",
            c.summary()
        );
        let e = parse_agent("id = \"a\"\n[metrics]\nlisten = \"localhost\"\n").unwrap_err();
        let m = e.iter().find(|p| p.message.contains("metrics.listen"));
        assert_eq!(m.map(|p| (p.line, p.col)), Some((3, 10)), "{e:?}");
        let relay =
            "ca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n[metrics]\nlisten = \"[::1]:9274\"\n";
        assert_eq!(
            parse_relay(relay).unwrap().metrics.listen,
            Some("[::1]:9274".parse().unwrap())
        );
        let e = parse_relay(&relay.replace("[::1]:9274", "::1")).unwrap_err();
        assert_eq!((e[0].line, e[0].col), (5, 10), "{e:?}");
        let e = parse_relay(&format!("{relay}bogus = 1\n")).unwrap_err();
        assert!(e[0].message.contains("bogus"), "{e:?}");
    }

    #[test]
    fn max_open_files_defaults_and_is_bounded() {
        let f = |c: AgentConfig| match &c.sources[0].kind {
            SourceKind::File(f) => f.max_open_files,
            _ => panic!("expected a file source"),
        };
        assert_eq!(f(parse_agent(GOOD).unwrap()), DEFAULT_MAX_OPEN_FILES);
        let src = "[[source]]\nname = \"s\"\ntype = \"file\"\ninclude = [\"/a\"]\n";
        assert_eq!(
            f(parse_agent(&format!("{src}max_open_files = 64\n")).unwrap()),
            64
        );
        let e = parse_agent(&format!("{src}max_open_files = 0\n")).unwrap_err();
        assert_eq!(e[0].line, 5, "{e:?}");
        assert!(e[0].message.contains("max_open_files"), "{e:?}");
    }

    #[test]
    fn syslog_timezone_is_an_iana_name_located_on_error() {
        let src =
            "[[source]]\nname = \"devices\"\ntype = \"syslog\"\nlisten = [\"udp://0.0.0.0:514\"]\n";
        let zone = |c: AgentConfig| match &c.sources[0].kind {
            SourceKind::Syslog(s) => s.timezone.clone(),
            _ => panic!("expected a syslog source"),
        };
        assert!(
            zone(parse_agent(src).unwrap()).is_none(),
            "default: the host's zone"
        );
        let c = parse_agent(&format!("{src}timezone = \"Asia/Taipei\"\n")).unwrap();
        assert!(
            c.summary()
                .contains("device times without a zone read as Asia/Taipei"),
            "{}",
            c.summary()
        );
        assert_eq!(
            zone(c)
                .and_then(|z| z.iana_name().map(str::to_string))
                .as_deref(),
            Some("Asia/Taipei")
        );
        let e = parse_agent(&format!("{src}timezone = \"Asia/Taipie\"\n")).unwrap_err();
        assert_eq!((e[0].line, e[0].col), (5, 12), "{e:?}");
        assert!(
            e[0].message.contains("unknown time zone \"Asia/Taipie\""),
            "{e:?}"
        );
        assert!(e[0].message.contains("\"Asia/Taipei\""), "{e:?}");
        // Only syslog sources read device times.
        let file =
            "[[source]]\nname = \"f\"\ntype = \"file\"\ninclude = [\"/a\"]\ntimezone = \"UTC\"\n";
        let e = parse_agent(file).unwrap_err();
        assert!(e[0].message.contains("timezone"), "{e:?}");
    }

    #[test]
    fn unknown_key_is_located() {
        let text = "state_dir = \"/x\"\nbogus = 1\n";
        let e = parse_agent(text).unwrap_err();
        assert_eq!(e[0].line, 2, "{e:?}");
        assert!(e[0].message.contains("bogus"), "{e:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
[[source]]
name = "a"
type = "file"
include = ["relative/*.log"]

[[source]]
name = "a"
type = "file"
include = ["/x/[.log"]

[spool]
compression_level = 12
"#;
        let e = parse_agent(text).unwrap_err();
        let lines: Vec<usize> = e.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![5, 8, 10, 13], "{e:?}");
        assert!(e[1].message.contains("duplicate source name"));
        assert!(e[2].message.contains("bad glob"));
    }

    #[test]
    fn bad_size_and_type() {
        let e = parse_agent(
            "[[source]]\nname = \"s\"\ntype = \"file\"\ninclude = [\"/a\"]\nmax_line_bytes = \"huge\"\n",
        )
        .unwrap_err();
        assert_eq!(e[0].line, 5, "{e:?}");
        let e = parse_agent("[[source]]\nname = \"s\"\ntype = \"carrier-pigeon\"\n").unwrap_err();
        assert!(e[0].message.contains("unknown source type"), "{e:?}");
    }

    #[test]
    fn names_are_safe_path_components() {
        for bad in ["", "..", "a/b", ".hidden", "a\0b", "-x"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("web-01.example_1").is_ok());
    }

    #[test]
    fn relay_defaults() {
        let r =
            parse_relay("ca = \"/c\"\ncert = \"/r\"\nkey = \"/k\"\nstate_dir = \"/s\"\n").unwrap();
        assert_eq!(r.listen, vec!["0.0.0.0:6514"]);
        assert_eq!(r.store_dir, PathBuf::from("/s/store"));
        assert!(
            parse_relay("ca = \"/c\"\ncert = \"/r\"\nkey = \"/k\"\nlisten = [\"nowhere\"]\n")
                .is_err()
        );
    }
}
