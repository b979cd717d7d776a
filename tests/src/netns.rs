//! Network namespaces for tests: a "pod" namespace whose veth leads,
//! through a "wire" namespace running `delay_link` (a delay-and-loss relay:
//! this kernel has no netem), to a veth on the node. Removed on drop.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::ChildGuard;

/// Runs a command, panicking on failure; returns stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Node veth `<tag>h` (10.213.N.1) ↔ wire namespace (`delay_link`) ↔ pod
/// namespace veth (10.213.N.2). Removed on drop.
pub struct Topology {
    pub wire: String,
    pub pod: String,
    pub host_if: String,
    pub host_ip: String,
    pub pod_ip: String,
    relay_bin: std::path::PathBuf,
    relay: Option<ChildGuard>,
}

impl Topology {
    pub fn new(tag: &str, subnet: u8, relay_bin: &Path) -> Self {
        let t = Topology {
            wire: format!("fathom-{tag}-w"),
            pod: format!("fathom-{tag}-p"),
            host_if: format!("{tag}h"),
            host_ip: format!("10.213.{subnet}.1"),
            pod_ip: format!("10.213.{subnet}.2"),
            relay_bin: relay_bin.to_path_buf(),
            relay: None,
        };
        let (w1, w2, p) = (format!("{tag}w1"), format!("{tag}w2"), format!("{tag}p"));
        run(&["ip", "netns", "add", &t.wire]);
        run(&["ip", "netns", "add", &t.pod]);
        run(&[
            "ip", "link", "add", &t.host_if, "type", "veth", "peer", "name", &w1, "netns", &t.wire,
        ]);
        run(&[
            "ip", "link", "add", &p, "netns", &t.pod, "type", "veth", "peer", "name", &w2, "netns",
            &t.wire,
        ]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", t.host_ip),
            "dev",
            &t.host_if,
        ]);
        // One segment per packet: the relay forwards frames as they are.
        run(&["ip", "link", "set", &t.host_if, "up", "gso_max_segs", "1"]);
        run(&["ip", "-n", &t.wire, "link", "set", &w1, "up"]);
        run(&["ip", "-n", &t.wire, "link", "set", &w2, "up"]);
        run(&[
            "ip",
            "-n",
            &t.pod,
            "addr",
            "add",
            &format!("{}/24", t.pod_ip),
            "dev",
            &p,
        ]);
        run(&[
            "ip",
            "-n",
            &t.pod,
            "link",
            "set",
            &p,
            "up",
            "gso_max_segs",
            "1",
        ]);
        run(&["ip", "-n", &t.pod, "link", "set", "lo", "up"]);
        t
    }

    /// (Re)starts the relay: frames from the pod are held `delay_us` and
    /// `loss_ppm` per million of them dropped (real-time priority, so the
    /// machine's load does not add to the delay).
    pub fn set_link(&mut self, delay_us: u64, loss_ppm: u32) {
        self.relay = None;
        let tag = self.host_if.trim_end_matches('h');
        let mut relay = ChildGuard::spawn(
            Command::new("ip")
                .args(["netns", "exec", &self.wire, "chrt", "-f", "50"])
                .arg(&self.relay_bin)
                .args([
                    format!("{tag}w1"),
                    format!("{tag}w2"),
                    delay_us.to_string(),
                    loss_ppm.to_string(),
                ])
                .stdout(Stdio::piped()),
        );
        assert_eq!(relay.first_line(), "ready");
        self.relay = Some(relay);
    }

    /// Resolves the pod's MAC address (ARP through the delayed link), so
    /// that the first connection measured does not wait for it.
    pub fn warm_arp(&self) {
        let s = std::net::UdpSocket::bind((self.host_ip.as_str(), 0)).unwrap();
        s.send_to(b"arp", (self.pod_ip.as_str(), 9)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }

    /// dnsmasq in the pod namespace on the pod's address: `ok.fathom.test`
    /// answers 10.9.9.9, any other name under `fathom.test` is NXDOMAIN.
    pub fn dnsmasq(&self, pid_file: &Path) -> ChildGuard {
        let mut dnsmasq = self.in_pod("dnsmasq");
        dnsmasq
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--bind-interfaces",
                &format!("--listen-address={}", self.pod_ip),
                "--address=/ok.fathom.test/10.9.9.9",
                "--local=/fathom.test/",
            ])
            .arg(format!("--pid-file={}", pid_file.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let guard = ChildGuard::spawn(&mut dnsmasq);
        std::thread::sleep(Duration::from_millis(500));
        guard
    }

    /// A command run in the pod namespace.
    pub fn in_pod(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.pod, program]);
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.relay = None;
        for ns in [&self.pod, &self.wire] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}
