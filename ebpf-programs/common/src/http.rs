//! Zero-code HTTP tracing: the kernel/user-space contract.
//!
//! Capture (`fathom-http` object, syscall tracepoints): `accept`/`accept4`
//! and `connect` of monitored processes register the socket in `CONNS`
//! (keyed by [`ConnKey`]) and send a [`ConnEvent`]. Every read-family and
//! write-family syscall on a registered socket sends a [`DataEvent`] with the
//! first [`CAPTURE_HEAD`] bytes and the last [`CAPTURE_TAIL`] bytes it moved
//! (for `sendfile`, only the count). A connection whose first bytes are not
//! HTTP/1.x is marked [`proto::OTHER`] and sends nothing more but its close.
//! `close` and process exit send [`ConnEvent`]s that end the connection.
//! Everything goes through the ring buffer `HTTP_EVENTS`; what does not fit
//! is counted in `HTTP_COUNTERS`.
//!
//! Trace context is decided in the kernel, because the `sk_msg` program must
//! know it while the request is being sent:
//! - A read on a connection that starts with a request line opens a *server
//!   request* on the reading thread: a new span id, and the trace id and
//!   parent span id of an incoming `traceparent` header when the captured
//!   bytes carry one (else a new trace id). The ids are in the
//!   [`DataEvent::ctx`] of that read ([`ctx_flags::SERVER`]) and in
//!   `SERVING[tid]` until a write on the same connection starts a response.
//!   When that read ends neither the head nor carries the header, the
//!   following reads on the connection are searched until the head ends; a
//!   `traceparent` found there becomes the parent of the open server request
//!   ([`head_state::AWAITING_PARENT`]). The read's `ctx` stays that of the
//!   start: user space takes the parent from the parsed head.
//! - `sched_process_fork` copies `SERVING` of the parent thread to a new
//!   thread, so work handed to a thread finds its parent.
//! - `sk_msg` on client sockets of monitored processes inserts
//!   `traceparent: 00-{trace}-{span}-01\r\n` after the request line of an
//!   HTTP/1.x request that has none: the trace id of the thread's single open
//!   server request (none or several: a new trace id), a new span id. The
//!   ids reach user space in the [`DataEvent::ctx`] of that write
//!   ([`ctx_flags::CLIENT_INJECTED`]).
//!
//! Connection state: with [`SockOffsets`] set (from the kernel's BTF),
//! `accept`/`connect` exit also finds the socket's `struct sock` (kept in
//! [`ConnInfo::sk`]) and this end's address ([`ConnEvent::local`]); every
//! data event then carries the connection's smoothed RTT and retransmit
//! count ([`DataEvent::srtt_us`], [`DataEvent::total_retrans`]).
//!
//! User space parses the byte streams (several requests per connection,
//! pipelining, bodies by length or chunked) and builds spans; it takes ids
//! from `ctx` when the kernel chose them.

use crate::assert_size;

/// Bytes captured from the start of each read or write.
pub const CAPTURE_HEAD: usize = 1024;
/// Bytes captured from the end of each read or write (the end of a chunked
/// body: `0\r\n\r\n`).
pub const CAPTURE_TAIL: usize = 16;
/// Length of the header the `sk_msg` program inserts:
/// `traceparent: ` (13) + `00-` + 32 + `-` + 16 + `-01` + `\r\n`.
pub const TRACEPARENT_HEADER_LEN: usize = 13 + 3 + 32 + 1 + 16 + 3 + 2;
const _: () = assert!(TRACEPARENT_HEADER_LEN == 70);

/// Names of the maps and programs in the `fathom-http` object.
pub mod names {
    pub const EVENTS: &str = "HTTP_EVENTS";
    pub const COUNTERS: &str = "HTTP_COUNTERS";
    pub const CONNS: &str = "CONNS";
    pub const SERVING: &str = "SERVING";
    pub const GO_PROCS: &str = "GO_PROCS";
    pub const MONITORED: &str = "MONITORED";
    pub const SOCKETS: &str = "CLIENT_SOCKETS";
    pub const SOCK_OPS: &str = "fathom_sock_ops";
    pub const SK_MSG: &str = "fathom_sk_msg";
    pub const CONNECT_PARENT: &str = "fathom_connect_parent";
    /// The stream verdict program of `CLIENT_SOCKETS` in keep-alive mode.
    pub const SK_SKB: &str = "fathom_sk_skb";
    /// Injection switches ([`super::control`]).
    pub const CONTROL: &str = "INJECT_CONTROL";
    /// The `ProgramArray`s of the data path's second stages ([`stage`]):
    /// one per program type (a program array serves programs of one type).
    pub const STAGES: &str = "HTTP_STAGES";
    pub const SSL_STAGES: &str = "HTTP_SSL_STAGES";
    /// Second stage of `http_exit_io` (a tracepoint program).
    pub const PROCESS: &str = "http_exit_process";
    /// Second stage of `http_ssl_exit` (a uretprobe program).
    pub const SSL_PROCESS: &str = "http_ssl_process";
    /// The socket-tracepoint capture: first stages on `sock_recv_length` /
    /// `sock_send_length`, their second stages (a BTF tracepoint program may
    /// only tail-call programs of its own hook: one array per hook), and
    /// the close on `inet_sock_set_state`.
    pub const SOCK_RECV: &str = "http_sock_recv";
    pub const SOCK_SEND: &str = "http_sock_send";
    pub const SOCK_RECV_PROCESS: &str = "http_sock_recv_process";
    pub const SOCK_SEND_PROCESS: &str = "http_sock_send_process";
    pub const SOCK_STATE: &str = "http_sock_state";
    pub const SOCK_RECV_STAGES: &str = "HTTP_SOCK_RECV_STAGES";
    pub const SOCK_SEND_STAGES: &str = "HTTP_SOCK_SEND_STAGES";
}

