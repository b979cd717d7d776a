//! Puts unwind tables into the kernel for the processes the profiler
//! samples: each executable's rows once (shared by every process mapping it,
//! released when none does), and per process its executable mappings, each
//! saying how its frames are unwound (rows or frame pointers). The contract
//! is in `fathom_common::unwind`; the tables come from [`crate::unwind`].

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::Arc,
};

use aya::maps::{Array, HashMap as BpfHashMap, IterableMap as _, MapData};
use fathom_common::unwind::{UnwindMapping, UnwindProcess, UnwindRow, mapping_kind};
use fathom_symbolizer::ObjectKey;

use super::{TableCache, TableError, UnwindTable};
use crate::{
    profiles::{
        capture::{UnwindMapSizes, UnwindMaps},
        process::{Vma, VmaKind},
    },
    sys::SharedArray,
};

/// Where the table unwinder keeps the tables it builds.
#[derive(Clone, Debug)]
pub struct UnwinderConfig {
    /// Where built tables are kept across restarts; none: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Bound of the in-memory table cache (tables of files no process maps
    /// any more, kept for the next one).
    pub cache_bytes: usize,
}

impl Default for UnwinderConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            cache_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnwinderError {
    #[error("mapping the unwinder's map {name}: {source}")]
    Mmap {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("unwind table cache directory {path}: {source}")]
    CacheDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Counters for logs and self-metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwinderStats {
    /// Processes whose stacks the kernel walks from tables now.
    pub processes: u64,
    /// Mappings unwound from tables / by frame pointers, now.
    pub table_mappings: u64,
    pub frame_pointer_mappings: u64,
    /// Distinct tables in the kernel, and their rows.
    pub tables: u64,
    pub rows_used: u64,
    pub rows_capacity: u64,
    /// Files unwound by frame pointers because their table could not be
    /// built (no `.eh_frame`, malformed), or did not fit.
    pub tables_failed: u64,
    pub tables_too_big: u64,
    /// Processes left to the kernel's walk: no room for their mappings or
    /// in the process map.
    pub processes_refused: u64,
}

/// A contiguous range of a shared array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    start: u32,
    len: u32,
}

/// First-fit allocator of ranges in `[0, capacity)`.
#[derive(Debug)]
struct RangeAlloc {
    /// Free ranges by start, coalesced.
    free: BTreeMap<u32, u32>,
    used: u64,
}

impl RangeAlloc {
    fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { free, used: 0 }
    }

    fn alloc(&mut self, len: u32) -> Option<Range> {
        if len == 0 {
            return Some(Range { start: 0, len: 0 });
        }
        let (&start, &free) = self.free.iter().find(|(_, free)| **free >= len)?;
        self.free.remove(&start);
        if free > len {
            self.free.insert(start + len, free - len);
        }
        self.used += u64::from(len);
        Some(Range { start, len })
    }

    fn release(&mut self, range: Range) {
        if range.len == 0 {
            return;
        }
        self.used -= u64::from(range.len);
        let mut start = range.start;
        let mut len = range.len;
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back()
            && prev + prev_len == start
        {
            self.free.remove(&prev);
            start = prev;
            len += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        self.free.insert(start, len);
    }
}

/// A file's table as loaded (or why it is not).
#[derive(Clone, Copy, Debug)]
enum Loaded {
    Rows {
        range: Range,
        base: u64,
    },
    /// Frame pointers: no usable table, or the file keeps frame pointers.
    FramePointers(&'static str),
}

#[derive(Debug)]
struct LoadedTable {
    loaded: Loaded,
    /// Processes whose mappings name it.
    refs: u32,
}

#[derive(Debug)]
struct LoadedProcess {
    mappings: Range,
    /// Of `mappings`, those unwound from rows (the others by frame pointers).
    table_mappings: u32,
    tables: Vec<String>,
}

/// Ranges released while a BPF program might still read them. A range is
/// reused only after two drains: a drain waits until every CPU finished a
/// program run that started after it began, and programs run for
/// microseconds, so no run that could see the range is left by then.
#[derive(Debug, Default)]
struct Quarantine {
    pending: Vec<(Which, Range)>,
    aged: Vec<(Which, Range)>,
}

#[derive(Clone, Copy, Debug)]
enum Which {
    Rows,
    Mappings,
}

/// The kernel side of the unwinder, owned by the process watcher.
pub struct Unwinder {
    rows: SharedArray<UnwindRow>,
    mappings: SharedArray<UnwindMapping>,
    /// The maps behind `rows` and `mappings`: their descriptors stay open
    /// (programs loaded later refer to them).
    _maps: (Array<MapData, UnwindRow>, Array<MapData, UnwindMapping>),
    processes_map: BpfHashMap<MapData, u32, UnwindProcess>,
    sizes: UnwindMapSizes,
    row_alloc: RangeAlloc,
    mapping_alloc: RangeAlloc,
    cache: TableCache,
    tables: HashMap<String, LoadedTable>,
    processes: HashMap<u32, LoadedProcess>,
    quarantine: Quarantine,
    stats: UnwinderStats,
}

impl std::fmt::Debug for Unwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwinder")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The cache key of a file's table: its build id, else its identity.
fn table_key(key: &ObjectKey) -> String {
    match key {
        ObjectKey::BuildId(id) => fathom_symbolizer::elf::hex(id),
        ObjectKey::File {
            dev,
            inode,
            size,
            mtime_ns,
        } => format!("file-{dev:x}-{inode}-{size}-{mtime_ns}"),
        ObjectKey::Kernel => "kernel".into(),
    }
}

impl Unwinder {
    pub fn new(maps: UnwindMaps, config: &UnwinderConfig) -> Result<Self, UnwinderError> {
        use fathom_common::profiler::names;
        let rows = SharedArray::map(maps.rows.map().fd().as_fd(), maps.sizes.rows as usize)
            .map_err(|source| UnwinderError::Mmap {
                name: names::UNWIND_ROWS,
                source,
            })?;
        let mappings = SharedArray::map(
            maps.mappings.map().fd().as_fd(),
            maps.sizes.mappings as usize,
        )
        .map_err(|source| UnwinderError::Mmap {
            name: names::UNWIND_MAPPINGS,
            source,
        })?;
        Ok(Self {
            rows,
            mappings,
            _maps: (maps.rows, maps.mappings),
            processes_map: maps.processes,
            sizes: maps.sizes,
            row_alloc: RangeAlloc::new(maps.sizes.rows),
            mapping_alloc: RangeAlloc::new(maps.sizes.mappings),
            cache: TableCache::new(config.cache_bytes, config.cache_dir.clone()).map_err(
                |source| UnwinderError::CacheDir {
                    path: config.cache_dir.clone().unwrap_or_default(),
                    source,
                },
            )?,
            tables: HashMap::new(),
            processes: HashMap::new(),
            quarantine: Quarantine::default(),
            stats: UnwinderStats {
                rows_capacity: u64::from(maps.sizes.rows),
                ..UnwinderStats::default()
            },
        })
    }

