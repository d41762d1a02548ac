//! Test support: an in-memory [`Fs`] that models what survives a power loss.
//!
//! Public so integration tests (and other modules' tests) can use it; production code
//! never constructs it. The model keeps, per file, the bytes that are *durable* (as of
//! the last [`FsFile::sync`]) next to the bytes that are merely *written*; and, per
//! directory, the entries that are durable (as of the last [`Fs::sync_dir`]) next to
//! the current ones. [`SimFs::crash`] throws away everything not durable, optionally
//! keeping a random *prefix* of each file's unsynced appends (a torn write, as a real
//! disk may leave it). Handles opened before a crash fail afterwards, like the handles
//! of a process that died with the power.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Fs, FsFile, LockGuard};

#[derive(Debug, Default, Clone)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    /// Bumped by every crash; handles from an older generation are dead.
    generation: u64,
    next_inode: u64,
    inodes: HashMap<u64, Inode>,
    /// Directory entries as the running system sees them: path -> inode.
    entries: BTreeMap<PathBuf, u64>,
    /// Directory entries that would survive a crash.
    durable_entries: BTreeMap<PathBuf, u64>,
    dirs: Vec<PathBuf>,
    /// Held locks (a crash releases them, as the kernel does for a dead process).
    locks: std::collections::HashSet<PathBuf>,
    /// When set, every file and directory sync fails (a dying disk).
    fail_syncs: bool,
    /// When set, this many more syncs succeed and every later one fails: the power
    /// goes out at that point of an operation (the test then calls `crash`).
    sync_budget: Option<u64>,
    /// When set, appends beyond this many bytes (all files together) write what fits
    /// and fail with `StorageFull`, as a full disk does.
    capacity: Option<u64>,
    /// Counters, so tests can assert the spool actually syncs.
    file_syncs: u64,
    dir_syncs: u64,
}

/// A simulated file system with power-loss semantics. Cloning shares the same state.
#[derive(Debug, Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not hide the state from the others.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

fn stale() -> io::Error {
    io::Error::other("simulated file handle from before a crash")
}

/// xorshift64*: deterministic, dependency-free randomness for torn writes.
fn next_rand(state: &mut u64) -> u64 {
    let mut x = *state | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

impl SimFs {
    /// An empty file system.
    pub fn new() -> SimFs {
        SimFs::default()
    }

    /// Power loss: keeps only durable file contents and durable directory entries.
    pub fn crash(&self) {
        self.crash_inner(None);
    }

    /// Power loss that also keeps, per file, a random prefix (chosen from `seed`) of
    /// the bytes appended since its last sync, as a disk that wrote some sectors may.
    pub fn crash_torn(&self, seed: u64) {
        self.crash_inner(Some(seed));
    }

    fn crash_inner(&self, seed: Option<u64>) {
        let mut st = lock(&self.state);
        st.generation += 1;
        let mut rng = seed.unwrap_or(0) ^ 0x9E37_79B9_7F4A_7C15;
        let mut ids: Vec<u64> = st.inodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(inode) = st.inodes.get_mut(&id) else {
                continue;
            };
            let mut content = inode.durable.clone();
            if seed.is_some() && inode.current.starts_with(&inode.durable) {
                let extra = &inode.current[inode.durable.len()..];
                if !extra.is_empty() {
                    let keep = (next_rand(&mut rng) % (extra.len() as u64 + 1)) as usize;
                    content.extend_from_slice(&extra[..keep]);
                }
            }
            inode.durable = content.clone();
            inode.current = content;
        }
        st.entries = st.durable_entries.clone();
        st.locks.clear();
        let live: std::collections::HashSet<u64> = st.entries.values().copied().collect();
        st.inodes.retain(|id, _| live.contains(id));
    }

    /// Current contents of a file (as the running system sees them).
    pub fn read(&self, path: &Path) -> Option<Vec<u8>> {
        let st = lock(&self.state);
        let id = st.entries.get(path)?;
        st.inodes.get(id).map(|i| i.current.clone())
    }

    /// Replaces a file's contents, durably (for corruption tests).
    pub fn write_durable(&self, path: &Path, data: &[u8]) {
        let mut st = lock(&self.state);
        let id = match st.entries.get(path) {
            Some(id) => *id,
            None => {
                st.next_inode += 1;
                let id = st.next_inode;
                st.entries.insert(path.to_path_buf(), id);
                id
            }
        };
        st.durable_entries.insert(path.to_path_buf(), id);
        st.inodes.insert(
            id,
            Inode {
                current: data.to_vec(),
                durable: data.to_vec(),
            },
        );
    }

    /// Names of the files in `dir`.
    pub fn files(&self, dir: &Path) -> Vec<String> {
        self.list_dir(dir).unwrap_or_default()
    }

    /// Makes every following file and directory sync fail (or succeed again).
    /// Limit all files together to `bytes` (None: unlimited); see `State::capacity`.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        lock(&self.state).capacity = bytes;
    }

    pub fn set_fail_syncs(&self, fail: bool) {
        lock(&self.state).fail_syncs = fail;
    }

    /// Lets `n` more file or directory syncs succeed and fails every later one (None:
    /// no limit). With a crash after the failing operation, this stops the power at
    /// the n-th sync point of an operation.
    pub fn fail_syncs_after(&self, n: Option<u64>) {
        lock(&self.state).sync_budget = n;
    }

    /// How many file and directory syncs were issued so far.
    pub fn sync_counts(&self) -> (u64, u64) {
        let st = lock(&self.state);
        (st.file_syncs, st.dir_syncs)
    }
}