/// Indexes in `HTTP_STAGES`. A data event is captured by one program (the
/// syscall's exit, or OpenSSL's return), then classified, matched to its
/// server request and sent by a second, tail-called one of the same type,
/// so that each verifies in bounded effort on every kernel.
pub mod stage {
    /// In `HTTP_STAGES`.
    pub const PROCESS: u32 = 0;
    /// In `HTTP_SSL_STAGES`.
    pub const SSL_PROCESS: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// Indexes of the `INJECT_CONTROL` array (a `u8` each, non-zero: on).
pub mod control {
    /// Client sockets stay in `CLIENT_SOCKETS` (set once `SK_SKB` is
    /// attached and checked).
    pub const KEEP_ALIVE: u32 = 0;
    /// The agent stopped: messages of the sockets it leaves in its pinned
    /// sockhash pass untouched.
    pub const STOPPED: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Globals the loader sets in the `fathom-http` object.
pub mod globals {
    /// Non-zero: only processes in `MONITORED` (tgid -> 1) are traced.
    pub const FILTER_PIDS: &str = "HTTP_FILTER_PIDS";
    /// Non-zero: insert `traceparent` into outgoing requests.
    pub const INJECT: &str = "HTTP_INJECT";
    /// Non-zero: pair request and response in the kernel where it can
    /// ([`super::SpanRecord`]); set on the socket-tracepoint path only.
    pub const PAIR: &str = "HTTP_PAIR";
    /// Offsets of `parent_pid` / `child_pid` in the `sched_process_fork`
    /// record (from its format file).
    pub const FORK_PARENT_OFFSET: &str = "HTTP_FORK_PARENT_OFFSET";
    pub const FORK_CHILD_OFFSET: &str = "HTTP_FORK_CHILD_OFFSET";
    /// A [`super::SockOffsets`]: kernel struct member offsets (from BTF) for
    /// reading a connection's socket; `enabled == 0` turns that off.
    pub const SOCK_OFFSETS: &str = "HTTP_SOCK_OFFSETS";
}

/// Byte offsets of the kernel struct members the capture reads to find a
/// connection's `struct sock` (current task → `files` → `fdt` → `fd[fd]` →
/// `file.private_data` (a `struct socket`) → `sk`) and, from it, the local
/// address and TCP state. The loader reads them from the kernel's BTF
/// (`agent/src/btf.rs`); with `enabled == 0` (no BTF) nothing is read and
/// events carry no socket information.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    pub enabled: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// `struct sock_common` is at offset 0 of `struct sock`
    /// (`__sk_common`); these are from the start of `struct sock`.
    pub skc_family: u32,
    pub skc_rcv_saddr: u32,
    pub skc_num: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `struct tcp_sock` starts with its `struct sock`.
    pub tcp_srtt_us: u32,
    pub tcp_total_retrans: u32,
    /// The peer's address and port (`__be16`), for the socket-tracepoint
    /// capture, which sees no `accept`/`connect` address argument.
    pub skc_daddr: u32,
    pub skc_dport: u32,
    pub skc_v6_daddr: u32,
    /// `struct sock.sk_protocol` (a `u16`): only TCP sockets are tracked.
    pub sk_protocol: u32,
    /// `task_struct.mm` and `mm_struct.env_start`/`env_end`, for the
    /// environment a [`ProcessInfo`] carries; `task_mm == 0`: not read
    /// (set apart from `enabled`: a kernel without them still has sockets).
    pub task_mm: u32,
    pub mm_env_start: u32,
    pub mm_env_end: u32,
    /// `task_struct.group_leader` and `task_struct.comm`: the process's
    /// name (its main thread's, as `/proc/<pid>/comm`), not the calling
    /// thread's; `task_group_leader == 0`: the calling thread's.
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// The process's cgroup on one cgroup v1 hierarchy (hybrid hosts,
    /// where container runtimes put processes in v1 cgroups and
    /// `bpf_get_current_cgroup_id` sees only v2): `task_struct.cgroups`
    /// (`task_cgroups == 0`: not read), the byte offset of the followed
    /// controller's `css_set.subsys[id]`, `cgroup_subsys_state.cgroup`,
    /// `cgroup.kn` and `kernfs_node.id` (the directory's inode number).
    pub task_cgroups: u32,
    pub css_set_subsys: u32,
    pub css_cgroup: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    pub _pad: u32,
}
assert_size!(SockOffsets, 28 * 4);

/// Kinds of records in the ring buffer; the first byte of every record.
pub mod event_kind {
    pub const DATA: u8 = 1;
    pub const CONN_OPEN: u8 = 2;
    pub const CONN_CLOSE: u8 = 3;
    /// A process exited (a [`super::ConnEvent`] with `fd == u32::MAX`):
    /// all its connections are gone.
    pub const PROCESS_EXIT: u8 = 4;
    /// A whole exchange, request and response paired in the kernel (a
    /// [`super::SpanRecord`]).
    pub const SPAN: u8 = 5;
    /// A process's first connection: what user space needs to name it if
    /// it is gone from `/proc` before it is read (a [`super::ProcessInfo`]).
    pub const PROCESS: u8 = 6;
}

/// Direction of a [`DataEvent`].
pub mod direction {
    /// Bytes the process read from the socket.
    pub const READ: u8 = 0;
    /// Bytes the process wrote to the socket.
    pub const WRITE: u8 = 1;
}

/// The syscall of a [`DataEvent`] (for diagnostics; `SENDFILE` means no
/// bytes were captured, only the count).
pub mod syscall {
    pub const READ: u8 = 1;
    pub const READV: u8 = 2;
    pub const RECVFROM: u8 = 3;
    pub const RECVMSG: u8 = 4;
    pub const WRITE: u8 = 5;
    pub const WRITEV: u8 = 6;
    pub const SENDTO: u8 = 7;
    pub const SENDMSG: u8 = 8;
    /// `sendfile` or `splice` into the socket: no user buffer.
    pub const SENDFILE: u8 = 9;
    /// OpenSSL `SSL_read`/`SSL_read_ex` (plaintext).
    pub const SSL_READ: u8 = 10;
    /// OpenSSL `SSL_write`/`SSL_write_ex` (plaintext).
    pub const SSL_WRITE: u8 = 11;
}

/// Which side opened a connection.
pub mod role {
    /// Seen only by its data (the socket predates the agent).
    pub const UNKNOWN: u8 = 0;
    /// Returned by `accept`: we are the server.
    pub const SERVER: u8 = 1;
    /// Opened by `connect`: we are the client.
    pub const CLIENT: u8 = 2;
}

/// What a connection carries, as far as the kernel decided.
pub mod proto {
    /// No data seen yet.
    pub const UNKNOWN: u8 = 0;
    /// Its first bytes were an HTTP/1.x request or response.
    pub const HTTP1: u8 = 1;
    /// Anything else: no more data events.
    pub const OTHER: u8 = 2;
}

/// Where a server request's head stands on a connection ([`ConnInfo::head`]).
pub mod head_state {
    /// No request head in progress, or its trace context is settled.
    pub const SETTLED: u8 = 0;
    /// A request started in a read that neither ended its head nor carried
    /// a `traceparent`: the following reads are searched until one does
    /// (a head sent in several segments, as `sk_msg` inserting a header
    /// makes it, may be read in pieces).
    pub const AWAITING_PARENT: u8 = 1;
}

/// Flags of [`TraceContext::flags`].
pub mod ctx_flags {
    /// The read that carries this context opened a server request.
    pub const SERVER: u8 = 1;
    /// The incoming request carried a valid `traceparent`: `trace_id` and
    /// `parent_span_id` come from it.
    pub const REMOTE_PARENT: u8 = 2;
    /// `sk_msg` inserted a `traceparent` into the write that carries this
    /// context; `span_id` is the client span's id.
    pub const CLIENT_INJECTED: u8 = 4;
    /// The client request was sent while the thread served exactly one
    /// server request: `parent_span_id` is that server span.
    pub const LOCAL_PARENT: u8 = 8;
}

/// Counters in `HTTP_COUNTERS` (a per-CPU array, indexed by the value).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpCounter {
    /// Data events sent.
    DataEvents,
    /// Events lost because the ring buffer was full.
    EventsLost,
    /// Connections registered.
    Conns,
    /// Connections not registered because `CONNS` was full.
    ConnsFull,
    /// Server requests opened in the kernel.
    ServerRequests,
    /// `traceparent` headers inserted.
    Injected,
    /// Requests that already had a `traceparent` (not touched).
    InjectSkippedExisting,
    /// Requests whose request line was not within the first bytes of the
    /// message (not touched).
    InjectSkippedNoLine,
    /// `bpf_msg_push_data`/`pull_data` failures (message passed unchanged).
    InjectFailed,
    /// Sockets added to `CLIENT_SOCKETS`.
    SocketsAdded,
    /// Forwarded `traceparent` headers (a proxy's) whose parent id was
    /// replaced by the proxy's client span id.
    ParentRewritten,
    /// Sockets taken out of `CLIENT_SOCKETS` when their first request was
    /// acknowledged (first-request mode): a socket in a sockmap without a
    /// stream verdict program answers `FIONREAD` with 0 on Linux 6.18
    /// (`tcp_bpf_ioctl` counts only the sockmap's own queue), which stalls
    /// readers that trust it, nginx among them.
    SocketsReleased,
    /// Server requests whose `traceparent` came in a read after the one that
    /// started the request.
    LateParents,
    /// Data events lost because the processing stage was not there to
    /// tail-call.
    StageMissing,
    /// Client connections on which injection stopped because where the
    /// next request starts can no longer be told (a chunked or pipelined
    /// request body, a head written in pieces, a first message that is not
    /// an HTTP/1.x request): their later messages pass untouched.
    InjectUnframed,
    /// Client requests whose parent came from the Go goroutine that sent
    /// them (`net/http` uprobes).
    ParentGoroutine,
    /// Client requests sent from a thread serving exactly one request: its
    /// server span is the parent.
    ParentThread,
    /// Client requests sent from a thread with several requests open, before
    /// any other read since the latest one was read: that one was taken as
    /// the parent (an event loop's handler calling out); a guess.
    ParentGuessed,
    /// Client requests sent while their process served requests, for which
    /// no parent could be told (several open and reads since; a Go request
    /// the uprobes did not see): sent as new traces.
    ParentMissed,
    /// Exchanges paired in the kernel and sent as one [`SpanRecord`].
    SpansPaired,
    /// Exchanges the kernel could not pair (a request body, a head in
    /// pieces or past the capture, pipelining, a transfer coding other than
    /// chunked): sent as data events for user space to parse.
    PairStreamed,
    /// Paired exchanges given up (bytes where none were expected, a
    /// connection closed before the response): no span.
    PairAborted,
}

