//! CPU profiler: a chain of perf-event programs sampling stacks into
//! double-buffered maps, plus two scheduler tracepoints that keep process
//! discovery right across fork and exec. The contract is documented in
//! `fathom_common::profiler`.
//!
//! A sample runs through up to four small programs, chained by tail calls
//! (as the OpenTelemetry eBPF profiler chains its unwinders) so that each
//! verifies in bounded effort on every kernel: `profile_cpu` (attached to
//! every CPU) filters, takes the kernel stack and, for a process without
//! unwind tables, the user stack by frame pointers; `profile_unwind` walks
//! the user stack by its tables; `profile_python` (`python`), for a Python
//! process, walks its interpreter's frames; `profile_record` stores the
//! stacks and counts the sample. The sample in progress lives in this CPU's `SAMPLE`.
//! Without `profile_unwind` (it could not load) user stacks are walked by
//! frame pointers; the chain acknowledges the generation in its last stage.

use core::{ffi::c_void, mem::size_of, ptr::read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_get_stack},
    macros::{perf_event, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{PerfEventContext, TracePointContext},
};
use fathom_common::{
    profiler::{
        COMM_LEN, Counter, HASH_SEED_KERNEL, HASH_SEED_USER, MAX_STACK_CHUNKS, MAX_STACK_DEPTH,
        ProcessEvent, STACK_CHUNK_WORDS, SampleKey, Stack, StackChunk, StackSlot, finish_hash,
        hash_step, stack_chunks, stack_id, stage,
    },
    unwind::{UnwindProcess, status},
};

use super::{maps::*, python, unwind};

/// Non-zero: sample only processes in `PID_FILTER`. Set by the loader.
#[unsafe(no_mangle)]
static FILTER_PIDS: u8 = 0;
/// Offset of `child_pid` in the `sched_process_fork` record; the loader reads
/// it from the tracepoint's format file.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;

const EEXIST: i32 = 17;

/// A sample in progress.
#[repr(C)]
pub struct Sample {
    /// The generation read by `profile_cpu`, acknowledged by the last stage.
    pub generation: u64,
    pub pid: u32,
    pub tid: u32,
    comm: [u8; COMM_LEN],
    /// The span the thread serves ([`serving_span`]).
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// A `status` of the user stack's walk.
    pub user_unwind: u32,
    /// Frames in `walk.stack`; [`NO_STACK`] or [`WALK_FAILED`] when none.
    pub user_len: i32,
    /// Frames in `kernel`; likewise.
    pub kernel_len: i32,
    /// Off-CPU: non-zero from `offcpu_switch` capturing the stacks of the
    /// thread leaving the CPU to `offcpu_store` storing them (the sampling
    /// chain leaves it alone).
    pub off_cpu_pending: u32,
    /// The process's unwind tables, for `profile_unwind`.
    pub process: UnwindProcess,
    /// The user stack's walk (its frames: `walk.stack`).
    pub walk: unwind::Walk,
    pub kernel: Stack,
    /// The Python frames' stored stack (`stack_id::EMPTY`: none), set by
    /// `profile_python`.
    pub python_stack: u64,
    /// The Python walk (its frames: `python.stack`).
    pub python: python::PyWalk,
}

/// `Sample::user_len`/`kernel_len`: the sample has no such stack.
pub const NO_STACK: i32 = 0;
/// `Sample::user_len`/`kernel_len`: the walk failed.
pub const WALK_FAILED: i32 = -1;
/// `Sample::user_len`/`kernel_len`: not walked (off-CPU capture budget).
pub const NOT_CAPTURED: i32 = -2;

/// One set of the stack store.
pub struct StackStore {
    /// Index of this store's arena cursor in `STACK_NEXT`.
    pub set: u32,
    pub index: &'static PerCpuHashMap<u64, StackSlot>,
    pub chunks: &'static PerCpuArray<StackChunk>,
}

#[perf_event]
pub fn profile_cpu(ctx: PerfEventContext) -> u32 {
    bump(Counter::Samples);
    let generation = CONTROL.get(0).copied().unwrap_or(0);
    if let Ok(next) = try_profile_cpu(&ctx, generation) {
        if next == stage::UNWIND {
            tail_call(&ctx, stage::UNWIND);
            // No table unwinder: walk the user stack by frame pointers.
            if let Some(sample) = SAMPLE.get_ptr_mut(0) {
                // SAFETY: this CPU's sample, ours until the chain ends.
                frame_pointer_user_stack(&ctx, unsafe { &mut *sample });
            }
        }
        if next != NONE {
            to_record(&ctx, (bpf_get_current_pid_tgid() >> 32) as u32);
        }
    }
    // Acknowledge last: once user space sees the new generation here, no run
    // on this CPU can still be writing the old set.
    acknowledge(generation);
    0
}

