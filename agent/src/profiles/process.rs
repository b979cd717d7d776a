//! What the agent knows about processes: their executable mappings, read
//! when a process is first sampled and kept (with open descriptors of the
//! mapped files) until its last samples are symbolized, so processes that
//! exit or delete their binary still symbolize.

use std::{
    collections::{HashMap, VecDeque},
    fs::{self, File},
    io::{self, Write as _},
    os::unix::fs::FileExt as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
};

use fathom_symbolizer::{
    Lease, ObjectKey, SymbolizerService,
    debug_file::{self, DebugSearch},
    elf::ElfLayout,
    perf_map::PerfMap,
};

use super::pprof::Mapping;
use crate::procfs::{self, MapsPath};

/// Snapshots kept per process (a process that `exec`s or `dlopen`s gets a new
/// one; older ones still resolve samples taken before the change).
const MAX_SNAPSHOTS: usize = 4;

/// A mapped file the agent holds open.
#[derive(Debug)]
pub struct ObjectFile {
    /// The path in the process's mount namespace (what users know it by).
    pub path: String,
    /// Where the symbolizer reads it: our descriptor in `/proc/self/fd`.
    pub read_path: PathBuf,
    /// Build id and segments, or why they could not be read.
    pub layout: Result<ElfLayout, String>,
    /// The pprof mapping for this file.
    pub mapping: Arc<Mapping>,
    /// What the symbolizer caches its symbols under (build id when present).
    pub key: ObjectKey,
    /// The separate debug file of a binary without DWARF, when found:
    /// symbolize its virtual addresses there.
    pub debug: Option<DebugObject>,
    /// Keeps the symbolizer's cache of this file while a process maps it.
    _lease: Option<Lease>,
    _file: File,
}

impl ObjectFile {
    fn open(
        pid: u32,
        entry: &procfs::MapsEntry,
        path: &str,
        proc_root: &Path,
        symbolizer: Option<&SymbolizerService>,
        debug_dirs: Option<&[PathBuf]>,
    ) -> io::Result<Self> {
        // map_files opens exactly the mapped file, even when it was deleted
        // or lives in another mount namespace; needs CAP_SYS_ADMIN or
        // CAP_CHECKPOINT_RESTORE. The root path is the fallback.
        let map_file = proc_root
            .join(pid.to_string())
            .join("map_files")
            .join(format!("{:x}-{:x}", entry.start, entry.end));
        let file = File::open(&map_file).or_else(|_| {
            File::open(
                proc_root
                    .join(pid.to_string())
                    .join("root")
                    .join(path.trim_start_matches('/')),
            )
        })?;
        if file.metadata().is_ok_and(|m| m.ino() != entry.inode) {
            tracing::debug!(
                pid,
                path,
                "mapped file was replaced on disk; symbols may not match"
            );
        }
        let mut object = Self::from_file(file, path, entry.offset, symbolizer)?;
        if let (Ok(layout), Some(debug_dirs)) = (&object.layout, debug_dirs) {
            let roots = [
                proc_root.join(pid.to_string()).join("root"),
                PathBuf::from("/"),
            ];
            let search = DebugSearch {
                roots: &roots,
                debug_dirs,
            };
            object.debug = debug_file::find(layout, Path::new(path), &search).map(|found| {
                tracing::debug!(path, debug = %found.path.display(), "separate debug file");
                DebugObject {
                    read_path: fd_path(&found.file),
                    path: found.path,
                    _file: found.file,
                }
            });
        }
        Ok(object)
    }

