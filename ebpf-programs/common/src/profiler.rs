//! The CPU profiler's kernel/user-space contract.
//!
//! The perf-event program aggregates samples in the kernel into one of two
//! *sets* of maps (`COUNTS_n` keyed by [`SampleKey`]; stacks in
//! `STACK_INDEX_n` + `STACK_CHUNKS_n`). The low bit of the generation in
//! `CONTROL[0]` selects the set being written. User space drains by bumping the
//! generation, waiting until every CPU acknowledged it in `ACK` (so no program
//! still writes the old set), then reading and clearing the old set. No sample
//! is lost or counted twice, and the per-set `RECORDED_n` counters let user
//! space check that.
//!
//! Stacks are stored per CPU, so storing one needs neither atomics nor
//! allocation in the kernel: `STACK_INDEX_n` is a per-CPU hash map from the
//! stack's hash to a [`StackSlot`] (zero on CPUs that did not store it), and
//! the slot names consecutive [`StackChunk`]s of that CPU's arena
//! `STACK_CHUNKS_n`, allocated by bumping the CPU's `STACK_NEXT[n]`. Nothing
//! is freed or reused before user space drains the set, and every map is
//! preallocated, so a store fails only when the arena or index is full.

use crate::assert_size;

/// Deepest stack stored (the kernel's own walker stops at
/// `kernel.perf_event_max_stack`, 127 by default).
pub const MAX_STACK_DEPTH: usize = 128;
/// Entries per stack chunk.
pub const STACK_CHUNK_WORDS: usize = 16;
/// Chunks of the deepest stack.
pub const MAX_STACK_CHUNKS: usize = MAX_STACK_DEPTH / STACK_CHUNK_WORDS;
/// Length of a task's `comm`, NUL-padded.
pub const COMM_LEN: usize = 16;

/// Key of the in-kernel sample counts: one entry per distinct
/// (thread, comm, user stack, kernel stack, span served).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// Hash of the user stack in `STACKS_n`, or a [`stack_id`] marker.
    pub user_stack: u64,
    /// Hash of the kernel stack in `STACKS_n`, or a [`stack_id`] marker.
    pub kernel_stack: u64,
    /// The thread's `comm` at sample time.
    pub comm: [u8; COMM_LEN],
    /// How the user stack was walked: a [`crate::unwind::status`].
    pub user_unwind: u32,
    pub _reserved: u32,
    /// The server span the thread was serving (the HTTP tracer's `SERVING`
    /// entry, when it is the thread's only open request); all zero: none.
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Hash of the Python frames in `STACKS_n` (see [`crate::python`]), or
    /// a [`stack_id`] marker ([`stack_id::EMPTY`]: not a Python sample).
    pub python_stack: u64,
}
assert_size!(SampleKey, 4 + 4 + 8 + 8 + COMM_LEN + 8 + 16 + 8 + 8);

/// A stack: instruction pointers, leaf first, zero-filled past its end (no
/// frame is at address zero).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stack {
    pub ips: [u64; MAX_STACK_DEPTH],
}
assert_size!(Stack, 8 * MAX_STACK_DEPTH);

/// A piece of a stored stack (entries past the stack are zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackChunk {
    pub ips: [u64; STACK_CHUNK_WORDS],
}
assert_size!(StackChunk, 8 * STACK_CHUNK_WORDS);

/// Where one CPU stored a stack: `len` entries from chunk `first - 1` of its
/// arena. All zero: not stored by this CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StackSlot {
    /// First chunk's index plus one.
    pub first: u32,
    pub len: u32,
}
assert_size!(StackSlot, 8);

/// Chunks a stack of `len` entries takes.
pub const fn stack_chunks(len: usize) -> usize {
    len.div_ceil(STACK_CHUNK_WORDS)
}

