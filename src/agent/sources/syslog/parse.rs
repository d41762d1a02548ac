//! Syslog message parsing: RFC 5424, RFC 3164 and the variants real devices send.
//!
//! [`parse`] borrows every field from the input (no allocation) and never fails:
//! whatever it cannot make sense of is reported in [`Parsed::parse_error`], which names
//! the part at fault, and then [`Parsed::message`] is the *whole* original input, byte
//! for byte, so nothing a device sent is ever lost to a parser that did not understand it.
//!
//! What is recognised, after an optional `<PRI>`:
//!
//! ```text
//! RFC 5424   <165>1 2026-11-26T01:02:03.1Z host app 1234 ID47 [id k="v\"]"][id2 a="b"] BOM msg
//! RFC 3164   <34>Oct 11 22:14:15 mymachine su[123]: msg
//!   variants: no hostname (`<34>Oct 11 22:14:15 su: msg`), a year (`Oct 11 2026 22:14:15`,
//!             `Oct 11 22:14:15 2026`), fractions, an ISO 8601 timestamp (`T` or a space
//!             between date and time), an IPv6 hostname (`2001:db8::`), no timestamp,
//!             no tag (Palo Alto CSV: `<14>Nov 26 01:02:03 PA-220 1,2026/11/26 ...`),
//!             AIX's `Message forwarded from HOST:`
//! Cisco IOS  <189>123: *Mar  1 00:00:12.123: %SYS-5-CONFIG_I: Configured from console
//!            <0>91: *Oct 07 03:10:04: mydevice.com %CRYPTO-4-RECVD_PKT_INV_SPI: decaps: ...
//!            <189>Mar  1 00:00:12 router1 123: *Mar  1 00:00:12.123 UTC: %SYS-5-...
//! Cisco ASA  <166>Nov 26 2026 01:02:03: %ASA-6-302013: Built ...   (also `.`/`*` marked)
//! Fortinet   <189>date=2026-11-26 time=01:02:03 devname="FGT" devid="FG100" ...
//! ```
//!
//! The rules where the RFCs leave room, decided from what devices send:
//!
//! - After `<PRI>`, a run of digits followed by a space (or the end) is an RFC 5424
//!   VERSION: the message is then read with the RFC 5424 grammar and refused if it does
//!   not follow it. Any VERSION 1..=999 is read with the version-1 grammar (the only one
//!   defined; [`Parsed::version`] says which was sent). Digits followed by `:` are Cisco's
//!   sequence number; anything else is RFC 3164.
//! - RFC 5424 is read strictly (RFC 3339 timestamps with real dates and uppercase `T`/`Z`,
//!   field lengths, SD-NAMEs of 1..=32 printable characters, `"`, `\` and `]` escaped in
//!   values, no SD-ID twice), with three leniencies seen from real senders: a fraction of
//!   up to 9 digits (Go and Java loggers send nanoseconds), a TIMESTAMP without offset
//!   (read in the listener's zone), and an unquoted PARAM-VALUE (VMware ESXi's
//!   `[Originator@6876 sub=Hostsvc]`). Header fields may be UTF-8 (devices localised to
//!   Chinese send it) but never hold control characters.
//! - RFC 3164 content without a TIMESTAMP is valid (RFC 3164 4.3.2); a timestamp that has
//!   the shape of one but impossible values (`Oct 32`, `25:00:00`) is refused.
//! - Cisco's `*` (clock not authoritative) and `.` (not synchronised) markers go to
//!   [`Parsed::clock`], the sequence number to [`Parsed::sequence`] (gaps in it are
//!   evidence of lost messages), the mnemonic (without `%`) to `msgid`, and the text
//!   after it is the message.
//! - A UTF-8 BOM starting the MSG is dropped when the rest is UTF-8 (RFC 5424 6.4: it
//!   only announces the encoding); before bytes that are not UTF-8 it is kept, so the
//!   message stays the bytes the device sent.
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

/// A device's timestamp as read from the message, not yet placed in time: an RFC 3164
/// timestamp has no year and usually no zone, which only the receive time and the
/// listener's `timezone` supply (see `super::timestamp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// None: `Mmm dd hh:mm:ss` without a year (inferred from the receive time).
    pub year: Option<i16>,
    pub month: i8,
    pub day: i8,
    pub hour: i8,
    pub minute: i8,
    pub second: i8,
    /// The fraction of the second in nanoseconds (digits past the ninth are dropped).
    pub nanos: i32,
    pub zone: StampZone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StampZone {
    /// `Z`, or a zone abbreviation known to mean UTC (Cisco's `UTC`, `GMT`).
    Utc,
    /// A numeric offset, in seconds east of UTC.
    Offset(i32),
    /// No zone, or one that cannot be resolved (Cisco's `TPE`): the listener's zone.
    Local,
}

