//! Socket-tracepoint capture: the data path on kernels with the
//! `sock_recv_length` / `sock_send_length` BTF tracepoints (the loader's
//! feature probe decides; older kernels run the syscall tracepoints of
//! `capture`).
//!
//! Syscall tracepoints put every syscall of every process on the kernel's
//! slow path as soon as one is attached (0.895 of nginx's throughput with
//! programs that do nothing); these fire only for socket sends and
//! receives, in the calling thread, after the bytes moved, with the
//! `struct sock` and the byte count. The syscall's registers
//! (`bpf_task_pt_regs`) give the fd and the user buffer, which is read as
//! the syscall exit read it; from there the event is the same
//! [`DataEvent`] and goes through the same second stage.
//!
//! No `accept`/`connect`: a TCP socket is registered at its first send or
//! receive; its role and its `CONN_OPEN` come with its first HTTP message
//! (a request read: server; a request written: client), its addresses from
//! the socket. Its end is `inet_sock_set_state` to `LAST_ACK` or `CLOSE`
//! ([`http_sock_state`]), or a new socket behind the same fd.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, map},
    maps::{LruHashMap, ProgramArray},
    programs::BtfTracePointContext,
};
use fathom_common::http::{
    ConnEvent, ConnInfo, ConnKey, DataEvent, HttpCounter, SockAddr, direction, event_kind,
    head_state, proto, role, stage, syscall,
};

use crate::{
    capture::{
        AF_INET, AF_INET6, SCRATCH, SSL_ACTIVE, SSL_FDS, capture_plain, capture_vectored, ids,
        message_start, next_conn_id, offset, read_kernel, read_tcp, send_conn, tail_call,
    },
    maps::{CONNS, count, monitored, pair_enabled},
};

/// Second stages of the two hooks (a BTF tracepoint program may tail-call
/// only programs of its own hook).
#[map]
static HTTP_SOCK_RECV_STAGES: ProgramArray = ProgramArray::with_max_entries(stage::COUNT, 0);
#[map]
static HTTP_SOCK_SEND_STAGES: ProgramArray = ProgramArray::with_max_entries(stage::COUNT, 0);

/// `struct sock` address -> the registered socket it is, for its close.
#[map]
static SOCKS: LruHashMap<u64, ConnKey> = LruHashMap::with_max_entries(65536, 0);

const MSG_PEEK: u32 = 2;
const IPPROTO_TCP: u16 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_LAST_ACK: u32 = 9;

/// x86-64 `struct pt_regs` offset of `dx`, followed by `si`, `di` and
/// `orig_ax` (104, 112, 120).
const REG_DX: u64 = 96;

/// x86-64 syscall numbers.
mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDFILE: u64 = 40;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const SPLICE: u64 = 275;
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn http_sock_recv(ctx: BtfTracePointContext) -> u32 {
    let _ = try_sock_io(&ctx, direction::READ, &HTTP_SOCK_RECV_STAGES);
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn http_sock_send(ctx: BtfTracePointContext) -> u32 {
    let _ = try_sock_io(&ctx, direction::WRITE, &HTTP_SOCK_SEND_STAGES);
    0
}

/// Second stage of [`http_sock_recv`]: `capture`'s, for this hook.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn http_sock_recv_process(_ctx: BtfTracePointContext) -> u32 {
    let _ = crate::capture::try_process(false);
    0
}

/// Second stage of [`http_sock_send`].
#[btf_tracepoint(function = "sock_send_length")]
pub fn http_sock_send_process(_ctx: BtfTracePointContext) -> u32 {
    let _ = crate::capture::try_process(false);
    0
}

/// The syscall under this send or receive, as (our code, fd, buffer or
/// iovec array, iovec count, vectored); `None` for anything else (io_uring,
/// kernel senders, the other direction's calls).
#[inline(always)]
fn syscall_args(regs: u64, dir: u8) -> Option<(u8, u32, u64, u64, bool)> {
    // dx, si, di, orig_ax: adjacent, one read instead of four.
    let [dx, si, di, number]: [u64; 4] = read_kernel(regs + REG_DX)?;
    let fd = di as u32;
    let msg = |code: u8| -> Option<(u8, u32, u64, u64, bool)> {
        if si == 0 {
            return None;
        }
        // SAFETY: the helper checks the user address (msg_iov at 16,
        // msg_iovlen at 24 of `struct user_msghdr`).
        let iov = unsafe { bpf_probe_read_user((si + 16) as *const u64) }.ok()?;
        // SAFETY: as above.
        let iovlen = unsafe { bpf_probe_read_user((si + 24) as *const u64) }.ok()?;
        Some((code, fd, iov, iovlen, true))
    };
    if dir == direction::READ {
        match number {
            nr::READ => Some((syscall::READ, fd, si, dx, false)),
            nr::RECVFROM => Some((syscall::RECVFROM, fd, si, dx, false)),
            nr::READV => Some((syscall::READV, fd, si, dx, true)),
            nr::RECVMSG => msg(syscall::RECVMSG),
            _ => None,
        }
    } else {
        match number {
            nr::WRITE => Some((syscall::WRITE, fd, si, dx, false)),
            nr::SENDTO => Some((syscall::SENDTO, fd, si, dx, false)),
            nr::WRITEV => Some((syscall::WRITEV, fd, si, dx, true)),
            nr::SENDMSG => msg(syscall::SENDMSG),
            nr::SENDFILE => Some((syscall::SENDFILE, fd, 0, 0, false)),
            // splice(fd_in, off_in, fd_out, ...): the socket is fd_out.
            nr::SPLICE => Some((syscall::SENDFILE, dx as u32, 0, 0, false)),
            _ => None,
        }
    }
}

