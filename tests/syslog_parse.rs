//! The syslog parser against a corpus of real-world formats (tests/data/syslog/corpus.json,
//! written from RFC 5424/3164 and the vendors' documented formats), the event encoding,
//! and fuzzing of the parser and the stream framer with arbitrary bytes.

use base64::Engine;
use soclink::agent::sources::syslog::{Framer, Parsed, encode_syslog_event, parse};

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn corpus() -> Vec<serde_json::Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/syslog/corpus.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn input_of(case: &serde_json::Value) -> Vec<u8> {
    match case.get("input") {
        Some(s) => s.as_str().unwrap().as_bytes().to_vec(),
        None => b64(case["input_base64"].as_str().unwrap()),
    }
}

/// Every field of `Parsed` as JSON, absent fields left out, to compare with the corpus.
fn as_json(p: &Parsed) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put("pri", p.pri.map(Into::into));
    put("version", p.version.filter(|v| *v != 1).map(Into::into));
    put("clock", p.clock.map(|c| c.as_str().into()));
    put("sequence", p.sequence.map(Into::into));
    put("facility", p.facility.map(Into::into));
    put("severity", p.severity.map(Into::into));
    put("timestamp", p.timestamp.map(Into::into));
    put("hostname", p.hostname.map(Into::into));
    put("app", p.app.map(Into::into));
    put("procid", p.procid.map(Into::into));
    put("msgid", p.msgid.map(Into::into));
    put("sd", p.structured_data.map(Into::into));
    match std::str::from_utf8(p.message) {
        Ok(s) => put("message", Some(s.into())),
        Err(_) => put(
            "message_base64",
            Some(
                base64::engine::general_purpose::STANDARD
                    .encode(p.message)
                    .into(),
            ),
        ),
    }
    put("format", Some(p.format.as_str().into()));
    put("parse_error", p.parse_error.map(Into::into));
    serde_json::Value::Object(m)
}