/// Values of [`SampleKey::user_stack`] / [`SampleKey::kernel_stack`] below
/// [`stack_id::FIRST_HASH`] are markers, not hashes.
pub mod stack_id {
    /// No stack of this kind (a user-mode sample has no kernel stack; a kernel
    /// thread has no user stack).
    pub const EMPTY: u64 = 0;
    /// The kernel failed to walk the stack.
    pub const WALK_FAILED: u64 = 1;
    /// The stack store was full, so the stack was not stored.
    pub const MAP_FULL: u64 = 2;
    /// A different stack with the same 64-bit hash was already stored.
    pub const COLLISION: u64 = 3;
    /// Off-CPU: the thread left the CPU when this CPU had used its budget of
    /// stack captures for the moment (`OFFCPU_MAX_STACKS`); its time is
    /// counted, its stacks not walked.
    pub const NOT_CAPTURED: u64 = 4;
    /// The smallest value that is a real hash. Hashes below it are moved up.
    pub const FIRST_HASH: u64 = 16;
}

/// Indexes of the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every run of the perf-event program.
    Samples = 0,
    /// Samples of the idle task (pid 0), not recorded.
    Idle,
    /// Samples of processes outside the pid filter, not recorded.
    Filtered,
    /// Samples counted into set 0.
    Recorded0,
    /// Samples counted into set 1.
    Recorded1,
    /// `bpf_get_stack` failed on the kernel stack.
    KernelStackFailed,
    /// `bpf_get_stack` failed on the user stack.
    UserStackFailed,
    /// Stacks not stored because `STACK_INDEX_n` or this CPU's arena in
    /// `STACK_CHUNKS_n` was full.
    StackMapFull,
    /// Stacks not stored because of a 64-bit hash collision.
    StackCollision,
    /// Samples lost because `COUNTS_n` was full.
    CountMapFull,
    /// Process events sent to user space.
    ProcessEvents,
    /// Process events lost because the ring buffer was full.
    ProcessEventsLost,
    /// A stage of the sampling chain was not there to tail-call (the table
    /// unwinder when it could not load: the sample's user stack was then
    /// walked by frame pointers; the recording stage: the sample is lost).
    StageMissing,
    /// Off-CPU: threads seen leaving the CPU (their start recorded).
    OffCpuSwitchOuts,
    /// Off-CPU: blocked intervals counted into set 0 / set 1 (at least the
    /// threshold long).
    OffCpuRecorded0,
    OffCpuRecorded1,
    /// Off-CPU: blocked intervals shorter than the threshold, not counted.
    OffCpuShort,
    /// Off-CPU: intervals lost because `OFFCPU_COUNTS_n` was full.
    OffCpuCountMapFull,
    /// Off-CPU: switch-outs whose stacks were not walked (over the capture
    /// budget).
    OffCpuNotCaptured,
    /// Python: samples of a Python process whose frames were walked.
    PythonWalks,
    /// Python: walks that found no frames (no thread state for the sampled
    /// thread, or unreadable interpreter memory); the sample keeps its
    /// native frames.
    PythonWalkFailed,
}

impl Counter {
    /// Number of counters (length of `COUNTERS`).
    pub const COUNT: u32 = Counter::PythonWalkFailed as u32 + 1;

    /// All counters, in index order.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::Samples,
        Counter::Idle,
        Counter::Filtered,
        Counter::Recorded0,
        Counter::Recorded1,
        Counter::KernelStackFailed,
        Counter::UserStackFailed,
        Counter::StackMapFull,
        Counter::StackCollision,
        Counter::CountMapFull,
        Counter::ProcessEvents,
        Counter::ProcessEventsLost,
        Counter::StageMissing,
        Counter::OffCpuSwitchOuts,
        Counter::OffCpuRecorded0,
        Counter::OffCpuRecorded1,
        Counter::OffCpuShort,
        Counter::OffCpuCountMapFull,
        Counter::OffCpuNotCaptured,
        Counter::PythonWalks,
        Counter::PythonWalkFailed,
    ];

    /// Counter of samples recorded into `set` (0 or 1).
    pub const fn recorded(set: u64) -> Counter {
        if set & 1 == 0 {
            Counter::Recorded0
        } else {
            Counter::Recorded1
        }
    }

    /// Counter of off-CPU intervals recorded into `set` (0 or 1).
    pub const fn off_cpu_recorded(set: u64) -> Counter {
        if set & 1 == 0 {
            Counter::OffCpuRecorded0
        } else {
            Counter::OffCpuRecorded1
        }
    }
}

