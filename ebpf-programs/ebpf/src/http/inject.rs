//! `sock_ops` + `sk_msg`: `traceparent` insertion (see `fathom_common::http`).
//!
//! `fathom_sock_ops` (on the cgroup v2 root) puts the client TCP sockets of
//! monitored processes into the SOCKHASH `CLIENT_SOCKETS`, and only those:
//! at `TCP_CONNECT_CB`, which runs in the connecting thread, it remembers the
//! socket's cookie when the process is monitored; at
//! `ACTIVE_ESTABLISHED_CB`, which runs in softirq context where the current
//! task is whoever was interrupted, it adds the remembered sockets (the
//! kernel only lets a socket into a sockhash once it is established). A
//! socket leaves the sockhash by itself when it is closed (the sockmap's
//! `close`/`unhash` hooks unlink it from every map).
//!
//! `fathom_sk_msg` runs in the sender's `sendmsg`/`write` on those sockets,
//! before TCP segments the bytes. When a message is a whole HTTP/1.x request
//! head — a request line ending in ` HTTP/1.x\r\n` and the blank line that
//! ends the headers, both within its first [`INSPECT_MAX`] bytes — without a
//! `traceparent` header, it inserts
//! `traceparent: 00-{trace}-{span}-01\r\n` after the request line and leaves
//! the chosen ids in `INJECTED[tid]`. Anything else passes byte-identical.
//!
//! A request's body is followed to where the next request starts: by its
//! `Content-Length`, or chunk by chunk when it is chunked (chunk sizes,
//! extensions and trailers, across any number of writes), so a body is
//! never taken for a request head.
//!
//! Limits: only the first request of a message is considered (pipelined
//! requests written in one call get one header, and the connection is not
//! touched after them); a request whose head is written in several calls is
//! skipped (counted).

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action, sk_msg_md,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_loop, bpf_msg_pull_data},
    },
    macros::{btf_tracepoint, map, sk_msg, sock_ops, stream_verdict},
    maps::{LruHashMap, PerCpuArray, SockHash},
    programs::{BtfTracePointContext, SkBuffContext, SkMsgContext, SockOpsContext},
};
use fathom_common::http::{
    ChunkState, HttpCounter, TRACEPARENT_HEADER_LEN, TraceContext, chunk, ctx_flags, hex_lower,
    parse_traceparent,
};

use super::maps::{
    GO_PROCS, GO_WRITING, INJECTED, SERVING, count, filter_pids, inject_enabled, inject_stopped,
    keep_sockets, monitored, random_id, starts_message,
};

/// Per CPU: the request-head scan in progress (sk_msg programs do not nest
/// on a CPU).
#[map]
static SCAN: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

/// What the scan's `bpf_loop` callback gets: the message, which only a
/// pointer on the BPF stack can carry.
#[repr(C)]
struct ScanCtx {
    msg: *mut sk_msg_md,
}

/// Client sockets of monitored processes (socket cookie -> socket). The
/// kernel requires a 4-byte value.
#[map]
static CLIENT_SOCKETS: SockHash<u64> = SockHash::with_max_entries(65536, 0);
/// Sockets of monitored processes between `connect` and established
/// (socket cookie -> tgid). LRU: connections that never establish age out.
#[map]
static INJECT_PENDING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// Client socket -> where its next request starts. Absent: no message yet.
/// The key is the socket's kernel address, the one value `sk_msg` (which
/// may not ask for the socket cookie) and `sock_ops` both see; an address
/// is reused by a later socket, so `sock_ops` clears the entry when a
/// socket is established. LRU: a closed socket's entry ages out.
#[map]
static FRAMING: LruHashMap<u64, Framing> = LruHashMap::with_max_entries(65536, 0);

/// What `fathom_sk_msg` knows about a connection's request stream. A
/// request head is only looked for where a request can start: in the first
/// message of the connection, or once the previous request's body (by its
/// `Content-Length`) has been written. A body that happens to look like a
/// request head is therefore never touched.
#[repr(C)]
#[derive(Clone, Copy)]
struct Framing {
    /// Bytes of the current request's body still to come (by its
    /// `Content-Length`).
    body_left: u64,
    /// A [`framing`] state.
    state: u64,
    /// With [`framing::CHUNKED`]: where in the chunk framing the next
    /// message starts.
    chunks: ChunkState,
}

/// [`Framing::state`] values.
mod framing {
    /// Requests are delimited: the next starts after `body_left` bytes.
    pub const FRAMED: u64 = 1;
    /// Not delimited (a pipelined request, a head in pieces, not HTTP/1.x,
    /// a malformed chunk): nothing more on this connection is touched.
    pub const UNFRAMED: u64 = 2;
    /// Inside a chunked body: the next request starts after its last chunk
    /// and trailers ([`Framing::chunks`]).
    pub const CHUNKED: u64 = 3;
}

/// Per CPU: the walk through one message's chunk framing in progress.
#[map]
static CHUNK_WALK: PerCpuArray<ChunkWalk> = PerCpuArray::with_max_entries(1, 0);

/// One message's walk through a chunked body (see [`walk_chunks`]).
#[repr(C)]
struct ChunkWalk {
    /// Offset in the message of the next byte to look at, and the
    /// message's size.
    pos: u64,
    end: u64,
    /// Offsets of the bytes made linear at `msg->data` by the last pull.
    win_start: u64,
    win_end: u64,
    /// The parse, from where the previous message left it.
    chunks: ChunkState,
    /// As [`Scan::owner`].
    owner: u64,
}