/// Cisco's clock-state marker before the timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockState {
    /// `*`: the device's clock is not authoritative (never set, or not in sync).
    NotAuthoritative,
    /// `.`: authoritative, but NTP lost synchronisation.
    NotSynchronized,
}

impl ClockState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClockState::NotAuthoritative => "not_authoritative",
            ClockState::NotSynchronized => "not_synchronized",
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
    /// RFC 5424 VERSION (1..=999).
    pub version: Option<u16>,
    /// The timestamp exactly as sent (Cisco's `*`/`.` clock-state marker removed).
    pub timestamp: Option<&'a str>,
    /// `timestamp` read into its parts.
    pub stamp: Option<Stamp>,
    /// Cisco's clock-state marker.
    pub clock: Option<ClockState>,
    /// Cisco's sequence number (`service sequence-numbers`).
    pub sequence: Option<&'a str>,
    pub hostname: Option<&'a str>,
    /// RFC 5424 APP-NAME, RFC 3164 TAG.
    pub app: Option<&'a str>,
    pub procid: Option<&'a str>,
    /// RFC 5424 MSGID; for Cisco the `%FACILITY-SEVERITY-MNEMONIC` (without `%`).
    pub msgid: Option<&'a str>,
    /// Raw RFC 5424 STRUCTURED-DATA (all elements, escapes kept), `None` for NILVALUE.
    pub structured_data: Option<&'a str>,
    /// The MSG part (UTF-8 BOM dropped); the whole input when `parse_error` is set.
    pub message: &'a [u8],
    pub format: Format,
    /// What could not be parsed, naming the part (`invalid RFC 5424 TIMESTAMP`).
    pub parse_error: Option<&'static str>,
}

