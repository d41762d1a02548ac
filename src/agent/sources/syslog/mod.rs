//! The syslog source: receives RFC 3164 / RFC 5424 messages from network devices over
//! UDP, TCP (RFC 6587 framing) and TLS (RFC 5425), and turns each into one NDJSON event.
//!
//! ```text
//! UdpSocket ─┐                                 ┌─ parse ─ encode ─┐
//! TcpListener ─ accept ─ connection task ─ framer ─────────────────┤ Chunk
//! TcpListener ─ accept ─ TLS handshake ─ connection task ─ ... ────┤ (bounded channel)
//!                                                                  └─> batcher ─> SealedBatch
//! ```
//!
//! - [`parse`]: the parser (borrows from the input, never fails, never panics).
//! - [`timestamp`]: device timestamps to UTC (the listener's zone, the year inferred).
//! - [`framing`]: the TCP stream decoder (octet counting or LF, bounded memory).
//! - [`listener`]: sockets, connection limits, idle timeouts, backpressure, batching.
//! - here: [`parse_listen`] for `listen` URLs, [`tls_server_config`] for `tls://`
//!   listeners, [`encode_syslog_event`], and the counters ([`SyslogStats`]).
//!
//! Invariants: every message received is either in a batch or counted as dropped
//! (only UDP can drop: when the pipeline is full, a datagram has nowhere to wait);
//! a message the parser does not understand is kept whole with `parse_error` set;
//! memory is bounded by `max_message_bytes` per connection plus the bounded queue.
//!
//! The event (one line; optional fields only when known):
//!
//! ```text
//! {"ts":"2026-11-26T01:02:03.123456789Z",      // the device's time in UTC (ns); the receive
//!                                               // time when it sent none or was not understood
//!  "received":"2026-11-26T01:02:03.200000000Z", // when soclink received it (UTC, ns)
//!  "host":"agent-01","source":"devices",        // collecting host, configured source name
//!  "remote_addr":"192.0.2.7:51514",             // the sender's address
//!  "message":"..." | "message_base64":"...",    // MSG (the whole input if unparsed)
//!  "facility":"auth","severity":"err",          // from PRI
//!  "syslog_ts":"Oct 11 09:02:03",               // the timestamp as the device sent it
//!  "clock":"not_authoritative"|"not_synchronized", // Cisco's `*` / `.` before the time
//!  "hostname":"..","app":"..","procid":"..","msgid":"..",
//!  "sequence":"123",                            // Cisco's sequence number
//!  "sd":"[id k=\"v\"]",                         // raw RFC 5424 structured data
//!  "version":2,                                 // RFC 5424 VERSION, only when not 1
//!  "format":"rfc5424"|"rfc3164"|"unknown",
//!  "parse_error":"invalid RFC 5424 TIMESTAMP",  // only when not understood: which part
//!  "truncated":true}                            // only when cut to max_message_bytes
//! ```

pub mod framing;
pub mod listener;
pub mod parse;
pub mod timestamp;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use framing::{FrameError, Framer, Framing};
pub use listener::{SyslogLimits, SyslogListen, SyslogSource};
pub use parse::{
    ClockState, Format, Parsed, Stamp, StampZone, facility_name, parse, severity_name,
};
pub use timestamp::{DeviceClock, format_utc};

use crate::event::{push_json_str, push_message};
use crate::tls::{TlsError, load_certs, load_key};

/// Counters shown by `soclink status`; all only grow except `active_connections`.
#[derive(Debug, Default)]
pub struct SyslogStats {
    /// Messages turned into events.
    pub received: AtomicU64,
    /// Message bytes received (after truncation).
    pub bytes: AtomicU64,
    pub parse_errors: AtomicU64,
    pub truncated: AtomicU64,
    /// UDP datagrams dropped because the pipeline was full.
    pub udp_drops: AtomicU64,
    /// TCP/TLS connections accepted.
    pub connections: AtomicU64,
    pub active_connections: AtomicU64,
    /// Connections refused because `max_connections` were open.
    pub rejected_connections: AtomicU64,
    /// Connections closed for a framing error, a failed TLS handshake or a read error.
    pub connection_errors: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
    Tls,
}

/// One `listen` entry of the config: `udp://0.0.0.0:514`, `tcp://[::1]:514`, `tls://…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub proto: Proto,
    pub addr: SocketAddr,
}

/// Parse a listen URL. The host must be an IP address (a listener binds an address,
/// and resolving names at startup would make the bound address depend on DNS).
pub fn parse_listen(url: &str) -> Result<ListenAddr, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("invalid listen address {url:?}: expected e.g. \"udp://0.0.0.0:514\"")
    })?;
    let proto = match scheme.to_ascii_lowercase().as_str() {
        "udp" => Proto::Udp,
        "tcp" => Proto::Tcp,
        "tls" => Proto::Tls,
        _ => {
            return Err(format!(
                "invalid listen address {url:?}: the scheme must be udp://, tcp:// or tls://"
            ));
        }
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let addr: SocketAddr = rest.parse().map_err(|_| {
        format!(
            "invalid listen address {url:?}: expected an IP address and a port, e.g. \"0.0.0.0:514\" or \"[::]:514\""
        )
    })?;
    Ok(ListenAddr { proto, addr })
}

