//! The intel collector's durable state under crashes, on a simulated file system that
//! loses every write and directory entry not fsynced (optionally tearing the last
//! ones). Random operations stage alert records, move a hand-driven clock, tick (which
//! closes due periods in four steps: outbox file, priority spool, `state.json`,
//! staging acknowledgement), cut `run-now` partials, let a relay take and acknowledge
//! items from the priority spool, restart the agent, or cut the power, between
//! operations or at the n-th fsync inside one.
//!
//! Proves, against a model that only knows when each record was staged: every period
//! from the first start to the last is delivered exactly once (one item name, and every
//! copy the relay was sent carries the same records), holding exactly the records staged
//! in it (a record whose staging failed at a crash may be there once or not at all);
//! each partial holds the records of its span; an item `run-now` returned reaches the
//! relay; the outbox is empty once everything is acknowledged; recovery never fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use soclink::agent::intel::Collector;
use soclink::agent::sources::SealedBatch;
use soclink::batch::{BatchMeta, Item};
use soclink::fs::Fs;
use soclink::fs::sim::SimFs;
use soclink::intel::{IntelSettings, item, item_name, period_start};
use soclink::ops::status::AgentHandles;
use soclink::spool::{Spool, SpoolOptions};

/// Period length (seconds) and the clock's start (a multiple of it, plus a little).
const EVERY: u64 = 10;
const T0: u64 = 1_795_663_003;

#[derive(Debug, Clone, Copy)]
enum Step {
    Stage(u8),
    Tick,
    RunNow,
}

#[derive(Debug, Clone)]
enum Op {
    Do(Step),
    /// Move the clock forward this many seconds.
    Advance(u8),
    /// The relay takes and acknowledges up to this many items' records.
    Ship(u8),
    /// Stop and start the agent (nothing lost).
    Restart,
    /// Power loss between operations.
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
        2 => (1u8..4).prop_map(Step::Stage),
        2 => Just(Step::Tick),
        1 => Just(Step::RunNow),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..4).prop_map(|n| Op::Do(Step::Stage(n))),
        4 => (1u8..16).prop_map(Op::Advance),
        4 => Just(Op::Do(Step::Tick)),
        1 => Just(Op::Do(Step::RunNow)),
        3 => (1u8..4).prop_map(Op::Ship),
        1 => Just(Op::Restart),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(torn, seed)| Op::Crash { torn, seed }),
        3 => (step(), 0u8..12, any::<bool>(), any::<u64>())
            .prop_map(|(step, after, torn, seed)| Op::CrashDuring { step, after, torn, seed }),
    ]
}

/// A staged record as the model knows it.
#[derive(Debug, Clone)]
struct Staged {
    at: u64,
    line: String,
    /// `stage` returned Ok: it must be delivered. Otherwise (a crash inside `stage`)
    /// it may be delivered once, or not at all.
    certain: bool,
}

/// What the relay keeps: the first whole copy of each item name, and the records of
/// every whole copy it was sent (to prove that copies of one name agree).
#[derive(Default)]
struct Relay {
    pos: u64,
    parts: BTreeMap<(String, String), Vec<u8>>,
    stored: BTreeMap<String, (item::Header, Vec<String>)>,
    copies: BTreeMap<String, BTreeSet<Vec<String>>>,
}

struct World {
    fs: SimFs,
    clock: Arc<AtomicU64>,
    state: PathBuf,
}

struct Agent {
    c: Collector,
    priority: Spool,
}

fn settings() -> IntelSettings {
    IntelSettings {
        every: Duration::from_secs(EVERY),
        files: soclink::config::FileSourceConfig {
            include: vec!["alerts.ndjson".into()],
            exclude: Vec::new(),
            start_at: soclink::config::StartAt::Beginning,
            max_line_bytes: 1 << 20,
            partial_line_timeout: Duration::from_secs(5),
            rescan_interval: Duration::from_secs(10),
            rotate_wait: Duration::from_secs(5),
            max_open_files: soclink::config::DEFAULT_MAX_OPEN_FILES,
            follow_symlinks: Default::default(),
            protected: Vec::new(),
        },
        max_upload_size: 1 << 20,
        // A few records per segment: acknowledged ones are deleted, as on a busy agent.
        staging_segment_size: 256,
    }
}

fn open(w: &World) -> Agent {
    let fs: Arc<dyn Fs> = Arc::new(w.fs.clone());
    let (priority, _) = Spool::open_with_fs(
        &w.state.join("priority"),
        SpoolOptions {
            max_size: 1 << 30,
            segment_size: 4096,
            gate_on_checkpoint: false,
        },
        fs.clone(),
    )
    .expect("priority spool recovery never fails");
    let handles = AgentHandles {
        id: "agent-1".into(),
        identity: "agent-1".into(),
        state_dir: w.state.clone(),
        host: "host-1".into(),
        sources: Vec::new(),
        spool: priority.clone(),
        spool_max_bytes: 1 << 30,
        upstream: None,
        started: Instant::now(),
        intel: None,
        recovery: Arc::default(),
    };
    let clock = w.clock.clone();
    let c = Collector::open_with(
        &settings(),
        "agent-1",
        "host-1",
        &w.state,
        priority.clone(),
        handles,
        fs,
        Arc::new(move || UNIX_EPOCH + Duration::from_secs(clock.load(Ordering::SeqCst))),
    )
    .unwrap_or_else(|e| panic!("intel recovery failed: {e:#}"));
    Agent { c, priority }
}