/// No further stage: the sample is not recorded.
const NONE: u32 = u32::MAX;

/// Tail-calls a stage; returns (counted) when it is not there.
#[inline(always)]
pub fn tail_call(ctx: &PerfEventContext, stage: u32) {
    // SAFETY: on success the stage replaces this program; its context is
    // this one (all stages are perf-event programs).
    unsafe { PROFILE_STAGES.tail_call(ctx, stage) };
    bump(Counter::StageMissing);
}

/// Tail-calls the Python walk for a Python process, then (it being absent
/// or not wanted) the recording stage.
#[inline(always)]
fn to_record(ctx: &PerfEventContext, pid: u32) {
    if python::wants(pid) {
        tail_call(ctx, stage::PYTHON);
    }
    tail_call(ctx, stage::RECORD);
}

#[inline(always)]
pub fn acknowledge(generation: u64) {
    if let Some(ack) = ACK.get_ptr_mut(0) {
        // SAFETY: a valid per-CPU map value; perf-event programs do not nest.
        unsafe { *ack = generation };
    }
}

/// The first stage: the sample's process and kernel stack. Returns the next
/// stage, or [`NONE`].
fn try_profile_cpu(ctx: &PerfEventContext, generation: u64) -> Result<u32, ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if pid == 0 {
        bump(Counter::Idle);
        return Ok(NONE);
    }
    if filtered_out(pid) {
        bump(Counter::Filtered);
        return Ok(NONE);
    }
    notice_process(pid);
    let sample = SAMPLE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's sample; perf-event programs do not nest on a CPU.
    let sample = unsafe { &mut *sample };
    sample.generation = generation;
    sample.pid = pid;
    sample.tid = tid;
    sample.comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    sample.python_stack = stack_id::EMPTY;
    (sample.trace_id, sample.span_id) = serving_span(tid);
    sample.kernel_len = kernel_walk(ctx, &mut sample.kernel, 0);
    if let Some(process) = unwind::wants(pid) {
        sample.process = process;
        return Ok(stage::UNWIND);
    }
    frame_pointer_user_stack(ctx, sample);
    Ok(stage::RECORD)
}

/// The trace and span ids of the server request thread `tid` serves, when
/// it serves exactly one (the HTTP tracer's `SERVING`); zeros otherwise. A
/// thread with several open requests (an event loop) gets none rather than
/// a guess.
#[inline(always)]
pub fn serving_span(tid: u32) -> ([u8; 16], [u8; 8]) {
    // SAFETY: copied out of the map value at once.
    match unsafe { SERVING.get(&tid) } {
        Some(s) if s.open == 1 => (s.ctx.trace_id, s.ctx.span_id),
        _ => ([0; 16], [0; 8]),
    }
}

/// Whether `pid` is outside the pid filter (when there is one).
#[inline(always)]
pub fn filtered_out(pid: u32) -> bool {
    // SAFETY: a plain read of a loader-set global.
    let filter = unsafe { read_volatile(&FILTER_PIDS) };
    filter != 0 && PID_FILTER.get_ptr(pid).is_none()
}

/// The user stack as the kernel walks it, by frame pointers.
#[inline(always)]
fn frame_pointer_user_stack(ctx: &PerfEventContext, sample: &mut Sample) {
    sample.user_unwind = status::KERNEL_FRAME_POINTERS;
    sample.user_len = kernel_walk(ctx, &mut sample.walk.stack, BPF_F_USER_STACK as u64);
}

/// The second stage: the user stack walked by the process's unwind tables.
#[perf_event]
pub fn profile_unwind(ctx: PerfEventContext) -> u32 {
    let Some(sample) = SAMPLE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's sample, filled by `profile_cpu`.
    let sample = unsafe { &mut *sample };
    let (status, frames) = unwind::walk_user_stack(ctx.ctx, sample.process);
    sample.user_unwind = status;
    sample.user_len = frames.map_or(NO_STACK, |n| n as i32);
    to_record(&ctx, sample.pid);
    acknowledge(sample.generation);
    0
}

/// The last stage: stores the sample's stacks and counts it.
#[perf_event]
pub fn profile_record(_ctx: PerfEventContext) -> u32 {
    let Some(sample) = SAMPLE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's sample, filled by the stages before.
    let sample = unsafe { &mut *sample };
    let _ = try_profile_record(sample);
    acknowledge(sample.generation);
    0
}

