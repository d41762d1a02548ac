//! Syslog message parsing: RFC 5424, RFC 3164 and the variants real devices send.
//!
//! [`parse`] borrows every field from the input (no allocation) and never fails:
//! whatever it cannot make sense of is reported in [`Parsed::parse_error`], and then
//! [`Parsed::message`] is the *whole* original input, byte for byte, so nothing a
//! device sent is ever lost to a parser that did not understand it.
//!
//! What is recognised, after an optional `<PRI>`:
//!
//! ```text
//! RFC 5424   <165>1 2026-11-26T01:02:03.1Z host app 1234 ID47 [id k="v\"]"][id2 a="b"] BOM msg
//! RFC 3164   <34>Oct 11 22:14:15 mymachine su[123]: msg
//!   variants: no hostname (`<34>Oct 11 22:14:15 su: msg`), a year (`Oct 11 2026 22:14:15`,
//!             `Oct 11 22:14:15 2026`), fractions, an ISO 8601 timestamp, no timestamp,
//!             no tag (Palo Alto CSV: `<14>Nov 26 01:02:03 PA-220 1,2026/11/26 ...`)
//! Cisco IOS  <189>123: *Mar  1 00:00:12.123: %SYS-5-CONFIG_I: Configured from console
//!            <189>Mar  1 00:00:12 router1 123: *Mar  1 00:00:12.123 UTC: %SYS-5-...
//! Fortinet   <189>date=2026-11-26 time=01:02:03 devname="FGT" devid="FG100" ...
//! ```
//!
//! Header fields are only ever taken from bytes that are valid UTF-8 without control
//! characters; the message part may be any bytes (the encoder base64s what is not UTF-8).
//!
//! The few direct slice indexings below use positions found by searching the same
//! slice (memchr, `position`) or lengths checked on the line before; everything else
//! goes through `get`/`strip_prefix`. The fuzz tests in `tests/syslog_parse.rs` run
//! arbitrary bytes through every path.

/// Which grammar a message was read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Rfc5424,
    Rfc3164,
    /// No PRI, or nothing recognisable: only `message` (the whole input) is meaningful.
    Unknown,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Rfc5424 => "rfc5424",
            Format::Rfc3164 => "rfc3164",
            Format::Unknown => "unknown",
        }
    }
}

/// A parsed syslog message; every field borrows from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The PRI value (facility * 8 + severity), 0..=191.
    pub pri: Option<u8>,
    pub facility: Option<u8>,
    pub severity: Option<u8>,
    /// The timestamp exactly as sent (Cisco's `*`/`.` clock-state marker removed).
    pub timestamp: Option<&'a str>,
    pub hostname: Option<&'a str>,
    /// RFC 5424 APP-NAME, RFC 3164 TAG.
    pub app: Option<&'a str>,
    pub procid: Option<&'a str>,
    /// RFC 5424 MSGID; for Cisco IOS the `%FACILITY-SEVERITY-MNEMONIC` (without `%`).
    pub msgid: Option<&'a str>,
    /// Raw RFC 5424 STRUCTURED-DATA (all elements, escapes kept), `None` for NILVALUE.
    pub structured_data: Option<&'a str>,
    /// The MSG part (UTF-8 BOM stripped); the whole input when `parse_error` is set.
    pub message: &'a [u8],
    pub format: Format,
    pub parse_error: Option<&'static str>,
}

impl<'a> Parsed<'a> {
    fn empty(msg: &'a [u8]) -> Parsed<'a> {
        Parsed {
            pri: None,
            facility: None,
            severity: None,
            timestamp: None,
            hostname: None,
            app: None,
            procid: None,
            msgid: None,
            structured_data: None,
            message: msg,
            format: Format::Unknown,
            parse_error: None,
        }
    }

    fn failed(mut self, whole: &'a [u8], why: &'static str) -> Parsed<'a> {
        self.message = whole;
        self.parse_error = Some(why);
        self
    }
}

