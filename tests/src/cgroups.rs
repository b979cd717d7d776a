//! Real cgroups for tests: where the hierarchies are mounted, directories
//! named the way container runtimes name them (removed by a guard), and
//! workloads started inside them.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::ChildGuard;

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid system).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

/// Where a cgroup v1 hierarchy with `controller` is mounted, if any.
pub fn cgroup1_root(controller: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup") && f.get(3)?.split(',').any(|o| o == controller))
            .then(|| PathBuf::from(f[1]))
    })
}

/// Cgroup directories this test made; on drop every process still in one
/// goes back to its hierarchy's root, then they are removed, deepest first.
#[derive(Default)]
pub struct Cgroups(Vec<(PathBuf, PathBuf)>);

impl Cgroups {
    /// Creates `root/rel` (every missing component) and returns it.
    pub fn create(&mut self, root: &Path, rel: &str) -> PathBuf {
        let mut dir = root.to_path_buf();
        for part in rel.split('/') {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                self.0.push((root.to_path_buf(), dir.clone()));
            }
        }
        dir
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for (root, dir) in self.0.iter().rev() {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                let _ = std::fs::write(root.join("cgroup.procs"), pid);
            }
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("removing cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// `program args` started inside `cgroup` (it moves itself in, then execs).
pub fn spawn_in(
    cgroup: Option<&Path>,
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> ChildGuard {
    let mut cmd = match cgroup {
        Some(cg) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0" && exec "$@""#)
                .arg(cg.join("cgroup.procs"))
                .arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_remove("OTEL_SERVICE_NAME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    ChildGuard::spawn(&mut cmd)
}
