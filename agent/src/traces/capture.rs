//! Loads and attaches the HTTP capture programs (`fathom-http` object) and
//! reads their events. The kernel/user-space contract is
//! `fathom_common::http`; the bytes are parsed by [`crate::traces`] (`parse`, `spans`).
use std::{fs, os::fd::AsFd, path::Path, time::Duration};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{BtfTracePoint, ProgramError, TracePoint, UProbe, uprobe::UProbeScope},
};
use fathom_common::http::{
    ConnEvent, ConnKey, DataEvent, HttpCounter, ProcessInfo, SockOffsets, SpanRecord, event_kind,
    globals, names, stage,
};

pub use crate::config::HttpHooks;
use crate::{
    btf,
    ebpf::{self, field_offset, map_err, map_mut, take_map as take},
    preflight, sys,
};

/// The eBPF object of this signal, as named in verifier figures.
pub const OBJECT: &str = "fathom-http";

/// What the capture programs trace.
#[derive(Clone, Debug)]
pub struct HttpCaptureConfig {
    /// Only these processes (empty: all).
    pub pids: Vec<u32>,
    /// Insert `traceparent` into outgoing requests (`sock_ops` + `sk_msg`).
    pub inject: bool,
    /// With `inject`: every request of a kept-alive client connection, not
    /// only its first (see `super::inject`).
    pub inject_keep_alive: bool,
    /// Size of the event ring buffer, in bytes (a power of two).
    pub ring_bytes: u32,
    /// Sockets tracked at once.
    pub connections: u32,
    /// Which hooks carry the data path.
    pub hooks: HttpHooks,
    /// Goroutine probes in Go executables (see `super::golang`).
    pub go: bool,
    /// With `inject` and socket hooks: simple exchanges paired in the
    /// kernel, one [`SpanRecord`] each.
    pub pair: bool,
}