fn try_profile_record(sample: &mut Sample) -> Result<(), ()> {
    let set = sample.generation & 1;
    let (counts, store) = if set == 0 {
        (
            &COUNTS_0,
            StackStore {
                set: 0,
                index: &STACK_INDEX_0,
                chunks: &STACK_CHUNKS_0,
            },
        )
    } else {
        (
            &COUNTS_1,
            StackStore {
                set: 1,
                index: &STACK_INDEX_1,
                chunks: &STACK_CHUNKS_1,
            },
        )
    };
    let user_stack = stored(&store, &sample.walk.stack, sample.user_len, HASH_SEED_USER);
    let kernel_stack = stored(&store, &sample.kernel, sample.kernel_len, HASH_SEED_KERNEL);
    let key = SampleKey {
        pid: sample.pid,
        tid: sample.tid,
        user_stack,
        kernel_stack,
        comm: sample.comm,
        user_unwind: sample.user_unwind,
        _reserved: 0,
        trace_id: sample.trace_id,
        span_id: sample.span_id,
        python_stack: sample.python_stack,
    };
    count_sample(counts, &key)?;
    bump(Counter::recorded(set));
    Ok(())
}

/// The stack's id in the store: its hash, or a `stack_id` marker.
#[inline(always)]
pub fn stored(store: &StackStore, stack: &Stack, len: i32, seed: u64) -> u64 {
    match len {
        WALK_FAILED => stack_id::WALK_FAILED,
        NOT_CAPTURED => stack_id::NOT_CAPTURED,
        n if n <= NO_STACK => stack_id::EMPTY,
        n => store_stack(store, stack, n as u32, seed),
    }
}

/// Lets the kernel walk a stack (by frame pointers for user stacks) into
/// `stack`, zero-filled past its end. Returns its length, or [`WALK_FAILED`].
#[inline(always)]
pub(crate) fn kernel_walk<C: EbpfContext>(ctx: &C, stack: &mut Stack, flags: u64) -> i32 {
    // SAFETY: `stack` is a map value of MAX_STACK_DEPTH entries.
    let ret = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            stack.ips.as_mut_ptr() as *mut c_void,
            (MAX_STACK_DEPTH * size_of::<u64>()) as u32,
            flags,
        )
    };
    if ret < 0 {
        bump(if flags == 0 {
            Counter::KernelStackFailed
        } else {
            Counter::UserStackFailed
        });
        return WALK_FAILED;
    }
    (ret as usize / size_of::<u64>()) as i32
}

/// Stores a stack of `len` entries (zero-filled past its end) under its
/// hash. Returns the hash, or a `stack_id` marker saying why there is none.
fn store_stack(store: &StackStore, stack: &Stack, len: u32, seed: u64) -> u64 {
    if len == 0 || len > MAX_STACK_DEPTH as u32 {
        return stack_id::EMPTY;
    }
    // Hashing (and comparing) all entries, the zeros included, gives the
    // same result as stopping at the end, without a data-dependent exit per
    // iteration for the verifier to fork on.
    let mut hash = seed;
    for i in 0..MAX_STACK_DEPTH {
        hash = hash_step(hash, stack.ips[i]);
    }
    let hash = finish_hash(hash);
    let chunks = stack_chunks(len as usize) as u32;

    let existing = store.index.get_ptr_mut(hash);
    if let Some(slot) = existing {
        // SAFETY: this CPU's value of the entry; only this CPU writes it.
        let slot = unsafe { *slot };
        if slot.first != 0 {
            return if same_stack(store, slot, stack) {
                hash
            } else {
                bump(Counter::StackCollision);
                stack_id::COLLISION
            };
        }
    }
    // Not stored by this CPU yet: take chunks from its arena.
    let Some(next) = STACK_NEXT.get_ptr_mut(store.set) else {
        return stack_id::MAP_FULL;
    };
    // SAFETY: this CPU's counter; programs do not nest on a CPU.
    let first = unsafe { *next };
    for c in 0..MAX_STACK_CHUNKS {
        if c as u32 >= chunks {
            break;
        }
        let Some(chunk) = store.chunks.get_ptr_mut(first.wrapping_add(c as u32)) else {
            bump(Counter::StackMapFull);
            return stack_id::MAP_FULL;
        };
        // SAFETY: this CPU's chunk; nothing reads it before the index names it.
        let chunk = unsafe { &mut *chunk };
        for w in 0..STACK_CHUNK_WORDS {
            chunk.ips[w] = stack.ips[c * STACK_CHUNK_WORDS + w];
        }
    }
    let slot = StackSlot {
        first: first + 1,
        len,
    };
    let stored = match existing {
        Some(value) => {
            // SAFETY: this CPU's value of the entry.
            unsafe { *value = slot };
            true
        }
        None => match store.index.insert(hash, slot, BPF_NOEXIST as u64) {
            Ok(()) => true,
            // Another CPU added the key meanwhile; this CPU's value is zero.
            Err(e) if e == -EEXIST => match store.index.get_ptr_mut(hash) {
                Some(value) => {
                    // SAFETY: as above.
                    unsafe { *value = slot };
                    true
                }
                None => false,
            },
            Err(_) => false,
        },
    };
    if !stored {
        bump(Counter::StackMapFull);
        return stack_id::MAP_FULL;
    }
    // SAFETY: as above.
    unsafe { *next = first + chunks };
    hash
}