impl HttpCounter {
    pub const COUNT: u32 = HttpCounter::PairAborted as u32 + 1;
    pub const ALL: [HttpCounter; HttpCounter::COUNT as usize] = [
        HttpCounter::DataEvents,
        HttpCounter::EventsLost,
        HttpCounter::Conns,
        HttpCounter::ConnsFull,
        HttpCounter::ServerRequests,
        HttpCounter::Injected,
        HttpCounter::InjectSkippedExisting,
        HttpCounter::InjectSkippedNoLine,
        HttpCounter::InjectFailed,
        HttpCounter::SocketsAdded,
        HttpCounter::ParentRewritten,
        HttpCounter::SocketsReleased,
        HttpCounter::LateParents,
        HttpCounter::StageMissing,
        HttpCounter::InjectUnframed,
        HttpCounter::ParentGoroutine,
        HttpCounter::ParentThread,
        HttpCounter::ParentGuessed,
        HttpCounter::ParentMissed,
        HttpCounter::SpansPaired,
        HttpCounter::PairStreamed,
        HttpCounter::PairAborted,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            HttpCounter::StageMissing => "stage_missing",
            HttpCounter::DataEvents => "data_events",
            HttpCounter::EventsLost => "events_lost",
            HttpCounter::Conns => "conns",
            HttpCounter::ConnsFull => "conns_full",
            HttpCounter::ServerRequests => "server_requests",
            HttpCounter::Injected => "injected",
            HttpCounter::InjectSkippedExisting => "inject_skipped_existing",
            HttpCounter::InjectSkippedNoLine => "inject_skipped_no_line",
            HttpCounter::InjectFailed => "inject_failed",
            HttpCounter::SocketsAdded => "sockets_added",
            HttpCounter::ParentRewritten => "parent_rewritten",
            HttpCounter::SocketsReleased => "sockets_released",
            HttpCounter::LateParents => "late_parents",
            HttpCounter::InjectUnframed => "inject_unframed",
            HttpCounter::ParentGoroutine => "parent_goroutine",
            HttpCounter::ParentThread => "parent_thread",
            HttpCounter::ParentGuessed => "parent_guessed",
            HttpCounter::ParentMissed => "parent_missed",
            HttpCounter::SpansPaired => "spans_paired",
            HttpCounter::PairStreamed => "pair_streamed",
            HttpCounter::PairAborted => "pair_aborted",
        }
    }
}