/// Steps of one message's chunk walk at most (a step is a chunk's data or
/// one byte of a size or trailer line); a message with more is not
/// followed (the connection is left alone).
const CHUNK_STEPS: u32 = 4096;
/// Bytes made linear per pull while walking size and trailer lines.
const CHUNK_WINDOW: u64 = 16;

/// Bytes of a message inspected for the request head (request line and
/// headers). A larger head is not injected (`InjectSkippedNoLine`).
pub const INSPECT_MAX: u32 = 4096;
/// Mask keeping offsets within the inspected bytes plus a little look-ahead
/// (a power of two above `INSPECT_MAX + 16`), so the verifier sees them
/// bounded.
const OFFSET_MASK: u64 = 0x1fff;
/// The shortest request head: `GET / HTTP/1.0\r\n\r\n`.
const MIN_REQUEST: u32 = 18;
/// The shortest request line with its CRLF: `GET / HTTP/1.0\r\n`; its LF is
/// at this offset or later.
const MIN_LINE_LF: u64 = 15;

// The header as `insert` lays it out.
const _: () = assert!(16 + 32 + 1 + 16 + 5 == TRACEPARENT_HEADER_LEN);

/// Scan outcomes ([`Scan::verdict`]).
mod verdict {
    /// Still scanning (at the end: the head is not complete in the bytes).
    pub const SCANNING: u64 = 0;
    /// The blank line ending the headers was found, no `traceparent`.
    pub const HEAD_COMPLETE: u64 = 1;
    /// A `traceparent` header is already there.
    pub const EXISTING: u64 = 2;
    /// Not an HTTP/1.x request head (bad request line, bare LF).
    pub const NOT_HTTP: u64 = 3;
}

#[sock_ops]
pub fn fathom_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    1
}

#[inline(always)]
fn try_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if !inject_enabled() {
                return;
            }
            // The connecting thread is current here. Only the pid filter
            // asks which process it is: Linux 6.1 does not allow
            // `bpf_get_current_pid_tgid` in sock_ops, so without the filter
            // the program loads there too.
            let tgid = if filter_pids() {
                let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
                if tgid == 0 || !monitored(tgid) {
                    return;
                }
                tgid
            } else {
                0
            };
            // SAFETY: the program's context is a `bpf_sock_ops`.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // A full LRU evicts the oldest; nothing to count.
            let _ = INJECT_PENDING.insert(&cookie, &tgid, 0);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: as above.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if INJECT_PENDING.get_ptr(&cookie).is_none() {
                return;
            }
            let _ = INJECT_PENDING.remove(&cookie);
            // SAFETY: the context pointer is the kernel's `bpf_sock_ops`,
            // valid for the whole run.
            let ops = unsafe { &mut *ctx.ops };
            // A new socket at the address of a closed one starts afresh.
            // SAFETY: the context's socket pointer, used as a number only.
            let sk = unsafe { ops.__bindgen_anon_2.sk } as u64;
            let _ = FRAMING.remove(&sk);
            if CLIENT_SOCKETS.update(cookie, ops, BPF_ANY as u64).is_ok() {
                count(HttpCounter::SocketsAdded);
                if !keep_sockets() {
                    // Told when the first data sent is acknowledged.
                    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_RTT_CB_FLAG as i32);
                }
            }
        }
        BPF_SOCK_OPS_RTT_CB => {
            // The first request went out and was acknowledged; the ACK is
            // processed before any response data reaches the socket, so the
            // socket leaves the sockhash before it is read: in a sockmap,
            // `FIONREAD` answers 0 on this kernel, which stalls readers that
            // trust it (nginx as a proxy). Later requests on the connection
            // are not injected.
            // SAFETY: the program's context is a `bpf_sock_ops`.
            let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: the map pointer is the map's definition, the key a
            // local; sock_ops programs may delete from a sockhash.
            let ret = unsafe {
                aya_ebpf::helpers::generated::bpf_map_delete_elem(
                    &CLIENT_SOCKETS as *const SockHash<u64> as *mut c_void,
                    &mut cookie as *mut u64 as *mut c_void,
                )
            };
            if ret == 0 {
                count(HttpCounter::SocketsReleased);
            }
            let _ = ctx.set_cb_flags(0);
        }
        _ => {}
    }
}

/// Keep-alive mode's receive side: passes every received segment to the
/// socket. With a verdict program the kernel queues received data where
/// `FIONREAD` on a sockmap socket counts it (without one, Linux 6.18
/// answers 0 while the data waits in TCP's own queue).
#[stream_verdict]
pub fn fathom_sk_skb(_ctx: SkBuffContext) -> u32 {
    sk_action::SK_PASS
}

#[sk_msg]
pub fn fathom_sk_msg(ctx: SkMsgContext) -> u32 {
    if inject_enabled() && !inject_stopped() {
        match framed(&ctx) {
            Outcome::Injected => count(HttpCounter::Injected),
            Outcome::Existing => count(HttpCounter::InjectSkippedExisting),
            Outcome::Forwarded => count(HttpCounter::ParentRewritten),
            Outcome::Incomplete => count(HttpCounter::InjectSkippedNoLine),
            Outcome::Failed => count(HttpCounter::InjectFailed),
            Outcome::Other => {}
        }
    }
    sk_action::SK_PASS
}

