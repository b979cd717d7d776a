//! Unwind tables kept for reuse: a byte-bounded in-memory LRU, and
//! optionally a directory of serialized tables so that a restarted agent
//! does not parse every binary's `.eh_frame` again.
//!
//! Keys are a build ID in hex, or a file identity string when the file has
//! none; the caller chooses them so that equal keys mean equal files. Cache
//! files are never trusted: [`UnwindTable::from_bytes`] verifies each one,
//! and a bad one is rebuilt and replaced.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use lru::LruCache;

use super::table::{TableError, UnwindTable, build};

/// Extension of cache files; the number follows the table format version.
const EXTENSION: &str = "v1";

/// Counters since the cache was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_hits: u64,
    pub disk_hits: u64,
    /// Tables built from ELF files (memory and disk misses).
    pub builds: u64,
    /// Builds that failed (unreadable file, no unwind info, too big...).
    /// Failures are not cached: the caller remembers them if it wants to.
    pub build_failures: u64,
    /// Cache files that failed verification and were rebuilt.
    pub disk_rejects: u64,
    /// Cache files that could not be written (the table is still returned).
    pub disk_write_failures: u64,
    /// Tables in memory now, and their bytes.
    pub tables: usize,
    pub bytes: usize,
}

pub struct TableCache {
    memory: LruCache<String, Arc<UnwindTable>>,
    max_bytes: usize,
    dir: Option<PathBuf>,
    stats: CacheStats,
}

impl TableCache {
    /// A cache holding at most `max_bytes` of tables in memory (a table
    /// bigger than that is returned but not kept), backed by `dir` if given
    /// (created if missing).
    pub fn new(max_bytes: usize, dir: Option<PathBuf>) -> io::Result<Self> {
        if let Some(dir) = &dir {
            fs::create_dir_all(dir)?;
        }
        Ok(Self {
            memory: LruCache::unbounded(),
            max_bytes,
            dir,
            stats: CacheStats::default(),
        })
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// The table for `key`: from memory, else from the cache directory,
    /// else built from the bytes `elf` reads (and then written to the
    /// directory).
    pub fn get_or_build(
        &mut self,
        key: &str,
        elf: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> Result<Arc<UnwindTable>, TableError> {
        if let Some(table) = self.memory.get(key) {
            self.stats.memory_hits += 1;
            return Ok(Arc::clone(table));
        }
        let path = self.dir.as_ref().map(|d| d.join(file_name(key)));
        if let Some(path) = &path {
            match read_cached(path) {
                Ok(Some(table)) => {
                    self.stats.disk_hits += 1;
                    return Ok(self.insert(key, table));
                }
                Ok(None) => {}
                Err(e) => {
                    self.stats.disk_rejects += 1;
                    tracing::warn!(path = %path.display(), error = %e, "bad unwind table cache file; rebuilding it");
                }
            }
        }
        self.stats.builds += 1;
        let table = elf()
            .map_err(TableError::from)
            .and_then(|data| build(&data));
        let table = match table {
            Ok(table) => table,
            Err(e) => {
                self.stats.build_failures += 1;
                return Err(e);
            }
        };
        if let Some(path) = &path
            && let Err(e) = write_atomically(path, &table.to_bytes())
        {
            self.stats.disk_write_failures += 1;
            tracing::warn!(path = %path.display(), error = %e, "cannot write unwind table cache file");
        }
        Ok(self.insert(key, table))
    }

    fn insert(&mut self, key: &str, table: UnwindTable) -> Arc<UnwindTable> {
        let table = Arc::new(table);
        self.stats.bytes += table.memory_bytes();
        if let Some((_, old)) = self.memory.push(key.to_owned(), Arc::clone(&table)) {
            self.stats.bytes -= old.memory_bytes();
        }
        while self.stats.bytes > self.max_bytes {
            let Some((_, old)) = self.memory.pop_lru() else {
                break;
            };
            self.stats.bytes -= old.memory_bytes();
        }
        self.stats.tables = self.memory.len();
        table
    }
}

/// A cached table, `None` if there is no file, an error if there is a bad one.
fn read_cached(path: &Path) -> Result<Option<UnwindTable>, TableError> {
    let data = match fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    UnwindTable::from_bytes(&data).map(Some)
}

/// Writes a temporary file in the same directory and renames it over
/// `path`: readers (another agent, a later run) see the old file or the
/// whole new one.
fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("cache path without a file name"))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = fs::write(&tmp, data).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The cache file name of a key: a lowercase hex key (a build ID) as it is;
/// any other key as `k-<its safe characters>-<64-bit FNV-1a of it>`, which
/// cannot be hex, cannot escape the directory, and stays distinct for keys
/// that differ only in their unsafe characters.
pub fn file_name(key: &str) -> String {
    let is_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    if !key.is_empty() && key.len() <= 128 && key.chars().all(is_hex) {
        return format!("{key}.{EXTENSION}");
    }
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("k-{safe}-{hash:016x}.{EXTENSION}")
}
