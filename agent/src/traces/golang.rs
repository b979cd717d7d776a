//! Go executables: where the goroutine probes of the HTTP capture attach
//! (see the eBPF side, `http/golang.rs`, for what each one does).
//!
//! The probes read registers only (Go's register ABI: Go 1.17 on, amd64),
//! never a Go structure, so no offsets by Go version are needed: only the
//! functions' addresses, from the symbol table or, in a stripped binary,
//! from `.gopclntab` (which Go keeps for its own tracebacks). The Go
//! version comes from `.go.buildinfo`.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, ReadCache, ReadRef};

/// The functions the probes attach to. `newproc.func1` is not probed: the
/// instruction after its call of `newproc1` is.
pub const ROUND_TRIP: &str = "net/http.(*Transport).roundTrip";
pub const REQUEST_WRITE: &str = "net/http.(*Request).write";
pub const NEWPROC1: &str = "runtime.newproc1";
const NEWPROC_FUNC1: &str = "runtime.newproc.func1";

/// Where the probes go in one Go executable: file offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoProbePoints {
    pub version: String,
    /// The symbol table was gone: addresses came from `.gopclntab`.
    pub stripped: bool,
    pub round_trip: u64,
    pub request_write: u64,
    pub newproc1: u64,
    /// The instruction after `newproc.func1`'s call of `newproc1`; `None`
    /// when the call was not found (goroutines then start without their
    /// creator's context).
    pub newproc_done: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum GoBinaryError {
    #[error("not a Go executable")]
    NotGo,
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("unreadable ELF: {0}")]
    Elf(String),
    #[error("Go {0}: goroutine context needs Go 1.17 or later on amd64")]
    Unsupported(String),
    #[error("{0} not found (net/http not linked in, or an unknown .gopclntab)")]
    Missing(&'static str),
}

/// The probe points of the executable at `path`.
pub fn probe_points_of(path: &Path) -> Result<GoProbePoints, GoBinaryError> {
    let file = File::open(path).map_err(|e| GoBinaryError::Io(path.into(), e))?;
    let cache = ReadCache::new(file);
    probe_points(&cache)
}

/// The probe points of an ELF image.
pub fn probe_points<'d, R: ReadRef<'d>>(data: R) -> Result<GoProbePoints, GoBinaryError> {
    let elf = object::File::parse(data).map_err(|e| GoBinaryError::Elf(e.to_string()))?;
    let buildinfo = elf
        .section_by_name(".go.buildinfo")
        .ok_or(GoBinaryError::NotGo)?;
    let version = buildinfo
        .data()
        .ok()
        .and_then(go_version)
        .ok_or_else(|| GoBinaryError::Unsupported("before 1.18 or unknown".into()))?;
    if elf.architecture() != object::Architecture::X86_64 || !register_abi(&version) {
        return Err(GoBinaryError::Unsupported(version));
    }
    let wanted = [ROUND_TRIP, REQUEST_WRITE, NEWPROC1, NEWPROC_FUNC1];
    let mut found: HashMap<&'static str, (u64, u64)> = HashMap::new();
    for symbol in elf.symbols() {
        if let Ok(name) = symbol.name()
            && let Some(w) = wanted.iter().find(|w| **w == name)
        {
            found.insert(w, (symbol.address(), symbol.size()));
        }
    }
    let stripped = found.len() < wanted.len();
    if stripped {
        let pclntab = elf
            .section_by_name(".gopclntab")
            .ok_or(GoBinaryError::Missing(".gopclntab"))?;
        let data = pclntab
            .data()
            .map_err(|e| GoBinaryError::Elf(e.to_string()))?;
        let text = elf.section_by_name(".text").map_or(0, |s| s.address());
        found = pclntab_functions(data, text, &wanted)
            .ok_or(GoBinaryError::Missing(".gopclntab functions"))?;
    }
    let addr = |name: &'static str| {
        found
            .get(name)
            .map(|(a, _)| *a)
            .ok_or(GoBinaryError::Missing(name))
    };
    let offset = |vaddr: u64| file_offset(&elf, vaddr).ok_or(GoBinaryError::Missing("a section"));
    let newproc1 = addr(NEWPROC1)?;
    let newproc_done = found.get(NEWPROC_FUNC1).and_then(|&(start, size)| {
        let len = if size == 0 { 256 } else { size.min(512) };
        let code = section_bytes(&elf, start, len)?;
        call_return_site(&code, start, newproc1)
    });
    Ok(GoProbePoints {
        version,
        stripped,
        round_trip: offset(addr(ROUND_TRIP)?)?,
        request_write: offset(addr(REQUEST_WRITE)?)?,
        newproc1: offset(newproc1)?,
        newproc_done: newproc_done.and_then(|a| file_offset(&elf, a)),
    })
}

