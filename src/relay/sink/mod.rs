//! Where verified batches go: the relay's store, or (when the relay forwards upstream)
//! its own spool. One writer thread per relay owns the sink and commits in groups: many
//! connections' batches, one fsync round, then every reply. A batch's reply is sent only
//! after the commit that made it durable, and the connection acknowledges it only then.

pub mod file;

use crate::util::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::batch::{BatchMeta, Origin};
use crate::protocol::BatchHeader;
use crate::spool::Spool;
use file::{AppendOutcome, Store};

/// Most batches in one group commit.
const GROUP_MAX: usize = 512;
/// Most gzip bytes in one group commit.
const GROUP_BYTES: usize = 64 << 20;
/// After a batch could not be stored (e.g. the disk is full), later batches of its
/// stream are refused rather than stored across the gap, for this long: the sender
/// still has the missing one and resends it after the refusal. Storing them would move
/// the stream's position past it, and the sender would then drop it as acknowledged.
const REFUSE_GAP_AFTER_FAILURE: Duration = Duration::from_secs(600);

/// A verified batch on its way to durable storage.
pub struct WriteReq {
    /// Whose batch it is: the certificate identity, or the origin agent when a trusted
    /// relay forwards it.
    pub agent: String,
    pub stream: String,
    pub seq: u64,
    pub source: String,
    pub day: String,
    pub gzip: Bytes,
    /// The header as received (kept for forwarding).
    pub meta: BatchHeader,
    pub reply: oneshot::Sender<WriteResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Appended,
    Duplicate,
}

/// Ok once durable; Err with the reason to tell the sender.
pub type WriteResult = Result<Stored, String>;

#[derive(Clone)]
pub struct Sink {
    tx: mpsc::Sender<WriteReq>,
    kind: Kind,
    stop: Arc<AtomicBool>,
}

#[derive(Clone)]
enum Kind {
    Store(Arc<Mutex<Store>>),
    Forward,
}

impl Sink {
    /// A sink writing into the store, with its writer thread.
    pub fn store(
        store: Store,
        store_dir: std::path::PathBuf,
    ) -> std::io::Result<(Sink, std::thread::JoinHandle<()>)> {
        let store = Arc::new(Mutex::new(store));
        let (tx, rx) = mpsc::channel(4096);
        let s2 = store.clone();
        let h = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || store_writer(rx, s2, store_dir))?;
        Ok((
            Sink {
                tx,
                kind: Kind::Store(store),
                stop: Arc::default(),
            },
            h,
        ))
    }

    /// A sink appending into the forwarding spool, with its writer thread.
    pub fn forward(spool: Spool) -> std::io::Result<(Sink, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(4096);
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let h = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || spool_writer(rx, spool, st))?;
        Ok((
            Sink {
                tx,
                kind: Kind::Forward,
                stop,
            },
            h,
        ))
    }

    /// Highest sequence durably stored for a stream (0 when unknown or forwarding: the
    /// sender then resends what it has not had acknowledged, and the top relay dedupes).
    pub fn position(&self, agent: &str, stream: &str) -> u64 {
        match &self.kind {
            Kind::Store(s) => lock(s).stored_seq(agent, stream),
            Kind::Forward => 0,
        }
    }

    pub fn store_handle(&self) -> Option<Arc<Mutex<Store>>> {
        match &self.kind {
            Kind::Store(s) => Some(s.clone()),
            Kind::Forward => None,
        }
    }

    /// True once the writer thread has stopped (storage failure).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub async fn submit(&self, req: WriteReq) -> Result<(), ()> {
        self.tx.send(req).await.map_err(|_| ())
    }

    /// Stop waiting for space (shutdown); pending requests are answered with errors.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn gather(rx: &mut mpsc::Receiver<WriteReq>) -> Option<Vec<WriteReq>> {
    let first = rx.blocking_recv()?;
    let mut bytes = first.gzip.len();
    let mut group = vec![first];
    while group.len() < GROUP_MAX && bytes < GROUP_BYTES {
        match rx.try_recv() {
            Ok(r) => {
                bytes += r.gzip.len();
                group.push(r);
            }
            Err(_) => break,
        }
    }
    Some(group)
}

fn store_writer(
    mut rx: mpsc::Receiver<WriteReq>,
    store: Arc<Mutex<Store>>,
    store_dir: std::path::PathBuf,
) {
    let mut writer = GroupWriter::default();
    while let Some(group) = gather(&mut rx) {
        let mut st = lock(&store);
        if writer.write_group(&mut st, &store_dir, group).is_err() {
            return;
        }
    }
}

