//! The incident store and its outbox under crashes, on a simulated file system that
//! loses every write and directory entry not fsynced (optionally tearing the last
//! ones). Random operations declare incidents (some with an evidence bundle the CLI
//! built), close them with a report, run outbox passes (which enqueue records, bundles
//! and reports into the priority spool and mark deliveries in the timeline), let a
//! relay take and acknowledge what is queued, restart the agent, or cut the power,
//! between operations or at the n-th fsync inside one.
//!
//! Proves, against a model of what each call returned: an incident whose declaration
//! returned is never lost; the relay ends with every incident's current record, its
//! bundle byte for byte when one was recorded, its closing report when it was closed;
//! each timeline says `delivered` and `acknowledged` exactly once; recovery never
//! fails. The agent-side bundle builder (real file system, `tests/bundle_*.rs`) is
//! left out: bundle levels are off, so bundles come from the "CLI" here.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use soclink::agent::incident::bundle::{BundleInputs, BundleSummary};
use soclink::agent::incident::outbox::Outbox;
use soclink::batch::{BatchMeta, Item};
use soclink::fs::sim::SimFs;
use soclink::fs::{Fs, write_atomic};
use soclink::incident::{DeclareRequest, EventKind, IncidentSettings, IncidentStore};
use soclink::spool::{Spool, SpoolOptions};

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Declare an incident of this level, with a bundle from the CLI when set.
    Declare { level: u8, bundle: bool },
    /// Close the n-th declared incident (modulo their number).
    Close(u8),
    /// One outbox pass.
    Scan,
}

#[derive(Debug, Clone)]
enum Op {
    Do(Step),
    /// The relay takes and acknowledges up to this many queued items.
    Ship(u8),
    Restart,
    Crash {
        torn: bool,
        seed: u64,
    },
    /// Power loss at the `after`-th fsync of `step` (or after it, if it has fewer).
    CrashDuring {
        step: Step,
        after: u8,
        torn: bool,
        seed: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1u8..=4, any::<bool>()).prop_map(|(level, bundle)| Step::Declare { level, bundle }),
        1 => any::<u8>().prop_map(Step::Close),
        4 => Just(Step::Scan),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => step().prop_map(Op::Do),
        4 => (1u8..4).prop_map(Op::Ship),
        1 => Just(Op::Restart),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(torn, seed)| Op::Crash { torn, seed }),
        3 => (step(), 0u8..10, any::<bool>(), any::<u64>())
            .prop_map(|(step, after, torn, seed)| Op::CrashDuring { step, after, torn, seed }),
    ]
}

/// What the callers were told.
#[derive(Debug, Default)]
struct Declared {
    id: String,
    /// `record_bundle` returned Ok: these bytes must reach the relay.
    bundle: Option<Vec<u8>>,
    /// `close` returned Ok.
    closed: bool,
}

/// What the relay holds per incident: the last record (it replaces the previous one),
/// the bundle once whole, the closing report.
#[derive(Default)]
struct Relay {
    pos: u64,
    records: BTreeMap<String, serde_json::Value>,
    parts: BTreeMap<String, Vec<u8>>,
    bundles: BTreeMap<String, Vec<u8>>,
    reports: BTreeMap<String, serde_json::Value>,
}

struct World {
    fs: SimFs,
    state: PathBuf,
    /// A closing report on the real file system (the CLI reads the user's file).
    report: PathBuf,
}

struct Agent {
    store: IncidentStore,
    outbox: Outbox,
    spool: Spool,
}

impl World {
    fn new() -> World {
        let w = World {
            fs: SimFs::new(),
            state: PathBuf::from("/state"),
            report: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/incident/closing-report.txt"),
        };
        w.fs.create_dir_all(&w.state).unwrap();
        w
    }
}

const REPORT: &str = "root cause: a model test\nservice restored\n";