/// Off-CPU profiling (the `offcpu_switch` program on the `sched_switch` BTF
/// tracepoint). When a thread of a profiled process leaves a CPU, its kernel
/// and user stacks are stored in the off-CPU stack store of the current set
/// (`OFFCPU_STACK_INDEX_n` + `OFFCPU_STACK_CHUNKS_n`, laid out like the CPU
/// profiler's, its arena cursor at `STACK_NEXT[2 + n]`) and an
/// [`OffCpuStart`] under its thread id in `OFFCPU_START`. When the thread is
/// switched back in, the time it was away, if at least the threshold, is
/// added (in nanoseconds) to `OFFCPU_COUNTS_n[SampleKey]` of the set current
/// *then*, and the start is removed. Its stacks may so be in an earlier
/// set's store than its count: stack hashes depend only on the stack, and
/// user space keeps the off-CPU stacks it drained across windows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffCpuStart {
    /// `bpf_ktime_get_ns` when the thread left the CPU.
    pub at_ns: u64,
    /// As in [`SampleKey`].
    pub user_stack: u64,
    pub kernel_stack: u64,
    pub pid: u32,
    pub user_unwind: u32,
    pub comm: [u8; COMM_LEN],
}
assert_size!(OffCpuStart, 8 * 3 + 8 + COMM_LEN);

/// `STACK_NEXT` index of the off-CPU store of `set`.
pub const fn off_cpu_stack_next(set: u64) -> u32 {
    2 + (set & 1) as u32
}

/// A process user space should look at (read its mappings now, while it runs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    /// Always [`ProcessEvent::NEW`] for now.
    pub kind: u32,
    /// Process id (tgid).
    pub pid: u32,
}
assert_size!(ProcessEvent, 8);

impl ProcessEvent {
    /// First sample of a process not seen before, or not since it forked or
    /// called `execve` (both clear it from `KNOWN_PIDS`).
    pub const NEW: u32 = 1;
}