#[inline(always)]
fn try_sock_io(ctx: &BtfTracePointContext, dir: u8, stages: &ProgramArray) -> Result<(), ()> {
    // `int ret` and `int flags`, the second and third argument slots of
    // `sock_{recv,send}_length(sk, ret, flags)`.
    let moved = ctx.arg::<u64>(1) as u32 as i32;
    if moved <= 0 {
        return Ok(());
    }
    let flags = ctx.arg::<u64>(2) as u32;
    if dir == direction::READ && flags & MSG_PEEK != 0 {
        // Read again later, for real.
        return Ok(());
    }
    let (tgid, tid) = ids();
    if !monitored(tgid) {
        return Ok(());
    }
    // The socket's address as a plain number (not loaded as the verifier's
    // trusted pointer): every read through it is a checked probe read.
    let sk: u64 = read_kernel(ctx.as_ptr() as u64).ok_or(())?;
    // Unix and other sockets (most of a desktop's or a container runtime's
    // socket traffic) stop here, before the syscall's registers are read.
    if !matches!(
        read_kernel::<u16>(sk + offset!(skc_family)),
        Some(AF_INET | AF_INET6)
    ) {
        return Ok(());
    }
    // SAFETY: helpers on the current task, which this tracepoint runs in.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    let (code, fd, buf, n, vectored) = syscall_args(regs, dir).ok_or(())?;
    if let Some(ssl) = SSL_ACTIVE.get_ptr_mut(&tid) {
        // OpenSSL's own read or write of the socket under an SSL call.
        // SAFETY: a valid map value.
        unsafe {
            (*ssl).fd = fd;
            let _ = SSL_FDS.insert(&(*ssl).ssl, &fd, 0);
        }
    }
    let key = ConnKey { tgid, fd };
    let info = match CONNS.get_ptr_mut(&key) {
        // SAFETY: a valid map value.
        Some(info) => unsafe { &mut *info },
        None => {
            register(&key, sk)?;
            // SAFETY: as above.
            unsafe { &mut *CONNS.get_ptr_mut(&key).ok_or(())? }
        }
    };
    if info.sk != sk {
        // The fd now names another socket: the old one's close was missed.
        renew(info, &key, sk, tid)?;
    }
    if info.proto == proto::OTHER {
        return Ok(());
    }
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch is ours until we return.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let event = &mut scratch.event;
    event.kind = event_kind::DATA;
    event.direction = dir;
    event.syscall = code;
    event.tgid = tgid;
    event.tid = tid;
    event.fd = fd;
    event.conn_id = info.conn_id;
    // The bytes moved now; when the call began is not seen here.
    event.start_ns = now;
    event.end_ns = now;
    event.len = moved as u64;
    crate::mem::set(&mut event.head_len, 0);
    crate::mem::set(&mut event.tail_len, 0);
    read_tcp(event, sk);
    crate::mem::clear_ctx(event);
    if code != syscall::SENDFILE {
        if vectored {
            capture_vectored(scratch, buf, n, moved as u64);
        } else {
            capture_plain(scratch, buf, moved as u64);
        }
    }
    open_by_first_message(info, &scratch.event);
    tail_call(ctx, stages, stage::PROCESS);
    Ok(())
}

/// Registers a TCP socket seen for the first time (nothing is sent until
/// its first HTTP message).
#[inline(always)]
fn register(key: &ConnKey, sk: u64) -> Result<(), ()> {
    if !is_tcp(sk) {
        return Err(());
    }
    let info = ConnInfo {
        conn_id: next_conn_id(),
        role: role::UNKNOWN,
        proto: proto::UNKNOWN,
        head: head_state::SETTLED,
        prefix_len: 0,
        server_tid: 0,
        sk,
        prefix: 0,
    };
    if CONNS.insert(key, &info, 0).is_err() {
        count(HttpCounter::ConnsFull);
        return Err(());
    }
    count(HttpCounter::Conns);
    let _ = SOCKS.insert(&sk, key, 0);
    Ok(())
}

/// The fd of `info` names the socket `sk` now: the connection it was is
/// closed (sent, when it was open), and `info` starts afresh for `sk`.
#[inline(always)]
fn renew(info: &mut ConnInfo, key: &ConnKey, sk: u64, tid: u32) -> Result<(), ()> {
    if pair_enabled() {
        crate::pair::close(info.conn_id);
    }
    if info.role != role::UNKNOWN {
        close_event(info, key, tid);
    }
    let _ = SOCKS.remove(&info.sk);
    if !is_tcp(sk) {
        let _ = CONNS.remove(key);
        return Err(());
    }
    info.conn_id = next_conn_id();
    info.role = role::UNKNOWN;
    info.proto = proto::UNKNOWN;
    info.head = head_state::SETTLED;
    info.server_tid = 0;
    info.sk = sk;
    count(HttpCounter::Conns);
    let _ = SOCKS.insert(&sk, key, 0);
    Ok(())
}

