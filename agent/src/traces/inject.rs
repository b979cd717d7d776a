//! `traceparent` injection: attaches the `fathom-http` object's `sock_ops`
//! program to the cgroup v2 root and its `sk_msg` program to the
//! `CLIENT_SOCKETS` sockhash (see `fathom_common::http`).
//!
//! [`attach`] returns an [`Injection`] guard; dropping it detaches both
//! programs and takes every socket out of the sockhash, so the kernel stops
//! running `sk_msg` on them (a socket keeps the programs of the maps it is
//! in, even after they are detached from the map).
//!
//! The cgroup v2 root is found in `/proc/self/mounts`. Inside a cgroup
//! namespace that is the namespace's root: only its processes are covered.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{MapData, MapError, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps, sk_msg::SkMsgLink},
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
    #[error(transparent)]
    Kernel(#[from] crate::ebpf::KernelError),
}

crate::wraps_kernel_error!(InjectError);

/// The attached injection programs. Dropping it detaches them.
pub struct Injection {
    sock_ops: Option<aya::programs::sock_ops::SockOpsLink>,
    sk_msg: Option<SkMsgLink>,
    sockets: SockHash<MapData, u64>,
    cgroup: PathBuf,
}

impl Injection {
    /// The cgroup the `sock_ops` program is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
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
        // here on, then the sockets already in (they keep the program
        // until they leave the map).
        drop(self.sock_ops.take());
        drop(self.sk_msg.take());
        let cookies: Vec<u64> = self.sockets.keys().filter_map(Result::ok).collect();
        for cookie in cookies {
            // A socket closed meanwhile has left by itself.
            if let Err(e) = self.sockets.remove(&cookie)
                && !matches!(&e, MapError::KeyNotFound)
            {
                tracing::warn!(cookie, error = %e, "removing a socket from CLIENT_SOCKETS");
            }
        }
        tracing::debug!(cgroup = %self.cgroup.display(), "traceparent injection detached");
    }
}

/// Attaches injection to the cgroup v2 root (see [`cgroup2_root`]).
/// `ebpf` is the loaded `fathom-http` object (`crate::ebpf::http_object`),
/// its `HTTP_INJECT` global set; its `CLIENT_SOCKETS` map moves into the
/// returned guard.
pub fn attach(ebpf: &mut Ebpf) -> Result<Injection, InjectError> {
    let root = cgroup2_root()?;
    attach_to(ebpf, &root)
}

/// Attaches injection with the `sock_ops` program on the cgroup v2
/// directory `cgroup`.
pub fn attach_to(ebpf: &mut Ebpf, cgroup: &Path) -> Result<Injection, InjectError> {
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

    let map = ebpf
        .take_map(names::SOCKETS)
        .ok_or(InjectError::MissingMap(names::SOCKETS))?;
    let sockets: SockHash<MapData, u64> =
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
    let mut injection = Injection {
        sock_ops: None,
        sk_msg: Some(sk_msg_link),
        sockets,
        cgroup: cgroup.to_path_buf(),
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
    tracing::info!(cgroup = %cgroup.display(), "traceparent injection attached");
    Ok(injection)
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
    fn unescape() {
        assert_eq!(unescape_mount_field("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape_mount_field("/a\\09"), "/a\\09");
        assert_eq!(unescape_mount_field("/a\\"), "/a\\");
    }
}