    /// The running kernel's vDSO, copied out of this process's memory into
    /// an in-memory file. Every 64-bit process maps the same image.
    fn vdso(symbolizer: Option<&SymbolizerService>) -> io::Result<(Self, u64)> {
        let maps = fs::read_to_string("/proc/self/maps")?;
        let entries = procfs::parse_maps(&maps).map_err(io::Error::other)?;
        let vdso = entries
            .iter()
            .find(|e| e.path == MapsPath::Vdso)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no [vdso] in /proc/self/maps")
            })?;
        let mut image = vec![0u8; (vdso.end - vdso.start) as usize];
        File::open("/proc/self/mem")?.read_exact_at(&mut image, vdso.start)?;
        let mut file = crate::sys::memfd("fathom-vdso")?;
        file.write_all(&image)?;
        Ok((
            Self::from_file(file, "[vdso]", 0, symbolizer)?,
            image.len() as u64,
        ))
    }

    fn from_file(
        file: File,
        path: &str,
        map_offset: u64,
        symbolizer: Option<&SymbolizerService>,
    ) -> io::Result<Self> {
        let read_path = fd_path(&file);
        let layout = ElfLayout::read(&file).map_err(|e| e.to_string());
        let mapping = Arc::new(match &layout {
            Ok(layout) => {
                let text = layout.text_segment(map_offset);
                Mapping {
                    filename: path.to_owned(),
                    build_id: layout.build_id_hex(),
                    memory_start: text.map_or(0, |s| s.vaddr),
                    memory_limit: text.map_or(0, |s| s.vaddr + s.mem_size),
                    file_offset: text.map_or(0, |s| s.offset),
                }
            }
            Err(_) => Mapping {
                filename: path.to_owned(),
                build_id: String::new(),
                memory_start: 0,
                memory_limit: 0,
                file_offset: 0,
            },
        });
        let key = ObjectKey::of_file(
            layout.as_ref().ok().and_then(|l| l.build_id.as_deref()),
            &file.metadata()?,
        );
        Ok(Self {
            path: path.to_owned(),
            read_path,
            layout,
            mapping,
            _lease: symbolizer.map(|s| s.lease(key.clone())),
            key,
            debug: None,
            _file: file,
        })
    }
}

/// Where the symbolizer reads a file the agent holds open: the path of our
/// descriptor, valid after the file was deleted or its process exited.
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(file)
    ))
}

/// A separate debug file the agent holds open.
#[derive(Debug)]
pub struct DebugObject {
    /// Where it was found (under the process's root or ours).
    pub path: PathBuf,
    /// Where the symbolizer reads it.
    pub read_path: PathBuf,
    _file: File,
}

/// One executable mapping of a process.
#[derive(Clone, Debug)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub inode: u64,
    pub kind: VmaKind,
}

#[derive(Clone, Debug)]
pub enum VmaKind {
    Object(Arc<ObjectFile>),
    /// A file the agent could not open.
    Unreadable {
        path: String,
        reason: String,
    },
    Vdso,
    /// Anonymous executable memory (JIT code).
    Anonymous,
    Pseudo(String),
}

/// The executable mappings of a process at one point in time.
#[derive(Debug, Default)]
pub struct Snapshot {
    vmas: Vec<Vma>, // sorted by start, non-overlapping
}

impl Snapshot {
    /// The executable mappings, sorted by start.
    pub fn vmas(&self) -> &[Vma] {
        &self.vmas
    }

    fn find(&self, addr: u64) -> Option<&Vma> {
        let i = self.vmas.partition_point(|v| v.start <= addr);
        self.vmas[..i].last().filter(|v| addr < v.end)
    }

    fn same_layout(&self, entries: &[procfs::MapsEntry]) -> bool {
        let exec = entries.iter().filter(|e| e.executable);
        self.vmas.len() == exec.clone().count()
            && self.vmas.iter().zip(exec).all(|(v, e)| {
                (v.start, v.end, v.offset, v.inode) == (e.start, e.end, e.offset, e.inode)
            })
    }
}

/// A process the agent has seen.
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    /// Clock ticks since boot; with the pid it names one process.
    pub start_time: Option<u64>,
    pub comm: String,
    /// The executable's path (`/proc/PID/exe`), as the process sees it.
    pub exe: Option<String>,
    /// Its resource (service name, container id), read when it was last
    /// observed.
    pub meta: Option<crate::process_meta::ProcessMeta>,
    snapshots: VecDeque<Arc<Snapshot>>,
    refreshed_in_round: u64,
    dead_sweeps: u8,
    /// The pid inside the process's own pid namespace (names its perf map).
    ns_pid: Option<u32>,
    /// The last read of its JIT perf map (`/tmp/perf-PID.map`), kept after
    /// the process exits.
    perf_map: Option<PerfMapRead>,
    /// Its CPython interpreter, when it runs one the agent covers (found
    /// with its latest mappings).
    pub python: Option<Arc<super::python::PythonProcess>>,
}

/// A perf map as last read, and the file's version then.
#[derive(Debug)]
struct PerfMapRead {
    map: PerfMap,
    version: (u64, Option<std::time::SystemTime>),
    round: u64,
}

