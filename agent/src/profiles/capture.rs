//! Loads and attaches the CPU profiler's eBPF programs and drains the
//! in-kernel aggregation (see `fathom_common::profiler` for the protocol).

use std::{
    collections::HashMap,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, ProgramArray,
        RingBuf,
    },
    programs::{
        BtfTracePoint, PerfEvent, ProgramError, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use fathom_common::{
    profiler::{
        Counter, STACK_CHUNK_WORDS, SampleKey, StackChunk, StackSlot, names, off_cpu_stack_next,
        stack_chunks, stack_id, stage,
    },
    python::{PyProcess, names as python_names},
    unwind::{UnwindMapping, UnwindProcess, UnwindRow},
};

use crate::{
    ebpf::{self, map_err, program, program_err, take_map as take},
    preflight,
};

/// The eBPF object of this signal, as named in verifier figures.
pub const OBJECT: &str = "fathom";

/// What the profiler samples.
#[derive(Clone, Debug)]
pub struct ProfilerConfig {
    /// Samples per second per CPU.
    pub frequency_hz: u64,
    /// Only these processes; all when empty.
    pub pids: Vec<u32>,
    /// How often user space empties the in-kernel maps. The maps are sized
    /// for this (see [`ProfilerConfig::map_sizes`]).
    pub drain_every: Duration,
    /// Distinct stacks per set of maps; 0 sizes it from the sample rate.
    pub max_stacks: u32,
    /// Stack chunks (16 frames each) per CPU per set; 0 sizes it from the
    /// sample rate.
    pub stack_chunks_per_cpu: u32,
    /// Distinct (thread, stacks) keys per set of maps; 0 sizes it from the
    /// sample rate.
    pub max_sample_keys: u32,
    /// Sizes of the unwinder's maps (user stacks from `.eh_frame`).
    pub unwind: UnwindMapSizes,
    /// Walk user stacks from unwind tables (the table unwinder program and
    /// its maps); else the kernel's frame-pointer walk only.
    pub unwind_tables: bool,
    /// Off-CPU profiling with this threshold (shortest interval counted);
    /// `None`: off, and its maps take one entry each.
    pub off_cpu: Option<Duration>,
    /// The HTTP tracer's `SERVING` map (which thread serves which span),
    /// when tracing runs: samples then carry the span they served.
    pub serving: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Off-CPU stack captures allowed per CPU per second (0: no limit):
    /// past it a thread's blocked time is still counted, under a
    /// `[lost … stack: off-CPU capture budget used up]` frame.
    pub off_cpu_max_stacks: u32,
}

/// Default of [`ProfilerConfig::off_cpu_max_stacks`]: at the measured
/// ~4 µs of BPF time per capture, at most ~1% of each CPU.
pub const DEFAULT_OFF_CPU_MAX_STACKS: u32 = 2000;

/// Off-CPU profiling, as loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OffCpuMode {
    /// Not asked for.
    Off,
    /// Loaded; attached with [`Profiler::sample`].
    On,
    /// Asked for, but the program could not load (CPU profiling runs on).
    Degraded(String),
}

/// Entries of the off-CPU maps when it is on.
pub mod off_cpu_sizes {
    /// Distinct (thread, stacks) keys per set.
    pub const KEYS: u32 = 4096;
    /// Distinct stacks per set.
    pub const STACKS: u32 = 4096;
    /// Stack chunks per CPU per set.
    pub const CHUNKS: u32 = 8192;
    /// Threads away from a CPU at once.
    pub const STARTS: u32 = 16384;
}

/// Entries of the unwinder's maps, shared by all processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnwindMapSizes {
    /// Unwind rows of every loaded executable together (8 bytes each).
    pub rows: u32,
    /// Executable mappings of every unwound process together (40 bytes each).
    pub mappings: u32,
    /// Processes unwound from tables at once.
    pub processes: u32,
}

impl Default for UnwindMapSizes {
    fn default() -> Self {
        Self {
            rows: crate::config::DEFAULT_UNWIND_TABLE_ROWS,
            mappings: 1 << 15,
            processes: 1 << 13,
        }
    }
}

impl UnwindMapSizes {
    /// Kernel memory (the maps are preallocated): values, plus hash-table
    /// element headers (~48 bytes) for the processes.
    pub fn kernel_bytes(&self) -> u64 {
        u64::from(self.rows) * size_of::<UnwindRow>() as u64
            + u64::from(self.mappings) * size_of::<UnwindMapping>() as u64
            + u64::from(self.processes) * (48 + 4 + size_of::<UnwindProcess>() as u64)
    }
}

