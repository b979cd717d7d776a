//! Syscall-tracepoint capture of HTTP/1.x bytes (see `fathom_common::http`).
//!
//! `sys_enter_*` remembers the arguments of a socket call per thread, only
//! for sockets registered in `CONNS` whose bytes are (or may be) HTTP;
//! `sys_exit_*` copies the bytes moved into a per-CPU scratch event and sends
//! as much of it as was captured.

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_buf,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, ProgramArray},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use fathom_common::http::{
    CAPTURE_HEAD, CAPTURE_TAIL, ConnEvent, ConnInfo, ConnKey, DataEvent, HttpCounter, PROCESS_ENV,
    ProcessInfo, Serving, SockAddr, SockOffsets, TraceContext, ctx_flags, data_flags, direction,
    event_kind, head_state, parse_traceparent, proto, role, stage, syscall,
};

use crate::maps::{
    CONNS, GO_CONTEXT, GO_PROCS, HTTP_EVENTS, INJECTED, RING_FLAGS, SERVING, count, inject_enabled,
    mask, may_begin_request, monitored, pair_enabled, random_id, starts_message,
};
use crate::mem::set;

/// Offsets of `parent_pid` and `child_pid` in the `sched_process_fork`
/// record; the loader reads them from the tracepoint's format file
/// (`fathom_common::http::globals::FORK_*_OFFSET`).
#[unsafe(no_mangle)]
static HTTP_FORK_PARENT_OFFSET: u32 = 12;
#[unsafe(no_mangle)]
static HTTP_FORK_CHILD_OFFSET: u32 = 20;
/// Kernel struct member offsets from BTF (`fathom_common::http::SockOffsets`);
/// the loader sets them, `enabled == 0` leaves sockets unread.
#[unsafe(no_mangle)]
pub(crate) static HTTP_SOCK_OFFSETS: SockOffsets = SockOffsets {
    enabled: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_fd: 0,
    fdt_max_fds: 0,
    file_private_data: 0,
    socket_sk: 0,
    skc_family: 0,
    skc_rcv_saddr: 0,
    skc_num: 0,
    skc_v6_rcv_saddr: 0,
    tcp_srtt_us: 0,
    tcp_total_retrans: 0,
    skc_daddr: 0,
    skc_dport: 0,
    skc_v6_daddr: 0,
    sk_protocol: 0,
    task_mm: 0,
    mm_env_start: 0,
    mm_env_end: 0,
    task_group_leader: 0,
    task_comm: 0,
    task_cgroups: 0,
    css_set_subsys: 0,
    css_cgroup: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    _pad: 0,
};

/// Syscall arguments start here in `sys_enter_*` records; `ret` is here in
/// `sys_exit_*` records.
const ARGS: usize = 16;
pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;
/// iovecs looked at per vectored call: past the head, only to find where the
/// transfer ends (its tail). nginx reads a proxied body with `readv` into
/// up to `proxy_buffers` buffers; with 4, a read that filled more (a slow
/// or busy reader) had no tail, and a chunked body whose framing was lost
/// never saw its last chunk (`tests/tests/tracing.rs`, chunked responses).
const MAX_IOV: usize = 16;

/// `accept`'s arguments, between entry and exit.
#[repr(C)]
#[derive(Clone, Copy)]
struct AcceptArgs {
    listen_fd: u32,
    _pad: u32,
    addr: u64,
}

/// `connect`'s arguments, between entry and exit.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConnectArgs {
    fd: u32,
    _pad: u32,
    peer: SockAddr,
}

/// A read or write in progress on a registered socket.
#[repr(C)]
#[derive(Clone, Copy)]
struct Active {
    fd: u32,
    /// A `syscall`.
    syscall: u8,
    /// A `direction`.
    direction: u8,
    /// Non-zero: `buf` is an iovec array of `count` entries.
    vectored: u8,
    _pad: u8,
    buf: u64,
    count: u64,
    start_ns: u64,
}

/// The event being built, with room past `head` so that bounded copies at
/// any offset below `CAPTURE_HEAD` stay inside the map value.
#[repr(C)]
pub(crate) struct Scratch {
    pub(crate) event: DataEvent,
    overflow: [u8; CAPTURE_HEAD],
    /// Where the traceparent search found `traceparent:` (index into head),
    /// or u32::MAX.
    found: u32,
    /// Head bytes to search.
    search_len: u32,
    /// Where the search found the empty line that ends a head (index into
    /// head), or u32::MAX.
    pub(crate) head_end: u32,
    /// Where the search found the header lines `pair` reads (index into
    /// head of the line's start), or u32::MAX: `Content-Length`,
    /// `Transfer-Encoding`, `Host`, `User-Agent`.
    pub(crate) content_length: u32,
    pub(crate) transfer_encoding: u32,
    pub(crate) host: u32,
    pub(crate) agent: u32,
    /// Where the second line starts (the first line's length + 2), or
    /// u32::MAX.
    pub(crate) line_end: u32,
    /// A vectored transfer's capture in progress (see `capture_vectored`).
    vec: Vectored,
}

// The head is 8-aligned wherever a `DataEvent` or a `Scratch` is (the
// word loads of `mem` rely on it).
const _: () = assert!(
    core::mem::align_of::<DataEvent>() >= 8
        && core::mem::offset_of!(DataEvent, head) % 8 == 0
        && core::mem::offset_of!(DataEvent, tail) % 8 == 0
        && core::mem::offset_of!(Scratch, event) == 0
);

/// The state of `iov_step`, one iovec a step, in map memory (the verifier
/// checks the callback once, not once per iovec).
#[repr(C)]
struct Vectored {
    iov: u64,
    iovcnt: u64,
    /// Bytes of the transfer not yet accounted to an iovec.
    left: u64,
    /// Head bytes captured so far.
    off: u64,
    /// The last two iovecs used: (base, bytes used).
    last: (u64, u64),
    prev: (u64, u64),
}

#[map]
static ACCEPTS: HashMap<u32, AcceptArgs> = HashMap::with_max_entries(16384, 0);
#[map]
static CONNECTS: HashMap<u32, ConnectArgs> = HashMap::with_max_entries(16384, 0);
#[map]
static ACTIVE: HashMap<u32, Active> = HashMap::with_max_entries(16384, 0);
#[map]
pub(crate) static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// The second stages of the data path ([`stage`] indexes), filled by user
/// space.
#[map]
static HTTP_STAGES: ProgramArray = ProgramArray::with_max_entries(stage::COUNT, 0);
/// Likewise for the uretprobe programs (a program array serves one type).
#[map]
static HTTP_SSL_STAGES: ProgramArray = ProgramArray::with_max_entries(stage::COUNT, 0);
/// An OpenSSL `SSL_read`/`SSL_write` (or `_ex`) in progress, or an
/// `SSL_do_handshake` (`direction` [`HANDSHAKE`]) that only learns the socket.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SslActive {
    pub(crate) ssl: u64,
    buf: u64,
    /// `_ex` variants: where the byte count is written; else 0.
    count_ptr: u64,
    start_ns: u64,
    /// The socket, learned from the syscall OpenSSL makes inside the call
    /// or from an earlier call on the same `SSL *`; u32::MAX: unknown.
    pub(crate) fd: u32,
    direction: u8,
    _pad: [u8; 3],
}

/// `SslActive::direction` of a handshake: nothing is emitted at its return.
const HANDSHAKE: u8 = u8::MAX;

#[map]
pub(crate) static SSL_ACTIVE: HashMap<u32, SslActive> = HashMap::with_max_entries(16384, 0);
/// `SSL *` -> its socket's fd (OpenSSL may answer from its buffer without
/// a syscall).
#[map]
pub(crate) static SSL_FDS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);

