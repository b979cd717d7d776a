//! A running profiler with everything around it: the process watcher, the
//! stack resolver, and the two ways of running — one profile, or one profile
//! per process per interval into a directory.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use fathom_common::{
    profiler::{ProcessEvent, SampleKey},
    python::PyProcess,
};
use fathom_symbolizer::{SymbolizerConfig, SymbolizerService};
use pprof::protos::Profile;

use super::{
    capture::{KernelCounters, Profiler, ProfilerConfig, ProfilerError, Window},
    pprof::{self as pp, CpuProfileMeta, LabelValue, ProfileBuilder, ProfileKind},
    process::{ProcessTable, Snapshot},
    stacks::{ResolvedSample, StackResolver},
    unwind::{
        loader::{Unwinder, UnwinderConfig, UnwinderStats},
        stats::UnwindStats,
    },
};
use crate::{process_meta::ProcessMeta, stop::Stop, sys};

/// Samples of several drain windows added together. Stack hashes depend only
/// on the stack, so they stay valid across windows.
#[derive(Debug, Default)]
pub struct Collected {
    pub samples: HashMap<SampleKey, u64>,
    /// Off-CPU nanoseconds per key (their stacks: [`Session`]'s off-CPU
    /// stacks).
    pub off_cpu: HashMap<SampleKey, u64>,
    pub stacks: HashMap<u64, Vec<u64>>,
    /// Samples the kernel recorded / that were read back.
    pub recorded: u64,
    pub counted: u64,
    pub windows: u32,
    /// Windows read after a timeout waiting for a CPU's acknowledgement.
    pub unsynced_windows: u32,
}

impl Collected {
    pub fn add(&mut self, window: Window) {
        self.recorded += window.recorded;
        self.counted += window.counted();
        self.windows += 1;
        self.unsynced_windows += u32::from(!window.synced);
        for (key, n) in window.samples {
            *self.samples.entry(key).or_default() += n;
        }
        self.stacks.extend(window.stacks);
        for (key, ns) in window.off_cpu {
            *self.off_cpu.entry(key).or_default() += ns;
        }
    }

    pub fn sample_list(&self) -> Vec<(SampleKey, u64)> {
        sorted(&self.samples)
    }

    pub fn off_cpu_list(&self) -> Vec<(SampleKey, u64)> {
        sorted(&self.off_cpu)
    }

    /// Off-CPU nanoseconds in total.
    pub fn off_cpu_ns(&self) -> u64 {
        self.off_cpu.values().sum()
    }
}

fn sorted(map: &HashMap<SampleKey, u64>) -> Vec<(SampleKey, u64)> {
    let mut list: Vec<_> = map.iter().map(|(k, n)| (*k, *n)).collect();
    list.sort_by_key(|(k, _)| (k.pid, k.tid));
    list
}

/// Off-CPU stacks kept across windows (a thread's stacks are stored when it
/// leaves the CPU, its time counted when it comes back, maybe windows
/// later). Beyond this many the oldest go: a thread away that long shows
/// `[lost stack]`.
const OFF_CPU_STACKS_KEPT: usize = 1 << 16;

/// Stacks by hash, leaf first.
type StackMap = HashMap<u64, Vec<u64>>;

/// Content-addressed stacks, the older half dropped when full.
#[derive(Debug, Default)]
struct StackCache {
    current: HashMap<u64, Vec<u64>>,
    previous: HashMap<u64, Vec<u64>>,
}

impl StackCache {
    fn extend(&mut self, stacks: HashMap<u64, Vec<u64>>) {
        for (hash, ips) in stacks {
            if self.current.len() >= OFF_CPU_STACKS_KEPT / 2 {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(hash, ips);
        }
    }

    /// The stacks `samples` refer to.
    fn for_samples(&self, samples: &[(SampleKey, u64)]) -> HashMap<u64, Vec<u64>> {
        let mut out = HashMap::new();
        for (key, _) in samples {
            for hash in [key.user_stack, key.kernel_stack, key.python_stack] {
                if let Some(ips) = self.current.get(&hash).or_else(|| self.previous.get(&hash)) {
                    out.insert(hash, ips.clone());
                }
            }
        }
        out
    }
}

/// Reads process events from the kernel and records processes while they run.
struct ProcessWatcher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    /// Loads unwind tables of the processes the watcher records.
    loader: Option<JoinHandle<()>>,
}

