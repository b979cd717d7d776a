//! Kernel struct member offsets from the kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for eBPF programs that read kernel memory
//! with `bpf_probe_read_kernel` (no CO-RE relocation in aya's programs: the
//! loader sets the offsets as globals).
//!
//! Members are found through anonymous struct and union members (most of
//! `struct sock_common` is in nested anonymous unions), and through
//! typedefs and qualifiers on the way.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use btf_rs::{Btf, Type};
use fathom_common::http::SockOffsets;

/// The running kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading kernel BTF {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF: {strukt}.{member} is not a struct or union")]
    NotAggregate { strukt: String, member: String },
    #[error("kernel BTF: {strukt}.{member} is a bit field")]
    BitField { strukt: String, member: String },
    #[error("kernel BTF: offset of {strukt}.{member} does not fit 32 bits")]
    TooFar { strukt: String, member: String },
    #[error("kernel BTF: {0}")]
    Malformed(String),
}

/// The running kernel's BTF while the agent starts: every signal reads
/// offsets from it, and each parse of `/sys/kernel/btf/vmlinux` costs about
/// 130 ms and 27 MB (6.18), so it is parsed once and shared, then let go by
/// [`release`] once the signals have started.
static KERNEL: Mutex<Option<Arc<KernelBtf>>> = Mutex::new(None);

/// The running kernel's BTF ([`VMLINUX`]), parsed at the first call and
/// shared until [`release`]. A failure is not kept: the next call tries
/// again.
pub fn kernel() -> Result<Arc<KernelBtf>, BtfError> {
    // A poisoned lock only means a panic elsewhere; the slot stays valid.
    let mut slot = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(btf) = &*slot {
        return Ok(btf.clone());
    }
    let btf = Arc::new(KernelBtf::open(Path::new(VMLINUX))?);
    *slot = Some(btf.clone());
    Ok(btf)
}

