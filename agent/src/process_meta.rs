//! What the agent says about a process on its profiles, spans and metrics:
//! the OTel resource (`service.name`, `process.*`, `container.id`, and the
//! pod's `k8s.*` when the Kubernetes metadata module runs), read from
//! `/proc`, and the local port of a listening socket.
use crate::otlp::ResourceInfo;
use std::{fs, path::Path, sync::Arc};

use crate::k8s::{self, ContainerMeta};

/// What the kernel saw of a process at its first connection
/// (`fathom_common::http::ProcessInfo`): what names it once it has left
/// `/proc` (a short-lived client).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelProcess {
    /// `comm` (at most 15 bytes).
    pub comm: String,
    /// Its cgroup v2 directory's inode number (0: unknown).
    pub cgroup_id: u64,
    /// Its directory's inode number on the cgroup v1 hierarchy the agent
    /// follows (0: unknown, or no v1 hierarchy).
    pub cgroup1_id: u64,
    /// `OTEL_SERVICE_NAME` from the start of its environment block.
    pub otel_service_name: Option<String>,
}

impl KernelProcess {
    /// From the kernel's record fields.
    pub fn new(comm: &[u8], cgroup_id: u64, environ: &[u8]) -> Self {
        Self {
            comm: String::from_utf8_lossy(comm).into_owned(),
            cgroup_id,
            cgroup1_id: 0,
            otel_service_name: env_value(environ, "OTEL_SERVICE_NAME").filter(|v| !v.is_empty()),
        }
    }
}

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
    /// `OTEL_SERVICE_NAME` from the process's environment, when set.
    pub otel_service_name: Option<String>,
}

impl ProcessMeta {
    /// Reads a process's metadata under `proc_root` (normally `/proc`).
    /// `None` when the process is gone.
    pub fn read(proc_root: &Path, pid: u32) -> Option<Self> {
        let dir = proc_root.join(pid.to_string());
        // The cgroup first: a short-lived process (a curl) may be exiting
        // while it is read, and its container is what its resource cannot
        // do without.
        let cgroup = fs::read_to_string(dir.join("cgroup")).ok();
        let comm = fs::read_to_string(dir.join("comm")).ok()?;
        let exe = fs::read_link(dir.join("exe")).ok();
        let executable_name = executable_name(
            exe.as_ref().map(|p| p.to_string_lossy()).as_deref(),
            comm.trim(),
        );
        let otel_service_name = fs::read(dir.join("environ"))
            .ok()
            .and_then(|env| env_value(&env, "OTEL_SERVICE_NAME"))
            .filter(|v| !v.is_empty());
        let service_name = otel_service_name
            .clone()
            .unwrap_or_else(|| executable_name.clone());
        let container_id = cgroup.and_then(|c| container_id(&c));
        Some(Self {
            pid,
            service_name,
            executable_name,
            container_id,
            otel_service_name,
        })
    }

    /// The metadata of a process from what the kernel saw of it (`/proc`
    /// no longer has it): `comm` for the executable's name,
    /// `OTEL_SERVICE_NAME` from its environment, and `container_id` (found
    /// by the caller from its cgroup id, see [`container_of_cgroup_id`]).
    pub fn from_kernel(pid: u32, k: &KernelProcess, container_id: Option<String>) -> Self {
        let executable_name = executable_name(None, &k.comm);
        Self {
            pid,
            service_name: k
                .otel_service_name
                .clone()
                .unwrap_or_else(|| executable_name.clone()),
            executable_name,
            container_id,
            otel_service_name: k.otel_service_name.clone(),
        }
    }

    /// Fills in the environment a `/proc` read of an exiting process
    /// missed (`/proc/<pid>/environ` is empty once its memory is gone)
    /// from what the kernel saw. (The container needs nothing: the cgroup
    /// file is read first, and a process that far gone has no `/proc`
    /// entry to read at all.)
    pub fn complete_with(&mut self, k: &KernelProcess) {
        if self.otel_service_name.is_none()
            && let Some(name) = &k.otel_service_name
        {
            self.otel_service_name = Some(name.clone());
            self.service_name = name.clone();
        }
    }

    /// The process's container in the pod metadata, when the Kubernetes
    /// module runs and knows it (a cache lookup, never a request).
    pub fn pod(&self) -> Option<Arc<ContainerMeta>> {
        k8s::lookup(self.container_id.as_deref()?)
    }