/// Where in its connection's request stream a message is: inside a body
/// (passed), at a request boundary (inspected by [`try_sk_msg`]), or on a
/// connection no longer delimited (passed). Updates `FRAMING`.
#[inline(always)]
fn framed(ctx: &SkMsgContext) -> Outcome {
    // SAFETY: the context's socket pointer, used as a number only.
    let cookie = unsafe { (*ctx.msg).__bindgen_anon_3.sk } as u64;
    let size = u64::from(ctx.size());
    // SAFETY: a map value, copied out at once.
    if let Some(f) = unsafe { FRAMING.get(&cookie) }.copied() {
        if f.state == framing::UNFRAMED {
            return Outcome::Other;
        }
        if f.state == framing::CHUNKED {
            walk_chunks(ctx, cookie, 0, &f.chunks);
            return Outcome::Other;
        }
        if f.body_left >= size && f.body_left > 0 {
            set_framing(cookie, f.body_left - size, framing::FRAMED);
            return Outcome::Other;
        }
        if f.body_left > 0 {
            // A body's end and more bytes in one message: a pipelined
            // request at an offset this program does not inject at.
            unframe(cookie);
            return Outcome::Other;
        }
    }
    let (outcome, h) = try_sk_msg(ctx);
    match h {
        h if h.complete && h.chunked => {
            // The body starts after the head, which a header inserted
            // before it moved by the bytes the message grew.
            let grown = u64::from(ctx.size()).saturating_sub(size);
            walk_chunks(ctx, cookie, h.end + grown, &ChunkState::default());
        }
        h if h.complete && size - h.end <= h.content_length => {
            set_framing(cookie, h.content_length - (size - h.end), framing::FRAMED);
        }
        _ => unframe(cookie),
    }
    outcome
}

/// Follows a chunked body through the message from offset `start`, from
/// where `from` left it, and records where the connection's next message
/// starts: still in the body, at the next request (the body ended with the
/// message), or nowhere it can tell (a request pipelined after the body in
/// the same message, malformed framing, too many chunks: unframed).
/// A function of its own (a BPF subprogram): both callers share one
/// verification of it and of its loop's callback.
#[inline(never)]
fn walk_chunks(ctx: &SkMsgContext, cookie: u64, start: u64, from: &ChunkState) {
    let Some(w) = CHUNK_WALK.get_ptr_mut(0) else {
        unframe(cookie);
        return;
    };
    // SAFETY: this CPU's map value, ours for this run.
    let w = unsafe { &mut *w };
    let owner = random_owner();
    w.pos = start;
    w.end = u64::from(ctx.size());
    w.win_start = 0;
    w.win_end = 0;
    w.chunks = *from;
    w.owner = owner;
    loop_steps(ctx.msg, CHUNK_STEPS, chunk_step);
    // SAFETY: this CPU's map value; the callback wrote it through its own
    // pointer.
    let w = unsafe { core::ptr::read_volatile(w) };
    if w.owner != owner {
        unframe(cookie);
        return;
    }
    match w.chunks.chunk {
        chunk::DONE if w.pos == w.end => set_framing(cookie, 0, framing::FRAMED),
        chunk::DONE | chunk::BAD => unframe(cookie),
        _ if w.pos >= w.end => {
            let next = Framing {
                body_left: 0,
                state: framing::CHUNKED,
                chunks: w.chunks,
            };
            // A full LRU evicts the oldest connection's state.
            let _ = FRAMING.insert(&cookie, &next, BPF_ANY as u64);
        }
        _ => unframe(cookie),
    }
}

/// One step of [`walk_chunks`]: skips the rest of a chunk's data (as much
/// as the message has), or reads one byte of a size or trailer line
/// (pulling the next [`CHUNK_WINDOW`] bytes linear when it is not).
/// Returns 0 to go on, 1 to stop.
extern "C" fn chunk_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `ScanCtx`, alive for the whole loop.
    let msg = unsafe { (*(ctx as *mut ScanCtx)).msg };
    let Some(w) = CHUNK_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's map value, ours for the whole loop.
    let w = unsafe { &mut *w };
    if w.pos >= w.end || w.chunks.chunk >= chunk::DONE {
        return 1;
    }
    if w.chunks.chunk == chunk::DATA {
        w.pos += w.chunks.skip(w.end - w.pos);
        return 0;
    }
    if w.pos < w.win_start || w.pos >= w.win_end {
        let end = if w.pos + CHUNK_WINDOW < w.end {
            w.pos + CHUNK_WINDOW
        } else {
            w.end
        };
        // SAFETY: the program's context is an `sk_msg_md`; a pull moves no
        // byte of the message, it only makes them linear.
        if unsafe { bpf_msg_pull_data(msg, w.pos as u32, end as u32, 0) } != 0 {
            w.chunks.chunk = chunk::BAD;
            return 1;
        }
        w.win_start = w.pos;
        w.win_end = end;
    }
    let mut b = [0u8; 1];
    if !read(msg, w.pos - w.win_start, &mut b) {
        w.chunks.chunk = chunk::BAD;
        return 1;
    }
    w.pos += 1;
    w.chunks.byte(b[0]);
    0
}

