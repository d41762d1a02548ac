//! What the agent may open as a log: the one gate between a path the globs matched and
//! a descriptor the file source or the bundle builder reads.
//!
//! A user who can write into a watched directory must not be able to make the agent
//! read (and ship, and bundle) a file of its own choosing: `ln -s
//! /etc/soclink/agent-key.pem /var/log/app/zz.log` must not send the agent's key to the
//! center. The rules:
//!
//! - `follow_symlinks = "never"` (the default): the file is opened with `O_NOFOLLOW`, so
//!   a symlink is refused by the kernel, race-free; and a directory *below the literal
//!   part of the include pattern* that is a symlink (`/var/log/app/sub -> /etc`, under
//!   `/var/log/app/**/*.log`) is refused too. Symlinks in the literal part the operator
//!   wrote (`/var/log -> /srv/log`) are the operator's choice and are followed.
//! - `follow_symlinks = "within_includes"`: a symlink is followed only when what was
//!   actually opened (its real path, read back from the descriptor) also matches the
//!   source's include patterns and no exclude pattern.
//! - Whatever the config says, a file that is one of the agent's own keys,
//!   certificates or CA files (by device and inode, so a hard link is caught too), or
//!   lies in its state directory, is never read.
//!
//! Every refusal names the path and, when known, where it led.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::config::FollowSymlinks;

/// Why a path was not opened.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(
        "{} is a symbolic link (or lies under one) and follow_symlinks = \"never\": not read",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error(
        "{} leads to {}, which the source's include patterns do not match (or an exclude \
         pattern does): not read",
        path.display(),
        target.display()
    )]
    Outside { path: PathBuf, target: PathBuf },
    #[error(
        "{} is the agent's own {} (key, certificate or state): never read as a log",
        path.display(),
        target.display()
    )]
    Protected { path: PathBuf, target: PathBuf },
}

impl Refused {
    /// The file was gone (renamed or deleted since it was listed): not a refusal.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Refused::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// A file opened through the guard.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    /// The real path of what was opened, when it differs from the path asked for (a
    /// followed symlink, or a symlink in the operator's literal prefix).
    pub target: Option<PathBuf>,
}

/// One include pattern, with its literal directory and where that directory really is.
#[derive(Debug, Clone)]
struct Include {
    pattern: glob::Pattern,
    /// The leading components without glob characters, as written.
    root: PathBuf,
    /// `pattern` with `root` replaced by its canonical form (symlinks resolved), when
    /// that differs, so targets are matched where they really are.
    resolved: Option<glob::Pattern>,
    resolved_root: Option<PathBuf>,
}

/// The read policy of one source.
#[derive(Debug, Clone)]
pub struct ReadGuard {
    follow: FollowSymlinks,
    includes: Vec<Include>,
    exclude: Vec<glob::Pattern>,
    protected: Vec<PathBuf>,
}

const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// The literal directory of a pattern: its components up to the first one with a glob
/// character, or the parent of a plain path.
fn literal_root(pattern: &str) -> PathBuf {
    let mut root = PathBuf::new();
    let comps: Vec<&str> = pattern.split('/').collect();
    for (i, c) in comps.iter().enumerate() {
        if c.contains(['*', '?', '[']) || i + 1 == comps.len() {
            break;
        }
        if c.is_empty() {
            root.push("/");
        } else {
            root.push(c);
        }
    }
    if root.as_os_str().is_empty() {
        root.push("/");
    }
    root
}