    /// `service.name` with what is known of the pod: `OTEL_SERVICE_NAME`
    /// from the process's environment, else the pod's
    /// `app.kubernetes.io/name` label, else its owner workload's name, else
    /// the executable's name.
    pub fn service_name_in(&self, pod: Option<&ContainerMeta>) -> String {
        self.otel_service_name
            .clone()
            .or_else(|| pod.and_then(|p| p.service_name()).map(str::to_string))
            .unwrap_or_else(|| self.executable_name.clone())
    }

    /// The string resource attributes of this process, OTel spelling:
    /// `service.name` (see [`Self::service_name_in`]),
    /// `process.executable.name`, `container.id` and, when the pod is
    /// known, `k8s.pod.name`, `k8s.pod.uid`, `k8s.namespace.name`,
    /// `k8s.container.name`, `k8s.node.name` and `k8s.<owner kind>.name`.
    /// (`process.pid` is an integer: `self.pid`.)
    pub fn resource_attributes(&self) -> Vec<(&'static str, String)> {
        let pod = self.pod();
        let mut out = vec![
            ("service.name", self.service_name_in(pod.as_deref())),
            ("process.executable.name", self.executable_name.clone()),
        ];
        if let Some(id) = &self.container_id {
            out.push(("container.id", id.clone()));
        }
        if let Some(pod) = &pod {
            out.extend(pod.otel_attributes());
        }
        out
    }

    /// The labels of this process's profile series, Pyroscope spelling:
    /// `service_name`, `node` (the pod's node, else `node`), and when known
    /// `container_id`, `namespace`, `pod`, `container` and the owner as
    /// `k8s_<kind>_name` (the Prometheus spelling of the OTel attribute).
    pub fn pyroscope_labels(&self, node: &str) -> Vec<(String, String)> {
        let pod = self.pod();
        pyroscope_labels(self, pod.as_deref(), node)
    }
}