impl<'a> Parsed<'a> {
    fn empty(msg: &'a [u8]) -> Parsed<'a> {
        Parsed {
            pri: None,
            facility: None,
            severity: None,
            version: None,
            timestamp: None,
            stamp: None,
            clock: None,
            sequence: None,
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

    /// Refuse the message: keep it whole and say which part is at fault. Fields read
    /// before that part stay (they were valid); nothing after it is set.
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

/// RFC 5424 6.2: field length limits, in octets.
const MAX_HOSTNAME: usize = 255;
const MAX_APP_NAME: usize = 48;
const MAX_PROCID: usize = 128;
const MAX_MSGID: usize = 32;
const MAX_SD_NAME: usize = 32;
/// SD-IDs compared for duplicates (real messages carry a handful; the bound keeps a
/// message of thousands of tiny elements from costing quadratic time).
const SD_IDS_CHECKED: usize = 32;

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
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 && matches!(rest.get(digits), Some(b' ') | None) {
        return parse_5424(p, msg, rest, digits);
    }
    parse_3164(p, msg, rest)
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
    let v = number(rest.get(..digits)?);
    let v = u8::try_from(v).ok().filter(|v| *v <= 191)?;
    Some((v, rest.get(digits + 1..)?))
}

/// The value of a run of at most 9 ASCII digits (callers check both).
fn number(digits: &[u8]) -> u32 {
    digits
        .iter()
        .fold(0u32, |v, c| v * 10 + u32::from(c.wrapping_sub(b'0')))
}

/// The next space-terminated field and what follows the space; None when the input
/// ends before a space (an RFC 5424 header field must be followed by one).
fn field_sp(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = memchr::memchr(b' ', b)?;
    Some((&b[..i], &b[i + 1..]))
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

/// An RFC 5424 header field of at most `max` octets, `-` meaning absent.
fn nil_field(b: &[u8], max: usize) -> Result<Option<&str>, ()> {
    if b == b"-" {
        return Ok(None);
    }
    if b.len() > max {
        return Err(());
    }
    field(b).map(Some).ok_or(())
}

/// The MSG: a leading BOM is dropped when the rest is UTF-8 (then it only announced the
/// encoding); before other bytes it is kept, so the message is exactly what was sent.
fn strip_bom(b: &[u8]) -> &[u8] {
    match b.strip_prefix(BOM) {
        Some(rest) if std::str::from_utf8(rest).is_ok() => rest,
        _ => b,
    }
}

fn parse_5424<'a>(mut p: Parsed<'a>, whole: &'a [u8], rest: &'a [u8], digits: usize) -> Parsed<'a> {
    p.format = Format::Rfc5424;
    let (version, rest) = rest.split_at(digits);
    // VERSION = NONZERO-DIGIT 0*2DIGIT
    if digits > 3 || version.first() == Some(&b'0') {
        return p.failed(whole, "invalid RFC 5424 VERSION");
    }
    p.version = u16::try_from(number(version)).ok();
    let Some(rest) = rest.strip_prefix(b" ") else {
        return p.failed(whole, "incomplete RFC 5424 header");
    };
    let Some((ts, rest)) = field_sp(rest) else {
        return p.failed(whole, "incomplete RFC 5424 header");
    };
    if ts != b"-" {
        match iso_timestamp(ts, true) {
            Ok(Some((n, stamp))) if n == ts.len() => {
                // Only ASCII bytes were matched, so this is valid UTF-8.
                p.timestamp = std::str::from_utf8(ts).ok();
                p.stamp = Some(stamp);
            }
            _ => return p.failed(whole, "invalid RFC 5424 TIMESTAMP"),
        }
    }
    let Some((host, rest)) = field_sp(rest) else {
        return p.failed(whole, "incomplete RFC 5424 header");
    };
    let Ok(host) = nil_field(host, MAX_HOSTNAME) else {
        return p.failed(whole, "invalid RFC 5424 HOSTNAME");
    };
    p.hostname = host;
    let Some((app, rest)) = field_sp(rest) else {
        return p.failed(whole, "incomplete RFC 5424 header");
    };
    let Ok(app) = nil_field(app, MAX_APP_NAME) else {
        return p.failed(whole, "invalid RFC 5424 APP-NAME");
    };
    p.app = app;
    let Some((procid, rest)) = field_sp(rest) else {
        return p.failed(whole, "incomplete RFC 5424 header");
    };
    let Ok(procid) = nil_field(procid, MAX_PROCID) else {
        return p.failed(whole, "invalid RFC 5424 PROCID");
    };
    p.procid = procid;
    if rest.is_empty() {
        return p.failed(whole, "incomplete RFC 5424 header");
    }
    let (msgid, rest) = token(rest);
    let Ok(msgid) = nil_field(msgid, MAX_MSGID) else {
        return p.failed(whole, "invalid RFC 5424 MSGID");
    };
    p.msgid = msgid;
    // Devices that stop after MSGID (no SD, no MSG) are common enough to accept.
    if rest.is_empty() {
        p.message = rest;
        return p;
    }
    let after_sd = if let Some(after_nil) = rest.strip_prefix(b"-") {
        after_nil
    } else if rest.first() == Some(&b'[') {
        let n = match sd_len(rest) {
            Ok(n) => n,
            Err(why) => return p.failed(whole, why),
        };
        let Some((sd, after)) = rest.split_at_checked(n) else {
            return p.failed(whole, "malformed structured data");
        };
        let Ok(sd) = std::str::from_utf8(sd) else {
            return p.failed(whole, "structured data is not UTF-8");
        };
        p.structured_data = Some(sd);
        after
    } else {
        return p.failed(whole, "missing structured data");
    };
    // [SP MSG]: anything glued to the SD (`-x`, `[a]x`) breaks the grammar.
    let msg = match after_sd.split_first() {
        None => after_sd,
        Some((b' ', msg)) => msg,
        Some(_) => {
            p.structured_data = None;
            return p.failed(whole, "malformed structured data");
        }
    };
    p.message = strip_bom(msg);
    p
}

/// SD-NAME: 1..=32 printable US-ASCII characters except `=`, space, `]` and `"`.
fn sd_name_len(b: &[u8]) -> usize {
    b.iter()
        .take(MAX_SD_NAME + 1)
        .take_while(|&&c| (33..=126).contains(&c) && !matches!(c, b'=' | b']' | b'"'))
        .count()
}

/// Length of the STRUCTURED-DATA elements at the start of `b` (which starts with `[`),
/// or why they break RFC 5424 6.3.
fn sd_len(b: &[u8]) -> Result<usize, &'static str> {
    const BAD: &str = "malformed structured data";
    let mut ids: [&[u8]; SD_IDS_CHECKED] = [&[]; SD_IDS_CHECKED];
    let mut n_ids = 0;
    let mut i = 0;
    while b.get(i) == Some(&b'[') {
        i += 1;
        let id_len = sd_name_len(b.get(i..).unwrap_or_default());
        if id_len == 0 || id_len > MAX_SD_NAME {
            return Err(BAD);
        }
        let id = b.get(i..i + id_len).ok_or(BAD)?;
        if ids.get(..n_ids).unwrap_or_default().contains(&id) {
            return Err("duplicate SD-ID in structured data");
        }
        if let Some(slot) = ids.get_mut(n_ids) {
            *slot = id;
            n_ids += 1;
        }
        i += id_len;
        // *(SP SD-PARAM) "]"
        loop {
            match b.get(i) {
                Some(b']') => {
                    i += 1;
                    break;
                }
                Some(b' ') => i += 1,
                _ => return Err(BAD),
            }
            let name_len = sd_name_len(b.get(i..).unwrap_or_default());
            if name_len == 0 || name_len > MAX_SD_NAME {
                return Err(BAD);
            }
            i += name_len;
            if b.get(i) != Some(&b'=') {
                return Err(BAD);
            }
            i += 1;
            if b.get(i) == Some(&b'"') {
                i += 1;
                // PARAM-VALUE: `"`, `\` and `]` must be escaped; `\` before anything
                // else is a plain backslash (RFC 5424 6.3.3).
                loop {
                    match *b.get(i).ok_or(BAD)? {
                        b'\\' => i += if b.get(i + 1).is_some() { 2 } else { 1 },
                        b'"' => {
                            i += 1;
                            break;
                        }
                        b']' => return Err(BAD),
                        _ => i += 1,
                    }
                }
            } else {
                // VMware ESXi leaves values unquoted: `[Originator@6876 sub=Hostsvc]`.
                let v = b
                    .get(i..)
                    .unwrap_or_default()
                    .iter()
                    .take_while(|&&c| !matches!(c, b' ' | b']' | b'"' | b'[' | b'='))
                    .count();
                if v == 0 || !matches!(b.get(i + v), Some(b' ' | b']')) {
                    return Err(BAD);
                }
                i += v;
            }
        }
    }
    Ok(i)
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// End of a run of `min..=max` ASCII digits starting at `at`.
fn digits_at(b: &[u8], at: usize, min: usize, max: usize) -> Option<usize> {
    let n = b
        .get(at..)?
        .iter()
        .take(max + 1)
        .take_while(|c| c.is_ascii_digit())
        .count();
    (n >= min && n <= max).then_some(at + n)
}

/// The value of exactly `n` digits at `at`.
fn num_at(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let d = b.get(at..at + n)?;
    d.iter().all(u8::is_ascii_digit).then(|| number(d))
}

fn is_leap(year: i32) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Days in `month` of `year`; without a year February may have 29.
fn days_in_month(year: Option<i32>, month: u32) -> u32 {
    match month {
        2 => {
            if year.is_none_or(is_leap) {
                29
            } else {
                28
            }
        }
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The fraction after a `.` at `at`: (end, nanoseconds), any number of digits (ones
/// past the ninth dropped), at most `max` when given.
fn fraction_at(b: &[u8], at: usize, max: Option<usize>) -> Option<(usize, i32)> {
    let n = b
        .get(at..)?
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count();
    if n == 0 || max.is_some_and(|m| n > m) {
        return None;
    }
    let kept = b.get(at..at + n.min(9))?;
    let mut nanos = number(kept);
    for _ in kept.len()..9 {
        nanos *= 10;
    }
    Some((at + n, i32::try_from(nanos).ok()?))
}

/// Checked civil fields into a [`Stamp`]; None when a value is impossible.
#[allow(clippy::too_many_arguments)]
fn stamp(
    year: Option<u32>,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanos: i32,
    zone: StampZone,
) -> Option<Stamp> {
    let year = year.map(i32::try_from).transpose().ok()?;
    let ok = (1..=12).contains(&month)
        && day >= 1
        && day <= days_in_month(year, month)
        && hour <= 23
        && minute <= 59
        && second <= 59;
    ok.then_some(Stamp {
        year: year.map(i16::try_from).transpose().ok()?,
        month: i8::try_from(month).ok()?,
        day: i8::try_from(day).ok()?,
        hour: i8::try_from(hour).ok()?,
        minute: i8::try_from(minute).ok()?,
        second: i8::try_from(second).ok()?,
        nanos,
        zone,
    })
}

/// `hh:mm:ss` at `at`: (end, h, m, s), the values not yet checked.
fn clock_at(b: &[u8], at: usize) -> Option<(usize, u32, u32, u32)> {
    let h = num_at(b, at, 2)?;
    (b.get(at + 2) == Some(&b':')).then_some(())?;
    let m = num_at(b, at + 3, 2)?;
    (b.get(at + 5) == Some(&b':')).then_some(())?;
    let s = num_at(b, at + 6, 2)?;
    if b.get(at + 8).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    Some((at + 8, h, m, s))
}

/// `Mmm dd hh:mm:ss[.f]`, `Mmm dd yyyy hh:mm:ss[.f]`, `Mmm dd hh:mm:ss[.f] yyyy`.
/// `Ok(None)`: not that shape; `Err`: that shape with impossible values (`Oct 32`).
fn bsd_timestamp(b: &[u8]) -> Result<Option<(usize, Stamp)>, ()> {
    let Some(mon) = b.get(..3) else {
        return Ok(None);
    };
    let Some(month) = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(mon)) else {
        return Ok(None);
    };
    if b.get(3) != Some(&b' ') {
        return Ok(None);
    }
    let mut i = 4;
    if b.get(i) == Some(&b' ') {
        i += 1; // space-padded day: `Mar  1`
    }
    let Some(day_end) = digits_at(b, i, 1, 2) else {
        return Ok(None);
    };
    let day = number(b.get(i..day_end).unwrap_or_default());
    if b.get(day_end) != Some(&b' ') {
        return Ok(None);
    }
    i = day_end + 1;
    let mut year = None;
    if let Some(y) = digits_at(b, i, 4, 4)
        && b.get(y) == Some(&b' ')
        && clock_at(b, y + 1).is_some()
    {
        year = num_at(b, i, 4);
        i = y + 1;
    }
    let Some((mut end, h, m, s)) = clock_at(b, i) else {
        return Ok(None);
    };
    let mut nanos = 0;
    if b.get(end) == Some(&b'.') {
        match fraction_at(b, end + 1, None) {
            Some((e, n)) => (end, nanos) = (e, n),
            // `02:00:00.` (a dot without digits, seen from syslog-ng's peers): no fraction.
            None => end += 1,
        }
    }
    // A trailing year, only when a space follows it (a 4-digit hostname is unlikely).
    if year.is_none()
        && b.get(end) == Some(&b' ')
        && let Some(y) = digits_at(b, end + 1, 4, 4)
        && b.get(y) == Some(&b' ')
    {
        year = num_at(b, end + 1, 4);
        end = y;
    }
    // `month` indexes MONTHS (12 entries), so it fits.
    let month = u32::try_from(month + 1).unwrap_or(0);
    let st = stamp(year, month, day, h, m, s, nanos, StampZone::Local).ok_or(())?;
    Ok(Some((end, st)))
}

/// A zone name after a Cisco timestamp (`UTC`, `GMT`, `TPE`, up to 8 characters,
/// starting with a letter), ending right before `:`; returns its length and meaning.
/// Outside the sequence-numbered IOS form (`cisco`), a mnemonic must follow the colon,
/// or a tag such as `su:` would be taken for a zone.
fn zone_name(b: &[u8], cisco: bool) -> Option<(usize, StampZone)> {
    if !b.first()?.is_ascii_alphabetic() {
        return None;
    }
    let n = b
        .iter()
        .take(9)
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-'))
        .count();
    if n > 8 || b.get(n) != Some(&b':') {
        return None;
    }
    let after = b.get(n + 1..).unwrap_or_default();
    if !cisco && !after.strip_prefix(b" ").unwrap_or(after).starts_with(b"%") {
        return None;
    }
    let name = b.get(..n)?;
    let utc = [&b"UTC"[..], b"GMT", b"UT", b"Z"]
        .iter()
        .any(|z| z.eq_ignore_ascii_case(name));
    Some((
        n,
        if utc {
            StampZone::Utc
        } else {
            StampZone::Local
        },
    ))
}

/// An RFC 3339 / ISO 8601 timestamp at the start of `b`, ending at a space or the end.
///
/// `strict` (RFC 5424 6.2.3): `T`, uppercase `Z`, a fraction of at most 9 digits and an
/// offset of `+hh:mm` — or none, read in the listener's zone. Otherwise (RFC 3164
/// senders): also `t` or a space before the time, `z`, any fraction, `+hhmm` and `+hh`.
/// `Ok(None)`: not that shape; `Err`: that shape with impossible values.
fn iso_timestamp(b: &[u8], strict: bool) -> Result<Option<(usize, Stamp)>, ()> {
    let shaped = b.len() >= 11
        && b.get(..4).is_some_and(|y| y.iter().all(u8::is_ascii_digit))
        && b.get(4) == Some(&b'-')
        && b.get(5..7)
            .is_some_and(|m| m.iter().all(u8::is_ascii_digit))
        && b.get(7) == Some(&b'-')
        && b.get(8..10)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if !shaped {
        return Ok(None);
    }
    let sep_ok = match b.get(10) {
        Some(b'T') => true,
        Some(b't' | b' ') => !strict,
        _ => false,
    };
    // `2026-11-26 host ...` is a date in the text, not a timestamp.
    if !sep_ok || (b.get(10) == Some(&b' ') && clock_at(b, 11).is_none()) {
        return if strict { Err(()) } else { Ok(None) };
    }
    let (y, mo, d) = (num_at(b, 0, 4), num_at(b, 5, 2), num_at(b, 8, 2));
    let (Some(y), Some(mo), Some(d)) = (y, mo, d) else {
        return Err(());
    };
    let (mut i, h, mi, s) = clock_at(b, 11).ok_or(())?;
    let mut nanos = 0;
    if b.get(i) == Some(&b'.') {
        (i, nanos) = fraction_at(b, i + 1, strict.then_some(9)).ok_or(())?;
    }
    let zone = match b.get(i) {
        Some(b'Z') => {
            i += 1;
            StampZone::Utc
        }
        Some(b'z') if !strict => {
            i += 1;
            StampZone::Utc
        }
        Some(&c @ (b'+' | b'-')) => {
            let oh = num_at(b, i + 1, 2).ok_or(())?;
            let (end, om) = if b.get(i + 3) == Some(&b':') {
                (i + 6, num_at(b, i + 4, 2).ok_or(())?)
            } else if strict {
                return Err(());
            } else if let Some(om) = num_at(b, i + 3, 2) {
                (i + 5, om)
            } else {
                (i + 3, 0)
            };
            if oh > 23 || om > 59 {
                return Err(());
            }
            i = end;
            // oh <= 23 and om <= 59: fits.
            let secs = i32::try_from(oh * 3600 + om * 60).unwrap_or(0);
            StampZone::Offset(if c == b'-' { -secs } else { secs })
        }
        _ => StampZone::Local,
    };
    if !matches!(b.get(i), None | Some(b' ')) {
        return Err(());
    }
    let st = stamp(Some(y), mo, d, h, mi, s, nanos, zone).ok_or(())?;
    Ok(Some((i, st)))
}

/// A timestamp an RFC 3164 sender may use, with Cisco's zone name (see [`zone_name`]).
fn timestamp_3164(b: &[u8], cisco: bool) -> Result<Option<(usize, Stamp)>, ()> {
    let Some((mut n, mut st)) = bsd_timestamp(b)? else {
        return iso_timestamp(b, false);
    };
    if b.get(n) == Some(&b' ')
        && let Some((len, zone)) = zone_name(b.get(n + 1..).unwrap_or_default(), cisco)
    {
        n += 1 + len;
        st.zone = zone;
    }
    Ok(Some((n, st)))
}

/// Cisco's clock-state marker, if `b` starts with one.
fn marker(b: &[u8]) -> (Option<ClockState>, &[u8]) {
    match b.split_first() {
        Some((b'*', rest)) => (Some(ClockState::NotAuthoritative), rest),
        Some((b'.', rest)) => (Some(ClockState::NotSynchronized), rest),
        _ => (None, b),
    }
}

fn is_ipv6(b: &[u8]) -> bool {
    std::str::from_utf8(b).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

fn parse_3164<'a>(mut p: Parsed<'a>, whole: &'a [u8], body: &'a [u8]) -> Parsed<'a> {
    p.format = Format::Rfc3164;
    // rsyslog and syslog-ng skip spaces between PRI and header (`<15> openvpn[1]: x`).
    let body = body.trim_ascii_start();
    match cisco(&p, body) {
        Cisco::Parsed(p) => return p,
        Cisco::Refused => return p.failed(whole, "invalid RFC 3164 TIMESTAMP"),
        Cisco::No => {}
    }
    if body.starts_with(b"date=") || body.starts_with(b"logver=") {
        return fortinet(p, body);
    }
    let mut rest = body;
    let (clock, unmarked) = marker(body);
    match timestamp_3164(unmarked, false) {
        Err(()) => return p.failed(whole, "invalid RFC 3164 TIMESTAMP"),
        Ok(None) => {}
        Ok(Some((n, st))) => {
            let Some((ts, after_ts)) = unmarked.split_at_checked(n) else {
                return p.failed(whole, "invalid RFC 3164 TIMESTAMP");
            };
            // Only ASCII bytes were matched, so this slice is valid UTF-8.
            p.timestamp = std::str::from_utf8(ts).ok();
            p.stamp = Some(st);
            p.clock = clock;
            rest = after_ts;
            // Cisco ASA ends its timestamp with a colon: `Nov 26 2026 01:02:03: %ASA-...`.
            rest = rest.strip_prefix(b":").unwrap_or(rest);
            rest = rest.strip_prefix(b" ").unwrap_or(rest);
            if let Some(fwd) = rest.strip_prefix(b"Message forwarded from ")
                && let Some(colon) = memchr::memchr(b':', fwd)
                && let Some(h) = fwd.get(..colon).and_then(field)
                && !h.contains(' ')
            {
                // AIX syslogd relaying another host's message.
                p.hostname = Some(h);
                rest = fwd.get(colon + 1..).unwrap_or_default();
                rest = rest.strip_prefix(b" ").unwrap_or(rest);
            } else {
                // A hostname is a token followed by a space that is not itself the tag
                // (an IPv6 address may end in `:`, as `2001:db8::` does).
                let (tok, after) = token(rest);
                let is_tag = !is_ipv6(tok) && (tok.ends_with(b":") || tok.contains(&b'['));
                if !after.is_empty()
                    && !is_tag
                    && !tok.starts_with(b"%")
                    && let Some(h) = field(tok)
                {
                    p.hostname = Some(h);
                    rest = after;
                }
            }
            match cisco(&p, rest) {
                Cisco::Parsed(p) => return p,
                Cisco::Refused => return p.failed(whole, "invalid RFC 3164 TIMESTAMP"),
                Cisco::No => {}
            }
            // ASA with a hostname: `... asa1 : %ASA-6-302013: ...`.
            if p.hostname.is_some() {
                rest = rest.strip_prefix(b": ").unwrap_or(rest);
            }
        }
    }
    tag(p, rest)
}

enum Cisco<'a> {
    Parsed(Parsed<'a>),
    /// Cisco's shape with an impossible timestamp.
    Refused,
    No,
}

/// Cisco IOS: `123: [host: ][*|.]TIMESTAMP: [host ]%FAC-SEV-MNEMONIC: text` (the
/// sequence number first). The sequence number, clock state, timestamp, hostname and
/// mnemonic are lifted into their fields; the text after the mnemonic is the message.
fn cisco<'a>(p: &Parsed<'a>, body: &'a [u8]) -> Cisco<'a> {
    let Some(end) = digits_at(body, 0, 1, 10) else {
        return Cisco::No;
    };
    let Some(mut rest) = body.get(end..).and_then(|r| r.strip_prefix(b": ")) else {
        return Cisco::No;
    };
    let mut out = p.clone();
    out.sequence = body.get(..end).and_then(field);
    // `logging origin-id hostname`: `123: router1: *Mar  1 ...`.
    if let Some(colon) = memchr::memmem::find(rest, b": ")
        && let (Some(name), Some(after)) = (rest.get(..colon), rest.get(colon + 2..))
    {
        let (_, unmarked) = marker(after);
        let follows =
            after.first() == Some(&b'%') || matches!(timestamp_3164(unmarked, true), Ok(Some(_)));
        if follows
            && name.first().is_some_and(u8::is_ascii_alphanumeric)
            && !name.contains(&b' ')
            && matches!(timestamp_3164(rest, true), Ok(None))
            && let Some(h) = field(name)
        {
            out.hostname = Some(h);
            rest = after;
        }
    }
    let (clock, unmarked) = marker(rest);
    match timestamp_3164(unmarked, true) {
        Err(()) => return Cisco::Refused,
        Ok(None) => {}
        Ok(Some((n, st))) => {
            let Some(after) = unmarked.get(n..).and_then(|r| r.strip_prefix(b":")) else {
                return Cisco::No;
            };
            out.timestamp = unmarked.get(..n).and_then(field);
            out.stamp = Some(st);
            out.clock = clock;
            rest = after.strip_prefix(b" ").unwrap_or(after);
        }
    }
    // The hostname after the time: `*Oct 07 03:10:04: mydevice.com %CRYPTO-4-...: ...`.
    if !rest.starts_with(b"%") {
        let (tok, after) = token(rest);
        if mnemonic(after).is_some()
            && !tok.ends_with(b":")
            && let Some(h) = field(tok)
        {
            out.hostname = Some(h);
            rest = after;
        }
    }
    let Some((m, text)) = mnemonic(rest) else {
        return Cisco::No;
    };
    out.msgid = Some(m);
    out.message = strip_bom(text);
    Cisco::Parsed(out)
}

/// A Cisco-style `%FACILITY-SEVERITY-MNEMONIC:` at the start (IOS, ASA, PIX, NX-OS):
/// the mnemonic without `%`, and the text after the colon and its space.
fn mnemonic(b: &[u8]) -> Option<(&str, &[u8])> {
    let m = b.strip_prefix(b"%")?;
    let end = memchr::memchr(b':', m)?;
    let name = m.get(..end)?;
    let ok = name.len() <= 64
        && name.contains(&b'-')
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'));
    let text = m.get(end + 1..)?;
    let text = text.strip_prefix(b" ").unwrap_or(text);
    if ok { Some((field(name)?, text)) } else { None }
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

/// `TAG[PID]: msg`, `TAG: msg` or a Cisco mnemonic; anything else is all message.
fn tag<'a>(mut p: Parsed<'a>, b: &'a [u8]) -> Parsed<'a> {
    p.message = strip_bom(b);
    if let Some((m, text)) = mnemonic(b) {
        p.msgid = Some(m);
        p.message = strip_bom(text);
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

    fn bsd_len(b: &[u8]) -> Option<usize> {
        bsd_timestamp(b).ok().flatten().map(|(n, _)| n)
    }

    fn iso(b: &[u8], strict: bool) -> Option<Stamp> {
        iso_timestamp(b, strict).ok().flatten().map(|(_, s)| s)
    }

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
        assert_eq!(sd_len(b"[a]"), Ok(3));
        assert_eq!(sd_len(b"[a b=\"x\\]\"][c] m"), Ok(14));
        assert!(sd_len(b"[a b=\"x]").is_err());
        assert!(sd_len(b"[a b=\"\\").is_err());
        assert!(sd_len(b"[a [b]").is_err());
    }

    /// RFC 5424 6.3: what an SD-ELEMENT may and may not be.
    #[test]
    fn sd_grammar() {
        for ok in [
            &b"[id]"[..],
            b"[id@32473 a=\"1\" b=\"\"]",
            b"[a i=\"\\]\\\"\\\\\"]",
            b"[a i=\"\\n\"]", // `\n` is a backslash and an n (6.3.3)
            b"[Originator@6876 sub=Vimsvc.TaskManager opID=abc-12]", // VMware ESXi
            b"[a][b]",
        ] {
            assert_eq!(sd_len(ok), Ok(ok.len()), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"[]"[..],
            b"[ ]",
            b"[=]",
            b"[\"]",
            b"[ a]",
            b"[a ]",
            b"[a b]",
            b"[a b=]",
            b"[a b=\"]\"]",
            b"[a b=\"\"\"]",
            b"[a b=\"\"x\"]",
            b"[abcdefghilmnopqrstuvzabcdefghilmX]",
            b"[a abcdefghilmnopqrstuvzabcdefghilmX=\"1\"]",
            b"[a b=baz",
        ] {
            assert!(sd_len(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            sd_len(b"[d e=\"1\"][x][d c=\"2\"]"),
            Err("duplicate SD-ID in structured data")
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(bsd_len(b"Oct 11 22:14:15 x"), Some(15));
        assert_eq!(bsd_len(b"Mar  1 00:00:12.123: x"), Some(19));
        assert_eq!(bsd_len(b"Oct 11 2026 22:14:15 x"), Some(20));
        assert_eq!(bsd_len(b"Oct 11 22:14:15 2026 x"), Some(20));
        assert_eq!(bsd_len(b"Aug 29 02:00:00. ctld"), Some(16));
        assert_eq!(bsd_len(b"NOV 22 00:00:33 h"), Some(15));
        assert_eq!(bsd_len(b"Oct 11 22:14"), None);
        assert_eq!(bsd_len(b"Foo 11 22:14:15"), None);
        assert_eq!(bsd_timestamp(b"Oct 32 22:14:15 h"), Err(()));
        assert_eq!(bsd_timestamp(b"Oct 11 24:00:00 h"), Err(()));
        assert_eq!(bsd_timestamp(b"Feb 29 2026 00:00:00 h"), Err(()));
        assert_eq!(bsd_len(b"Feb 29 00:00:00 h"), Some(15));
        let (_, st) = bsd_timestamp(b"Mar  1 00:00:12.123456789123 x")
            .unwrap()
            .unwrap();
        assert_eq!(
            (st.year, st.month, st.day, st.nanos),
            (None, 3, 1, 123_456_789)
        );
        assert_eq!(
            iso_timestamp(b"2026-11-26T01:02:03Z h", true)
                .unwrap()
                .map(|x| x.0),
            Some(20)
        );
    }

    /// RFC 5424 6.2.3 TIMESTAMP, with soclink's two leniencies (9 digits, no offset).
    #[test]
    fn rfc3339_strict() {
        let s = iso(b"2003-08-24T05:14:15.000003-07:00", true).unwrap();
        assert_eq!(
            (s.year, s.hour, s.nanos, s.zone),
            (Some(2003), 5, 3000, StampZone::Offset(-7 * 3600))
        );
        assert_eq!(
            iso(b"2009-10-16T11:51:56", true).unwrap().zone,
            StampZone::Local
        );
        assert_eq!(
            iso(b"2026-11-26T01:02:03.123456789Z", true).unwrap().nanos,
            123_456_789
        );
        for bad in [
            &b"2006-01-02t15:04:05Z"[..],
            b"2006-01-02T15:04:05z",
            b"2006-01-02T15:04:05Z+07:00",
            b"2006-01-02T15:04:05Zjunk",
            b"2024-09-16Q11:22:33+02:00",
            b"2003-09-29T22:09:01.000000000009Z",
            b"2003-09-29T22:09:01.Z",
            b"2003-09-29T22:99:16Z",
            b"2003-09-29T22:09:60Z",
            b"2003-09-31T22:14:16Z",
            b"2018-02-29T22:14:16+01:00",
            b"2003-08-24T05:14:15.000003-24:00",
            b"2003-08-24T05:14:15.000003-07:61",
            b"2003-08-24T05:14:15+0700",
            b"2006-01-02 15:04:05Z",
        ] {
            assert!(
                !matches!(iso_timestamp(bad, true), Ok(Some((n, _))) if n == bad.len()),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // RFC 3164 senders: a space before the time, long fractions, `+hhmm`.
        let s = iso(b"2006-10-29 02:00:00.156+01:00", false).unwrap();
        assert_eq!((s.nanos, s.zone), (156_000_000, StampZone::Offset(3600)));
        assert_eq!(
            iso(b"2026-11-26T01:02:03+0800 h", false).unwrap().zone,
            StampZone::Offset(28_800)
        );
        assert_eq!(iso_timestamp(b"2026-11-26 host app: x", false), Ok(None));
        assert_eq!(iso_timestamp(b"2026-13-26T01:02:03Z x", false), Err(()));
    }
}