#[test]
fn corpus_parses_to_the_expected_fields() {
    let cases = corpus();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for case in &cases {
        let input = input_of(case);
        let got = as_json(&parse(&input));
        if got != case["expect"] {
            failures.push(format!(
                "{}\n  expected {}\n  got      {}",
                case["name"], case["expect"], got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What the store keeps: for anything not understood, the original bytes exactly.
#[test]
fn corpus_events_keep_unparsed_input_whole() {
    for case in corpus() {
        let input = input_of(&case);
        let p = parse(&input);
        let mut out = Vec::new();
        encode_syslog_event(
            &mut out,
            "2026-11-26T01:02:03.000000001Z",
            "agent",
            "devices",
            "192.0.2.7:514",
            &p,
            false,
        );
        assert_eq!(
            out.iter().filter(|&&c| c == b'\n').count(),
            1,
            "{}",
            case["name"]
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let msg = soclink::event::message_bytes(&v).unwrap();
        assert_eq!(msg, p.message, "{}", case["name"]);
        assert_eq!(v["remote_addr"], "192.0.2.7:514");
        assert_eq!(v["format"], p.format.as_str());
        if let Some(why) = p.parse_error {
            assert_eq!(
                msg, input,
                "{}: unparsed input must be kept whole",
                case["name"]
            );
            assert_eq!(v["parse_error"], why);
        } else {
            assert!(v.get("parse_error").is_none());
        }
        assert!(v.get("truncated").is_none());
    }
}

#[test]
fn event_field_names() {
    let p = parse(b"<34>Oct 11 22:14:15 mymachine su[7]: 'su root' failed");
    let mut out = Vec::new();
    encode_syslog_event(
        &mut out,
        "2026-11-26T01:02:03Z",
        "agent-01",
        "devices",
        "[::1]:5140",
        &p,
        false,
    );
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        "{\"ts\":\"2026-11-26T01:02:03Z\",\"host\":\"agent-01\",\"source\":\"devices\",\
         \"remote_addr\":\"[::1]:5140\",\"message\":\"'su root' failed\",\"facility\":\"auth\",\
         \"severity\":\"crit\",\"syslog_ts\":\"Oct 11 22:14:15\",\"hostname\":\"mymachine\",\
         \"app\":\"su\",\"procid\":\"7\",\"format\":\"rfc3164\"}\n"
    );
    let p = parse(b"\xff<13>");
    let mut out = Vec::new();
    encode_syslog_event(&mut out, "T", "h", "s", "p", &p, true);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        "{\"ts\":\"T\",\"host\":\"h\",\"source\":\"s\",\"remote_addr\":\"p\",\
         \"message_base64\":\"/zwxMz4=\",\"format\":\"unknown\",\"parse_error\":\"missing PRI\",\
         \"truncated\":true}\n"
    );
}

fn syslogish() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    // Pieces of real syntax glued at random hit deeper parser paths than random bytes.
    let piece = prop_oneof![
        Just(b"<13>".to_vec()),
        Just(b"<189>".to_vec()),
        Just(b"1 ".to_vec()),
        Just(b"- ".to_vec()),
        Just(b"2026-11-26T01:02:03Z ".to_vec()),
        Just(b"Oct 11 22:14:15 ".to_vec()),
        Just(b"Mar  1 2026 00:00:12.123".to_vec()),
        Just(b"[a b=\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b"]".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"123: ".to_vec()),
        Just(b"*".to_vec()),
        Just(b"%SYS-5-X: ".to_vec()),
        Just(b"devname=".to_vec()),
        Just(b"date=".to_vec()),
        Just(b"app[".to_vec()),
        Just(b"]: ".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

/// Arbitrary bytes, or bytes from the alphabet framing decisions hinge on.
fn framing_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2000),
        proptest::collection::vec(
            proptest::sample::select(b"0123456789 \n\r\0<>a".to_vec()),
            0..200
        ),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    #[test]
    fn parse_never_panics_and_borrows_from_input(input in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
        check_parse(&input);
    }

    #[test]
    fn parse_never_panics_on_syslog_like_input(input in syslogish()) {
        check_parse(&input);
    }

    #[test]
    fn framer_never_panics_and_stays_bounded(
        input in framing_bytes(),
        cuts in proptest::collection::vec(0usize..2000, 0..8),
        max in 1usize..64,
    ) {
        let mut f = Framer::new(max);
        let mut cuts = cuts;
        cuts.push(0);
        cuts.push(input.len());
        cuts.iter_mut().for_each(|c| *c = (*c).min(input.len()));
        cuts.sort_unstable();
        let mut total = 0usize;
        for w in cuts.windows(2) {
            let r = f.push(&input[w[0]..w[1]], |m, _| {
                assert!(m.len() <= max);
                total += m.len();
            });
            assert!(f.buffered() <= max);
            if r.is_err() {
                break;
            }
        }
        f.finish(|m, _| {
            assert!(m.len() <= max);
            total += m.len();
        });
        assert!(total <= input.len());
    }

    /// Any LF-framed stream of messages without LF/NUL comes out as exactly those messages.
    #[test]
    fn lf_framing_roundtrips(
        msgs in proptest::collection::vec("<[0-9]{1,3}>[^\n\r\0]{0,40}", 1..20),
        cut in 0usize..1000,
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(|m| format!("{m}\n").into_bytes()).collect();
        let cut = cut.min(stream.len());
        let mut f = Framer::new(1024);
        let mut got: Vec<Vec<u8>> = Vec::new();
        f.push(&stream[..cut], |m, t| { assert!(!t); got.push(m.to_vec()) }).unwrap();
        f.push(&stream[cut..], |m, t| { assert!(!t); got.push(m.to_vec()) }).unwrap();
        f.finish(|m, _| got.push(m.to_vec()));
        let want: Vec<Vec<u8>> = msgs.iter().map(|m| m.as_bytes().to_vec()).collect();
        proptest::prop_assert_eq!(got, want);
    }

    /// Any octet-counted stream of arbitrary messages (even with LF inside) roundtrips.
    #[test]
    fn octet_framing_roundtrips(
        msgs in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..60), 1..20),
        cut in 0usize..2000,
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend_from_slice(format!("{} ", m.len()).as_bytes());
            stream.extend_from_slice(m);
        }
        let cut = cut.min(stream.len());
        let mut f = Framer::new(1024);
        let mut got: Vec<Vec<u8>> = Vec::new();
        f.push(&stream[..cut], |m, _| got.push(m.to_vec())).unwrap();
        f.push(&stream[cut..], |m, _| got.push(m.to_vec())).unwrap();
        f.finish(|m, _| got.push(m.to_vec()));
        proptest::prop_assert_eq!(got, msgs);
    }
}

fn check_parse(input: &[u8]) {
    let p = parse(input);
    let range = input.as_ptr_range();
    let inside = |s: &[u8]| s.is_empty() || range.contains(&s.as_ptr());
    assert!(inside(p.message));
    for f in [
        p.timestamp,
        p.hostname,
        p.app,
        p.procid,
        p.msgid,
        p.structured_data,
    ]
    .into_iter()
    .flatten()
    {
        assert!(inside(f.as_bytes()));
    }
    if p.parse_error.is_some() {
        assert_eq!(p.message, input);
    }
    if let Some(pri) = p.pri {
        assert!(pri <= 191);
        assert_eq!(p.facility, Some(pri >> 3));
        assert_eq!(p.severity, Some(pri & 7));
    }
    let mut out = Vec::new();
    encode_syslog_event(&mut out, "t", "h", "s", "p", &p, false);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(soclink::event::message_bytes(&v).unwrap(), p.message);
}