/// Whether a `go1.X[.Y]` version passes arguments in registers on amd64
/// (1.17 on; `devel` builds too).
fn register_abi(version: &str) -> bool {
    let Some(rest) = version.strip_prefix("go1.") else {
        return version.starts_with("devel");
    };
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    minor.parse::<u32>().is_ok_and(|m| m >= 17)
}

/// The Go version recorded in `.go.buildinfo` (Go 1.18 on: inline strings,
/// flag bit 2; earlier formats give `None`).
pub fn go_version(section: &[u8]) -> Option<String> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if !section.starts_with(MAGIC) || section.len() < 33 {
        return None;
    }
    let flags = section[15];
    if flags & 2 == 0 {
        return None;
    }
    let (len, used) = uvarint(&section[32..])?;
    let start = 32 + used;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    let v = std::str::from_utf8(section.get(start..end)?).ok()?;
    Some(v.to_string())
}

fn uvarint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Addresses (and sizes, from the next function's entry) of `wanted`
/// functions in a Go 1.18+ `.gopclntab` (magic `0xfffffff0` or
/// `0xfffffff1`). `text` is the `.text` section's address, used when the
/// table's own text start is zero (position-independent executables).
pub fn pclntab_functions(
    tab: &[u8],
    text: u64,
    wanted: &[&'static str],
) -> Option<HashMap<&'static str, (u64, u64)>> {
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(tab.get(off..off + 4)?.try_into().ok()?))
    };
    let magic = u32_at(0)?;
    if magic != 0xffff_fff0 && magic != 0xffff_fff1 {
        return None;
    }
    let ptr = usize::from(*tab.get(7)?);
    if ptr != 8 {
        return None;
    }
    let word = |i: usize| -> Option<usize> {
        let off = 8 + i * ptr;
        usize::try_from(u64::from_le_bytes(tab.get(off..off + 8)?.try_into().ok()?)).ok()
    };
    let nfunc = word(0)?;
    let text_start = match word(2)? {
        0 => text,
        t => t as u64,
    };
    let funcnames = word(3)?;
    let functab = word(7)?;
    let mut out = HashMap::new();
    for i in 0..nfunc {
        let entry_off = u32_at(functab.checked_add(i * 8)?)?;
        let func_off = usize::try_from(u32_at(functab.checked_add(i * 8 + 4)?)?).ok()?;
        let func = functab.checked_add(func_off)?;
        let name_off = usize::try_from(u32_at(func + 4)?).ok()?;
        let name_at = funcnames.checked_add(name_off)?;
        let rest = tab.get(name_at..)?;
        let name = &rest[..rest.iter().position(|&b| b == 0)?];
        let Some(w) = wanted.iter().find(|w| w.as_bytes() == name) else {
            continue;
        };
        // The entry after the last function is the end of the text.
        let next = u32_at(functab.checked_add((i + 1) * 8)?)?;
        out.insert(
            *w,
            (
                text_start + u64::from(entry_off),
                u64::from(next.saturating_sub(entry_off)),
            ),
        );
        if out.len() == wanted.len() {
            break;
        }
    }
    Some(out)
}