impl Default for ProfilerConfig {
    fn default() -> Self {
        Self {
            frequency_hz: 99,
            pids: Vec::new(),
            drain_every: Duration::from_secs(1),
            max_stacks: 0,
            stack_chunks_per_cpu: 0,
            max_sample_keys: 0,
            unwind: UnwindMapSizes::default(),
            unwind_tables: true,
            off_cpu: None,
            serving: None,
            off_cpu_max_stacks: DEFAULT_OFF_CPU_MAX_STACKS,
        }
    }
}

/// Entries of the in-kernel maps, per set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub stacks: u32,
    /// Per CPU.
    pub stack_chunks: u32,
    pub sample_keys: u32,
}

impl MapSizes {
    /// Smallest automatic size.
    pub const MIN: u32 = 1024;
    /// Largest automatic size of a map.
    pub const MAX: u32 = 32768;
    /// Chunks an average stored stack is assumed to take (64 frames).
    pub const CHUNKS_PER_STACK: u64 = 4;
    /// Drain periods of headroom: user space may be late (symbolizing a
    /// window) by this many periods before a map can fill up.
    pub const HEADROOM: u64 = 4;

    /// Kernel memory of both sets (all preallocated): hash-table element
    /// header (~48 bytes), key and per-CPU values; the per-CPU chunk arenas.
    pub fn kernel_bytes(&self, cpus: usize) -> u64 {
        let cpus = cpus as u64;
        let index = 48 + 8 + cpus * size_of::<StackSlot>() as u64;
        let key = 48 + size_of::<SampleKey>() as u64 + 8 * cpus;
        let chunks = cpus * size_of::<StackChunk>() as u64;
        2 * (u64::from(self.stacks) * index
            + u64::from(self.stack_chunks) * chunks
            + u64::from(self.sample_keys) * key)
    }
}

