//! Reuse of the pipeline's large per-batch allocations: batch buffers, gzip output
//! buffers and deflate states.
//!
//! The agent runs with glibc's mmap threshold fixed at 128 KiB (see `main.rs`), so a
//! freed block of that size goes back to the kernel instead of staying in a malloc
//! arena. The price is an `mmap`, a `munmap` and a page fault per 4 KiB for every new
//! buffer; allocating a 1 MiB batch buffer, a gzip buffer and a deflate state afresh for
//! every batch cost the agent about a quarter more CPU. These pools keep a few of each
//! for the next batch, so the memory stays bounded (a handful of buffers, already
//! counted in the peak) and the kernel work disappears from the hot path.

use std::io::Write;
use std::sync::Mutex;

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::util::lock;

/// A bounded stack of kept items that also remembers how many of them sat unused since
/// the last trim: a burst (a catch-up after an outage, a full disk clearing) fills the
/// pools, and without trimming that memory would stay held through the quiet hours after.
struct Kept<T> {
    items: Vec<T>,
    /// Fewest items on the stack since the last trim: that many were never needed.
    idle: usize,
}

impl<T> Kept<T> {
    const fn new() -> Kept<T> {
        Kept {
            items: Vec::new(),
            idle: 0,
        }
    }

    fn pop(&mut self) -> Option<T> {
        self.take_where(|_| true)
    }

    /// The newest kept item that matches, counted as used.
    fn take_where(&mut self, pred: impl Fn(&T) -> bool) -> Option<T> {
        let i = self.items.iter().rposition(pred)?;
        let item = self.items.swap_remove(i);
        self.idle = self.idle.min(self.items.len());
        Some(item)
    }

    /// Free the items no one needed since the last trim; the next window starts now.
    fn trim(&mut self) {
        let keep = self.items.len() - self.idle.min(self.items.len());
        self.items.truncate(keep);
        self.idle = self.items.len();
    }
}

/// A bounded stack of reusable byte buffers, sized by recent demand.
pub struct BufPool {
    free: Mutex<Free>,
    /// Most buffers kept; more are freed.
    keep: usize,
    /// Larger buffers (grown by an exceptional batch) are freed, not kept.
    max_capacity: usize,
}

struct Free {
    kept: Kept<Vec<u8>>,
    /// Largest demand (bytes asked for at `take`, or held at `give`) in the current
    /// and the previous trim window.
    need: [usize; 2],
}

impl Free {
    /// Capacity past which a buffer is freed rather than kept: twice what the last two
    /// windows needed. A buffer a catch-up grew to a whole batch keeps its pages
    /// resident however little later batches write into it, so once traffic is back
    /// to small batches it goes back to the kernel instead of circulating for good.
    fn limit(&self, max_capacity: usize) -> usize {
        (2 * self.need[0].max(self.need[1]))
            .max(SMALL)
            .min(max_capacity)
    }
}

/// Buffers up to this capacity are always worth keeping, whatever the demand.
const SMALL: usize = 256 << 10;
/// Smallest buffer a pool allocates: glibc's mmap threshold as the agent sets it (see
/// `main.rs`), so every pooled buffer is a mapping of its own. A smaller one would live
/// in a malloc arena, and the sizes a catch-up passes through (a few KiB to a whole
/// batch) left the arenas fragmented: in the soak their resident size crept up with
/// each catch-up. Pages of the mapping that are never written cost nothing.
const OWN_MAPPING: usize = 128 << 10;

impl BufPool {
    pub const fn new(keep: usize, max_capacity: usize) -> BufPool {
        BufPool {
            free: Mutex::new(Free {
                kept: Kept::new(),
                need: [0; 2],
            }),
            keep,
            max_capacity,
        }
    }

    /// An empty buffer with room for at least `capacity` bytes.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let reused = {
            let mut free = lock(&self.free);
            free.need[0] = free.need[0].max(capacity);
            free.kept.pop()
        };
        match reused {
            Some(mut v) => {
                v.reserve(capacity);
                v
            }
            None => Vec::with_capacity(capacity.max(OWN_MAPPING)),
        }
    }

    /// Return a buffer for reuse (or free it: past `keep`, or larger than recent
    /// demand warrants).
    pub fn give(&self, mut v: Vec<u8>) {
        let mut free = lock(&self.free);
        free.need[0] = free.need[0].max(v.len());
        if v.capacity() == 0
            || v.capacity() > free.limit(self.max_capacity)
            || free.kept.items.len() >= self.keep
        {
            return;
        }
        v.clear();
        free.kept.items.push(v);
    }

    /// Buffers currently kept, for tests.
    pub fn kept(&self) -> usize {
        lock(&self.free).kept.items.len()
    }

    /// Ends a window: frees what went unused in it and what outgrew recent demand.
    fn trim(&self) {
        let mut free = lock(&self.free);
        let limit = free.limit(self.max_capacity);
        free.kept.trim();
        free.kept.items.retain(|v| v.capacity() <= limit);
        free.kept.idle = free.kept.idle.min(free.kept.items.len());
        free.need = [0, free.need[0]];
    }
}

