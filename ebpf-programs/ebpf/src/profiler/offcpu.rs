//! Off-CPU profiling: one program on the `sched_switch` BTF tracepoint. The
//! contract is documented in `fathom_common::profiler::OffCpuStart`.
//!
//! At this hook `current` is still `prev`: the thread leaving the CPU. Its
//! kernel stack (into `__schedule`) and its user stack (by its unwind tables
//! when user space loaded them, else by frame pointers, from the registers
//! saved on entry to the kernel) are where it waits; they are stored with
//! the time. When `next` is a thread with a start, it is coming back: the
//! time away, if at least `OFFCPU_MIN_NS`, is counted under those stacks.
//!
//! The program runs inside the scheduler with interrupts off, so it never
//! nests with the perf-event chain on a CPU (that runs in a timer interrupt):
//! both share this CPU's `SAMPLE` scratch and `ACK`.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::btf_tracepoint,
    maps::PerCpuHashMap,
    programs::BtfTracePointContext,
};
use fathom_common::{
    profiler::{
        COMM_LEN, Counter, HASH_SEED_KERNEL, HASH_SEED_USER, OffCpuStart, SampleKey,
        off_cpu_stack_next, stack_id,
    },
    unwind::status,
};

use super::{
    maps::*,
    sample::{
        NO_STACK, NOT_CAPTURED, StackStore, acknowledge, bump, filtered_out, kernel_walk,
        notice_process, serving_span, stored,
    },
    unwind,
};

/// Shortest blocked interval counted. Set by the loader.
#[unsafe(no_mangle)]
static OFFCPU_MIN_NS: u64 = 1_000_000;
/// Stack captures allowed per CPU per [`BUDGET_PERIOD_NS`] (0: no limit).
/// Set by the loader.
#[unsafe(no_mangle)]
static OFFCPU_MAX_STACKS: u64 = 0;
const BUDGET_PERIOD_NS: u64 = 100_000_000;

/// Offset of `pid` (thread id) in `struct task_struct`. Set by the loader
/// from the kernel's BTF.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u32 = 0;

const EEXIST: i32 = 17;

/// `next` comes back. A program of its own (both are attached to
/// `sched_switch`; `prev` and `next` are different threads, so their order
/// does not matter): together with `offcpu_switch` the verifier's effort
/// on 6.1 was over the budget, the paths of one multiplying the other's.
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_switch_in(ctx: BtfTracePointContext) -> u32 {
    let generation = CONTROL.get(0).copied().unwrap_or(0);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = switch_in(&ctx, generation, now);
    acknowledge(generation);
    0
}

/// `prev` leaves the CPU: its stacks into this CPU's `SAMPLE`.
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_switch(ctx: BtfTracePointContext) -> u32 {
    let _ = switch_out(&ctx);
    0
}

/// Stores the stacks `offcpu_switch` captured and the start. A third
/// program, attached after it (the programs of a tracepoint run in attach
/// order, here one after the other with interrupts off): in one program the
/// walk's two ways (tables or frame pointers) doubled the verifier's effort
/// on storing, past the budget on 6.1.
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_store(_ctx: BtfTracePointContext) -> u32 {
    let generation = CONTROL.get(0).copied().unwrap_or(0);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = store(generation, now);
    acknowledge(generation);
    0
}

/// `next` comes back: counts the time it was away.
fn switch_in(ctx: &BtfTracePointContext, generation: u64, now: u64) -> Result<(), ()> {
    // sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)
    let next: *const u8 = ctx.arg(2);
    // SAFETY: reads a loader-set global, then an i32 of `next` through the
    // helper (a fault is an error value).
    let offset = unsafe { read_volatile(&TASK_PID_OFFSET) } as usize;
    let tid = unsafe { bpf_probe_read_kernel(next.wrapping_add(offset) as *const i32) }
        .map_err(|_| ())? as u32;
    if tid == 0 {
        return Ok(());
    }
    // SAFETY: a map value; copied before the entry is removed.
    let start = unsafe { *OFFCPU_START.get_ptr(tid).ok_or(())? };
    let _ = OFFCPU_START.remove(tid);
    let away = now.saturating_sub(start.at_ns);
    // SAFETY: a plain read of a loader-set global.
    if away < unsafe { read_volatile(&OFFCPU_MIN_NS) } {
        bump(Counter::OffCpuShort);
        return Ok(());
    }
    let set = generation & 1;
    let counts = if set == 0 {
        &OFFCPU_COUNTS_0
    } else {
        &OFFCPU_COUNTS_1
    };
    // The span it served when it left: it has not run since.
    let (trace_id, span_id) = serving_span(tid);
    let key = SampleKey {
        pid: start.pid,
        tid,
        user_stack: start.user_stack,
        kernel_stack: start.kernel_stack,
        comm: start.comm,
        user_unwind: start.user_unwind,
        _reserved: 0,
        trace_id,
        span_id,
        python_stack: stack_id::EMPTY,
    };
    add(counts, &key, away)?;
    bump(Counter::off_cpu_recorded(set));
    Ok(())
}