/// Processes whose first connection woke the reader (tgid -> 1), until
/// they exit.
#[map]
static WOKEN: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU connection counter: conn ids are `counter << 16 | cpu`.
#[map]
static CONN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: syscall tracepoint records have 6 u64 arguments from ARGS.
    unsafe { ctx.read_at::<u64>(ARGS + 8 * n) }.unwrap_or(0)
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: `ret` of a sys_exit record.
    unsafe { ctx.read_at::<i64>(ARGS) }.unwrap_or(-1)
}

#[inline(always)]
pub(crate) fn ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

pub(crate) fn next_conn_id() -> u64 {
    // SAFETY: a plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    match CONN_SEQ.get_ptr_mut(0) {
        Some(seq) => {
            // SAFETY: a valid per-CPU map value.
            unsafe {
                *seq += 1;
                (*seq << 16) | (cpu & 0xffff)
            }
        }
        None => cpu,
    }
}

/// Reads a socket address from user memory.
fn read_sockaddr(addr: u64) -> SockAddr {
    let mut out = SockAddr::default();
    if addr == 0 {
        return out;
    }
    let mut raw = [0u8; 28];
    // SAFETY: the helper checks the user address.
    if unsafe { bpf_probe_read_user_buf(addr as *const u8, &mut raw) }.is_err() {
        return out;
    }
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    let port = u16::from_be_bytes([raw[2], raw[3]]);
    if family == AF_INET {
        out.addr[..4].copy_from_slice(&raw[4..8]);
    } else if family == AF_INET6 {
        out.addr.copy_from_slice(&raw[8..24]);
    } else {
        out.family = family;
        return out;
    }
    out.family = family;
    out.port = port;
    out
}

/// One loader-set offset of `HTTP_SOCK_OFFSETS` (read field by field: the
/// whole struct would cost stack).
macro_rules! offset {
    ($field:ident) => {
        ({
            // Also used inside `unsafe` blocks, where this one is redundant.
            #[allow(unused_unsafe)]
            // SAFETY: a plain read of a loader-set global.
            let v = unsafe { core::ptr::read_volatile(&$crate::capture::HTTP_SOCK_OFFSETS.$field) };
            v
        } as u64)
    };
}
pub(crate) use offset;

#[inline(always)]
pub(crate) fn read_kernel<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    // SAFETY: the helper checks the kernel address.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// The `struct sock` behind the current task's `fd` (current → files →
/// fdt → fd[fd] → file.private_data → socket.sk), with this end's address
/// written to `local`; 0 when the offsets are not set or it is not an
/// IPv4/IPv6 socket. Called at `accept`/`connect` exit, in the task's own
/// context.
#[inline(always)]
fn sock_of_fd(fd: u32, local: &mut SockAddr) -> u64 {
    try_sock_of_fd(fd, local).unwrap_or(0)
}

#[inline(always)]
fn try_sock_of_fd(fd: u32, local: &mut SockAddr) -> Option<u64> {
    if offset!(enabled) == 0 {
        return None;
    }
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task + offset!(task_files))?;
    let fdt: u64 = read_kernel(files + offset!(files_fdt))?;
    let max_fds: u32 = read_kernel(fdt + offset!(fdt_max_fds))?;
    if fd >= max_fds {
        return None;
    }
    let fds: u64 = read_kernel(fdt + offset!(fdt_fd))?;
    let file: u64 = read_kernel(fds + 8 * fd as u64)?;
    let socket: u64 = read_kernel(file + offset!(file_private_data))?;
    let sk: u64 = read_kernel(socket + offset!(socket_sk))?;
    let family: u16 = read_kernel(sk + offset!(skc_family))?;
    if family == AF_INET {
        let a: [u8; 4] = read_kernel(sk + offset!(skc_rcv_saddr))?;
        local.addr[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        local.addr = read_kernel(sk + offset!(skc_v6_rcv_saddr))?;
    } else {
        return None;
    }
    local.port = read_kernel(sk + offset!(skc_num))?;
    local.family = family;
    Some(sk)
}

/// The connection's smoothed RTT (µs) and retransmits so far into `event`,
/// when its socket is known.
#[inline(always)]
pub(crate) fn read_tcp(event: &mut DataEvent, sk: u64) {
    set(&mut event.flags, 0);
    set(&mut event.srtt_us, 0);
    set(&mut event.total_retrans, 0);
    if sk == 0 {
        return;
    }
    let srtt: Option<u32> = read_kernel(sk + offset!(tcp_srtt_us));
    let retrans: Option<u32> = read_kernel(sk + offset!(tcp_total_retrans));
    if let (Some(srtt), Some(retrans)) = (srtt, retrans) {
        // The kernel keeps srtt << 3.
        event.srtt_us = srtt >> 3;
        event.total_retrans = retrans;
        event.flags = data_flags::TCP;
    }
}

#[inline(always)]
fn register(tgid: u32, tid: u32, fd: u32, conn_role: u8, peer: &SockAddr, listen_fd: u32) {
    let conn_id = next_conn_id();
    let mut local = SockAddr::default();
    let sk = sock_of_fd(fd, &mut local);
    let info = ConnInfo {
        conn_id,
        role: conn_role,
        proto: proto::UNKNOWN,
        head: head_state::SETTLED,
        prefix_len: 0,
        server_tid: 0,
        sk,
        prefix: 0,
    };
    if CONNS.insert(&ConnKey { tgid, fd }, &info, 0).is_err() {
        count(HttpCounter::ConnsFull);
        return;
    }
    count(HttpCounter::Conns);
    send_conn(ConnEvent {
        kind: event_kind::CONN_OPEN,
        role: conn_role,
        _reserved: [0; 2],
        tgid,
        tid,
        fd,
        conn_id,
        // SAFETY: a plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        peer: *peer,
        listen_fd,
        _reserved2: 0,
        local,
    });
}

pub(crate) fn send_conn(event: ConnEvent) {
    // The first connection of a process wakes the reader: it reads the
    // process in /proc before a short-lived client exits. Later ones do not
    // (a wake-up is an inter-processor interrupt: one per connection would
    // tax every short connection of a busy service).
    let flags = if event.kind == event_kind::CONN_OPEN
        // SAFETY: a plain lookup.
        && unsafe { WOKEN.get(&event.tgid) }.is_none()
    {
        let _ = WOKEN.insert(&event.tgid, &1, 0);
        send_process(event.tgid);
        aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64
    } else {
        RING_FLAGS
    };
    if HTTP_EVENTS.output::<ConnEvent>(&event, flags).is_err() {
        count(HttpCounter::EventsLost);
    }
}

/// The process's [`ProcessInfo`] (its comm, cgroup and the start of its
/// environment), ahead of its first `CONN_OPEN`: user space falls back on
/// it when the process has left `/proc` before it is read. Called in the
/// process's own thread (every `CONN_OPEN` is), once per process. A
/// function of its own (a BPF subprogram): inlined, its locals would be
/// on the caller's frame, which 6.1's `http_exit_accept` (464 bytes, and
/// `memset` called from it) has no room for. It must not call `memset`
/// itself (no array zeroing here): that would be a third frame.
#[inline(never)]
fn send_process(tgid: u32) {
    let Some(mut entry) = HTTP_EVENTS.reserve::<ProcessInfo>(0) else {
        count(HttpCounter::EventsLost);
        return;
    };
    let p = entry.as_mut_ptr();
    // SAFETY: `p` is the reserved record, ours until submitted; every
    // field is written before it is.
    unsafe {
        // `kind`, `_reserved` and `tgid` as one word: stores of the zero
        // bytes alone become a `memset` call, a third frame on 6.1.
        const {
            assert!(core::mem::offset_of!(ProcessInfo, tgid) == 4);
        }
        let t = tgid.to_ne_bytes();
        let head = [event_kind::PROCESS, 0, 0, 0, t[0], t[1], t[2], t[3]];
        core::ptr::write_volatile(p.cast::<u64>(), u64::from_ne_bytes(head));
        (*p).cgroup_id = bpf_get_current_cgroup_id();
        (*p).cgroup1_id = read_cgroup1_id();
        read_comm((*p).comm.as_mut_ptr());
        set(&mut (*p)._reserved2, 0);
        (*p).env_len = read_env((*p).env.as_mut_ptr());
    }
    entry.submit(RING_FLAGS);
}