/// Whether the stack this CPU stored at `slot` equals `stack`. Chunks are
/// stored whole (zero-filled past the stack); chunks past the stack's own
/// may belong to other stacks, so there `stack` must be zero.
fn same_stack(store: &StackStore, slot: StackSlot, stack: &Stack) -> bool {
    let len = slot.len as usize;
    if len > MAX_STACK_DEPTH {
        return false;
    }
    let mut diff = 0u64;
    for c in 0..MAX_STACK_CHUNKS {
        let base = c * STACK_CHUNK_WORDS;
        if base < len {
            let Some(chunk) = store.chunks.get(slot.first.wrapping_sub(1) + c as u32) else {
                return false;
            };
            for w in 0..STACK_CHUNK_WORDS {
                diff |= chunk.ips[w] ^ stack.ips[base + w];
            }
        } else {
            for w in 0..STACK_CHUNK_WORDS {
                diff |= stack.ips[base + w];
            }
        }
    }
    diff == 0
}

fn count_sample(counts: &PerCpuHashMap<SampleKey, u64>, key: &SampleKey) -> Result<(), ()> {
    if let Some(count) = counts.get_ptr_mut(key) {
        add_one(count);
        return Ok(());
    }
    match counts.insert(key, 1, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        Err(e) if e == -EEXIST => {
            // Another CPU inserted the key between lookup and insert; this
            // CPU's value is zero.
            let count = counts.get_ptr_mut(key).ok_or(())?;
            add_one(count);
            Ok(())
        }
        Err(_) => {
            bump(Counter::CountMapFull);
            Err(())
        }
    }
}

#[inline(always)]
fn add_one(count: *mut u64) {
    // SAFETY: this CPU's value of a per-CPU map entry; no concurrent writer.
    unsafe { *count += 1 };
}

/// Tells user space about a process the first time one of its samples is seen.
pub fn notice_process(pid: u32) {
    if KNOWN_PIDS.get_ptr(pid).is_some() {
        return;
    }
    if KNOWN_PIDS.insert(pid, 1, BPF_NOEXIST as u64).is_err() {
        return; // another CPU is already telling user space
    }
    let event = ProcessEvent {
        kind: ProcessEvent::NEW,
        pid,
    };
    if PROCESS_EVENTS.output::<ProcessEvent>(&event, 0).is_ok() {
        bump(Counter::ProcessEvents);
    } else {
        bump(Counter::ProcessEventsLost);
        // Forget it so the next sample tries again.
        let _ = KNOWN_PIDS.remove(pid);
    }
}

#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's value; BPF tracing programs do not nest on a CPU.
        unsafe { *value += 1 };
    }
}

/// A new task (process or thread) may reuse a pid user space knew: forget it
/// so its first sample announces it again.
#[tracepoint]
pub fn profile_fork(ctx: TracePointContext) -> u32 {
    let _ = try_profile_fork(&ctx);
    0
}

fn try_profile_fork(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: reads the loader-set global, then the record at an offset taken
    // from the tracepoint's format file.
    let offset = unsafe { read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    let child = unsafe { ctx.read_at::<i32>(offset) }?;
    let _ = KNOWN_PIDS.remove(child as u32);
    unwind::forget(child as u32);
    python::forget(child as u32);
    Ok(())
}

/// After `execve` the process has new mappings: forget it so its next sample
/// makes user space read them again.
#[tracepoint]
pub fn profile_exec(_ctx: TracePointContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = KNOWN_PIDS.remove(pid);
    unwind::forget(pid);
    python::forget(pid);
    0
}