/// `bpf_loop`: `step` called up to `n` times (until it returns 1), with
/// the message.
#[inline(always)]
fn loop_steps(msg: *mut sk_msg_md, n: u32, step: extern "C" fn(u64, *mut c_void) -> i64) {
    let mut steps_ctx = ScanCtx { msg };
    // SAFETY: `step` has the callback signature bpf_loop requires and
    // `steps_ctx` outlives the call.
    unsafe {
        bpf_loop(
            n,
            step as *mut c_void,
            &mut steps_ctx as *mut ScanCtx as *mut c_void,
            0,
        )
    };
}

/// 64 random bits: marks per-CPU state as this run's (see [`Scan::owner`]).
#[inline(always)]
fn random_owner() -> u64 {
    // SAFETY: helpers without arguments.
    unsafe { (u64::from(bpf_get_prandom_u32()) << 32) | u64::from(bpf_get_prandom_u32()) }
}

#[inline(always)]
fn set_framing(cookie: u64, body_left: u64, state: u64) {
    let f = Framing {
        body_left,
        state,
        chunks: ChunkState::default(),
    };
    // A full LRU evicts the oldest connection's state.
    let _ = FRAMING.insert(&cookie, &f, BPF_ANY as u64);
}

#[inline(always)]
fn unframe(cookie: u64) {
    set_framing(cookie, 0, framing::UNFRAMED);
    count(HttpCounter::InjectUnframed);
}

/// A request head in a message. (Not an `Option`: LLVM fills a `None`'s
/// payload from whatever register, one a helper call has clobbered
/// included, and the verifier rejects the read.)
#[derive(Clone, Copy, Default)]
struct Head {
    /// A complete head whose body length is known; the rest is valid only
    /// then.
    complete: bool,
    /// Offset just past its blank line (in the message as written).
    end: u64,
    /// Its `Content-Length` (0 without one).
    content_length: u64,
    /// It has a `Transfer-Encoding` header: a chunked body (a request with
    /// any other coding is an error, RFC 9112 6.3).
    chunked: bool,
}

/// What happened to one message.
enum Outcome {
    Injected,
    /// A request head that already has a `traceparent`.
    Existing,
    /// A proxy forwarded the `traceparent` of the request it serves: its
    /// parent id now names this hop's client span.
    Forwarded,
    /// Starts like a request but its request line or header end is not in
    /// the inspected bytes.
    Incomplete,
    /// A helper failed; the message is unchanged.
    Failed,
    /// Not an HTTP/1.x request.
    Other,
}

/// The request-head scan's state, in this CPU's `SCAN` (not on the BPF
/// stack: the callback reads it from map memory, so the verifier checks the
/// callback once for any cursor instead of once per distinct cursor value,
/// which exhausted it on 6.1 and 6.18).
#[repr(C)]
struct Scan {
    /// Bytes to inspect, linear from `msg->data`.
    len: u64,
    /// Where the search for the next LF starts.
    cursor: u64,
    /// Offset just past the request line's LF; 0 until found.
    line_end: u64,
    /// A [`verdict`].
    verdict: u64,
    /// Offset of the `traceparent` header line; 0: none.
    existing_at: u64,
    /// With a complete head: offset just past its blank line.
    head_end: u64,
    /// Offset just past `Content-Length:`; 0: none.
    length_at: u64,
    /// Non-zero: a `Transfer-Encoding` header was seen.
    chunked: u64,
    /// The `Content-Length` value as parsed so far, its digits, and a
    /// [`length_state`].
    length: u64,
    digits: u64,
    length_state: u64,
    /// Chosen at random by the run that owns the scan. On a kernel that
    /// preempts BPF programs, another message's scan on this CPU may
    /// overwrite this state while ours is preempted; a changed owner then
    /// leaves the message untouched (never a header at a wrong offset).
    owner: u64,
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) -> (Outcome, Head) {
    let size = ctx.size();
    if size < MIN_REQUEST {
        return (Outcome::Other, Head::default());
    }
    let len = if size < INSPECT_MAX {
        size
    } else {
        INSPECT_MAX
    };
    // The first bytes decide cheaply whether this can be a request.
    if ctx.data() + 8 > ctx.data_end() && pull(ctx, 0, 8).is_err() {
        return (Outcome::Other, Head::default());
    }
    let mut first = [0u8; 8];
    if !read(ctx.msg, 0, &mut first) {
        return (Outcome::Other, Head::default());
    }
    if !starts_message(u64::from_le_bytes(first), 8).0 {
        return (Outcome::Other, Head::default());
    }
    if ctx.data() + len as usize > ctx.data_end() && pull(ctx, 0, len).is_err() {
        return (Outcome::Failed, Head::default());
    }
    let Some(scan) = SCAN.get_ptr_mut(0) else {
        return (Outcome::Failed, Head::default());
    };
    // SAFETY: this CPU's map value, ours for this run.
    let scan = unsafe { &mut *scan };
    let owner = random_owner();
    crate::mem::zero_words(scan);
    scan.len = len as u64;
    scan.verdict = verdict::SCANNING;
    scan.owner = owner;
    // At most one step per LF plus one per LF-free word.
    loop_steps(ctx.msg, len, scan_step);
    // SAFETY: this CPU's map value; the callback wrote it through its own
    // pointer.
    let scan = unsafe { core::ptr::read_volatile(scan) };
    if scan.owner != owner || scan.len != len as u64 {
        return (Outcome::Failed, Head::default());
    }
    let complete = scan.line_end != 0 && scan.head_end != 0;
    // The head's framing first: inserting moves the bytes.
    let mut head = Head::default();
    if complete && matches!(scan.verdict, verdict::HEAD_COMPLETE | verdict::EXISTING) {
        let length = if scan.length_at == 0 {
            0
        } else {
            content_length(ctx.msg)
        };
        if length != u64::MAX {
            head = Head {
                complete: true,
                end: scan.head_end,
                content_length: length,
                chunked: scan.chunked != 0,
            };
        }
    }
    let outcome = match scan.verdict {
        verdict::HEAD_COMPLETE if complete => insert(ctx, scan.line_end as u32),
        verdict::EXISTING if complete => forward(ctx, scan.existing_at, scan.len),
        verdict::NOT_HTTP => Outcome::Other,
        _ => Outcome::Incomplete,
    };
    (outcome, head)
}