/// A socket of a process: `CONNS` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}
assert_size!(ConnKey, 8);

/// `CONNS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Unique for the agent's lifetime (fd numbers are reused).
    pub conn_id: u64,
    /// A [`role`].
    pub role: u8,
    /// A [`proto`].
    pub proto: u8,
    /// A [`head_state`].
    pub head: u8,
    /// Bytes in `prefix`.
    pub prefix_len: u8,
    /// The thread that opened the server request whose head is arriving
    /// ([`head_state::AWAITING_PARENT`]).
    pub server_tid: u32,
    /// The socket's `struct sock` (kernel address; 0: unknown), read at
    /// `accept`/`connect` exit. Only ever read with `bpf_probe_read_kernel`.
    pub sk: u64,
    /// A read of fewer than 8 bytes that may begin a request (`G`, `PO`),
    /// little-endian: the next read continues it. Go's server reads one
    /// byte of the next request of a kept-alive connection while it still
    /// answers the last.
    pub prefix: u64,
}
assert_size!(ConnInfo, 32);

/// W3C trace context chosen in the kernel. All zero: none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: [u8; 8],
    /// [`ctx_flags`].
    pub flags: u8,
    pub _reserved: [u8; 7],
}
assert_size!(TraceContext, 40);

/// `SERVING` value: the server request a thread is serving.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Serving {
    pub ctx: TraceContext,
    /// Connection the request came in on.
    pub conn_id: u64,
    /// Server requests open on this thread: their requests were read on it
    /// and their responses not yet written.
    pub open: u32,
    /// Reads on this thread since `ctx`'s request was read. With several
    /// requests open, a client request written before any other read comes
    /// from the handler of the request just read (an event loop's
    /// callback): `sk_msg` takes it as the parent, counted as a guess.
    pub later_reads: u32,
    /// When `ctx`'s request was read (`bpf_ktime_get_ns`).
    pub read_ns: u64,
}
assert_size!(Serving, 40 + 8 + 8 + 8);

/// A Go request's trace context on its way from the goroutine that calls
/// `http.Client` to the one that writes the request (`GO_REQUESTS`,
/// `GO_WRITING`). `ctx` all zero: the caller served no request (a root).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GoPending {
    pub ctx: TraceContext,
    /// When it was recorded (`bpf_ktime_get_ns`).
    pub at_ns: u64,
}
assert_size!(GoPending, 48);

/// A socket address: IPv4 in the first 4 bytes of `addr` (`family` 2) or
/// IPv6 (`family` 10); port in host byte order. All zero: unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockAddr {
    pub addr: [u8; 16],
    pub family: u16,
    pub port: u16,
    pub _reserved: u32,
}
assert_size!(SockAddr, 24);

/// A connection opened or closed ([`event_kind::CONN_OPEN`],
/// [`event_kind::CONN_CLOSE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnEvent {
    pub kind: u8,
    /// A [`role`].
    pub role: u8,
    pub _reserved: [u8; 2],
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub conn_id: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// The peer (from `accept`'s or `connect`'s address argument).
    pub peer: SockAddr,
    /// For accepted sockets: the listening socket's fd (user space finds
    /// the local port from it). Else `u32::MAX`.
    pub listen_fd: u32,
    pub _reserved2: u32,
    /// This end (from the socket, [`SockOffsets`]); all zero: unknown.
    pub local: SockAddr,
}
assert_size!(ConnEvent, 4 + 4 + 4 + 4 + 8 + 8 + 24 + 8 + 24);

