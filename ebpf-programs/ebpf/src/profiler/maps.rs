//! The profiler object's maps. Sizes are defaults; the loader sets them
//! from the agent's configuration.
//!
//! Every map the sampling path writes is preallocated: an insert fails only
//! when the map is full. (Without preallocation the kernel allocates
//! elements from per-CPU caches refilled with GFP_NOWAIT and charged to the
//! agent's memory cgroup, and an insert can fail on a nearly empty map.)
//! The unwind tables are mmapable: user space writes them with plain stores.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
};
use fathom_common::{
    http::Serving,
    profiler::{Counter, OffCpuStart, SampleKey, StackChunk, StackSlot, stage},
    python::PyProcess,
    unwind::{UnwindMapping, UnwindProcess, UnwindRow},
};

use super::sample::Sample;

/// Per-CPU values: counting needs no atomics; user space sums the CPUs.
#[map]
pub static COUNTS_0: PerCpuHashMap<SampleKey, u64> = PerCpuHashMap::with_max_entries(1024, 0);
#[map]
pub static COUNTS_1: PerCpuHashMap<SampleKey, u64> = PerCpuHashMap::with_max_entries(1024, 0);
/// Stack hash -> where this CPU stored the stack (see `fathom_common::profiler`).
#[map]
pub static STACK_INDEX_0: PerCpuHashMap<u64, StackSlot> = PerCpuHashMap::with_max_entries(1024, 0);
#[map]
pub static STACK_INDEX_1: PerCpuHashMap<u64, StackSlot> = PerCpuHashMap::with_max_entries(1024, 0);
/// Per-CPU arenas of stack chunks.
#[map]
pub static STACK_CHUNKS_0: PerCpuArray<StackChunk> = PerCpuArray::with_max_entries(1024, 0);
#[map]
pub static STACK_CHUNKS_1: PerCpuArray<StackChunk> = PerCpuArray::with_max_entries(1024, 0);
/// `[set]`: this CPU's next free chunk in `STACK_CHUNKS_set`; `[2 + set]`:
/// in `OFFCPU_STACK_CHUNKS_set`.
#[map]
pub static STACK_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(4, 0);
/// `[0]`: generation; its low bit selects the set being written.
#[map]
pub static CONTROL: Array<u64> = Array::with_max_entries(1, 0);
/// Per CPU: the generation the last completed program run on it saw.
#[map]
pub static ACK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
pub static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);
/// Processes user space has been told about.
#[map]
pub static KNOWN_PIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(65536, 0);
#[map]
pub static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
/// The stages of the sampling chain after `profile_cpu` (`stage` indexes),
/// filled by user space.
#[map]
pub static PROFILE_STAGES: ProgramArray = ProgramArray::with_max_entries(stage::COUNT, 0);
/// Per CPU: the sample going through the chain (too large for the 512-byte
/// BPF stack; perf-event programs do not nest on a CPU).
#[map]
pub static SAMPLE: PerCpuArray<Sample> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
pub static UNWIND_MAPPINGS: Array<UnwindMapping> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// Processes whose user stacks are walked here (the others by the kernel).
#[map]
pub static UNWIND_PROCS: HashMap<u32, UnwindProcess> = HashMap::with_max_entries(1, 0);

/// Off-CPU (see `fathom_common::profiler::OffCpuStart`): blocked nanoseconds
/// per key, per set; sized to one entry by the loader when off-CPU is off.
#[map]
pub static OFFCPU_COUNTS_0: PerCpuHashMap<SampleKey, u64> =
    PerCpuHashMap::with_max_entries(1024, 0);
#[map]
pub static OFFCPU_COUNTS_1: PerCpuHashMap<SampleKey, u64> =
    PerCpuHashMap::with_max_entries(1024, 0);
/// The off-CPU stack store, laid out like the CPU profiler's.
#[map]
pub static OFFCPU_STACK_INDEX_0: PerCpuHashMap<u64, StackSlot> =
    PerCpuHashMap::with_max_entries(1024, 0);
#[map]
pub static OFFCPU_STACK_INDEX_1: PerCpuHashMap<u64, StackSlot> =
    PerCpuHashMap::with_max_entries(1024, 0);
#[map]
pub static OFFCPU_STACK_CHUNKS_0: PerCpuArray<StackChunk> = PerCpuArray::with_max_entries(1024, 0);
#[map]
pub static OFFCPU_STACK_CHUNKS_1: PerCpuArray<StackChunk> = PerCpuArray::with_max_entries(1024, 0);
/// Thread id -> when and with which stacks it left the CPU. LRU: a thread
/// that exits never comes back to remove its entry.
#[map]
pub static OFFCPU_START: LruHashMap<u32, OffCpuStart> = LruHashMap::with_max_entries(16384, 0);

/// Thread id -> the server request it is serving: the HTTP tracer's map of
/// that name, shared by the loader when tracing runs (samples then carry
/// their span). Otherwise this object's own, empty.
#[map]
pub static SERVING: HashMap<u32, Serving> = HashMap::with_max_entries(1, 0);

/// Off-CPU capture budget of this CPU: `[0]` start of the current 100 ms
/// period, `[1]` stack captures in it.
#[map]
pub static OFFCPU_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Python processes whose interpreter frames are walked (`profile_python`),
/// filled by user space.
#[map]
pub static PYTHON_PROCS: HashMap<u32, PyProcess> = HashMap::with_max_entries(4096, 0);
