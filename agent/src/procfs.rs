//! Parsers for the `/proc` files the agent reads. Pure functions over text,
//! so they are unit-tested (and fuzzable) without a kernel.

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// Offset in the file of the mapping's first byte.
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    pub path: MapsPath,
}

/// What is mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapsPath {
    /// A file, with its path as seen inside the process's mount namespace.
    File {
        path: String,
        deleted: bool,
    },
    /// Anonymous memory (JIT code lives here).
    Anonymous,
    Vdso,
    /// `[heap]`, `[stack]`, `[vvar]`, `[vsyscall]`, `[anon:name]`, ...
    Pseudo(String),
}

/// Error for a line that is not in the `/proc/PID/maps` format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed /proc/PID/maps line {line}: {reason}: {text:?}")]
pub struct MapsError {
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

/// Parses the whole of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>, MapsError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_maps_line(l).map_err(|reason| MapsError {
                line: i + 1,
                reason,
                text: l.chars().take(200).collect(),
            })
        })
        .collect()
}

fn parse_maps_line(line: &str) -> Result<MapsEntry, &'static str> {
    // address perms offset dev inode [path]; the path may contain spaces.
    let mut rest = line;
    let mut field = || -> Result<&str, &'static str> {
        let trimmed = rest.trim_start_matches(' ');
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (f, r) = trimmed.split_at(end);
        rest = r;
        if f.is_empty() {
            Err("missing field")
        } else {
            Ok(f)
        }
    };
    let range = field()?;
    let perms = field()?;
    let offset = field()?;
    let dev = field()?;
    let inode = field()?;
    let path = rest.trim_start_matches(' ');

    let (start, end) = range.split_once('-').ok_or("address range without '-'")?;
    let start = u64::from_str_radix(start, 16).map_err(|_| "bad start address")?;
    let end = u64::from_str_radix(end, 16).map_err(|_| "bad end address")?;
    if end < start {
        return Err("end address below start");
    }
    let perms = perms.as_bytes();
    if perms.len() < 4 {
        return Err("short permissions");
    }
    let offset = u64::from_str_radix(offset, 16).map_err(|_| "bad offset")?;
    let (major, minor) = dev.split_once(':').ok_or("device without ':'")?;
    let dev_major = u32::from_str_radix(major, 16).map_err(|_| "bad device major")?;
    let dev_minor = u32::from_str_radix(minor, 16).map_err(|_| "bad device minor")?;
    let inode = inode.parse().map_err(|_| "bad inode")?;

    let path = if path.is_empty() {
        MapsPath::Anonymous
    } else if path == "[vdso]" {
        MapsPath::Vdso
    } else if path.starts_with('[') {
        MapsPath::Pseudo(path.to_owned())
    } else if let Some(p) = path.strip_suffix(" (deleted)") {
        MapsPath::File {
            path: p.to_owned(),
            deleted: true,
        }
    } else {
        MapsPath::File {
            path: path.to_owned(),
            deleted: false,
        }
    };
    Ok(MapsEntry {
        start,
        end,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
        executable: perms[2] == b'x',
        offset,
        dev_major,
        dev_minor,
        inode,
        path,
    })
}

/// Start time of a process in clock ticks since boot (field 22 of
/// `/proc/PID/stat`). Together with the pid it identifies a process.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    // The comm (field 2) is in parentheses and may contain anything, even
    // ") ", so fields are counted after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the comm; field 22 is the 20th.
    after.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The effective capability set from `/proc/self/status`.
/// The process's pid in its own (innermost) pid namespace, from the
/// `NSpid:` line of `/proc/PID/status`.
pub fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_pid_is_the_innermost() {
        assert_eq!(parse_ns_pid("Name:\tx\nNSpid:\t4242\t17\t1\n"), Some(1));
        assert_eq!(parse_ns_pid("NSpid:\t4242\n"), Some(4242));
        assert_eq!(parse_ns_pid("Name:\tx\n"), None);
        assert_eq!(parse_ns_pid("NSpid:\tgarbage\n"), None);
    }

    const MAPS: &str = "\
55d0c5a00000-55d0c5a02000 r--p 00000000 fd:01 1835024                    /usr/bin/my prog
55d0c5a02000-55d0c5a06000 r-xp 00002000 fd:01 1835024                    /usr/bin/my prog
7f1c9a400000-7f1c9a428000 r-xp 00028000 103:05 264403 /lib/x86_64-linux-gnu/libc.so.6 (deleted)
7f1c9a5c1000-7f1c9a5c3000 rw-p 00000000 00:00 0 
7ffd1e1f0000-7ffd1e211000 rw-p 00000000 00:00 0                          [stack]
7ffd1e3c4000-7ffd1e3c6000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_every_kind_of_line() {
        let maps = parse_maps(MAPS).unwrap();
        assert_eq!(maps.len(), 7);
        assert_eq!(
            maps[1],
            MapsEntry {
                start: 0x55d0c5a02000,
                end: 0x55d0c5a06000,
                readable: true,
                writable: false,
                executable: true,
                offset: 0x2000,
                dev_major: 0xfd,
                dev_minor: 1,
                inode: 1835024,
                path: MapsPath::File {
                    path: "/usr/bin/my prog".into(),
                    deleted: false
                },
            }
        );
        assert_eq!(
            maps[2].path,
            MapsPath::File {
                path: "/lib/x86_64-linux-gnu/libc.so.6".into(),
                deleted: true
            }
        );
        assert_eq!((maps[2].dev_major, maps[2].dev_minor), (0x103, 5));
        assert_eq!(maps[3].path, MapsPath::Anonymous);
        assert_eq!(maps[4].path, MapsPath::Pseudo("[stack]".into()));
        assert_eq!(maps[5].path, MapsPath::Vdso);
        assert!(maps[6].executable && !maps[6].readable);
    }

    #[test]
    fn rejects_malformed_lines_with_their_number() {
        for bad in [
            "zzzz-1000 r-xp 0 00:00 0",
            "1000 r-xp 0 00:00 0",
            "2000-1000 r-xp 0 00:00 0",
            "1000-2000 r- 0 00:00 0",
            "1000-2000 r-xp 0 0000 0",
            "1000-2000 r-xp 0 00:00",
            "1000-2000 r-xp 0 00:00 x",
        ] {
            let err =
                parse_maps(&format!("{}\n{bad}\n", MAPS.lines().next().unwrap())).expect_err(bad);
            assert_eq!(err.line, 2, "{bad}");
        }
    }

    #[test]
    fn stat_start_time_survives_hostile_comm() {
        let stat =
            "1234 (a) b) (c) R 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat_start_time(stat), Some(987654));
        assert_eq!(parse_stat_start_time("1234 (x) R 1"), None);
        assert_eq!(parse_stat_start_time("no parens"), None);
    }

    #[test]
    fn cap_eff() {
        let status = "Name:\tbash\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