/// The inode number of the current task's cgroup on the cgroup v1
/// hierarchy user space follows (current → cgroups → subsys[id] → cgroup →
/// kn → id); 0 when it is not followed or a read fails.
#[inline(always)]
fn read_cgroup1_id() -> u64 {
    if offset!(task_cgroups) == 0 {
        return 0;
    }
    // SAFETY: a plain helper call.
    let task = unsafe { bpf_get_current_task() };
    read_kernel::<u64>(task + offset!(task_cgroups))
        .and_then(|set| read_kernel::<u64>(set + offset!(css_set_subsys)))
        .and_then(|css| read_kernel::<u64>(css + offset!(css_cgroup)))
        .and_then(|cgroup| read_kernel::<u64>(cgroup + offset!(cgroup_kn)))
        .and_then(|kn| read_kernel::<u64>(kn + offset!(kernfs_node_id)))
        .unwrap_or(0)
}

/// The process's name (its main thread's `comm`) into `out` (16 bytes),
/// straight into the record: an array on the stack would cost the frame
/// 16 bytes. The calling thread's when the offsets are not known; zeroes
/// when nothing reads.
#[inline(always)]
fn read_comm(out: *mut u8) {
    let leader = if offset!(task_group_leader) == 0 {
        None
    } else {
        // SAFETY: a plain helper call.
        let task = unsafe { bpf_get_current_task() };
        read_kernel::<u64>(task + offset!(task_group_leader)).filter(|&l| l != 0)
    };
    // SAFETY: the helpers check the kernel address (or read the current
    // task) and write at most 16 bytes to `out`, which has 16; on failure
    // they zero them.
    unsafe {
        let read = leader.is_some_and(|l| {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                out.cast::<c_void>(),
                16,
                (l + offset!(task_comm)) as *const c_void,
            ) == 0
        });
        if !read {
            let _ = aya_ebpf::helpers::generated::bpf_get_current_comm(out.cast::<c_void>(), 16);
        }
    }
}

/// Copies the start of the current process's environment block to `out`
/// (`PROCESS_ENV` bytes of room); returns the bytes copied (0: not read).
#[inline(always)]
fn read_env(out: *mut u8) -> u32 {
    if offset!(task_mm) == 0 {
        return 0;
    }
    // SAFETY: a plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let mm = match read_kernel::<u64>(task + offset!(task_mm)) {
        Some(mm) if mm != 0 => mm,
        _ => return 0,
    };
    let (Some(start), Some(end)) = (
        read_kernel::<u64>(mm + offset!(mm_env_start)),
        read_kernel::<u64>(mm + offset!(mm_env_end)),
    ) else {
        return 0;
    };
    if end <= start {
        return 0;
    }
    let len = (end - start).min(PROCESS_ENV as u64) as u32;
    // SAFETY: the helper checks the user address; `out` has PROCESS_ENV
    // bytes and `len` is at most that.
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            out.cast::<c_void>(),
            len,
            start as *const c_void,
        )
    };
    if ret == 0 { len } else { 0 }
}

// ---- accept / connect -------------------------------------------------------

#[tracepoint]
pub fn http_enter_accept(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if monitored(tgid) {
        let args = AcceptArgs {
            listen_fd: arg(&ctx, 0) as u32,
            _pad: 0,
            addr: arg(&ctx, 1),
        };
        let _ = ACCEPTS.insert(&tid, &args, 0);
    }
    0
}

#[tracepoint]
pub fn http_exit_accept(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    // SAFETY: copied out before the entry is removed.
    let Some(args) = (unsafe { ACCEPTS.get(&tid) }).copied() else {
        return 0;
    };
    let _ = ACCEPTS.remove(&tid);
    let fd = ret(&ctx);
    if fd < 0 {
        return 0;
    }
    let peer = read_sockaddr(args.addr);
    // No address asked for: register anyway; the first bytes decide.
    if args.addr == 0 || peer.family == AF_INET || peer.family == AF_INET6 {
        register(tgid, tid, fd as u32, role::SERVER, &peer, args.listen_fd);
    }
    0
}

#[tracepoint]
pub fn http_enter_connect(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if !monitored(tgid) {
        return 0;
    }
    let peer = read_sockaddr(arg(&ctx, 1));
    if peer.family == AF_INET || peer.family == AF_INET6 {
        let args = ConnectArgs {
            fd: arg(&ctx, 0) as u32,
            _pad: 0,
            peer,
        };
        let _ = CONNECTS.insert(&tid, &args, 0);
    }
    0
}

#[tracepoint]
pub fn http_exit_connect(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    // SAFETY: copied out before the entry is removed.
    let Some(args) = (unsafe { CONNECTS.get(&tid) }).copied() else {
        return 0;
    };
    let _ = CONNECTS.remove(&tid);
    let r = ret(&ctx);
    if r == 0 || r == -EINPROGRESS {
        register(tgid, tid, args.fd, role::CLIENT, &args.peer, u32::MAX);
    }
    0
}

#[tracepoint]
pub fn http_enter_close(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    let key = ConnKey {
        tgid,
        fd: arg(&ctx, 0) as u32,
    };
    // SAFETY: copied out before the entry is removed.
    let Some(info) = (unsafe { CONNS.get(&key) }).copied() else {
        return 0;
    };
    let _ = CONNS.remove(&key);
    send_conn(ConnEvent {
        kind: event_kind::CONN_CLOSE,
        role: info.role,
        _reserved: [0; 2],
        tgid,
        tid,
        fd: key.fd,
        conn_id: info.conn_id,
        // SAFETY: a plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        peer: SockAddr::default(),
        listen_fd: u32::MAX,
        _reserved2: 0,
        local: SockAddr::default(),
    });
    0
}

// ---- threads ---------------------------------------------------------------

#[tracepoint]
pub fn http_fork(ctx: TracePointContext) -> u32 {
    // SAFETY: plain reads of loader-set globals.
    let (parent_off, child_off) = unsafe {
        (
            core::ptr::read_volatile(&HTTP_FORK_PARENT_OFFSET),
            core::ptr::read_volatile(&HTTP_FORK_CHILD_OFFSET),
        )
    };
    // SAFETY: offsets from the record's format file.
    let parent = unsafe { ctx.read_at::<u32>(parent_off as usize) }.unwrap_or(0);
    // SAFETY: as above.
    let child = unsafe { ctx.read_at::<u32>(child_off as usize) }.unwrap_or(0);
    // SAFETY: copied out.
    if let Some(serving) = unsafe { SERVING.get(&parent) }.copied() {
        let _ = SERVING.insert(&child, &serving, 0);
    }
    0
}