/// Bytes moved by one syscall on a registered connection
/// ([`event_kind::DATA`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub kind: u8,
    /// A [`direction`].
    pub direction: u8,
    /// A [`syscall`].
    pub syscall: u8,
    /// [`data_flags`].
    pub flags: u8,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub conn_id: u64,
    /// Syscall entry and exit, `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub start_ns: u64,
    pub end_ns: u64,
    /// Bytes the syscall moved (its return value, > 0).
    pub len: u64,
    /// Valid bytes in `head` (`min(len, CAPTURE_HEAD)`, or less when the
    /// user memory could not be read; 0 for `sendfile`).
    pub head_len: u32,
    /// Valid bytes in `tail`: the last `tail_len` bytes moved (0 when
    /// `len <= CAPTURE_HEAD`, the head has them all).
    pub tail_len: u32,
    /// The connection's smoothed RTT at the syscall's exit, microseconds
    /// (`tcp_sock.srtt_us >> 3`); valid with [`data_flags::TCP`].
    pub srtt_us: u32,
    /// The connection's `tcp_sock.total_retrans` at the syscall's exit
    /// (segments retransmitted so far); valid with [`data_flags::TCP`].
    pub total_retrans: u32,
    pub ctx: TraceContext,
    pub tail: [u8; CAPTURE_TAIL],
    /// Last, so that a record in the ring buffer can end after `head_len`
    /// bytes of it ([`DataEvent::from_record`]).
    pub head: [u8; CAPTURE_HEAD],
}
assert_size!(
    DataEvent,
    4 + 4 + 4 + 4 + 8 + 8 + 8 + 8 + 8 + 8 + 40 + CAPTURE_TAIL + CAPTURE_HEAD
);

/// Flags of [`DataEvent::flags`].
pub mod data_flags {
    /// `srtt_us` and `total_retrans` were read from the connection's socket.
    pub const TCP: u8 = 1;
}

impl DataEvent {
    /// Bytes of a record before `head`.
    pub const HEAD_OFFSET: usize = core::mem::size_of::<DataEvent>() - CAPTURE_HEAD;

    /// A data event with nothing in it (a reader's reusable scratch).
    pub const EMPTY: DataEvent = DataEvent {
        kind: event_kind::DATA,
        direction: 0,
        syscall: 0,
        flags: 0,
        tgid: 0,
        tid: 0,
        fd: 0,
        conn_id: 0,
        start_ns: 0,
        end_ns: 0,
        len: 0,
        head_len: 0,
        tail_len: 0,
        srtt_us: 0,
        total_retrans: 0,
        ctx: TraceContext {
            trace_id: [0; 16],
            span_id: [0; 8],
            parent_span_id: [0; 8],
            flags: 0,
            _reserved: [0; 7],
        },
        tail: [0; CAPTURE_TAIL],
        head: [0; CAPTURE_HEAD],
    };

    /// Reads a ring-buffer record, which ends after the captured head
    /// bytes. `None` when the record is shorter than its fixed part or than
    /// the head it claims, or is not a data event.
    #[cfg(feature = "user")]
    pub fn from_record(bytes: &[u8]) -> Option<DataEvent> {
        if bytes.first() != Some(&event_kind::DATA) {
            return None;
        }
        let event: DataEvent = crate::record::read_prefix(bytes, Self::HEAD_OFFSET)?;
        event.lengths_fit(bytes.len()).then_some(event)
    }

    /// [`DataEvent::from_record`] into `self`, copying only the record's
    /// bytes (the reader reuses one event: no allocation and no 1 KiB
    /// clear per record). `false`, and `self` not to be used, when the
    /// record is malformed.
    #[cfg(feature = "user")]
    pub fn read_record(&mut self, bytes: &[u8]) -> bool {
        bytes.first() == Some(&event_kind::DATA)
            && crate::record::read_prefix_into(bytes, Self::HEAD_OFFSET, self)
            && self.lengths_fit(bytes.len())
    }

    /// The head and tail lengths are within their arrays and the record.
    #[cfg(feature = "user")]
    fn lengths_fit(&self, record_len: usize) -> bool {
        self.head_len as usize <= CAPTURE_HEAD
            && Self::HEAD_OFFSET + self.head_len as usize <= record_len
            && self.tail_len as usize <= CAPTURE_TAIL
    }

    /// The captured head bytes.
    pub fn head(&self) -> &[u8] {
        &self.head[..(self.head_len as usize).min(CAPTURE_HEAD)]
    }

    /// The captured tail bytes.
    pub fn tail(&self) -> &[u8] {
        &self.tail[..(self.tail_len as usize).min(CAPTURE_TAIL)]
    }
}

/// Request-line bytes a [`SpanRecord`] carries.
pub const SPAN_LINE: usize = 64;
/// `Host` value bytes a [`SpanRecord`] carries.
pub const SPAN_HOST: usize = 32;
/// `User-Agent` value bytes a [`SpanRecord`] carries.
pub const SPAN_AGENT: usize = 64;

/// Flags of [`SpanRecord::flags`].
pub mod span_flags {
    /// `srtt_us` and the retransmit counts were read from the socket.
    pub const TCP: u8 = 1;
    /// The request was a `HEAD`.
    pub const HEAD: u8 = 2;
    /// Only the request: the kernel stopped pairing on this connection
    /// (an interim or unframed response, a pipelined request), and the
    /// response comes as data events. User space queues the request for
    /// that response, as if it had parsed it.
    pub const PENDING: u8 = 4;
}

/// One HTTP/1.x exchange paired in the kernel ([`event_kind::SPAN`]): the
/// request was read (server) or written (client) whole in one call, with
/// no body; the response's framing (`Content-Length`, chunked, or the
/// connection's close) told the kernel where it ends. Text fields are as
/// they came, each ending at its `\r` (user space cuts there): an exchange
/// whose request line, `Host` or `User-Agent` does not fit is not paired.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SpanRecord {
    pub kind: u8,
    /// A [`role`].
    pub role: u8,
    /// [`span_flags`].
    pub flags: u8,
    pub _reserved: u8,
    /// The final response's status code.
    pub status: u16,
    pub _reserved2: u16,
    pub tgid: u32,
    /// The thread that read (server) or wrote (client) the request.
    pub tid: u32,
    pub conn_id: u64,
    /// The request's read (server) or write (client), and the response's
    /// last write (server) or read (client): `bpf_ktime_get_ns`.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Response body bytes (after its head; chunk framing included).
    pub response_body: u64,
    /// Smoothed RTT at the last event, microseconds, and the connection's
    /// retransmits at the first and the last (valid with [`span_flags::TCP`]).
    pub srtt_us: u32,
    pub retrans_first: u32,
    pub retrans_last: u32,
    pub _reserved3: u32,
    /// The ids: the server request's as the kernel chose them, or the
    /// client request's as `sk_msg` injected them.
    pub ctx: TraceContext,
    /// The request line.
    pub line: [u8; SPAN_LINE],
    /// The `Host` header's value (empty: none).
    pub host: [u8; SPAN_HOST],
    /// The `User-Agent` header's value (empty: none).
    pub agent: [u8; SPAN_AGENT],
}
assert_size!(
    SpanRecord,
    8 + 8 + 8 + 8 + 8 + 8 + 16 + 40 + SPAN_LINE + SPAN_HOST + SPAN_AGENT
);