/// Processes waiting for their unwind tables; beyond it they stay with the
/// kernel's frame-pointer walk until their next announcement, counted.
const UNWIND_QUEUE: usize = 4096;

impl ProcessWatcher {
    fn spawn(
        mut events: RingBuf<MapData>,
        table: Arc<Mutex<ProcessTable>>,
        unwinder: Option<Arc<Mutex<Unwinder>>>,
        python: Option<PythonMap>,
        unwind_queue_full: Arc<AtomicU64>,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // Tables are built on their own thread: building one takes long
        // enough that short-lived processes would exit before the watcher
        // read their mappings.
        let (loads, loader) = match unwinder {
            Some(unwinder) => {
                let (tx, rx) = std::sync::mpsc::sync_channel::<(u32, Arc<Snapshot>)>(UNWIND_QUEUE);
                let stopping = Arc::clone(&stop);
                let handle = std::thread::Builder::new()
                    .name("fathom-unwind".into())
                    .spawn(move || {
                        while let Ok((pid, snapshot)) = rx.recv() {
                            if stopping.load(Ordering::Relaxed) {
                                break;
                            }
                            unwinder
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .load(pid, snapshot.vmas());
                        }
                    })?;
                (Some(tx), Some(handle))
            }
            None => (None, None),
        };
        let handle = std::thread::Builder::new()
            .name("fathom-processes".into())
            .spawn(move || {
                loop {
                    let stopping = flag.load(Ordering::Relaxed);
                    while let Some(item) = events.next() {
                        let Some(event) = parse_event(&item) else {
                            tracing::warn!(len = item.len(), "malformed process event");
                            continue;
                        };
                        let snapshot = observe(&table, event.pid);
                        tell_python(&table, python.as_ref(), event.pid);
                        if let (Some(loads), Some(snapshot)) = (&loads, snapshot)
                            && loads.try_send((event.pid, snapshot)).is_err()
                        {
                            unwind_queue_full.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if stopping {
                        break;
                    }
                    let fd = std::os::fd::AsFd::as_fd(&events);
                    if let Err(e) = sys::poll_readable(fd, Duration::from_millis(100)) {
                        tracing::error!(error = %e, "polling process events");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                // Dropping `loads` ends the loader thread.
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
            loader,
        })
    }
}

impl Drop for ProcessWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        if let Some(handle) = self.loader.take() {
            let _ = handle.join();
        }
    }
}

/// Records a process's mappings now; returns them.
fn observe(table: &Mutex<ProcessTable>, pid: u32) -> Option<Arc<Snapshot>> {
    let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
    match table.observe(pid) {
        Ok(()) => table.latest(pid),
        Err(e) => {
            tracing::debug!(pid, error = %e, "process not recorded");
            None
        }
    }
}

/// The kernel's map of Python processes.
type PythonMap = Arc<Mutex<aya::maps::HashMap<MapData, u32, PyProcess>>>;

/// Tells the kernel whether (and how) to walk a process's Python frames,
/// as the process table last found it.
fn tell_python(table: &Mutex<ProcessTable>, map: Option<&PythonMap>, pid: u32) {
    let Some(map) = map else {
        return;
    };
    let python = table
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .process(pid)
        .and_then(|p| p.python.as_ref().map(|p| p.kernel));
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    match python {
        Some(value) => {
            if let Err(e) = map.insert(pid, value, 0) {
                tracing::warn!(pid, error = %e, "Python process not walked");
            }
        }
        None => {
            let _ = map.remove(&pid);
        }
    }
}

fn parse_event(bytes: &[u8]) -> Option<ProcessEvent> {
    let event: ProcessEvent = fathom_common::record::read(bytes)?;
    (event.kind == ProcessEvent::NEW).then_some(event)
}

/// Errors of a profiling session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Profiler(#[from] ProfilerError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("starting the process watcher: {0}")]
    Thread(io::Error),
    #[error(transparent)]
    Symbolizer(#[from] fathom_symbolizer::ServiceError),
    #[error(transparent)]
    Unwinder(#[from] crate::profiles::unwind::loader::UnwinderError),
}

/// The profiler and everything it needs, on the calling thread.
pub struct Session {
    // Field order is drop order: stop the watcher before detaching.
    _watcher: ProcessWatcher,
    profiler: Profiler,
    unwinder: Option<Arc<Mutex<Unwinder>>>,
    /// Without tables the unwinder's maps stay empty, but the programs
    /// refer to them.
    _unused_maps: Option<crate::profiles::capture::UnwindMaps>,
    /// Processes whose tables were not loaded: the loader's queue was full.
    unwind_queue_full: Arc<AtomicU64>,
    unwind_stats: UnwindStats,
    table: Arc<Mutex<ProcessTable>>,
    resolver: StackResolver,
    config: ProfilerConfig,
    /// Daemon profiles that could not be delivered.
    write_failures: u64,
    off_cpu_stacks: StackCache,
    /// The kernel's map of Python processes, when their walk loaded.
    python: Option<PythonMap>,
}

/// Everything a profiling session is configured with.
#[derive(Clone, Debug, Default)]
pub struct ProfilesConfig {
    pub profiler: ProfilerConfig,
    pub unwinder: UnwinderConfig,
    pub symbolizer: SymbolizerConfig,
}

impl From<&crate::config::SamplingConfig> for ProfilesConfig {
    fn from(s: &crate::config::SamplingConfig) -> Self {
        Self {
            profiler: ProfilerConfig {
                frequency_hz: s.frequency_hz,
                pids: s.pids.clone(),
                unwind: crate::profiles::capture::UnwindMapSizes {
                    rows: s.unwind_table_rows,
                    ..Default::default()
                },
                unwind_tables: s.unwind == crate::config::UnwindChoice::Tables,
                off_cpu: s.off_cpu,
                off_cpu_max_stacks: s.off_cpu_max_stacks,
                ..ProfilerConfig::default()
            },
            unwinder: UnwinderConfig {
                cache_dir: s.unwind_cache_dir.clone(),
                ..UnwinderConfig::default()
            },
            symbolizer: s.symbolizer.clone(),
        }
    }
}

impl Session {
    pub fn start(profiles: &ProfilesConfig) -> Result<Self, SessionError> {
        let config = profiles.profiler.clone();
        let symbolizer = &profiles.symbolizer;
        match sys::raise_nofile_limit() {
            Ok(limit) => tracing::debug!(limit, "open-file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
        let (mut profiler, events, mut unwind_maps) = Profiler::start(&config)?;
        let python = unwind_maps
            .python
            .take()
            .map(|map| Arc::new(Mutex::new(map)));
        let tables = *profiler.unwind_mode() == crate::profiles::capture::UnwindMode::Tables;
        let (unwinder, unused_maps) = if tables {
            let unwinder = Unwinder::new(unwind_maps, &profiles.unwinder)?;
            (Some(Arc::new(Mutex::new(unwinder))), None)
        } else {
            (None, Some(unwind_maps))
        };
        let service = SymbolizerService::spawn(symbolizer.clone())?;
        let table = Arc::new(Mutex::new(
            ProcessTable::default().with_symbolizer(service.clone(), &symbolizer.debug_dirs),
        ));
        // Processes named up front get their tables before the first sample
        // (others when their first sample announces them).
        for &pid in &config.pids {
            let snapshot = observe(&table, pid);
            tell_python(&table, python.as_ref(), pid);
            if let (Some(unwinder), Some(snapshot)) = (&unwinder, snapshot) {
                unwinder
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .load(pid, snapshot.vmas());
            }
        }
        let unwind_queue_full = Arc::new(AtomicU64::new(0));
        let watcher = ProcessWatcher::spawn(
            events,
            Arc::clone(&table),
            unwinder.clone(),
            python.clone(),
            Arc::clone(&unwind_queue_full),
        )
        .map_err(SessionError::Thread)?;
        profiler.sample()?;
        Ok(Self {
            _watcher: watcher,
            profiler,
            unwinder,
            _unused_maps: unused_maps,
            unwind_queue_full,
            unwind_stats: UnwindStats::default(),
            table,
            resolver: StackResolver::new(service),
            config,
            write_failures: 0,
            off_cpu_stacks: StackCache::default(),
            python,
        })
    }

    pub fn drain(&mut self) -> Result<Window, SessionError> {
        let window = self.profiler.drain()?;
        // Busy loading a table: the next drain frees what this one would.
        if let Some(unwinder) = &self.unwinder
            && let Ok(mut unwinder) = unwinder.try_lock()
        {
            unwinder.after_drain();
        }
        Ok(window)
    }

    /// The unwinder's counters, when tables are used.
    pub fn unwinder_stats(&self) -> Option<UnwinderStats> {
        let unwinder = self.unwinder.as_ref()?;
        Some(unwinder.lock().unwrap_or_else(|e| e.into_inner()).stats())
    }

    pub fn counters(&self) -> Result<KernelCounters, SessionError> {
        Ok(self.profiler.counters()?)
    }

    pub fn resolve(
        &mut self,
        samples: &[(SampleKey, u64)],
        stacks: &HashMap<u64, Vec<u64>>,
    ) -> Vec<ResolvedSample> {
        self.resolver.resolve(samples, stacks, &self.table)
    }

    /// Forgets processes that are gone (after their last samples).
    pub fn sweep(&mut self) {
        let alive: std::collections::HashSet<u32> = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            table.sweep();
            table.pids().collect()
        };
        self.resolver.retain_python(|pid| alive.contains(&pid));
        if let Some(python) = &self.python {
            let mut map = python.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<u32> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|pid| !alive.contains(pid))
                .collect();
            for pid in gone {
                let _ = map.remove(&pid);
            }
        }
        if let Some(unwinder) = &self.unwinder {
            unwinder
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|pid| alive.contains(&pid));
        }
    }

    /// Counts how each sample's user stack was walked, per executable.
    fn count_unwinds(&mut self, samples: &[(SampleKey, u64)]) {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for (key, n) in samples {
            let name = table.process(key.pid).and_then(|p| p.exe.as_deref());
            let name = match name {
                Some(exe) => exe.rsplit('/').next().unwrap_or(exe).to_owned(),
                None => crate::profiles::stacks::comm(&key.comm),
            };
            self.unwind_stats.add(&name, key.user_unwind, *n);
        }
    }

    /// How user stacks were walked since start, per executable.
    /// How user stacks are walked, as loaded.
    pub fn unwind_mode(&self) -> &crate::profiles::capture::UnwindMode {
        self.profiler.unwind_mode()
    }

    pub fn unwind_stats(&self) -> &UnwindStats {
        &self.unwind_stats
    }

    /// Samples for `duration` (or until stopped), draining the kernel's maps
    /// every `drain_every` of the configuration, and returns everything
    /// collected.
    pub fn collect(&mut self, duration: Duration, stop: &Stop) -> Result<Collected, SessionError> {
        let end = Instant::now() + duration;
        let mut collected = Collected::default();
        loop {
            let now = Instant::now();
            let next = (now + self.config.drain_every).min(end);
            let stopped = stop.wait(next.saturating_duration_since(now));
            let mut window = self.drain()?;
            self.count_unwinds(&window.samples);
            self.off_cpu_stacks
                .extend(std::mem::take(&mut window.off_cpu_stacks));
            collected.add(window);
            if stopped || Instant::now() >= end {
                break;
            }
        }
        Ok(collected)
    }

    /// Off-CPU profiling, as loaded.
    pub fn off_cpu_mode(&self) -> &crate::profiles::capture::OffCpuMode {
        self.profiler.off_cpu_mode()
    }

    /// The samples of `kind` and the stacks they refer to.
    fn samples_of(
        &self,
        collected: &Collected,
        kind: ProfileKind,
    ) -> (Vec<(SampleKey, u64)>, Option<StackMap>) {
        match kind {
            ProfileKind::Cpu => (collected.sample_list(), None),
            ProfileKind::OffCpu => {
                let list = collected.off_cpu_list();
                let stacks = self.off_cpu_stacks.for_samples(&list);
                (list, Some(stacks))
            }
        }
    }

    /// One profile of everything collected.
    pub fn profile(
        &mut self,
        collected: &Collected,
        meta: CpuProfileMeta,
    ) -> Result<Profile, SessionError> {
        self.profile_of(collected, meta, ProfileKind::Cpu)
    }

    /// One profile of `kind` of everything collected.
    pub fn profile_of(
        &mut self,
        collected: &Collected,
        meta: CpuProfileMeta,
        kind: ProfileKind,
    ) -> Result<Profile, SessionError> {
        let (list, stacks) = self.samples_of(collected, kind);
        let resolved = self.resolve(&list, stacks.as_ref().unwrap_or(&collected.stacks));
        let mut builder = ProfileBuilder::of_kind(meta, kind);
        // Profiling one process: its executable is the profile's main binary.
        if let [pid] = self.config.pids[..] {
            let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(exe) = table.process(pid).and_then(|p| p.exe.clone()) {
                builder.set_main_binary(&exe);
            }
        }
        for sample in &resolved {
            add_sample(&mut builder, sample);
        }
        let samples = match kind {
            ProfileKind::Cpu => format!(
                "samples recorded={} read={} unwinding: {}",
                collected.recorded,
                collected.counted,
                self.unwind_stats.summary(5)
            ),
            ProfileKind::OffCpu => format!(
                "off-CPU: {} intervals' keys, {} ns",
                collected.off_cpu.len(),
                collected.off_cpu_ns()
            ),
        };
        add_comments(&mut builder, &samples, &self.loss_summary()?);
        Ok(builder.build())
    }

    /// What was lost since start, in the kernel and in user space.
    pub fn loss_summary(&self) -> Result<String, SessionError> {
        let kernel = self.counters()?.lost_summary();
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner()).stats();
        let resolve = self.resolver.stats();
        Ok(format!(
            "{kernel} processes-missed={} unreadable-files={} unknown-frames={} lost-stacks={} \
             profiles-not-delivered={}",
            table.processes_missed,
            table.object_open_failures,
            resolve.unknown_frames,
            resolve.lost_stacks,
            self.write_failures
        ))
    }

    /// Runs until stopped: every `interval`, one profile per process goes to
    /// `sink` (files in a directory, or a collector).
    pub fn run_daemon(
        &mut self,
        interval: Duration,
        sink: &mut dyn ProfileSink,
        stop: &Stop,
    ) -> Result<(), SessionError> {
        let frequency_hz = self.config.frequency_hz;
        let meta = |start: SystemTime| CpuProfileMeta {
            frequency_hz,
            start,
            duration: SystemTime::now().duration_since(start).unwrap_or_default(),
        };
        let mut window_start = SystemTime::now();
        loop {
            // The kernel's maps are drained more often than profiles leave
            // (they are sized for `drain_every`).
            let window = self.collect(interval, stop)?;
            let stopped = stop.is_triggered();
            let meta = meta(window_start);
            window_start = SystemTime::now();
            let profiles = self.per_process(&window, meta)?;
            let built = profiles.len();
            let delivered = sink.deliver(meta.start, profiles);
            self.write_failures = sink.failures();
            let processes = self.table.lock().unwrap_or_else(|e| e.into_inner()).len();
            let symbols = self.resolver.symbolizer_stats();
            sink.self_metrics(&self.unwind_stats);
            let tables = self.unwinder_stats().unwrap_or_default();
            tracing::info!(
                unwind = %self.unwind_stats.summary(5),
                unwind_tables = tables.tables,
                unwind_rows_used = tables.rows_used,
                unwind_rows_capacity = tables.rows_capacity,
                unwind_processes = tables.processes,
                unwind_tables_failed = tables.tables_failed,
                unwind_tables_too_big = tables.tables_too_big,
                unwind_queue_full = self.unwind_queue_full.load(Ordering::Relaxed),
                "unwinding"
            );
            tracing::info!(
                symbol_cache_hits = symbols.hits,
                symbol_cache_misses = symbols.misses,
                symbol_cache_kib = symbols.cache_bytes / 1024,
                symbol_objects = symbols.objects_live,
                symbol_unknown = ?symbols.unknown,
                samples = window.counted,
                profiles = built,
                delivered,
                processes,
                lost = %self.loss_summary()?,
                "window done"
            );
            self.sweep();
            if stopped {
                return Ok(());
            }
        }
    }

    /// One profile per process of a drained window: CPU, and off-CPU when
    /// it is on.
    pub fn per_process(
        &mut self,
        window: &Collected,
        meta: CpuProfileMeta,
    ) -> Result<Vec<ProcessProfile>, SessionError> {
        let mut out = self.per_process_of(window, meta, ProfileKind::Cpu)?;
        if !window.off_cpu.is_empty() {
            out.extend(self.per_process_of(window, meta, ProfileKind::OffCpu)?);
        }
        Ok(out)
    }

    fn per_process_of(
        &mut self,
        window: &Collected,
        meta: CpuProfileMeta,
        kind: ProfileKind,
    ) -> Result<Vec<ProcessProfile>, SessionError> {
        let (list, stacks) = self.samples_of(window, kind);
        let resolved = self.resolve(&list, stacks.as_ref().unwrap_or(&window.stacks));
        let mut by_pid: BTreeMap<u32, Vec<&ResolvedSample>> = BTreeMap::new();
        for sample in &resolved {
            by_pid.entry(sample.pid).or_default().push(sample);
        }
        if by_pid.is_empty() {
            return Ok(Vec::new());
        }
        // Once per window, not once per process: the losses read kernel
        // counters, and the names need the table.
        let losses = self.loss_summary()?;
        type Names = (String, Option<String>, Option<ProcessMeta>);
        let names: HashMap<u32, Names> = {
            let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            by_pid
                .iter()
                .map(|(pid, samples)| {
                    let process = table.process(*pid);
                    let comm = process.map_or_else(|| samples[0].comm.clone(), |p| p.comm.clone());
                    let exe = process.and_then(|p| p.exe.clone());
                    (*pid, (comm, exe, process.and_then(|p| p.meta.clone())))
                })
                .collect()
        };
        let mut out = Vec::with_capacity(by_pid.len());
        for (pid, samples) in &by_pid {
            let mut builder = ProfileBuilder::of_kind(meta, kind);
            for sample in samples {
                add_sample(&mut builder, sample);
            }
            let count: u64 = samples.iter().map(|s| s.count).sum();
            let line = match kind {
                ProfileKind::Cpu => format!(
                    "samples of this process={count}; window: recorded={} read={}",
                    window.recorded, window.counted
                ),
                ProfileKind::OffCpu => {
                    format!(
                        "off-CPU ns of this process={count}; window: {}",
                        window.off_cpu_ns()
                    )
                }
            };
            add_comments(&mut builder, &line, &losses);
            let (comm, exe, meta) = names[pid].clone();
            if let Some(exe) = &exe {
                builder.set_main_binary(exe);
            }
            out.push(ProcessProfile {
                pid: *pid,
                comm,
                exe,
                samples: count,
                profile: builder.build(),
                meta,
                kind,
            });
        }
        Ok(out)
    }
}

/// One process's profile of one window.
#[derive(Debug, Clone)]
pub struct ProcessProfile {
    pub pid: u32,
    pub comm: String,
    /// Path of the executable, when known.
    pub exe: Option<String>,
    pub samples: u64,
    pub profile: Profile,
    /// Its resource (service name, container id; the pod through
    /// [`ProcessMeta::pod`]), when the process was observed.
    pub meta: Option<ProcessMeta>,
    /// What the profile measures (its series' `__name__`).
    pub kind: ProfileKind,
}

impl ProcessProfile {
    /// The service this process belongs to: its executable's name, else its
    /// command name (kernel threads `kworker/1:2` → `kworker`).
    pub fn service_name(&self) -> String {
        crate::process_meta::executable_name(self.exe.as_deref(), &self.comm)
    }