fn add(counts: &PerCpuHashMap<SampleKey, u64>, key: &SampleKey, ns: u64) -> Result<(), ()> {
    if let Some(value) = counts.get_ptr_mut(key) {
        // SAFETY: this CPU's value; programs do not nest on a CPU.
        unsafe { *value += ns };
        return Ok(());
    }
    match counts.insert(key, ns, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        Err(e) if e == -EEXIST => {
            let value = counts.get_ptr_mut(key).ok_or(())?;
            // SAFETY: as above.
            unsafe { *value += ns };
            Ok(())
        }
        Err(_) => {
            bump(Counter::OffCpuCountMapFull);
            Err(())
        }
    }
}

/// `prev` (the current task) leaves the CPU: captures its stacks.
fn switch_out(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if pid == 0 || filtered_out(pid) {
        return Ok(());
    }
    notice_process(pid);
    let sample = SAMPLE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch sample; nothing else runs on this CPU now.
    let sample = unsafe { &mut *sample };
    sample.pid = pid;
    sample.tid = tid;
    sample.off_cpu_pending = 1;
    if !within_budget() {
        // Timed all the same; its stacks say why they are missing.
        bump(Counter::OffCpuNotCaptured);
        sample.kernel_len = NOT_CAPTURED;
        sample.user_len = NOT_CAPTURED;
        sample.user_unwind = status::KERNEL_FRAME_POINTERS;
        return Ok(());
    }
    sample.kernel_len = kernel_walk(ctx, &mut sample.kernel, 0);
    if let Some(process) = unwind::wants(pid) {
        let (status, frames) = unwind::walk_user_stack(core::ptr::null_mut(), process);
        sample.user_unwind = status;
        sample.user_len = frames.map_or(NO_STACK, |n| n as i32);
    } else {
        sample.user_unwind = status::KERNEL_FRAME_POINTERS;
        sample.user_len = kernel_walk(ctx, &mut sample.walk.stack, BPF_F_USER_STACK as u64);
    }
    Ok(())
}

/// Whether this CPU may walk one more pair of stacks in the current
/// period (and counts it). Walking costs microseconds per switch; a storm
/// of short waits would otherwise cost a CPU.
#[inline(always)]
fn within_budget() -> bool {
    // SAFETY: a plain read of a loader-set global.
    let max = unsafe { read_volatile(&OFFCPU_MAX_STACKS) };
    if max == 0 {
        return true;
    }
    let Some(budget) = OFFCPU_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's value; the scheduler does not nest on a CPU.
    let budget = unsafe { &mut *budget };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(budget[0]) >= BUDGET_PERIOD_NS {
        budget[0] = now;
        budget[1] = 0;
    }
    if budget[1] >= max {
        return false;
    }
    budget[1] += 1;
    true
}

/// Stores the captured stacks and the start of the current thread.
fn store(generation: u64, now: u64) -> Result<(), ()> {
    let sample = SAMPLE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch sample; nothing else runs on this CPU now.
    let sample = unsafe { &mut *sample };
    if sample.off_cpu_pending == 0 {
        return Ok(());
    }
    sample.off_cpu_pending = 0;
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if sample.pid != pid || sample.tid != tid {
        return Err(());
    }
    let set = generation & 1;
    let store = if set == 0 {
        StackStore {
            set: off_cpu_stack_next(0),
            index: &OFFCPU_STACK_INDEX_0,
            chunks: &OFFCPU_STACK_CHUNKS_0,
        }
    } else {
        StackStore {
            set: off_cpu_stack_next(1),
            index: &OFFCPU_STACK_INDEX_1,
            chunks: &OFFCPU_STACK_CHUNKS_1,
        }
    };
    let start = OffCpuStart {
        at_ns: now,
        user_stack: stored(&store, &sample.walk.stack, sample.user_len, HASH_SEED_USER),
        kernel_stack: stored(&store, &sample.kernel, sample.kernel_len, HASH_SEED_KERNEL),
        pid,
        user_unwind: sample.user_unwind,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    OFFCPU_START.insert(tid, start, 0).map_err(|_| ())?;
    bump(Counter::OffCpuSwitchOuts);
    Ok(())
}