/// An IPv4 or IPv6 TCP socket.
#[inline(always)]
fn is_tcp(sk: u64) -> bool {
    if sk == 0 || offset!(enabled) == 0 {
        return false;
    }
    let family: Option<u16> = read_kernel(sk + offset!(skc_family));
    let protocol: Option<u16> = read_kernel(sk + offset!(sk_protocol));
    matches!(family, Some(AF_INET | AF_INET6)) && protocol == Some(IPPROTO_TCP)
}

#[inline(always)]
fn close_event(info: &ConnInfo, key: &ConnKey, tid: u32) {
    send_conn(ConnEvent {
        kind: event_kind::CONN_CLOSE,
        role: info.role,
        _reserved: [0; 2],
        tgid: key.tgid,
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
}

/// A connection registered by its data (role unknown) whose bytes start an
/// HTTP/1.x message: its role follows from the message (a request read or
/// a response written: server; else client), and its `CONN_OPEN`, with the
/// addresses read from the socket, goes out before the data. Also used by
/// the OpenSSL capture, whose connections on these kernels are registered
/// the same way.
#[inline(always)]
pub(crate) fn open_by_first_message(info: &mut ConnInfo, event: &DataEvent) {
    if info.role != role::UNKNOWN {
        return;
    }
    let (request, response) = message_start(event);
    if !request && !response {
        return;
    }
    let reading = event.direction == direction::READ;
    info.role = if request == reading {
        role::SERVER
    } else {
        role::CLIENT
    };
    let mut local = SockAddr::default();
    let mut peer = SockAddr::default();
    read_addrs(info.sk, &mut local, &mut peer);
    send_conn(ConnEvent {
        kind: event_kind::CONN_OPEN,
        role: info.role,
        _reserved: [0; 2],
        tgid: event.tgid,
        tid: event.tid,
        fd: event.fd,
        conn_id: info.conn_id,
        ts_ns: event.start_ns,
        peer,
        listen_fd: u32::MAX,
        _reserved2: 0,
        local,
    });
}

/// Both ends of the socket `sk`; left zero (unknown) when unreadable.
#[inline(always)]
fn read_addrs(sk: u64, local: &mut SockAddr, peer: &mut SockAddr) {
    if sk == 0 || offset!(enabled) == 0 {
        return;
    }
    let Some(family) = read_kernel::<u16>(sk + offset!(skc_family)) else {
        return;
    };
    if family == AF_INET {
        if let Some(a) = read_kernel::<[u8; 4]>(sk + offset!(skc_rcv_saddr)) {
            local.addr[..4].copy_from_slice(&a);
        }
        if let Some(a) = read_kernel::<[u8; 4]>(sk + offset!(skc_daddr)) {
            peer.addr[..4].copy_from_slice(&a);
        }
    } else if family == AF_INET6 {
        if let Some(a) = read_kernel::<[u8; 16]>(sk + offset!(skc_v6_rcv_saddr)) {
            local.addr = a;
        }
        if let Some(a) = read_kernel::<[u8; 16]>(sk + offset!(skc_v6_daddr)) {
            peer.addr = a;
        }
    } else {
        return;
    }
    local.family = family;
    peer.family = family;
    local.port = read_kernel::<u16>(sk + offset!(skc_num)).unwrap_or(0);
    peer.port = u16::from_be(read_kernel::<u16>(sk + offset!(skc_dport)).unwrap_or(0));
}

/// A TCP socket reached `LAST_ACK` (closed by its process after the peer
/// did) or `CLOSE`: a registered connection on it is over.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn http_sock_state(ctx: BtfTracePointContext) -> u32 {
    let _ = try_sock_state(&ctx);
    0
}

#[inline(always)]
fn try_sock_state(ctx: &BtfTracePointContext) -> Option<()> {
    // `int newstate`, the third argument slot of
    // `inet_sock_set_state(sk, oldstate, newstate)`.
    let state = ctx.arg::<u64>(2) as u32;
    if state != TCP_CLOSE && state != TCP_LAST_ACK {
        return None;
    }
    let sk: u64 = read_kernel(ctx.as_ptr() as u64)?;
    // SAFETY: copied out before the entry is removed.
    let key = unsafe { SOCKS.get(&sk) }.copied()?;
    let _ = SOCKS.remove(&sk);
    // SAFETY: as above.
    let info = unsafe { CONNS.get(&key) }.copied()?;
    if info.sk != sk {
        // The fd was reused for another socket since (already renewed).
        return None;
    }
    let _ = CONNS.remove(&key);
    if pair_enabled() {
        crate::pair::close(info.conn_id);
    }
    if info.role != role::UNKNOWN {
        close_event(&info, &key, 0);
    }
    Some(())
}