    /// The labels of its series besides `__name__`, Pyroscope spelling
    /// (`service_name`, `node`, and `container_id`, `namespace`, `pod`,
    /// `container`, `k8s_<kind>_name` when known; see
    /// [`ProcessMeta::pyroscope_labels`]). Without metadata: the executable
    /// name and `node`.
    pub fn labels(&self, node: &str) -> Vec<(String, String)> {
        match &self.meta {
            Some(meta) => meta.pyroscope_labels(node),
            None => vec![
                ("service_name".into(), self.service_name()),
                ("node".into(), node.to_string()),
            ],
        }
    }
}

/// Where the daemon's per-window profiles go.
pub trait ProfileSink {
    /// Delivers one window's profiles; returns how many were delivered.
    fn deliver(&mut self, window_start: SystemTime, profiles: Vec<ProcessProfile>) -> usize;
    /// Profiles not delivered since start.
    fn failures(&self) -> u64;
    /// The agent's own counters, once per window, where the sink has a
    /// place for metrics (the embedded collector); the others keep profiles
    /// only, and the counters are in the logs.
    fn self_metrics(&mut self, _unwind: &UnwindStats) {}
}

/// One gzipped pprof file per process per window in a directory, with
/// retention.
pub struct DirSink {
    dir: PathBuf,
    retention: Retention,
    failures: u64,
}

impl DirSink {
    pub fn new(dir: &Path, retention: Duration) -> Result<Self, SessionError> {
        fs::create_dir_all(dir).map_err(|source| SessionError::Io {
            what: "creating",
            path: dir.into(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            retention: Retention::scan(dir, retention),
            failures: 0,
        })
    }
}

impl ProfileSink for DirSink {
    fn deliver(&mut self, window_start: SystemTime, profiles: Vec<ProcessProfile>) -> usize {
        let dir = &self.dir;
        if let Err(e) = fs::create_dir_all(dir) {
            self.failures += profiles.len() as u64;
            tracing::warn!(dir = %dir.display(), error = %e, "no output directory: profiles not written");
            return 0;
        }
        let stamp = file_stamp(window_start);
        let mut written = 0;
        for p in profiles {
            // Off-CPU profiles beside the CPU ones: `..._off_cpu.pb.gz`.
            let suffix = match p.kind {
                ProfileKind::Cpu => "",
                ProfileKind::OffCpu => "_off_cpu",
            };
            let path = dir.join(format!(
                "{stamp}_{}_{}{suffix}.pb.gz",
                sanitize(&p.comm),
                p.pid
            ));
            // A full or failing disk costs this profile, not the daemon.
            match write_atomically(&path, &pp::encode_gzip(&p.profile)) {
                Ok(()) => {
                    written += 1;
                    self.retention.track(path, SystemTime::now());
                }
                Err(e) => {
                    self.failures += 1;
                    tracing::warn!(error = %e, failures = self.failures, "profile not written");
                }
            }
        }
        self.retention.expire(SystemTime::now());
        written
    }