/// Lets go of the shared BTF (a later [`kernel`] parses it again).
pub fn release() {
    KERNEL.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// A parsed BTF object.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    /// Parses a BTF file (`/sys/kernel/btf/vmlinux`).
    pub fn open(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|e| BtfError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self { btf })
    }

    /// Byte offset of `path` (members separated by `.`, anonymous members
    /// crossed implicitly) from the start of `struct strukt`.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut members = self.struct_members(strukt)?;
        let mut bits: u64 = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let no_member = || BtfError::NoMember {
                strukt: strukt.into(),
                member: path.into(),
            };
            let (offset, member) = self.find(&members, part, 0)?.ok_or_else(no_member)?;
            if member.bitfield_size().is_some_and(|n| n != 0) {
                return Err(BtfError::BitField {
                    strukt: strukt.into(),
                    member: path.into(),
                });
            }
            bits += offset;
            if parts.peek().is_some() {
                members = self
                    .aggregate(&self.member_type(&member)?)?
                    .ok_or_else(|| BtfError::NotAggregate {
                        strukt: strukt.into(),
                        member: part.into(),
                    })?;
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::BitField {
                strukt: strukt.into(),
                member: path.into(),
            });
        }
        u32::try_from(bits / 8).map_err(|_| BtfError::TooFar {
            strukt: strukt.into(),
            member: path.into(),
        })
    }

    /// The value of `member` of the enum named `name`.
    pub fn enum_value(&self, name: &str, member: &str) -> Result<u64, BtfError> {
        let no_member = || BtfError::NoMember {
            strukt: format!("enum {name}"),
            member: member.into(),
        };
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| BtfError::NoStruct(format!("enum {name}")))?;
        for t in types {
            let found = match t {
                Type::Enum(e) => e.members.iter().find_map(|m| {
                    (self.btf.resolve_name(m).ok()? == member).then(|| u64::from(m.val()))
                }),
                Type::Enum64(e) => e
                    .members
                    .iter()
                    .find_map(|m| (self.btf.resolve_name(m).ok()? == member).then(|| m.val())),
                _ => continue,
            };
            return found.ok_or_else(no_member);
        }
        Err(BtfError::NoStruct(format!("enum {name}")))
    }

    /// Whether the kernel has a typedef named `name` (`btf_trace_<tp>`: a
    /// tracepoint that BTF tracepoint programs can attach to).
    pub fn has_typedef(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(name)
            .is_ok_and(|types| types.iter().any(|t| matches!(t, Type::Typedef(_))))
    }

    /// The members of the (complete) struct named `name`.
    fn struct_members(&self, name: &str) -> Result<Vec<btf_rs::Member>, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| BtfError::NoStruct(name.into()))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if s.size() > 0 => Some(s.members),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct(name.into()))
    }

    /// The member named `name` among `members` or inside their anonymous
    /// struct/union members (depth-limited), with its bit offset from the
    /// start of `members`' aggregate.
    fn find(
        &self,
        members: &[btf_rs::Member],
        name: &str,
        depth: u32,
    ) -> Result<Option<(u64, btf_rs::Member)>, BtfError> {
        for m in members {
            let m_name = self
                .btf
                .resolve_name(m)
                .map_err(|e| BtfError::Malformed(e.to_string()))?;
            if m_name == name {
                return Ok(Some((u64::from(m.bit_offset()), m.clone())));
            }
            if m_name.is_empty()
                && depth < 8
                && let Some(inner) = self.aggregate(&self.member_type(m)?)?
                && let Some((off, found)) = self.find(&inner, name, depth + 1)?
            {
                return Ok(Some((u64::from(m.bit_offset()) + off, found)));
            }
        }
        Ok(None)
    }

    fn member_type(&self, m: &btf_rs::Member) -> Result<Type, BtfError> {
        self.btf
            .resolve_chained_type(m)
            .map_err(|e| BtfError::Malformed(e.to_string()))
    }

    /// The members of a struct or union type, through typedefs and
    /// qualifiers; `None` for any other type.
    fn aggregate(&self, t: &Type) -> Result<Option<Vec<btf_rs::Member>>, BtfError> {
        let mut t = t.clone();
        for _ in 0..16 {
            t = match t {
                Type::Struct(s) | Type::Union(s) => return Ok(Some(s.members)),
                Type::Typedef(ref x) => self.chained(x)?,
                Type::Const(ref x) => self.chained(x)?,
                Type::Volatile(ref x) => self.chained(x)?,
                Type::Restrict(ref x) => self.chained(x)?,
                Type::TypeTag(ref x) => self.chained(x)?,
                _ => return Ok(None),
            };
        }
        Ok(None)
    }

    fn chained<T: btf_rs::BtfType>(&self, x: &T) -> Result<Type, BtfError> {
        self.btf
            .resolve_chained_type(x)
            .map_err(|e| BtfError::Malformed(e.to_string()))
    }
}

/// Offset of `sock_common.member` from a `struct sock` pointer.
pub fn sock_member(btf: &KernelBtf, member: &str) -> Result<u32, BtfError> {
    Ok(btf.member_offset("sock", "__sk_common")? + btf.member_offset("sock_common", member)?)
}

/// Offset of `tcp_sock.member` from the `struct sock` pointer of the same
/// socket.
pub fn tcp_sock_member(btf: &KernelBtf, member: &str) -> Result<u32, BtfError> {
    let base = btf.member_offset("tcp_sock", "inet_conn.icsk_inet.sk")?;
    btf.member_offset("tcp_sock", member)?
        .checked_sub(base)
        .ok_or_else(|| BtfError::Malformed(format!("tcp_sock.{member} before its sock")))
}

/// The network programs' `NET_SK_*` globals (`fathom_common::net::globals`):
/// (global, offset from the `struct sock` pointer).
pub fn net_sock_offsets(btf: &KernelBtf) -> Result<Vec<(&'static str, u32)>, BtfError> {
    use fathom_common::net::globals as g;
    Ok(vec![
        (g::SK_FAMILY, sock_member(btf, "skc_family")?),
        (g::SK_RCV_SADDR, sock_member(btf, "skc_rcv_saddr")?),
        (g::SK_DADDR, sock_member(btf, "skc_daddr")?),
        (g::SK_NUM, sock_member(btf, "skc_num")?),
        (g::SK_DPORT, sock_member(btf, "skc_dport")?),
        (g::SK_V6_RCV_SADDR, sock_member(btf, "skc_v6_rcv_saddr")?),
        (g::SK_V6_DADDR, sock_member(btf, "skc_v6_daddr")?),
        (g::SK_SRTT_US, tcp_sock_member(btf, "srtt_us")?),
    ])
}