    pub fn stats(&self) -> UnwinderStats {
        let mut stats = self.stats;
        stats.processes = self.processes.len() as u64;
        for process in self.processes.values() {
            stats.table_mappings += u64::from(process.table_mappings);
            stats.frame_pointer_mappings +=
                u64::from(process.mappings.len - process.table_mappings);
        }
        stats.tables = self
            .tables
            .values()
            .filter(|t| matches!(t.loaded, Loaded::Rows { .. }))
            .count() as u64;
        stats.rows_used = self.row_alloc.used;
        stats
    }

    /// Describes process `pid`'s executable mappings to the kernel, loading
    /// the tables of files not loaded yet. Replaces what it had.
    pub fn load(&mut self, pid: u32, vmas: &[Vma]) {
        let mut tables = Vec::new();
        let mut entries = Vec::with_capacity(vmas.len());
        for vma in vmas {
            let mut entry = UnwindMapping {
                start: vma.start,
                end: vma.end,
                kind: mapping_kind::FRAME_POINTER,
                ..UnwindMapping::default()
            };
            if let VmaKind::Object(object) = &vma.kind
                && let Ok(layout) = &object.layout
                && let Some(load_bias) = load_bias(layout, vma)
            {
                let key = table_key(&object.key);
                let read_path = object.read_path.clone();
                let table = self.acquire(&key, || super::read_for_unwind(&read_path));
                tables.push(key);
                match table {
                    Loaded::Rows { range, base } => {
                        entry.bias = load_bias.wrapping_add(base);
                        entry.rows_start = range.start;
                        entry.rows_len = range.len;
                        entry.kind = mapping_kind::TABLE;
                    }
                    Loaded::FramePointers(reason) => {
                        tracing::debug!(pid, path = object.path, reason, "frame pointers");
                    }
                }
            }
            entries.push(entry);
        }
        entries.sort_by_key(|e| e.start);
        let old = self.processes.remove(&pid);
        let installed = self.install(pid, &entries);
        match installed {
            Some(mappings) => {
                let table_mappings = entries
                    .iter()
                    .filter(|e| e.kind == mapping_kind::TABLE)
                    .count() as u32;
                self.processes.insert(
                    pid,
                    LoadedProcess {
                        mappings,
                        table_mappings,
                        tables,
                    },
                );
            }
            None => {
                self.stats.processes_refused += 1;
                let _ = self.processes_map.remove(&pid);
                for key in tables {
                    self.release_table(&key);
                }
            }
        }
        if let Some(old) = old {
            self.quarantine
                .pending
                .push((Which::Mappings, old.mappings));
            for key in old.tables {
                self.release_table(&key);
            }
        }
    }

    /// Writes the mappings into a new range and points the process at it.
    fn install(&mut self, pid: u32, entries: &[UnwindMapping]) -> Option<Range> {
        let len = u32::try_from(entries.len())
            .ok()
            .filter(|&n| n <= fathom_common::unwind::MAX_PROCESS_MAPPINGS)?;
        let range = self.mapping_alloc.alloc(len)?;
        self.mappings.write(range.start as usize, entries);
        let value = UnwindProcess {
            mappings_start: range.start,
            mappings_len: range.len,
        };
        if let Err(e) = self.processes_map.insert(pid, value, 0) {
            tracing::debug!(pid, error = %e, "process not unwound from tables");
            self.mapping_alloc.release(range);
            return None;
        }
        Some(range)
    }