impl SpanRecord {
    /// Reads a ring-buffer record of this kind.
    #[cfg(feature = "user")]
    pub fn from_record(bytes: &[u8]) -> Option<SpanRecord> {
        if bytes.first() != Some(&event_kind::SPAN) {
            return None;
        }
        crate::record::read_prefix(bytes, core::mem::size_of::<SpanRecord>())
    }
}

/// Environment bytes a [`ProcessInfo`] carries (the start of the block;
/// `OTEL_SERVICE_NAME` further in is not seen).
pub const PROCESS_ENV: usize = 16384;

/// A process at its first HTTP connection ([`event_kind::PROCESS`]), sent
/// just before that connection's `CONN_OPEN`, from the process's own
/// thread: its name, cgroup and environment as they are then. User space
/// reads the process in `/proc` first; this is what it falls back on when
/// the process is already gone (a curl exits in milliseconds).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    pub kind: u8,
    pub _reserved: [u8; 3],
    pub tgid: u32,
    /// `bpf_get_current_cgroup_id`: the cgroup v2 directory's inode number.
    pub cgroup_id: u64,
    /// The inode number of its directory on the cgroup v1 hierarchy user
    /// space follows (see `SockOffsets::task_cgroups`; 0: not read).
    pub cgroup1_id: u64,
    /// `comm` of the process (its main thread), NUL-padded.
    pub comm: [u8; 16],
    /// Valid bytes of `env` (0: not read).
    pub env_len: u32,
    pub _reserved2: u32,
    /// The start of the environment block (`NAME=value\0...`).
    pub env: [u8; PROCESS_ENV],
}
assert_size!(ProcessInfo, 8 + 8 + 8 + 16 + 8 + PROCESS_ENV);

impl ProcessInfo {
    /// Reads a ring-buffer record of this kind.
    #[cfg(feature = "user")]
    pub fn from_record(bytes: &[u8]) -> Option<&ProcessInfo> {
        if bytes.first() != Some(&event_kind::PROCESS) {
            return None;
        }
        crate::record::read_ref(bytes)
    }

    /// The environment bytes read (never past the array).
    pub fn env(&self) -> &[u8] {
        &self.env[..(self.env_len as usize).min(PROCESS_ENV)]
    }

    /// `comm` up to its NUL.
    pub fn comm(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(16);
        &self.comm[..end]
    }
}

/// HTTP/1.x request methods the kernel recognises at the start of a
/// message (each followed by a space).
pub const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];

/// Whether `bytes` start like an HTTP/1.x request (a known method and a
/// space). Shared by the kernel and user space so both decide alike.
#[inline(always)]
pub fn is_request_start(bytes: &[u8]) -> bool {
    if bytes.len() < 4 {
        return false;
    }
    match bytes[0] {
        b'G' => bytes.starts_with(b"GET "),
        b'P' => {
            bytes.starts_with(b"POST ")
                || bytes.starts_with(b"PUT ")
                || bytes.starts_with(b"PATCH ")
        }
        b'D' => bytes.starts_with(b"DELETE "),
        b'H' => bytes.starts_with(b"HEAD "),
        b'O' => bytes.starts_with(b"OPTIONS "),
        b'C' => bytes.starts_with(b"CONNECT "),
        b'T' => bytes.starts_with(b"TRACE "),
        _ => false,
    }
}

/// Whether `bytes` start like an HTTP/1.x response.
#[inline(always)]
pub fn is_response_start(bytes: &[u8]) -> bool {
    bytes.starts_with(b"HTTP/1.")
}

/// Lower-case hex digits of `bytes` into `out` (2 per byte).
pub fn hex_lower(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        if 2 * i + 1 < out.len() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
    }
}

/// Parses a `traceparent` value (`00-{32 hex}-{16 hex}-{2 hex}`), returning
/// (trace id, parent span id, flags). All-zero ids and version `ff` are
/// invalid, per W3C Trace Context.
///
/// The digits are decoded without a branch per digit (the eBPF programs
/// share this code: a branch per digit multiplies the paths the verifier
/// walks, which exhausted it on Linux 6.1); one check at the end decides.
pub fn parse_traceparent(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if value.len() < 55 {
        return None;
    }
    let mut bad = 0u64;
    let version = hex_byte(value[0], value[1], &mut bad);
    // Version 00 is exactly 55 bytes; later versions may append fields.
    let longer = value.len() > 55;
    let mut trace = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        trace[i] = hex_byte(value[3 + 2 * i], value[4 + 2 * i], &mut bad);
        i += 1;
    }
    let mut span = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        span[i] = hex_byte(value[36 + 2 * i], value[37 + 2 * i], &mut bad);
        i += 1;
    }
    let flags = hex_byte(value[53], value[54], &mut bad);
    let dashes =
        u64::from(value[2] ^ b'-') | u64::from(value[35] ^ b'-') | u64::from(value[52] ^ b'-');
    if bad != 0
        || dashes != 0
        || version == 0xff
        || (version == 0 && longer)
        || trace == [0; 16]
        || span == [0; 8]
    {
        return None;
    }
    Some((trace, span, flags))
}