/// How often the pools give back what a burst left in them.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
static LAST_TRIM: Mutex<Option<std::time::Instant>> = Mutex::new(None);

/// Free pooled buffers and deflate states that went unused for a whole `TRIM_EVERY`;
/// cheap enough to call on every pass of a loop (it acts at most every 30 s).
pub fn trim_idle() {
    let now = std::time::Instant::now();
    {
        let mut last = lock(&LAST_TRIM);
        match *last {
            Some(t) if now.duration_since(t) < TRIM_EVERY => return,
            _ => *last = Some(now),
        }
    }
    BATCHES.trim();
    GZIP.trim();
    lock(&DEFLATERS).trim();
}

/// Uncompressed batches (`batch_max_bytes`, 1 MiB by default): one is being filled by
/// each source, the others wait for or are in compression.
pub static BATCHES: BufPool = BufPool::new(4, 4 << 20);

/// A buffer for a new batch. It starts small and grows as lines arrive, so its size
/// (and what `BATCHES` keeps) follows the batches traffic really makes: a quiet host's
/// batches are a few KiB, and only a backlog fills them to `batch_max_bytes`.
pub fn batch_buffer() -> Vec<u8> {
    BATCHES.take(OWN_MAPPING)
}

/// Room `gzip_into` reserves for compressing `raw_len` bytes: the worst case (stored
/// blocks) plus the header and trailer.
pub fn gzip_bound(raw_len: usize) -> usize {
    raw_len + raw_len / 16 + 1024
}
/// gzip output of a batch, from compression until it is appended to the spool; and a
/// spooled batch read back by the shipper, until it is written to TLS.
pub static GZIP: BufPool = BufPool::new(4, 4 << 20);

/// Deflate states kept for reuse, with their level (zlib-rs allocates about 300 KiB
/// for each).
static DEFLATERS: Mutex<Kept<(u32, Compress)>> = Mutex::new(Kept::new());
const DEFLATERS_KEPT: usize = 4;

