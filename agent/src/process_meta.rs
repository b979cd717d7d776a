//! What the agent says about a process on its spans and metrics: the OTel
//! resource (`service.name`, `process.*`, `container.id`), read from
//! `/proc`, and the local port of a listening socket.
use std::{fs, path::Path};

/// The resource attributes of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessMeta {
    pub pid: u32,
    /// `OTEL_SERVICE_NAME` from the process's environment, else the
    /// executable's name.
    pub service_name: String,
    /// The executable's file name (`/proc/<pid>/exe`), else `comm`.
    pub executable_name: String,
    /// The container id from the process's cgroup path, when it has one.
    pub container_id: Option<String>,
}

impl ProcessMeta {
    /// Reads a process's metadata under `proc_root` (normally `/proc`).
    /// `None` when the process is gone.
    pub fn read(proc_root: &Path, pid: u32) -> Option<Self> {
        let dir = proc_root.join(pid.to_string());
        let comm = fs::read_to_string(dir.join("comm")).ok()?;
        let exe = fs::read_link(dir.join("exe")).ok();
        let executable_name = executable_name(
            exe.as_ref().map(|p| p.to_string_lossy()).as_deref(),
            comm.trim(),
        );
        let service_name = fs::read(dir.join("environ"))
            .ok()
            .and_then(|env| env_value(&env, "OTEL_SERVICE_NAME"))
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| executable_name.clone());
        let container_id = fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|c| container_id(&c));
        Some(Self {
            pid,
            service_name,
            executable_name,
            container_id,
        })
    }
}

/// A process's executable name: the file name of its `exe` link (without
/// ` (deleted)`), else its `comm`; `unknown` when both are empty. Profiles
/// and spans name a service by it when nothing better is known.
pub fn executable_name(exe: Option<&str>, comm: &str) -> String {
    let name = exe
        .and_then(|e| e.rsplit('/').next())
        .map(|n| n.trim_end_matches(" (deleted)"))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| comm.split('/').next().unwrap_or(comm));
    if name.is_empty() {
        "unknown".into()
    } else {
        name.to_string()
    }
}

/// The value of `name` in a NUL-separated environment block.
pub fn env_value(environ: &[u8], name: &str) -> Option<String> {
    environ.split(|b| *b == 0).find_map(|entry| {
        let rest = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(rest).into_owned())
    })
}

/// The container id in a `/proc/<pid>/cgroup` file: the last 64-hex-digit
/// id in a path component, as container runtimes name their cgroups
/// (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `/docker/<id>`, `/kubepods/.../<id>`).
pub fn container_id(cgroup: &str) -> Option<String> {
    let mut found = None;
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for component in path.split('/') {
            let name = component.strip_suffix(".scope").unwrap_or(component);
            let id = name.rsplit(['-', ':']).next().unwrap_or(name);
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                found = Some(id.to_ascii_lowercase());
            }
        }
    }
    found
}

/// The local port of socket `fd` of process `pid`, from `/proc/<pid>/fd`
/// and the process's `net/tcp{,6}` tables. `None` when it is not a TCP
/// socket or is gone.
pub fn local_port(proc_root: &Path, pid: u32, fd: u32) -> Option<u16> {
    let dir = proc_root.join(pid.to_string());
    let link = fs::read_link(dir.join("fd").join(fd.to_string())).ok()?;
    let inode: u64 = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()?;
    ["net/tcp", "net/tcp6"].iter().find_map(|table| {
        let text = fs::read_to_string(dir.join(table)).ok()?;
        tcp_table_port(&text, inode)
    })
}

/// The local port of the socket with `inode` in a `/proc/net/tcp` table.
pub fn tcp_table_port(text: &str, inode: u64) -> Option<u16> {
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(9)?.parse::<u64>().ok()? != inode {
            return None;
        }
        let port = fields.get(1)?.rsplit(':').next()?;
        u16::from_str_radix(port, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_names() {
        assert_eq!(
            executable_name(Some("/usr/sbin/nginx"), "nginx: worker"),
            "nginx"
        );
        assert_eq!(executable_name(Some("/tmp/spin (deleted)"), "spin"), "spin");
        assert_eq!(executable_name(None, "kworker/0:1"), "kworker");
        assert_eq!(executable_name(None, ""), "unknown");
    }

    #[test]
    fn environment_values() {
        let env = b"PATH=/bin\0OTEL_SERVICE_NAME=checkout\0OTEL_SERVICE_NAME_X=no\0";
        assert_eq!(
            env_value(env, "OTEL_SERVICE_NAME").as_deref(),
            Some("checkout")
        );
        assert_eq!(env_value(env, "HOME"), None);
        assert_eq!(env_value(b"", "PATH"), None);
    }

    #[test]
    fn container_ids_of_runtimes() {
        let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
        for cgroup in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-{id}.scope\n"),
            format!("0::/kubepods.slice/crio-{id}.scope\n"),
            format!("12:memory:/docker/{id}\n1:name=systemd:/docker/{id}\n"),
            format!("0::/kubepods/besteffort/pod1234/{id}\n"),
        ] {
            assert_eq!(container_id(&cgroup).as_deref(), Some(id), "{cgroup}");
        }
        assert_eq!(
            container_id("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(container_id(""), None);
    }

    #[test]
    fn tcp_table() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                    0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 43210 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(tcp_table_port(text, 43210), Some(8080));
        assert_eq!(tcp_table_port(text, 1), None);
    }

    #[test]
    fn this_process() {
        let me = ProcessMeta::read(Path::new("/proc"), std::process::id()).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(!me.executable_name.is_empty());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        use std::os::fd::AsRawFd;
        assert_eq!(
            local_port(
                Path::new("/proc"),
                std::process::id(),
                listener.as_raw_fd() as u32
            ),
            Some(port)
        );
    }
}
