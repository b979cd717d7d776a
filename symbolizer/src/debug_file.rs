//! Finding the separate debug file of a stripped binary, the way GDB does:
//! by build id under `DEBUG_DIR/.build-id/xx/rest.debug`, then by
//! `.gnu_debuglink` name next to the binary, in its `.debug/` directory, and
//! under `DEBUG_DIR/<binary's directory>/`. Every place is looked up under
//! each root in turn — the process's own root (`/proc/PID/root`) first, so a
//! container's debug files are found — and a candidate is accepted only if
//! its build id equals the binary's or, without build ids, its CRC-32 equals
//! the debuglink's.

use std::{
    fs::File,
    io::{self, Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
};

use crate::elf::{ElfLayout, hex};

/// A debug file found for a binary.
#[derive(Debug)]
pub struct DebugFile {
    /// Where it was found (under one of the roots).
    pub path: PathBuf,
    pub file: File,
}

/// Where to look: roots (e.g. `/proc/PID/root`, then `/`) and the debug
/// directories inside each (e.g. `/usr/lib/debug`).
#[derive(Clone, Debug)]
pub struct DebugSearch<'a> {
    pub roots: &'a [PathBuf],
    pub debug_dirs: &'a [PathBuf],
}

/// The candidates for a binary at `path` (as its process sees it), in order.
pub fn candidates(layout: &ElfLayout, path: &Path, search: &DebugSearch<'_>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let under = |root: &Path, p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    for root in search.roots {
        if let Some(id) = layout.build_id.as_deref().filter(|id| id.len() >= 2) {
            let id = hex(id);
            for dir in search.debug_dirs {
                out.push(
                    under(root, dir)
                        .join(".build-id")
                        .join(&id[..2])
                        .join(format!("{}.debug", &id[2..])),
                );
            }
        }
        if let Some((name, _)) = &layout.debuglink {
            // A debuglink is a file name, never a path.
            if name.is_empty() || name.contains('/') {
                continue;
            }
            let dir = path.parent().unwrap_or(Path::new("/"));
            out.push(under(root, dir).join(name));
            out.push(under(root, dir).join(".debug").join(name));
            for debug_dir in search.debug_dirs {
                out.push(under(&under(root, debug_dir), dir).join(name));
            }
        }
    }
    out
}

/// Finds and opens the debug file of a binary without DWARF of its own.
/// `None` when it has DWARF, or no candidate exists or matches.
pub fn find(layout: &ElfLayout, path: &Path, search: &DebugSearch<'_>) -> Option<DebugFile> {
    if layout.has_dwarf {
        return None;
    }
    for candidate in candidates(layout, path, search) {
        let Ok(file) = File::open(&candidate) else {
            continue;
        };
        match matches(layout, &file) {
            Ok(true) => {
                return Some(DebugFile {
                    path: candidate,
                    file,
                });
            }
            Ok(false) => {
                tracing::debug!(candidate = %candidate.display(), "debug file does not match its binary");
            }
            Err(e) => {
                tracing::debug!(candidate = %candidate.display(), error = %e, "unreadable debug file");
            }
        }
    }
    None
}

fn matches(binary: &ElfLayout, file: &File) -> io::Result<bool> {
    let debug = ElfLayout::read(file).map_err(io::Error::other)?;
    if !debug.has_dwarf {
        return Ok(false);
    }
    match (&binary.build_id, &debug.build_id) {
        (Some(a), Some(b)) => Ok(a == b),
        _ => match &binary.debuglink {
            Some((_, crc)) => Ok(crc32(file)? == *crc),
            None => Ok(false),
        },
    }
}