    fn failures(&self) -> u64 {
        self.failures
    }
}

fn add_comments(builder: &mut ProfileBuilder, samples: &str, losses: &str) {
    builder.add_comment(&format!("fathom-agent {}", env!("CARGO_PKG_VERSION")));
    builder.add_comment(&format!("{samples}; since start: {losses}"));
}

/// A sample with its labels: `pid`, `tid`, `comm`, and `span_id` and
/// `trace_id` (lower-case hex, Pyroscope's span-profile convention) while
/// the thread served a span.
fn add_sample(builder: &mut ProfileBuilder, sample: &ResolvedSample) {
    let mut labels = vec![
        ("pid", LabelValue::Num(i64::from(sample.pid))),
        ("tid", LabelValue::Num(i64::from(sample.tid))),
        ("comm", LabelValue::Str(sample.comm.clone())),
    ];
    if let Some((trace_id, span_id)) = &sample.span {
        labels.push(("span_id", LabelValue::Str(hex(span_id))));
        labels.push(("trace_id", LabelValue::Str(hex(trace_id))));
    }
    builder.add_sample(&sample.stack, sample.count, &labels);
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Writes through a temporary file and a rename, so readers never see half;
/// on failure the temporary file is removed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SessionError> {
    let io = |what, source| SessionError::Io {
        what,
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let result = fs::File::create(&tmp)
        .map_err(|e| io("creating", e))
        .and_then(|mut file| {
            file.write_all(bytes).map_err(|e| io("writing", e))?;
            file.sync_all().map_err(|e| io("syncing", e))
        })
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| io("renaming", e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `20261122T101500Z` for a time.
fn file_stamp(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .replace(['-', ':'], "")
}

fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "unknown".into() } else { s }
}

/// Deletes our profile files once they are older than the retention. The
/// directory is scanned once, at start; after that the files this run
/// writes are tracked in order, so no window pays for a directory scan.
#[derive(Debug)]
struct Retention {
    max_age: Duration,
    files: VecDeque<(SystemTime, PathBuf)>,
}

impl Retention {
    fn scan(dir: &Path, max_age: Duration) -> Self {
        let mut files: Vec<(SystemTime, PathBuf)> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| is_profile_file(&e.file_name().to_string_lossy()))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        files.sort();
        Self {
            max_age,
            files: files.into(),
        }
    }

    fn track(&mut self, path: PathBuf, written: SystemTime) {
        self.files.push_back((written, path));
    }

    fn expire(&mut self, now: SystemTime) {
        while let Some((written, _)) = self.files.front() {
            if now.duration_since(*written).unwrap_or_default() <= self.max_age {
                break;
            }
            if let Some((_, path)) = self.files.pop_front()
                && let Err(e) = fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "removing an old profile");
            }
        }
    }
}

