//! The Python stage of the sampling chain (`profile_python`): the sampled
//! thread's CPython frames, as code object addresses, for processes user
//! space put in `PYTHON_PROCS`. The contract is `fathom_common::python`.
//!
//! Like the table unwinder, the walk is one flat `bpf_loop` whose callback
//! makes one step (one thread of the interpreter's list, or one frame),
//! its state in this CPU's `SAMPLE`: the verifier checks the callback once.

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::{
    helpers::{bpf_probe_read_user, generated::bpf_loop},
    macros::perf_event,
    programs::PerfEventContext,
};
use fathom_common::{
    profiler::{Counter, MAX_STACK_DEPTH, Stack},
    python::{ENTRY_BIT, HASH_SEED_PYTHON, MAX_THREADS, NONE, PyProcess, entry},
};

use super::{
    maps::{PYTHON_PROCS, SAMPLE, STACK_CHUNKS_0, STACK_CHUNKS_1, STACK_INDEX_0, STACK_INDEX_1},
    sample::{NO_STACK, StackStore, acknowledge, bump, stored, tail_call},
};
use fathom_common::profiler::stage;

/// The Python walk's state and frames (in this CPU's `SAMPLE`).
#[repr(C)]
pub struct PyWalk {
    /// The thread state being looked at, then the frame.
    cursor: u64,
    tid: u32,
    frames: u32,
    /// A [`phase`].
    phase: u32,
    /// Non-zero: the walk failed.
    failed: u32,
    process: PyProcess,
    /// Code object addresses, innermost first, zero-filled past the last.
    pub stack: Stack,
}

mod phase {
    /// Looking for the sampled thread's state.
    pub const THREAD: u32 = 0;
    /// Following the frame chain.
    pub const FRAMES: u32 = 1;
    /// Stopped.
    pub const DONE: u32 = 2;
}

/// Steps of a whole walk.
const MAX_STEPS: u32 = MAX_THREADS + MAX_STACK_DEPTH as u32 + 1;

/// Whether `pid` is a Python process whose frames are walked.
#[inline(always)]
pub fn wants(pid: u32) -> bool {
    PYTHON_PROCS.get_ptr(pid).is_some()
}

#[perf_event]
pub fn profile_python(ctx: PerfEventContext) -> u32 {
    let Some(sample) = SAMPLE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's sample, filled by the stages before.
    let sample = unsafe { &mut *sample };
    sample.python_stack = try_profile_python(sample.pid, sample.tid, sample.generation & 1);
    tail_call(&ctx, stage::RECORD);
    acknowledge(sample.generation);
    0
}

/// Walks the thread's Python frames and stores them; returns the stored
/// stack's id (`stack_id::EMPTY` when there are none).
fn try_profile_python(pid: u32, tid: u32, set: u64) -> u64 {
    // SAFETY: a valid map value; user space replaces it whole.
    let Some(process) = PYTHON_PROCS.get_ptr(pid).map(|p| unsafe { *p }) else {
        return stored_python(set, NO_STACK);
    };
    let Some(walk) = walk() else {
        return stored_python(set, NO_STACK);
    };
    bump(Counter::PythonWalks);
    for slot in walk.stack.ips.iter_mut() {
        *slot = 0;
    }
    walk.tid = tid;
    walk.frames = 0;
    walk.failed = 0;
    walk.process = process;
    let start = if process.tstate_native_thread_id == NONE {
        read_user(process.runtime.wrapping_add(process.tstate_current as u64))
            .and_then(|tstate| first_frame(&process, tstate))
            .map(|frame| (frame, phase::FRAMES))
    } else {
        read_user(
            process
                .runtime
                .wrapping_add(process.interpreters_head as u64),
        )
        .and_then(|interp| read_user(interp.wrapping_add(process.threads_head as u64)))
        .map(|tstate| (tstate, phase::THREAD))
    };
    match start {
        Some((cursor, phase)) if cursor != 0 => {
            walk.cursor = cursor;
            walk.phase = phase;
            // SAFETY: `step` has the callback signature bpf_loop requires.
            unsafe { bpf_loop(MAX_STEPS, step as *mut c_void, null_mut(), 0) };
        }
        _ => walk.failed = 1,
    }
    if walk.failed != 0 || walk.frames == 0 {
        bump(Counter::PythonWalkFailed);
        return stored_python(set, NO_STACK);
    }
    stored_python(set, walk.frames as i32)
}