/// Facility names as rsyslog spells them (index = facility code).
const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];
const SEVERITIES: [&str; 8] = [
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
];

pub fn facility_name(code: u8) -> Option<&'static str> {
    FACILITIES.get(usize::from(code)).copied()
}

pub fn severity_name(code: u8) -> Option<&'static str> {
    SEVERITIES.get(usize::from(code)).copied()
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parse one syslog message. Never panics, never allocates.
pub fn parse(msg: &[u8]) -> Parsed<'_> {
    let mut p = Parsed::empty(msg);
    if msg.is_empty() {
        return p.failed(msg, "empty message");
    }
    let Some((pri, rest)) = parse_pri(msg) else {
        let why = if msg.first() == Some(&b'<') {
            "invalid PRI"
        } else {
            "missing PRI"
        };
        return p.failed(msg, why);
    };
    p.pri = Some(pri);
    p.facility = Some(pri >> 3);
    p.severity = Some(pri & 7);
    if let Some(after_version) = rfc5424_version(rest) {
        return parse_5424(p, msg, after_version);
    }
    parse_3164(p, rest)
}

/// `<N>` with 1..=3 digits and N <= 191.
fn parse_pri(msg: &[u8]) -> Option<(u8, &[u8])> {
    let rest = msg.strip_prefix(b"<")?;
    let digits = rest
        .iter()
        .take(4)
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits == 0 || digits > 3 || rest.get(digits) != Some(&b'>') {
        return None;
    }
    let mut v: u16 = 0;
    for &c in rest.get(..digits)? {
        v = v * 10 + u16::from(c - b'0');
    }
    let v = u8::try_from(v).ok().filter(|v| *v <= 191)?;
    Some((v, rest.get(digits + 1..)?))
}

/// `1 ` followed by something that can be an RFC 5424 TIMESTAMP (`-` or a digit).
fn rfc5424_version(rest: &[u8]) -> Option<&[u8]> {
    let digits = rest
        .iter()
        .take(3)
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits == 0 || digits > 2 || rest.first() == Some(&b'0') {
        return None;
    }
    let after = rest.get(digits..)?.strip_prefix(b" ")?;
    match after.first() {
        Some(b'-') if matches!(after.get(1), Some(b' ') | None) => Some(after),
        Some(c) if c.is_ascii_digit() && is_iso_date(after) => Some(after),
        _ => None,
    }
}

fn is_iso_date(b: &[u8]) -> bool {
    b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit)
}

/// Split off the next space-terminated token (the space is consumed).
fn token(b: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b' ', b) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

/// A header field: UTF-8 without control characters, else `None`.
fn field(b: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(b).ok()?;
    // `char::is_control` includes the C1 range (U+0080..U+009F), which terminals obey.
    (!s.is_empty() && !s.chars().any(char::is_control)).then_some(s)
}

/// An RFC 5424 header field, `-` meaning absent.
fn nil_field(b: &[u8]) -> Result<Option<&str>, ()> {
    if b == b"-" {
        return Ok(None);
    }
    field(b).map(Some).ok_or(())
}

fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(BOM).unwrap_or(b)
}

fn parse_5424<'a>(mut p: Parsed<'a>, whole: &'a [u8], rest: &'a [u8]) -> Parsed<'a> {
    p.format = Format::Rfc5424;
    let (ts, rest) = token(rest);
    let (host, rest) = token(rest);
    let (app, rest) = token(rest);
    let (procid, rest) = token(rest);
    let (msgid, rest) = token(rest);
    let fields = (
        nil_field(ts),
        nil_field(host),
        nil_field(app),
        nil_field(procid),
        nil_field(msgid),
    );
    let (Ok(ts), Ok(host), Ok(app), Ok(procid), Ok(msgid)) = fields else {
        return p.failed(whole, "invalid RFC 5424 header field");
    };
    p.timestamp = ts;
    p.hostname = host;
    p.app = app;
    p.procid = procid;
    p.msgid = msgid;
    // Devices that stop after MSGID (no SD, no MSG) are common enough to accept.
    if rest.is_empty() {
        p.message = rest;
        return p;
    }
    let msg = if let Some(after_nil) = rest.strip_prefix(b"-") {
        after_nil
    } else if rest.first() == Some(&b'[') {
        let Some((sd, after_sd)) = sd_len(rest).and_then(|n| rest.split_at_checked(n)) else {
            return p.failed(whole, "malformed structured data");
        };
        let Ok(sd) = std::str::from_utf8(sd) else {
            return p.failed(whole, "structured data is not UTF-8");
        };
        p.structured_data = Some(sd);
        after_sd
    } else {
        return p.failed(whole, "missing structured data");
    };
    // Lenient: a MSG glued to the SD without the separating space is still the MSG.
    let msg = msg.strip_prefix(b" ").unwrap_or(msg);
    p.message = strip_bom(msg);
    p
}

