//! `traceparent` injection: attaches the `fathom-http` object's `sock_ops`
//! program to the cgroup v2 root and its `sk_msg` program to the
//! `CLIENT_SOCKETS` sockhash (see `fathom_common::http`).
//!
//! [`attach`] returns an [`Injection`] guard; dropping it detaches the
//! programs. In first-request mode it also takes every socket out of the
//! sockhash, so the kernel stops running `sk_msg` on them (a socket keeps
//! the programs of the maps it is in, even after they are detached from
//! the map).
//!
//! Keep-alive mode (every request of a connection) adds a stream verdict
//! program, so that a socket in the sockhash still answers `FIONREAD`
//! right: received bytes then wait in the socket's sockmap queue, and a
//! socket taken out of the map loses what waits there unread (measured:
//! the reader stalls). So in keep-alive mode a socket never leaves the map
//! until it closes: the map is pinned in bpffs under [`PIN_DIR`], one
//! directory per agent run; a stopping agent switches its programs to pass
//! everything and leaves the pin, and a later agent removes the pins whose
//! sockets have all closed ([`collect_pins`]).
//!
//! The cgroup v2 root is found in `/proc/self/mounts`. Inside a cgroup
//! namespace that is the namespace's root: only its processes are covered.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, MapError, SockHash},
    programs::{CgroupAttachMode, SkMsg, SkSkb, SockOps, sk_msg::SkMsgLink, sk_skb::SkSkbLink},
};
use fathom_common::http::names;

/// Why injection could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("reading /proc/self/mounts: {0}")]
    Mounts(#[source] io::Error),
    #[error(
        "no cgroup v2 hierarchy is mounted (no cgroup2 entry in /proc/self/mounts); \
         traceparent injection attaches its sock_ops program to the cgroup v2 root"
    )]
    NoCgroup2,
    #[error("opening the cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the fathom-http object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the fathom-http object has no map {0} (or it was already taken)")]
    MissingMap(&'static str),
    #[error("a socket in the sockhash does not behave on this kernel: {0}")]
    SelfTest(String),
    #[error(
        "no bpffs is mounted at /sys/fs/bpf: keep-alive injection pins its sockhash there, \
         so that a stopping agent never takes out a socket with bytes not yet read"
    )]
    NoBpffs,
    #[error("pinning the sockhash under {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error(transparent)]
    Kernel(#[from] crate::ebpf::KernelError),
}

crate::wraps_kernel_error!(InjectError);

/// The attached injection programs. Dropping it detaches them.
pub struct Injection {
    sock_ops: Option<aya::programs::sock_ops::SockOpsLink>,
    sk_msg: Option<SkMsgLink>,
    sk_skb: Option<SkSkbLink>,
    keep_alive: bool,
    keep_alive_failure: Option<String>,
    /// Keep-alive mode: the `INJECT_CONTROL` array and the pin directory of
    /// this run's sockhash.
    pinned: Option<(Array<MapData, u8>, PathBuf)>,
    sockets: SockHash<MapData, u64>,
    cgroup: PathBuf,
    /// `fathom_connect_parent`, when it attached.
    connect_parent: Option<aya::programs::tp_btf::BtfTracePointLink>,
}

impl Injection {
    /// The cgroup the `sock_ops` program is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Whether every request of a kept-alive connection is injected (else
    /// its first only).
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// Why keep-alive injection was asked for and could not start.
    pub fn keep_alive_failure(&self) -> Option<&str> {
        self.keep_alive_failure.as_deref()
    }

    /// Keep-alive mode: where this run's sockhash is pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pinned.as_ref().map(|(_, dir)| dir.as_path())
    }

    /// The sockets in `CLIENT_SOCKETS` now (their cookies).
    pub fn socket_cookies(&self) -> Result<Vec<u64>, MapError> {
        self.sockets.keys().collect()
    }
}