/// The path the descriptor refers to now (None where /proc is not mounted).
fn real_path(file: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

impl ReadGuard {
    pub fn new(
        include: &[String],
        exclude: &[glob::Pattern],
        follow: FollowSymlinks,
        protected: &[PathBuf],
    ) -> ReadGuard {
        let includes = include
            .iter()
            .filter_map(|p| {
                let pattern = glob::Pattern::new(p).ok()?;
                let root = literal_root(p);
                let canonical = std::fs::canonicalize(&root).ok().filter(|c| *c != root);
                let resolved = canonical.as_ref().and_then(|c| {
                    let rest = Path::new(p).strip_prefix(&root).ok()?;
                    let text = format!(
                        "{}/{}",
                        glob::Pattern::escape(&c.to_string_lossy()),
                        rest.to_string_lossy()
                    );
                    glob::Pattern::new(&text).ok()
                });
                Some(Include {
                    pattern,
                    root,
                    resolved,
                    resolved_root: canonical,
                })
            })
            .collect();
        ReadGuard {
            follow,
            includes,
            exclude: exclude.to_vec(),
            protected: protected.to_vec(),
        }
    }

    fn excluded(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        self.exclude.iter().any(|p| {
            if p.as_str().contains('/') {
                p.matches_path(path)
            } else {
                p.matches(name)
            }
        })
    }

    /// Does a real path match an include pattern (as written, or with its literal
    /// directory resolved) and no exclude pattern?
    fn within_includes(&self, target: &Path) -> bool {
        !self.excluded(target)
            && self.includes.iter().any(|i| {
                i.pattern.matches_path_with(target, MATCH)
                    || i.resolved
                        .as_ref()
                        .is_some_and(|r| r.matches_path_with(target, MATCH))
            })
    }

    /// Where the directory of `path` really is if no directory below the literal root
    /// of the pattern that matched it is a symlink.
    fn expected_dir(&self, path: &Path) -> Option<PathBuf> {
        let inc = self
            .includes
            .iter()
            .find(|i| i.pattern.matches_path(path))?;
        let rel = path.parent()?.strip_prefix(&inc.root).ok()?;
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return None;
        }
        let base = inc.resolved_root.as_ref().unwrap_or(&inc.root);
        Some(base.join(rel))
    }

    /// Refuses the agent's own keys, certificates and state, by inode and by place.
    fn check_protected(
        &self,
        path: &Path,
        file: &File,
        real: Option<&Path>,
    ) -> Result<(), Refused> {
        let meta = file.metadata()?;
        for p in &self.protected {
            let Ok(pm) = std::fs::metadata(p) else {
                continue;
            };
            let hit = if pm.is_dir() {
                let dir = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                real.is_some_and(|r| r.starts_with(&dir))
            } else {
                (pm.dev(), pm.ino()) == (meta.dev(), meta.ino())
            };
            if hit {
                return Err(Refused::Protected {
                    path: path.to_path_buf(),
                    target: p.clone(),
                });
            }
        }
        Ok(())
    }

    /// The refusal of a symlink under `follow_symlinks = "never"`, known without opening
    /// it (so that a link to a file also matched under its own name is reported, not
    /// taken for the same file twice).
    pub fn refuses_link(&self, path: &Path) -> Option<Refused> {
        let link = std::fs::symlink_metadata(path)
            .ok()?
            .file_type()
            .is_symlink();
        (link && self.follow == FollowSymlinks::Never).then(|| Refused::Symlink {
            path: path.to_path_buf(),
        })
    }

    /// Open a path the include globs matched, under the source's symlink policy.
    pub fn open(&self, path: &Path) -> Result<Opened, Refused> {
        let link = std::fs::symlink_metadata(path)?.file_type().is_symlink();
        if link && self.follow == FollowSymlinks::Never {
            return Err(Refused::Symlink {
                path: path.to_path_buf(),
            });
        }
        let file = if link {
            File::open(path)?
        } else {
            open_nofollow(path)?
        };
        let real = real_path(&file);
        let dir_ok = match (&real, self.expected_dir(path)) {
            (Some(r), Some(want)) => r.parent() == Some(want.as_path()),
            // Without /proc, or a path no pattern matches as written: only the final
            // component is known to be no symlink.
            _ => true,
        };
        if link || !dir_ok {
            if self.follow == FollowSymlinks::Never {
                return Err(Refused::Symlink {
                    path: path.to_path_buf(),
                });
            }
            let target = real.clone().unwrap_or_else(|| path.to_path_buf());
            if !self.within_includes(&target) {
                return Err(Refused::Outside {
                    path: path.to_path_buf(),
                    target,
                });
            }
        }
        self.check_protected(path, &file, real.as_deref())?;
        let target = real.filter(|r| r != path);
        Ok(Opened { file, target })
    }

    /// Open a file found by inode or fingerprint beside one already read (a rotation,
    /// a copytruncate copy): never through a symlink, never one of the agent's own.
    pub fn open_known(&self, path: &Path) -> Result<File, Refused> {
        let file = open_nofollow(path)?;
        let real = real_path(&file);
        self.check_protected(path, &file, real.as_deref())?;
        Ok(file)
    }
}

/// `open(path, O_RDONLY | O_NOFOLLOW)`: a symlink as the last component fails (ELOOP),
/// reported as [`Refused::Symlink`].
fn open_nofollow(path: &Path) -> Result<File, Refused> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                Refused::Symlink {
                    path: path.to_path_buf(),
                }
            } else {
                Refused::Io(e)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_by_policy() {
        let d = tempfile::tempdir().unwrap();
        let logs = d.path().join("logs");
        let secret = d.path().join("secret");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(logs.join("a.log"), "a\n").unwrap();
        std::fs::write(secret.join("key.pem"), "KEY\n").unwrap();
        std::fs::write(logs.join("b.txt"), "b\n").unwrap();
        symlink(secret.join("key.pem"), logs.join("zz.log")).unwrap();
        symlink(logs.join("a.log"), logs.join("inside.log")).unwrap();
        symlink(&secret, logs.join("sub")).unwrap();
        std::fs::write(secret.join("x.log"), "x\n").unwrap();
        let inc = vec![format!("{}/**/*.log", logs.display())];
        let never = ReadGuard::new(&inc, &[], FollowSymlinks::Never, &[]);
        never.open(&logs.join("a.log")).unwrap();
        for p in ["zz.log", "inside.log", "sub/x.log"] {
            assert!(
                matches!(never.open(&logs.join(p)), Err(Refused::Symlink { .. })),
                "{p}"
            );
        }
        let within = ReadGuard::new(&inc, &[], FollowSymlinks::WithinIncludes, &[]);
        let o = within.open(&logs.join("inside.log")).unwrap();
        assert_eq!(
            o.target,
            Some(std::fs::canonicalize(logs.join("a.log")).unwrap())
        );
        assert!(matches!(
            within.open(&logs.join("zz.log")),
            Err(Refused::Outside { .. })
        ));
        assert!(matches!(
            within.open(&logs.join("sub/x.log")),
            Err(Refused::Outside { .. })
        ));
        // Protected by inode: a hard link to the key, whatever the policy.
        std::fs::hard_link(secret.join("key.pem"), logs.join("hard.log")).unwrap();
        let guarded = ReadGuard::new(
            &inc,
            &[],
            FollowSymlinks::WithinIncludes,
            &[secret.join("key.pem")],
        );
        assert!(matches!(
            guarded.open(&logs.join("hard.log")),
            Err(Refused::Protected { .. })
        ));
        assert!(matches!(
            guarded.open_known(&logs.join("hard.log")),
            Err(Refused::Protected { .. })
        ));
        assert!(matches!(
            guarded.open_known(&logs.join("zz.log")),
            Err(Refused::Symlink { .. })
        ));
    }
}