/// What the store writer thread does with one gathered group: stores or refuses each
/// batch, commits once, then answers every batch. The only state kept between groups
/// is which streams recently failed to store a batch. Public so `tests/interleavings.rs`
/// can run it step by step between racing connections.
#[derive(Debug, Default)]
pub struct GroupWriter {
    /// (agent, stream) -> when a batch of it last failed to be stored.
    failed: std::collections::HashMap<(String, String), std::time::Instant>,
}

impl GroupWriter {
    /// Stores `group` into `st` (items under `store_dir`), commits, and sends each
    /// request's reply; every reply is sent only after the commit. `Err` when the
    /// commit failed: every reply was an error and the store must be reopened.
    #[allow(clippy::result_unit_err)]
    pub fn write_group(
        &mut self,
        st: &mut Store,
        store_dir: &std::path::Path,
        group: Vec<WriteReq>,
    ) -> Result<(), ()> {
        let mut results: Vec<(oneshot::Sender<WriteResult>, WriteResult)> = Vec::new();
        for r in group {
            let key = (r.agent.clone(), r.stream.clone());
            // The entry stays for the whole period even after a later batch of the
            // stream was stored: a connection the sender already gave up may still
            // deliver batches from beyond the one that failed, after the reconnected
            // sender stored its first resend (tests/interleavings.rs,
            // `stale_connection_cannot_skip_a_failed_batch`).
            let after_failure = self
                .failed
                .get(&key)
                .is_some_and(|t| t.elapsed() < REFUSE_GAP_AFTER_FAILURE);
            if let Some(item) = &r.meta.item {
                let res = store_item(st, store_dir, &r, item, after_failure);
                if res.is_err() {
                    self.note_failure(key);
                }
                results.push((r.reply, res));
                continue;
            }
            let mut out = st.append(&r.agent, &r.stream, r.seq, &r.source, &r.day, &r.gzip);
            if let Ok(AppendOutcome::Gap { expected }) = out
                && !after_failure
            {
                // The batches in between can never come (the sender's spool lost them,
                // or this store never saw the stream): say so loudly, keep going.
                if expected == 1 {
                    tracing::info!(agent = %r.agent, "stream {:?} starts at batch #{} here (earlier batches went elsewhere or were lost)", r.stream, r.seq);
                } else {
                    tracing::error!(agent = %r.agent, "stream {:?}: batches #{expected}..#{} never arrived and cannot be resent (lost on the sender's side); storing #{} and continuing", r.stream, r.seq - 1, r.seq);
                }
                out =
                    st.append_accepting_gap(&r.agent, &r.stream, r.seq, &r.source, &r.day, &r.gzip);
            }
            let res = match &out {
                Ok(AppendOutcome::Appended) => Ok(Stored::Appended),
                Ok(AppendOutcome::Duplicate) => Ok(Stored::Duplicate),
                Ok(AppendOutcome::Gap { expected }) => {
                    Err(gap_refusal(&r, *expected, after_failure))
                }
                Err(e) => Err(format!("cannot store batch {}#{}: {e}", r.stream, r.seq)),
            };
            if let Err(e) = &res {
                tracing::warn!(agent = %r.agent, "{e}");
                if !matches!(out, Ok(AppendOutcome::Gap { .. })) {
                    self.note_failure(key);
                }
            }
            results.push((r.reply, res));
        }
        if let Err(e) = st.commit() {
            // After a failed fsync only a reopen (which cuts files back to what is
            // durable) can tell what is on disk: stop the writer, so the relay exits and
            // its service manager restarts it. Nothing of this group was acknowledged.
            tracing::error!("store commit failed, nothing of this group is acknowledged: {e}");
            for (reply, _) in results {
                let _ = reply.send(Err(format!("the relay could not store the batch: {e}")));
            }
            return Err(());
        }
        for (reply, res) in results {
            let _ = reply.send(res);
        }
        Ok(())
    }

    fn note_failure(&mut self, key: (String, String)) {
        // Expired entries go, so the map stays as small as the set of recent failures.
        self.failed
            .retain(|_, t| t.elapsed() < REFUSE_GAP_AFTER_FAILURE);
        self.failed.insert(key, std::time::Instant::now());
    }
}

fn gap_refusal(r: &WriteReq, expected: u64, after_failure: bool) -> String {
    format!(
        "batch {}#{} of {:?} skips ahead: the relay expected #{expected}{}",
        r.stream,
        r.seq,
        r.agent,
        if after_failure {
            ", which it could not store: send that one again first"
        } else {
            ""
        }
    )
}