impl std::fmt::Debug for Injection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injection")
            .field("cgroup", &self.cgroup)
            .field("sock_ops", &self.sock_ops)
            .field("sk_msg", &self.sk_msg)
            .finish_non_exhaustive()
    }
}

impl Drop for Injection {
    fn drop(&mut self) {
        // No new sockets first, then no program for sockets added from
        // here on.
        drop(self.sock_ops.take());
        drop(self.sk_msg.take());
        drop(self.sk_skb.take());
        if let Some((control, dir)) = self.pinned.as_mut() {
            // Keep-alive: the sockets stay in the pinned map until they
            // close (taking one out drops the bytes it has not read yet);
            // its messages pass untouched from now on.
            if let Err(e) = control.set(fathom_common::http::control::STOPPED, 1, 0) {
                tracing::warn!(error = %e, "switching off the injection of left sockets");
            }
            let left = self.sockets.keys().filter_map(Result::ok).count();
            if left == 0 {
                remove_pin(dir);
            } else {
                tracing::info!(
                    sockets = left,
                    pin = %dir.display(),
                    "client sockets stay in the pinned sockhash until they close"
                );
            }
        } else {
            let cookies: Vec<u64> = self.sockets.keys().filter_map(Result::ok).collect();
            for cookie in cookies {
                // A socket closed meanwhile has left by itself.
                if let Err(e) = self.sockets.remove(&cookie)
                    && !matches!(&e, MapError::KeyNotFound)
                {
                    tracing::warn!(cookie, error = %e, "removing a socket from CLIENT_SOCKETS");
                }
            }
        }
        tracing::debug!(cgroup = %self.cgroup.display(), "traceparent injection detached");
    }
}

/// Where keep-alive injection pins its sockhashes (one directory per agent
/// run: `client-sockets-PID-SECONDS/{sockets,control}`).
pub const PIN_DIR: &str = "/sys/fs/bpf/fathom";
const PIN_PREFIX: &str = "client-sockets-";

/// Removes the pins of earlier agent runs whose sockets have all closed,
/// and switches off injection on the sockets of the others (an agent that
/// crashed could not). Returns how many pin directories remain.
pub fn collect_pins() -> usize {
    let Ok(entries) = std::fs::read_dir(PIN_DIR) else {
        return 0;
    };
    let mut remaining = 0;
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with(PIN_PREFIX) {
            continue;
        }
        let left = MapData::from_pin(dir.join("sockets"))
            .map_err(|e| e.to_string())
            .and_then(|data| {
                SockHash::<MapData, u64>::try_from(aya::maps::Map::SockHash(data))
                    .map_err(|e| e.to_string())
            })
            .map(|sockets| sockets.keys().filter_map(Result::ok).count());
        match left {
            Ok(0) => remove_pin(&dir),
            Ok(n) => {
                remaining += 1;
                if let Ok(data) = MapData::from_pin(dir.join("control"))
                    && let Ok(mut control) =
                        Array::<MapData, u8>::try_from(aya::maps::Map::Array(data))
                {
                    let _ = control.set(fathom_common::http::control::STOPPED, 1, 0);
                }
                tracing::info!(
                    sockets = n,
                    pin = %dir.display(),
                    "client sockets of an earlier agent run stay pinned until they close"
                );
            }
            Err(e) => {
                remaining += 1;
                tracing::warn!(pin = %dir.display(), error = %e, "reading an earlier pinned sockhash");
            }
        }
    }
    remaining
}

fn remove_pin(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(pin = %dir.display(), error = %e, "removing a pinned sockhash");
    }
}

/// Whether a bpffs is mounted at `/sys/fs/bpf` (from a `/proc/mounts`
/// text).
fn bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_ascii_whitespace();
        fields.next();
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    })
}