#[tracepoint]
pub fn http_exit_thread(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    let _ = SERVING.remove(&tid);
    let _ = ACTIVE.remove(&tid);
    let _ = ACCEPTS.remove(&tid);
    let _ = CONNECTS.remove(&tid);
    let _ = INJECTED.remove(&tid);
    // SAFETY: `group_dead` of the sched_process_exit record.
    let group_dead = unsafe { ctx.read_at::<u8>(32) }.unwrap_or(0);
    if group_dead != 0 {
        let _ = WOKEN.remove(&tgid);
    }
    if group_dead != 0 && monitored(tgid) {
        send_conn(ConnEvent {
            kind: event_kind::PROCESS_EXIT,
            role: role::UNKNOWN,
            _reserved: [0; 2],
            tgid,
            tid,
            fd: u32::MAX,
            conn_id: 0,
            // SAFETY: a plain helper call.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            peer: SockAddr::default(),
            listen_fd: u32::MAX,
            _reserved2: 0,
            local: SockAddr::default(),
        });
    }
    0
}

// ---- reads and writes ------------------------------------------------------

/// Remembers a read or write on a registered socket that may carry HTTP.
#[inline(always)]
fn enter_io(fd: u64, syscall: u8, dir: u8, vectored: bool, buf: u64, count: u64) {
    let (tgid, tid) = ids();
    if let Some(ssl) = SSL_ACTIVE.get_ptr_mut(&tid) {
        // OpenSSL's own read or write of the socket under an SSL call.
        // SAFETY: a valid map value.
        unsafe {
            (*ssl).fd = fd as u32;
            let _ = SSL_FDS.insert(&(*ssl).ssl, &(fd as u32), 0);
        }
    }
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    // SAFETY: only read.
    match unsafe { CONNS.get(&key) } {
        Some(info) if info.proto != proto::OTHER => {}
        _ => return,
    }
    let active = Active {
        fd: fd as u32,
        syscall,
        direction: dir,
        vectored: u8::from(vectored),
        _pad: 0,
        buf,
        count,
        // SAFETY: a plain helper call.
        start_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = ACTIVE.insert(&tid, &active, 0);
}

macro_rules! enter_program {
    ($name:ident, $syscall:expr, $dir:expr, $vectored:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            enter_io(
                arg(&ctx, 0),
                $syscall,
                $dir,
                $vectored,
                arg(&ctx, 1),
                arg(&ctx, 2),
            );
            0
        }
    };
}

enter_program!(http_enter_read, syscall::READ, direction::READ, false);
enter_program!(
    http_enter_recvfrom,
    syscall::RECVFROM,
    direction::READ,
    false
);
enter_program!(http_enter_readv, syscall::READV, direction::READ, true);
enter_program!(http_enter_write, syscall::WRITE, direction::WRITE, false);
enter_program!(http_enter_sendto, syscall::SENDTO, direction::WRITE, false);
enter_program!(http_enter_writev, syscall::WRITEV, direction::WRITE, true);

/// `recvmsg`/`sendmsg`: the iovecs are in the `user_msghdr`.
#[inline(always)]
fn enter_msg(ctx: &TracePointContext, syscall: u8, dir: u8) {
    let msg = arg(ctx, 1);
    if msg == 0 {
        return;
    }
    // SAFETY: the helper checks the user address (msg_iov at 16, msg_iovlen at 24).
    let iov = unsafe { bpf_probe_read_user((msg + 16) as *const u64) }.unwrap_or(0);
    // SAFETY: as above.
    let iovlen = unsafe { bpf_probe_read_user((msg + 24) as *const u64) }.unwrap_or(0);
    enter_io(arg(ctx, 0), syscall, dir, true, iov, iovlen);
}

#[tracepoint]
pub fn http_enter_recvmsg(ctx: TracePointContext) -> u32 {
    enter_msg(&ctx, syscall::RECVMSG, direction::READ);
    0
}

#[tracepoint]
pub fn http_enter_sendmsg(ctx: TracePointContext) -> u32 {
    enter_msg(&ctx, syscall::SENDMSG, direction::WRITE);
    0
}

/// `sendfile(out_fd, in_fd, offset, count)`: only the count is known.
#[tracepoint]
pub fn http_enter_sendfile(ctx: TracePointContext) -> u32 {
    enter_io(
        arg(&ctx, 0),
        syscall::SENDFILE,
        direction::WRITE,
        false,
        0,
        0,
    );
    0
}

#[tracepoint]
pub fn http_exit_io(ctx: TracePointContext) -> u32 {
    let _ = try_exit_io(&ctx);
    0
}

fn try_exit_io(ctx: &TracePointContext) -> Result<(), ()> {
    let (tgid, tid) = ids();
    // SAFETY: copied out before the entry is removed.
    let active = unsafe { ACTIVE.get(&tid) }.copied().ok_or(())?;
    let _ = ACTIVE.remove(&tid);
    let moved = ret(ctx);
    if moved <= 0 {
        return Ok(());
    }
    let moved = moved as u64;
    let key = ConnKey {
        tgid,
        fd: active.fd,
    };
    let info = CONNS.get_ptr_mut(&key).ok_or(())?;
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: valid map values; this CPU's scratch is ours until we return.
    let (info, scratch) = unsafe { (&mut *info, &mut *scratch) };
    let event = &mut scratch.event;
    event.kind = event_kind::DATA;
    event.direction = active.direction;
    event.syscall = active.syscall;
    event.tgid = tgid;
    event.tid = tid;
    event.fd = active.fd;
    event.conn_id = info.conn_id;
    event.start_ns = active.start_ns;
    // SAFETY: a plain helper call.
    event.end_ns = unsafe { bpf_ktime_get_ns() };
    event.len = moved;
    set(&mut event.head_len, 0);
    set(&mut event.tail_len, 0);
    read_tcp(event, info.sk);
    crate::mem::clear_ctx(event);
    if active.syscall != syscall::SENDFILE {
        if active.vectored != 0 {
            capture_vectored(scratch, active.buf, active.count, moved);
        } else {
            capture_plain(scratch, active.buf, moved);
        }
    }
    tail_call(ctx, &HTTP_STAGES, stage::PROCESS);
    Ok(())
}

/// Tail-calls a second stage of `stages`; returns (counted) when it is not
/// there.
#[inline(always)]
pub(crate) fn tail_call<C: EbpfContext>(ctx: &C, stages: &ProgramArray, index: u32) {
    // SAFETY: on success the stage replaces this program; its context is
    // this one (each array holds stages of its callers' program type).
    unsafe { stages.tail_call(ctx, index) };
    count(HttpCounter::StageMissing);
}

/// Second stage of `http_exit_io`: the scratch event's connection is
/// classified, matched to its server request and sent.
#[tracepoint]
pub fn http_exit_process(_ctx: TracePointContext) -> u32 {
    let _ = try_process(false);
    0
}

/// Second stage of `http_ssl_exit`, likewise (OpenSSL's plaintext does not
/// classify its socket, and its writes are not injected).
#[uretprobe]
pub fn http_ssl_process(_ctx: RetProbeContext) -> u32 {
    let _ = try_process(true);
    0
}