/// Length of the STRUCTURED-DATA elements at the start of `b` (which starts with `[`).
fn sd_len(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while b.get(i) == Some(&b'[') {
        i += 1;
        let mut in_quote = false;
        loop {
            let c = *b.get(i)?;
            i += 1;
            match (in_quote, c) {
                (true, b'\\') => i += 1,
                (true, b'"') => in_quote = false,
                (false, b'"') => in_quote = true,
                (false, b']') => break,
                (false, b'[') => return None,
                _ => {}
            }
        }
    }
    (i <= b.len()).then_some(i)
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

fn digits_at(b: &[u8], at: usize, min: usize, max: usize) -> Option<usize> {
    let n = b
        .get(at..)?
        .iter()
        .take(max + 1)
        .take_while(|c| c.is_ascii_digit())
        .count();
    (n >= min && n <= max).then_some(at + n)
}

/// `hh:mm:ss` with an optional `.fraction`; returns the end.
fn clock_at(b: &[u8], at: usize) -> Option<usize> {
    let i = digits_at(b, at, 2, 2)?;
    (b.get(i) == Some(&b':')).then_some(())?;
    let i = digits_at(b, i + 1, 2, 2)?;
    (b.get(i) == Some(&b':')).then_some(())?;
    let i = digits_at(b, i + 1, 2, 2)?;
    if b.get(i) == Some(&b'.')
        && let Some(j) = digits_at(b, i + 1, 1, 9)
    {
        return Some(j);
    }
    Some(i)
}

/// `Mmm dd hh:mm:ss[.f]`, `Mmm dd yyyy hh:mm:ss`, `Mmm dd hh:mm:ss yyyy`; returns its length.
fn bsd_timestamp(b: &[u8]) -> Option<usize> {
    let mon = b.get(..3)?;
    if !MONTHS.iter().any(|m| m.eq_ignore_ascii_case(mon)) || b.get(3) != Some(&b' ') {
        return None;
    }
    let mut i = 4;
    if b.get(i) == Some(&b' ') {
        i += 1; // space-padded day: `Mar  1`
    }
    i = digits_at(b, i, 1, 2)?;
    (b.get(i) == Some(&b' ')).then_some(())?;
    i += 1;
    if let Some(y) = digits_at(b, i, 4, 4)
        && b.get(y) == Some(&b' ')
    {
        return clock_at(b, y + 1);
    }
    let end = clock_at(b, i)?;
    // A trailing year, only when a space follows it (a 4-digit hostname is unlikely).
    if b.get(end) == Some(&b' ')
        && let Some(y) = digits_at(b, end + 1, 4, 4)
        && b.get(y) == Some(&b' ')
    {
        return Some(y);
    }
    Some(end)
}

/// An ISO 8601 / RFC 3339 timestamp token (`2026-11-26T01:02:03.123+08:00`).
fn iso_timestamp(b: &[u8]) -> Option<usize> {
    if !is_iso_date(b) || b.get(10) != Some(&b'T') {
        return None;
    }
    let end = memchr::memchr(b' ', b).unwrap_or(b.len());
    b[..end]
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b':' | b'.' | b'+' | b'-'))
        .then_some(end)
}