/// CRC-32 (the `.gnu_debuglink` checksum) of a whole file.
fn crc32(mut file: &File) -> io::Result<u32> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A binary stripped of its DWARF, with its debug file split off by
    /// objcopy (the oracle of what GDB would find).
    fn stripped(dir: &Path, build_id: bool) -> (PathBuf, PathBuf) {
        let src = dir.join("p.c");
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let bin = dir.join("p");
        let id = if build_id {
            "-Wl,--build-id=sha1"
        } else {
            "-Wl,--build-id=none"
        };
        run(Command::new("gcc")
            .args(["-g", "-O1", id, "-o"])
            .arg(&bin)
            .arg(&src));
        let debug = dir.join("p.debug");
        run(Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&bin)
            .arg(&debug));
        run(Command::new("objcopy").arg("--strip-debug").arg(&bin));
        run(Command::new("objcopy")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(&bin));
        (bin, debug)
    }

    fn layout(path: &Path) -> ElfLayout {
        ElfLayout::read(&File::open(path).unwrap()).unwrap()
    }

    #[test]
    fn finds_by_build_id_in_a_debug_dir_under_the_process_root() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("opt/app");
        std::fs::create_dir_all(&work).unwrap();
        let (bin, debug) = stripped(&work, true);
        let l = layout(&bin);
        assert!(!l.has_dwarf);
        let id = l.build_id_hex();
        let store = root.path().join("usr/lib/debug/.build-id").join(&id[..2]);
        std::fs::create_dir_all(&store).unwrap();
        std::fs::rename(&debug, store.join(format!("{}.debug", &id[2..]))).unwrap();
        let roots = [root.path().to_path_buf(), PathBuf::from("/nonexistent")];
        let dirs = [PathBuf::from("/usr/lib/debug")];
        let search = DebugSearch {
            roots: &roots,
            debug_dirs: &dirs,
        };
        let found = find(&l, Path::new("/opt/app/p"), &search).expect("found by build id");
        assert_eq!(found.path, store.join(format!("{}.debug", &id[2..])));
    }

    #[test]
    fn finds_by_debuglink_next_to_the_binary_and_checks_the_crc() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("srv");
        std::fs::create_dir_all(&work).unwrap();
        let (bin, debug) = stripped(&work, false);
        let l = layout(&bin);
        assert_eq!(l.build_id, None);
        assert_eq!(
            l.debuglink.as_ref().map(|(n, _)| n.as_str()),
            Some("p.debug")
        );
        let roots = [root.path().to_path_buf()];
        let search = DebugSearch {
            roots: &roots,
            debug_dirs: &[],
        };
        let found = find(&l, Path::new("/srv/p"), &search).expect("found by debuglink");
        assert_eq!(found.path, debug);
        // In .debug/ too.
        std::fs::create_dir_all(work.join(".debug")).unwrap();
        std::fs::rename(&debug, work.join(".debug/p.debug")).unwrap();
        assert_eq!(
            find(&l, Path::new("/srv/p"), &search).unwrap().path,
            work.join(".debug/p.debug")
        );
        // Another file under the same name: the CRC says no.
        let other = tempfile::tempdir().unwrap();
        let (_, other_debug) = stripped(other.path(), false);
        std::fs::copy(&other_debug, work.join(".debug/p.debug")).unwrap();
        let mut patched = std::fs::read(work.join(".debug/p.debug")).unwrap();
        if let Some(b) = patched.last_mut() {
            *b ^= 0xff;
        }
        std::fs::write(work.join(".debug/p.debug"), patched).unwrap();
        assert!(find(&l, Path::new("/srv/p"), &search).is_none());
    }

    #[test]
    fn binaries_with_dwarf_need_none_and_debuglinks_are_names_only() {
        let own = std::env::current_exe().unwrap();
        let l = layout(&own);
        assert!(l.has_dwarf);
        let roots = [PathBuf::from("/")];
        let search = DebugSearch {
            roots: &roots,
            debug_dirs: &[],
        };
        assert!(find(&l, &own, &search).is_none());
        let evil = ElfLayout {
            debuglink: Some(("../../etc/passwd".into(), 0)),
            ..ElfLayout::default()
        };
        assert!(candidates(&evil, Path::new("/bin/x"), &search).is_empty());
    }
}