/// Pins the sockhash and the control array in a new directory of this run.
fn pin_maps(ebpf: &Ebpf) -> Result<PathBuf, InjectError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(InjectError::Mounts)?;
    if !bpffs_mounted(&mounts) {
        return Err(InjectError::NoBpffs);
    }
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = Path::new(PIN_DIR).join(format!("{PIN_PREFIX}{}-{since_epoch}", std::process::id()));
    let pin_err = |reason: String| InjectError::Pin {
        path: dir.clone(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| pin_err(e.to_string()))?;
    for (map, file) in [(names::SOCKETS, "sockets"), (names::CONTROL, "control")] {
        let pinned = ebpf
            .map(map)
            .ok_or(InjectError::MissingMap(map))
            .and_then(|m| m.pin(dir.join(file)).map_err(|e| pin_err(e.to_string())));
        if let Err(e) = pinned {
            remove_pin(&dir);
            return Err(e);
        }
    }
    Ok(dir)
}

/// Attaches injection to the cgroup v2 root (see [`cgroup2_root`]).
/// `ebpf` is the loaded `fathom-http` object (`crate::ebpf::http_object`),
/// its `HTTP_INJECT` global set; its `CLIENT_SOCKETS` map moves into the
/// returned guard. With `keep_alive`, every request of a kept-alive
/// connection is injected, not only the first (when the kernel takes the
/// stream verdict program; else the first only, logged).
pub fn attach(ebpf: &mut Ebpf, keep_alive: bool) -> Result<Injection, InjectError> {
    let root = cgroup2_root()?;
    attach_to(ebpf, &root, keep_alive)
}