/// Indexes of the sampling chain's stages in `PROFILE_STAGES`.
pub mod stage {
    pub const UNWIND: u32 = 0;
    pub const RECORD: u32 = 1;
    /// The Python frame walk, for processes in `PYTHON_PROCS`.
    pub const PYTHON: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Names of the profiler's maps and programs in the BPF object.
pub mod names {
    /// The perf-event program attached to every CPU: the first stage of the
    /// sampling chain (filter, kernel stack, frame-pointer user stack).
    pub const PROGRAM_PERF: &str = "profile_cpu";
    /// Stage 2, tail-called when the process has unwind tables.
    pub const PROGRAM_UNWIND: &str = "profile_unwind";
    /// Stage 3, tail-called last: stores the stacks and counts the sample.
    pub const PROGRAM_RECORD: &str = "profile_record";
    /// The `ProgramArray` of the stages, at [`stage`] indexes.
    pub const STAGES: &str = "PROFILE_STAGES";
    pub const PROGRAM_FORK: &str = "profile_fork";
    pub const PROGRAM_EXEC: &str = "profile_exec";
    pub const COUNTS: [&str; 2] = ["COUNTS_0", "COUNTS_1"];
    pub const STACK_INDEX: [&str; 2] = ["STACK_INDEX_0", "STACK_INDEX_1"];
    pub const STACK_CHUNKS: [&str; 2] = ["STACK_CHUNKS_0", "STACK_CHUNKS_1"];
    /// Per CPU, per set: the next free chunk of the CPU's arena.
    pub const STACK_NEXT: &str = "STACK_NEXT";
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    pub const UNWIND_MAPPINGS: &str = "UNWIND_MAPPINGS";
    pub const UNWIND_PROCS: &str = "UNWIND_PROCS";
    pub const CONTROL: &str = "CONTROL";
    pub const ACK: &str = "ACK";
    pub const COUNTERS: &str = "COUNTERS";
    pub const PID_FILTER: &str = "PID_FILTER";
    pub const KNOWN_PIDS: &str = "KNOWN_PIDS";
    pub const EVENTS: &str = "PROCESS_EVENTS";
    /// Global: non-zero when only pids in `PID_FILTER` are sampled.
    pub const GLOBAL_FILTER_PIDS: &str = "FILTER_PIDS";
    /// The off-CPU programs on the `sched_switch` BTF tracepoint: a thread
    /// leaving the CPU (stacks stored), a thread coming back (time counted).
    pub const PROGRAM_OFF_CPU: &str = "offcpu_switch";
    pub const PROGRAM_OFF_CPU_IN: &str = "offcpu_switch_in";
    /// Stores what `offcpu_switch` captured; attached after it.
    pub const PROGRAM_OFF_CPU_STORE: &str = "offcpu_store";
    /// The off-CPU programs in load and attach order.
    pub const PROGRAMS_OFF_CPU: [&str; 3] =
        [PROGRAM_OFF_CPU_IN, PROGRAM_OFF_CPU, PROGRAM_OFF_CPU_STORE];
    pub const OFF_CPU_COUNTS: [&str; 2] = ["OFFCPU_COUNTS_0", "OFFCPU_COUNTS_1"];
    pub const OFF_CPU_STACK_INDEX: [&str; 2] = ["OFFCPU_STACK_INDEX_0", "OFFCPU_STACK_INDEX_1"];
    pub const OFF_CPU_STACK_CHUNKS: [&str; 2] = ["OFFCPU_STACK_CHUNKS_0", "OFFCPU_STACK_CHUNKS_1"];
    pub const OFF_CPU_START: &str = "OFFCPU_START";
    /// Global: shortest blocked interval counted, in nanoseconds.
    pub const GLOBAL_OFF_CPU_MIN_NS: &str = "OFFCPU_MIN_NS";
    /// Global: stack captures per CPU per 100 ms (0: no limit).
    pub const GLOBAL_OFF_CPU_MAX_STACKS: &str = "OFFCPU_MAX_STACKS";
    /// Global: offset of `pid` (the thread id) in `struct task_struct`, from
    /// the kernel's BTF.
    pub const GLOBAL_TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
    /// Global: offset of `child_pid` in the `sched_process_fork` record.
    pub const GLOBAL_FORK_CHILD_PID_OFFSET: &str = "FORK_CHILD_PID_OFFSET";
    /// Which thread serves which span: the `fathom-http` object's map of
    /// the same name ([`crate::http::names::SERVING`]), shared when both
    /// run.
    pub const SERVING: &str = "SERVING";
}

/// FNV-1a style mixing of one stack entry into a running hash. Shared so user
/// space can recompute and verify hashes in tests.
#[inline(always)]
pub const fn hash_step(hash: u64, ip: u64) -> u64 {
    // Multiply-xorshift over whole words: cheap in BPF, good dispersion.
    let h = (hash ^ ip).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
}

/// Seed of the stack hash; the kind of stack is mixed in so a user stack and a
/// kernel stack never share a hash.
pub const HASH_SEED_USER: u64 = 0xcbf2_9ce4_8422_2325;
pub const HASH_SEED_KERNEL: u64 = 0x8422_2325_cbf2_9ce4;

/// Hash of a stack as the BPF program computes it: over all
/// [`MAX_STACK_DEPTH`] entries, the ones past the stack being zero (as
/// `bpf_get_stack` leaves them), then moved out of the marker range.
pub fn stack_hash(seed: u64, ips: &[u64]) -> u64 {
    let mut h = seed;
    let mut i = 0;
    while i < MAX_STACK_DEPTH {
        h = hash_step(h, if i < ips.len() { ips[i] } else { 0 });
        i += 1;
    }
    finish_hash(h)
}

/// Moves a hash out of the marker range.
#[inline(always)]
pub const fn finish_hash(h: u64) -> u64 {
    if h < stack_id::FIRST_HASH {
        h + stack_id::FIRST_HASH
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_pads_with_zeros_and_avoids_markers() {
        let short = [0xffff_ffff_8100_0000u64, 0x55d0_c5a0_2000];
        let mut padded = [0u64; MAX_STACK_DEPTH];
        padded[..2].copy_from_slice(&short);
        assert_eq!(
            stack_hash(HASH_SEED_USER, &short),
            stack_hash(HASH_SEED_USER, &padded)
        );
        assert_ne!(
            stack_hash(HASH_SEED_USER, &short),
            stack_hash(HASH_SEED_KERNEL, &short)
        );
        assert_ne!(
            stack_hash(HASH_SEED_USER, &short),
            stack_hash(HASH_SEED_USER, &short[..1])
        );
        assert!(finish_hash(3) >= stack_id::FIRST_HASH);
        assert_eq!(finish_hash(1 << 40), 1 << 40);
    }
}