#[inline(always)]
fn stored_python(set: u64, len: i32) -> u64 {
    let Some(walk) = walk() else {
        return 0;
    };
    let store = if set == 0 {
        StackStore {
            set: 0,
            index: &STACK_INDEX_0,
            chunks: &STACK_CHUNKS_0,
        }
    } else {
        StackStore {
            set: 1,
            index: &STACK_INDEX_1,
            chunks: &STACK_CHUNKS_1,
        }
    };
    stored(&store, &walk.stack, len, HASH_SEED_PYTHON)
}

/// This CPU's walk.
#[inline(always)]
fn walk() -> Option<&'static mut PyWalk> {
    let sample = SAMPLE.get_ptr_mut(0)?;
    // SAFETY: this CPU's map value; perf-event programs do not nest on a CPU.
    Some(unsafe { &mut (*sample).python })
}

/// The innermost frame of a thread state.
#[inline(always)]
fn first_frame(process: &PyProcess, tstate: u64) -> Option<u64> {
    let frame = read_user(tstate.wrapping_add(process.tstate_frame as u64))?;
    if process.cframe_current_frame == NONE {
        Some(frame)
    } else {
        read_user(frame.wrapping_add(process.cframe_current_frame as u64))
    }
}

extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = walk() else {
        return 1;
    };
    let more = match walk.phase {
        phase::THREAD => thread_step(walk),
        phase::FRAMES => frame_step(walk),
        _ => None,
    };
    match more {
        Some(true) => 0,
        Some(false) => {
            walk.phase = phase::DONE;
            1
        }
        None => {
            walk.failed = 1;
            walk.phase = phase::DONE;
            1
        }
    }
}

/// One thread state of the list: the sampled thread's gives its first frame.
fn thread_step(walk: &mut PyWalk) -> Option<bool> {
    let process = walk.process;
    let tstate = walk.cursor;
    let id = read_user(tstate.wrapping_add(process.tstate_native_thread_id as u64))?;
    if id == walk.tid as u64 {
        let frame = first_frame(&process, tstate)?;
        if frame == 0 {
            return None;
        }
        walk.cursor = frame;
        walk.phase = phase::FRAMES;
        return Some(true);
    }
    let next = read_user(tstate.wrapping_add(process.tstate_next as u64))?;
    if next == 0 {
        return None;
    }
    walk.cursor = next;
    Some(true)
}

/// One frame: its code object, then on to its caller.
fn frame_step(walk: &mut PyWalk) -> Option<bool> {
    let process = walk.process;
    let frame = walk.cursor;
    let code = read_user(frame.wrapping_add(process.frame_code as u64))?;
    let previous = read_user(frame.wrapping_add(process.frame_previous as u64))?;
    let (push, ends_call) = match process.entry_kind {
        entry::EVERY_FRAME => (true, true),
        entry::IS_ENTRY_FLAG => (true, read_byte(frame, process.entry_offset)? != 0),
        _ => {
            // A shim frame ends the call of the frame before it.
            if read_byte(frame, process.entry_offset)? == entry::OWNED_BY_CSTACK {
                let last = walk.frames.wrapping_sub(1) as usize;
                if let Some(ip) = walk.stack.ips.get_mut(last) {
                    *ip |= ENTRY_BIT;
                }
                (false, false)
            } else {
                (true, false)
            }
        }
    };
    if push && code != 0 {
        let Some(slot) = walk.stack.ips.get_mut(walk.frames as usize) else {
            return Some(false); // truncated
        };
        *slot = if ends_call { code | ENTRY_BIT } else { code };
        walk.frames += 1;
    }
    walk.cursor = previous;
    Some(previous != 0)
}

#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: the helper checks the address; a fault is an error value.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
fn read_byte(base: u64, offset: u32) -> Option<u8> {
    // SAFETY: as above.
    unsafe { bpf_probe_read_user(base.wrapping_add(offset as u64) as *const u8) }.ok()
}

/// A forked child or an exec'd image is not walked until user space has
/// looked at it again.
#[inline(always)]
pub fn forget(pid: u32) {
    let _ = PYTHON_PROCS.remove(pid);
}
