//! Checks, before anything is loaded, that this machine can run the agent,
//! and says exactly what is missing when it cannot.

use std::{fmt, fs, path::Path};

use crate::{ebpf, procfs, sys};

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Everything that stops the agent from running here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Missing(pub Vec<String>);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "fathom-agent cannot run on this machine:")?;
        for m in &self.0 {
            writeln!(f, "  - {m}")?;
        }
        Ok(())
    }
}

/// Runs every check. Warnings (things that degrade results) are logged.
pub fn check() -> Result<(), Missing> {
    let mut missing = Vec::new();
    if let Err(e) = ebpf::object() {
        missing.push(e.to_string());
    }

    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = procfs::parse_cap_eff(&status).unwrap_or(0);
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let root = sys::effective_uid() == 0;
    let privileged = has(CAP_BPF) && has(CAP_PERFMON) || has(CAP_SYS_ADMIN);
    if !privileged {
        missing.push(format!(
            "privileges: running as uid {} without CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); \
             run as root",
            sys::effective_uid()
        ));
    } else if !root {
        for (cap, name, why) in [
            (
                CAP_SYS_PTRACE,
                "CAP_SYS_PTRACE",
                "read other users' /proc/PID/maps",
            ),
            (
                CAP_SYSLOG,
                "CAP_SYSLOG",
                "read kernel addresses in /proc/kallsyms",
            ),
        ] {
            if !has(cap) {
                tracing::warn!("without {name} the agent cannot {why}");
            }
        }
    }

    if !Path::new(BTF_VMLINUX).exists() {
        missing.push(format!(
            "kernel BTF: {BTF_VMLINUX} does not exist (a kernel built with CONFIG_DEBUG_INFO_BTF=y \
             is needed)"
        ));
    }

    // The kernel probes only mean something with privileges.
    if privileged {
        if let Err(e) = sys::probe_bpf_syscall() {
            missing.push(match e.raw_os_error() {
                Some(libc::ENOSYS) => "BPF: the kernel has no bpf() system call \
                                       (CONFIG_BPF_SYSCALL is not set)"
                    .to_owned(),
                Some(libc::EPERM) | Some(libc::EACCES) => format!(
                    "BPF: bpf() was denied ({e}); a security module or container runtime blocks \
                     it"
                ),
                _ => format!("BPF: creating a test map failed: {e}"),
            });
        }
        let cpu = aya::util::online_cpus()
            .ok()
            .and_then(|c| c.first().copied())
            .unwrap_or(0);
        if let Err(e) = sys::probe_perf_cpu_clock(cpu) {
            let paranoid = fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".into());
            missing.push(match e.raw_os_error() {
                Some(libc::ENOSYS) => {
                    "perf events: the kernel has no perf_event_open (CONFIG_PERF_EVENTS)".to_owned()
                }
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EOPNOTSUPP) => {
                    format!("perf events: the software cpu-clock event is not available ({e})")
                }
                _ => format!(
                    "perf events: opening cpu-clock on CPU {cpu} failed ({e}; \
                     kernel.perf_event_paranoid={paranoid})"
                ),
            });
        }
        if let Err(e) = ensure_tracefs() {
            missing.push(e);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Missing(missing))
    }
}

/// Mounts tracefs when it is not mounted (tracepoints are found through it).
pub fn ensure_tracefs() -> Result<(), String> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() {
        return Ok(());
    }
    sys::mount_pseudo_fs("tracefs", Path::new(TRACEFS))
        .map_err(|e| format!("tracefs: not mounted at {TRACEFS} and mounting it failed ({e})"))?;
    tracing::info!("mounted tracefs at {TRACEFS}");
    Ok(())
}