/// [`ProcessMeta::pyroscope_labels`] with the pod given.
pub fn pyroscope_labels(
    meta: &ProcessMeta,
    pod: Option<&ContainerMeta>,
    node: &str,
) -> Vec<(String, String)> {
    let node = pod
        .map(|p| p.node_name.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or(node);
    let mut out = vec![
        ("service_name".to_string(), meta.service_name_in(pod)),
        ("node".to_string(), node.to_string()),
    ];
    if let Some(id) = &meta.container_id {
        out.push(("container_id".into(), id.clone()));
    }
    if let Some(p) = pod {
        out.push(("namespace".into(), p.namespace.clone()));
        out.push(("pod".into(), p.pod_name.clone()));
        out.push(("container".into(), p.container_name.clone()));
        if let Some(owner) = &p.owner
            && let Some(key) = owner.otel_attribute()
        {
            out.push((key.replace('.', "_"), owner.name.clone()));
        }
    }
    out.retain(|(_, v)| !v.is_empty());
    out
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

/// The container id in a `/proc/<pid>/cgroup` file (cgroup v1 lines
/// `N:controllers:/path`, v2 line `0::/path`): the last 64-hex-digit id in
/// a path component, as container runtimes name their cgroups — systemd
/// driver `docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope` (under `kubepods-<qos>-pod<uid>.slice`), cgroupfs
/// driver `/docker/<id>`, `/kubepods/<qos>/pod<uid>/<id>`. The innermost
/// one wins (a container in a container). Lower-case, as the API server
/// reports ids.
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

/// The container id of the cgroup v2 directory whose inode number is `id`
/// (what `bpf_get_current_cgroup_id` returns), found under `root` (the
/// cgroup2 mount); `None` when no directory has it or its path names no
/// container. Walks the hierarchy: called only for processes gone from
/// `/proc`.
pub fn container_of_cgroup_id(root: &Path, id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    if id == 0 {
        return None;
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // `file_type` does not follow links: cgroupfs has none, and a
            // link could lead the walk in circles.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.metadata().is_ok_and(|m| m.ino() == id) {
                let relative = path.strip_prefix(root).ok()?;
                return container_id(&format!("0::/{}", relative.display()));
            }
            stack.push(path);
        }
    }
    None
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

/// The OTel resource of a process's spans and metrics: `service.name`
/// (`OTEL_SERVICE_NAME`, else the pod's `app.kubernetes.io/name`, else its
/// owner workload, else the executable), `process.pid`,
/// `process.executable.name`, `container.id`, `host.name`, and the pod's
/// `k8s.*` attributes when the Kubernetes metadata knows the container.
/// `None` (the process is gone): `unknown_service` with the pid.
pub fn process_resource(meta: Option<&ProcessMeta>, pid: u32, node: &str) -> ResourceInfo {
    let mut extra = vec![("host.name".to_string(), node.to_string())];
    match meta {
        Some(m) => {
            let pod = m.pod();
            if let Some(pod) = &pod {
                extra.extend(
                    pod.otel_attributes()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v)),
                );
            }
            ResourceInfo {
                service_name: m.service_name_in(pod.as_deref()),
                pid: Some(pid),
                executable_name: Some(m.executable_name.clone()),
                container_id: m.container_id.clone(),
                extra,
            }
        }
        None => ResourceInfo {
            service_name: "unknown_service".into(),
            pid: Some(pid),
            executable_name: None,
            container_id: None,
            extra,
        },
    }
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
    fn a_gone_process_is_named_from_what_the_kernel_saw() {
        // A cgroup tree as runtimes name it; the "kernel" cgroup id is the
        // container directory's inode number, as bpf_get_current_cgroup_id
        // gives it on cgroup v2.
        use std::os::unix::fs::MetadataExt as _;
        let root = tempfile::tempdir().unwrap();
        let id = "4f3c".repeat(16);
        let scope = root
            .path()
            .join("system.slice")
            .join(format!("docker-{id}.scope"));
        fs::create_dir_all(&scope).unwrap();
        fs::create_dir_all(root.path().join("user.slice/user-0.slice")).unwrap();
        let ino = fs::metadata(&scope).unwrap().ino();
        assert_eq!(container_of_cgroup_id(root.path(), ino), Some(id.clone()));
        let slice_ino = fs::metadata(root.path().join("system.slice"))
            .unwrap()
            .ino();
        assert_eq!(container_of_cgroup_id(root.path(), slice_ino), None);
        assert_eq!(container_of_cgroup_id(root.path(), 0), None);
        assert_eq!(container_of_cgroup_id(root.path(), u64::MAX), None);

        let env = b"HOME=/root\0OTEL_SERVICE_NAME=checkout-cli\0PATH=/bin\0";
        let k = KernelProcess::new(b"curl", ino, env);
        assert_eq!(k.otel_service_name.as_deref(), Some("checkout-cli"));
        let m = ProcessMeta::from_kernel(7, &k, Some(id.clone()));
        assert_eq!(m.service_name, "checkout-cli");
        assert_eq!(m.executable_name, "curl");
        assert_eq!(m.container_id.as_deref(), Some(id.as_str()));
        // Without a service name in the environment (or cut off in the
        // kernel's copy): the executable names the service.
        let k = KernelProcess::new(b"curl", 0, b"HOME=/root\0OTEL_SERVICE_NA");
        let m = ProcessMeta::from_kernel(7, &k, None);
        assert_eq!((m.service_name.as_str(), m.container_id), ("curl", None));

        // A /proc read of an exiting process (environment already empty,
        // cgroup file read): only what it missed is taken from the kernel.
        let mut read = ProcessMeta {
            pid: 7,
            service_name: "curl".into(),
            executable_name: "curl".into(),
            container_id: Some("a".repeat(64)),
            otel_service_name: None,
        };
        read.complete_with(&KernelProcess::new(b"curl", ino, env));
        assert_eq!(read.service_name, "checkout-cli");
        assert_eq!(read.otel_service_name.as_deref(), Some("checkout-cli"));
        assert_eq!(read.container_id, Some("a".repeat(64)));
        // What /proc had wins.
        let mut read = ProcessMeta {
            otel_service_name: Some("from-proc".into()),
            service_name: "from-proc".into(),
            container_id: None,
            ..read
        };
        read.complete_with(&KernelProcess::new(b"curl", ino, env));
        assert_eq!(read.service_name, "from-proc");
        assert_eq!(read.container_id, None);
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
            // systemd driver, cgroup v2, as the kubelet names pod slices.
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod0f3a2b1c_4d5e_6f70_8192_a3b4c5d6e7f8.slice/\
                 cri-containerd-{id}.scope\n"
            ),
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod0f3a2b1c_4d5e_6f70_8192_a3b4c5d6e7f8.slice/crio-{id}.scope\n"
            ),
            // cgroupfs driver, cgroup v1 (every hierarchy names it).
            format!(
                "12:pids:/kubepods/burstable/pod0f3a2b1c-4d5e-6f70-8192-a3b4c5d6e7f8/{id}\n\
                 4:cpu,cpuacct:/kubepods/burstable/pod0f3a2b1c-4d5e-6f70-8192-a3b4c5d6e7f8/{id}\n\
                 1:name=systemd:/kubepods/burstable/pod0f3a2b1c-4d5e-6f70-8192-a3b4c5d6e7f8/{id}\n\
                 0::/\n"
            ),
            // Upper case (some tools print it) is normalized.
            format!(
                "0::/system.slice/docker-{}.scope\n",
                id.to_ascii_uppercase()
            ),
        ] {
            assert_eq!(container_id(&cgroup).as_deref(), Some(id), "{cgroup}");
        }
        assert_eq!(
            container_id("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(container_id(""), None);
        // A pod slice alone (no container scope yet) names no container.
        assert_eq!(
            container_id(
                "0::/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod0f3a2b1c_4d5e_6f70_8192_a3b4c5d6e7f8.slice\n"
            ),
            None
        );
        // 63 or 65 hex digits are not a container id.
        assert_eq!(
            container_id(&format!("0::/docker-{}.scope\n", &id[1..])),
            None
        );
        assert_eq!(container_id(&format!("0::/docker-{id}0.scope\n")), None);
        // A container in a container: the innermost.
        let inner = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            container_id(&format!("0::/docker/{id}/docker/{inner}\n")).as_deref(),
            Some(inner)
        );
    }

    fn meta(otel: Option<&str>, container: Option<&str>) -> ProcessMeta {
        ProcessMeta {
            pid: 7,
            service_name: otel.unwrap_or("server").into(),
            executable_name: "server".into(),
            container_id: container.map(str::to_string),
            otel_service_name: otel.map(str::to_string),
        }
    }

    fn pod(app: Option<&str>, owner: Option<(&str, &str)>) -> ContainerMeta {
        ContainerMeta {
            container_id: "c1".into(),
            pod_name: "web-abc-x".into(),
            pod_uid: "u".into(),
            namespace: "shop".into(),
            container_name: "app".into(),
            node_name: "node-1".into(),
            init: false,
            owner: owner.map(|(kind, name)| crate::k8s::Owner {
                kind: kind.into(),
                name: name.into(),
            }),
            app_name: app.map(str::to_string),
        }
    }

    #[test]
    fn service_name_rule() {
        let web = Some(("Deployment", "web"));
        let p = pod(Some("storefront"), web);
        assert_eq!(
            meta(Some("checkout"), None).service_name_in(Some(&p)),
            "checkout"
        );
        assert_eq!(meta(None, None).service_name_in(Some(&p)), "storefront");
        assert_eq!(
            meta(None, None).service_name_in(Some(&pod(None, web))),
            "web"
        );
        assert_eq!(
            meta(None, None).service_name_in(Some(&pod(Some(""), web))),
            "web"
        );
        assert_eq!(
            meta(None, None).service_name_in(Some(&pod(None, None))),
            "server"
        );
        assert_eq!(meta(None, None).service_name_in(None), "server");
    }

    #[test]
    fn profile_labels() {
        let m = meta(None, Some("c1"));
        let p = pod(None, Some(("StatefulSet", "db")));
        let labels = |pod| -> Vec<(String, String)> { pyroscope_labels(&m, pod, "host-a") };
        let own = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            labels(Some(&p)),
            own(&[
                ("service_name", "db"),
                ("node", "node-1"),
                ("container_id", "c1"),
                ("namespace", "shop"),
                ("pod", "web-abc-x"),
                ("container", "app"),
                ("k8s_statefulset_name", "db"),
            ])
        );
        assert_eq!(
            labels(None),
            own(&[
                ("service_name", "server"),
                ("node", "host-a"),
                ("container_id", "c1")
            ])
        );
        // Outside Kubernetes nothing is installed: no pod, the cgroup's id.
        assert!(m.pod().is_none());
        let attrs = m.resource_attributes();
        assert_eq!(
            attrs,
            [
                ("service.name", "server".to_string()),
                ("process.executable.name", "server".into()),
                ("container.id", "c1".into()),
            ]
        );
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