/// Compress `raw` into one gzip member in `out` (cleared first): no name, zero mtime,
/// OS byte 255, the header `flate2::write::GzEncoder` writes. The same input always
/// gives the same bytes, whether the deflate state is new or reused.
pub fn gzip_into(raw: &[u8], level: u32, mut out: Vec<u8>) -> Vec<u8> {
    out.clear();
    let level = level.min(9);
    let reused = {
        lock(&DEFLATERS)
            .take_where(|(l, _)| *l == level)
            .map(|(_, z)| z)
    };
    let mut z = reused.unwrap_or_else(|| Compress::new(Compression::new(level), false));
    let xfl = match level {
        9.. => 2,
        0 | 1 => 4,
        _ => 0,
    };
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]);
    // Room for the worst case (stored blocks) up front, so the whole input is deflated
    // in one call: at level 0 the block layout would otherwise depend on the room
    // the buffer happened to have. Pages never written cost no memory.
    out.reserve(gzip_bound(raw.len()));
    let mut ok = true;
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(64 << 10));
        }
        let consumed = usize::try_from(z.total_in()).unwrap_or(raw.len());
        match z.compress_vec(
            &raw[consumed.min(raw.len())..],
            &mut out,
            FlushCompress::Finish,
        ) {
            Ok(Status::StreamEnd) => break,
            Ok(_) => {}
            Err(_) => {
                ok = false;
                break;
            }
        }
    }
    if !ok {
        // Not expected from a fresh or reset state; the plain encoder is always right.
        out.clear();
        let mut enc = flate2::write::GzEncoder::new(out, Compression::new(level));
        let _ = enc.write_all(raw);
        return enc.finish().unwrap_or_default();
    }
    out.extend_from_slice(&crc32fast::hash(raw).to_le_bytes());
    // ISIZE is the length modulo 2^32 (RFC 1952).
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    z.reset();
    let mut d = lock(&DEFLATERS);
    if d.items.len() < DEFLATERS_KEPT {
        d.items.push((level, z));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn reference(raw: &[u8], level: u32) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::new(level));
        enc.write_all(raw).unwrap();
        enc.finish().unwrap()
    }

    fn corpus(n: usize) -> Vec<u8> {
        // Compressible but not trivially: numbered lines with a varying tail.
        let mut v = Vec::with_capacity(n + 100);
        let mut i = 0u64;
        while v.len() < n {
            let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            writeln!(v, "{{\"msg\":\"line {i} value {x:x}\",\"host\":\"h\"}}").unwrap();
            i += 1;
        }
        v.truncate(n);
        v
    }

    #[test]
    fn gzip_members_are_valid_and_the_same_with_reused_states_and_buffers() {
        let inputs = [
            Vec::new(),
            b"x".to_vec(),
            corpus(100_000),
            corpus(1 << 20),
            // Incompressible: the output outgrows the buffer it started with.
            (0..300_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ];
        let mut first_pass = Vec::new();
        for pass in 0..2 {
            for level in [0, 1, 6, 9] {
                for (i, raw) in inputs.iter().enumerate() {
                    // A small buffer from the pool: growth and reuse change no byte.
                    let out = gzip_into(raw, level, GZIP.take(16));
                    let what = format!("level {level}, input {i} ({} bytes)", raw.len());
                    let reference = reference(raw, level);
                    assert_eq!(out[..10], reference[..10], "header, {what}");
                    assert_eq!(
                        out[out.len() - 8..],
                        reference[reference.len() - 8..],
                        "CRC32 and ISIZE, {what}"
                    );
                    let mut back = Vec::new();
                    flate2::read::MultiGzDecoder::new(&out[..])
                        .read_to_end(&mut back)
                        .unwrap();
                    assert!(back == *raw, "round trip, {what}");
                    if pass == 0 {
                        first_pass.push(out.clone());
                    } else {
                        // Every state is reused by now (the pool keeps one per level).
                        assert!(
                            out == first_pass[level_index(level) * inputs.len() + i],
                            "{what}"
                        );
                    }
                    GZIP.give(out);
                }
            }
        }
        assert!(lock(&DEFLATERS).items.len() <= DEFLATERS_KEPT);
    }

    fn level_index(level: u32) -> usize {
        [0, 1, 6, 9].iter().position(|l| *l == level).unwrap()
    }

    #[test]
    fn pool_keeps_a_bounded_number_of_bounded_buffers() {
        let pool = BufPool::new(2, 1 << 20);
        for _ in 0..5 {
            pool.give(Vec::with_capacity(1000));
        }
        assert_eq!(pool.kept(), 2);
        pool.give(Vec::with_capacity(2 << 20));
        assert_eq!(pool.kept(), 2);
        let mut v = pool.take(4000);
        assert!(v.is_empty() && v.capacity() >= 4000);
        v.extend_from_slice(b"abc");
        pool.give(v);
        assert_eq!(pool.take(1).len(), 0);
    }

    #[test]
    fn buffers_a_catch_up_grew_are_freed_once_batches_are_small_again() {
        const MIB: usize = 1 << 20;
        let pool = BufPool::new(4, 4 * MIB);
        let batch = |pool: &BufPool, len: usize| {
            let mut v = pool.take(64 << 10);
            v.resize(len, b'x');
            pool.give(v);
        };
        // Steady traffic: small batches in small buffers.
        for _ in 0..10 {
            batch(&pool, 30_000);
        }
        pool.trim();
        // A catch-up fills whole batches; the buffers grown for it are reused
        // throughout, not reallocated for each batch.
        batch(&pool, MIB);
        let grown = pool.take(1).capacity();
        assert!(grown >= MIB);
        let mut v = pool.take(1);
        v.resize(MIB, b'x');
        pool.give(v);
        assert_eq!(pool.take(1).capacity(), grown, "kept during the catch-up");
        // Small batches again: the window after the catch-up still remembers it.
        pool.trim();
        for _ in 0..10 {
            batch(&pool, 30_000);
        }
        pool.trim();
        // A whole window of small batches: a big buffer that comes back is freed, and
        // none is left kept.
        let mut big = Vec::with_capacity(MIB);
        big.extend_from_slice(b"one small batch");
        pool.give(big);
        for _ in 0..10 {
            batch(&pool, 30_000);
        }
        pool.trim();
        assert!(pool.kept() >= 1, "steady traffic keeps its buffer");
        let kept: Vec<Vec<u8>> = (0..pool.kept()).map(|_| pool.take(1)).collect();
        assert!(
            kept.iter().all(|v| v.capacity() < MIB),
            "{:?}",
            kept.iter().map(Vec::capacity).collect::<Vec<_>>()
        );
    }

    #[test]
    fn buffers_left_by_a_burst_are_freed_once_a_window_passes_without_them() {
        let pool = BufPool::new(4, 1 << 20);
        // A burst: four batches in flight at once, all returned.
        let burst: Vec<_> = (0..4).map(|_| pool.take(1000)).collect();
        burst.into_iter().for_each(|v| pool.give(v));
        // The window that saw the burst needed every buffer: nothing is freed.
        pool.trim();
        assert_eq!(pool.kept(), 4);
        // Steady traffic: one batch at a time.
        for _ in 0..10 {
            let v = pool.take(1000);
            pool.give(v);
        }
        pool.trim();
        assert_eq!(pool.kept(), 1, "the one buffer steady traffic uses stays");
        // A window with no traffic at all frees the rest.
        pool.trim();
        assert_eq!(pool.kept(), 0);
    }
}
