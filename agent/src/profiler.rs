//! Loads and attaches the CPU profiler's eBPF programs and drains the
//! in-kernel aggregation (see `fathom_common::profiler` for the protocol).

use std::{
    collections::HashMap,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        PerfEvent, ProgramError, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use fathom_common::profiler::{Counter, SampleKey, Stack, names, stack_id};

use crate::{ebpf, preflight};

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
    /// Distinct (thread, stacks) keys per set of maps; 0 sizes it from the
    /// sample rate.
    pub max_sample_keys: u32,
}

impl Default for ProfilerConfig {
    fn default() -> Self {
        Self {
            frequency_hz: 99,
            pids: Vec::new(),
            drain_every: Duration::from_secs(1),
            max_stacks: 0,
            max_sample_keys: 0,
        }
    }
}

/// Entries of the in-kernel maps, per set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub stacks: u32,
    pub sample_keys: u32,
}

impl MapSizes {
    /// Smallest automatic size.
    pub const MIN: u32 = 1024;
    /// Largest automatic size: 32768 stacks are 34 MiB per set.
    pub const MAX: u32 = 32768;
    /// Drain periods of headroom: user space may be late (symbolizing a
    /// window) by this many periods before a map can fill up.
    pub const HEADROOM: u64 = 4;

    /// Kernel memory of both sets when full (the count maps always are,
    /// being preallocated; the stack maps grow up to it): hash-table element
    /// header (~48 bytes), key and value, per-CPU values for the counts.
    pub fn kernel_bytes(&self, cpus: usize) -> u64 {
        let stack = 48 + 8 + std::mem::size_of::<Stack>() as u64;
        let key = 48 + std::mem::size_of::<SampleKey>() as u64 + 8 * cpus as u64;
        2 * (u64::from(self.stacks) * stack + u64::from(self.sample_keys) * key)
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
        MapSizes {
            stacks: pick(self.max_stacks, auto(2 * samples)),
            sample_keys: pick(self.max_sample_keys, auto(samples)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfilerError {
    #[error(transparent)]
    MissingObject(#[from] ebpf::MissingObject),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("attaching to cpu-clock on CPU {cpu}: {source}")]
    AttachCpu { cpu: u32, source: ProgramError },
    #[error("listing online CPUs: {0}")]
    Cpus(String),
    #[error("tracepoint format {path}: {reason}")]
    TracepointFormat { path: String, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
}

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

/// The loaded, attached profiler. Dropping it detaches everything.
pub struct Profiler {
    counts: [PerCpuHashMap<MapData, SampleKey, u64>; 2],
    stacks: [BpfHashMap<MapData, u64, Stack>; 2],
    control: Array<MapData, u64>,
    ack: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    cpus: Vec<u32>,
    generation: u64,
    recorded_seen: [u64; 2],
    ack_timeout: Duration,
    // Owns the programs and their links; declared last so maps go first.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Profiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiler")
            .field("cpus", &self.cpus)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> ProfilerError {
    move |source| ProfilerError::Map { name, source }
}

fn program_err(name: &'static str) -> impl Fn(ProgramError) -> ProfilerError {
    move |source| ProfilerError::Program { name, source }
}

/// A program of the object, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProfilerError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProfilerError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(program_err(name))
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, ProfilerError> {
    let map = ebpf.take_map(name).ok_or(ProfilerError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(map_err(name))
}

impl Profiler {
    /// Loads the programs, attaches them to every online CPU and returns the
    /// profiler with the ring buffer of process events.
    pub fn start(config: &ProfilerConfig) -> Result<(Self, RingBuf<MapData>), ProfilerError> {
        if config.frequency_hz == 0 || config.frequency_hz > 100_000 {
            return Err(ProfilerError::Config(format!(
                "frequency {} Hz is outside 1..=100000",
                config.frequency_hz
            )));
        }
        preflight::ensure_tracefs().map_err(|reason| ProfilerError::TracepointFormat {
            path: preflight::TRACEFS.into(),
            reason,
        })?;
        let fork_format =
            Path::new(preflight::TRACEFS).join("events/sched/sched_process_fork/format");
        let child_pid_offset = fs::read_to_string(&fork_format)
            .map_err(|e| e.to_string())
            .and_then(|f| field_offset(&f, "child_pid").ok_or_else(|| "no child_pid field".into()))
            .map_err(|reason| ProfilerError::TracepointFormat {
                path: fork_format.display().to_string(),
                reason,
            })?;

        // The possible CPUs size the per-CPU values; sampling runs on the online ones.
        let possible = aya::util::nr_cpus()
            .map_err(|(what, e)| ProfilerError::Cpus(format!("{what}: {e}")))?;
        let sizes = config.map_sizes(possible);
        tracing::info!(
            stacks = sizes.stacks,
            sample_keys = sizes.sample_keys,
            kernel_mib_at_most = sizes.kernel_bytes(possible) as f64 / (1 << 20) as f64,
            drain_every = ?config.drain_every,
            "profiler maps (two sets; counts preallocated)"
        );
        let filter: u8 = u8::from(!config.pids.is_empty());
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_FILTER_PIDS, &filter, true)
            .override_global(names::GLOBAL_FORK_CHILD_PID_OFFSET, &child_pid_offset, true)
            .map_max_entries(names::COUNTS[0], sizes.sample_keys)
            .map_max_entries(names::COUNTS[1], sizes.sample_keys)
            .map_max_entries(names::STACKS[0], sizes.stacks)
            .map_max_entries(names::STACKS[1], sizes.stacks)
            .load(ebpf::object()?)?;

        {
            let mut pid_filter: BpfHashMap<_, u32, u8> = BpfHashMap::try_from(
                ebpf.map_mut(names::PID_FILTER).ok_or(ProfilerError::Map {
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
            program.load().map_err(program_err(name))?;
            program
                .attach("sched", tracepoint)
                .map_err(program_err(name))?;
        }

        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;
        let counts = [
            take(&mut ebpf, names::COUNTS[0])?,
            take(&mut ebpf, names::COUNTS[1])?,
        ];
        let stacks = [
            take(&mut ebpf, names::STACKS[0])?,
            take(&mut ebpf, names::STACKS[1])?,
        ];
        let control: Array<MapData, u64> = take(&mut ebpf, names::CONTROL)?;
        let ack = take(&mut ebpf, names::ACK)?;
        let counters = take(&mut ebpf, names::COUNTERS)?;

        let cpus = aya::util::online_cpus()
            .map_err(|(what, e)| ProfilerError::Cpus(format!("{what}: {e}")))?;
        let program: &mut PerfEvent = program(&mut ebpf, names::PROGRAM_PERF)?;
        program.load().map_err(program_err(names::PROGRAM_PERF))?;
        for &cpu in &cpus {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(config.frequency_hz),
                    false,
                )
                .map_err(|source| ProfilerError::AttachCpu { cpu, source })?;
        }
        tracing::info!(cpus = cpus.len(), hz = config.frequency_hz, pids = ?config.pids, "profiler attached");

        // Four sample periods, and never less than 100 ms.
        let ack_timeout = Duration::from_millis((4_000 / config.frequency_hz).max(100));
        let profiler = Self {
            counts,
            stacks,
            control,
            ack,
            counters,
            cpus,
            generation: 0,
            recorded_seen: [0; 2],
            ack_timeout,
            _ebpf: ebpf,
        };
        Ok((profiler, events))
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
        let stack_map = &mut self.stacks[set];
        let hashes = stack_map
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(names::STACKS[set]))?;
        let mut stacks = HashMap::with_capacity(hashes.len());
        for hash in hashes {
            let stack = stack_map
                .get(&hash, 0)
                .map_err(map_err(names::STACKS[set]))?;
            let len = (stack.len as usize).min(stack.ips.len());
            stacks.insert(hash, stack.ips[..len].to_vec());
            stack_map
                .remove(&hash)
                .map_err(map_err(names::STACKS[set]))?;
        }
        let window = Window {
            samples,
            stacks,
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

/// The offset of a field in a tracepoint `format` file.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        line.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:")?.parse().ok())
    })
}

/// Human-readable name of a stack marker, for synthetic frames.
pub fn stack_marker_reason(id: u64) -> Option<&'static str> {
    match id {
        stack_id::EMPTY => None,
        stack_id::WALK_FAILED => Some("stack walk failed"),
        stack_id::MAP_FULL => Some("stack map full"),
        stack_id::COLLISION => Some("stack hash collision"),
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
                sample_keys: 1024
            }
        );
        assert_eq!(
            sizes.kernel_bytes(2),
            2 * (2048 * 1080 + 1024 * (48 + 40 + 16))
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
                sample_keys: 1024
            }
        );
    }

    #[test]
    fn finds_tracepoint_field_offsets() {
        let format = "name: sched_process_fork\nID: 366\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
            \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
            \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(format, "child_pid"), Some(20));
        assert_eq!(field_offset(format, "parent_comm"), Some(8));
        assert_eq!(field_offset(format, "common_type"), Some(0));
        assert_eq!(field_offset(format, "pid"), None);
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