impl ProfilerConfig {
    /// Map sizes for `cpus` CPUs. Automatic sizes hold every sample of
    /// [`MapSizes::HEADROOM`] drain periods even if each one had a new user
    /// and kernel stack, so the maps do not fill up unless user space stalls
    /// (capped at [`MapSizes::MAX`]; `StackMapFull`/`CountMapFull` count it).
    pub fn map_sizes(&self, cpus: usize) -> MapSizes {
        let period_ms = self.drain_every.as_millis().max(1) as u64;
        let samples =
            (self.frequency_hz * cpus as u64 * period_ms).div_ceil(1000) * MapSizes::HEADROOM;
        let auto = |n: u64| {
            n.clamp(u64::from(MapSizes::MIN), u64::from(MapSizes::MAX))
                .next_power_of_two() as u32
        };
        let pick = |configured: u32, auto: u32| if configured == 0 { auto } else { configured };
        // One CPU's arena holds its own samples' stacks.
        let per_cpu = (self.frequency_hz * period_ms).div_ceil(1000) * MapSizes::HEADROOM;
        let chunks = (2 * per_cpu * MapSizes::CHUNKS_PER_STACK)
            .clamp(u64::from(MapSizes::MIN), 2 * u64::from(MapSizes::MAX))
            .next_power_of_two() as u32;
        MapSizes {
            stacks: pick(self.max_stacks, auto(2 * samples)),
            stack_chunks: pick(self.stack_chunks_per_cpu, chunks),
            sample_keys: pick(self.max_sample_keys, auto(samples)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfilerError {
    #[error(transparent)]
    Kernel(#[from] ebpf::KernelError),
    #[error("attaching to cpu-clock on CPU {cpu}: {source}")]
    AttachCpu { cpu: u32, source: ProgramError },
    #[error("listing online CPUs: {0}")]
    Cpus(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

crate::wraps_kernel_error!(ProfilerError);

/// Totals of the kernel-side counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters(pub [u64; Counter::COUNT as usize]);

impl KernelCounters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Samples recorded without a complete stack or not recorded at all.
    pub fn lost_summary(&self) -> String {
        format!(
            "kernel-stack-failed={} user-stack-failed={} stack-map-full={} stack-collision={} \
             count-map-full={} process-events-lost={}",
            self.get(Counter::KernelStackFailed),
            self.get(Counter::UserStackFailed),
            self.get(Counter::StackMapFull),
            self.get(Counter::StackCollision),
            self.get(Counter::CountMapFull),
            self.get(Counter::ProcessEventsLost),
        )
    }
}

/// The samples of one drain window, as the kernel aggregated them.
#[derive(Debug, Default)]
pub struct Window {
    /// Distinct keys and how many samples each got.
    pub samples: Vec<(SampleKey, u64)>,
    /// Stacks by hash, leaf first.
    pub stacks: HashMap<u64, Vec<u64>>,
    /// Off-CPU: nanoseconds away from a CPU per key (empty when off).
    pub off_cpu: Vec<(SampleKey, u64)>,
    /// Off-CPU stacks stored in this window, by hash. A key's stacks may
    /// have been stored in an earlier window (when its thread left the CPU).
    pub off_cpu_stacks: HashMap<u64, Vec<u64>>,
    /// Samples the kernel says it recorded into this window.
    pub recorded: u64,
    /// Whether every CPU acknowledged the switch before the window was read.
    pub synced: bool,
}

impl Window {
    /// Sum of the sample counts.
    pub fn counted(&self) -> u64 {
        self.samples.iter().map(|(_, n)| n).sum()
    }
}

/// The unwinder's maps: unwind rows, process mappings, unwound processes.
pub struct UnwindMaps {
    pub rows: Array<MapData, UnwindRow>,
    pub mappings: Array<MapData, UnwindMapping>,
    pub processes: BpfHashMap<MapData, u32, UnwindProcess>,
    pub sizes: UnwindMapSizes,
    /// Python processes whose frames the kernel walks (`PYTHON_PROCS`);
    /// `None` when the Python stage could not load.
    pub python: Option<BpfHashMap<MapData, u32, PyProcess>>,
}

/// The loaded, attached profiler. Dropping it detaches everything.
pub struct Profiler {
    counts: [PerCpuHashMap<MapData, SampleKey, u64>; 2],
    stack_index: [PerCpuHashMap<MapData, u64, StackSlot>; 2],
    stack_chunks: [PerCpuArray<MapData, StackChunk>; 2],
    stack_next: PerCpuArray<MapData, u32>,
    control: Array<MapData, u64>,
    ack: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    cpus: Vec<u32>,
    generation: u64,
    recorded_seen: [u64; 2],
    ack_timeout: Duration,
    frequency_hz: u64,
    pids: Vec<u32>,
    mode: UnwindMode,
    off_cpu: Option<OffCpuMaps>,
    off_cpu_mode: OffCpuMode,
    // Owns the programs and their links; declared last so maps go first.
    ebpf: Ebpf,
}

/// The off-CPU program's maps (see `fathom_common::profiler::OffCpuStart`).
struct OffCpuMaps {
    counts: [PerCpuHashMap<MapData, SampleKey, u64>; 2],
    stack_index: [PerCpuHashMap<MapData, u64, StackSlot>; 2],
    stack_chunks: [PerCpuArray<MapData, StackChunk>; 2],
}

/// How user stacks are walked, as loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnwindMode {
    /// By unwind tables, with frame pointers where a binary has none.
    Tables,
    /// By frame pointers only (`reason`: why not by tables, when they were
    /// asked for).
    FramePointers { reason: Option<String> },
}

impl UnwindMode {
    /// The mode's name (`tables`, `frame-pointers`), as `/metrics` and
    /// `fathom-agent check` say it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tables => "tables",
            Self::FramePointers { .. } => "frame-pointers",
        }
    }
}

/// Loads the sampling chain (see the `fathom` object's `profiler` module):
/// the recording stage and, with `tables`, the table unwinder into
/// `PROFILE_STAGES`, then the entry program. A table unwinder the kernel
/// rejects leaves user stacks to frame pointers, said in one log line.
fn load_sampling_chain(ebpf: &mut Ebpf, tables: bool) -> Result<(UnwindMode, bool), ProfilerError> {
    let record = {
        let program: &mut PerfEvent = program(ebpf, names::PROGRAM_RECORD)?;
        ebpf::load_program(OBJECT, names::PROGRAM_RECORD, || program.load())?;
        program
            .fd()
            .map_err(program_err(names::PROGRAM_RECORD))?
            .try_clone()
    }
    .map_err(|e| ebpf::KernelError::Program {
        name: names::PROGRAM_RECORD,
        source: ProgramError::IOError(e),
    })?;
    let unwind = if tables {
        let program: &mut PerfEvent = program(ebpf, names::PROGRAM_UNWIND)?;
        match ebpf::load_program(OBJECT, names::PROGRAM_UNWIND, || program.load()) {
            Ok(_) => Ok(Some(
                program
                    .fd()
                    .map_err(program_err(names::PROGRAM_UNWIND))?
                    .try_clone()
                    .map_err(|e| ebpf::KernelError::Program {
                        name: names::PROGRAM_UNWIND,
                        source: ProgramError::IOError(e),
                    })?,
            )),
            Err(e) => {
                tracing::warn!(
                    "profiling degraded: user stacks by frame pointers only, because the table unwinder could not load: {e}"
                );
                Err(e.reason.clone())
            }
        }
    } else {
        Ok(None)
    };
    // The Python walk: without it Python processes show their interpreter's
    // native frames only.
    let python = {
        let program: &mut PerfEvent = program(ebpf, python_names::PROGRAM_PYTHON)?;
        match ebpf::load_program(OBJECT, python_names::PROGRAM_PYTHON, || program.load()) {
            Ok(_) => program
                .fd()
                .map_err(program_err(python_names::PROGRAM_PYTHON))?
                .try_clone()
                .ok(),
            Err(e) => {
                tracing::warn!(
                    "profiling degraded: no Python frames, because their walk could not load: {e}"
                );
                None
            }
        }
    };
    let mut stages: ProgramArray<&mut MapData> =
        ProgramArray::try_from(ebpf.map_mut(names::STAGES).ok_or(ebpf::KernelError::Map {
            name: names::STAGES,
            source: MapError::InvalidName {
                name: names::STAGES.into(),
            },
        })?)
        .map_err(map_err(names::STAGES))?;
    stages
        .set(stage::RECORD, &record, 0)
        .map_err(map_err(names::STAGES))?;
    let python = match python {
        Some(fd) => {
            stages
                .set(stage::PYTHON, &fd, 0)
                .map_err(map_err(names::STAGES))?;
            true
        }
        None => false,
    };
    let mode = match unwind {
        Ok(Some(fd)) => {
            stages
                .set(stage::UNWIND, &fd, 0)
                .map_err(map_err(names::STAGES))?;
            UnwindMode::Tables
        }
        Ok(None) => UnwindMode::FramePointers { reason: None },
        Err(reason) => UnwindMode::FramePointers {
            reason: Some(reason),
        },
    };
    let program: &mut PerfEvent = program(ebpf, names::PROGRAM_PERF)?;
    ebpf::load_program(OBJECT, names::PROGRAM_PERF, || program.load())?;
    Ok((mode, python))
}

/// Loads the off-CPU program on the `sched_switch` BTF tracepoint. Returns
/// why it could not load.
fn load_off_cpu(ebpf: &mut Ebpf) -> Result<(), String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    if crate::btf::kernel()
        .and_then(|b| b.member_offset("task_struct", "pid"))
        .is_err()
    {
        return Err("kernel BTF: no task_struct.pid".into());
    }
    for name in names::PROGRAMS_OFF_CPU {
        let program: &mut BtfTracePoint = program(ebpf, name).map_err(|e| e.to_string())?;
        ebpf::load_program(OBJECT, name, || program.load("sched_switch", &btf))
            .map_err(|e| e.reason.clone())?;
    }
    Ok(())
}

impl std::fmt::Debug for Profiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiler")
            .field("cpus", &self.cpus)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Profiler {
    /// Loads the programs and attaches process discovery; returns the
    /// profiler with the ring buffer of process events and the unwinder's
    /// maps. Sampling starts with [`Profiler::sample`].
    pub fn start(
        config: &ProfilerConfig,
    ) -> Result<(Self, RingBuf<MapData>, UnwindMaps), ProfilerError> {
        let ebpf = Self::open_object(config)?;
        let unwind = config.unwind;
        Self::start_with(config, unwind, ebpf)
    }

    /// The profiler's eBPF object, its globals and map sizes set from
    /// `config` as [`Profiler::start`] sets them, no program loaded.
    pub fn open_object(config: &ProfilerConfig) -> Result<Ebpf, ProfilerError> {
        if config.frequency_hz == 0 || config.frequency_hz > 100_000 {
            return Err(ProfilerError::Config(format!(
                "frequency {} Hz is outside 1..=100000",
                config.frequency_hz
            )));
        }
        preflight::ensure_tracefs().map_err(|reason| ebpf::KernelError::TracepointFormat {
            path: preflight::TRACEFS.into(),
            reason,
        })?;
        let fork_format =
            Path::new(preflight::TRACEFS).join("events/sched/sched_process_fork/format");
        let child_pid_offset = fs::read_to_string(&fork_format)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                ebpf::field_offset(&f, "child_pid").ok_or_else(|| "no child_pid field".into())
            })
            .map_err(|reason| ebpf::KernelError::TracepointFormat {
                path: fork_format.display().to_string(),
                reason,
            })?;

        // The possible CPUs size the per-CPU values; sampling runs on the online ones.
        let possible = aya::util::nr_cpus()
            .map_err(|(what, e)| ProfilerError::Cpus(format!("{what}: {e}")))?;
        let sizes = config.map_sizes(possible);
        let unwind = config.unwind;
        tracing::info!(
            stacks = sizes.stacks,
            stack_chunks_per_cpu = sizes.stack_chunks,
            sample_keys = sizes.sample_keys,
            kernel_mib = sizes.kernel_bytes(possible) as f64 / (1 << 20) as f64,
            unwind_rows = unwind.rows,
            unwind_mappings = unwind.mappings,
            unwind_processes = unwind.processes,
            unwind_kernel_mib = unwind.kernel_bytes() as f64 / (1 << 20) as f64,
            drain_every = ?config.drain_every,
            "profiler maps (two sets of stacks and counts; all preallocated)"
        );
        let filter: u8 = u8::from(!config.pids.is_empty());
        // Off-CPU needs `task_struct.pid` from the kernel's BTF; without it
        // the program is left out (and says why when it is asked for).
        let task_pid_offset: u32 = crate::btf::kernel()
            .and_then(|btf| btf.member_offset("task_struct", "pid"))
            .unwrap_or(0);
        let off_cpu_min_ns: u64 = config
            .off_cpu
            .map_or(u64::MAX, |t| t.as_nanos().min(u128::from(u64::MAX)) as u64);
        // Per CPU per second in the configuration, per 100 ms in the kernel.
        let off_cpu_max_stacks: u64 = u64::from(config.off_cpu_max_stacks).div_ceil(10);
        let (oc_keys, oc_stacks, oc_chunks, oc_starts) = if config.off_cpu.is_some() {
            (
                off_cpu_sizes::KEYS,
                off_cpu_sizes::STACKS,
                off_cpu_sizes::CHUNKS,
                off_cpu_sizes::STARTS,
            )
        } else {
            (1, 1, 1, possible as u32)
        };
        let mut loader = EbpfLoader::new();
        if let Some(serving) = &config.serving {
            use std::os::fd::AsFd as _;
            loader.reuse_map(names::SERVING, serving.as_fd());
        }
        let ebpf = loader
            .verifier_log_level(VerifierLogLevel::STATS)
            .override_global(names::GLOBAL_FILTER_PIDS, &filter, true)
            .override_global(names::GLOBAL_TASK_PID_OFFSET, &task_pid_offset, true)
            .override_global(names::GLOBAL_OFF_CPU_MIN_NS, &off_cpu_min_ns, true)
            .override_global(names::GLOBAL_OFF_CPU_MAX_STACKS, &off_cpu_max_stacks, true)
            .map_max_entries(names::OFF_CPU_COUNTS[0], oc_keys)
            .map_max_entries(names::OFF_CPU_COUNTS[1], oc_keys)
            .map_max_entries(names::OFF_CPU_STACK_INDEX[0], oc_stacks)
            .map_max_entries(names::OFF_CPU_STACK_INDEX[1], oc_stacks)
            .map_max_entries(names::OFF_CPU_STACK_CHUNKS[0], oc_chunks)
            .map_max_entries(names::OFF_CPU_STACK_CHUNKS[1], oc_chunks)
            .map_max_entries(names::OFF_CPU_START, oc_starts)
            .override_global(names::GLOBAL_FORK_CHILD_PID_OFFSET, &child_pid_offset, true)
            .map_max_entries(names::COUNTS[0], sizes.sample_keys)
            .map_max_entries(names::COUNTS[1], sizes.sample_keys)
            .map_max_entries(names::STACK_INDEX[0], sizes.stacks)
            .map_max_entries(names::STACK_INDEX[1], sizes.stacks)
            .map_max_entries(names::STACK_CHUNKS[0], sizes.stack_chunks)
            .map_max_entries(names::STACK_CHUNKS[1], sizes.stack_chunks)
            .map_max_entries(names::UNWIND_ROWS, unwind.rows.max(1))
            .map_max_entries(names::UNWIND_MAPPINGS, unwind.mappings.max(1))
            .map_max_entries(names::UNWIND_PROCS, unwind.processes.max(1))
            .load(ebpf::object()?)?;
        Ok(ebpf)
    }