/// 1 when `x < bound` (both below 2^63), else 0, without a branch.
#[inline(always)]
const fn below(x: u64, bound: u64) -> u64 {
    x.wrapping_sub(bound) >> 63
}

/// A lower-case hex digit's value; anything else sets `bad`. Upper case is
/// not valid in traceparent.
#[inline(always)]
fn hex_digit(c: u8, bad: &mut u64) -> u8 {
    let digit = u64::from(c).wrapping_sub(u64::from(b'0'));
    let letter = u64::from(c).wrapping_sub(u64::from(b'a'));
    let is_digit = below(digit & 0xff, 10) & below(u64::from(c), u64::from(b'9') + 1);
    let is_letter = below(letter & 0xff, 6) & below(u64::from(c), u64::from(b'f') + 1);
    *bad |= 1 ^ (is_digit | is_letter);
    ((digit & 0xf).wrapping_mul(is_digit) + (letter.wrapping_add(10) & 0xf).wrapping_mul(is_letter))
        as u8
}

#[inline(always)]
fn hex_byte(hi: u8, lo: u8, bad: &mut u64) -> u8 {
    (hex_digit(hi, bad) << 4) | hex_digit(lo, bad)
}

/// Where a chunked body's parse is ([`ChunkState::chunk`]): `sk_msg`
/// follows a chunked request body to find where the next request starts.
pub mod chunk {
    /// In a chunk-size line's hex digits.
    pub const SIZE: u64 = 0;
    /// In a chunk-size line past its digits (`;ext`, spaces, the CR).
    pub const EXT: u64 = 1;
    /// In a chunk's data and its CRLF (`body_left` bytes to go).
    pub const DATA: u64 = 2;
    /// After the last chunk, at the start of a trailer line (or the blank
    /// line that ends the body).
    pub const TRAILER_START: u64 = 3;
    /// After the last chunk, a CR at the start of a line.
    pub const TRAILER_CR: u64 = 4;
    /// In a trailer line.
    pub const TRAILER: u64 = 5;
    /// The body ended.
    pub const DONE: u64 = 6;
    /// Not chunked framing.
    pub const BAD: u64 = 7;
}

/// A chunked body's parse between bytes (RFC 9112 7.1): the chunk data is
/// skipped by its length ([`Self::skip`]), the size and trailer lines are
/// read a byte at a time ([`Self::byte`]). Words only: it lives in BPF map
/// values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkState {
    /// A [`chunk`] state.
    pub chunk: u64,
    /// With [`chunk::DATA`]: bytes of the chunk's data and CRLF to go.
    pub body_left: u64,
    /// The chunk size's value and its hex digits so far.
    pub size: u64,
    pub digits: u64,
}

impl ChunkState {
    /// Skips chunk data, at most `available` bytes; returns how many.
    #[inline(always)]
    pub fn skip(&mut self, available: u64) -> u64 {
        let n = if self.body_left < available {
            self.body_left
        } else {
            available
        };
        self.body_left -= n;
        if self.body_left == 0 {
            self.chunk = chunk::SIZE;
            self.size = 0;
            self.digits = 0;
        }
        n
    }

    /// One byte of a size or trailer line (not in [`chunk::DATA`],
    /// [`chunk::DONE`] or [`chunk::BAD`]).
    #[inline(always)]
    pub fn byte(&mut self, b: u8) {
        self.chunk = match self.chunk {
            chunk::SIZE | chunk::EXT if b == b'\n' => {
                if self.digits == 0 {
                    chunk::BAD
                } else if self.size == 0 {
                    chunk::TRAILER_START
                } else {
                    // The data and the CRLF after it.
                    self.body_left = self.size + 2;
                    chunk::DATA
                }
            }
            chunk::SIZE => {
                let v = match b {
                    b'0'..=b'9' => u64::from(b - b'0'),
                    b'a'..=b'f' => u64::from(b - b'a' + 10),
                    b'A'..=b'F' => u64::from(b - b'A' + 10),
                    _ => 16,
                };
                if v < 16 && self.digits < 15 {
                    // At most 15 digits: the size stays far from overflowing.
                    self.size = (self.size << 4) | v;
                    self.digits += 1;
                    chunk::SIZE
                } else if v < 16 || self.digits == 0 {
                    chunk::BAD
                } else {
                    chunk::EXT
                }
            }
            chunk::EXT => chunk::EXT,
            chunk::TRAILER_START if b == b'\r' => chunk::TRAILER_CR,
            chunk::TRAILER_START | chunk::TRAILER_CR if b == b'\n' => chunk::DONE,
            chunk::TRAILER if b == b'\n' => chunk::TRAILER_START,
            chunk::TRAILER_START | chunk::TRAILER_CR | chunk::TRAILER => chunk::TRAILER,
            _ => chunk::BAD,
        };
    }

    /// Feeds `bytes` (user space: tests); returns how many were taken,
    /// which is fewer only when the body ended ([`chunk::DONE`]) or is not
    /// chunked framing ([`chunk::BAD`]).
    #[cfg(not(target_arch = "bpf"))]
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let mut pos = 0;
        while pos < bytes.len() && self.chunk < chunk::DONE {
            if self.chunk == chunk::DATA {
                pos += self.skip((bytes.len() - pos) as u64) as usize;
            } else {
                self.byte(bytes[pos]);
                pos += 1;
            }
        }
        pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_digit_ref(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }

    #[test]
    fn hex_digits_match_a_plain_decoder() {
        for c in 0..=255u8 {
            let mut bad = 0;
            let v = hex_digit(c, &mut bad);
            match hex_digit_ref(c) {
                Some(expected) => assert_eq!((v, bad), (expected, 0), "{c:#x}"),
                None => assert_eq!(bad, 1, "{c:#x}"),
            }
        }
    }

