//! rsyslog as a real sender: a private rsyslogd instance (own config, pid file and work
//! directory in a tempdir; no imuxsock, no imklog: it is never the system logger) reads
//! two files with imfile and forwards them to our listeners: over TCP with octet-counted
//! framing (RFC 6587) in the traditional format, and over TLS (RFC 5425, GnuTLS, with a
//! client certificate our listener requires) in RFC 5424 format.
//!
//! Needs the Debian packages `rsyslog` and `rsyslog-gnutls`. Without them the test
//! fails under CI (`CI` set) and is skipped, loudly, elsewhere.

mod syslog_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use syslog_common::{Opts, by_id, start};

fn rsyslogd() -> Option<PathBuf> {
    let found = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let gtls = glob::glob("/usr/lib/*/rsyslog/lmnsd_gtls.so")
        .ok()?
        .chain(glob::glob("/usr/lib/rsyslog/lmnsd_gtls.so").ok()?)
        .flatten()
        .next();
    gtls.map(|_| found)
}

/// Kills the private rsyslogd however the test ends.
struct Rsyslog {
    child: Child,
    log: PathBuf,
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Rsyslog {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn config(dir: &Path, certs: &soclink::certs::DevCerts, tcp_port: u16, tls_port: u16) -> String {
    let d = dir.display();
    format!(
        r#"global(workDirectory="{d}/work"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imfile")
template(name="soclink5424" type="string"
         string="<%PRI%>1 %TIMESTAMP:::date-rfc3339% %HOSTNAME% %APP-NAME% %PROCID% %MSGID% %STRUCTURED-DATA% %msg%")
input(type="imfile" file="{d}/in-tcp.log" tag="soclinktcp:" facility="local3" severity="warning" ruleset="tcp")
input(type="imfile" file="{d}/in-tls.log" tag="soclinktls" facility="auth" severity="info" ruleset="tls")
ruleset(name="tcp") {{
  action(type="omfwd" target="127.0.0.1" port="{tcp_port}" protocol="tcp" TCP_Framing="octet-counted")
}}
ruleset(name="tls") {{
  action(type="omfwd" target="127.0.0.1" port="{tls_port}" protocol="tcp" TCP_Framing="octet-counted"
         template="soclink5424" StreamDriver="gtls" StreamDriverMode="1"
         StreamDriverAuthMode="x509/name" StreamDriverPermittedPeers="localhost")
}}
"#,
        ca = certs.ca.display(),
        cert = certs.agent.display(),
        key = certs.agent_key.display(),
    )
}

fn lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix} id={prefix}-{i:04} \"quoted\" back\\slash 中文 [brackets] end"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsyslog_forwards_over_tcp_and_tls() {
    let Some(bin) = rsyslogd() else {
        let msg = "rsyslogd with GnuTLS support not found: install the Debian packages \
                   `rsyslog rsyslog-gnutls` (CI: add them to the apt-get line of .ci/run)";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("\n\n*** SKIPPED rsyslog_forwards_over_tcp_and_tls: {msg} ***\n\n");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs =
        soclink::certs::write_dev_certs(&dir.path().join("certs"), "rsyslog-sender").unwrap();
    // `tls_ca` set: rsyslog must present its client certificate.
    let server = soclink::agent::sources::syslog::tls_server_config(
        &certs.relay,
        &certs.relay_key,
        Some(&certs.ca),
    )
    .unwrap();
    let mut r = start(Opts {
        tls: Some(server),
        ..Opts::default()
    })
    .await;

    let tcp_lines = lines("rstcp", 200);
    let tls_lines = lines("rstls", 200);
    std::fs::create_dir(dir.path().join("work")).unwrap();
    std::fs::write(dir.path().join("in-tcp.log"), tcp_lines.join("\n") + "\n").unwrap();
    std::fs::write(dir.path().join("in-tls.log"), tls_lines.join("\n") + "\n").unwrap();
    let conf = dir.path().join("rsyslog.conf");
    std::fs::write(
        &conf,
        config(dir.path(), &certs, r.tcp.port(), r.tls.unwrap().port()),
    )
    .unwrap();

    let log = dir.path().join("rsyslogd.out");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin)
        .arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.path().join("rsyslogd.pid"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let rsyslog = Rsyslog { child, log };

    let want = tcp_lines.len() + tls_lines.len();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while events.len() < want {
        match tokio::time::timeout_at(deadline, r.rx.recv()).await {
            Ok(Some(b)) => events.extend(syslog_common::batch_events(&b)),
            _ => panic!(
                "got {} of {want} events from rsyslog; its output:\n{}",
                events.len(),
                rsyslog.output()
            ),
        }
    }
    drop(rsyslog);

    let got = by_id(&events);
    assert_eq!(got.len(), want);
    // rsyslog sends the short name unless told to preserve the FQDN.
    let host = hostname::get().unwrap().into_string().unwrap();
    let short = host.split('.').next().unwrap().to_string();
    for (sent, app, fac, sev, format) in [
        (&tcp_lines, "soclinktcp", "local3", "warning", "rfc3164"),
        (&tls_lines, "soclinktls", "auth", "info", "rfc5424"),
    ] {
        for line in sent {
            let id = line.split_whitespace().nth(1).unwrap();
            let e = &got[id];
            assert_eq!(e["message"].as_str().unwrap(), line, "byte for byte: {e}");
            assert_eq!(e["app"], app);
            assert_eq!(e["facility"], fac);
            assert_eq!(e["severity"], sev);
            assert_eq!(e["format"], format);
            assert_eq!(e["hostname"].as_str().unwrap(), short);
            assert!(e["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
            assert!(e.get("parse_error").is_none() && e.get("truncated").is_none());
        }
    }
    assert_eq!(r.stats.connection_errors.load(Ordering::Relaxed), 0);
    assert!(r.shutdown().await.is_empty(), "nothing twice");
}