    fn start_with(
        config: &ProfilerConfig,
        unwind: UnwindMapSizes,
        mut ebpf: Ebpf,
    ) -> Result<(Self, RingBuf<MapData>, UnwindMaps), ProfilerError> {
        {
            let mut pid_filter: BpfHashMap<_, u32, u8> = BpfHashMap::try_from(
                ebpf.map_mut(names::PID_FILTER)
                    .ok_or(ebpf::KernelError::Map {
                        name: names::PID_FILTER,
                        source: MapError::InvalidName {
                            name: names::PID_FILTER.into(),
                        },
                    })?,
            )
            .map_err(map_err(names::PID_FILTER))?;
            for pid in &config.pids {
                pid_filter
                    .insert(pid, 1, 0)
                    .map_err(map_err(names::PID_FILTER))?;
            }
        }

        // Process discovery first, so no process is missed once sampling runs.
        for (name, tracepoint) in [
            (names::PROGRAM_FORK, "sched_process_fork"),
            (names::PROGRAM_EXEC, "sched_process_exec"),
        ] {
            let program: &mut TracePoint = program(&mut ebpf, name)?;
            ebpf::load_program(OBJECT, name, || program.load())?;
            program
                .attach("sched", tracepoint)
                .map_err(program_err(name))?;
        }

        let (mode, python) = load_sampling_chain(&mut ebpf, config.unwind_tables)?;
        let off_cpu_mode = if config.off_cpu.is_some() {
            match load_off_cpu(&mut ebpf) {
                Ok(()) => OffCpuMode::On,
                Err(reason) => {
                    tracing::warn!(
                        "off-CPU profiling degraded: off, because its program could not load \
                         (CPU profiling runs on): {reason}"
                    );
                    OffCpuMode::Degraded(reason)
                }
            }
        } else {
            OffCpuMode::Off
        };
        let off_cpu = if off_cpu_mode == OffCpuMode::On {
            Some(OffCpuMaps {
                counts: [
                    take(&mut ebpf, names::OFF_CPU_COUNTS[0])?,
                    take(&mut ebpf, names::OFF_CPU_COUNTS[1])?,
                ],
                stack_index: [
                    take(&mut ebpf, names::OFF_CPU_STACK_INDEX[0])?,
                    take(&mut ebpf, names::OFF_CPU_STACK_INDEX[1])?,
                ],
                stack_chunks: [
                    take(&mut ebpf, names::OFF_CPU_STACK_CHUNKS[0])?,
                    take(&mut ebpf, names::OFF_CPU_STACK_CHUNKS[1])?,
                ],
            })
        } else {
            None
        };

        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;
        let counts = [
            take(&mut ebpf, names::COUNTS[0])?,
            take(&mut ebpf, names::COUNTS[1])?,
        ];
        let stack_index = [
            take(&mut ebpf, names::STACK_INDEX[0])?,
            take(&mut ebpf, names::STACK_INDEX[1])?,
        ];
        let stack_chunks = [
            take(&mut ebpf, names::STACK_CHUNKS[0])?,
            take(&mut ebpf, names::STACK_CHUNKS[1])?,
        ];
        let stack_next = take(&mut ebpf, names::STACK_NEXT)?;
        let unwind_maps = UnwindMaps {
            rows: take(&mut ebpf, names::UNWIND_ROWS)?,
            mappings: take(&mut ebpf, names::UNWIND_MAPPINGS)?,
            processes: take(&mut ebpf, names::UNWIND_PROCS)?,
            sizes: unwind,
            python: if python {
                Some(take(&mut ebpf, python_names::PYTHON_PROCS)?)
            } else {
                None
            },
        };
        let control: Array<MapData, u64> = take(&mut ebpf, names::CONTROL)?;
        let ack = take(&mut ebpf, names::ACK)?;
        let counters = take(&mut ebpf, names::COUNTERS)?;

        let cpus = aya::util::online_cpus()
            .map_err(|(what, e)| ProfilerError::Cpus(format!("{what}: {e}")))?;
        // Four sample periods, and never less than 100 ms.
        let ack_timeout = Duration::from_millis((4_000 / config.frequency_hz).max(100));
        let profiler = Self {
            counts,
            stack_index,
            stack_chunks,
            stack_next,
            control,
            ack,
            counters,
            cpus,
            generation: 0,
            recorded_seen: [0; 2],
            ack_timeout,
            frequency_hz: config.frequency_hz,
            pids: config.pids.clone(),
            mode,
            off_cpu,
            off_cpu_mode,
            ebpf,
        };
        Ok((profiler, events, unwind_maps))
    }