fn open(w: &World) -> Agent {
    let fs: Arc<dyn Fs> = Arc::new(w.fs.clone());
    let (spool, _) = Spool::open_with_fs(
        &w.state.join("priority"),
        SpoolOptions {
            max_size: 1 << 30,
            segment_size: 4096,
            gate_on_checkpoint: false,
        },
        fs.clone(),
    )
    .expect("priority spool recovery never fails");
    let store = IncidentStore::open_with_fs(&w.state, fs.clone())
        .unwrap_or_else(|e| panic!("incident store recovery failed: {e}"));
    let outbox = Outbox {
        sent: Default::default(),
        state_dir: w.state.clone(),
        spool: spool.clone(),
        settings: IncidentSettings {
            // Bundles come from the CLI in this model (see the module doc).
            auto_bundle_levels: Vec::new(),
            ..IncidentSettings::default()
        },
        inputs: BundleInputs {
            agent_id: "agent-1".into(),
            host: "host-1".into(),
            agent_version: "0".into(),
            file_sources: Vec::new(),
            journal_sources: Vec::new(),
            journalctl: PathBuf::from("journalctl"),
            host_facts: false,
            now: None,
            protected: Vec::new(),
        },
        ship: true,
        fs,
    };
    Agent {
        store,
        outbox,
        spool,
    }
}

fn inflate_json(gz: &[u8]) -> serde_json::Value {
    let mut s = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut s)
        .expect("a record inflates");
    serde_json::from_str(s.trim_end()).expect("a record is JSON")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The relay takes up to `max` queued items in order and acknowledges each.
fn ship(a: &Agent, relay: &mut Relay, max: usize) -> Result<(), TestCaseError> {
    for _ in 0..max {
        let Some(r) = a.spool.read(relay.pos + 1).unwrap() else {
            break;
        };
        let meta: BatchMeta = serde_json::from_slice(&r.meta).unwrap();
        match meta.item {
            Some(Item::IncidentRecord { incident }) => {
                relay.records.insert(incident, inflate_json(&r.payload));
            }
            Some(Item::IncidentReport { incident }) => {
                relay.reports.insert(incident, inflate_json(&r.payload));
            }
            Some(Item::BundleChunk {
                incident,
                offset,
                total,
                sha256,
            }) => {
                if !relay.bundles.contains_key(&incident) {
                    let buf = relay.parts.entry(incident.clone()).or_default();
                    let end = offset as usize + r.payload.len();
                    if buf.len() < end {
                        buf.resize(end, 0);
                    }
                    buf[offset as usize..end].copy_from_slice(&r.payload);
                    if end as u64 == total {
                        let whole = relay.parts.remove(&incident).unwrap();
                        prop_assert_eq!(
                            hex(&Sha256::digest(&whole)),
                            sha256,
                            "bundle of {} arrived with another hash",
                            &incident
                        );
                        relay.bundles.insert(incident, whole);
                    }
                }
            }
            other => return Err(TestCaseError::fail(format!("unexpected item {other:?}"))),
        }
        relay.pos = r.seq;
        a.spool.ack(r.seq).unwrap();
    }
    Ok(())
}

/// Runs one step; an error is returned only for what must not fail without a fault.
fn step_once(w: &World, a: &Agent, model: &mut Vec<Declared>, s: Step) -> Result<(), String> {
    match s {
        Step::Declare { level, bundle } => {
            let req = DeclareRequest::new(level, format!("incident {}", model.len()));
            let inc = a
                .store
                .declare(req, "agent-1", "host-1")
                .map_err(|e| format!("declare: {e}"))?;
            model.push(Declared {
                id: inc.id.clone(),
                ..Declared::default()
            });
            if bundle {
                // What the CLI does after building a bundle: file, then the record.
                let bytes: Vec<u8> = format!("bundle of {} ", inc.id)
                    .bytes()
                    .cycle()
                    .take(300 + model.len() * 37)
                    .collect();
                let path = a.store.bundle_path(&inc.id).unwrap();
                write_atomic(&w.fs, &path, &bytes).map_err(|e| format!("bundle: {e}"))?;
                let summary = BundleSummary {
                    path: path.clone(),
                    size: bytes.len() as u64,
                    members: 1,
                    left_out: 0,
                    errors: 0,
                    manifest_sha256: hex(&Sha256::digest(&bytes)),
                };
                a.store
                    .record_bundle(&inc.id, &summary)
                    .map_err(|e| format!("record_bundle: {e}"))?;
                model.last_mut().unwrap().bundle = Some(bytes);
            }
        }
        Step::Close(n) => {
            if model.is_empty() {
                return Ok(());
            }
            let i = usize::from(n) % model.len();
            let id = model[i].id.clone();
            match a.store.close(&id, &w.report, SystemTime::now()) {
                Ok(_) => model[i].closed = true,
                Err(soclink::incident::IncidentError::AlreadyClosed(_)) => {}
                Err(e) => return Err(format!("close {id}: {e}")),
            }
        }
        Step::Scan => a.outbox.scan().map_err(|e| format!("scan: {e:#}"))?,
    }
    Ok(())
}