#[inline(always)]
pub(crate) fn try_process(ssl: bool) -> Result<(), ()> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch, filled by the first stage.
    let scratch = unsafe { &mut *scratch };
    let key = ConnKey {
        tgid: scratch.event.tgid,
        fd: scratch.event.fd,
    };
    let tid = scratch.event.tid;
    let info = CONNS.get_ptr_mut(&key).ok_or(())?;
    // SAFETY: a valid map value.
    let info = unsafe { &mut *info };
    let (request, response) = joined_message_start(&scratch.event, info);
    if !ssl {
        if info.proto == proto::UNKNOWN {
            if request || response {
                info.proto = proto::HTTP1;
            } else if info.prefix_len != 0 {
                // May be the first byte of a request: the next read says.
                return Ok(());
            } else if scratch.event.syscall != syscall::SENDFILE {
                // Not HTTP/1.x: leave this connection alone from now on.
                info.proto = proto::OTHER;
                return Ok(());
            } else {
                return Ok(());
            }
        }
    }
    track_server_request(scratch, tid, info, request, response);
    if !ssl
        && scratch.event.direction == direction::WRITE
        && inject_enabled()
        // SAFETY: copied out before the entry is removed.
        && let Some(injected) = unsafe { INJECTED.get(&tid) }.copied()
    {
        let _ = INJECTED.remove(&tid);
        scratch.event.ctx = injected;
    }
    if !ssl && pair_enabled() && crate::pair::consume(scratch, info) {
        return Ok(());
    }
    send_data(scratch);
    Ok(())
}

/// Sends the scratch event, cut after its captured head.
#[inline(always)]
fn send_data(scratch: &Scratch) {
    let size = DataEvent::HEAD_OFFSET + (scratch.event.head_len as usize & (CAPTURE_HEAD * 2 - 1));
    let size = if size > core::mem::size_of::<DataEvent>() {
        core::mem::size_of::<DataEvent>()
    } else {
        size
    };
    // SAFETY: `size` bytes of the scratch event are initialised.
    let bytes = unsafe {
        core::slice::from_raw_parts((&scratch.event as *const DataEvent).cast::<u8>(), size)
    };
    if HTTP_EVENTS.output::<[u8]>(bytes, RING_FLAGS).is_err() {
        count(HttpCounter::EventsLost);
    } else {
        count(HttpCounter::DataEvents);
    }
}

/// Copies the head and tail of one contiguous user buffer.
#[inline(always)]
pub(crate) fn capture_plain(scratch: &mut Scratch, buf: u64, moved: u64) {
    let n = if moved > CAPTURE_HEAD as u64 {
        CAPTURE_HEAD
    } else {
        moved as usize
    };
    if read_into(&mut scratch.event.head, 0, buf, n) {
        scratch.event.head_len = n as u32;
    }
    if moved > CAPTURE_HEAD as u64
        && read_tail(&mut scratch.event.tail, buf + moved - CAPTURE_TAIL as u64)
    {
        scratch.event.tail_len = CAPTURE_TAIL as u32;
    }
}

/// Copies the head (and tail, when the end is in one of the first iovecs) of
/// a vectored transfer: one `bpf_loop` step per iovec.
#[inline(always)]
pub(crate) fn capture_vectored(scratch: &mut Scratch, iov: u64, iovcnt: u64, moved: u64) {
    let vec = &mut scratch.vec;
    crate::mem::zero_words(vec);
    vec.iov = iov;
    vec.iovcnt = iovcnt;
    vec.left = moved;
    // SAFETY: `iov_step` has the callback signature bpf_loop requires.
    unsafe { bpf_loop(MAX_IOV as u32, iov_step as *mut c_void, null_mut(), 0) };
    // SAFETY: the callback wrote it through its own pointer to this value.
    let vec = unsafe { core::ptr::read_volatile(&scratch.vec) };
    scratch.event.head_len = vec.off as u32;
    if vec.left == 0
        && moved > CAPTURE_HEAD as u64
        && read_split_tail(&mut scratch.event.tail, vec.prev, vec.last)
    {
        scratch.event.tail_len = CAPTURE_TAIL as u32;
    }
}

/// One iovec of `capture_vectored`. Returns 0 to go on, 1 to stop.
extern "C" fn iov_step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch, owned by the running program.
    let scratch = unsafe { &mut *scratch };
    let vec = &mut scratch.vec;
    if index >= vec.iovcnt || vec.left == 0 {
        return 1;
    }
    let at = vec.iov + 16 * index;
    // SAFETY: the helper checks the user address.
    let base = unsafe { bpf_probe_read_user(at as *const u64) };
    // SAFETY: as above.
    let len = unsafe { bpf_probe_read_user((at + 8) as *const u64) };
    let (Ok(base), Ok(len)) = (base, len) else {
        return 1;
    };
    let used = if len < vec.left { len } else { vec.left };
    let off = vec.off;
    if off < CAPTURE_HEAD as u64 {
        let room = CAPTURE_HEAD as u64 - off;
        let n = if used < room { used } else { room };
        if !read_into(&mut scratch.event.head, off as usize, base, n as usize) {
            return 1;
        }
        scratch.vec.off = off + n;
    }
    let vec = &mut scratch.vec;
    vec.left -= used;
    if used > 0 {
        vec.prev = vec.last;
        vec.last = (base, used);
    }
    0
}

/// The last `CAPTURE_TAIL` bytes of a transfer whose end is in `last` and,
/// when `last` has fewer bytes, `prev` (a chunked body's `0\r\n\r\n` may
/// straddle two iovecs).
#[inline(always)]
fn read_split_tail(tail: &mut [u8; CAPTURE_TAIL], prev: (u64, u64), last: (u64, u64)) -> bool {
    if last.1 >= CAPTURE_TAIL as u64 {
        return read_tail(tail, last.0 + last.1 - CAPTURE_TAIL as u64);
    }
    let n1 = last.1 as usize;
    let n0 = CAPTURE_TAIL - n1;
    if n1 == 0 || prev.1 < n0 as u64 {
        return false;
    }
    // prev's last n0 bytes at buf[n1..16], last's n1 bytes at buf[16..16 + n1]:
    // the tail is buf[n1..n1 + 16].
    let mut buf = [0u8; 2 * CAPTURE_TAIL];
    let n1 = n1 & (CAPTURE_TAIL - 1);
    let n0 = CAPTURE_TAIL - n1;
    // SAFETY: destinations stay inside `buf` (n1 < 16, n0 <= 16); the helper
    // checks the user addresses.
    let ok = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            buf.as_mut_ptr().add(CAPTURE_TAIL).cast::<c_void>(),
            n1 as u32,
            last.0 as *const c_void,
        ) == 0
            && aya_ebpf::helpers::generated::bpf_probe_read_user(
                buf.as_mut_ptr().add(n1).cast::<c_void>(),
                n0 as u32,
                (prev.0 + prev.1 - n0 as u64) as *const c_void,
            ) == 0
    };
    if !ok {
        return false;
    }
    let mut j = 0;
    while j < CAPTURE_TAIL {
        tail[j] = buf[(n1 + j) & (2 * CAPTURE_TAIL - 1)];
        j += 1;
    }
    true
}

/// Reads `n` user bytes at `src` into `head[off..]` (off < CAPTURE_HEAD,
/// n <= CAPTURE_HEAD; the scratch overflow area absorbs the bounds the
/// verifier cannot see).
#[inline(always)]
fn read_into(head: &mut [u8; CAPTURE_HEAD], off: usize, src: u64, n: usize) -> bool {
    if n == 0 {
        return true;
    }
    // Opaque to LLVM, which otherwise drops the mask when it knows a bound
    // the verifier does not (6.1 then rejects the size as unbounded).
    // SAFETY: reads of locals.
    let off = unsafe { core::ptr::read_volatile(&off) } & (CAPTURE_HEAD - 1);
    let n = unsafe { core::ptr::read_volatile(&n) } & (CAPTURE_HEAD * 2 - 1);
    if n > CAPTURE_HEAD {
        return false;
    }
    // SAFETY: `head` is followed by CAPTURE_HEAD bytes of `Scratch::overflow`,
    // so off + n <= 2 * CAPTURE_HEAD stays inside the map value.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            head.as_mut_ptr().add(off).cast::<c_void>(),
            n as u32,
            src as *const c_void,
        ) == 0
    }
}