/// Where a user-space address is.
#[derive(Clone, Debug)]
pub enum UserAddress {
    /// In a mapped file, at this file offset.
    Object {
        object: Arc<ObjectFile>,
        file_offset: u64,
    },
    Vdso,
    Anonymous,
    /// JIT code named by the process's perf map.
    Jit(String),
    /// Somewhere the agent cannot symbolize, and why.
    Unknown(String),
}

/// Counters of the process table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub processes_observed: u64,
    /// Processes gone before their mappings could be read.
    pub processes_missed: u64,
    pub objects_opened: u64,
    pub object_open_failures: u64,
    pub processes_evicted: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Maps(#[from] procfs::MapsError),
}

/// A mapped file by device and inode, as `/proc/PID/maps` names it.
type FileId = (u32, u32, u64);

/// All processes the agent has seen, and the files they map.
#[derive(Debug)]
pub struct ProcessTable {
    proc_root: PathBuf,
    processes: HashMap<u32, Process>,
    objects: HashMap<FileId, Weak<ObjectFile>>,
    symbolizer: Option<SymbolizerService>,
    /// Debug directories searched (in the process's root, then ours) for
    /// the debug files of stripped binaries.
    debug_dirs: Option<Vec<PathBuf>>,
    /// The vDSO image, read on first need (`Err`: why it cannot be).
    vdso: Option<Result<(Arc<ObjectFile>, u64), String>>,
    round: u64,
    stats: TableStats,
    /// CPython's symbols, per interpreter file.
    python_files: super::python::SymbolCache,
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcessTable {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            processes: HashMap::new(),
            objects: HashMap::new(),
            symbolizer: None,
            debug_dirs: None,
            vdso: None,
            round: 1,
            stats: TableStats::default(),
            python_files: Default::default(),
        }
    }

    /// Files opened from now on hold a lease of `symbolizer`'s cache, and
    /// stripped ones get their debug files looked up in `debug_dirs`.
    pub fn with_symbolizer(
        mut self,
        symbolizer: SymbolizerService,
        debug_dirs: &[PathBuf],
    ) -> Self {
        self.symbolizer = Some(symbolizer);
        self.debug_dirs = Some(debug_dirs.to_vec());
        self
    }

    /// The `/proc` this table reads.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    pub fn process(&self, pid: u32) -> Option<&Process> {
        self.processes.get(&pid)
    }

    /// The processes the table knows.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.processes.keys().copied()
    }

    /// The process's mappings as last read.
    pub fn latest(&self, pid: u32) -> Option<Arc<Snapshot>> {
        self.processes.get(&pid)?.snapshots.back().cloned()
    }

    /// Reads the process's mappings now, adding a snapshot if they changed.
    pub fn observe(&mut self, pid: u32) -> Result<(), ProcessError> {
        let dir = self.proc_root.join(pid.to_string());
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ESRCH)
                {
                    ProcessError::Gone { pid }
                } else {
                    ProcessError::Read { path, source }
                }
            })
        };
        let stat = read("stat");
        let maps = read("maps");
        let (stat, maps) = match (stat, maps) {
            (Ok(stat), Ok(maps)) => (stat, maps),
            (Err(e), _) | (_, Err(e)) => {
                if matches!(e, ProcessError::Gone { .. }) && !self.processes.contains_key(&pid) {
                    self.stats.processes_missed += 1;
                }
                return Err(e);
            }
        };
        let entries = procfs::parse_maps(&maps)?;
        let start_time = procfs::parse_stat_start_time(&stat);
        let comm = read("comm")
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default();
        let exe = fs::read_link(dir.join("exe")).ok().map(|p| {
            let p = p.to_string_lossy();
            p.strip_suffix(" (deleted)").unwrap_or(&p).to_owned()
        });

        let process = self.processes.entry(pid).or_insert_with(|| Process {
            pid,
            start_time,
            comm: comm.clone(),
            exe: exe.clone(),
            meta: None,
            snapshots: VecDeque::new(),
            refreshed_in_round: 0,
            dead_sweeps: 0,
            ns_pid: None,
            perf_map: None,
            python: None,
        });
        if process.ns_pid.is_none() {
            process.ns_pid = fs::read_to_string(dir.join("status"))
                .ok()
                .and_then(|status| procfs::parse_ns_pid(&status));
        }
        if process.start_time != start_time {
            // The pid was reused: a new process. Keep the old snapshots for
            // samples of the old one still waiting to be symbolized.
            process.start_time = start_time;
            process.dead_sweeps = 0;
        }
        process.comm = comm;
        process.exe = exe;
        // Re-read each time: an exec or a move into another cgroup changes it.
        if let Some(meta) = crate::process_meta::ProcessMeta::read(&self.proc_root, pid) {
            process.meta = Some(meta);
        }
        if process
            .snapshots
            .back()
            .is_some_and(|s| s.same_layout(&entries))
        {
            return Ok(());
        }
        self.stats.processes_observed += 1;
        let mut vmas = Vec::new();
        for entry in entries.iter().filter(|e| e.executable) {
            let kind = match &entry.path {
                MapsPath::File { path, .. } => self.object(pid, entry, path),
                MapsPath::Vdso => self.vdso(entry),
                MapsPath::Anonymous => VmaKind::Anonymous,
                MapsPath::Pseudo(name) => VmaKind::Pseudo(name.clone()),
            };
            vmas.push(Vma {
                start: entry.start,
                end: entry.end,
                offset: entry.offset,
                inode: entry.inode,
                kind,
            });
        }
        vmas.sort_by_key(|v| v.start);
        let python = match super::python::detect(&vmas, &mut self.python_files) {
            Some(Ok(python)) => Some(Arc::new(python)),
            Some(Err(reason)) => {
                tracing::info!(pid, reason, "Python process without Python frames");
                None
            }
            None => None,
        };
        let process = self
            .processes
            .get_mut(&pid)
            .ok_or(ProcessError::Gone { pid })?;
        process.python = python;
        process.snapshots.push_back(Arc::new(Snapshot { vmas }));
        if process.snapshots.len() > MAX_SNAPSHOTS {
            process.snapshots.pop_front();
        }
        Ok(())
    }

    /// The shared vDSO object when `entry` is a mapping of it.
    fn vdso(&mut self, entry: &procfs::MapsEntry) -> VmaKind {
        let symbolizer = self.symbolizer.as_ref();
        let vdso = self.vdso.get_or_insert_with(|| {
            ObjectFile::vdso(symbolizer)
                .map(|(object, len)| (Arc::new(object), len))
                .map_err(|e| e.to_string())
        });
        match vdso {
            // A 32-bit process maps another image, of another size.
            Ok((object, len)) if *len == entry.end - entry.start => {
                VmaKind::Object(Arc::clone(object))
            }
            Ok(_) => VmaKind::Vdso,
            Err(reason) => {
                tracing::debug!(reason, "vDSO image unavailable");
                VmaKind::Vdso
            }
        }
    }

    fn object(&mut self, pid: u32, entry: &procfs::MapsEntry, path: &str) -> VmaKind {
        let key = (entry.dev_major, entry.dev_minor, entry.inode);
        if let Some(object) = self.objects.get(&key).and_then(Weak::upgrade) {
            return VmaKind::Object(object);
        }
        match ObjectFile::open(
            pid,
            entry,
            path,
            &self.proc_root,
            self.symbolizer.as_ref(),
            self.debug_dirs.as_deref(),
        ) {
            Ok(object) => {
                self.stats.objects_opened += 1;
                let object = Arc::new(object);
                self.objects.insert(key, Arc::downgrade(&object));
                VmaKind::Object(object)
            }
            Err(e) => {
                self.stats.object_open_failures += 1;
                tracing::debug!(pid, path, error = %e, "cannot open mapped file");
                VmaKind::Unreadable {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }
            }
        }
    }

    /// Starts a symbolization round: each process may be re-read once per
    /// round when an address is in none of its known mappings.
    pub fn begin_round(&mut self) {
        self.round += 1;
    }

    /// Where `addr` is in process `pid`.
    pub fn resolve(&mut self, pid: u32, addr: u64) -> UserAddress {
        if !self.processes.contains_key(&pid) {
            // Its first-sample event may still be queued: read it now.
            if let Err(e) = self.observe(pid) {
                return UserAddress::Unknown(match e {
                    ProcessError::Gone { .. } => {
                        "process exited before its mappings were read".into()
                    }
                    other => other.to_string(),
                });
            }
        }
        if let Some(found) = self.find(pid, addr) {
            return match found {
                UserAddress::Anonymous => self.jit(pid, addr),
                found => found,
            };
        }
        // Not in any known mapping: maybe mapped since (dlopen, JIT).
        let round = self.round;
        let refresh = self
            .processes
            .get_mut(&pid)
            .is_some_and(|p| std::mem::replace(&mut p.refreshed_in_round, round) != round);
        if refresh
            && self.observe(pid).is_ok()
            && let Some(found) = self.find(pid, addr)
        {
            return found;
        }
        UserAddress::Unknown("address in no known mapping".into())
    }

    /// Names anonymous executable memory from the process's perf map, read
    /// again at most once per round when the file changed.
    fn jit(&mut self, pid: u32, addr: u64) -> UserAddress {
        let round = self.round;
        let Some(process) = self.processes.get_mut(&pid) else {
            return UserAddress::Anonymous;
        };
        let stale = process.perf_map.as_ref().is_none_or(|m| m.round != round);
        if stale && let Some(ns_pid) = process.ns_pid {
            let path = self
                .proc_root
                .join(pid.to_string())
                .join(format!("root/tmp/perf-{ns_pid}.map"));
            // Gone (the process exited, or never wrote one): keep what we have.
            if let Ok(meta) = fs::metadata(&path) {
                let version = (meta.len(), meta.modified().ok());
                if process
                    .perf_map
                    .as_ref()
                    .is_none_or(|m| m.version != version)
                {
                    match PerfMap::read(&path) {
                        Ok((map, stats)) => {
                            if stats.malformed > 0 {
                                tracing::debug!(pid, ?stats, "perf map has malformed lines");
                            }
                            process.perf_map = Some(PerfMapRead {
                                map,
                                version,
                                round,
                            });
                        }
                        Err(e) => tracing::debug!(pid, error = %e, "cannot read perf map"),
                    }
                }
            }
            if let Some(m) = process.perf_map.as_mut() {
                m.round = round;
            }
        }
        match process.perf_map.as_ref().and_then(|m| m.map.find(addr)) {
            Some(entry) => UserAddress::Jit(entry.name.to_owned()),
            None => UserAddress::Anonymous,
        }
    }

    fn find(&self, pid: u32, addr: u64) -> Option<UserAddress> {
        let process = self.processes.get(&pid)?;
        let vma = process.snapshots.iter().rev().find_map(|s| s.find(addr))?;
        Some(match &vma.kind {
            VmaKind::Object(object) => UserAddress::Object {
                object: Arc::clone(object),
                file_offset: addr - vma.start + vma.offset,
            },
            VmaKind::Unreadable { path, reason } => {
                UserAddress::Unknown(format!("{path}: {reason}"))
            }
            VmaKind::Vdso => UserAddress::Vdso,
            VmaKind::Anonymous => UserAddress::Anonymous,
            VmaKind::Pseudo(name) => UserAddress::Unknown(format!("in {name}")),
        })
    }

    /// Forgets processes found dead on two sweeps in a row (the first sweep
    /// after death may still have samples of theirs to symbolize), and files
    /// no remaining process maps.
    pub fn sweep(&mut self) {
        let proc_root = self.proc_root.clone();
        let before = self.processes.len();
        self.processes.retain(|pid, process| {
            let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok();
            let alive =
                stat.is_some_and(|s| procfs::parse_stat_start_time(&s) == process.start_time);
            if alive {
                process.dead_sweeps = 0;
                return true;
            }
            process.dead_sweeps += 1;
            process.dead_sweeps < 2
        });
        self.stats.processes_evicted += (before - self.processes.len()) as u64;
        self.objects.retain(|_, o| o.strong_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdso_addresses_symbolize_like_nm_on_the_image() {
        let service =
            SymbolizerService::spawn(fathom_symbolizer::SymbolizerConfig::default()).unwrap();
        let mut table = ProcessTable::default().with_symbolizer(service.clone(), &[]);
        let pid = std::process::id();
        table.observe(pid).unwrap();
        // The oracle: nm on a copy of the image this process maps.
        let maps = procfs::parse_maps(&fs::read_to_string("/proc/self/maps").unwrap()).unwrap();
        let vdso = maps.iter().find(|e| e.path == MapsPath::Vdso).unwrap();
        let mut image = vec![0u8; (vdso.end - vdso.start) as usize];
        File::open("/proc/self/mem")
            .unwrap()
            .read_exact_at(&mut image, vdso.start)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("vdso.so");
        fs::write(&copy, &image).unwrap();
        let nm = std::process::Command::new("nm")
            .arg("-D")
            .arg(&copy)
            .output()
            .unwrap();
        let nm = String::from_utf8(nm.stdout).unwrap();
        let names_at = |vaddr: u64| -> Vec<&str> {
            nm.lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let a = u64::from_str_radix(f.next()?, 16).ok()?;
                    let name = f.nth(1)?;
                    (a == vaddr).then(|| name.split('@').next().unwrap_or(name))
                })
                .collect()
        };
        let gettime = nm
            .lines()
            .find(|l| l.ends_with(" __vdso_clock_gettime") || l.contains(" __vdso_clock_gettime@"))
            .expect("__vdso_clock_gettime in the vDSO");
        let vaddr = u64::from_str_radix(gettime.split(' ').next().unwrap(), 16).unwrap();
        let UserAddress::Object {
            object,
            file_offset,
        } = table.resolve(pid, vdso.start + vaddr + 1)
        else {
            panic!("vDSO address not placed in the vDSO object");
        };
        assert_eq!(object.path, "[vdso]");
        let layout = object.layout.as_ref().unwrap();
        assert_eq!(layout.file_offset_to_vaddr(file_offset), Some(vaddr + 1));
        let response = service
            .symbolize(fathom_symbolizer::Request {
                kernel: Vec::new(),
                objects: vec![fathom_symbolizer::ObjectRequest {
                    key: object.key.clone(),
                    path: object.read_path.clone(),
                    addressing: fathom_symbolizer::Addressing::FileOffset,
                    addrs: vec![file_offset],
                }],
            })
            .unwrap();
        let fathom_symbolizer::Symbol::Known(frames) = &*response.objects[0][0] else {
            panic!("{response:?}");
        };
        let ours = frames.last().unwrap().function.as_str();
        assert!(
            names_at(vaddr).contains(&ours),
            "{ours} not in {:?}",
            names_at(vaddr)
        );
    }

    #[test]
    fn observes_this_process_and_resolves_own_code() {
        let mut table = ProcessTable::default();
        let pid = std::process::id();
        table.observe(pid).unwrap();
        let addr = observes_this_process_and_resolves_own_code as *const () as u64;
        let UserAddress::Object {
            object,
            file_offset,
        } = table.resolve(pid, addr)
        else {
            panic!("own code not resolved");
        };
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            fs::canonicalize(&object.path).unwrap(),
            fs::canonicalize(exe).unwrap()
        );
        let layout = object.layout.as_ref().unwrap();
        assert!(layout.file_offset_to_vaddr(file_offset).is_some());
        // A second observation of unchanged mappings adds no snapshot.
        table.observe(pid).unwrap();
        assert_eq!(table.process(pid).unwrap().snapshots.len(), 1);
        assert_eq!(table.stats().processes_observed, 1);
    }

    #[test]
    fn unknown_process_and_address_are_values() {
        let mut table = ProcessTable::default();
        // Pid max is at most 2^22: this pid cannot exist.
        assert!(matches!(
            table.resolve(0x7fff_fff0, 0x1000),
            UserAddress::Unknown(_)
        ));
        assert_eq!(table.stats().processes_missed, 1);
        let pid = std::process::id();
        assert!(matches!(table.resolve(pid, 0x10), UserAddress::Unknown(_)));
    }

    #[test]
    fn exited_process_still_resolves_then_is_swept() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until the child has exec'd, its mappings are the test binary's;
        // exec switches /proc/PID/exe before it maps the new segments.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| {
            m.lines()
                .any(|l| l.contains(" r-xp ") && l.ends_with("/sleep"))
        }) {
            assert!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut table = ProcessTable::default();
        table.observe(pid).unwrap();
        let (start, path) = {
            let snapshot = table.process(pid).unwrap().snapshots.back().unwrap();
            let vma = snapshot
                .vmas
                .iter()
                .find(|v| matches!(&v.kind, VmaKind::Object(o) if o.path.ends_with("/sleep")))
                .unwrap();
            (vma.start, vma.kind.clone())
        };
        child.kill().unwrap();
        child.wait().unwrap();
        // Dead, but its mappings and open file remain.
        let UserAddress::Object { object, .. } = table.resolve(pid, start + 0x10) else {
            panic!("exited process lost its mappings");
        };
        assert!(matches!(path, VmaKind::Object(_)));
        assert!(fs::metadata(&object.read_path).is_ok());
        table.sweep();
        assert!(table.process(pid).is_some(), "kept one sweep after death");
        table.sweep();
        assert!(table.process(pid).is_none());
        assert_eq!(table.stats().processes_evicted, 1);
    }
}
