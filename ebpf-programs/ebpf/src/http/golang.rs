//! Go: which request a goroutine serves, so that a Go service in the
//! middle of a chain sends its client requests with the right parent.
//!
//! A Go server reads a request on one goroutine and may call out from it
//! or from goroutines it starts, on any OS thread; `net/http`'s client
//! writes the request from yet another goroutine (the connection's write
//! loop). So the thread says nothing, and these uprobes follow the
//! goroutines instead (Go's register ABI, Go 1.17 on, amd64: arguments in
//! RAX, RBX, RCX…, the running goroutine's `runtime.g` in R14):
//!
//! - The capture, where it opens a server request (`capture.rs`): the
//!   goroutine that read it serves it: `GO_CONTEXT[g]`, `g` from R14 in
//!   the registers saved at the read's syscall. (Not the thread: a
//!   goroutine leaving a syscall may resume on another thread.)
//! - `runtime.newproc1` and the return to `runtime.newproc.func1`: a
//!   goroutine started by one that serves a request serves it too (and a
//!   reused `g` forgets what its earlier life served).
//! - `net/http.(*Transport).roundTrip`: the calling goroutine's context
//!   follows the `*Request` (`GO_REQUESTS`).
//! - `net/http.(*Request).write`, in the write loop: the request's context
//!   waits for `sk_msg` on this thread (`GO_WRITING`).
//!
//! No Go structure is read: only registers and addresses. Nothing is
//! written to the process.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::uprobe,
    programs::ProbeContext,
};
use fathom_common::http::{GoPending, TraceContext};

use super::maps::{GO_CONTEXT, GO_NEWPROC, GO_PROCS, GO_REQUESTS, GO_WRITING, monitored};

/// Go's ABI registers at a function's entry: (R14 = g, RAX, RBX).
#[inline(always)]
fn regs(ctx: &ProbeContext) -> (u64, u64, u64) {
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    // SAFETY: a uprobe's context is the user registers at the probe.
    unsafe { ((*regs).r14, (*regs).rax, (*regs).rbx) }
}

#[inline(always)]
fn ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn mark_go(tgid: u32) {
    // SAFETY: only tested for presence.
    if unsafe { GO_PROCS.get(&tgid) }.is_none() {
        let _ = GO_PROCS.insert(&tgid, &1, BPF_ANY as u64);
    }
}

#[uprobe]
pub fn http_go_newproc(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = ids();
    if !monitored(tgid) {
        return 0;
    }
    // newproc1(fn, callergp, callerpc, ...)
    let (_, _, caller) = regs(&ctx);
    let _ = GO_NEWPROC.insert(&tid, &caller, BPF_ANY as u64);
    0
}

/// At the instruction after `newproc.func1`'s call of `newproc1`: RAX is
/// the new goroutine.
#[uprobe]
pub fn http_go_newproc_done(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = ids();
    if !monitored(tgid) {
        return 0;
    }
    let (_, newg, _) = regs(&ctx);
    // SAFETY: copied out at once.
    let caller = unsafe { GO_NEWPROC.get(&tid) }.copied().unwrap_or(0);
    let _ = GO_NEWPROC.remove(&tid);
    let mut inherited = false;
    // SAFETY: a map value, copied before the insert.
    if let Some(c) = unsafe { GO_CONTEXT.get(&caller) } {
        let c = *c;
        inherited = GO_CONTEXT.insert(&newg, &c, BPF_ANY as u64).is_ok();
    }
    if !inherited {
        let _ = GO_CONTEXT.remove(&newg);
    }
    0
}

#[uprobe]
pub fn http_go_round_trip(ctx: ProbeContext) -> u32 {
    let (tgid, _) = ids();
    if !monitored(tgid) {
        return 0;
    }
    // (*Transport).roundTrip(t, req)
    let (g, _, req) = regs(&ctx);
    let mut pending = GoPending {
        ctx: TraceContext::default(),
        at_ns: now(),
    };
    // SAFETY: a map value, copied.
    if let Some(c) = unsafe { GO_CONTEXT.get(&g) } {
        pending.ctx = *c;
    }
    let _ = GO_REQUESTS.insert(&req, &pending, BPF_ANY as u64);
    0
}

#[uprobe]
pub fn http_go_request_write(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = ids();
    if !monitored(tgid) {
        return 0;
    }
    mark_go(tgid);
    // (*Request).write(r, w, usingProxy, extraHeaders, waitForContinue)
    let (_, req, _) = regs(&ctx);
    let mut pending = GoPending {
        ctx: TraceContext::default(),
        at_ns: now(),
    };
    // SAFETY: a map value, copied.
    if let Some(p) = unsafe { GO_REQUESTS.get(&req) } {
        pending.ctx = p.ctx;
    }
    let _ = GO_WRITING.insert(&tid, &pending, BPF_ANY as u64);
    0
}