/// The address after a `call rel32` (`e8`) in `code` (at `start`) whose
/// target is `target`.
pub fn call_return_site(code: &[u8], start: u64, target: u64) -> Option<u64> {
    (0..code.len().saturating_sub(4)).find_map(|i| {
        if code[i] != 0xe8 {
            return None;
        }
        let rel = i32::from_le_bytes(code.get(i + 1..i + 5)?.try_into().ok()?);
        let next = start.checked_add(i as u64 + 5)?;
        (next.wrapping_add_signed(i64::from(rel)) == target).then_some(next)
    })
}

/// `len` bytes at virtual address `vaddr`, from the section holding them.
fn section_bytes<'d, R: ReadRef<'d>>(
    elf: &object::File<'d, R>,
    vaddr: u64,
    len: u64,
) -> Option<Vec<u8>> {
    let section = elf
        .sections()
        .find(|s| s.address() <= vaddr && vaddr < s.address() + s.size())?;
    let data = section.data().ok()?;
    let from = usize::try_from(vaddr - section.address()).ok()?;
    let to = (from + usize::try_from(len).ok()?).min(data.len());
    Some(data.get(from..to)?.to_vec())
}

/// The file offset of virtual address `vaddr` (what a uprobe is given).
fn file_offset<'d, R: ReadRef<'d>>(elf: &object::File<'d, R>, vaddr: u64) -> Option<u64> {
    let section = elf
        .sections()
        .find(|s| s.address() <= vaddr && vaddr < s.address() + s.size())?;
    let (offset, _) = section.file_range()?;
    Some(vaddr - section.address() + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_with_the_register_abi() {
        assert!(register_abi("go1.19.8"));
        assert!(register_abi("go1.17"));
        assert!(register_abi("go1.24rc1"));
        assert!(!register_abi("go1.16.15"));
        assert!(!register_abi("gccgo"));
    }

    #[test]
    fn buildinfo_version() {
        let mut s = b"\xff Go buildinf:".to_vec();
        s.extend([8, 2]);
        s.resize(32, 0);
        s.push(8);
        s.extend(b"go1.19.8");
        assert_eq!(go_version(&s).as_deref(), Some("go1.19.8"));
        // The pre-1.18 format (pointers) and garbage say nothing.
        s[15] = 0;
        assert_eq!(go_version(&s), None);
        assert_eq!(go_version(b"\xff Go buildinf:"), None);
        assert_eq!(go_version(&[0xff; 64]), None);
        // A length past the end.
        let mut t = s.clone();
        t[15] = 2;
        t[32] = 100;
        assert_eq!(go_version(&t), None);
    }

    #[test]
    fn call_site_of_a_rel32_call() {
        // 0x1000: mov; call 0x1100; mov
        let code = [
            0x48, 0x89, 0xc3, 0xe8, 0xf8, 0x00, 0x00, 0x00, 0x48, 0x89, 0xc3,
        ];
        assert_eq!(call_return_site(&code, 0x1000, 0x1100), Some(0x1008));
        assert_eq!(call_return_site(&code, 0x1000, 0x1200), None);
        assert_eq!(call_return_site(&code[..5], 0x1000, 0x1100), None);
    }

    #[test]
    fn garbage_tables_say_nothing() {
        assert!(pclntab_functions(&[], 0, &[ROUND_TRIP]).is_none());
        assert!(pclntab_functions(&[0xf0, 0xff, 0xff, 0xff], 0, &[ROUND_TRIP]).is_none());
        let mut tab = vec![0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8];
        // nfunc huge, offsets past the end: no panic, no answer.
        tab.extend(u64::MAX.to_le_bytes());
        tab.extend([0u8; 56]);
        assert!(pclntab_functions(&tab, 0, &[ROUND_TRIP]).is_none());
        assert!(matches!(
            probe_points(&b"not an elf"[..]),
            Err(GoBinaryError::Elf(_))
        ));
    }
}
