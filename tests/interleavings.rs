//! Exhaustive interleavings of the parts that run concurrently on either side of the
//! link, each driven through the real data structures:
//!
//! - **agent** (`agent_spool_window_acks_reconnect`): the spool's writer (append,
//!   group commit) against the shipper (window fill from the spool, acks freeing the
//!   window and the spool, reconnect with the relay's resume point), with a relay
//!   that stores in order and dedupes by seq. Real [`Spool`] on the simulated file
//!   system (segments so small that every ack deletes files under the reader), real
//!   [`Window`] and [`resume_ack`] from `src/ship.rs`.
//! - **relay** (`relay_two_connections_of_one_agent{,_disk_full}`): an old
//!   connection of an agent still draining its buffered batches while the agent
//!   reconnects, both feeding the one store writer, with and without a batch the disk
//!   refuses. Real [`Store`] on an
//!   in-memory [`StoreFs`], real [`GroupWriter`] (the store writer thread's per-group
//!   logic: dedupe, gap refusal after a failure, commit, then replies).
//!
//! Why a scheduler in the test and not `loom`: the shared state is a `Mutex` held for
//! each whole spool/store call, tokio tasks, and a writer thread fed by an mpsc queue.
//! loom would need `#[cfg(loom)]` swaps in the spool, the sink and tokio's channels
//! (tokio's `watch` and `mpsc` are not loom-aware), and it would mostly explore lock
//! internals the code does not depend on. The races that matter are between whole
//! calls (append vs read vs ack; submit vs group commit vs HelloAck), so each actor
//! here is a sequence of atomic steps, each one call (or one critical section) of the
//! real code, and a depth-first search replays every schedule from a fresh state,
//! stopping a schedule where it reaches a state already explored (so each distinct
//! state runs once, yet every interleaving is covered). After every step the
//! invariants are checked; at every end state the liveness ones (everything
//! delivered, acknowledged, stored once). A violation prints its schedule; `replay`
//! turns one into a regression test (`stale_connection_cannot_skip_a_failed_batch`).
//!
//! Not modelled, argued instead: the shipper's wake-up on new durable records cannot
//! be lost. Each session subscribes to `watch_durable` before its first fill; a commit
//! after that marks the watch changed, the waker's `try_send` into a one-slot channel
//! either queues a wake or finds one queued, and every wake (and a 1 s tick) runs the
//! fill again. So the model lets `send` run whenever a durable record is waiting.
//!
//! Invariants, agent model: a batch is sent only if it is durable in the spool and
//! byte for byte what was appended under its seq; each connection sends each seq once,
//! in order; the spool acknowledges only what the relay holds; acks only move forward;
//! after a reconnect everything unacknowledged is sent again until acknowledged; after
//! a power loss at the end the ledger and the next seq are as acknowledged/never reused.
//!
//! Invariants, relay model: the store never holds a seq twice and never skips one
//! (its file is always `#1 #2 .. #n`); an `Ack` (or a `HelloAck` resume point) names
//! only a seq that is committed (in the synced bytes and the committed position); the
//! agent never frees a batch the store does not hold; at the end everything is stored
//! once when no connection was refused.
//!
//! The default bounds run in about 15 s; `SOCLINK_SOAK=1` widens them (more batches,
//! a third connection, more reconnects). Each case prints the interleavings covered,
//! the distinct states run and the time (`-- --nocapture`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use soclink::batch::Item;
use soclink::fs::sim::SimFs;
use soclink::protocol::BatchHeader;
use soclink::relay::sink::file::{Store, StoreFs, StoreOptions};
use soclink::relay::sink::{GroupWriter, WriteReq, WriteResult};
use soclink::ship::{Window, resume_ack};
use soclink::spool::{Spool, SpoolOptions};
use tokio::sync::oneshot;