    /// How user stacks are walked, as loaded.
    pub fn unwind_mode(&self) -> &UnwindMode {
        &self.mode
    }

    /// Off-CPU profiling, as loaded.
    pub fn off_cpu_mode(&self) -> &OffCpuMode {
        &self.off_cpu_mode
    }

    /// Starts sampling: attaches the perf-event program to every online CPU
    /// (separate from [`Profiler::start`] so the caller can load unwind
    /// tables of the processes it names first).
    pub fn sample(&mut self) -> Result<(), ProfilerError> {
        let perf: &mut PerfEvent = program(&mut self.ebpf, names::PROGRAM_PERF)?;
        for &cpu in &self.cpus {
            perf.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(self.frequency_hz),
                false,
            )
            .map_err(|source| ProfilerError::AttachCpu { cpu, source })?;
        }
        if self.off_cpu.is_some() {
            // Returns first: a start is never left without its end; the store
            // after the capture it stores.
            for name in names::PROGRAMS_OFF_CPU {
                let off_cpu: &mut BtfTracePoint = program(&mut self.ebpf, name)?;
                off_cpu.attach().map_err(program_err(name))?;
            }
        }
        tracing::info!(
            cpus = self.cpus.len(),
            hz = self.frequency_hz,
            pids = ?self.pids,
            off_cpu = self.off_cpu.is_some(),
            "profiler attached"
        );
        Ok(())
    }

    /// Switches the programs to the other set of maps and returns the
    /// samples of the set they were writing, leaving it empty.
    pub fn drain(&mut self) -> Result<Window, ProfilerError> {
        let set = (self.generation & 1) as usize;
        self.generation += 1;
        self.control
            .set(0, self.generation, 0)
            .map_err(map_err(names::CONTROL))?;
        let synced = self.wait_for_ack()?;

        let recorded_total = self.counters()?.get(Counter::recorded(set as u64));
        let recorded = recorded_total - self.recorded_seen[set];
        self.recorded_seen[set] = recorded_total;

        let counts = &mut self.counts[set];
        let keys = counts
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(names::COUNTS[set]))?;
        let mut samples = Vec::with_capacity(keys.len());
        for key in keys {
            let values = counts.get(&key, 0).map_err(map_err(names::COUNTS[set]))?;
            samples.push((key, values.iter().sum()));
            counts.remove(&key).map_err(map_err(names::COUNTS[set]))?;
        }
        let stacks = drain_stacks(
            &mut self.stack_index[set],
            &self.stack_chunks[set],
            &mut self.stack_next,
            set as u32,
            (names::STACK_INDEX[set], names::STACK_CHUNKS[set]),
        )?;
        let (off_cpu, off_cpu_stacks) = match &mut self.off_cpu {
            Some(maps) => {
                let counts = &mut maps.counts[set];
                let name = names::OFF_CPU_COUNTS[set];
                let keys = counts
                    .keys()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(map_err(name))?;
                let mut off_cpu = Vec::with_capacity(keys.len());
                for key in keys {
                    let values = counts.get(&key, 0).map_err(map_err(name))?;
                    off_cpu.push((key, values.iter().sum()));
                    counts.remove(&key).map_err(map_err(name))?;
                }
                let stacks = drain_stacks(
                    &mut maps.stack_index[set],
                    &maps.stack_chunks[set],
                    &mut self.stack_next,
                    off_cpu_stack_next(set as u64),
                    (
                        names::OFF_CPU_STACK_INDEX[set],
                        names::OFF_CPU_STACK_CHUNKS[set],
                    ),
                )?;
                (off_cpu, stacks)
            }
            None => Default::default(),
        };
        let window = Window {
            samples,
            stacks,
            off_cpu,
            off_cpu_stacks,
            recorded,
            synced,
        };
        if synced && window.counted() != recorded {
            tracing::warn!(
                recorded,
                counted = window.counted(),
                "drained samples differ from recorded ones"
            );
        }
        Ok(window)
    }

    /// Waits until every CPU ran the program with the current generation.
    fn wait_for_ack(&self) -> Result<bool, ProfilerError> {
        let deadline = Instant::now() + self.ack_timeout;
        loop {
            let acks = self.ack.get(&0, 0).map_err(map_err(names::ACK))?;
            if self.cpus.iter().all(|&cpu| {
                acks.get(cpu as usize)
                    .is_some_and(|&g| g >= self.generation)
            }) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                // A CPU that ran no sample since the switch has nothing in
                // flight either; programs run for microseconds.
                tracing::debug!(
                    generation = self.generation,
                    "not every CPU acknowledged the switch"
                );
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The kernel-side counters, summed over CPUs. Read one at a time, the
    /// outcomes before `Samples` (which a program bumps first), so that
    /// `Samples` is never below the sum of the outcomes it led to.
    pub fn counters(&self) -> Result<KernelCounters, ProfilerError> {
        let mut totals = KernelCounters::default();
        for counter in Counter::ALL.into_iter().rev() {
            let values = self
                .counters
                .get(&(counter as u32), 0)
                .map_err(map_err(names::COUNTERS))?;
            totals.0[counter as usize] = values.iter().sum();
        }
        Ok(totals)
    }
}

/// Reads and empties a stack store (its arena cursor at `STACK_NEXT[next]`): every CPU's stacks by
/// hash. Two CPUs storing different stacks under one hash (a 64-bit
/// collision, or a bug) keeps the first and says so.
fn drain_stacks(
    index: &mut PerCpuHashMap<MapData, u64, StackSlot>,
    chunks: &PerCpuArray<MapData, StackChunk>,
    stack_next: &mut PerCpuArray<MapData, u32>,
    next: u32,
    (index_name, chunks_name): (&'static str, &'static str),
) -> Result<HashMap<u64, Vec<u64>>, ProfilerError> {
    let used = stack_next
        .get(&next, 0)
        .map_err(map_err(names::STACK_NEXT))?;
    let used_max = used.iter().copied().max().unwrap_or(0);
    // One read per chunk index returns it for every CPU.
    let mut arena: Vec<Vec<StackChunk>> = Vec::with_capacity(used_max as usize);
    for i in 0..used_max {
        let per_cpu = chunks.get(&i, 0).map_err(map_err(chunks_name))?;
        arena.push(per_cpu.iter().copied().collect());
    }
    let hashes = index
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(index_name))?;
    let mut stacks = HashMap::with_capacity(hashes.len());
    for hash in hashes {
        let slots = index.get(&hash, 0).map_err(map_err(index_name))?;
        for (cpu, slot) in slots.iter().enumerate() {
            if slot.first == 0 {
                continue;
            }
            let len = slot.len as usize;
            let first = slot.first as usize - 1;
            let mut ips = Vec::with_capacity(len);
            for c in 0..stack_chunks(len) {
                let Some(chunk) = arena.get(first + c).and_then(|per_cpu| per_cpu.get(cpu)) else {
                    break;
                };
                let take = (len - c * STACK_CHUNK_WORDS).min(STACK_CHUNK_WORDS);
                ips.extend_from_slice(&chunk.ips[..take]);
            }
            if ips.len() != len {
                tracing::warn!(hash, cpu, len, "stored stack beyond its CPU's arena");
                continue;
            }
            match stacks.entry(hash) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(ips);
                }
                std::collections::hash_map::Entry::Occupied(o) => {
                    if *o.get() != ips {
                        tracing::warn!(hash, "two CPUs stored different stacks under one hash");
                    }
                }
            }
        }
        index.remove(&hash).map_err(map_err(index_name))?;
    }
    let zeros = aya::maps::PerCpuValues::try_from(vec![0u32; used.len()]).map_err(|e| {
        ebpf::KernelError::Map {
            name: names::STACK_NEXT,
            source: MapError::IoError(e),
        }
    })?;
    stack_next
        .set(next, zeros, 0)
        .map_err(map_err(names::STACK_NEXT))?;
    Ok(stacks)
}