impl Default for HttpCaptureConfig {
    fn default() -> Self {
        Self {
            pids: Vec::new(),
            inject: true,
            inject_keep_alive: true,
            ring_bytes: 8 << 20,
            connections: 65536,
            hooks: HttpHooks::Auto,
            go: true,
            pair: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpCaptureError {
    #[error(transparent)]
    Kernel(#[from] ebpf::KernelError),
    #[error("attaching {name} to tracepoint {tracepoint}: {source}")]
    Attach {
        name: &'static str,
        tracepoint: &'static str,
        source: ProgramError,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("waiting on the event ring buffer: {0}")]
    Wait(std::io::Error),
    #[error("socket tracepoints asked for, but {0}")]
    NoSocketHooks(String),
}

crate::wraps_kernel_error!(HttpCaptureError);

/// An event of the capture programs. A data event is lent: the reader
/// decodes every record into one reused [`DataEvent`].
#[derive(Clone, Copy)]
pub enum HttpEvent<'a> {
    Open(ConnEvent),
    Close(ConnEvent),
    /// A process exited: its connections are gone.
    ProcessExit(ConnEvent),
    Data(&'a DataEvent),
    /// An exchange the kernel paired (see `ebpf-programs/ebpf/src/http/pair.rs`).
    Span(SpanRecord),
    /// A process at its first connection, as the kernel saw it then (lent:
    /// the record is read in place).
    Process(&'a ProcessInfo),
}

/// What one [`HttpCapture::read`] took from the ring buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Bytes of the records (headers not included).
    pub bytes: u64,
    /// Records that did not parse (counted by the caller).
    pub malformed: u64,
}

/// Parses one ring-buffer record strictly (a data record into `scratch`);
/// `None` for anything malformed.
pub fn parse_record<'a>(bytes: &'a [u8], scratch: &'a mut DataEvent) -> Option<HttpEvent<'a>> {
    match *bytes.first()? {
        event_kind::DATA => scratch
            .read_record(bytes)
            .then_some(HttpEvent::Data(scratch)),
        kind @ (event_kind::CONN_OPEN | event_kind::CONN_CLOSE | event_kind::PROCESS_EXIT) => {
            let event: ConnEvent = fathom_common::record::read(bytes)?;
            Some(match kind {
                event_kind::CONN_OPEN => HttpEvent::Open(event),
                event_kind::CONN_CLOSE => HttpEvent::Close(event),
                _ => HttpEvent::ProcessExit(event),
            })
        }
        event_kind::SPAN => fathom_common::record::read(bytes).map(HttpEvent::Span),
        event_kind::PROCESS => ProcessInfo::from_record(bytes).map(HttpEvent::Process),
        _ => None,
    }
}

/// Tracepoints of the capture: (program, category, tracepoint). Public for
/// the tracing bench, which measures what attaching to them costs alone.
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("http_fork", "sched", "sched_process_fork"),
    ("http_exit_thread", "sched", "sched_process_exit"),
    ("http_enter_accept", "syscalls", "sys_enter_accept"),
    ("http_enter_accept", "syscalls", "sys_enter_accept4"),
    ("http_exit_accept", "syscalls", "sys_exit_accept"),
    ("http_exit_accept", "syscalls", "sys_exit_accept4"),
    ("http_enter_connect", "syscalls", "sys_enter_connect"),
    ("http_exit_connect", "syscalls", "sys_exit_connect"),
    ("http_enter_close", "syscalls", "sys_enter_close"),
    ("http_enter_read", "syscalls", "sys_enter_read"),
    ("http_enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    ("http_enter_readv", "syscalls", "sys_enter_readv"),
    ("http_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("http_enter_write", "syscalls", "sys_enter_write"),
    ("http_enter_sendto", "syscalls", "sys_enter_sendto"),
    ("http_enter_writev", "syscalls", "sys_enter_writev"),
    ("http_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("http_enter_sendfile", "syscalls", "sys_enter_sendfile64"),
    ("http_exit_io", "syscalls", "sys_exit_read"),
    ("http_exit_io", "syscalls", "sys_exit_recvfrom"),
    ("http_exit_io", "syscalls", "sys_exit_readv"),
    ("http_exit_io", "syscalls", "sys_exit_recvmsg"),
    ("http_exit_io", "syscalls", "sys_exit_write"),
    ("http_exit_io", "syscalls", "sys_exit_sendto"),
    ("http_exit_io", "syscalls", "sys_exit_writev"),
    ("http_exit_io", "syscalls", "sys_exit_sendmsg"),
    ("http_exit_io", "syscalls", "sys_exit_sendfile64"),
];

/// BTF tracepoints of the socket data path: (program, tracepoint). Public
/// for the tracing bench, which measures what attaching to them costs alone,
/// and for `check`.
pub const SOCKET_TRACEPOINTS: &[(&str, &str)] = &[
    (names::SOCK_RECV, "sock_recv_length"),
    (names::SOCK_SEND, "sock_send_length"),
    (names::SOCK_STATE, "inet_sock_set_state"),
];

/// Second stages of the socket data path: (program, its hook, its array).
const SOCKET_STAGES: &[(&str, &str, &str)] = &[
    (
        names::SOCK_RECV_PROCESS,
        "sock_recv_length",
        names::SOCK_RECV_STAGES,
    ),
    (
        names::SOCK_SEND_PROCESS,
        "sock_send_length",
        names::SOCK_SEND_STAGES,
    ),
];

/// The kernel hook a BTF tracepoint program of this object attaches to (or
/// is loaded for).
pub fn btf_tracepoint_of(program: &str) -> Option<&'static str> {
    if program == names::CONNECT_PARENT {
        return Some("inet_sock_set_state");
    }
    SOCKET_TRACEPOINTS
        .iter()
        .map(|&(p, t)| (p, t))
        .chain(SOCKET_STAGES.iter().map(|&(p, t, _)| (p, t)))
        .find(|(p, _)| *p == program)
        .map(|(_, t)| t)
}

/// Whether this kernel can run the socket data path: the
/// `sock_recv_length`/`sock_send_length` tracepoints in its BTF (Linux 6.3)
/// and `sendfile`/`splice` into a socket going through `sock_sendmsg`
/// (Linux 6.5; before, their bytes would pass unseen and a response sent
/// with `sendfile` would never end). `Err` says what is missing.
pub fn socket_hooks_supported(btf: &btf::KernelBtf) -> Result<(), String> {
    for tracepoint in ["sock_recv_length", "sock_send_length"] {
        if !btf.has_typedef(&format!("btf_trace_{tracepoint}")) {
            return Err(format!(
                "the kernel has no {tracepoint} tracepoint (Linux 6.3+)"
            ));
        }
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v >= (6, 5) => Ok(()),
        Some((major, minor)) => Err(format!(
            "kernel {major}.{minor} sends sendfile/splice bytes around the socket tracepoints (Linux 6.5+)"
        )),
        None => Err(format!("unreadable kernel release {:?}", release.trim())),
    }
}

/// (major, minor) of a kernel release string (`6.18.44-cloud-amd64`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// OpenSSL functions whose plaintext is captured (and the handshake, which
/// names the socket of an `SSL *`): (program, symbol).
const SSL_PROBES: &[(&str, &str)] = &[
    ("http_ssl_handshake", "SSL_do_handshake"),
    ("http_ssl_handshake_exit", "SSL_do_handshake"),
    ("http_ssl_read", "SSL_read"),
    ("http_ssl_read_ex", "SSL_read_ex"),
    ("http_ssl_write", "SSL_write"),
    ("http_ssl_write_ex", "SSL_write_ex"),
    ("http_ssl_exit", "SSL_read"),
    ("http_ssl_exit", "SSL_read_ex"),
    ("http_ssl_exit", "SSL_write"),
    ("http_ssl_exit", "SSL_write_ex"),
];

/// The `libssl` files mapped by running processes (by path as each
/// process sees it from the root), plus the system's.
pub fn libssl_paths(proc_root: &Path) -> Vec<std::path::PathBuf> {
    let mut found = std::collections::BTreeSet::new();
    for system in [
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/lib/x86_64-linux-gnu/libssl.so.3",
        "/usr/lib64/libssl.so.3",
    ] {
        if let Ok(real) = fs::canonicalize(system) {
            found.insert(real);
        }
    }
    for pid in numeric_dirs(proc_root) {
        let Ok(maps) = fs::read_to_string(proc_root.join(pid.to_string()).join("maps")) else {
            continue;
        };
        for line in maps.lines() {
            if let Some(path) = line.split_whitespace().nth(5)
                && path.contains("/libssl.so")
                && let Ok(real) = fs::canonicalize(path)
            {
                found.insert(real);
            }
        }
    }
    found.into_iter().collect()
}

/// The loaded and attached capture programs. Dropping it detaches them.
pub struct HttpCapture {
    // Maps taken out of the object stay alive with it; programs detach when
    // `ebpf` drops (after the maps).
    events: RingBuf<MapData>,
    notified: sys::EdgeWait,
    counters: PerCpuArray<MapData, u64>,
    conns: BpfHashMap<MapData, ConnKey, fathom_common::http::ConnInfo>,
    hooks: &'static str,
    scratch: Box<DataEvent>,
    ebpf: Ebpf,
    /// Programs loaded into the kernel so far.
    loaded: std::collections::HashSet<&'static str>,
    /// Executables looked at (device, inode): whether they run Go.
    executables: std::collections::HashMap<(u64, u64), bool>,
    go_binaries: usize,
    /// Goroutine probes wanted.
    go: bool,
}

/// The goroutine probes (`http/golang.rs`).
const GO_ROUND_TRIP: &str = "http_go_round_trip";
const GO_REQUEST_WRITE: &str = "http_go_request_write";
const GO_NEWPROC: &str = "http_go_newproc";
const GO_NEWPROC_DONE: &str = "http_go_newproc_done";

/// The process ids under `proc_root`.
fn numeric_dirs(proc_root: &Path) -> Vec<u32> {
    fs::read_dir(proc_root)
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl HttpCapture {
    /// Loads the programs, fills the process filter and attaches the
    /// capture. With `inject`, the kernel side expects the injection programs
    /// to be attached next (see [`crate::inject`]).
    pub fn start(config: &HttpCaptureConfig) -> Result<Self, HttpCaptureError> {
        let ebpf = Self::open_object(config)?;
        Self::start_with(config, ebpf)
    }

    /// The `fathom-http` object, its globals and map sizes set from
    /// `config` as [`HttpCapture::start`] sets them, no program loaded.
    pub fn open_object(config: &HttpCaptureConfig) -> Result<Ebpf, HttpCaptureError> {
        if !config.ring_bytes.is_power_of_two() || config.ring_bytes < 4096 {
            return Err(HttpCaptureError::Config(format!(
                "ring buffer size {} is not a power of two of at least 4096",
                config.ring_bytes
            )));
        }
        preflight::ensure_tracefs().map_err(|reason| ebpf::KernelError::TracepointFormat {
            path: preflight::TRACEFS.into(),
            reason,
        })?;
        let fork_format =
            Path::new(preflight::TRACEFS).join("events/sched/sched_process_fork/format");
        let format =
            fs::read_to_string(&fork_format).map_err(|e| ebpf::KernelError::TracepointFormat {
                path: fork_format.display().to_string(),
                reason: e.to_string(),
            })?;
        let offset = |field: &str| {
            field_offset(&format, field).ok_or_else(|| ebpf::KernelError::TracepointFormat {
                path: fork_format.display().to_string(),
                reason: format!("no {field} field"),
            })
        };
        let parent_offset = offset("parent_pid")?;
        let child_offset = offset("child_pid")?;
        let filter = u8::from(!config.pids.is_empty());
        let inject = u8::from(config.inject);
        // Only where closes are seen by `http_sock_state` (a response that
        // ends with its connection), and where the ids are the kernel's.
        let pair = u8::from(config.pair && config.inject && socket_hooks_chosen(config.hooks));
        let sock = sock_offsets();
        let ebpf = EbpfLoader::new()
            .verifier_log_level(VerifierLogLevel::STATS)
            .override_global(globals::SOCK_OFFSETS, &sock, true)
            .override_global(globals::FILTER_PIDS, &filter, true)
            .override_global(globals::INJECT, &inject, true)
            .override_global(globals::PAIR, &pair, true)
            .override_global(globals::FORK_PARENT_OFFSET, &parent_offset, true)
            .override_global(globals::FORK_CHILD_OFFSET, &child_offset, true)
            .map_max_entries(names::EVENTS, config.ring_bytes)
            .map_max_entries(names::CONNS, config.connections.max(1))
            .load(ebpf::http_object()?)?;
        Ok(ebpf)
    }

    fn start_with(config: &HttpCaptureConfig, mut ebpf: Ebpf) -> Result<Self, HttpCaptureError> {
        {
            let mut monitored: BpfHashMap<_, u32, u8> =
                BpfHashMap::try_from(map_mut(&mut ebpf, names::MONITORED)?)
                    .map_err(map_err(names::MONITORED))?;
            for pid in &config.pids {
                monitored
                    .insert(pid, 1, 0)
                    .map_err(map_err(names::MONITORED))?;
            }
        }
        let mut loaded = std::collections::HashSet::new();
        let sockets = choose_hooks(config.hooks)?;
        // SSL's second stage first: its first stages tail-call it.
        let ssl_process = {
            let program: &mut UProbe = loaded_program(&mut ebpf, &mut loaded, names::SSL_PROCESS)?;
            clone_fd(program.fd(), names::SSL_PROCESS)?
        };
        set_stage(
            &mut ebpf,
            names::SSL_STAGES,
            stage::SSL_PROCESS,
            &ssl_process,
        )?;
        if sockets {
            let btf = aya::Btf::from_sys_fs()
                .map_err(|e| HttpCaptureError::NoSocketHooks(format!("kernel BTF: {e}")))?;
            for &(name, hook, map) in SOCKET_STAGES {
                let fd = {
                    let program = load_btf_program(&mut ebpf, &btf, name, hook)?;
                    clone_fd(program.fd(), name)?
                };
                set_stage(&mut ebpf, map, stage::PROCESS, &fd)?;
            }
            for &(name, hook) in SOCKET_TRACEPOINTS {
                let program = load_btf_program(&mut ebpf, &btf, name, hook)?;
                program
                    .attach()
                    .map_err(|source| HttpCaptureError::Attach {
                        name,
                        tracepoint: hook,
                        source,
                    })?;
            }
        } else {
            let process = {
                let program: &mut TracePoint =
                    loaded_program(&mut ebpf, &mut loaded, names::PROCESS)?;
                clone_fd(program.fd(), names::PROCESS)?
            };
            set_stage(&mut ebpf, names::STAGES, stage::PROCESS, &process)?;
        }
        for &(name, category, tracepoint) in TRACEPOINTS {
            if sockets && category == "syscalls" {
                continue;
            }
            let program: &mut TracePoint = loaded_program(&mut ebpf, &mut loaded, name)?;
            program
                .attach(category, tracepoint)
                .map_err(|source| HttpCaptureError::Attach {
                    name,
                    tracepoint,
                    source,
                })?;
        }
        let hooks = if sockets { "sockets" } else { "syscalls" };
        tracing::info!(hooks, "http capture attached");
        // HTTPS: OpenSSL's plaintext, in every libssl found now.
        for path in libssl_paths(Path::new("/proc")) {
            let mut attached = 0;
            for &(name, symbol) in SSL_PROBES {
                let program: &mut UProbe = loaded_program(&mut ebpf, &mut loaded, name)?;
                match program.attach(symbol, &path, UProbeScope::AllProcesses) {
                    Ok(_) => attached += 1,
                    // `_ex` variants exist from OpenSSL 1.1.1 on.
                    Err(e) => {
                        tracing::debug!(path = %path.display(), symbol, error = %e, "uprobe not attached")
                    }
                }
            }
            tracing::info!(path = %path.display(), probes = attached, "https capture attached");
        }
        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;
        let notified = sys::EdgeWait::new(events.as_fd()).map_err(HttpCaptureError::Wait)?;
        let counters = take(&mut ebpf, names::COUNTERS)?;
        let conns = take(&mut ebpf, names::CONNS)?;
        let mut capture = Self {
            events,
            notified,
            counters,
            conns,
            hooks,
            scratch: Box::new(DataEvent::EMPTY),
            ebpf,
            loaded,
            executables: std::collections::HashMap::new(),
            go_binaries: 0,
            go: config.go,
        };
        // Go: the goroutine probes, in every Go executable running now (and
        // in those of processes seen later: `Self::discover`).
        let pids: Vec<u32> = if config.pids.is_empty() {
            numeric_dirs(Path::new("/proc"))
        } else {
            config.pids.clone()
        };
        for pid in pids {
            capture.discover(pid);
        }
        Ok(capture)
    }

    /// Looks at a process's executable once (by file): a Go executable
    /// gets the goroutine probes (see `super::golang`).
    pub fn discover(&mut self, pid: u32) {
        use std::os::unix::fs::MetadataExt as _;
        if !self.go {
            return;
        }
        let exe = Path::new("/proc").join(pid.to_string()).join("exe");
        let Ok(meta) = fs::metadata(&exe) else {
            return;
        };
        let file = (meta.dev(), meta.ino());
        if let Some(&go) = self.executables.get(&file) {
            if go {
                self.mark_go(pid);
            }
            return;
        }
        let points = match super::golang::probe_points_of(&exe) {
            Ok(points) => points,
            Err(
                super::golang::GoBinaryError::NotGo
                | super::golang::GoBinaryError::Io(..)
                | super::golang::GoBinaryError::Elf(_),
            ) => {
                self.executables.insert(file, false);
                return;
            }
            Err(e) => {
                // Still Go: its threads say nothing of which request a write
                // belongs to, so its client requests go without a parent
                // (counted as missed) rather than with a wrong one.
                self.executables.insert(file, true);
                self.mark_go(pid);
                let path = fs::read_link(&exe).unwrap_or(exe);
                tracing::info!(path = %path.display(), reason = %e, "Go executable without goroutine context");
                return;
            }
        };
        self.executables.insert(file, true);
        self.mark_go(pid);
        let mut probes = vec![
            (GO_ROUND_TRIP, points.round_trip),
            (GO_REQUEST_WRITE, points.request_write),
            (GO_NEWPROC, points.newproc1),
        ];
        if let Some(done) = points.newproc_done {
            probes.push((GO_NEWPROC_DONE, done));
        }
        let path = fs::read_link(&exe).unwrap_or_else(|_| exe.clone());
        let mut attached = 0;
        for (name, offset) in probes {
            let result = loaded_program::<UProbe>(&mut self.ebpf, &mut self.loaded, name)
                .map_err(|e| e.to_string())
                .and_then(|program| {
                    program
                        .attach(offset, &exe, UProbeScope::AllProcesses)
                        .map_err(|e| e.to_string())
                });
            match result {
                Ok(_) => attached += 1,
                Err(error) => {
                    tracing::warn!(path = %path.display(), program = name, %error, "Go uprobe not attached")
                }
            }
        }
        self.go_binaries += 1;
        tracing::info!(
            path = %path.display(),
            version = %points.version,
            stripped = points.stripped,
            probes = attached,
            goroutines_inherit = points.newproc_done.is_some(),
            "Go goroutine context attached"
        );
    }

    /// Tells the kernel side that `pid` runs Go: its server requests are
    /// tied to goroutines from the first (the probes would say so only at
    /// its first client request).
    fn mark_go(&mut self, pid: u32) {
        if let Some(map) = self.ebpf.map_mut(names::GO_PROCS)
            && let Ok(mut procs) = aya::maps::HashMap::<_, u32, u8>::try_from(map)
            && let Err(e) = procs.insert(pid, 1, 0)
        {
            tracing::debug!(pid, error = %e, "marking a Go process");
        }
    }

    /// Go executables that got the goroutine probes.
    pub fn go_binaries(&self) -> usize {
        self.go_binaries
    }

    /// The data path's hooks: `sockets` or `syscalls`.
    pub fn hooks(&self) -> &'static str {
        self.hooks
    }

    /// Hands every queued event to `f`, straight from the ring buffer (one
    /// reused data event, no allocation per record).
    pub fn read(&mut self, mut f: impl FnMut(HttpEvent<'_>)) -> Drained {
        let mut drained = Drained::default();
        while let Some(item) = self.events.next() {
            drained.bytes += item.len() as u64;
            match parse_record(&item, &mut self.scratch) {
                Some(event) => f(event),
                None => drained.malformed += 1,
            }
        }
        drained
    }

    /// Sleeps up to `timeout`, or until the programs report a new
    /// connection. Data records wake no one (a wake-up per record was the
    /// largest single cost under load: an inter-processor interrupt, in a VM
    /// an exit to the hypervisor, each): the reader drains on a timer. A new
    /// connection wakes it at once so that a short-lived client's process
    /// is read in `/proc` before it exits.
    pub fn wait(&self, timeout: Duration) -> std::io::Result<bool> {
        self.notified.wait(timeout)
    }

    /// Forgets the sockets of an exited process (the kernel cannot list them).
    pub fn forget(&mut self, tgid: u32, fds: impl IntoIterator<Item = u32>) {
        for fd in fds {
            let _ = self.conns.remove(&ConnKey { tgid, fd });
        }
    }

    /// The kernel's counters, summed over CPUs.
    pub fn counters(&self) -> [u64; HttpCounter::COUNT as usize] {
        let mut out = [0; HttpCounter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// A handle on the `SERVING` map (thread -> the server span it serves),
    /// for the profiler to share: its samples then carry their span.
    pub fn serving_map(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        match self.ebpf.map(names::SERVING)? {
            aya::maps::Map::HashMap(data) => data.fd().as_fd().try_clone_to_owned().ok(),
            _ => None,
        }
    }

    /// The loaded object: the injection programs attach from it
    /// ([`crate::inject`]), when `inject` was set.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Whether the data path runs on socket tracepoints (`true`) or syscall
/// tracepoints, for `hooks`.
fn choose_hooks(hooks: HttpHooks) -> Result<bool, HttpCaptureError> {
    if hooks == HttpHooks::Syscalls {
        return Ok(false);
    }
    let supported = btf::kernel()
        .map_err(|e| e.to_string())
        .and_then(|b| socket_hooks_supported(&b));
    match (hooks, supported) {
        (_, Ok(())) => Ok(true),
        (HttpHooks::Sockets, Err(reason)) => Err(HttpCaptureError::NoSocketHooks(reason)),
        (_, Err(reason)) => {
            tracing::info!(%reason, "http capture on syscall tracepoints (every syscall then takes the kernel's slow path)");
            Ok(false)
        }
    }
}

/// [`choose_hooks`] without its log: whether the data path will run on
/// socket tracepoints.
fn socket_hooks_chosen(hooks: HttpHooks) -> bool {
    hooks != HttpHooks::Syscalls
        && btf::kernel()
            .map_err(|e| e.to_string())
            .and_then(|b| socket_hooks_supported(&b))
            .is_ok()
}

/// Puts the program `fd` at `index` of the program array `map`.
fn set_stage(
    ebpf: &mut Ebpf,
    map: &'static str,
    index: u32,
    fd: &aya::programs::ProgramFd,
) -> Result<(), HttpCaptureError> {
    let mut stages: ProgramArray<&mut MapData> =
        ProgramArray::try_from(map_mut(ebpf, map)?).map_err(map_err(map))?;
    stages.set(index, fd, 0).map_err(map_err(map))?;
    Ok(())
}

/// A BTF tracepoint program of the object, loaded for `hook`.
fn load_btf_program<'a>(
    ebpf: &'a mut Ebpf,
    btf: &aya::Btf,
    name: &'static str,
    hook: &'static str,
) -> Result<&'a mut BtfTracePoint, HttpCaptureError> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(ebpf::KernelError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| ebpf::KernelError::Program { name, source })?;
    ebpf::load_program(OBJECT, name, || program.load(hook, btf))?;
    Ok(program)
}

/// The kernel offsets for reading a connection's socket (RTT, retransmits,
/// local address); without them (no BTF) spans go without the `fathom.tcp.*`
/// attributes, and the reason is logged once.
fn sock_offsets() -> SockOffsets {
    match btf::kernel().and_then(|b| btf::sock_offsets(&b).map(|o| (b, o))) {
        Ok((btf, mut offsets)) => {
            // On a host with cgroup v1 hierarchies, a gone process's
            // container is found from its cgroup on one of them.
            if let Some((controller, _)) = super::inject::cgroup1_root() {
                match btf::cgroup1_offsets(&btf, controller) {
                    Ok(o) => {
                        [
                            offsets.task_cgroups,
                            offsets.css_set_subsys,
                            offsets.css_cgroup,
                            offsets.cgroup_kn,
                            offsets.kernfs_node_id,
                        ] = o;
                    }
                    Err(e) => tracing::warn!(
                        error = %e, controller,
                        "short-lived processes in cgroup v1 containers go without their container id"
                    ),
                }
            }
            offsets
        }
        Err(e) => {
            tracing::warn!(error = %e, "HTTP spans go without TCP attributes (fathom.tcp.*)");
            SockOffsets::default()
        }
    }
}

/// A program of the object as its type, loaded into the kernel the first
/// time it is asked for (`loaded` remembers which were).
fn loaded_program<'a, T>(
    ebpf: &'a mut Ebpf,
    loaded: &mut std::collections::HashSet<&'static str>,
    name: &'static str,
) -> Result<&'a mut T, HttpCaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    T: LoadProgram,
{
    let program: &mut T = ebpf
        .program_mut(name)
        .ok_or(ebpf::KernelError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| ebpf::KernelError::Program { name, source })?;
    if loaded.insert(name) {
        ebpf::load_program(OBJECT, name, || program.load_program())?;
    }
    Ok(program)
}

/// A loaded program's descriptor, owned (to fill a `ProgramArray`).
fn clone_fd(
    fd: Result<&aya::programs::ProgramFd, ProgramError>,
    name: &'static str,
) -> Result<aya::programs::ProgramFd, HttpCaptureError> {
    Ok(fd
        .and_then(|fd| fd.try_clone().map_err(ProgramError::IOError))
        .map_err(|source| ebpf::KernelError::Program { name, source })?)
}

/// The `load` of the program types used here (aya has no common trait).
trait LoadProgram {
    fn load_program(&mut self) -> Result<(), ProgramError>;
}

impl LoadProgram for TracePoint {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl LoadProgram for UProbe {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_common::http::{CAPTURE_HEAD, PROCESS_ENV, SockAddr};

    fn conn(kind: u8) -> ConnEvent {
        ConnEvent {
            kind,
            role: 1,
            _reserved: [0; 2],
            tgid: 7,
            tid: 8,
            fd: 3,
            conn_id: 99,
            ts_ns: 5,
            peer: SockAddr::default(),
            listen_fd: 4,
            _reserved2: 0,
            local: SockAddr::default(),
        }
    }

    fn bytes_of<T: aya::Pod>(v: &T) -> Vec<u8> {
        fathom_common::record::bytes_of(v).to_vec()
    }

    #[test]
    fn records_parse_strictly() {
        let mut empty = DataEvent::EMPTY;
        let scratch = &mut empty;
        let open = bytes_of(&conn(event_kind::CONN_OPEN));
        assert!(
            matches!(parse_record(&open, scratch), Some(HttpEvent::Open(e)) if e.conn_id == 99)
        );
        assert!(parse_record(&open[..open.len() - 1], scratch).is_none());
        let exit = bytes_of(&conn(event_kind::PROCESS_EXIT));
        assert!(matches!(
            parse_record(&exit, scratch),
            Some(HttpEvent::ProcessExit(_))
        ));
        assert!(parse_record(&[], scratch).is_none());
        assert!(parse_record(&[42; 80], scratch).is_none());

        // A process record, read in place from 8-byte aligned memory (as
        // ring-buffer records are).
        let mut info = Box::new(ProcessInfo {
            kind: event_kind::PROCESS,
            _reserved: [0; 3],
            tgid: 77,
            cgroup_id: 5,
            cgroup1_id: 6,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            env_len: 9,
            _reserved2: 0,
            env: [0; PROCESS_ENV],
        });
        info.env[..9].copy_from_slice(b"A=1\0B=22\0");
        let process = fathom_common::record::bytes_of(&*info);
        match parse_record(process, scratch) {
            Some(HttpEvent::Process(p)) => {
                assert_eq!((p.tgid, p.cgroup_id, p.cgroup1_id), (77, 5, 6));
                assert_eq!((p.comm(), p.env()), (&b"curl"[..], &b"A=1\0B=22\0"[..9]));
            }
            _ => panic!("process record not parsed"),
        }
        // A length the kernel cannot have written is cut at the array.
        info.env_len = u32::MAX;
        let process = fathom_common::record::bytes_of(&*info);
        match parse_record(process, scratch) {
            Some(HttpEvent::Process(p)) => assert_eq!(p.env().len(), PROCESS_ENV),
            _ => panic!("process record not parsed"),
        }
        let len = process.len();
        assert!(parse_record(&process[..len - 1], scratch).is_none());
        assert!(parse_record(&process[1..], scratch).is_none());

        let mut data = DataEvent::EMPTY;
        data.head_len = 5;
        data.head[..5].copy_from_slice(b"GET /");
        let full = bytes_of(&data);
        let record = &full[..DataEvent::HEAD_OFFSET + 5];
        match parse_record(record, scratch) {
            Some(HttpEvent::Data(e)) => assert_eq!(e.head(), b"GET /"),
            _ => panic!("data record not parsed"),
        }
        // Claims more head than the record has.
        assert!(parse_record(&full[..DataEvent::HEAD_OFFSET + 4], scratch).is_none());
        assert!(parse_record(&full[..DataEvent::HEAD_OFFSET + CAPTURE_HEAD], scratch).is_some());
        // A shorter record after a longer one: only its own head is seen.
        data.head_len = 3;
        data.head[..3].copy_from_slice(b"PUT");
        let short = bytes_of(&data);
        match parse_record(&short[..DataEvent::HEAD_OFFSET + 3], scratch) {
            Some(HttpEvent::Data(e)) => assert_eq!(e.head(), b"PUT"),
            _ => panic!("data record not parsed"),
        }
    }
}