/// The `SockOffsets` members that read a task's cgroup on the v1 hierarchy
/// of `controller` (`pids`, ...: `<controller>_cgrp_id` in the kernel):
/// (`task_cgroups`, `css_set_subsys`, `css_cgroup`, `cgroup_kn`,
/// `kernfs_node_id`).
pub fn cgroup1_offsets(btf: &KernelBtf, controller: &str) -> Result<[u32; 5], BtfError> {
    let id = btf.enum_value("cgroup_subsys_id", &format!("{controller}_cgrp_id"))?;
    let count = btf.enum_value("cgroup_subsys_id", "CGROUP_SUBSYS_COUNT")?;
    if id >= count {
        return Err(BtfError::Malformed(format!(
            "{controller}_cgrp_id {id} is not below CGROUP_SUBSYS_COUNT {count}"
        )));
    }
    let subsys = u64::from(btf.member_offset("css_set", "subsys")?) + 8 * id;
    Ok([
        btf.member_offset("task_struct", "cgroups")?,
        u32::try_from(subsys).map_err(|_| BtfError::TooFar {
            strukt: "css_set".into(),
            member: format!("subsys[{id}]"),
        })?,
        btf.member_offset("cgroup_subsys_state", "cgroup")?,
        btf.member_offset("cgroup", "kn")?,
        btf.member_offset("kernfs_node", "id")?,
    ])
}