struct SimLock {
    state: Arc<Mutex<State>>,
    generation: u64,
    path: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        // After a crash the lock may belong to a new holder.
        if st.generation == self.generation {
            st.locks.remove(&self.path);
        }
    }
}

struct SimFile {
    state: Arc<Mutex<State>>,
    generation: u64,
    inode: u64,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut st = lock(&self.state);
        if st.generation != self.generation {
            return Err(stale());
        }
        f(&mut st, self.inode)
    }
}

/// Whether a sync may succeed now (and uses up one of the budget).
fn take_sync(st: &mut State) -> bool {
    if st.fail_syncs || st.sync_budget == Some(0) {
        return false;
    }
    if let Some(n) = &mut st.sync_budget {
        *n -= 1;
    }
    true
}

fn inode_mut(st: &mut State, id: u64) -> io::Result<&mut Inode> {
    st.inodes.get_mut(&id).ok_or_else(stale)
}

impl FsFile for SimFile {
    fn size(&self) -> io::Result<u64> {
        self.with(|st, id| Ok(inode_mut(st, id)?.current.len() as u64))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|st, id| {
            let data = &inode_mut(st, id)?.current;
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
            Ok(n)
        })
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.with(|st, id| {
            let room = st.capacity.map_or(usize::MAX, |cap| {
                let used: u64 = st.inodes.values().map(|i| i.current.len() as u64).sum();
                usize::try_from(cap.saturating_sub(used)).unwrap_or(usize::MAX)
            });
            let n = data.len().min(room);
            inode_mut(st, id)?.current.extend_from_slice(&data[..n]);
            if n < data.len() {
                return Err(io::ErrorKind::StorageFull.into());
            }
            Ok(())
        })
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.with(|st, id| {
            let len = usize::try_from(len).map_err(io::Error::other)?;
            inode_mut(st, id)?.current.resize(len, 0);
            Ok(())
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        self.with(|st, id| {
            if !take_sync(st) {
                return Err(io::Error::other("simulated fsync failure"));
            }
            st.file_syncs += 1;
            let inode = inode_mut(st, id)?;
            inode.durable = inode.current.clone();
            Ok(())
        })
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        // Directories themselves are modelled as always durable: the spool's
        // directory is created once, by the installer, long before any data (and
        // the incident store fsyncs the parent of each folder it creates).
        for d in dir.ancestors() {
            if !d.as_os_str().is_empty() && !st.dirs.iter().any(|x| x == d) {
                st.dirs.push(d.to_path_buf());
            }
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        let st = lock(&self.state);
        st.entries.contains_key(path) || st.dirs.iter().any(|d| d == path)
    }

    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.dirs.iter().any(|d| d == dir) || st.entries.contains_key(dir) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        if !dir.parent().is_some_and(|p| st.dirs.iter().any(|d| d == p)) {
            return Err(not_found(dir));
        }
        st.dirs.push(dir.to_path_buf());
        Ok(())
    }

    fn create_dir_all_durable(&self, dir: &Path) -> io::Result<()> {
        self.create_dir_all(dir)
    }

    fn list_dirs(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = lock(&self.state);
        if !st.dirs.iter().any(|d| d == dir) {
            return Err(not_found(dir));
        }
        Ok(st
            .dirs
            .iter()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = lock(&self.state);
        if !st.dirs.iter().any(|d| d == dir) {
            return Err(not_found(dir));
        }
        Ok(st
            .entries
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>> {
        let mut st = lock(&self.state);
        let id = match st.entries.get(path) {
            Some(id) => *id,
            None if create => {
                let parent_exists = path
                    .parent()
                    .is_some_and(|p| st.dirs.iter().any(|d| d == p));
                if !parent_exists {
                    return Err(not_found(path));
                }
                st.next_inode += 1;
                let id = st.next_inode;
                st.inodes.insert(id, Inode::default());
                st.entries.insert(path.to_path_buf(), id);
                id
            }
            None => return Err(not_found(path)),
        };
        Ok(Box::new(SimFile {
            state: self.state.clone(),
            generation: st.generation,
            inode: id,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        let id = st.entries.remove(from).ok_or_else(|| not_found(from))?;
        st.entries.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.entries.remove(path).ok_or_else(|| not_found(path))?;
        // The inode stays while durable entries (or open handles) may refer to it.
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        if !take_sync(&mut st) {
            return Err(io::Error::other("simulated directory fsync failure"));
        }
        st.dir_syncs += 1;
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        st.durable_entries.retain(|p, _| !in_dir(p));
        let current: Vec<(PathBuf, u64)> = st
            .entries
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        st.durable_entries.extend(current);
        Ok(())
    }

    fn try_lock(&self, path: &Path) -> io::Result<LockGuard> {
        let mut st = lock(&self.state);
        if !st.locks.insert(path.to_path_buf()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(Box::new(SimLock {
            state: self.state.clone(),
            generation: st.generation,
            path: path.to_path_buf(),
        }))
    }
}
