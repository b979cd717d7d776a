//! User-stack unwinding from unwind tables (`.eh_frame`) and frame pointers,
//! per mapping, as user space describes each process in `UNWIND_PROCS`. The
//! contract is documented in `fathom_common::unwind`.
//!
//! The walk is one flat `bpf_loop` whose callback makes one small step of a
//! state machine kept in a map value: start a frame, one step of the binary
//! search for the frame's mapping, or one step of the search for its unwind
//! row (the last one applies the row). No loop is nested in another and every
//! value the callback reads comes from map memory, so the verifier checks the
//! callback once, in a few hundred instructions, on every kernel; the walk
//! can still be [`MAX_STACK_DEPTH`] frames deep with tables of 2^20 rows.

use core::{ffi::c_void, ptr::null_mut};

use super::maps::{SAMPLE, UNWIND_MAPPINGS, UNWIND_PROCS, UNWIND_ROWS};
use aya_ebpf::{
    bindings::bpf_perf_event_data,
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
};
use fathom_common::{
    profiler::{MAX_STACK_DEPTH, Stack},
    unwind::{
        MAX_SEARCH_STEPS, UnwindMapping, UnwindProcess, UnwindRow, cfa, mapping_kind, rbp,
        signal_frame, status,
    },
};

/// Registers of the frame being unwound, and the walk's progress (in this
/// CPU's `SAMPLE`, where the `bpf_loop` callback finds it).
#[repr(C)]
pub struct Walk {
    ip: u64,
    sp: u64,
    bp: u64,
    frames: u32,
    /// A `status`; `IN_PROGRESS` until the walk stops.
    status: u32,
    mappings_start: u32,
    mappings_len: u32,
    /// RBP holds the frame's value (not lost to a rule we do not follow).
    bp_known: u8,
    /// `ip` is where the frame is executing (the leaf, or a frame a signal
    /// interrupted), not a return address: look it up as is, not minus one.
    ip_exact: u8,
    /// `mapping` holds the last mapping found (consecutive frames are
    /// mostly in one file: no search for them).
    mapping_valid: u8,
    /// A [`phase`].
    phase: u8,
    _pad: [u8; 4],
    /// The binary search in progress: the answer is in `lo..hi` of the
    /// searched entries; `target` is the key looked for.
    lo: u32,
    hi: u32,
    target: u64,
    mapping: UnwindMapping,
    /// The frames, zero-filled past the last.
    pub stack: Stack,
}

const IN_PROGRESS: u32 = u32::MAX;

/// What the next step of the walk does.
mod phase {
    /// Record `ip` as a frame and find its mapping.
    pub const FRAME: u8 = 0;
    /// Search the process's mappings for `ip`.
    pub const MAPPING: u8 = 1;
    /// Search the mapping's unwind rows, then apply the row found.
    pub const ROW: u8 = 2;
}

/// Steps of the whole walk: per frame, one to start it and at most
/// `MAX_SEARCH_STEPS + 1` for each of the two searches; plus one that only
/// says "truncated".
const MAX_STEPS: u32 = MAX_STACK_DEPTH as u32 * (1 + 2 * (MAX_SEARCH_STEPS + 1)) + 1;

/// x86-64 `struct pt_regs` offsets, for the registers the kernel saved.
mod regs {
    pub const BP: usize = 32;
    pub const IP: usize = 128;
    pub const CS: usize = 136;
    pub const SP: usize = 152;
}

/// Whether this process's user stack is walked here.
#[inline(always)]
pub fn wants(pid: u32) -> Option<UnwindProcess> {
    // SAFETY: a valid map value; user space replaces it whole.
    UNWIND_PROCS.get_ptr(pid).map(|p| unsafe { *p })
}

/// Walks the current task's user stack into this CPU's `SAMPLE.walk`,
/// from the sampled registers of `ctx` when they are user-mode ones, else
/// (and always when `ctx` is null) from the ones saved on entry to the
/// kernel. Returns a `status` and, unless the task has no user stack, the number of
/// frames.
pub fn walk_user_stack(
    ctx: *mut bpf_perf_event_data,
    process: UnwindProcess,
) -> (u32, Option<u32>) {
    let Some(walk) = walk() else {
        return (status::READ_FAILED, None);
    };
    let Some((ip, sp, bp)) = user_registers(ctx) else {
        return (status::NO_USER_STACK, None);
    };
    for slot in walk.stack.ips.iter_mut() {
        *slot = 0;
    }
    walk.ip = ip;
    walk.sp = sp;
    walk.bp = bp;
    walk.frames = 0;
    walk.status = IN_PROGRESS;
    walk.mappings_start = process.mappings_start;
    walk.mappings_len = process.mappings_len;
    walk.bp_known = 1;
    walk.ip_exact = 1;
    walk.mapping_valid = 0;
    walk.phase = phase::FRAME;
    // SAFETY: `step` has the callback signature bpf_loop requires.
    unsafe { bpf_loop(MAX_STEPS, step as *mut c_void, null_mut(), 0) };
    let outcome = if walk.status == IN_PROGRESS {
        status::TRUNCATED
    } else {
        walk.status
    };
    (outcome, Some(walk.frames))
}