/// The value of the `Content-Length` header whose value starts at
/// `scan.length_at` (after optional spaces), within the inspected bytes;
/// `u64::MAX` if it is not a number of at most 18 digits ended by CR. A
/// `bpf_loop` over [`digit_step`], so the verifier checks one digit.
#[inline(always)]
fn content_length(msg: *mut sk_msg_md) -> u64 {
    let Some(scan) = SCAN.get_ptr_mut(0) else {
        return u64::MAX;
    };
    // SAFETY: this CPU's map value, ours for this run.
    let scan = unsafe { &mut *scan };
    scan.length = 0;
    scan.digits = 0;
    scan.length_state = length_state::PARSING;
    loop_steps(msg, 24, digit_step);
    // SAFETY: the callback wrote it through its own pointer.
    let state = unsafe { core::ptr::read_volatile(&scan.length_state) };
    if state == length_state::DONE {
        scan.length
    } else {
        u64::MAX
    }
}

/// [`Scan::length_state`] values.
mod length_state {
    pub const PARSING: u64 = 0;
    pub const DONE: u64 = 1;
    pub const BAD: u64 = 2;
}

/// One byte of a `Content-Length` value. Returns 0 to go on, 1 to stop.
extern "C" fn digit_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `ScanCtx`, alive for the whole loop.
    let msg = unsafe { (*(ctx as *mut ScanCtx)).msg };
    let Some(scan) = SCAN.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's map value, ours for the whole loop.
    let scan = unsafe { &mut *scan };
    let off = scan.length_at + index;
    let mut b = [0u8; 1];
    if off >= scan.len || !read(msg, off, &mut b) {
        scan.length_state = length_state::BAD;
        return 1;
    }
    match b[0] {
        b' ' | b'\t' if scan.digits == 0 => 0,
        d @ b'0'..=b'9' if scan.digits < 18 => {
            scan.length = scan.length * 10 + u64::from(d - b'0');
            scan.digits += 1;
            0
        }
        b'\r' if scan.digits > 0 => {
            scan.length_state = length_state::DONE;
            1
        }
        _ => {
            scan.length_state = length_state::BAD;
            1
        }
    }
}

/// Inserts the header at `at` (just past the request line).
#[inline(always)]
fn insert(ctx: &SkMsgContext, at: u32) -> Outcome {
    let tid = bpf_get_current_pid_tgid() as u32;
    let mut tc = TraceContext {
        flags: ctx_flags::CLIENT_INJECTED,
        ..TraceContext::default()
    };
    random_id(&mut tc.span_id);
    // SAFETY: the context's socket pointer, used as a number only.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk } as u64;
    match parent_of_write(sk) {
        Some(parent) if parent.found() => {
            count_rule(parent.rule);
            tc.trace_id = parent.ctx.trace_id;
            tc.parent_span_id = parent.ctx.span_id;
            tc.flags |= ctx_flags::LOCAL_PARENT;
        }
        parent => {
            count_rule(parent.map_or(rule::NONE, |p| p.rule));
            random_id(&mut tc.trace_id);
        }
    }
    let mut header = [0u8; TRACEPARENT_HEADER_LEN];
    header[..16].copy_from_slice(b"traceparent: 00-");
    hex_lower(&tc.trace_id, &mut header[16..48]);
    header[48] = b'-';
    hex_lower(&tc.span_id, &mut header[49..65]);
    header[65..].copy_from_slice(b"-01\r\n");

    let n = TRACEPARENT_HEADER_LEN as u32;
    if ctx.push_data(at, n, 0).is_err() {
        return Outcome::Failed;
    }
    // The pushed bytes are uninitialized: from here on a failure removes them.
    if pull(ctx, at, at + n).is_err() {
        let _ = ctx.pop_data(at, n, 0);
        return Outcome::Failed;
    }
    let data = ctx.data();
    if data + TRACEPARENT_HEADER_LEN > ctx.data_end() {
        let _ = ctx.pop_data(at, n, 0);
        return Outcome::Failed;
    }
    let mut i = 0;
    while i < TRACEPARENT_HEADER_LEN {
        // SAFETY: `data + i` is below `data_end`, checked above; sk_msg
        // programs may write their message's data.
        unsafe { *((data + i) as *mut u8) = header[i] };
        i += 1;
    }
    // The insert split the message's buffer in three (request line, header,
    // the rest), and the kernel sends each piece with its own
    // `tcp_sendmsg`: on a socket with Nagle on, the small first piece goes
    // out alone and the rest waits for its ACK — up to a delayed ACK
    // (40 ms) per request on a kept-alive connection. One buffer again, as
    // the application wrote it (a failure only costs that wait).
    let total = ctx.size();
    let _ = pull(ctx, 0, if total < MERGE_MAX { total } else { MERGE_MAX });
    // User space learns the ids through the write's event; if this fails
    // the header is still right, only the client span lacks its ids.
    let _ = INJECTED.insert(&tid, &tc, BPF_ANY as u64);
    Outcome::Injected
}