/// Attaches injection with the `sock_ops` program on the cgroup v2
/// directory `cgroup`.
pub fn attach_to(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    keep_alive: bool,
) -> Result<Injection, InjectError> {
    let cgroup_file = File::open(cgroup).map_err(|source| InjectError::OpenCgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let program_err = crate::ebpf::program_err;

    let sk_msg: &mut SkMsg = ebpf
        .program_mut(names::SK_MSG)
        .ok_or(InjectError::MissingProgram(names::SK_MSG))?
        .try_into()
        .map_err(program_err(names::SK_MSG))?;
    if sk_msg.fd().is_err() {
        crate::ebpf::load_program(crate::traces::capture::OBJECT, names::SK_MSG, || {
            sk_msg.load()
        })?;
    }
    let sock_ops: &mut SockOps = ebpf
        .program_mut(names::SOCK_OPS)
        .ok_or(InjectError::MissingProgram(names::SOCK_OPS))?
        .try_into()
        .map_err(program_err(names::SOCK_OPS))?;
    if sock_ops.fd().is_err() {
        crate::ebpf::load_program(crate::traces::capture::OBJECT, names::SOCK_OPS, || {
            sock_ops.load()
        })?;
    }

    // Keep-alive: the sockhash pinned first (it must outlive this agent),
    // after clearing the pins of earlier runs whose sockets all closed.
    let mut keep_alive_failure = None;
    let pin = if keep_alive {
        collect_pins();
        pin_maps(ebpf)
            .map_err(|e| keep_alive_failure = Some(e.to_string()))
            .ok()
    } else {
        None
    };
    let map = ebpf
        .take_map(names::SOCKETS)
        .ok_or(InjectError::MissingMap(names::SOCKETS))?;
    let mut sockets: SockHash<MapData, u64> =
        SockHash::try_from(map).map_err(|source| crate::ebpf::KernelError::Map {
            name: names::SOCKETS,
            source,
        })?;

    // The verdict program first: a socket takes the map's programs when it
    // is added.
    let sk_msg: &mut SkMsg = ebpf
        .program_mut(names::SK_MSG)
        .ok_or(InjectError::MissingProgram(names::SK_MSG))?
        .try_into()
        .map_err(program_err(names::SK_MSG))?;
    let link = sk_msg
        .attach(sockets.fd())
        .map_err(program_err(names::SK_MSG))?;
    let sk_msg_link = sk_msg.take_link(link).map_err(program_err(names::SK_MSG))?;
    // Keep-alive: the receive side's verdict program, then the flag that
    // keeps sockets in the sockhash (never the flag without the program:
    // FIONREAD would answer 0).
    let (sk_skb_link, pinned) = match pin {
        Some(dir) => match attach_verdict(ebpf, &mut sockets) {
            Ok((link, control)) => (Some(link), Some((control, dir))),
            Err(e) => {
                remove_pin(&dir);
                keep_alive_failure = Some(e.to_string());
                (None, None)
            }
        },
        None => (None, None),
    };
    if let Some(e) = &keep_alive_failure {
        tracing::warn!(
            "traceparent injection degraded: only the first request of each client \
             connection is injected, because keep-alive injection could not start: {e}"
        );
    }
    let mut injection = Injection {
        sock_ops: None,
        sk_msg: Some(sk_msg_link),
        keep_alive: sk_skb_link.is_some(),
        keep_alive_failure,
        sk_skb: sk_skb_link,
        pinned,
        sockets,
        cgroup: cgroup.to_path_buf(),
        connect_parent: None,
    };

    let sock_ops: &mut SockOps = ebpf
        .program_mut(names::SOCK_OPS)
        .ok_or(InjectError::MissingProgram(names::SOCK_OPS))?
        .try_into()
        .map_err(program_err(names::SOCK_OPS))?;
    // Attached as a bpf_link, which the kernel always adds next to the
    // cgroup's other programs (another agent's or a CNI's sock_ops keep
    // running); `AllowMultiple` is for the legacy attach and makes
    // link_create fail.
    let link = sock_ops
        .attach(&cgroup_file, CgroupAttachMode::Single)
        .map_err(program_err(names::SOCK_OPS))?;
    injection.sock_ops = Some(
        sock_ops
            .take_link(link)
            .map_err(program_err(names::SOCK_OPS))?,
    );
    injection.connect_parent = attach_connect_parent(ebpf);
    tracing::info!(cgroup = %cgroup.display(), "traceparent injection attached");
    Ok(injection)
}

/// The `inet_sock_set_state` program that remembers, per connecting socket,
/// the parent of its first request (event loops connect in one callback and
/// write in a later one). Without it (no BTF, a kernel that rejects it),
/// those requests get the write-time rule; logged once.
fn attach_connect_parent(ebpf: &mut Ebpf) -> Option<aya::programs::tp_btf::BtfTracePointLink> {
    let name = names::CONNECT_PARENT;
    let result = (|| -> Result<_, String> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        let program: &mut aya::programs::BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or("not in the object")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        crate::ebpf::load_program(crate::traces::capture::OBJECT, name, || {
            program.load("inet_sock_set_state", &btf)
        })
        .map_err(|e| e.to_string())?;
        let link = program.attach().map_err(|e| e.to_string())?;
        program.take_link(link).map_err(|e| e.to_string())
    })();
    match result {
        Ok(link) => Some(link),
        Err(e) => {
            tracing::warn!(
                "client requests on connections an event loop opens while serving may go                  without their parent: {name} could not attach: {e}"
            );
            None
        }
    }
}