/// Names this agent gives its profiles: `<stamp>_<comm>_<pid>.pb.gz`.
fn is_profile_file(name: &str) -> bool {
    name.ends_with(".pb.gz") && name.starts_with(|c: char| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collected_adds_windows() {
        let key = |tid| SampleKey {
            pid: 1,
            tid,
            user_stack: 16,
            kernel_stack: 0,
            comm: [0; 16],
            user_unwind: 0,
            _reserved: 0,
            trace_id: [0; 16],
            span_id: [0; 8],
            python_stack: fathom_common::profiler::stack_id::EMPTY,
        };
        let mut c = Collected::default();
        let stacks: HashMap<u64, Vec<u64>> = [(16, vec![1, 2])].into();
        c.add(Window {
            samples: vec![(key(1), 2), (key(2), 1)],
            stacks: stacks.clone(),
            recorded: 3,
            synced: true,
            off_cpu: vec![(key(1), 4_000_000)],
            ..Window::default()
        });
        c.add(Window {
            samples: vec![(key(1), 5)],
            stacks,
            recorded: 5,
            synced: false,
            off_cpu: vec![(key(1), 1_000_000), (key(2), 2_000_000)],
            ..Window::default()
        });
        assert_eq!(c.samples[&key(1)], 7);
        assert_eq!(c.off_cpu[&key(1)], 5_000_000);
        assert_eq!(c.off_cpu_ns(), 7_000_000);
        assert_eq!(
            (c.recorded, c.counted, c.windows, c.unsynced_windows),
            (8, 8, 2, 1)
        );
        assert_eq!(c.sample_list().len(), 2);
    }

    #[test]
    fn events_parse_strictly() {
        let mut bytes = ProcessEvent::NEW.to_ne_bytes().to_vec();
        bytes.extend(42u32.to_ne_bytes());
        assert_eq!(
            parse_event(&bytes),
            Some(ProcessEvent {
                kind: ProcessEvent::NEW,
                pid: 42
            })
        );
        assert_eq!(parse_event(&bytes[..7]), None);
        bytes[0] = 9;
        assert_eq!(parse_event(&bytes), None);
    }

    #[test]
    fn names_and_stamps() {
        assert_eq!(sanitize("my prog/1"), "my_prog_1");
        assert_eq!(sanitize(""), "unknown");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(file_stamp(t), "20261118T110640Z");
    }

    #[test]
    fn failed_atomic_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("a.pb.gz");
        write_atomically(&good, b"data").unwrap();
        assert_eq!(fs::read(&good).unwrap(), b"data");
        // Renaming onto a non-empty directory fails after the temporary
        // file was written.
        let target = dir.path().join("b.pb.gz");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"x").unwrap();
        assert!(write_atomically(&target, b"data").is_err());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn retention_removes_only_old_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("20200101T000000Z_x_1.pb.gz");
        let other = dir.path().join("notes.pb.gz");
        fs::write(&old, b"x").unwrap();
        fs::write(&other, b"x").unwrap();
        let mut retention = Retention::scan(dir.path(), Duration::from_secs(60));
        assert_eq!(retention.files.len(), 1, "only our own files are tracked");
        let new = dir.path().join("20300101T000000Z_x_1.pb.gz");
        fs::write(&new, b"x").unwrap();
        let now = SystemTime::now();
        retention.track(new.clone(), now);
        retention.expire(now + Duration::from_secs(30));
        assert!(old.exists() && new.exists());
        retention.expire(now + Duration::from_secs(61));
        assert!(!old.exists() && !new.exists());
        assert!(other.exists());
        assert!(retention.files.is_empty());
    }
}