/// How the parent of a client request was chosen (`HttpCounter::Parent*`).
mod rule {
    /// The sender served no request: a new trace.
    pub const NONE: u8 = 0;
    pub const GOROUTINE: u8 = 1;
    pub const THREAD: u8 = 2;
    pub const GUESSED: u8 = 3;
    pub const MISSED: u8 = 4;
}

/// The parent of a client request, and how it was chosen. (A plain struct,
/// not an `Option`: see `fathom_common::http`'s note on the verifier.)
#[repr(C)]
#[derive(Clone, Copy)]
struct Parent {
    ctx: TraceContext,
    rule: u8,
    _pad: [u8; 7],
}

/// Connecting socket (its kernel address) -> the parent of the first
/// request it will carry, chosen when its thread connected: an event loop
/// connects from the handler's callback but writes the request from a
/// later one, when the connection is up, after reading other requests.
#[map]
static CONNECT_PARENT: LruHashMap<u64, Parent> = LruHashMap::with_max_entries(16384, 0);

/// `tcp_set_state(sk, TCP_SYN_SENT)`, in the connecting thread: what
/// [`thread_parent`] says now is the parent of the socket's first request.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn fathom_connect_parent(ctx: BtfTracePointContext) -> u32 {
    // `inet_sock_set_state(const struct sock *sk, int oldstate, int
    // newstate)`.
    let new_state: i32 = ctx.arg(2);
    if new_state != TCP_SYN_SENT || !inject_enabled() {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    // Go's goroutines have their own probes; softirq context has no thread.
    // SAFETY: only tested for presence.
    if tgid == 0 || !monitored(tgid) || unsafe { GO_PROCS.get(&tgid) }.is_some() {
        return 0;
    }
    // The socket's address, used as a number only.
    let sk: u64 = ctx.arg(0);
    let Some(out) = PARENT.get_ptr_mut(1) else {
        return 0;
    };
    // SAFETY: this CPU's slot, a valid map value.
    unsafe { thread_parent(tid, out) };
    // SAFETY: as above.
    let parent = unsafe { &*out };
    if parent.found() {
        let _ = CONNECT_PARENT.insert(&sk, parent, BPF_ANY as u64);
    } else {
        let _ = CONNECT_PARENT.remove(&sk);
    }
    0
}

/// Per CPU: the parent being chosen, slot 0 by `sk_msg`, slot 1 by
/// `fathom_connect_parent` (a softirq may run the tracepoint in the middle
/// of an `sk_msg` run on the same CPU; it uses its slot only for
/// `TCP_SYN_SENT`, which only `connect` in process context sets).
#[map]
static PARENT: PerCpuArray<Parent> = PerCpuArray::with_max_entries(2, 0);

const TCP_SYN_SENT: i32 = 2;

impl Parent {
    fn found(&self) -> bool {
        matches!(self.rule, rule::GOROUTINE | rule::THREAD | rule::GUESSED)
    }
}

/// A Go request's context is taken by the write that follows
/// `(*Request).write` within this time, or not at all.
const GO_WRITE_WINDOW_NS: u64 = 1_000_000_000;

/// The server request on whose behalf the current thread writes a client
/// request now:
/// - Go: the goroutine's, recorded by the `net/http` uprobes (`golang`); a
///   Go process's thread says nothing, so without it there is none.
/// - the first request of a connection: the parent [`thread_parent`] gave
///   when the thread connected (`CONNECT_PARENT`), unless the thread now
///   serves exactly one request;
/// - a thread serving one request: that one;
/// - several: the one read last, if the thread read nothing else since (an
///   event loop's handler calling out from the callback that read it); a
///   guess, counted;
/// - otherwise none, counted as missed.
#[inline(always)]
fn parent_of_write(sk: u64) -> Option<&'static Parent> {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let out = PARENT.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; sk_msg programs do not nest on a CPU. Map
    // values are copied field by field between map values, not through
    // the stack (sk_msg's stack is nearly full).
    unsafe {
        (*out).rule = rule::NONE;
        if let Some(w) = GO_WRITING.get_ptr(&tid) {
            let fresh = bpf_ktime_get_ns().wrapping_sub((*w).at_ns) < GO_WRITE_WINDOW_NS;
            if fresh && (*w).ctx.trace_id != [0; 16] {
                (*out).ctx = (*w).ctx;
                (*out).rule = rule::GOROUTINE;
            }
            let _ = GO_WRITING.remove(&tid);
            if fresh {
                return Some(&*out);
            }
        }
        if GO_PROCS.get(&tgid).is_some() {
            (*out).rule = rule::MISSED;
            return Some(&*out);
        }
        thread_parent(tid, out);
        // The first request of a connection this thread opened while
        // serving, unless the thread now serves exactly one request.
        if let Some(c) = CONNECT_PARENT.get_ptr(&sk) {
            if (*out).rule != rule::THREAD {
                (*out).ctx = (*c).ctx;
                (*out).rule = (*c).rule;
            }
            let _ = CONNECT_PARENT.remove(&sk);
        }
        Some(&*out)
    }
}