/// This CPU's walk.
#[inline(always)]
fn walk() -> Option<&'static mut Walk> {
    let sample = SAMPLE.get_ptr_mut(0)?;
    // SAFETY: this CPU's map value; perf-event programs do not nest on a
    // CPU, and the walk runs inside one program run.
    Some(unsafe { &mut (*sample).walk })
}

/// The user-mode registers at the sample: the interrupted ones when the CPU
/// was in user mode, else the ones saved on entry to the kernel.
#[inline(always)]
fn user_registers(ctx: *mut bpf_perf_event_data) -> Option<(u64, u64, u64)> {
    if !ctx.is_null() {
        // SAFETY: the program's context: the verifier allows reading its regs.
        let sampled = unsafe { &(*ctx).regs };
        if sampled.cs & 3 == 3 {
            return Some((sampled.rip, sampled.rsp, sampled.rbp));
        }
    }
    let at = |base: *const u8, offset: usize| -> Option<u64> {
        // SAFETY: reads a u64 of a `pt_regs`; a fault is an error value.
        unsafe { bpf_probe_read_kernel(base.add(offset) as *const u64) }.ok()
    };
    // SAFETY: helpers returning the current task and its saved user
    // registers; the result is only read through bpf_probe_read_kernel.
    let saved = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if saved.is_null() || at(saved, regs::CS)? & 3 != 3 {
        // A kernel thread: no user mode to return to.
        return None;
    }
    Some((
        at(saved, regs::IP)?,
        at(saved, regs::SP)?,
        at(saved, regs::BP)?,
    ))
}

/// One step of the walk (see [`phase`]). Returns 0 to go on, 1 to stop.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = walk() else {
        return 1;
    };
    let result = match walk.phase {
        phase::MAPPING => mapping_step(walk),
        phase::ROW => row_step(walk),
        _ => frame_step(walk),
    };
    match result {
        Ok(()) => 0,
        Err(outcome) => {
            walk.status = outcome;
            1
        }
    }
}

/// Records `walk.ip` as a frame and starts looking for its mapping (none
/// to look for when the last frame's mapping holds it).
#[inline(always)]
fn frame_step(walk: &mut Walk) -> Result<(), u32> {
    let n = walk.frames as usize;
    if n >= MAX_STACK_DEPTH {
        return Err(IN_PROGRESS); // truncated: the caller says so
    }
    walk.stack.ips[n] = walk.ip;
    walk.frames += 1;
    if walk.mapping_valid != 0 && walk.mapping.start <= walk.ip && walk.ip < walk.mapping.end {
        return mapping_found(walk);
    }
    start_search(walk, walk.mappings_len, walk.ip, phase::MAPPING);
    Ok(())
}

#[inline(always)]
fn start_search(walk: &mut Walk, len: u32, target: u64, next: u8) {
    walk.lo = 0;
    walk.hi = len;
    walk.target = target;
    walk.phase = next;
}

/// One step of a binary search for the last entry whose key is at or below
/// `walk.target`, with `key` of entry `mid`; `None` while searching, else
/// the index of that entry plus one (0: every key is above the target).
#[inline(always)]
fn search_step(walk: &mut Walk, key: impl Fn(u32) -> Option<u64>) -> Result<Option<u32>, u32> {
    if walk.lo >= walk.hi {
        return Ok(Some(walk.lo));
    }
    let mid = walk.lo + (walk.hi - walk.lo) / 2;
    if key(mid).ok_or(status::READ_FAILED)? <= walk.target {
        walk.lo = mid + 1;
    } else {
        walk.hi = mid;
    }
    Ok(None)
}

/// One step of the search for the mapping that holds `walk.ip` (mappings
/// are sorted by start and do not overlap).
#[inline(always)]
fn mapping_step(walk: &mut Walk) -> Result<(), u32> {
    let start = walk.mappings_start;
    let Some(found) = search_step(walk, |i| {
        UNWIND_MAPPINGS.get(start.wrapping_add(i)).map(|m| m.start)
    })?
    else {
        return Ok(());
    };
    if found == 0 {
        return Err(status::NO_MAPPING);
    }
    let mapping = *UNWIND_MAPPINGS
        .get(start.wrapping_add(found - 1))
        .ok_or(status::NO_MAPPING)?;
    if walk.ip >= mapping.end {
        return Err(status::NO_MAPPING);
    }
    walk.mapping = mapping;
    walk.mapping_valid = 1;
    mapping_found(walk)
}