/// The server configuration of a `tls://` listener (RFC 5425) from PEM files.
///
/// Unlike the relay's (`crate::tls`), a syslog listener serves network devices, so:
/// TLS 1.2 is accepted (RFC 5425 requires it and many devices have nothing newer), and
/// client certificates are required only when `ca` is given (`tls_ca`), in which case
/// every sender must present one that chains to it.
pub fn tls_server_config(
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for (index, c) in load_certs(ca)?.into_iter().enumerate() {
                roots.add(c).map_err(|e| TlsError::BadCa {
                    path: ca.to_owned(),
                    index: index + 1,
                    reason: e.to_string(),
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::CertKey {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(config))
}

/// Append one syslog event (and its newline) to `out`, with `ts` as its only time
/// (callers that have no device clock: tests, fuzzing).
pub fn encode_syslog_event(
    out: &mut Vec<u8>,
    ts: &str,
    host: &str,
    source: &str,
    peer: &str,
    parsed: &Parsed,
    truncated: bool,
) {
    encode_syslog_event_at(out, ts, None, host, source, peer, parsed, truncated);
}

/// Append one syslog event (and its newline) to `out`: `ts` is the event's time in UTC
/// (the device's, or the receive time), `received` the receive time.
#[allow(clippy::too_many_arguments)]
pub fn encode_syslog_event_at(
    out: &mut Vec<u8>,
    ts: &str,
    received: Option<&str>,
    host: &str,
    source: &str,
    peer: &str,
    parsed: &Parsed,
    truncated: bool,
) {
    out.extend_from_slice(b"{\"ts\":");
    push_time(out, ts);
    if let Some(r) = received {
        out.extend_from_slice(b",\"received\":");
        push_time(out, r);
    }
    out.extend_from_slice(b",\"host\":");
    push_json_str(out, host);
    out.extend_from_slice(b",\"source\":");
    push_json_str(out, source);
    out.extend_from_slice(b",\"remote_addr\":");
    push_json_str(out, peer);
    push_message(out, parsed.message);
    let opt = |out: &mut Vec<u8>, key: &[u8], v: Option<&str>| {
        if let Some(v) = v {
            out.extend_from_slice(key);
            push_json_str(out, v);
        }
    };
    opt(
        out,
        b",\"facility\":",
        parsed.facility.and_then(facility_name),
    );
    opt(
        out,
        b",\"severity\":",
        parsed.severity.and_then(severity_name),
    );
    opt(out, b",\"syslog_ts\":", parsed.timestamp);
    opt(out, b",\"clock\":", parsed.clock.map(ClockState::as_str));
    opt(out, b",\"hostname\":", parsed.hostname);
    opt(out, b",\"app\":", parsed.app);
    opt(out, b",\"procid\":", parsed.procid);
    opt(out, b",\"msgid\":", parsed.msgid);
    opt(out, b",\"sequence\":", parsed.sequence);
    opt(out, b",\"sd\":", parsed.structured_data);
    if let Some(v) = parsed.version.filter(|v| *v != 1) {
        out.extend_from_slice(b",\"version\":");
        out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }
    opt(out, b",\"format\":", Some(parsed.format.as_str()));
    opt(out, b",\"parse_error\":", parsed.parse_error);
    if truncated {
        out.extend_from_slice(b",\"truncated\":true");
    }
    out.extend_from_slice(b"}\n");
}

/// A time as a JSON string: RFC 3339 times need no escaping (checked, since callers
/// may pass anything: the escaping path is taken when it is needed).
fn push_time(out: &mut Vec<u8>, t: &str) {
    if t.bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b':' | b'.' | b'+'))
    {
        out.push(b'"');
        out.extend_from_slice(t.as_bytes());
        out.push(b'"');
    } else {
        push_json_str(out, t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_urls() {
        let a = parse_listen("udp://0.0.0.0:514").unwrap();
        assert_eq!(
            (a.proto, a.addr.to_string().as_str()),
            (Proto::Udp, "0.0.0.0:514")
        );
        let a = parse_listen("TLS://[::1]:6514").unwrap();
        assert_eq!(
            (a.proto, a.addr.to_string().as_str()),
            (Proto::Tls, "[::1]:6514")
        );
        assert_eq!(
            parse_listen("tcp://127.0.0.1:514/").unwrap().proto,
            Proto::Tcp
        );
        assert!(parse_listen("0.0.0.0:514").is_err());
        assert!(parse_listen("http://0.0.0.0:514").is_err());
        assert!(parse_listen("tcp://localhost:514").is_err());
        assert!(parse_listen("tcp://0.0.0.0").is_err());
        assert!(parse_listen("tcp://::1:514").is_err());
    }

    #[test]
    fn tls_config_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let err = tls_server_config(&cert, &cert, None).unwrap_err();
        assert!(
            matches!(&err, TlsError::Read { path, .. } if *path == cert),
            "{err}"
        );
        std::fs::write(&cert, "not pem").unwrap();
        let err = tls_server_config(&cert, &cert, None).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err}");
    }

    #[test]
    fn event_has_every_field() {
        let p = parse(b"<165>1 2026-11-26T01:02:03Z h a 1 M [x y=\"\\\"\"] \xEF\xBB\xBFhi");
        let mut out = Vec::new();
        encode_syslog_event(&mut out, "T", "H", "S", "1.2.3.4:5", &p, true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ts":"T","host":"H","source":"S","remote_addr":"1.2.3.4:5",
                "message":"hi","facility":"local4","severity":"notice",
                "syslog_ts":"2026-11-26T01:02:03Z","hostname":"h","app":"a","procid":"1",
                "msgid":"M","sd":"[x y=\"\\\"\"]","format":"rfc5424","truncated":true})
        );
        assert_eq!(out.iter().filter(|&&c| c == b'\n').count(), 1);
    }
}