/// Loads and attaches the stream verdict program to `sockets`, checks on a
/// loopback connection of its own that a socket in the map still reads
/// right ([`self_test`]), then turns keep-alive on in the kernel
/// (`INJECT_CONTROL`), whose array it returns.
fn attach_verdict(
    ebpf: &mut Ebpf,
    sockets: &mut SockHash<MapData, u64>,
) -> Result<(SkSkbLink, Array<MapData, u8>), InjectError> {
    let program_err = crate::ebpf::program_err;
    let sk_skb: &mut SkSkb = ebpf
        .program_mut(names::SK_SKB)
        .ok_or(InjectError::MissingProgram(names::SK_SKB))?
        .try_into()
        .map_err(program_err(names::SK_SKB))?;
    if sk_skb.fd().is_err() {
        crate::ebpf::load_program(crate::traces::capture::OBJECT, names::SK_SKB, || {
            sk_skb.load()
        })?;
    }
    let link = sk_skb
        .attach(sockets.fd())
        .map_err(program_err(names::SK_SKB))?;
    let link = sk_skb.take_link(link).map_err(program_err(names::SK_SKB))?;
    // On failure the link drops here: detached.
    self_test(sockets).map_err(InjectError::SelfTest)?;
    let map_err = |source| crate::ebpf::KernelError::Map {
        name: names::CONTROL,
        source,
    };
    let mut control: Array<MapData, u8> = Array::try_from(
        ebpf.take_map(names::CONTROL)
            .ok_or(InjectError::MissingMap(names::CONTROL))?,
    )
    .map_err(map_err)?;
    control
        .set(fathom_common::http::control::KEEP_ALIVE, 1, 0)
        .map_err(map_err)?;
    Ok((link, control))
}

/// The key of the self-test's socket in `CLIENT_SOCKETS` (the kernel's keys
/// are socket cookies, which start at 1 and count up).
const SELF_TEST_KEY: u64 = u64::MAX;