/// The offsets the HTTP capture needs to read a connection's socket
/// (`fathom_common::http::SockOffsets`), `enabled` set.
pub fn sock_offsets(btf: &KernelBtf) -> Result<SockOffsets, BtfError> {
    // `struct sock` starts with `__sk_common`, `struct tcp_sock` with its
    // `inet_connection_sock` → `inet_sock` → `sock`: offsets below are
    // from the `struct sock` pointer, taken through those paths so that a
    // kernel where they are not at 0 is still right.
    let skc = |member: &str| sock_member(btf, member);
    let tcp = |member: &str| tcp_sock_member(btf, member);
    // Optional: without them a process's environment does not go with its
    // first connection (`task_mm == 0`); sockets are read all the same.
    let env = || -> Result<_, BtfError> {
        Ok((
            btf.member_offset("task_struct", "mm")?,
            btf.member_offset("mm_struct", "env_start")?,
            btf.member_offset("mm_struct", "env_end")?,
        ))
    };
    let (task_mm, mm_env_start, mm_env_end) = env().unwrap_or((0, 0, 0));
    // Optional too: without them the calling thread's name is taken.
    let comm = || -> Result<_, BtfError> {
        Ok((
            btf.member_offset("task_struct", "group_leader")?,
            btf.member_offset("task_struct", "comm")?,
        ))
    };
    let (task_group_leader, task_comm) = comm().unwrap_or((0, 0));
    Ok(SockOffsets {
        enabled: 1,
        task_files: btf.member_offset("task_struct", "files")?,
        files_fdt: btf.member_offset("files_struct", "fdt")?,
        fdt_fd: btf.member_offset("fdtable", "fd")?,
        fdt_max_fds: btf.member_offset("fdtable", "max_fds")?,
        file_private_data: btf.member_offset("file", "private_data")?,
        socket_sk: btf.member_offset("socket", "sk")?,
        skc_family: skc("skc_family")?,
        skc_rcv_saddr: skc("skc_rcv_saddr")?,
        skc_num: skc("skc_num")?,
        skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
        tcp_srtt_us: tcp("srtt_us")?,
        tcp_total_retrans: tcp("total_retrans")?,
        skc_daddr: skc("skc_daddr")?,
        skc_dport: skc("skc_dport")?,
        skc_v6_daddr: skc("skc_v6_daddr")?,
        sk_protocol: btf.member_offset("sock", "sk_protocol")?,
        task_mm,
        mm_env_start,
        mm_env_end,
        task_group_leader,
        task_comm,
        ..SockOffsets::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// An independent reading of the same BTF: `bpftool btf dump ... format
    /// raw` (libbpf's parser), resolved here by walking its text.
    /// A type of the dump: (kind, name, type_id, members (name, type_id,
    /// bits_offset)).
    type RawType = (String, String, u32, Vec<(String, u32, u64)>);

    struct RawDump {
        types: HashMap<u32, RawType>,
        by_name: HashMap<String, Vec<u32>>,
        /// Enum member name → value (`'name' val=N` lines).
        enum_values: HashMap<String, u64>,
    }

    impl RawDump {
        fn parse(text: &str) -> RawDump {
            let mut types = HashMap::new();
            let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
            let mut current: Option<u32> = None;
            let mut enum_values = HashMap::new();
            let field = |line: &str, key: &str| -> Option<u64> {
                let at = line.find(key)? + key.len();
                line[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix('[') {
                    let (id, rest) = rest.split_once("] ").unwrap();
                    let id: u32 = id.parse().unwrap();
                    let mut words = rest.splitn(2, ' ');
                    let kind = words.next().unwrap().to_string();
                    let rest = words.next().unwrap_or("");
                    let name = rest.split('\'').nth(1).unwrap_or("").to_string();
                    let type_id = field(rest, "type_id=").unwrap_or(0) as u32;
                    by_name.entry(name.clone()).or_default().push(id);
                    types.insert(id, (kind, name, type_id, Vec::new()));
                    current = Some(id);
                } else if let Some(id) = current
                    && line.starts_with('\t')
                    && line.contains("bits_offset=")
                {
                    let name = line.split('\'').nth(1).unwrap_or("").to_string();
                    let name = if name == "(anon)" {
                        String::new()
                    } else {
                        name
                    };
                    let member = (
                        name,
                        field(line, "type_id=").unwrap() as u32,
                        field(line, "bits_offset=").unwrap(),
                    );
                    types.get_mut(&id).unwrap().3.push(member);
                } else if line.starts_with('\t')
                    && let Some(val) = field(line, " val=")
                {
                    let name = line.split('\'').nth(1).unwrap_or("").to_string();
                    enum_values.insert(name, val);
                }
            }
            RawDump {
                types,
                by_name,
                enum_values,
            }
        }

        fn strip(&self, mut id: u32) -> u32 {
            loop {
                let (kind, _, next, _) = &self.types[&id];
                match kind.as_str() {
                    "TYPEDEF" | "CONST" | "VOLATILE" | "RESTRICT" | "TYPE_TAG" => id = *next,
                    _ => return id,
                }
            }
        }

        fn find(&self, id: u32, name: &str) -> Option<(u64, u32)> {
            for (m, t, off) in &self.types[&self.strip(id)].3 {
                if m == name {
                    return Some((*off, *t));
                }
                let inner = self.strip(*t);
                if m.is_empty()
                    && matches!(self.types[&inner].0.as_str(), "STRUCT" | "UNION")
                    && let Some((o, t)) = self.find(inner, name)
                {
                    return Some((off + o, t));
                }
            }
            None
        }

        fn offset(&self, strukt: &str, path: &str) -> u32 {
            let mut id = *self.by_name[strukt]
                .iter()
                .find(|i| self.types[i].0 == "STRUCT")
                .unwrap();
            let mut bits = 0;
            for part in path.split('.') {
                let (off, t) = self.find(id, part).unwrap();
                bits += off;
                id = t;
            }
            assert_eq!(bits % 8, 0);
            (bits / 8) as u32
        }
    }

    fn kernel() -> Option<(KernelBtf, RawDump)> {
        if !Path::new(VMLINUX).exists() {
            eprintln!("SKIPPED: no {VMLINUX}");
            return None;
        }
        let out = match std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
            .output()
        {
            Ok(o) if o.status.success() => o,
            other => {
                eprintln!("SKIPPED: bpftool btf dump did not run: {other:?}");
                return None;
            }
        };
        let dump = RawDump::parse(&String::from_utf8_lossy(&out.stdout));
        Some((KernelBtf::open(Path::new(VMLINUX)).unwrap(), dump))
    }

    #[test]
    fn offsets_match_bpftool() {
        let Some((btf, dump)) = kernel() else {
            return;
        };
        for (strukt, path) in [
            ("task_struct", "files"),
            ("files_struct", "fdt"),
            ("fdtable", "fd"),
            ("fdtable", "max_fds"),
            ("file", "private_data"),
            ("socket", "sk"),
            ("sock", "__sk_common"),
            ("sock_common", "skc_family"),
            ("sock_common", "skc_daddr"),
            ("sock_common", "skc_rcv_saddr"),
            ("sock_common", "skc_dport"),
            ("sock_common", "skc_num"),
            ("sock_common", "skc_v6_daddr"),
            ("sock_common", "skc_v6_rcv_saddr"),
            ("tcp_sock", "srtt_us"),
            ("tcp_sock", "total_retrans"),
            ("tcp_sock", "inet_conn.icsk_inet.sk"),
        ] {
            assert_eq!(
                btf.member_offset(strukt, path).unwrap(),
                dump.offset(strukt, path),
                "{strukt}.{path}"
            );
        }
        let o = sock_offsets(&btf).unwrap();
        assert_eq!(o.enabled, 1);
        assert_eq!(o.skc_num, dump.offset("sock_common", "skc_num"));
        assert_eq!(o.tcp_srtt_us, dump.offset("tcp_sock", "srtt_us"));
        assert_eq!(o.sk_protocol, dump.offset("sock", "sk_protocol"));
        assert_eq!(o.skc_dport, dump.offset("sock_common", "skc_dport"));
        assert_eq!(o.task_mm, dump.offset("task_struct", "mm"));
        assert_eq!(o.mm_env_start, dump.offset("mm_struct", "env_start"));
        assert_eq!(o.mm_env_end, dump.offset("mm_struct", "env_end"));
        assert!(o.task_mm > 0 && o.mm_env_end == o.mm_env_start + 8);
        assert_eq!(
            o.task_group_leader,
            dump.offset("task_struct", "group_leader")
        );
        assert_eq!(o.task_comm, dump.offset("task_struct", "comm"));
        // A controller's cgroup v1 directory: current → cgroups →
        // subsys[<controller>_cgrp_id] → cgroup → kn → id.
        for controller in ["pids", "memory", "cpu"] {
            let id = dump.enum_values[&format!("{controller}_cgrp_id")];
            assert_eq!(
                cgroup1_offsets(&btf, controller).unwrap(),
                [
                    dump.offset("task_struct", "cgroups"),
                    dump.offset("css_set", "subsys") + 8 * id as u32,
                    dump.offset("cgroup_subsys_state", "cgroup"),
                    dump.offset("cgroup", "kn"),
                    dump.offset("kernfs_node", "id"),
                ],
                "{controller}"
            );
        }
        assert!(matches!(
            cgroup1_offsets(&btf, "nosuch"),
            Err(BtfError::NoMember { .. })
        ));
        // Members of anonymous unions are found at their real place: the
        // two ports share a 32-bit word, the destination first.
        assert_eq!(
            btf.member_offset("sock_common", "skc_num").unwrap(),
            btf.member_offset("sock_common", "skc_dport").unwrap() + 2
        );
    }

    #[test]
    fn the_kernel_btf_is_parsed_once_until_released() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("SKIPPED: no {VMLINUX}");
            return;
        }
        let a = super::kernel().unwrap();
        let b = super::kernel().unwrap();
        assert!(Arc::ptr_eq(&a, &b), "parsed twice");
        release();
        let c = super::kernel().unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "kept after release");
        assert_eq!(
            c.member_offset("task_struct", "mm").unwrap(),
            a.member_offset("task_struct", "mm").unwrap()
        );
    }

    #[test]
    fn missing_things_are_clear_errors() {
        let Some((btf, _)) = kernel() else {
            return;
        };
        let e = btf.member_offset("tcp_sock", "no_such_member").unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel BTF: struct tcp_sock has no member no_such_member"
        );
        let e = btf.member_offset("no_such_struct_x", "a").unwrap_err();
        assert_eq!(e.to_string(), "kernel BTF has no struct no_such_struct_x");
        let e = btf.member_offset("sock_common", "skc_reuse").unwrap_err();
        assert!(matches!(e, BtfError::BitField { .. }), "{e}");
        let e = btf.member_offset("tcp_sock", "srtt_us.x").unwrap_err();
        assert!(matches!(e, BtfError::NotAggregate { .. }), "{e}");
        let e = KernelBtf::open(Path::new("/nonexistent/btf"))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with("reading kernel BTF /nonexistent/btf")
        );
    }
}