/// A timeline says `acknowledged` only once the relay holds the record and the
/// bundle (when one is recorded).
fn acknowledged_only_when_stored(a: &Agent, relay: &Relay) -> Result<(), TestCaseError> {
    for inc in a
        .store
        .list()
        .map_err(|e| TestCaseError::fail(e.to_string()))?
    {
        if inc.last(EventKind::Acknowledged).is_none() {
            continue;
        }
        prop_assert!(
            relay.records.contains_key(&inc.id),
            "{} acknowledged before its record was stored",
            &inc.id
        );
        if inc.bundle.is_some() {
            prop_assert!(
                relay.bundles.contains_key(&inc.id),
                "{} acknowledged before its bundle was stored",
                &inc.id
            );
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let w = World::new();
    let mut a = open(&w);
    let mut model: Vec<Declared> = Vec::new();
    let mut relay = Relay::default();
    let crash = |w: &World, torn: bool, seed: u64| {
        if torn {
            w.fs.crash_torn(seed)
        } else {
            w.fs.crash()
        }
    };
    for op in ops {
        match op {
            Op::Do(s) => {
                step_once(&w, &a, &mut model, s).map_err(TestCaseError::fail)?;
                acknowledged_only_when_stored(&a, &relay)?;
            }
            Op::Ship(k) => ship(&a, &mut relay, usize::from(k))?,
            Op::Restart => {
                drop(a);
                a = open(&w);
            }
            Op::Crash { torn, seed } => {
                drop(a);
                crash(&w, torn, seed);
                a = open(&w);
            }
            Op::CrashDuring {
                step,
                after,
                torn,
                seed,
            } => {
                w.fs.fail_syncs_after(Some(u64::from(after)));
                // The step may fail (the power is going); it must not panic. A
                // declaration that failed is not in the model: it may survive or not.
                let _ = step_once(&w, &a, &mut model, step);
                drop(a);
                crash(&w, torn, seed);
                w.fs.fail_syncs_after(None);
                a = open(&w);
            }
        }
    }
    // Drain: passes and deliveries until nothing moves (marks change records, which
    // are sent again).
    for _ in 0..6 {
        a.outbox.scan().unwrap();
        ship(&a, &mut relay, usize::MAX)?;
    }
    let list = a
        .store
        .list()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let ids: Vec<&str> = list.iter().map(|i| i.id.as_str()).collect();
    for d in &model {
        prop_assert!(
            ids.contains(&d.id.as_str()),
            "incident {} was declared but is gone",
            &d.id
        );
    }
    for inc in &list {
        let d = model.iter().find(|d| d.id == inc.id);
        let count = |k: EventKind| inc.timeline.iter().filter(|e| e.event == k).count();
        prop_assert_eq!(count(EventKind::Declared), 1, "{}", &inc.id);
        prop_assert_eq!(
            count(EventKind::Delivered),
            1,
            "{} delivered marks",
            &inc.id
        );
        prop_assert_eq!(
            count(EventKind::Acknowledged),
            1,
            "{} acknowledged marks",
            &inc.id
        );
        let at_relay = relay
            .records
            .get(&inc.id)
            .ok_or_else(|| TestCaseError::fail(format!("record of {} never delivered", inc.id)))?;
        prop_assert_eq!(
            at_relay,
            &serde_json::to_value(inc).unwrap(),
            "the relay's record of {} is not the current one",
            &inc.id
        );
        if let Some(b) = &inc.bundle {
            let got = relay.bundles.get(&inc.id).ok_or_else(|| {
                TestCaseError::fail(format!("bundle of {} never delivered", inc.id))
            })?;
            prop_assert_eq!(hex(&Sha256::digest(got)), b.manifest_sha256.clone());
        }
        if let Some(want) = d.and_then(|d| d.bundle.as_ref()) {
            prop_assert!(inc.bundle.is_some(), "{} lost its bundle record", &inc.id);
            prop_assert_eq!(
                relay.bundles.get(&inc.id),
                Some(want),
                "bundle of {}",
                &inc.id
            );
        }
        if d.is_some_and(|d| d.closed) {
            prop_assert!(inc.is_closed(), "{} is open again", &inc.id);
        }
        if inc.is_closed() {
            let r = relay.reports.get(&inc.id).ok_or_else(|| {
                TestCaseError::fail(format!("closing report of {} never delivered", inc.id))
            })?;
            prop_assert_eq!(r["report"].as_str(), Some(REPORT), "report of {}", &inc.id);
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("SOCLINK_MODEL_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn declared_incidents_reach_the_relay_whatever_the_crashes(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}

#[test]
fn power_out_at_each_fsync_of_a_declaration_with_bundle() {
    for after in 0..10 {
        let ops = vec![
            Op::Do(Step::Scan),
            Op::CrashDuring {
                step: Step::Declare {
                    level: 3,
                    bundle: true,
                },
                after,
                torn: after % 2 == 1,
                seed: u64::from(after),
            },
            Op::Do(Step::Scan),
            Op::Ship(2),
        ];
        run(ops).unwrap_or_else(|e| panic!("power out after {after} fsyncs: {e}"));
    }
}

/// `outbox.json` flipped at every byte or truncated at every length: each damaged copy
/// is set aside at start (kept as found), and the incident's record and bundle are
/// enqueued again, which the relay takes idempotently. Trusting a damaged copy could
/// mark the incident delivered on another batch's acknowledgement.
#[test]
fn a_damaged_outbox_state_is_set_aside_and_the_incident_sent_again() {
    use soclink::agent::incident::outbox::quarantine_damaged;
    let w = World::new();
    let a = open(&w);
    let mut model = Vec::new();
    let mut relay = Relay::default();
    for s in [
        Step::Declare {
            level: 3,
            bundle: true,
        },
        Step::Scan,
    ] {
        step_once(&w, &a, &mut model, s).unwrap();
    }
    ship(&a, &mut relay, 100).unwrap();
    step_once(&w, &a, &mut model, Step::Scan).unwrap();
    drop(a);
    let path = w
        .state
        .join("incidents")
        .join(&model[0].id)
        .join("outbox.json");
    let good = w.fs.read(&path).expect("outbox.json written");
    assert!(quarantine_damaged(&w.fs, &w.state).is_empty(), "intact");
    let mut damaged_copies = Vec::new();
    for at in 0..good.len() {
        for mask in [0x01u8, 0x80] {
            let mut d = good.clone();
            d[at] ^= mask;
            damaged_copies.push(d);
        }
        damaged_copies.push(good[..at].to_vec());
    }
    for (i, damaged) in damaged_copies.iter().enumerate() {
        w.fs.write_durable(&path, damaged);
        let aside = quarantine_damaged(&w.fs, &w.state);
        assert_eq!(aside.len(), 1, "case {i}: damage not detected");
        assert_eq!(
            w.fs.read(&aside[0]).as_ref(),
            Some(damaged),
            "kept as found"
        );
        assert!(w.fs.read(&path).is_none(), "case {i}: moved aside");
        let a = open(&w);
        let before = a.spool.stats().durable_seq;
        a.outbox.scan().unwrap();
        assert!(
            a.spool.stats().durable_seq >= before + 2,
            "case {i}: record and bundle enqueued again"
        );
        assert!(quarantine_damaged(&w.fs, &w.state).is_empty());
        ship(&a, &mut relay, 100).unwrap();
        a.outbox.scan().unwrap();
        acknowledged_only_when_stored(&a, &relay).unwrap();
    }
    let a = open(&w);
    let inc = &a.store.list().unwrap()[0];
    for k in [EventKind::Delivered, EventKind::Acknowledged] {
        assert_eq!(
            inc.timeline.iter().filter(|e| e.event == k).count(),
            1,
            "{k:?} once in the timeline"
        );
    }
    assert_eq!(relay.bundles.get(&model[0].id), model[0].bundle.as_ref());
    eprintln!("outbox state cases: {}", damaged_copies.len());
}