fn records_of(bytes: &[u8]) -> Vec<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("a stored item inflates");
    text.lines().skip(1).map(str::to_owned).collect()
}

/// The relay takes up to `max` records after its position, in order, stores whole
/// items (first copy of a name wins, as `relay::intel::store_chunk` does) and
/// acknowledges each record.
fn ship(a: &Agent, relay: &mut Relay, max: usize) -> Result<(), TestCaseError> {
    for _ in 0..max {
        let Some(r) = a.priority.read(relay.pos + 1).unwrap() else {
            break;
        };
        let meta: BatchMeta = serde_json::from_slice(&r.meta).unwrap();
        let Some(Item::IntelChunk {
            name,
            offset,
            total,
            sha256,
        }) = meta.item
        else {
            return Err(TestCaseError::fail(format!(
                "unexpected item {:?}",
                meta.item
            )));
        };
        let buf = relay
            .parts
            .entry((name.clone(), sha256.clone()))
            .or_default();
        let end = offset as usize + r.payload.len();
        if buf.len() < end {
            buf.resize(end, 0);
        }
        buf[offset as usize..end].copy_from_slice(&r.payload);
        if end as u64 == total {
            let whole = relay.parts.remove(&(name.clone(), sha256.clone())).unwrap();
            let sha: String = Sha256::digest(&whole)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            prop_assert_eq!(&sha, &sha256, "item {} arrived with another hash", name);
            let header = item::verify(&whole[..], u64::MAX)
                .map_err(|e| TestCaseError::fail(format!("item {name}: {e}")))?;
            let recs = records_of(&whole);
            relay
                .copies
                .entry(name.clone())
                .or_default()
                .insert(recs.clone());
            relay.stored.entry(name).or_insert((header, recs));
        }
        relay.pos = r.seq;
        a.priority.ack(r.seq).unwrap();
    }
    Ok(())
}

fn stage(a: &mut Agent, m: &mut Vec<Staged>, now: u64, n: u8) -> anyhow::Result<()> {
    let k = m.len();
    let lines: Vec<String> = (0..n)
        .map(|j| format!("{{\"alert\":{k},\"part\":{j}}}"))
        .collect();
    let mut raw = lines.join("\n").into_bytes();
    raw.push(b'\n');
    let r = a.c.stage(&SealedBatch {
        source: soclink::intel::SOURCE.into(),
        day: "2026-11-26".into(),
        events: u32::from(n),
        raw,
        cursor: None,
    });
    for line in lines {
        m.push(Staged {
            at: now,
            line,
            certain: r.is_ok(),
        });
    }
    r
}