/// `walk.mapping` holds `walk.ip`: unwind by frame pointers, or start
/// looking for the unwind row.
#[inline(always)]
fn mapping_found(walk: &mut Walk) -> Result<(), u32> {
    if walk.mapping.kind == mapping_kind::FRAME_POINTER {
        walk.phase = phase::FRAME;
        return frame_pointer_step(walk);
    }
    let lookup = walk
        .ip
        .wrapping_sub(walk.mapping.bias)
        .wrapping_sub(if walk.ip_exact != 0 { 0 } else { 1 });
    if lookup > u64::from(u32::MAX) {
        return Err(status::NO_UNWIND_INFO);
    }
    start_search(walk, walk.mapping.rows_len, lookup, phase::ROW);
    Ok(())
}

/// One step of the search for the last row at or before the lookup
/// address in the mapping's table; the last step applies it.
#[inline(always)]
fn row_step(walk: &mut Walk) -> Result<(), u32> {
    let start = walk.mapping.rows_start;
    let Some(found) = search_step(walk, |i| {
        UNWIND_ROWS
            .get(start.wrapping_add(i))
            .map(|r| u64::from(r.pc))
    })?
    else {
        return Ok(());
    };
    if found == 0 {
        return Err(status::NO_UNWIND_INFO);
    }
    let row = *UNWIND_ROWS
        .get(start.wrapping_add(found - 1))
        .ok_or(status::NO_UNWIND_INFO)?;
    walk.phase = phase::FRAME;
    apply_row(walk, &row)
}

/// Finds the caller's registers by the row's rules.
#[inline(always)]
fn apply_row(walk: &mut Walk, row: &UnwindRow) -> Result<(), u32> {
    let cfa = match row.cfa_rule() {
        cfa::RSP => walk.sp.wrapping_add(u64::from(row.cfa_offset)),
        cfa::RBP => {
            if walk.bp_known == 0 {
                return Err(status::RBP_UNKNOWN);
            }
            walk.bp.wrapping_add(u64::from(row.cfa_offset))
        }
        cfa::PLT => {
            let pushed = if walk.ip & 15 >= u64::from(row.cfa_offset) {
                8
            } else {
                0
            };
            walk.sp.wrapping_add(8 + pushed)
        }
        cfa::SIGNAL => return signal_step(walk),
        cfa::END => return Err(status::COMPLETE),
        cfa::NONE => return Err(status::NO_UNWIND_INFO),
        _ => return Err(status::UNSUPPORTED_RULE),
    };
    if cfa <= walk.sp {
        return Err(status::NOT_ADVANCING);
    }
    let ra = read_user(cfa.wrapping_sub(8))?;
    match row.rbp_rule() {
        rbp::SAME => {}
        rbp::AT_CFA => {
            let at = cfa.wrapping_add((i64::from(row.rbp_offset) * 8) as u64);
            walk.bp = read_user(at)?;
            walk.bp_known = 1;
        }
        _ => walk.bp_known = 0,
    }
    walk.sp = cfa;
    walk.ip = ra;
    walk.ip_exact = 0;
    if ra == 0 {
        return Err(status::COMPLETE);
    }
    Ok(())
}

/// A caller found by its frame pointer: the saved RBP at [RBP], the return
/// address above it.
#[inline(always)]
fn frame_pointer_step(walk: &mut Walk) -> Result<(), u32> {
    if walk.bp_known == 0 {
        return Err(status::RBP_UNKNOWN);
    }
    if walk.bp == 0 {
        // The outermost frame clears RBP (`_start`, goroutine entry).
        return Err(status::COMPLETE);
    }
    let cfa = walk.bp.wrapping_add(16);
    if cfa <= walk.sp {
        return Err(status::NOT_ADVANCING);
    }
    let ra = read_user(walk.bp.wrapping_add(8))?;
    walk.bp = read_user(walk.bp)?;
    walk.sp = cfa;
    walk.ip = ra;
    walk.ip_exact = 0;
    if ra == 0 {
        return Err(status::COMPLETE);
    }
    Ok(())
}

/// `__restore_rt`: the interrupted frame's registers are in the `ucontext_t`
/// at RSP, and its instruction pointer is exact.
#[inline(always)]
fn signal_step(walk: &mut Walk) -> Result<(), u32> {
    let context = walk.sp;
    walk.ip = read_user(context.wrapping_add(signal_frame::RIP))?;
    walk.bp = read_user(context.wrapping_add(signal_frame::RBP))?;
    walk.sp = read_user(context.wrapping_add(signal_frame::RSP))?;
    walk.bp_known = 1;
    walk.ip_exact = 1;
    if walk.ip == 0 {
        return Err(status::COMPLETE);
    }
    Ok(())
}

#[inline(always)]
fn read_user(addr: u64) -> Result<u64, u32> {
    // SAFETY: the helper checks the address; a fault is an error value.
    unsafe { bpf_probe_read_user(addr as *const u64) }.map_err(|_| status::READ_FAILED)
}

/// A forked child or an exec'd image must not be walked with its parent's
/// or its old image's mappings: forget them until user space has read the
/// new ones.
#[inline(always)]
pub fn forget(pid: u32) {
    let _ = UNWIND_PROCS.remove(pid);
}