/// Human-readable name of a stack marker, for synthetic frames.
pub fn stack_marker_reason(id: u64) -> Option<&'static str> {
    match id {
        stack_id::EMPTY => None,
        stack_id::WALK_FAILED => Some("stack walk failed"),
        stack_id::MAP_FULL => Some("stack map full"),
        stack_id::COLLISION => Some("stack hash collision"),
        stack_id::NOT_CAPTURED => Some("off-CPU capture budget used up"),
        _ if id < stack_id::FIRST_HASH => Some("unknown stack marker"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hold_every_sample_of_the_headroom() {
        let config = ProfilerConfig::default();
        // 99 Hz * 2 CPUs * 1 s * 4 periods = 792 samples, 1584 stacks.
        let sizes = config.map_sizes(2);
        assert_eq!(
            sizes,
            MapSizes {
                stacks: 2048,
                // Per CPU: 99 Hz * 4 periods * 2 stacks * 4 chunks = 3168.
                stack_chunks: 4096,
                sample_keys: 1024
            }
        );
        assert_eq!(
            sizes.kernel_bytes(2),
            2 * (2048 * (48 + 8 + 2 * 8) + 4096 * 2 * 128 + 1024 * (48 + 80 + 16))
        );
        // 999 Hz * 2 CPUs: 7992 samples.
        let fast = ProfilerConfig {
            frequency_hz: 999,
            ..ProfilerConfig::default()
        };
        assert_eq!(
            fast.map_sizes(2),
            MapSizes {
                stacks: 16384,
                stack_chunks: 32768,
                sample_keys: 8192
            }
        );
        // Capped on large machines; configured sizes win.
        assert_eq!(config.map_sizes(256).stacks, MapSizes::MAX);
        let fixed = ProfilerConfig {
            max_stacks: 100,
            max_sample_keys: 7,
            ..ProfilerConfig::default()
        };
        assert_eq!(
            fixed.map_sizes(64),
            MapSizes {
                stacks: 100,
                stack_chunks: 4096,
                sample_keys: 7
            }
        );
        // A sub-millisecond period still gets the minimum.
        let tiny = ProfilerConfig {
            frequency_hz: 1,
            drain_every: Duration::ZERO,
            ..ProfilerConfig::default()
        };
        assert_eq!(
            tiny.map_sizes(1),
            MapSizes {
                stacks: 1024,
                stack_chunks: 1024,
                sample_keys: 1024
            }
        );
    }

    #[test]
    fn markers_have_reasons_and_hashes_do_not() {
        assert_eq!(stack_marker_reason(stack_id::EMPTY), None);
        assert_eq!(
            stack_marker_reason(stack_id::MAP_FULL),
            Some("stack map full")
        );
        assert_eq!(stack_marker_reason(stack_id::FIRST_HASH), None);
        assert_eq!(stack_marker_reason(0xdead_beef_0000), None);
    }
}