/// `got` holds every certain record of `want`, any of its uncertain ones at most once,
/// nothing else, in staging order.
fn check_records(what: &str, got: &[String], want: &[&Staged]) -> Result<(), TestCaseError> {
    let mut i = 0;
    for s in want {
        if got.get(i) == Some(&s.line) {
            i += 1;
        } else {
            prop_assert!(
                !s.certain,
                "{}: record {} is missing (got {:?})",
                what,
                s.line,
                got
            );
        }
    }
    prop_assert_eq!(i, got.len(), "{}: unexpected records {:?}", what, &got[i..]);
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let w = World {
        fs: SimFs::new(),
        clock: Arc::new(AtomicU64::new(T0)),
        state: PathBuf::from("/state"),
    };
    w.fs.create_dir_all(&w.state).unwrap();
    let mut a = open(&w);
    let mut staged: Vec<Staged> = Vec::new();
    let mut relay = Relay::default();
    // Names `run-now` returned: queued durably, so they must reach the relay.
    let mut promised: Vec<String> = Vec::new();
    // When run-now was called (a partial's cut must be one of these).
    let mut cuts: BTreeSet<u64> = BTreeSet::new();
    let now = |w: &World| w.clock.load(Ordering::SeqCst);
    let crash = |w: &World, torn: bool, seed: u64| {
        if torn {
            w.fs.crash_torn(seed)
        } else {
            w.fs.crash()
        }
    };
    for op in ops {
        match op {
            Op::Do(Step::Stage(n)) => {
                stage(&mut a, &mut staged, now(&w), n)
                    .map_err(|e| TestCaseError::fail(format!("stage: {e:#}")))?;
            }
            Op::Do(Step::Tick) => {
                a.c.tick()
                    .map_err(|e| TestCaseError::fail(format!("tick: {e:#}")))?
            }
            Op::Do(Step::RunNow) => {
                cuts.insert(now(&w));
                let q =
                    a.c.run_now()
                        .map_err(|e| TestCaseError::fail(format!("run-now: {e:#}")))?;
                promised.push(q.name);
            }
            Op::Advance(s) => {
                w.clock.fetch_add(u64::from(s), Ordering::SeqCst);
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
                // The operation may fail (the power is going); it must not panic.
                match step {
                    Step::Stage(n) => {
                        let _ = stage(&mut a, &mut staged, now(&w), n);
                    }
                    Step::Tick => {
                        let _ = a.c.tick();
                    }
                    Step::RunNow => {
                        cuts.insert(now(&w));
                        if let Ok(q) = a.c.run_now() {
                            promised.push(q.name);
                        }
                    }
                }
                drop(a);
                crash(&w, torn, seed);
                w.fs.fail_syncs_after(None);
                a = open(&w);
            }
        }
    }
    // Drain: close what is due, deliver everything, note the acknowledgements.
    a.c.tick().unwrap();
    ship(&a, &mut relay, usize::MAX)?;
    a.c.tick().unwrap();
    let status = a.c.status().lock().unwrap().clone();
    prop_assert!(
        status.queued.is_empty(),
        "still queued: {:?}",
        status.queued
    );
    let outbox = w.state.join("intel").join("outbox");
    let left: Vec<String> = w.fs.files(&outbox);
    prop_assert!(left.is_empty(), "left in the outbox: {:?}", left);

    // Every period from the first to the one now open, once, with its records.
    let first = period_start(T0, EVERY);
    let open_now = period_start(now(&w), EVERY);
    let mut want_full = BTreeSet::new();
    let mut p = first;
    while p < open_now {
        let name = item_name(p, None);
        let (header, recs) = relay
            .stored
            .get(&name)
            .ok_or_else(|| TestCaseError::fail(format!("period item {name} never delivered")))?;
        prop_assert!(!header.partial);
        let want: Vec<&Staged> = staged
            .iter()
            .filter(|s| (p..p + EVERY).contains(&s.at))
            .collect();
        check_records(&name, recs, &want)?;
        want_full.insert(name);
        p += EVERY;
    }
    for (name, (header, recs)) in &relay.stored {
        let copies = &relay.copies[name];
        prop_assert_eq!(
            copies.len(),
            1,
            "item {} was sent with different records: {:?}",
            name,
            copies
        );
        if header.partial {
            // A preview from the period's start to the second it was cut at.
            let start = period_start(parse(&header.period_start), EVERY);
            let cut = parse(&header.period_end);
            prop_assert!(cuts.contains(&cut), "partial {} cut at no run-now", name);
            let want: Vec<&Staged> = staged
                .iter()
                .filter(|s| (start..cut).contains(&s.at))
                .collect();
            check_records(name, recs, &want)?;
        } else {
            prop_assert!(want_full.contains(name), "unexpected item {}", name);
        }
    }
    for name in &promised {
        prop_assert!(
            relay.stored.contains_key(name),
            "run-now item {} never delivered",
            name
        );
    }
    Ok(())
}

fn parse(t: &str) -> u64 {
    soclink::intel::unix(soclink::incident::record::parse_time(t).unwrap())
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
    fn every_period_is_delivered_once_with_its_records(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

#[test]
fn a_crash_between_queueing_and_state_json_sends_the_same_item_again() {
    // Power out at every fsync point of a period close in turn: the period still
    // arrives once, with its records.
    for after in 0..12 {
        let ops = vec![
            Op::Do(Step::Stage(2)),
            Op::Advance(EVERY as u8),
            Op::Do(Step::Stage(1)),
            Op::CrashDuring {
                step: Step::Tick,
                after,
                torn: false,
                seed: 0,
            },
            Op::Ship(8),
        ];
        run(ops).unwrap_or_else(|e| panic!("power out after {after} fsyncs: {e}"));
    }
}

#[test]
fn a_partial_cut_at_a_crash_leaves_no_file_in_the_outbox() {
    // Power out after the partial's file and chunks are durable but before
    // `state.json` names it: nothing would ever delete the file.
    let ops = vec![
        Op::Do(Step::Stage(1)),
        Op::Advance(1),
        Op::CrashDuring {
            step: Step::RunNow,
            after: 4,
            torn: false,
            seed: 0,
        },
        Op::Do(Step::Stage(1)),
        Op::Ship(4),
    ];
    run(ops).unwrap();
}

#[test]
fn two_run_nows_in_one_second_cut_the_same_records() {
    // Both partials have the same name, and the relay keeps the first: a record staged
    // between them must be in neither.
    let ops = vec![
        Op::Do(Step::Stage(1)),
        Op::Advance(1),
        Op::Do(Step::RunNow),
        Op::Do(Step::Stage(2)),
        Op::Do(Step::RunNow),
        Op::Ship(4),
    ];
    run(ops).unwrap();
}