#[inline(always)]
fn read_tail(tail: &mut [u8; CAPTURE_TAIL], src: u64) -> bool {
    // SAFETY: the helper checks the user address.
    unsafe { bpf_probe_read_user_buf(src as *const u8, tail) }.is_ok()
}

// ---- trace context -----------------------------------------------------------

/// Whether the captured bytes start a request, and whether they start a
/// response (any status).
#[inline(always)]
pub(crate) fn message_start(event: &DataEvent) -> (bool, bool) {
    // SAFETY: the head has CAPTURE_HEAD (>= 8) bytes and is 8-aligned.
    let word = unsafe { crate::mem::load(event.head.as_ptr()) };
    starts_message(word, event.head_len)
}

/// [`message_start`] of a read joined to the short read before it that may
/// have begun a request (`info.prefix`, consumed here); a short read that
/// may begin one becomes the prefix. Go's server reads the first byte of a
/// kept-alive connection's next request while it finishes the last one
/// (its "background read"), then the rest.
#[inline(always)]
pub(crate) fn joined_message_start(event: &DataEvent, info: &mut ConnInfo) -> (bool, bool) {
    // SAFETY: the head has CAPTURE_HEAD (>= 8) bytes and is 8-aligned.
    let word = unsafe { crate::mem::load(event.head.as_ptr()) };
    let len = event.head_len;
    let (mut request, response) = starts_message(word, len);
    if event.direction != direction::READ {
        return (request, response);
    }
    let n = u32::from(info.prefix_len);
    if n > 0 && n < 8 && !request && !response {
        let joined = info.prefix | (word << (8 * n));
        request = starts_message(joined, n + len).0;
    }
    info.prefix_len = 0;
    if !request && !response && len < 8 && may_begin_request(word, len) {
        // Only its own bytes: the scratch's past `len` are another event's.
        info.prefix = word & mask(len);
        info.prefix_len = len as u8;
    }
    (request, response)
}

/// The server side of the trace context, for the event in `scratch` (both
/// the socket and the OpenSSL captures): a request read opens a server
/// request on the thread; the reads that continue its head are searched for
/// its `traceparent` until the head ends; a final response written ends it
/// (`HTTP/1.1 1xx`, such as 100 Continue, comes before the final response:
/// the request is still being served).
#[inline(always)]
fn track_server_request(
    scratch: &mut Scratch,
    tid: u32,
    info: &mut ConnInfo,
    request: bool,
    response: bool,
) {
    if scratch.event.direction == direction::READ {
        if request {
            open_server_request(scratch, tid, info);
            return;
        }
        // A read of another connection (the rest of the request's own body
        // is not one): the thread may have moved on to another callback.
        if let Some(s) = SERVING.get_ptr_mut(&tid) {
            // SAFETY: a valid map value.
            unsafe {
                if (*s).conn_id != info.conn_id {
                    (*s).later_reads = (*s).later_reads.saturating_add(1);
                }
            }
        }
        if info.head == head_state::AWAITING_PARENT {
            continue_server_request(scratch, info);
        }
    } else if scratch.event.direction == direction::WRITE
        && response
        && !(scratch.event.head_len > 9 && scratch.event.head[9] == b'1')
    {
        info.head = head_state::SETTLED;
        close_server_request(tid);
    }
}

/// A request arrived on `conn_id`: choose its ids and mark the thread as
/// serving it.
fn open_server_request(scratch: &mut Scratch, tid: u32, info: &mut ConnInfo) {
    count(HttpCounter::ServerRequests);
    let conn_id = info.conn_id;
    let mut ctx = TraceContext {
        flags: ctx_flags::SERVER,
        ..TraceContext::default()
    };
    random_id(&mut ctx.span_id);
    let (parent, ended) = search_head(scratch);
    match parent {
        Some((trace, parent)) => {
            ctx.trace_id = trace;
            ctx.parent_span_id = parent;
            ctx.flags |= ctx_flags::REMOTE_PARENT;
        }
        None => random_id(&mut ctx.trace_id),
    }
    // Only a read captured whole was searched whole: past the capture, the
    // rest of a long head is not seen, and a body must not be searched.
    info.head = if parent.is_none() && !ended && scratch.event.len <= CAPTURE_HEAD as u64 {
        head_state::AWAITING_PARENT
    } else {
        head_state::SETTLED
    };
    info.server_tid = tid;
    scratch.event.ctx = ctx;
    // SAFETY: a helper without arguments.
    let read_ns = unsafe { bpf_ktime_get_ns() };
    let serving = match SERVING.get_ptr_mut(&tid) {
        // SAFETY: a valid map value.
        Some(s) => unsafe {
            // A new request on the same connection: the previous one is over.
            let open = if (*s).conn_id == conn_id {
                1
            } else {
                (*s).open + 1
            };
            Serving {
                ctx,
                conn_id,
                open,
                later_reads: 0,
                read_ns,
            }
        },
        None => Serving {
            ctx,
            conn_id,
            open: 1,
            later_reads: 0,
            read_ns,
        },
    };
    let _ = SERVING.insert(&tid, &serving, 0);
    // Go: the goroutine that read the request serves it (it may call out
    // from another thread; see `golang`).
    if is_go(scratch.event.tgid) {
        let g = current_goroutine();
        if g != 0 {
            let _ = GO_CONTEXT.insert(&g, &ctx, 0);
        }
    }
}

/// Whether the goroutine probes saw (or user space found) that `tgid` runs
/// Go.
#[inline(always)]
fn is_go(tgid: u32) -> bool {
    // SAFETY: only tested for presence.
    unsafe { GO_PROCS.get(&tgid) }.is_some()
}

/// The running goroutine (its `runtime.g` address) of the current Go
/// thread, from the user registers saved at its syscall: Go keeps it in
/// R14 (register ABI, amd64), and its syscall stubs do not touch R14. 0:
/// unknown.
#[inline(always)]
fn current_goroutine() -> u64 {
    // SAFETY: helpers on the current task, in whose syscall this runs.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    // `struct pt_regs` (x86-64): r15, then r14.
    read_kernel::<u64>(regs + 8).unwrap_or(0)
}

/// A read that continues the head of a server request opened without a
/// parent: a `traceparent` in it becomes the parent of that request, for
/// the client requests its thread sends from now on.
fn continue_server_request(scratch: &mut Scratch, info: &mut ConnInfo) {
    let (parent, ended) = search_head(scratch);
    if let Some((trace, parent)) = parent {
        info.head = head_state::SETTLED;
        count(HttpCounter::LateParents);
        if let Some(s) = SERVING.get_ptr_mut(&info.server_tid) {
            // SAFETY: a valid map value.
            unsafe {
                if (*s).conn_id == info.conn_id && (*s).ctx.flags & ctx_flags::REMOTE_PARENT == 0 {
                    (*s).ctx.trace_id = trace;
                    (*s).ctx.parent_span_id = parent;
                    (*s).ctx.flags |= ctx_flags::REMOTE_PARENT;
                }
            }
        }
        if is_go(scratch.event.tgid)
            && let Some(c) = GO_CONTEXT.get_ptr_mut(&current_goroutine())
        {
            // SAFETY: a valid map value.
            unsafe {
                if (*c).flags & ctx_flags::REMOTE_PARENT == 0 {
                    (*c).trace_id = trace;
                    (*c).parent_span_id = parent;
                    (*c).flags |= ctx_flags::REMOTE_PARENT;
                }
            }
        }
    } else if ended || scratch.event.len > CAPTURE_HEAD as u64 {
        info.head = head_state::SETTLED;
    }
}