fn parse_3164<'a>(mut p: Parsed<'a>, body: &'a [u8]) -> Parsed<'a> {
    p.format = Format::Rfc3164;
    let mut rest = body;
    if let Some(p) = cisco(&p, rest) {
        // `<189>123: *Mar  1 ...: %SYS-5-...`: no header, the IOS timestamp follows.
        return p;
    }
    if rest.starts_with(b"date=") || rest.starts_with(b"logver=") {
        return fortinet(p, rest);
    }
    let ts_len = bsd_timestamp(rest).or_else(|| iso_timestamp(rest));
    if let Some((ts, after_ts)) = ts_len.and_then(|n| rest.split_at_checked(n)) {
        // Only ASCII bytes were matched, so this slice is valid UTF-8.
        p.timestamp = std::str::from_utf8(ts).ok();
        rest = after_ts;
        // Cisco ASA ends its timestamp with a colon: `Nov 26 2026 01:02:03: %ASA-...`.
        rest = rest.strip_prefix(b":").unwrap_or(rest);
        rest = rest.strip_prefix(b" ").unwrap_or(rest);
        // A hostname is a token followed by a space that is not itself the tag.
        let (tok, after) = token(rest);
        let is_tag = tok.ends_with(b":") || tok.contains(&b'[');
        if !after.is_empty()
            && !is_tag
            && !tok.is_empty()
            && let Some(h) = field(tok)
        {
            p.hostname = Some(h);
            rest = after;
        }
        if let Some(p) = cisco(&p, rest) {
            return p;
        }
        // ASA with a hostname: `... asa1 : %ASA-6-302013: ...`.
        if p.hostname.is_some() {
            rest = rest.strip_prefix(b": ").unwrap_or(rest);
        }
    }
    tag(p, rest)
}

/// Cisco IOS: `123: [*|.]TIMESTAMP: %FAC-SEV-MNEMONIC: text` (sequence number first).
/// The message keeps the sequence number (gaps in it are evidence of lost messages);
/// the IOS timestamp and the mnemonic are lifted into `timestamp` and `msgid`.
fn cisco<'a>(p: &Parsed<'a>, body: &'a [u8]) -> Option<Parsed<'a>> {
    let end = digits_at(body, 0, 1, 10)?;
    let mut rest = body.get(end..)?.strip_prefix(b": ")?;
    let mut out = p.clone();
    // `logging origin-id hostname`: `123: router1: *Mar  1 ...`.
    if let Some(colon) = memchr::memmem::find(rest, b": ") {
        let name = rest.get(..colon)?;
        let after = rest.get(colon + 2..)?;
        let follows = matches!(after.first(), Some(b'*' | b'.' | b'%'))
            || bsd_timestamp(after).is_some()
            || iso_timestamp(after).is_some();
        if follows
            && name.first().is_some_and(u8::is_ascii_alphanumeric)
            && !name.contains(&b' ')
            && bsd_timestamp(rest).is_none()
            && iso_timestamp(rest).is_none()
            && let Some(h) = field(name)
        {
            out.hostname = Some(h);
            rest = after;
        }
    }
    let marked = rest.first().is_some_and(|c| matches!(c, b'*' | b'.'));
    let unmarked = if marked { rest.get(1..)? } else { rest };
    if bsd_timestamp(unmarked).is_some() || iso_timestamp(unmarked).is_some() {
        // The IOS timestamp may carry a time zone (`... 00:00:12.123 UTC`): it ends at `: `.
        let end = memchr::memmem::find(unmarked, b": ").filter(|e| *e <= 48)?;
        out.timestamp = field(unmarked.get(..end)?);
        rest = unmarked.get(end + 2..)?;
    }
    out.msgid = Some(mnemonic(rest)?);
    out.message = body;
    Some(out)
}

