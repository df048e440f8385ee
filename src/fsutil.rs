//! File writing shared by every stage that saves results.
//!
//! [`write_atomic`] is the one way results reach the disk. It writes through symlinks (the
//! temporary file goes beside the link's target and is renamed over the target, so the link
//! stays a link), refuses what is not a regular file (a directory, a FIFO, a device, a
//! socket: renaming over `/dev/stdout` would replace the device entry itself), writes `-` to
//! standard output, removes its temporary file on error and the temporaries that earlier,
//! killed runs left beside the target. Every message names the path the user gave.
//! [`check_output_path`] runs the same checks before a command starts its work.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Symlinks followed before giving up (the kernel's own limit is 40).
const MAX_LINKS: usize = 40;

/// The path that means standard output.
pub fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// The file a write to `path` lands in: `path` itself, or the end of its chain of symlinks
/// (which need not exist yet: a dangling link is written through, creating its target).
pub fn resolve_symlinks(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&current).map_err(|e| Error::io(path, e))?;
                current = match current.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            _ => return Ok(current),
        }
    }
    Err(Error::invalid(format!(
        "{}: too many levels of symbolic links",
        path.display()
    )))
}

/// Checks, before any work is done, that results can be written to `path`: it is `-` (when
/// `stdout_ok`), or it (or the target of its symlinks) is a regular file or does not exist
/// yet, in a folder that exists. `flag` names the option in the message (`--out`).
pub fn check_output_path(path: &Path, flag: &str, stdout_ok: bool) -> Result<()> {
    if is_stdout(path) {
        if stdout_ok {
            return Ok(());
        }
        return Err(Error::invalid(format!(
            "{flag} -: this output cannot go to standard output; give a file path"
        )));
    }
    let target = resolve_symlinks(path)?;
    match std::fs::metadata(&target) {
        Ok(meta) => {
            let ft = meta.file_type();
            if !ft.is_file() {
                return Err(Error::invalid(format!(
                    "{}: {flag} is {}, not a regular file; eap writes only regular files",
                    path.display(),
                    describe(&ft)
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match target.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                let why = format!("{flag}: folder {} does not exist", dir.display());
                let error = std::io::Error::new(std::io::ErrorKind::NotFound, why);
                return Err(Error::io(path, error));
            }
        }
        Err(e) => return Err(Error::io(path, e)),
    }
    Ok(())
}

/// What a non-regular file is, for messages.
fn describe(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() || ft.is_block_device() {
            return "a device file";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Writes `bytes` to a temporary file beside `path`'s target (through symlinks), syncs it and
/// renames it over the target, so a reader (or a resumed run) sees either the old file or the
/// new one, never a part. `-` writes to standard output instead. The temporary file is removed
/// when anything fails; temporaries of earlier runs that were killed mid-write are removed
/// first. Errors name `path`, never the temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if is_stdout(path) {
        let mut out = std::io::stdout().lock();
        return out
            .write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("standard output", e));
    }
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] for contents too large to hold in memory: `write` streams them into the
/// temporary file (`-` is not accepted: a stream cannot be taken back when `write` fails).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    check_output_path(path, "output", false)?;
    let target = resolve_symlinks(path)?;
    let name = target
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let prefix = {
        let mut p = std::ffi::OsString::from(".");
        p.push(name);
        p.push(".");
        p.into_string().ok()
    };
    if let Some(prefix) = &prefix {
        remove_stale_temporaries(&target, prefix);
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = target.with_file_name(tmp_name);
    let permissions = std::fs::metadata(&target).ok().map(|m| m.permissions());
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f)?;
        if let Some(p) = permissions {
            f.set_permissions(p)?;
        }
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    std::fs::rename(&tmp, &target).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Removes `.<name>.<pid>.tmp` files beside `target` whose process is gone (a run killed
/// while writing). Best effort: a file that cannot be listed or removed stays.
fn remove_stale_temporaries(target: &Path, prefix: &str) {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether a process of this id runs (on Linux, from `/proc`; elsewhere assumed alive, so
/// nothing of another run is ever removed).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("no/such/dir/out.json");
        let err = write_atomic(&missing, b"x").unwrap_err().to_string();
        assert!(err.contains("no/such/dir"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn writes_through_symlinks_and_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        let target = dir.path().join("real/out.json");
        std::fs::write(&target, "old").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("real/out.json", &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(
            std::fs::read_dir(dir.path().join("real")).unwrap().count(),
            1
        );
        // A dangling link creates its target.
        let dangling = dir.path().join("dangling.json");
        std::os::unix::fs::symlink("real/new.json", &dangling).unwrap();
        write_atomic(&dangling, b"x").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("real/new.json")).unwrap(),
            b"x"
        );
    }

    #[test]
    fn refuses_directories_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomic(dir.path(), b"x").unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        #[cfg(unix)]
        {
            let err = check_output_path(Path::new("/dev/null"), "--out", false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("/dev/null") && err.contains("device"), "{err}");
        }
        assert!(check_output_path(Path::new("-"), "--out", true).is_ok());
        let err = check_output_path(Path::new("-"), "--svg", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--svg"), "{err}");
    }

    #[test]
    fn removes_temporaries_of_dead_runs_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        // Process ids are below 2^22 on Linux, so this one is not running.
        let stale = dir.path().join(".out.json.4294967295.tmp");
        let live = dir
            .path()
            .join(format!(".out.json.{}.tmp.keep", std::process::id()));
        std::fs::write(&stale, "partial").unwrap();
        std::fs::write(&live, "other").unwrap();
        write_atomic(&path, b"x").unwrap();
        if cfg!(target_os = "linux") {
            assert!(!stale.exists());
        }
        assert!(live.exists());
    }
}