/// Searches the captured head of the event in `scratch`, from its first
/// byte, for a `traceparent` header line and for the empty line that ends
/// a head: the header's trace id and parent span id (when valid), and
/// whether the head ended before it.
#[inline(always)]
fn search_head(scratch: &mut Scratch) -> (Option<([u8; 16], [u8; 8])>, bool) {
    let len = scratch.event.head_len;
    scan_head(scratch);
    // SAFETY: plain loads of fields the scan's callback wrote.
    let (found, head_end) = unsafe {
        (
            core::ptr::read_volatile(&scratch.found),
            core::ptr::read_volatile(&scratch.head_end),
        )
    };
    if found == u32::MAX {
        return (None, head_end != u32::MAX);
    }
    let start = (found as usize & (CAPTURE_HEAD - 1)) + 12;
    // The value's 55 bytes and the one after, in words (aligned stores).
    let mut words = [0u64; 7];
    let mut skip = 0;
    // Optional whitespace after the colon.
    while skip < 2 && scratch.event.head[(start + skip) & (CAPTURE_HEAD - 1)] == b' ' {
        skip += 1;
    }
    let from = (start + skip) & (CAPTURE_HEAD - 1);
    // SAFETY: `words` is 8-aligned; 64 bytes from head + (from & !7) are
    // inside the scratch value (the overflow area follows head).
    unsafe {
        crate::mem::copy_words::<56>(
            words.as_mut_ptr().cast::<u8>(),
            scratch.event.head.as_ptr(),
            from,
        )
    };
    // SAFETY: 56 initialised bytes.
    let value = unsafe { &*words.as_ptr().cast::<[u8; 56]>() };
    let end = value[55];
    if (end == b'\r' || end == b'\n' || end == b' ' || end == b'\t')
        && (from + 55) as u32 <= len
        && let Some((trace, parent, _)) = parse_traceparent(&value[..55])
    {
        return (Some((trace, parent)), false);
    }
    (None, false)
}

/// A response started on the thread: its server request is done.
fn close_server_request(tid: u32) {
    if let Some(s) = SERVING.get_ptr_mut(&tid) {
        // SAFETY: a valid map value.
        unsafe {
            if (*s).open > 1 {
                (*s).open -= 1;
                return;
            }
        }
        let _ = SERVING.remove(&tid);
    }
}

const NEWLINES: u64 = 0x0a0a_0a0a_0a0a_0a0a;
const LOW: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;
/// `tracepar` and `ent:` as little-endian words (lower case).
const TRACEPAR: u64 = u64::from_le_bytes(*b"tracepar");
const ENT: u32 = u32::from_le_bytes(*b"ent:");
/// `\r\n` as a little-endian word.
const CRLF: u16 = u16::from_le_bytes(*b"\r\n");

/// An empty line: the end of a head.
#[inline(always)]
fn is_head_end(a: u64) -> bool {
    a as u16 == CRLF
}

/// Scans the captured head of the event in `scratch` from its first byte
/// to the empty line that ends a head (or the end of the capture), noting
/// where header lines start: the first `traceparent` (`found`), the end
/// (`head_end`), and those [`crate::pair`] reads. A line that starts the
/// read is looked at too (the read before ended with its newline).
#[inline(always)]
pub(crate) fn scan_head(scratch: &mut Scratch) {
    scan(scratch, true);
}

/// [`scan_head`] of a response's head: only its end and its framing
/// (`Content-Length`, `Transfer-Encoding`) are looked for.
#[inline(always)]
pub(crate) fn scan_response_head(scratch: &mut Scratch) {
    scan(scratch, false);
}

/// What a [`search_step`] works on (passed through `bpf_loop`'s context:
/// no map lookup per step).
#[repr(C)]
struct ScanCtx {
    scratch: *mut Scratch,
    /// Request headers too (`traceparent`, `Host`, `User-Agent`).
    request: u64,
}

#[inline(always)]
fn scan(scratch: &mut Scratch, request: bool) {
    // The callback writes through its own pointer to this scratch: volatile
    // accesses keep the compiler from assuming it unchanged.
    // SAFETY: plain stores of fields of a valid map value.
    unsafe {
        core::ptr::write_volatile(&mut scratch.found, u32::MAX);
        core::ptr::write_volatile(&mut scratch.head_end, u32::MAX);
        core::ptr::write_volatile(&mut scratch.content_length, u32::MAX);
        core::ptr::write_volatile(&mut scratch.transfer_encoding, u32::MAX);
        core::ptr::write_volatile(&mut scratch.host, u32::MAX);
        core::ptr::write_volatile(&mut scratch.agent, u32::MAX);
        core::ptr::write_volatile(&mut scratch.line_end, u32::MAX);
        core::ptr::write_volatile(&mut scratch.search_len, scratch.event.head_len);
    }
    if check_line(scratch, 0, request) {
        return;
    }
    let mut ctx = ScanCtx {
        scratch: scratch as *mut Scratch,
        request: u64::from(request),
    };
    // SAFETY: `search_step` has the callback signature bpf_loop requires;
    // `ctx` outlives the call.
    unsafe {
        bpf_loop(
            (CAPTURE_HEAD / 8) as u32,
            search_step as *mut c_void,
            (&mut ctx as *mut ScanCtx).cast::<c_void>(),
            0,
        )
    };
}

/// `content-`, `length:` (7 bytes), `transfer`, `-encodin`, `g:`, `host:`,
/// `user-age`, `nt:` as little-endian words (lower case).
const CONTENT_: u64 = u64::from_le_bytes(*b"content-");
const LENGTH: u64 = u64::from_le_bytes(*b"length:\0");
const TRANSFER: u64 = u64::from_le_bytes(*b"transfer");
const ENCODIN: u64 = u64::from_le_bytes(*b"-encodin");
const G_COLON: u32 = u32::from_le_bytes(*b"g:\0\0");
const HOST: u64 = u64::from_le_bytes(*b"host:\0\0\0");
const USER_AGE: u64 = u64::from_le_bytes(*b"user-age");
const NT_COLON: u64 = u64::from_le_bytes(*b"nt:\0\0\0\0\0");
const LOWER: u64 = 0x2020_2020_2020_2020;
const MASK3: u64 = 0xff_ffff;
const MASK5: u64 = 0xff_ffff_ffff;
const MASK7: u64 = 0xff_ffff_ffff_ffff;