/// An incident record, report or bundle chunk: written (and fsynced) in its own
/// place first, then the stream position moves with the group's commit. A replay of a
/// seq at or below the position is dropped before anything is written, so an old
/// record never replaces a newer one.
fn store_item(
    st: &mut Store,
    store_dir: &std::path::Path,
    r: &WriteReq,
    item: &crate::batch::Item,
    after_failure: bool,
) -> WriteResult {
    let position = st.position(&r.agent, &r.stream);
    if r.seq <= position {
        return Ok(Stored::Duplicate);
    }
    if after_failure && r.seq > position + 1 {
        // As for log batches: storing it would move the position past the one that
        // failed, and the sender would then drop that one as acknowledged.
        let msg = gap_refusal(r, position + 1, true);
        tracing::warn!(agent = %r.agent, "{msg}");
        return Err(msg);
    }
    let stored = match item {
        crate::batch::Item::IntelChunk {
            name,
            offset,
            total,
            sha256,
        } => crate::relay::intel::store_chunk(
            store_dir, &r.agent, name, *offset, *total, sha256, &r.gzip,
        ),
        _ => crate::relay::incidents::store_item(store_dir, &r.agent, item, &r.gzip),
    };
    match stored {
        Ok(outcome) => {
            use crate::relay::incidents::Outcome;
            match &outcome {
                Outcome::Stored(what) => tracing::info!(agent = %r.agent, "stored {what}"),
                Outcome::BundleComplete(p) => {
                    tracing::info!(agent = %r.agent, incident = item.key(), "evidence bundle verified and stored: {}", p.display())
                }
                Outcome::BundleRejected(why) => {
                    tracing::error!(agent = %r.agent, incident = item.key(), "evidence bundle REFUSED: {why}; kept aside as bundle.tar.gz.rejected")
                }
                Outcome::IntelComplete(p) => {
                    tracing::info!(agent = %r.agent, "intel item verified and stored: {}", p.display())
                }
                Outcome::IntelRejected(why) => {
                    tracing::error!(agent = %r.agent, item = item.key(), "intel item REFUSED: {why}; kept aside as .rejected")
                }
            }
            st.advance(&r.agent, &r.stream, r.seq)
                .map(|_| Stored::Appended)
                .map_err(|e| format!("cannot record batch {}#{}: {e}", r.stream, r.seq))
        }
        Err(e) => {
            tracing::warn!(agent = %r.agent, "item {}#{} not stored: {e}", r.stream, r.seq);
            Err(e)
        }
    }
}

fn spool_writer(mut rx: mpsc::Receiver<WriteReq>, spool: Spool, stop: Arc<AtomicBool>) {
    let mut full_logged = false;
    while let Some(group) = gather(&mut rx) {
        while spool.is_full() && !stop.load(Ordering::Relaxed) {
            if !full_logged {
                tracing::warn!(
                    "forwarding spool is full: downstream batches wait until upstream acknowledges"
                );
                full_logged = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        full_logged = false;
        let mut appended = Vec::new();
        let mut failed = None;
        let mut group = group.into_iter();
        while let Some(r) = group.next() {
            let meta = BatchMeta {
                source: r.source.clone(),
                day: r.day.clone(),
                events: r.meta.events,
                raw_bytes: r.meta.raw_bytes,
                origin: Some(Origin {
                    agent: r.agent.clone(),
                    stream: r.stream.clone(),
                    seq: r.seq,
                }),
                item: r.meta.item.clone(),
                cursor: None,
            };
            let res = match serde_json::to_vec(&meta) {
                Err(e) => Err(e.to_string()),
                Ok(m) => match spool.append(&m, &r.gzip) {
                    Ok(seq) => Ok(seq),
                    Err(e @ crate::spool::SpoolError::NoSpace { .. }) => {
                        // The spool discarded this group's appends. Forwarding later
                        // batches would put gaps before the top relay, so stop as for
                        // any other disk failure: nothing of the group is acknowledged.
                        tracing::error!(
                            "forwarding spool: {e}; nothing of this group is acknowledged"
                        );
                        let why = format!("cannot spool the batch: {e}");
                        let rest = group.by_ref().map(|r| r.reply);
                        for reply in appended.drain(..).chain([r.reply]).chain(rest) {
                            let _ = reply.send(Err(why.clone()));
                        }
                        return; // see store_writer: a restart recovers
                    }
                    Err(e) => Err(e.to_string()),
                },
            };
            match res {
                Ok(_) => appended.push(r.reply),
                Err(e) => {
                    failed.get_or_insert(e.clone());
                    let _ = r.reply.send(Err(format!("cannot spool the batch: {e}")));
                }
            }
        }
        match spool.commit() {
            Ok(_) => {
                for reply in appended {
                    let _ = reply.send(Ok(Stored::Appended));
                }
            }
            Err(e) => {
                tracing::error!("forwarding spool commit failed: {e}");
                for reply in appended {
                    let _ = reply.send(Err(format!("cannot spool the batch: {e}")));
                }
                return; // see store_writer: a restart recovers
            }
        }
    }
}