/// Keep-alive's promise, checked on this kernel before it is turned on: a
/// client socket in `CLIENT_SOCKETS` reports by `FIONREAD` what waits to be
/// read and reads it byte for byte (the send side is the first-request
/// mode's, unchanged). A loopback connection of the agent's own, put into
/// the map by hand for the test; it writes nothing, so it counts nowhere.
fn self_test(sockets: &mut SockHash<MapData, u64>) -> Result<(), String> {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        os::fd::AsFd,
        time::{Duration, Instant},
    };
    fn io(what: &'static str) -> impl Fn(io::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("listening on loopback"))?;
    let addr = listener.local_addr().map_err(io("listening on loopback"))?;
    let mut client = TcpStream::connect(addr).map_err(io("connecting on loopback"))?;
    let (mut server, _) = listener.accept().map_err(io("accepting on loopback"))?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(io("setting a timeout"))?;
    }
    sockets
        .insert(SELF_TEST_KEY, client.as_raw_fd(), 0)
        .map_err(|e| format!("adding a loopback socket to {}: {e}", names::SOCKETS))?;
    let result = (|| {
        let sent: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
        server
            .write_all(&sent)
            .map_err(io("writing to the socket"))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut waiting = 0;
        while Instant::now() < deadline {
            waiting = crate::sys::fionread(client.as_fd()).map_err(io("FIONREAD"))?;
            if waiting == sent.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if waiting != sent.len() {
            return Err(format!(
                "FIONREAD on a socket in the sockhash says {waiting} bytes wait, {} do",
                sent.len()
            ));
        }
        let mut got = vec![0; sent.len()];
        client
            .read_exact(&mut got)
            .map_err(io("reading the socket"))?;
        if got != sent {
            return Err("a socket in the sockhash read other bytes than were sent".into());
        }
        Ok(())
    })();
    if let Err(e) = sockets.remove(&SELF_TEST_KEY)
        && !matches!(&e, MapError::KeyNotFound)
    {
        tracing::warn!(error = %e, "removing the self-test socket from CLIENT_SOCKETS");
    }
    result
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mounts`.
pub fn cgroup2_root() -> Result<PathBuf, InjectError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(InjectError::Mounts)?;
    cgroup2_mount(&mounts).ok_or(InjectError::NoCgroup2)
}

/// The cgroup v2 mount point in a `/proc/mounts` text: `/sys/fs/cgroup`
/// (unified mode) or `/sys/fs/cgroup/unified` (hybrid mode) when mounted,
/// else the first `cgroup2` mount.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    let found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
        })
        .collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .find_map(|well_known| found.iter().find(|p| p.as_path() == Path::new(well_known)))
        .or_else(|| found.first())
        .cloned()
}

/// Controllers whose cgroup v1 hierarchy may be followed to find a gone
/// process's container, in order of preference (container runtimes put a
/// container's processes in a cgroup of its own on every hierarchy; the
/// name is the kernel's `<name>_cgrp_id`).
pub const CGROUP1_CONTROLLERS: [&str; 7] = [
    "pids", "memory", "cpu", "cpuacct", "cpuset", "devices", "freezer",
];

/// The cgroup v1 hierarchy to follow, from `/proc/self/mounts`.
pub fn cgroup1_root() -> Option<(&'static str, PathBuf)> {
    cgroup1_mount(&std::fs::read_to_string("/proc/self/mounts").ok()?)
}

/// The first controller of [`CGROUP1_CONTROLLERS`] mounted as a cgroup v1
/// hierarchy in a `/proc/mounts` text, with its mount point; `None` on a
/// host with cgroup v2 only.
pub fn cgroup1_mount(mounts: &str) -> Option<(&'static str, PathBuf)> {
    let found: Vec<(PathBuf, Vec<&str>)> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let (_source, target, fstype, options) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            (fstype == "cgroup").then(|| {
                (
                    PathBuf::from(unescape_mount_field(target)),
                    options.split(',').collect(),
                )
            })
        })
        .collect();
    CGROUP1_CONTROLLERS.iter().find_map(|controller| {
        found
            .iter()
            .find(|(_, options)| options.contains(controller))
            .map(|(path, _)| (*controller, path.clone()))
    })
}

/// Undoes the octal escapes (`\040` for a space, ...) of a mounts field.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && octal.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                octal
                    .iter()
                    .fold(0u8, |acc, b| acc.wrapping_mul(8).wrapping_add(b - b'0')),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_mode() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn the_cgroup1_hierarchy_followed() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro,nosuid 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n\
                      cgroup /sys/fs/cgroup/systemd cgroup rw,name=systemd 0 0\n\
                      cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                      cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,pids 0 0\n";
        assert_eq!(
            cgroup1_mount(hybrid),
            Some(("pids", PathBuf::from("/sys/fs/cgroup/pids")))
        );
        // Without pids or memory: the next controller in the list.
        let no_pids: String = hybrid
            .lines()
            .filter(|l| !l.contains("pids"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            cgroup1_mount(&no_pids),
            Some(("cpu", PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")))
        );
        // A named hierarchy (no controller) or v2 only: nothing to follow.
        let named_only: String = hybrid.lines().take(3).map(|l| format!("{l}\n")).collect();
        assert_eq!(cgroup1_mount(&named_only), None);
        assert_eq!(
            cgroup1_mount("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"),
            None
        );
        assert_eq!(cgroup1_mount("cgroup /x cgroup"), None);
    }

    #[test]
    fn hybrid_mode() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs ro,nosuid 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n\
                      cgroup /sys/fs/cgroup/systemd cgroup rw,name=systemd 0 0\n\
                      cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n";
        assert_eq!(
            cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn well_known_mount_wins_over_others() {
        let mounts = "cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n\
                      cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup")));
        let mounts = "cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn no_cgroup2() {
        let mounts = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(cgroup2_mount(mounts), None);
        assert_eq!(cgroup2_mount(""), None);
        // A truncated line is skipped, not a panic.
        assert_eq!(cgroup2_mount("cgroup2 /x"), None);
    }

    #[test]
    fn bpffs() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(bpffs_mounted(mounts));
        assert!(!bpffs_mounted("bpf /mnt/bpf bpf rw 0 0\n"));
        assert!(!bpffs_mounted("tmpfs /sys/fs/bpf tmpfs rw 0 0\n"));
        assert!(!bpffs_mounted("bpf"));
    }

    #[test]
    fn unescape() {
        assert_eq!(unescape_mount_field("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape_mount_field("/a\\09"), "/a\\09");
        assert_eq!(unescape_mount_field("/a\\"), "/a\\");
    }
}