/// Notes what the header line at `pos` of the captured head is; `true` at
/// the empty line that ends the head.
#[inline(always)]
fn check_line(scratch: &mut Scratch, pos: usize, request: bool) -> bool {
    let pos = pos & (CAPTURE_HEAD - 1);
    if pos as u32 >= scratch.search_len {
        return false;
    }
    if pos > 0 && scratch.line_end == u32::MAX {
        scratch.line_end = pos as u32;
    }
    // The 20 bytes at `pos`, from the four aligned words around them.
    let k = pos & !7;
    let shift = ((pos & 7) * 8) as u32;
    // SAFETY: k + 32 <= CAPTURE_HEAD + 24, inside the scratch's overflow
    // area that follows head; head is 8-aligned.
    let (w0, w1, w2, w3) = unsafe {
        let p = scratch.event.head.as_ptr().add(k);
        (
            crate::mem::load(p),
            crate::mem::load(p.add(8)),
            crate::mem::load(p.add(16)),
            crate::mem::load(p.add(24)),
        )
    };
    let a = crate::mem::join(w0, w1, shift);
    let b = crate::mem::join(w1, w2, shift);
    let c = crate::mem::join(w2, w3, shift) as u32;
    if is_head_end(a) {
        if pos as u32 + 2 <= scratch.search_len {
            scratch.head_end = pos as u32;
            return true;
        }
        return false;
    }
    let (la, lb) = (a | LOWER, b | LOWER);
    if !request {
        if la == CONTENT_ && lb & MASK7 == LENGTH {
            if scratch.content_length == u32::MAX {
                scratch.content_length = pos as u32;
            }
        } else if la == TRANSFER && lb == ENCODIN && (c | 0x2020) & 0xffff == G_COLON {
            scratch.transfer_encoding = pos as u32;
        }
        return false;
    }
    if la == TRACEPAR && (lb as u32) == ENT {
        if scratch.found == u32::MAX {
            scratch.found = pos as u32;
        }
    } else if la == CONTENT_ && lb & MASK7 == LENGTH {
        if scratch.content_length == u32::MAX {
            scratch.content_length = pos as u32;
        }
    } else if la == TRANSFER && lb == ENCODIN && (c | 0x2020) & 0xffff == G_COLON {
        scratch.transfer_encoding = pos as u32;
    } else if la & MASK5 == HOST {
        // The first, as user space's parser takes it.
        if scratch.host == u32::MAX {
            scratch.host = pos as u32;
        }
    } else if la == USER_AGE && lb & MASK3 == NT_COLON {
        if scratch.agent == u32::MAX {
            scratch.agent = pos as u32;
        }
    }
    false
}

/// One word of [`scan_head`]: each line that starts in it is looked at;
/// stops at the end of the head or of the capture.
extern "C" fn search_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `scan` passes its `ScanCtx`, alive for the loop.
    let ctx = unsafe { &*(ctx as *const ScanCtx) };
    // SAFETY: this CPU's scratch, owned by the running program.
    let scratch = unsafe { &mut *ctx.scratch };
    let request = ctx.request != 0;
    let base = (index as usize * 8) & (CAPTURE_HEAD - 1);
    if base as u32 >= scratch.search_len {
        return 1;
    }
    // SAFETY: base + 8 <= CAPTURE_HEAD; base and head are 8-aligned.
    let word = unsafe { crate::mem::load(scratch.event.head.as_ptr().add(base)) };
    let x = word ^ NEWLINES;
    let mut hits = x.wrapping_sub(LOW) & !x & HIGH;
    let mut n = 0;
    while hits != 0 && n < 8 {
        let pos = base + (hits.trailing_zeros() as usize / 8) + 1;
        if check_line(scratch, pos, request) {
            return 1;
        }
        hits &= hits - 1;
        n += 1;
    }
    0
}

// ---- OpenSSL (HTTPS plaintext) ----------------------------------------------

#[inline(always)]
fn ssl_enter(ctx: &ProbeContext, dir: u8, ex: bool) {
    let (tgid, tid) = ids();
    if !monitored(tgid) {
        return;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let count_ptr: u64 = if ex { ctx.arg(3).unwrap_or(0) } else { 0 };
    // SAFETY: only read.
    let fd = unsafe { SSL_FDS.get(&ssl) }.copied().unwrap_or(u32::MAX);
    let active = SslActive {
        ssl,
        buf,
        count_ptr,
        // SAFETY: a plain helper call.
        start_ns: unsafe { bpf_ktime_get_ns() },
        fd,
        direction: dir,
        _pad: [0; 3],
    };
    let _ = SSL_ACTIVE.insert(&tid, &active, 0);
}

#[uprobe]
pub fn http_ssl_read(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, direction::READ, false);
    0
}

#[uprobe]
pub fn http_ssl_read_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, direction::READ, true);
    0
}

#[uprobe]
pub fn http_ssl_write(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, direction::WRITE, false);
    0
}

#[uprobe]
pub fn http_ssl_write_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, direction::WRITE, true);
    0
}

/// `SSL_do_handshake` (which `SSL_accept` and `SSL_connect` call): the
/// syscalls under it name the socket of this `SSL *`. A server that reads
/// ahead (nginx) may take the first request record with the client's
/// Finished, and its first `SSL_read` then makes no syscall at all.
#[uprobe]
pub fn http_ssl_handshake(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = ids();
    if !monitored(tgid) {
        return 0;
    }
    // SAFETY: only read.
    if unsafe { SSL_ACTIVE.get(&tid) }.is_some() {
        // Under a read or write of ours: that call learns the socket.
        return 0;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    // A freed `SSL *` may come back for another socket.
    let _ = SSL_FDS.remove(&ssl);
    let active = SslActive {
        ssl,
        buf: 0,
        count_ptr: 0,
        start_ns: 0,
        fd: u32::MAX,
        direction: HANDSHAKE,
        _pad: [0; 3],
    };
    let _ = SSL_ACTIVE.insert(&tid, &active, 0);
    0
}

/// Return of `SSL_do_handshake`: forgets its entry, and only its own (its
/// own exit program, so that a handshake entered under a read of ours, which
/// records nothing, cannot take that read's entry away).
#[uretprobe]
pub fn http_ssl_handshake_exit(_ctx: RetProbeContext) -> u32 {
    let (_, tid) = ids();
    // SAFETY: only read.
    if unsafe { SSL_ACTIVE.get(&tid) }.is_some_and(|a| a.direction == HANDSHAKE) {
        let _ = SSL_ACTIVE.remove(&tid);
    }
    0
}

/// Return of any of the four: the plaintext moved, as a data event of the
/// socket's connection (whatever the socket's own bytes were classified as).
#[uretprobe]
pub fn http_ssl_exit(ctx: RetProbeContext) -> u32 {
    let _ = try_ssl_exit(&ctx);
    0
}

fn try_ssl_exit(ctx: &RetProbeContext) -> Result<(), ()> {
    let (tgid, tid) = ids();
    // SAFETY: copied out before the entry is removed.
    let active = unsafe { SSL_ACTIVE.get(&tid) }.copied().ok_or(())?;
    let _ = SSL_ACTIVE.remove(&tid);
    let ret: i64 = ctx.ret();
    let moved = if active.count_ptr != 0 {
        if ret != 1 {
            return Ok(());
        }
        // SAFETY: the helper checks the user address.
        unsafe { bpf_probe_read_user(active.count_ptr as *const u64) }.map_err(|_| ())?
    } else if ret > 0 {
        ret as u64
    } else {
        return Ok(());
    };
    if moved == 0 || active.fd == u32::MAX {
        return Ok(());
    }
    let key = ConnKey {
        tgid,
        fd: active.fd,
    };
    let info = CONNS.get_ptr_mut(&key).ok_or(())?;
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: valid map values; this CPU's scratch is ours until we return.
    let (info, scratch) = unsafe { (&mut *info, &mut *scratch) };
    let event = &mut scratch.event;
    event.kind = event_kind::DATA;
    event.direction = active.direction;
    event.syscall = if active.direction == direction::READ {
        syscall::SSL_READ
    } else {
        syscall::SSL_WRITE
    };
    event.tgid = tgid;
    event.tid = tid;
    event.fd = active.fd;
    event.conn_id = info.conn_id;
    event.start_ns = active.start_ns;
    // SAFETY: a plain helper call.
    event.end_ns = unsafe { bpf_ktime_get_ns() };
    event.len = moved;
    set(&mut event.head_len, 0);
    set(&mut event.tail_len, 0);
    read_tcp(event, info.sk);
    crate::mem::clear_ctx(event);
    capture_plain(scratch, active.buf, moved);
    // Registered by the socket-tracepoint capture: open at its first message.
    crate::sock::open_by_first_message(info, &scratch.event);
    tail_call(ctx, &HTTP_SSL_STAGES, stage::SSL_PROCESS);
    Ok(())
}