    /// The loaded table of `key`, loading it on first use; takes a reference.
    fn acquire(&mut self, key: &str, elf: impl FnOnce() -> std::io::Result<Vec<u8>>) -> Loaded {
        if !self.tables.contains_key(key) {
            let loaded = match self.cache.get_or_build(key, elf) {
                Ok(table) => self.place(key, &table),
                Err(e) => {
                    self.stats.tables_failed += 1;
                    tracing::debug!(key, error = %e, "no unwind table: frame pointers");
                    Loaded::FramePointers(reason(&e))
                }
            };
            self.tables
                .insert(key.to_owned(), LoadedTable { loaded, refs: 0 });
        }
        match self.tables.get_mut(key) {
            Some(table) => {
                table.refs += 1;
                table.loaded
            }
            None => Loaded::FramePointers("table not built"),
        }
    }

    /// Copies a table's rows into the shared array.
    fn place(&mut self, key: &str, table: &Arc<UnwindTable>) -> Loaded {
        let Ok(len) = u32::try_from(table.rows.len()) else {
            self.stats.tables_too_big += 1;
            return Loaded::FramePointers("table too big");
        };
        let Some(range) = self.row_alloc.alloc(len) else {
            self.stats.tables_too_big += 1;
            tracing::info!(
                key,
                rows = len,
                free = self.sizes.rows as u64 - self.row_alloc.used,
                "no room for an unwind table: frame pointers (raise --unwind-table-rows)"
            );
            return Loaded::FramePointers("no room in the row map");
        };
        self.rows.write(range.start as usize, &table.rows);
        Loaded::Rows {
            range,
            base: table.base,
        }
    }

    fn release_table(&mut self, key: &str) {
        let Some(table) = self.tables.get_mut(key) else {
            return;
        };
        table.refs = table.refs.saturating_sub(1);
        if table.refs > 0 {
            return;
        }
        if let Some(table) = self.tables.remove(key)
            && let Loaded::Rows { range, .. } = table.loaded
        {
            self.quarantine.pending.push((Which::Rows, range));
        }
    }

    /// Forgets processes for which `alive` is false.
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        let gone: Vec<u32> = self
            .processes
            .keys()
            .copied()
            .filter(|&pid| !alive(pid))
            .collect();
        for pid in gone {
            self.forget(pid);
        }
    }

    pub fn forget(&mut self, pid: u32) {
        let Some(process) = self.processes.remove(&pid) else {
            return;
        };
        let _ = self.processes_map.remove(&pid);
        self.quarantine
            .pending
            .push((Which::Mappings, process.mappings));
        for key in process.tables {
            self.release_table(&key);
        }
    }

    /// Called after each drain: frees ranges released before the previous
    /// one (see [`Quarantine`]).
    pub fn after_drain(&mut self) {
        for (which, range) in std::mem::take(&mut self.quarantine.aged) {
            match which {
                Which::Rows => self.row_alloc.release(range),
                Which::Mappings => self.mapping_alloc.release(range),
            }
        }
        self.quarantine.aged = std::mem::take(&mut self.quarantine.pending);
    }
}

/// Process address minus ELF virtual address for the code a mapping holds.
/// The mapping starts at a page-aligned file offset, which may lie before
/// its segment's (lld puts `.text` at offset 0x12e00, vaddr 0x13e00, mapped
/// from offset 0x12000): the executable segment is the one whose pages the
/// mapping covers.
fn load_bias(layout: &fathom_symbolizer::elf::ElfLayout, vma: &Vma) -> Option<u64> {
    let page = |offset: u64| offset & !0xfff;
    let segment = layout
        .segments
        .iter()
        .filter(|s| s.executable)
        .find(|s| page(s.offset) <= vma.offset && vma.offset < s.offset + s.file_size.max(1))?;
    Some(
        vma.start
            .wrapping_sub(vma.offset)
            .wrapping_add(segment.offset)
            .wrapping_sub(segment.vaddr),
    )
}

fn reason(e: &TableError) -> &'static str {
    match e {
        TableError::NoUnwindInfo => "no unwind information",
        _ => "table not built",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_reused_and_coalesced() {
        let mut alloc = RangeAlloc::new(100);
        let a = alloc.alloc(30).unwrap();
        let b = alloc.alloc(30).unwrap();
        let c = alloc.alloc(30).unwrap();
        assert_eq!((a.start, b.start, c.start), (0, 30, 60));
        assert!(alloc.alloc(20).is_none(), "only 10 left");
        alloc.release(a);
        alloc.release(c);
        // Free: 0..30, and 60..100 (c coalesced with the tail).
        assert!(alloc.alloc(41).is_none(), "free space is split");
        alloc.release(b);
        assert_eq!(alloc.used, 0);
        assert_eq!(alloc.free.len(), 1, "coalesced: {:?}", alloc.free);
        assert_eq!(alloc.alloc(100).unwrap(), Range { start: 0, len: 100 });
    }
}