fn soak() -> bool {
    std::env::var_os("SOCLINK_SOAK").is_some_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------
// The scheduler
// ---------------------------------------------------------------------------------

/// A system of actors; each `step` is one atomic action of the real code.
trait Model {
    fn actor_names(&self) -> Vec<&'static str>;
    /// Whether actor `a` can take a step now (a blocked actor waits, as on a lock,
    /// a channel or a wake-up).
    fn enabled(&mut self, a: usize) -> bool;
    /// Takes the step and checks the safety invariants; Err describes a violation.
    fn step(&mut self, a: usize) -> Result<(), String>;
    /// Checks an end state (no actor can move).
    fn finish(&mut self) -> Result<(), String>;
    /// Everything that decides the future of this state. A schedule that reaches a
    /// state already explored stops there: its continuations were all checked.
    fn fingerprint(&mut self) -> String;
}

#[derive(Debug, Default)]
struct Explored {
    /// Complete interleavings (start to end state) the explored state graph holds:
    /// every one of them was checked, most of them by sharing a checked suffix.
    interleavings: u128,
    /// Schedules run from the start, each to an end state or to a state explored before.
    runs: u64,
    /// Distinct states reached.
    states: usize,
    steps: u64,
    /// Schedules cut at the step bound instead of ending (must stay 0: bounds too low
    /// would silently hide end states).
    cut: u64,
    longest: usize,
}

/// Depth-first search over every schedule: replay a prefix of choices from a fresh
/// model, extend it with the first enabled actor at every new point, then backtrack
/// to the deepest point with an untried actor. A schedule stops early at a state that
/// was explored before (the steps only ever move forward, so states form a DAG and
/// such a state's continuations were all checked). Panics with the schedule on a
/// violation.
fn explore<M: Model>(name: &str, make: impl Fn() -> M, max_steps: usize) -> Explored {
    let started = Instant::now();
    let mut stats = Explored::default();
    // State fingerprint -> id; per id, the state reached by each enabled actor.
    let mut ids: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut children: Vec<Vec<usize>> = Vec::new();
    // Per depth: (index into the enabled actors, how many were enabled, state id).
    let mut stack: Vec<(usize, usize, usize)> = Vec::new();
    loop {
        let mut m = make();
        let names = m.actor_names();
        let mut trail: Vec<&'static str> = Vec::new();
        let mut depth = 0;
        let ended = loop {
            let mut fresh = None;
            if depth == stack.len() {
                // A state reached by a new step (the replayed prefix's are known).
                let next = ids.len();
                let id = *ids.entry(m.fingerprint()).or_insert(next);
                if let Some(&(_, _, parent)) = stack.last() {
                    children[parent].push(id);
                }
                if id < next {
                    break None;
                }
                children.push(Vec::new());
                fresh = Some(id);
            }
            let enabled: Vec<usize> = (0..names.len()).filter(|&a| m.enabled(a)).collect();
            if enabled.is_empty() {
                break Some(true);
            }
            if depth >= max_steps {
                break Some(false);
            }
            let pick = match (stack.get(depth), fresh) {
                (Some(&(i, n, _)), _) => {
                    assert_eq!(n, enabled.len(), "{name}: the model is not deterministic");
                    i
                }
                (None, Some(id)) => {
                    stack.push((0, enabled.len(), id));
                    0
                }
                (None, None) => unreachable!(),
            };
            let a = enabled[pick];
            trail.push(names[a]);
            if let Err(e) = m.step(a) {
                panic!("{name}: {e}\n  schedule: {}", trail.join(" "));
            }
            depth += 1;
            stats.steps += 1;
        };
        stats.runs += 1;
        stats.longest = stats.longest.max(depth);
        match ended {
            Some(true) => {
                if let Err(e) = m.finish() {
                    panic!("{name}: at the end: {e}\n  schedule: {}", trail.join(" "));
                }
            }
            Some(false) => stats.cut += 1,
            None => {}
        }
        stack.truncate(depth);
        loop {
            match stack.last_mut() {
                None => {
                    stats.states = ids.len();
                    stats.interleavings = count_paths(&children);
                    eprintln!(
                        "{name}: {} interleavings, {} distinct states, {} runs ({} steps, longest {}) in {:.2?}",
                        stats.interleavings,
                        stats.states,
                        stats.runs,
                        stats.steps,
                        stats.longest,
                        started.elapsed()
                    );
                    return stats;
                }
                Some((i, n, _)) if *i + 1 < *n => {
                    *i += 1;
                    break;
                }
                Some(_) => {
                    stack.pop();
                }
            }
        }
    }
}

/// Paths from the first state (id 0) to an end state, in a DAG whose children of a
/// state are listed once per actor that leads there.
fn count_paths(children: &[Vec<usize>]) -> u128 {
    // Ids are assigned in discovery order and a child is never discovered before its
    // parent, but a child may carry a lower id (reached earlier another way): go by
    // an explicit post-order instead.
    let mut paths: Vec<Option<u128>> = vec![None; children.len()];
    let mut todo = vec![(0usize, false)];
    while let Some((id, expanded)) = todo.pop() {
        if paths[id].is_some() {
            continue;
        }
        if expanded || children[id].is_empty() {
            let p = if children[id].is_empty() {
                1
            } else {
                children[id]
                    .iter()
                    .map(|&c| paths[c].expect("child counted first"))
                    .fold(0u128, u128::saturating_add)
            };
            paths[id] = Some(p);
        } else {
            todo.push((id, true));
            todo.extend(children[id].iter().map(|&c| (c, false)));
        }
    }
    paths.first().copied().flatten().unwrap_or(0)
}

/// Runs one given schedule (actor names), for regression tests of a found race.
fn replay<M: Model>(mut m: M, schedule: &[&str]) -> Result<M, String> {
    let names = m.actor_names();
    for (k, want) in schedule.iter().enumerate() {
        let a = names
            .iter()
            .position(|n| n == want)
            .unwrap_or_else(|| panic!("no actor {want}"));
        assert!(m.enabled(a), "step {k}: {want} is not enabled");
        m.step(a).map_err(|e| format!("step {k} ({want}): {e}"))?;
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------
// Agent: spool writer x shipper window x acks x reconnect
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum WriterOp {
    Append,
    Commit,
}

struct AgentModel {
    fs: SimFs,
    spool: Option<Spool>,
    plan: Vec<WriterOp>,
    pc: usize,
    /// Payload of each appended seq (index seq - 1).
    appended: Vec<Vec<u8>>,
    window: Window,
    window_batches: usize,
    /// Frames on the wire of the current connection, and acks coming back.
    up: VecDeque<(u64, Vec<u8>)>,
    down: VecDeque<u64>,
    /// Seqs sent on the current connection.
    sent_here: Vec<u64>,
    reconnects_left: u32,
    /// The relay: what it stored, in order, and its position.
    relay: Vec<Vec<u8>>,
    last_acked: u64,
}

const SPOOL_DIR: &str = "/agent/spool";

impl AgentModel {
    fn new(plan: Vec<WriterOp>, window_batches: usize, reconnects: u32) -> AgentModel {
        let fs = SimFs::new();
        let opts = SpoolOptions {
            max_size: 1 << 20,
            // Smaller than one record: every record gets its own segment, so each ack
            // deletes files while the shipper reads the next ones.
            segment_size: 48,
            gate_on_checkpoint: false,
        };
        let (spool, _) = Spool::open_with_fs(Path::new(SPOOL_DIR), opts, Arc::new(fs.clone()))
            .expect("open spool");
        AgentModel {
            fs,
            spool: Some(spool),
            plan,
            pc: 0,
            appended: Vec::new(),
            window: Window::new(&[0], window_batches, u64::MAX),
            window_batches,
            up: VecDeque::new(),
            down: VecDeque::new(),
            sent_here: Vec::new(),
            reconnects_left: reconnects,
            relay: Vec::new(),
            last_acked: 0,
        }
    }

    fn spool(&self) -> &Spool {
        self.spool.as_ref().expect("spool open")
    }

    fn records(&self) -> u64 {
        self.plan
            .iter()
            .filter(|o| matches!(o, WriterOp::Append))
            .count() as u64
    }
}

const A_WRITER: usize = 0;
const A_SEND: usize = 1;
const A_RELAY: usize = 2;
const A_ACK: usize = 3;
const A_RECONNECT: usize = 4;

impl Model for AgentModel {
    fn actor_names(&self) -> Vec<&'static str> {
        vec!["write", "send", "relay", "ack", "reconnect"]
    }

    fn enabled(&mut self, a: usize) -> bool {
        match a {
            A_WRITER => self.pc < self.plan.len(),
            // The session's fill loop: window room and a durable record to send.
            A_SEND => {
                !self.window.is_full() && self.window.next(0) <= self.spool().stats().durable_seq
            }
            A_RELAY => !self.up.is_empty(),
            A_ACK => !self.down.is_empty(),
            // Ack timeout or a broken link: only matters with batches in flight.
            A_RECONNECT => self.reconnects_left > 0 && self.window.in_flight() > 0,
            _ => false,
        }
    }

    fn step(&mut self, a: usize) -> Result<(), String> {
        match a {
            A_WRITER => {
                let op = self.plan[self.pc];
                self.pc += 1;
                match op {
                    WriterOp::Append => {
                        let want = self.appended.len() as u64 + 1;
                        let payload = format!("batch-{want}").into_bytes();
                        let seq = self
                            .spool()
                            .append(b"{}", &payload)
                            .map_err(|e| e.to_string())?;
                        if seq != want {
                            return Err(format!("append gave seq {seq}, expected {want}"));
                        }
                        self.appended.push(payload);
                    }
                    WriterOp::Commit => {
                        self.spool().commit().map_err(|e| e.to_string())?;
                    }
                }
            }
            A_SEND => {
                let want = self.window.next(0);
                let durable = self.spool().stats().durable_seq;
                let rec = self
                    .spool()
                    .read(want)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("seq {want} <= durable {durable} but read gave none"))?;
                if rec.seq != want {
                    return Err(format!(
                        "asked for seq {want}, the spool handed out {}",
                        rec.seq
                    ));
                }
                if rec.seq > durable {
                    return Err(format!(
                        "sent seq {} before it was durable ({durable})",
                        rec.seq
                    ));
                }
                if self.appended.get(rec.seq as usize - 1) != Some(&rec.payload) {
                    return Err(format!("seq {} handed out with other bytes", rec.seq));
                }
                if let Some(&last) = self.sent_here.last()
                    && rec.seq != last + 1
                {
                    return Err(format!(
                        "sent seq {} after {last} on one connection",
                        rec.seq
                    ));
                }
                self.window.sent(0, rec.seq, rec.payload.len() as u64);
                if self.window.in_flight() > self.window_batches {
                    return Err("window over its limit".into());
                }
                self.sent_here.push(rec.seq);
                self.up.push_back((rec.seq, rec.payload));
            }
            A_RELAY => {
                let (seq, payload) = self.up.pop_front().expect("enabled");
                let pos = self.relay.len() as u64;
                if seq == pos + 1 {
                    self.relay.push(payload);
                } else if seq > pos + 1 {
                    return Err(format!("relay at {pos} received seq {seq}: a gap"));
                } else if self.relay[seq as usize - 1] != payload {
                    return Err(format!("seq {seq} resent with other bytes"));
                }
                // The relay acks once its copy is durable (duplicates included).
                self.down.push_back(seq);
            }
            A_ACK => {
                let seq = self.down.pop_front().expect("enabled");
                if let Some(upto) = self.window.ack(0, seq) {
                    if upto > seq {
                        return Err(format!("ack of {seq} freed up to {upto}"));
                    }
                    if upto <= self.last_acked {
                        return Err(format!("ack went back from {} to {upto}", self.last_acked));
                    }
                    self.spool().ack(upto).map_err(|e| e.to_string())?;
                    self.last_acked = upto;
                }
            }
            A_RECONNECT => {
                self.reconnects_left -= 1;
                // The old connection's frames and acks are lost with it.
                self.up.clear();
                self.down.clear();
                self.sent_here.clear();
                let relay_pos = self.relay.len() as u64;
                let stats = self.spool().stats();
                if let Some(upto) = resume_ack(relay_pos, stats.acked, stats.durable_seq) {
                    self.spool().ack(upto).map_err(|e| e.to_string())?;
                    self.last_acked = self.last_acked.max(upto);
                }
                self.window = Window::new(&[self.spool().acked()], self.window_batches, u64::MAX);
            }
            _ => unreachable!(),
        }
        let acked = self.spool().acked();
        if acked > self.relay.len() as u64 {
            return Err(format!(
                "spool acknowledged {acked}, the relay holds only {}",
                self.relay.len()
            ));
        }
        if acked != self.last_acked {
            return Err(format!(
                "spool acked {acked}, acks said {}",
                self.last_acked
            ));
        }
        Ok(())
    }

    fn fingerprint(&mut self) -> String {
        let st = self.spool().stats();
        format!(
            "{} {:?} {:?} {:?} {:?} {} {} {} | {} {} {} {} {} {}",
            self.pc,
            self.window,
            self.up.iter().map(|f| f.0).collect::<Vec<_>>(),
            self.down,
            self.sent_here,
            self.reconnects_left,
            self.relay.len(),
            self.last_acked,
            st.first_unacked,
            st.next_seq,
            st.durable_seq,
            st.acked,
            st.bytes,
            st.segments
        )
    }

    fn finish(&mut self) -> Result<(), String> {
        let n = self.records();
        if self.relay.len() as u64 != n || self.relay != self.appended {
            return Err(format!(
                "the relay holds {} of {n} batches, or other bytes",
                self.relay.len()
            ));
        }
        if self.spool().acked() != n || self.window.in_flight() != 0 {
            return Err(format!(
                "spool acked {} of {n}, {} in flight",
                self.spool().acked(),
                self.window.in_flight()
            ));
        }
        // Power loss now: the acks and the sequence counter must have been durable.
        self.spool = None;
        self.fs.crash();
        let (spool, _) = Spool::open_with_fs(
            Path::new(SPOOL_DIR),
            SpoolOptions::default(),
            Arc::new(self.fs.clone()),
        )
        .map_err(|e| e.to_string())?;
        let st = spool.stats();
        if st.acked != n || st.next_seq <= n {
            return Err(format!(
                "after a power loss: acked {}, next seq {} (expected {n}, > {n})",
                st.acked, st.next_seq
            ));
        }
        Ok(())
    }
}

fn agent_plan(groups: &[usize]) -> Vec<WriterOp> {
    let mut plan = Vec::new();
    for &g in groups {
        plan.extend(std::iter::repeat_n(WriterOp::Append, g));
        plan.push(WriterOp::Commit);
    }
    plan
}

#[test]
fn agent_spool_window_acks_reconnect() {
    // (commit groups, window, reconnects)
    let mut cases = vec![
        (vec![1, 2, 1], 2, 2),
        (vec![2, 2], 1, 2),
        (vec![3, 1], 3, 1),
        (vec![1, 1, 1], 2, 2),
        (vec![2, 2, 2], 2, 2),
    ];
    if soak() {
        cases = vec![
            (vec![2, 2, 2], 2, 3),
            (vec![1, 1, 1, 1, 1], 3, 2),
            (vec![3, 3], 2, 3),
            (vec![1, 2, 1, 2], 4, 2),
        ];
    }
    for (groups, window, reconnects) in cases {
        let name = format!("agent groups={groups:?} window={window} reconnects={reconnects}");
        let plan = agent_plan(&groups);
        let s = explore(
            &name,
            || AgentModel::new(plan.clone(), window, reconnects),
            200,
        );
        assert_eq!(s.cut, 0, "{name}: schedules cut at the step bound");
        assert!(
            s.interleavings > 1000,
            "{name}: suspiciously few interleavings"
        );
    }
}

// ---------------------------------------------------------------------------------
// Relay: two connections of one agent x the store writer
// ---------------------------------------------------------------------------------

#[derive(Default)]
struct MemInner {
    dirs: BTreeSet<PathBuf>,
    /// path -> (data, bytes known durable)
    files: BTreeMap<PathBuf, (Vec<u8>, Vec<u8>)>,
    /// The first write containing this marker fails with a full disk, once.
    fail_write_of: Option<Vec<u8>>,
}

/// An in-memory [`StoreFs`] that tracks which bytes were synced, and can refuse one
/// write as a full disk would. (Power loss itself is `tests/store_model.rs`'s job.)
#[derive(Clone, Default)]
struct MemFs(Arc<Mutex<MemInner>>);

impl MemFs {
    fn inner(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.0.lock().unwrap()
    }
    fn parent_exists(g: &MemInner, p: &Path) -> bool {
        p.parent()
            .is_none_or(|d| d == Path::new("/") || g.dirs.contains(d))
    }
    fn data(&self, p: &Path) -> Vec<u8> {
        self.inner()
            .files
            .get(p)
            .map(|f| f.0.clone())
            .unwrap_or_default()
    }
    fn synced(&self, p: &Path) -> Vec<u8> {
        self.inner()
            .files
            .get(p)
            .map(|f| f.1.clone())
            .unwrap_or_default()
    }
}

impl StoreFs for MemFs {
    fn create_dir(&self, path: &Path) -> io::Result<bool> {
        let mut g = self.inner();
        if g.dirs.contains(path) {
            return Ok(false);
        }
        if !Self::parent_exists(&g, path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        g.dirs.insert(path.to_path_buf());
        Ok(true)
    }
    fn file_len(&self, path: &Path) -> io::Result<Option<u64>> {
        Ok(self.inner().files.get(path).map(|f| f.0.len() as u64))
    }
    fn write_at(&self, path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut g = self.inner();
        if let Some(m) = g.fail_write_of.clone()
            && data.windows(m.len()).any(|w| w == m.as_slice())
        {
            g.fail_write_of = None;
            return Err(io::ErrorKind::StorageFull.into());
        }
        if !Self::parent_exists(&g, path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        let f = g.files.entry(path.to_path_buf()).or_default();
        let end = offset as usize + data.len();
        if f.0.len() < end {
            f.0.resize(end, 0);
        }
        f.0[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut g = self.inner();
        let f = g.files.get_mut(path).ok_or(io::ErrorKind::NotFound)?;
        f.0.resize(len as usize, 0);
        Ok(())
    }
    fn sync_file(&self, path: &Path) -> io::Result<()> {
        let mut g = self.inner();
        let f = g.files.get_mut(path).ok_or(io::ErrorKind::NotFound)?;
        f.1 = f.0.clone();
        Ok(())
    }
    fn sync_dir(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }
    fn read_limited(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let g = self.inner();
        let f = g.files.get(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(f.0[..f.0.len().min(limit as usize + 1)].to_vec())
    }
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut g = self.inner();
        if !Self::parent_exists(&g, path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        g.files
            .insert(path.to_path_buf(), (data.to_vec(), Vec::new()));
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut g = self.inner();
        let f = g.files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        g.files.insert(to.to_path_buf(), f);
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner()
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let g = self.inner();
        Ok(g.files
            .keys()
            .chain(g.dirs.iter())
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
}

const AGENT: &str = "agent-1";
const STREAM: &str = "logs";
const SOURCE: &str = "app";
const DAY: &str = "2026-11-26";

/// A batch's bytes in the store: fixed width, so the file parses back into seqs.
fn member(seq: u64) -> Vec<u8> {
    format!("<{seq:03}>").into_bytes()
}

fn parse_members(data: &[u8]) -> Result<Vec<u64>, String> {
    data.chunks(5)
        .map(|c| {
            std::str::from_utf8(c)
                .ok()
                .and_then(|s| s.strip_prefix('<')?.strip_suffix('>')?.parse().ok())
                .ok_or_else(|| format!("store file holds a torn member {c:?}"))
        })
        .collect()
}

enum Reply {
    Waiting(oneshot::Receiver<WriteResult>),
    Done(WriteResult),
}

/// The relay side of one connection: its reader (submits batches already on the
/// wire, in order) and its acker (answers them in order once each is committed).
struct Conn {
    /// Next seq on the wire and the last one the agent sent on this connection.
    next: u64,
    last: u64,
    replies: VecDeque<(u64, Reply)>,
    /// The acker is writing frames (it stops at the first error it sends).
    acker_alive: bool,
    /// Submits left once the acker stopped: the reader notices only when it next
    /// hands an ack to the acker, after it already submitted that batch.
    submits_after_acker: u32,
}

struct RelayModel {
    fs: MemFs,
    store: Store,
    writer: GroupWriter,
    /// Submitted requests (with their connection) not yet taken by the writer.
    queue: VecDeque<(usize, WriteReq)>,
    group: Vec<(usize, WriteReq)>,
    conns: Vec<Conn>,
    max_conns: usize,
    batches: u64,
    /// The agent's acknowledged seq (its spool frees up to here).
    agent_acked: u64,
    refused: bool,
}

const STORE_DIR: &str = "/relay/store";
const STATE_DIR: &str = "/relay/state";

impl RelayModel {
    fn new(batches: u64, max_conns: usize, fail: Option<u64>) -> RelayModel {
        let fs = MemFs::default();
        fs.inner().fail_write_of = fail.map(member);
        let (store, _) = Store::open_with_fs(
            StoreOptions {
                store_dir: STORE_DIR.into(),
                state_dir: STATE_DIR.into(),
            },
            Arc::new(fs.clone()),
        )
        .expect("open store");
        let mut m = RelayModel {
            fs,
            store,
            writer: GroupWriter::default(),
            queue: VecDeque::new(),
            group: Vec::new(),
            conns: Vec::new(),
            max_conns,
            batches,
            agent_acked: 0,
            refused: false,
        };
        m.connect().expect("first connection");
        m
    }

    fn file(&self) -> PathBuf {
        Path::new(STORE_DIR)
            .join(AGENT)
            .join(SOURCE)
            .join(format!("{DAY}.ndjson.gz"))
    }

    /// The agent (re)connects: HelloAck with the store's committed position, the agent
    /// acknowledges up to it and sends everything after its acknowledged seq.
    fn connect(&mut self) -> Result<(), String> {
        let pos = self.store.stored_seq(AGENT, STREAM);
        self.check_committed(pos, "HelloAck")?;
        if let Some(upto) = resume_ack(pos, self.agent_acked, self.batches) {
            self.agent_acked = upto;
        }
        self.conns.push(Conn {
            next: self.agent_acked + 1,
            last: self.batches,
            replies: VecDeque::new(),
            acker_alive: true,
            submits_after_acker: 1,
        });
        Ok(())
    }

    /// `seq` may be acknowledged: committed position and synced bytes both hold it.
    fn check_committed(&self, seq: u64, what: &str) -> Result<(), String> {
        let pos = self.store.stored_seq(AGENT, STREAM);
        let synced = parse_members(&self.fs.synced(&self.file()))?;
        if seq > pos || (seq > 0 && !synced.contains(&seq)) {
            return Err(format!(
                "{what} names #{seq}, committed position {pos}, synced members {synced:?}"
            ));
        }
        Ok(())
    }

    fn request(seq: u64) -> (WriteReq, oneshot::Receiver<WriteResult>) {
        let (tx, rx) = oneshot::channel();
        let meta = BatchHeader {
            stream: STREAM.into(),
            seq,
            source: SOURCE.into(),
            day: DAY.into(),
            events: 1,
            raw_bytes: 5,
            origin: None,
            item: None,
        };
        let req = WriteReq {
            agent: AGENT.into(),
            stream: STREAM.into(),
            seq,
            source: SOURCE.into(),
            day: DAY.into(),
            gzip: member(seq).into(),
            meta,
            reply: tx,
        };
        (req, rx)
    }
}

// Actor ids: reader i = 2i, acker i = 2i + 1, then these.
const R_MAX_CONNS: usize = 3;
const R_RECONNECT: usize = 2 * R_MAX_CONNS;
const R_GATHER: usize = R_RECONNECT + 1;
const R_WRITE: usize = R_RECONNECT + 2;

impl Model for RelayModel {
    fn actor_names(&self) -> Vec<&'static str> {
        vec![
            "read0",
            "ack0",
            "read1",
            "ack1",
            "read2",
            "ack2",
            "reconnect",
            "gather",
            "write",
        ]
    }

    fn enabled(&mut self, a: usize) -> bool {
        match a {
            R_RECONNECT => self.conns.len() < self.max_conns,
            // The writer thread takes what is queued into its group...
            R_GATHER => !self.queue.is_empty(),
            // ... and writes it once it has at least one.
            R_WRITE => !self.group.is_empty(),
            _ => {
                let Some(c) = self.conns.get(a / 2) else {
                    return false;
                };
                if a.is_multiple_of(2) {
                    c.next <= c.last && (c.acker_alive || c.submits_after_acker > 0)
                } else {
                    c.acker_alive && matches!(c.replies.front(), Some((_, Reply::Done(_))))
                }
            }
        }
    }

    fn step(&mut self, a: usize) -> Result<(), String> {
        match a {
            R_RECONNECT => self.connect()?,
            R_GATHER => {
                let r = self.queue.pop_front().expect("enabled");
                self.group.push(r);
            }
            R_WRITE => {
                let group = std::mem::take(&mut self.group)
                    .into_iter()
                    .map(|(_, r)| r)
                    .collect();
                if self
                    .writer
                    .write_group(&mut self.store, Path::new(STORE_DIR), group)
                    .is_err()
                {
                    return Err("the store commit failed".into());
                }
                for c in &mut self.conns {
                    for (_, r) in c.replies.iter_mut() {
                        if let Reply::Waiting(rx) = r
                            && let Ok(res) = rx.try_recv()
                        {
                            *r = Reply::Done(res);
                        }
                    }
                }
            }
            _ if a.is_multiple_of(2) => {
                let c = &mut self.conns[a / 2];
                let seq = c.next;
                c.next += 1;
                if !c.acker_alive {
                    c.submits_after_acker -= 1;
                }
                let (req, rx) = Self::request(seq);
                c.replies.push_back((seq, Reply::Waiting(rx)));
                self.queue.push_back((a / 2, req));
            }
            _ => {
                let current = a / 2 + 1 == self.conns.len();
                let c = &mut self.conns[a / 2];
                let Some((seq, Reply::Done(res))) = c.replies.pop_front() else {
                    unreachable!("enabled");
                };
                match res {
                    Ok(_) => {
                        self.check_committed(seq, "Ack")?;
                        // Only the agent's current connection still reaches it.
                        if current {
                            self.agent_acked = self.agent_acked.max(seq);
                        }
                    }
                    Err(_) => {
                        // The Error frame ends the connection; the agent reconnects.
                        c.acker_alive = false;
                        self.refused = true;
                    }
                }
            }
        }
        let live = parse_members(&self.fs.data(&self.file()))?;
        if live.iter().enumerate().any(|(i, &s)| s != i as u64 + 1) {
            return Err(format!("store file holds {live:?}: a seq twice or skipped"));
        }
        let pos = self.store.stored_seq(AGENT, STREAM);
        if self.agent_acked > pos {
            return Err(format!(
                "the agent freed up to #{}, the store committed #{pos}",
                self.agent_acked
            ));
        }
        Ok(())
    }

    fn fingerprint(&mut self) -> String {
        let conns: Vec<String> = self
            .conns
            .iter()
            .map(|c| {
                let replies: Vec<String> = c
                    .replies
                    .iter()
                    .map(|(seq, r)| match r {
                        Reply::Waiting(_) => format!("{seq}?"),
                        Reply::Done(Ok(_)) => format!("{seq}+"),
                        Reply::Done(Err(_)) => format!("{seq}-"),
                    })
                    .collect();
                format!(
                    "{}..{} {replies:?} {} {}",
                    c.next, c.last, c.acker_alive, c.submits_after_acker
                )
            })
            .collect();
        let file = self.file();
        format!(
            "{:?} {:?} {conns:?} {} {} | {:?} {:?} {} {} {}",
            self.queue
                .iter()
                .map(|(c, r)| (c, r.seq))
                .collect::<Vec<_>>(),
            self.group
                .iter()
                .map(|(c, r)| (c, r.seq))
                .collect::<Vec<_>>(),
            self.agent_acked,
            self.refused,
            self.fs.data(&file),
            self.fs.synced(&file),
            self.store.stored_seq(AGENT, STREAM),
            self.store.position(AGENT, STREAM),
            self.fs.inner().fail_write_of.is_some(),
        )
    }

    fn finish(&mut self) -> Result<(), String> {
        let stored = parse_members(&self.fs.synced(&self.file()))?;
        let pos = self.store.stored_seq(AGENT, STREAM);
        if stored.len() as u64 != pos {
            return Err(format!("position {pos}, synced members {stored:?}"));
        }
        // Unless a connection was refused (then the agent's next reconnect resends),
        // the last connection delivers everything.
        if !self.refused && (pos != self.batches || self.agent_acked != self.batches) {
            return Err(format!(
                "stored {pos}, agent acked {}, of {}",
                self.agent_acked, self.batches
            ));
        }
        Ok(())
    }
}

fn relay_cases(name: &str, cases: &[(u64, usize, Option<u64>)]) {
    for &(batches, conns, fail) in cases {
        let name = format!("{name} batches={batches} connections={conns} fail={fail:?}");
        let s = explore(&name, || RelayModel::new(batches, conns, fail), 200);
        assert_eq!(s.cut, 0, "{name}: schedules cut at the step bound");
        assert!(
            s.interleavings > 1000,
            "{name}: suspiciously few interleavings"
        );
    }
}

#[test]
fn relay_two_connections_of_one_agent() {
    // (batches, connections, the batch whose first write hits a full disk)
    if soak() {
        relay_cases("relay", &[(5, 2, None), (3, 3, None)]);
    } else {
        relay_cases("relay", &[(3, 2, None), (2, 3, None)]);
    }
}

#[test]
fn relay_two_connections_of_one_agent_disk_full() {
    if soak() {
        relay_cases("relay", &[(5, 2, Some(2)), (3, 3, Some(1))]);
    } else {
        relay_cases(
            "relay",
            &[(3, 2, Some(1)), (4, 2, Some(2)), (2, 3, Some(1))],
        );
    }
}

/// The race the relay model found: batch #2 of the old connection hits a full disk and
/// its #3 is refused (no storing across the gap after a failure); the agent reconnects
/// and its resent #2 is stored; only then does the old connection's reader hand over
/// #4, which it had buffered. When #2's success cleared the failure, #4 was stored
/// across the gap and the resent #3 then dropped as a duplicate: #3 lost, yet acked.
#[test]
fn stale_connection_cannot_skip_a_failed_batch() {
    // As the model first reported it: all in one group, the agent having given up the
    // old connection (ack timeout) while its batches were still queued.
    let found = [
        "read0",
        "read0",
        "reconnect",
        "read1",
        "read0",
        "read1",
        "read1",
        "gather",
        "gather",
        "gather",
        "gather",
        "gather",
        "gather",
        "write",
    ];
    replay(RelayModel::new(3, 2, Some(1)), &found).expect("#2 not skipped");
    let schedule = [
        "read0",
        "read0",
        "read0",
        "gather",
        "gather",
        "write", // #1 stored, #2: disk full
        "gather",
        "write", // #3 refused: it would skip #2
        "ack0",
        "ack0", // Ack 1, then the Error frame: the old acker stops
        "reconnect",
        "read1",
        "gather",
        "write", // HelloAck at 1; resent #2 stored
        "read0",
        "gather",
        "write", // the old connection's buffered #4
        "read1",
        "gather",
        "write",
        "ack1",
        "ack1", // resent #3
        "read1",
        "gather",
        "write",
        "ack1", // resent #4
    ];
    let mut m = replay(RelayModel::new(4, 2, Some(2)), &schedule).expect("no batch skipped");
    assert_eq!(m.store.stored_seq(AGENT, STREAM), 4);
    assert_eq!(m.agent_acked, 4);
    m.finish().unwrap();
}

/// An incident item that could not be stored (its directory is blocked) must not be
/// skipped by the next item of its stream: the agent would drop it as acknowledged
/// once the relay's position moved past it. Real store and item files in a temp dir.
#[test]
fn failed_item_is_not_skipped_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let (mut store, _) = Store::open(StoreOptions {
        store_dir: store_dir.clone(),
        state_dir: dir.path().join("state"),
    })
    .unwrap();
    let blocked = store_dir.join(AGENT).join("incidents").join("inc-a");
    std::fs::create_dir_all(blocked.parent().unwrap()).unwrap();
    std::fs::write(&blocked, b"in the way").unwrap();
    let record = |seq: u64, incident: &str| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, format!("{{\"id\":\"{incident}\"}}\n").as_bytes()).unwrap();
        let (mut req, rx) = RelayModel::request(seq);
        req.stream = "priority".into();
        req.source = "incidents".into();
        req.gzip = gz.finish().unwrap().into();
        req.meta.item = Some(Item::IncidentRecord {
            incident: incident.into(),
        });
        (req, rx)
    };
    let mut writer = GroupWriter::default();
    let (r1, mut rx1) = record(1, "inc-a");
    let (r2, mut rx2) = record(2, "inc-b");
    writer
        .write_group(&mut store, &store_dir, vec![r1])
        .unwrap();
    assert!(rx1.try_recv().unwrap().is_err(), "#1 cannot be stored");
    writer
        .write_group(&mut store, &store_dir, vec![r2])
        .unwrap();
    let res2 = rx2.try_recv().unwrap();
    assert!(res2.is_err(), "#2 must wait for #1, got {res2:?}");
    assert_eq!(store.stored_seq(AGENT, "priority"), 0, "#1 was skipped");

    // The disk is fixed; the agent resends both.
    std::fs::remove_file(&blocked).unwrap();
    let (r1, mut rx1) = record(1, "inc-a");
    let (r2, mut rx2) = record(2, "inc-b");
    writer
        .write_group(&mut store, &store_dir, vec![r1, r2])
        .unwrap();
    assert!(rx1.try_recv().unwrap().is_ok());
    assert!(rx2.try_recv().unwrap().is_ok());
    assert_eq!(store.stored_seq(AGENT, "priority"), 2);
    for inc in ["inc-a", "inc-b"] {
        let p = store_dir
            .join(AGENT)
            .join("incidents")
            .join(inc)
            .join("record.json");
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{{\"id\":\"{inc}\"}}")
        );
    }
}