    #[test]
    fn traceparent_round_trip() {
        let v = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (t, s, f) = parse_traceparent(v).unwrap();
        let mut out = [0u8; 32];
        hex_lower(&t, &mut out);
        assert_eq!(&out, b"0af7651916cd43dd8448eb211c80319c");
        let mut out = [0u8; 16];
        hex_lower(&s, &mut out);
        assert_eq!(&out, b"b7ad6b7169203331");
        assert_eq!(f, 1);
        assert!(
            parse_traceparent(b"00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none()
        );
        assert!(
            parse_traceparent(b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_none()
        );
        assert!(
            parse_traceparent(b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01").is_none()
        );
        // Every byte that is not a lower-case hex digit is refused, in
        // every digit position; every digit decodes to its value.
        let good = *b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        for pos in (0..55).filter(|p| ![2, 35, 52].contains(p)) {
            for c in 0..=255u8 {
                let mut v = good;
                v[pos] = c;
                match (hex_digit_ref(c), parse_traceparent(&v)) {
                    (None, parsed) => assert!(parsed.is_none(), "byte {c:#x} at {pos}"),
                    (Some(d), Some((t, s, f))) if pos >= 3 => {
                        let (got, high) = match pos {
                            3..=34 => (t[(pos - 3) / 2], pos % 2 == 1),
                            36..=51 => (s[(pos - 36) / 2], pos % 2 == 0),
                            _ => (f, pos == 53),
                        };
                        let shift = if high { 4 } else { 0 };
                        assert_eq!((got >> shift) & 0xf, d, "byte {c:#x} at {pos}");
                    }
                    _ => {}
                }
            }
        }
        assert!(
            parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_some()
        );
        assert!(
            parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x")
                .is_none()
        );
        assert!(
            parse_traceparent(b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x")
                .is_some()
        );
    }

    #[test]
    fn starts() {
        assert!(is_request_start(b"GET / HTTP/1.1\r\n"));
        assert!(is_request_start(b"PATCH /x HTTP/1.1"));
        assert!(!is_request_start(b"GETX / HTTP/1.1"));
        assert!(!is_request_start(b"*3\r\n$3\r\nSET\r\n"));
        assert!(is_response_start(b"HTTP/1.1 200 OK\r\n"));
        assert!(!is_response_start(b"HTTP/2 200"));
    }

    use std::{format, string::String, vec::Vec};

    /// A chunked encoding of `chunks` (sizes in the given case, an
    /// extension on every other one), the last chunk and `trailers`.
    fn encode(chunks: &[&[u8]], upper: bool, trailers: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let size = if upper {
                format!("{:X}", c.len())
            } else {
                format!("{:x}", c.len())
            };
            let ext = if i % 2 == 1 { ";name=\"v\"" } else { "" };
            out.extend_from_slice(format!("{size}{ext}\r\n").as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for t in trailers {
            out.extend_from_slice(format!("{t}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn a_chunked_body_ends_exactly_where_it_does_in_any_split() {
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let bodies = [
            encode(&[b"hello"], false, &[]),
            encode(
                &[b"GET / HTTP/1.1\r\n\r\n", b"0\r\n\r\n"],
                true,
                &["X-T: 1"],
            ),
            encode(
                &[&data[..4096], &data[..17], &data[..1]],
                false,
                &["A: b", "C: d"],
            ),
            encode(&[], false, &[]),
        ];
        let next = b"GET /next HTTP/1.1\r\n\r\n";
        for body in &bodies {
            let stream = [&body[..], next].concat();
            // Whole, then in two and three pieces at every split point.
            for cut in 0..=body.len() {
                let mut s = ChunkState::default();
                let a = s.feed(&stream[..cut]);
                assert_eq!(a, cut, "stopped early at {cut}");
                let b = s.feed(&stream[cut..]);
                assert_eq!((s.chunk, cut + b), (chunk::DONE, body.len()), "cut {cut}");
                let mut s = ChunkState::default();
                let third = cut / 2;
                let taken = s.feed(&stream[..third]) + s.feed(&stream[third..cut]);
                assert_eq!(taken, cut);
                s.feed(&stream[cut..]);
                assert_eq!(s.chunk, chunk::DONE);
            }
        }
    }

    #[test]
    fn random_chunkings_end_where_a_plain_decoder_says() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..500 {
            let sizes: Vec<usize> = (0..next(6)).map(|_| 1 + next(300) as usize).collect();
            let data: Vec<Vec<u8>> = sizes
                .iter()
                .map(|&n| (0..n).map(|_| next(256) as u8).collect())
                .collect();
            let chunks: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let trailers: Vec<&str> = ["T: 1", "U: 2"][..next(3) as usize].to_vec();
            let body = encode(&chunks, next(2) == 1, &trailers);
            let mut s = ChunkState::default();
            let mut pos = 0;
            while pos < body.len() {
                let end = (pos + 1 + next(40) as usize).min(body.len());
                assert_eq!(s.feed(&body[pos..end]), end - pos);
                pos = end;
            }
            assert_eq!(s.chunk, chunk::DONE, "{sizes:?}");
        }
    }

    #[test]
    fn not_chunked_framing_is_bad() {
        for body in [&b"\r\n"[..], b"zz\r\n", b";x\r\n", b"1234567890abcdef0\r\n"] {
            let mut s = ChunkState::default();
            s.feed(body);
            assert_eq!(s.chunk, chunk::BAD, "{:?}", String::from_utf8_lossy(body));
        }
        // Fifteen digits are still a size.
        let mut s = ChunkState::default();
        s.feed(b"00000000000000f\r\n");
        assert_eq!((s.chunk, s.body_left), (chunk::DATA, 17));
    }
}