/// [`parent_of_write`]'s rule for a thread (not Go's), into `out`.
///
/// # Safety
/// `out` points to a valid map value.
#[inline(always)]
unsafe fn thread_parent(tid: u32, out: *mut Parent) {
    // SAFETY: `out` per the contract; `s` a valid map value.
    unsafe {
        (*out).rule = rule::NONE;
        if let Some(s) = SERVING.get_ptr(&tid)
            && (*s).ctx.trace_id != [0; 16]
        {
            (*out).ctx = (*s).ctx;
            (*out).rule = if (*s).open <= 1 {
                rule::THREAD
            } else if (*s).later_reads == 0 {
                rule::GUESSED
            } else {
                rule::MISSED
            };
        }
    }
}

#[inline(always)]
fn count_rule(r: u8) {
    match r {
        rule::GOROUTINE => count(HttpCounter::ParentGoroutine),
        rule::THREAD => count(HttpCounter::ParentThread),
        rule::GUESSED => count(HttpCounter::ParentGuessed),
        rule::MISSED => count(HttpCounter::ParentMissed),
        _ => {}
    }
}

/// The most bytes of an injected message made one buffer again (a copy):
/// a request head and a small body.
const MERGE_MAX: u32 = 16384;

/// A request that already carries a `traceparent` at `at`. When it is the
/// very header of the request the thread is serving (same trace id and
/// parent id: a proxy forwarding it), its parent id is replaced by a new
/// span id, this hop's client span, as W3C Trace Context asks of a
/// forwarding participant; the trace id and flags stay. Anything else (an
/// instrumented application's own context) is left alone.
#[inline(always)]
fn forward(ctx: &SkMsgContext, at: u64, len: u64) -> Outcome {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the context's socket pointer, used as a number only.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk } as u64;
    let Some(serving) = parent_of_write(sk) else {
        return Outcome::Existing;
    };
    if !serving.found() || serving.ctx.flags & ctx_flags::REMOTE_PARENT == 0 {
        return Outcome::Existing;
    }
    count_rule(serving.rule);
    // `traceparent:` and up to two spaces, then the 55-byte value.
    let mut value_at = at + 12;
    let mut space = [0u8; 1];
    let mut k = 0;
    while k < 2 {
        if read(ctx.msg, value_at, &mut space) && space[0] == b' ' {
            value_at += 1;
        }
        k += 1;
    }
    if value_at + 55 > len {
        return Outcome::Existing;
    }
    let mut value = [0u8; 55];
    if !read(ctx.msg, value_at, &mut value) {
        return Outcome::Existing;
    }
    let Some((trace, parent, _)) = parse_traceparent(&value) else {
        return Outcome::Existing;
    };
    if trace != serving.ctx.trace_id || parent != serving.ctx.parent_span_id {
        return Outcome::Existing;
    }
    let mut tc = TraceContext {
        trace_id: trace,
        parent_span_id: serving.ctx.span_id,
        flags: ctx_flags::CLIENT_INJECTED | ctx_flags::LOCAL_PARENT,
        ..TraceContext::default()
    };
    random_id(&mut tc.span_id);
    let mut hex = [0u8; 16];
    hex_lower(&tc.span_id, &mut hex);
    if !write(ctx.msg, value_at + 36, &hex) {
        return Outcome::Failed;
    }
    let _ = INJECTED.insert(&tid, &tc, BPF_ANY as u64);
    Outcome::Forwarded
}

/// Writes `bytes` at `off` from `msg->data`, if they are within `data_end`.
#[inline(always)]
fn write<const N: usize>(msg: *mut sk_msg_md, off: u64, bytes: &[u8; N]) -> bool {
    // SAFETY: reading the context's data pointers.
    let (data, end) = unsafe {
        (
            (*msg).__bindgen_anon_1.data as usize,
            (*msg).__bindgen_anon_2.data_end as usize,
        )
    };
    // SAFETY: a read of a local (opaque to LLVM, as in `read`).
    let off = unsafe { core::ptr::read_volatile(&off) } & OFFSET_MASK;
    let p = data + off as usize;
    if p + N > end {
        return false;
    }
    let mut i = 0;
    while i < N {
        // SAFETY: `p + i` is below `data_end`, checked above; sk_msg
        // programs may write their message's data.
        unsafe { *((p + i) as *mut u8) = bytes[i] };
        i += 1;
    }
    true
}

/// `bpf_msg_pull_data`: makes bytes `start..end` linear at `msg->data`.
#[inline(always)]
fn pull(ctx: &SkMsgContext, start: u32, end: u32) -> Result<(), i64> {
    // SAFETY: the program's context is an `sk_msg_md`.
    let ret = unsafe { bpf_msg_pull_data(ctx.msg, start, end, 0) };
    if ret == 0 { Ok(()) } else { Err(ret) }
}

/// Copies the `N` bytes at `off` from `msg->data` to `out`, if they are
/// within `data_end`. (Not an `Option<[u8; N]>`: LLVM packs small ones in a
/// register built from whatever another register holds, a packet pointer
/// included, and the verifier rejects the arithmetic.)
#[inline(always)]
fn read<const N: usize>(msg: *mut sk_msg_md, off: u64, out: &mut [u8; N]) -> bool {
    // SAFETY: reading the context's data pointers.
    let (data, end) = unsafe {
        (
            (*msg).__bindgen_anon_1.data as usize,
            (*msg).__bindgen_anon_2.data_end as usize,
        )
    };
    // Opaque to LLVM: otherwise it folds `off` into constant offsets from
    // a pointer checked elsewhere (e.g. `base + j - 10` as `-9` from the
    // word), which the verifier rejects as outside the packet.
    // SAFETY: a read of a local.
    let off = unsafe { core::ptr::read_volatile(&off) } & OFFSET_MASK;
    let p = data + off as usize;
    if p + N > end {
        return false;
    }
    let mut i = 0;
    while i < N {
        // SAFETY: `p + i` is below `data_end`, checked above.
        out[i] = unsafe { *((p + i) as *const u8) };
        i += 1;
    }
    true
}

