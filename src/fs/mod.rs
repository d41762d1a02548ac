//! The file-system seam of the spool: the handful of operations it needs, and
//! [`RealFs`], their implementation on `std::fs`.
//!
//! The seam exists so the crash-consistency of the spool can be tested against
//! [`sim::SimFs`], which models exactly what survives a power loss. Every
//! method maps to one system call whose durability meaning is documented, so the spool
//! can reason about what is on stable storage: file *contents* are durable after
//! [`FsFile::sync`], directory *entries* (create, rename, remove) after [`Fs::sync_dir`].

pub mod sealed;
pub mod sim;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// An open file: read at any offset, write only at the end.
pub trait FsFile: Send + Sync {
    /// Current length, including written but unsynced bytes.
    fn size(&self) -> io::Result<u64>;
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at end).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Appends all of `data` at the end of the file (not durable until [`FsFile::sync`]).
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Truncates or extends the file (not durable until [`FsFile::sync`]).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Makes the file's contents durable (`fsync`).
    fn sync(&mut self) -> io::Result<()>;
}

/// The directory and file operations the spool uses.
pub trait Fs: Send + Sync {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir` (files only matter to the spool).
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens `path` for reading and appending; creates it (empty) when `create` is set.
    /// A created entry is durable only after [`Fs::sync_dir`] of its directory.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>>;
    /// Atomically renames `from` to `to`, replacing `to` (durable after `sync_dir`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file (durable after `sync_dir`).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` durable (`fsync` on the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock named `path`, held until the returned guard is dropped;
    /// fails with [`io::ErrorKind::WouldBlock`] if someone (this process included)
    /// holds it.
    fn try_lock(&self, path: &Path) -> io::Result<LockGuard>;

    // What the intel collector and the incident store need beyond the spool.

    /// Opens an existing file for reading only (a file another user owns may not be
    /// writable by the agent, yet must be readable).
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        self.open(path, false)
    }
    /// Whether `path` names a file or a directory.
    fn exists(&self, path: &Path) -> bool;
    /// Creates one directory; [`io::ErrorKind::AlreadyExists`] when it is there (so a
    /// name can be claimed race-free). Durable after `sync_dir` of its parent.
    fn create_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates `dir` and its missing parents, fsyncing each parent whose entry was created.
    fn create_dir_all_durable(&self, dir: &Path) -> io::Result<()>;
    /// Names of the subdirectories of `dir`.
    fn list_dirs(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Like [`Fs::try_lock`], but waits while another holder has the lock.
    fn lock(&self, path: &Path) -> io::Result<LockGuard> {
        loop {
            match self.try_lock(path) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }
}

/// Holds a lock from [`Fs::try_lock`] until dropped.
pub type LockGuard = Box<dyn std::any::Any + Send + Sync>;

/// [`Fs`] on the real file system (`std::fs`, Unix).
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

struct RealFile(File);

impl FsFile for RealFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        // Opened with O_APPEND, so every write lands at the current end.
        self.0.write_all(data)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl Fs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                // Names the spool did not write may not be UTF-8; they are not ours.
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(create)
            .open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn try_lock(&self, path: &Path) -> io::Result<LockGuard> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // flock(2): per open file, so a second open in this process conflicts too,
        // and the kernel drops it when the process dies.
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        Ok(Box::new(RealFile(File::open(path)?)))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir(dir)
    }

    fn create_dir_all_durable(&self, dir: &Path) -> io::Result<()> {
        crate::util::create_dir_all_durable(dir)
    }

    fn list_dirs(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            // Follows symlinks, as `Path::is_dir` does.
            if entry.path().is_dir()
                && let Ok(name) = entry.file_name().into_string()
            {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn lock(&self, path: &Path) -> io::Result<LockGuard> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        file.lock()?;
        Ok(Box::new(file))
    }
}

/// A writer appending to an [`FsFile`] (for encoders that want `io::Write`).
pub struct FsWriter(pub Box<dyn FsFile>);

impl Write for FsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// SHA-256 (lower-case hex) of the file at `path`, read through `fs`.
pub fn sha256_file(fs: &dyn Fs, path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let f = fs.open_read(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = f.read_at(at, &mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(crate::incident::hex(&h.finalize()))
}

/// Replace `path` with `bytes` atomically through `fs`: temp file, fsync, rename, fsync
/// of the directory. After a crash `path` holds the old bytes or the new ones.
pub fn write_atomic(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    // A temp file left by a crash would be appended to: start from nothing.
    match fs.remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs.open(&tmp, true)?;
    f.append(bytes)?;
    f.sync()?;
    drop(f);
    fs.rename(&tmp, path)?;
    fs.sync_dir(dir)
}

/// The whole content of `path` through `fs`; `None` when it does not exist.
pub fn read_all(fs: &dyn Fs, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let f = match fs.open_read(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(f.size()?).map_err(io::Error::other)?;
    let mut out = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let n = f.read_at(at as u64, &mut out[at..])?;
        if n == 0 {
            out.truncate(at);
            break;
        }
        at += n;
    }
    Ok(Some(out))
}