/// A Cisco-style `%FACILITY-SEVERITY-MNEMONIC:` at the start (IOS, ASA, NX-OS).
fn mnemonic(b: &[u8]) -> Option<&str> {
    let m = b.strip_prefix(b"%")?;
    let end = memchr::memchr(b':', m)?;
    let name = m.get(..end)?;
    let ok = name.len() <= 64
        && name.contains(&b'-')
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'));
    if ok { field(name) } else { None }
}

/// FortiGate key=value logs: no header; the device name is the `devname` value.
fn fortinet<'a>(mut p: Parsed<'a>, b: &'a [u8]) -> Parsed<'a> {
    if let Some(at) = memchr::memmem::find(b, b"devname=") {
        let v = &b[at + 8..];
        let name = match v.strip_prefix(b"\"") {
            Some(q) => &q[..memchr::memchr(b'"', q).unwrap_or(q.len())],
            None => token(v).0,
        };
        p.hostname = field(name);
    }
    p.message = b;
    p
}

/// `TAG[PID]: msg` or `TAG: msg`; anything else is all message.
fn tag<'a>(mut p: Parsed<'a>, b: &'a [u8]) -> Parsed<'a> {
    p.message = strip_bom(b);
    if let Some(m) = mnemonic(b) {
        p.msgid = Some(m);
        return p;
    }
    let end = b
        .iter()
        .take(65)
        .position(|&c| matches!(c, b'[' | b':' | b' '))
        .unwrap_or(usize::MAX);
    if end == 0 || end > 64 {
        return p;
    }
    let Some(app) = field(&b[..end]) else {
        return p;
    };
    if !app
        .bytes()
        .all(|c| c.is_ascii_graphic() && !matches!(c, b',' | b'=' | b'"'))
    {
        return p;
    }
    let mut rest = &b[end..];
    let mut procid = None;
    if let Some(r) = rest.strip_prefix(b"[") {
        let Some(close) = memchr::memchr(b']', r) else {
            return p;
        };
        if close == 0 || close > 128 {
            return p;
        }
        procid = field(&r[..close]);
        if procid.is_none() {
            return p;
        }
        rest = &r[close + 1..];
    }
    let Some(r) = rest.strip_prefix(b":") else {
        return p;
    };
    if !(r.is_empty() || r.starts_with(b" ")) {
        return p;
    }
    p.app = Some(app);
    p.procid = procid;
    p.message = strip_bom(r.strip_prefix(b" ").unwrap_or(r));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pri_bounds() {
        assert_eq!(parse_pri(b"<0>x"), Some((0, &b"x"[..])));
        assert_eq!(parse_pri(b"<191>"), Some((191, &b""[..])));
        assert_eq!(parse_pri(b"<192>x"), None);
        assert_eq!(parse_pri(b"<1234>x"), None);
        assert_eq!(parse_pri(b"<>x"), None);
        assert_eq!(parse_pri(b"<12"), None);
    }

    #[test]
    fn sd_lengths() {
        assert_eq!(sd_len(b"[a]"), Some(3));
        assert_eq!(sd_len(b"[a b=\"x\\]\"][c] m"), Some(14));
        assert_eq!(sd_len(b"[a b=\"x]"), None);
        assert_eq!(sd_len(b"[a b=\"\\"), None);
        assert_eq!(sd_len(b"[a [b]"), None);
    }

    #[test]
    fn timestamps() {
        assert_eq!(bsd_timestamp(b"Oct 11 22:14:15 x"), Some(15));
        assert_eq!(bsd_timestamp(b"Mar  1 00:00:12.123: x"), Some(19));
        assert_eq!(bsd_timestamp(b"Oct 11 2026 22:14:15 x"), Some(20));
        assert_eq!(bsd_timestamp(b"Oct 11 22:14:15 2026 x"), Some(20));
        assert_eq!(bsd_timestamp(b"Oct 11 22:14"), None);
        assert_eq!(bsd_timestamp(b"Foo 11 22:14:15"), None);
        assert_eq!(iso_timestamp(b"2026-11-26T01:02:03Z h"), Some(20));
    }
}
