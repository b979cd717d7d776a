//! CPU profiler: a perf-event program sampling stacks into double-buffered
//! maps, plus two scheduler tracepoints that keep process discovery right
//! across fork and exec. The contract is documented in
//! `fathom_common::profiler`.

use core::{ffi::c_void, mem::size_of, ptr::read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_get_stack},
    macros::{map, perf_event, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{PerfEventContext, TracePointContext},
};
use fathom_common::profiler::{
    COMM_LEN, Counter, HASH_SEED_KERNEL, HASH_SEED_USER, MAX_STACK_DEPTH, ProcessEvent, SampleKey,
    Stack, finish_hash, hash_step, stack_id,
};

/// Non-zero: sample only processes in `PID_FILTER`. Set by the loader.
#[unsafe(no_mangle)]
static FILTER_PIDS: u8 = 0;
/// Offset of `child_pid` in the `sched_process_fork` record; the loader reads
/// it from the tracepoint's format file.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;

const EEXIST: i32 = 17;

// Sizes are defaults; the loader sets them from the agent's configuration.
//
// The count maps are preallocated: an insert fails only when the map is
// full. Without preallocation the kernel allocates elements from per-CPU
// caches refilled with GFP_NOWAIT, charged to the agent's memory cgroup; in
// a pod near its memory limit (page cache counts) a refill can fail and so
// does the insert, on a map that is nearly empty. The stack maps are not
// preallocated (1 KiB per entry): preallocated, they showed stack "collisions"
// under frequent drains (1-37 per 6,700 samples in the drain test) that the
// non-preallocated maps never show; not understood yet.
/// Per-CPU values: counting needs no atomics; user space sums the CPUs.
#[map]
static COUNTS_0: PerCpuHashMap<SampleKey, u64> = PerCpuHashMap::with_max_entries(1024, 0);
#[map]
static COUNTS_1: PerCpuHashMap<SampleKey, u64> = PerCpuHashMap::with_max_entries(1024, 0);
#[map]
static STACKS_0: HashMap<u64, Stack> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);
#[map]
static STACKS_1: HashMap<u64, Stack> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);
/// `[0]`: generation; its low bit selects the set being written.
#[map]
static CONTROL: Array<u64> = Array::with_max_entries(1, 0);
/// Per CPU: the generation the last completed program run on it saw.
#[map]
static ACK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);
/// Processes user space has been told about.
#[map]
static KNOWN_PIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(65536, 0);
#[map]
static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
/// Per-CPU scratch space for one stack (too large for the 512-byte BPF stack).
#[map]
static SCRATCH: PerCpuArray<Stack> = PerCpuArray::with_max_entries(1, 0);

#[perf_event]
pub fn profile_cpu(ctx: PerfEventContext) -> u32 {
    bump(Counter::Samples);
    let generation = CONTROL.get(0).copied().unwrap_or(0);
    // Errors are already counted where they happen.
    let _ = try_profile_cpu(&ctx, generation);
    // Acknowledge last: once user space sees the new generation here, no run
    // on this CPU can still be writing the old set.
    if let Some(ack) = ACK.get_ptr_mut(0) {
        // SAFETY: a valid per-CPU map value; perf-event programs do not nest.
        unsafe { *ack = generation };
    }
    0
}

fn try_profile_cpu(ctx: &PerfEventContext, generation: u64) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if pid == 0 {
        bump(Counter::Idle);
        return Ok(());
    }
    // SAFETY: a plain read of a loader-set global.
    if unsafe { read_volatile(&FILTER_PIDS) } != 0 && PID_FILTER.get_ptr(pid).is_none() {
        bump(Counter::Filtered);
        return Ok(());
    }
    notice_process(pid);

    let set = generation & 1;
    let (counts, stacks) = if set == 0 {
        (&COUNTS_0, &STACKS_0)
    } else {
        (&COUNTS_1, &STACKS_1)
    };
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    let user_stack = store_stack(
        ctx,
        scratch,
        stacks,
        BPF_F_USER_STACK as u64,
        HASH_SEED_USER,
    );
    let kernel_stack = store_stack(ctx, scratch, stacks, 0, HASH_SEED_KERNEL);
    let key = SampleKey {
        pid,
        tid,
        user_stack,
        kernel_stack,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    count_sample(counts, &key)?;
    bump(Counter::recorded(set));
    Ok(())
}

/// Walks one stack into the scratch buffer and stores it under its hash.
/// Returns the hash, or a `stack_id` marker saying why there is none.
fn store_stack(
    ctx: &PerfEventContext,
    scratch: *mut Stack,
    stacks: &HashMap<u64, Stack>,
    flags: u64,
    seed: u64,
) -> u64 {
    // SAFETY: `scratch` points at this CPU's map value, large enough for
    // MAX_STACK_DEPTH entries.
    let ret = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            (*scratch).ips.as_mut_ptr() as *mut c_void,
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
        return stack_id::WALK_FAILED;
    }
    let len = ret as usize / size_of::<u64>();
    if len == 0 {
        return stack_id::EMPTY;
    }
    // SAFETY: as above.
    let stack = unsafe { &mut *scratch };
    stack.len = len as u64;
    // bpf_get_stack zero-fills the buffer past the stack, so hashing (and
    // comparing) all entries gives the same result as stopping at `len`,
    // without a data-dependent exit per iteration for the verifier to fork
    // on (that made loading take over a second).
    let mut hash = seed;
    for i in 0..MAX_STACK_DEPTH {
        hash = hash_step(hash, stack.ips[i]);
    }
    let hash = finish_hash(hash);

    if let Some(stored) = stacks.get_ptr(hash) {
        // SAFETY: a valid map value; entries are never modified once stored.
        let stored = unsafe { &*stored };
        if !same_stack(stored, stack) {
            bump(Counter::StackCollision);
            return stack_id::COLLISION;
        }
        return hash;
    }
    match stacks.insert(hash, &*stack, BPF_NOEXIST as u64) {
        // Another CPU stored it first; with a 64-bit hash it is the same stack.
        Ok(()) => hash,
        Err(e) if e == -EEXIST => hash,
        Err(_) => {
            bump(Counter::StackMapFull);
            stack_id::MAP_FULL
        }
    }
}

/// Branch-free comparison of two stacks (see `store_stack`).
fn same_stack(a: &Stack, b: &Stack) -> bool {
    let mut diff = a.len ^ b.len;
    for i in 0..MAX_STACK_DEPTH {
        diff |= a.ips[i] ^ b.ips[i];
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
fn notice_process(pid: u32) {
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
fn bump(counter: Counter) {
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
    Ok(())
}

/// After `execve` the process has new mappings: forget it so its next sample
/// makes user space read them again.
#[tracepoint]
pub fn profile_exec(_ctx: TracePointContext) -> u32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = KNOWN_PIDS.remove(pid);
    0
}