/// Finds the next LF from `scan.cursor`, eight bytes at a time, and
/// handles it. Returns 0 to go on, 1 to stop.
///
/// One LF per call and no loop inside: the verifier checks a single path
/// through `on_lf` instead of every combination of LFs in a word.
extern "C" fn scan_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `ScanCtx`, alive for the whole loop.
    let msg = unsafe { (*(ctx as *mut ScanCtx)).msg };
    let Some(scan) = SCAN.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's map value, ours for the whole loop.
    let scan = unsafe { &mut *scan };
    let cursor = scan.cursor;
    if cursor >= scan.len {
        return 1;
    }
    // The word at the cursor; near the end, the last word of the inspected
    // bytes with the ones before the cursor masked off (`len` >= 8).
    let start = if cursor + 8 > scan.len {
        scan.len - 8
    } else {
        cursor
    };
    let mut bytes = [0u8; 8];
    if !read(msg, start, &mut bytes) {
        return 1;
    }
    let word = u64::from_le_bytes(bytes);
    // Bytes equal to LF become zero; the classic zero-byte test sets bit 7
    // of every zero byte. (It may also flag a byte above a zero one, never
    // below: the lowest flag is a real LF.)
    let x = word ^ 0x0a0a_0a0a_0a0a_0a0a;
    let mut zeros = x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080;
    zeros &= u64::MAX << (8 * ((cursor - start) & 7));
    if zeros == 0 {
        scan.cursor = start + 8;
        return 0;
    }
    // Index of the lowest flagged byte: the bits below its flag, counted
    // without branches, are 8 * index + 7.
    let pos = start + (popcount((zeros & zeros.wrapping_neg()) - 1) >> 3);
    scan.cursor = pos + 1;
    if on_lf(msg, scan, pos) { 1 } else { 0 }
}

/// Set bits of `x` (SWAR; BPF has no popcount instruction).
#[inline(always)]
fn popcount(x: u64) -> u64 {
    let x = x - ((x >> 1) & 0x5555_5555_5555_5555);
    let x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    let x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    x.wrapping_mul(0x0101_0101_0101_0101) >> 56
}

/// Handles the LF at `pos`. Returns true when the scan is decided.
#[inline(always)]
fn on_lf(msg: *mut sk_msg_md, scan: &mut Scan, pos: u64) -> bool {
    if scan.line_end == 0 {
        // The request line: `... HTTP/1.x\r\n`.
        if pos < MIN_LINE_LF {
            scan.verdict = verdict::NOT_HTTP;
            return true;
        }
        let mut tail = [0u8; 10];
        if !read(msg, pos - 10, &mut tail)
            || &tail[..8] != b" HTTP/1."
            || !tail[8].is_ascii_digit()
            || tail[9] != b'\r'
        {
            scan.verdict = verdict::NOT_HTTP;
            return true;
        }
        scan.line_end = pos + 1;
    } else {
        // A header line: must end in CRLF too.
        let mut cr = [0u8; 1];
        if !read(msg, pos - 1, &mut cr) || cr[0] != b'\r' {
            scan.verdict = verdict::NOT_HTTP;
            return true;
        }
    }
    // The line after this LF: the blank line, or a header.
    let next = pos + 1;
    if next + 2 > scan.len {
        return false;
    }
    let mut blank = [0u8; 2];
    if read(msg, next, &mut blank) && blank == *b"\r\n" {
        scan.verdict = if scan.existing_at != 0 {
            verdict::EXISTING
        } else {
            verdict::HEAD_COMPLETE
        };
        scan.head_end = next + 2;
        return true;
    }
    let mut name = [0u8; 12];
    if scan.existing_at == 0
        && next + 12 <= scan.len
        && read(msg, next, &mut name)
        && is_name(&name, b"traceparent:")
    {
        scan.existing_at = next;
        return false;
    }
    let mut name = [0u8; 15];
    if scan.length_at == 0
        && next + 15 <= scan.len
        && read(msg, next, &mut name)
        && is_name(&name, b"content-length:")
    {
        scan.length_at = next + 15;
        return false;
    }
    let mut name = [0u8; 18];
    if next + 18 <= scan.len && read(msg, next, &mut name) && is_name(&name, b"transfer-encoding:")
    {
        scan.chunked = 1;
    }
    false
}

/// Whether a header line starts with `lower` (a lower-case header name of
/// letters and `-`, then `:`), the name compared case-insensitively.
#[inline(always)]
fn is_name<const N: usize>(line: &[u8; N], lower: &[u8; N]) -> bool {
    let mut i = 0;
    while i + 1 < N {
        // OR 0x20 folds exactly the upper-case letters onto lower case and
        // keeps `-` (a CR would pass for it; names hold none).
        if line[i] | 0x20 != lower[i] {
            return false;
        }
        i += 1;
    }
    line[N - 1] == b':'
}
