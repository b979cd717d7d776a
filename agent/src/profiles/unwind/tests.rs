#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]
//! Tables checked row by row against readelf's interpretation of the same
//! call-frame information (`--debug-dump=frames-interp`), on C and C++
//! fixtures compiled here with pinned flags and on system binaries.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Instant,
};

use fathom_common::unwind::{MAX_TABLE_ROWS, UnwindRow, cfa, rbp};

use super::{
    table::{Builder, MAX_RAW_ROWS, RawRow},
    *,
};

const C_FIXTURE: &str = r#"
#include <alloca.h>
#include <stdio.h>
#include <string.h>

__attribute__((noinline)) long leaf(long x) { return x * 3 + 1; }

/* Callee-saved registers pushed one by one. */
__attribute__((noinline)) long saves_registers(long a, long b, long c, long d) {
    long s = 0;
    for (long i = 0; i < a; i++)
        s += leaf(i ^ b) * leaf(c + i) + d;
    return s;
}

/* alloca: a frame pointer even with -fomit-frame-pointer (CFA rbp+16). */
__attribute__((noinline)) long uses_alloca(int n) {
    char *p = alloca(n);
    memset(p, n, n);
    long s = 0;
    for (int i = 0; i < n; i++)
        s += p[i] + leaf(i);
    return s;
}

/* More than 64 KiB of locals: CFA rsp+70016, beyond a u16 offset. */
__attribute__((noinline)) long big_frame(int n) {
    volatile char buf[70000];
    for (int i = 0; i < 70000; i++)
        buf[i] = (char)i;
    return buf[n % 70000] + leaf(n);
}

/* Stack realignment with a VLA: a DRAP (CFA r10+0, then a CFA expression
   through rbp, and RBP saved by an expression). */
__attribute__((noinline)) long realigned(int n) {
    __attribute__((aligned(64))) volatile char buf[256];
    char vla[n];
    memset(vla, 1, n);
    for (int i = 0; i < 256; i++)
        buf[i] = (char)(i + vla[i % n]);
    return buf[n & 255] + leaf(n);
}

static long fib(int n) { return n < 2 ? leaf(n) : fib(n - 1) + fib(n - 2); }

int main(int argc, char **argv) {
    (void)argv;
    printf("%ld\n", saves_registers(argc, 2, 3, 4) + uses_alloca(argc * 10) +
                        big_frame(argc) + realigned(argc + 5) + fib(argc + 3));
    puts("done");
    return 0;
}
"#;

const CXX_FIXTURE: &str = r#"
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

struct Guard {
    std::string name;
    ~Guard() { std::printf("%s\n", name.c_str()); }
};

__attribute__((noinline)) int thrower(int n) {
    if (n > 3)
        throw std::runtime_error("too big: " + std::to_string(n));
    return n * 2;
}

__attribute__((noinline)) int catcher(int n) {
    Guard g{"guard " + std::to_string(n)};
    try {
        return thrower(n);
    } catch (const std::exception &e) {
        std::printf("%s\n", e.what());
        return -1;
    }
}

int main(int argc, char **) {
    std::vector<int> v;
    for (int i = 0; i < argc + 5; i++)
        v.push_back(catcher(i));
    return static_cast<int>(v.size());
}
"#;

/// Compiled without asynchronous unwind tables: only `.debug_frame`.
const DEBUG_FRAME_PART: &str = r#"
__attribute__((noinline)) long df_leaf(long x) { return x * 7 + 3; }
__attribute__((noinline)) long df_work(long n) {
    long s = 0;
    for (long i = 0; i < n; i++)
        s += df_leaf(i) ^ df_leaf(s);
    return s;
}
"#;

const DEBUG_FRAME_MAIN: &str = r#"
#include <stdio.h>
long df_work(long n);
int main(int argc, char **argv) { (void)argv; printf("%ld\n", df_work(argc * 100)); return 0; }
"#;

/// A function placed 8 GiB above the rest: a span a 32-bit row pc cannot
/// hold. Built with `-mcmodel=large` and described by `.debug_frame` (whose
/// addresses are 64-bit): `.eh_frame`'s 32-bit pc-relative addresses cannot
/// reach it.
const FAR_FIXTURE: &str = r#"
__attribute__((noinline, section(".far"))) long far_away(long x) { return x + 1; }
int main(int argc, char **argv) { (void)argv; return (int)far_away(argc); }
"#;

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (gcc, g++ and binutils are needed)"));
    // readelf exits with 1, saying nothing, on files whose separate debug
    // file (.gnu_debuglink) is not installed, such as Debian's libc.
    let quiet_readelf =
        cmd.get_program() == "readelf" && out.stderr.is_empty() && !out.stdout.is_empty();
    assert!(
        out.status.success() || quiet_readelf,
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Compiles `source` (in `lang`, "c" or "c++") with `flags` into `dir/name`.
fn compile(dir: &Path, name: &str, lang: &str, source: &str, flags: &[&str]) -> PathBuf {
    let (compiler, ext) = if lang == "c++" {
        ("g++", "cc")
    } else {
        ("gcc", "c")
    };
    let src = dir.join(format!("{name}.{ext}"));
    fs::write(&src, source).unwrap();
    let out = dir.join(name);
    run(Command::new(compiler)
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src));
    out
}

/// The fixtures: the C program with frame pointers omitted (rsp-based
/// CFAs) and kept at -O0 (rbp-based), the C++ program with exceptions, and
/// a program half of which only `.debug_frame` describes.
fn fixtures(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![
        compile(
            dir,
            "c-O2-omit-fp",
            "c",
            C_FIXTURE,
            &["-O2", "-fomit-frame-pointer"],
        ),
        compile(
            dir,
            "c-O0-fp",
            "c",
            C_FIXTURE,
            &["-O0", "-fno-omit-frame-pointer"],
        ),
        compile(
            dir,
            "c-O2-nopie",
            "c",
            C_FIXTURE,
            &["-O2", "-fomit-frame-pointer", "-no-pie"],
        ),
        compile(dir, "cxx-O2-exceptions", "c++", CXX_FIXTURE, &["-O2"]),
    ];
    let part = dir.join("df-part.c");
    fs::write(&part, DEBUG_FRAME_PART).unwrap();
    let part_o = dir.join("df-part.o");
    run(Command::new("gcc")
        .args(["-O2", "-g", "-fno-asynchronous-unwind-tables", "-c", "-o"])
        .arg(&part_o)
        .arg(&part));
    let main = dir.join("df-main.c");
    fs::write(&main, DEBUG_FRAME_MAIN).unwrap();
    let mixed = dir.join("mixed-debug-frame");
    run(Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&mixed)
        .arg(&main)
        .arg(&part_o));
    out.push(mixed);
    out
}

// ---------------------------------------------------------------- readelf

#[derive(Clone, Debug, PartialEq, Eq, Hash, Copy)]
enum Frames {
    Eh,
    Debug,
}

#[derive(Debug)]
struct Section {
    name: String,
    addr: u64,
    offset: u64,
    size: u64,
    exec: bool,
}

/// `readelf -SW`: the section table.
fn readelf_sections(path: &Path) -> Vec<Section> {
    let text = String::from_utf8(run(Command::new("readelf").arg("-SW").arg(path))).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((_, rest)) = line
            .trim_start()
            .strip_prefix('[')
            .and_then(|l| l.split_once(']'))
        else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 9 || f[0] == "Name" || f[1] == "NULL" {
            continue;
        }
        let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
        // Name Type Address Off Size ES [Flg] Lk Inf Al
        let flags = if f.len() == 10 { f[6] } else { "" };
        out.push(Section {
            name: f[0].to_owned(),
            addr: hex(f[2]),
            offset: hex(f[3]),
            size: hex(f[4]),
            exec: flags.contains('X'),
        });
    }
    out
}

#[derive(Clone, Debug)]
struct OracleRow {
    loc: u64,
    cfa: String,
    rbp: Option<String>,
    ra: Option<String>,
}

#[derive(Debug)]
struct OracleFde {
    frames: Frames,
    start: u64,
    end: u64,
    rows: Vec<OracleRow>,
}

/// `readelf --debug-dump=frames-interp`: every FDE with its rows. readelf
/// prints no rows for an FDE without instructions: its CIE's initial row
/// then applies.
fn readelf_frames(path: &Path) -> Vec<OracleFde> {
    let text = String::from_utf8(run(Command::new("readelf")
        .args(["--wide", "--debug-dump=frames-interp"])
        .arg(path)))
    .unwrap();
    let mut fdes: Vec<OracleFde> = Vec::new();
    let mut fde_cies: Vec<(Frames, u64)> = Vec::new();
    let mut cie_rows: HashMap<(Frames, u64), OracleRow> = HashMap::new();
    let mut frames = None;
    // The entry being read: Some(Ok(cie offset)) or Some(Err(fde index)).
    let mut current: Option<Result<u64, usize>> = None;
    let mut columns: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Contents of the ") {
            let ours = rest
                .split_once("(loaded from ")
                .is_none_or(|(_, f)| f.trim_end_matches("):") == path.to_str().unwrap());
            frames = match rest.split_whitespace().next() {
                Some(".eh_frame") if ours => Some(Frames::Eh),
                Some(".debug_frame") if ours => Some(Frames::Debug),
                _ => None,
            };
            current = None;
            continue;
        }
        let Some(frames) = frames else { continue };
        // A register rule naming another register reads `r9 (r9)`.
        let mut f: Vec<&str> = Vec::new();
        let mut tokens = line.split_whitespace();
        while let Some(t) = tokens.next() {
            if tokens.clone().next().is_some_and(|n| n.starts_with('(')) {
                tokens.next();
            }
            f.push(t);
        }
        if f.len() >= 4 && f[3] == "CIE" {
            current = Some(Ok(u64::from_str_radix(f[0], 16).unwrap()));
            continue;
        }
        if f.len() >= 6 && f[3] == "FDE" {
            let cie = u64::from_str_radix(f[4].strip_prefix("cie=").unwrap(), 16).unwrap();
            let (start, end) = f[5].strip_prefix("pc=").unwrap().split_once("..").unwrap();
            fdes.push(OracleFde {
                frames,
                start: u64::from_str_radix(start, 16).unwrap(),
                end: u64::from_str_radix(end, 16).unwrap(),
                rows: Vec::new(),
            });
            fde_cies.push((frames, cie));
            current = Some(Err(fdes.len() - 1));
            continue;
        }
        if f.first() == Some(&"LOC") {
            columns = f[1..].iter().map(|s| s.to_string()).collect();
            continue;
        }
        let Some(entry) = current else { continue };
        if f.is_empty() || f[0].len() != 16 || u64::from_str_radix(f[0], 16).is_err() {
            continue;
        }
        assert_eq!(
            f.len(),
            columns.len() + 1,
            "{}: a row whose columns do not match its header: {line:?}",
            path.display()
        );
        let col = |name: &str| {
            columns
                .iter()
                .position(|c| c == name)
                .map(|i| f[i + 1].to_owned())
        };
        let row = OracleRow {
            loc: u64::from_str_radix(f[0], 16).unwrap(),
            cfa: col("CFA").unwrap(),
            rbp: col("rbp"),
            ra: col("ra"),
        };
        match entry {
            Ok(cie) => {
                cie_rows.insert((frames, cie), row);
            }
            Err(i) => fdes[i].rows.push(row),
        }
    }
    for (fde, key) in fdes.iter_mut().zip(fde_cies) {
        if fde.rows.is_empty() {
            let mut row = cie_rows
                .get(&key)
                .unwrap_or_else(|| panic!("{}: no CIE row for {key:?}", path.display()))
                .clone();
            row.loc = fde.start;
            fde.rows.push(row);
        }
    }
    fdes
}

/// What readelf's row says our row must be. `None`: a CFA expression,
/// checked separately (PLT, signal frame or unsupported).
fn expected(row: &OracleRow) -> Option<UnwindRow> {
    let plain = |rule| UnwindRow::new(0, rule, 0, rbp::SAME, 0);
    if row.ra.as_deref() == Some("u") {
        return Some(plain(cfa::END));
    }
    if row.cfa == "exp" {
        return None;
    }
    let (reg, offset) = row
        .cfa
        .split_once(['+', '-'])
        .unwrap_or_else(|| panic!("CFA {:?}", row.cfa));
    let offset: i64 = offset.parse().unwrap();
    let offset = if row.cfa.contains('-') {
        -offset
    } else {
        offset
    };
    let rule = match reg {
        "rsp" => cfa::RSP,
        "rbp" => cfa::RBP,
        _ => return Some(plain(cfa::UNSUPPORTED)),
    };
    let Ok(offset) = u16::try_from(offset) else {
        return Some(plain(cfa::UNSUPPORTED));
    };
    if row.ra.as_deref() != Some("c-8") {
        return Some(plain(cfa::UNSUPPORTED));
    }
    let (rbp_rule, rbp_offset) = match row.rbp.as_deref() {
        None | Some("u" | "s") => (rbp::SAME, 0),
        Some(saved) => match saved.strip_prefix('c').map(str::parse::<i64>) {
            Some(Ok(n)) if n % 8 == 0 && i8::try_from(n / 8).is_ok() => {
                (rbp::AT_CFA, (n / 8) as i8)
            }
            _ => (rbp::UNKNOWN, 0),
        },
    };
    Some(UnwindRow::new(0, rule, offset, rbp_rule, rbp_offset))
}

/// `mov $15, %rax; syscall`: rt_sigreturn, the body of `__restore_rt`.
const RESTORE_RT: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

#[derive(Debug, Default)]
struct Checked {
    rows: usize,
    fdes: usize,
    plt_rows: usize,
    signal_rows: usize,
    unsupported_rows: usize,
    end_rows: usize,
    gaps: usize,
}

/// Checks every readelf row of `path` against `build(path)` and returns the
/// counts; panics with the first mismatches if there is any.
fn check_against_readelf(path: &Path) -> (UnwindTable, Checked) {
    let data = fs::read(path).unwrap();
    let table = build(&data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sections = readelf_sections(path);
    let section_of = |addr: u64| {
        sections
            .iter()
            .find(|s| s.exec && s.addr <= addr && addr < s.addr + s.size)
    };
    let code_at = |addr: u64, len: usize| -> Option<&[u8]> {
        let s = section_of(addr)?;
        let off = usize::try_from(s.offset + (addr - s.addr)).ok()?;
        data.get(off..off + len)
    };

    let all = readelf_frames(path);
    // The FDEs the table must follow: inside executable sections, and for
    // .debug_frame only where no .eh_frame FDE is.
    let in_text = |f: &OracleFde| {
        section_of(f.start).is_some_and(|s| f.end <= s.addr + s.size) && f.start < f.end
    };
    let eh: Vec<&OracleFde> = all
        .iter()
        .filter(|f| f.frames == Frames::Eh && in_text(f))
        .collect();
    let mut fdes = eh.clone();
    fdes.extend(all.iter().filter(|f| {
        f.frames == Frames::Debug
            && in_text(f)
            && !eh.iter().any(|e| e.start < f.end && f.start < e.end)
    }));
    fdes.sort_by_key(|f| f.start);
    for w in fdes.windows(2) {
        assert!(
            w[0].end <= w[1].start,
            "{}: overlapping FDEs {:#x}..{:#x} and {:#x}..{:#x}",
            path.display(),
            w[0].start,
            w[0].end,
            w[1].start,
            w[1].end
        );
    }

    let mut mismatches = Vec::new();
    let mut checked = Checked {
        fdes: fdes.len(),
        ..Checked::default()
    };
    let mut signal_fdes = 0;
    for fde in &fdes {
        let is_signal = code_at(fde.start + 1, RESTORE_RT.len()) == Some(&RESTORE_RT[..]);
        signal_fdes += usize::from(is_signal);
        for (i, row) in fde.rows.iter().enumerate() {
            let next = fde.rows.get(i + 1).map_or(fde.end, |r| r.loc);
            // A later row at the same address replaces this one.
            if next == row.loc || row.loc >= fde.end {
                continue;
            }
            checked.rows += 1;
            for addr in [row.loc, next - 1] {
                let got = table.lookup(addr).copied();
                let ok = match (expected(row), got) {
                    (_, None) => false,
                    (Some(want), Some(got)) => {
                        checked.unsupported_rows +=
                            usize::from(addr == row.loc && want.cfa_rule() == cfa::UNSUPPORTED);
                        checked.end_rows +=
                            usize::from(addr == row.loc && want.cfa_rule() == cfa::END);
                        want.same_rule(&got)
                    }
                    (None, Some(got)) => {
                        let in_plt = section_of(addr).is_some_and(|s| s.name.starts_with(".plt"));
                        let count = addr == row.loc;
                        match got.cfa_rule() {
                            // binutils' lazy PLT entries: `jmp *GOT; push
                            // $n; jmp .plt` (6 + 5 + 5 bytes): 8 more bytes
                            // are on the stack from offset 11.
                            cfa::PLT => {
                                checked.plt_rows += usize::from(count);
                                in_plt && got.cfa_offset == 11
                            }
                            cfa::SIGNAL => {
                                checked.signal_rows += usize::from(count);
                                is_signal
                            }
                            cfa::UNSUPPORTED => {
                                checked.unsupported_rows += usize::from(count);
                                !in_plt && !is_signal
                            }
                            _ => false,
                        }
                    }
                };
                if !ok {
                    mismatches.push(format!(
                        "{:?} FDE {:#x}..{:#x} at {addr:#x}: readelf {row:?}, expected {:?}, table {got:?}",
                        fde.frames,
                        fde.start,
                        fde.end,
                        expected(row)
                    ));
                }
            }
        }
    }

    // Addresses no FDE covers: a gap row (or nothing below the base).
    let is_gap = |addr: u64| table.lookup(addr).is_none_or(|r| r.cfa_rule() == cfa::NONE);
    if let (Some(first), Some(last)) = (fdes.first(), fdes.last()) {
        for addr in [first.start.wrapping_sub(1), last.end, last.end + 1000] {
            if !is_gap(addr) {
                mismatches.push(format!("{addr:#x} outside all FDEs is not a gap"));
            }
        }
    }
    for w in fdes.windows(2) {
        if w[0].end < w[1].start {
            checked.gaps += 1;
            for addr in [w[0].end, w[1].start - 1] {
                if !is_gap(addr) {
                    mismatches.push(format!(
                        "{addr:#x} between FDEs {:#x}..{:#x} and {:#x}.. is not a gap: {:?}",
                        w[0].start,
                        w[0].end,
                        w[1].start,
                        table.lookup(addr)
                    ));
                }
            }
        }
    }

    assert!(
        mismatches.is_empty(),
        "{}: {} mismatches with readelf, the first ones:\n{}",
        path.display(),
        mismatches.len(),
        mismatches[..mismatches.len().min(30)].join("\n")
    );
    assert_eq!(table.stats.fdes as usize, fdes.len(), "{}", path.display());
    if signal_fdes > 0 {
        assert!(checked.signal_rows > 0, "{}", path.display());
    }
    assert_invariants(&table);
    println!(
        "{}: {} readelf rows of {} FDEs match ({} PLT, {} signal, {} end, {} unsupported; {} gaps); table: {} rows",
        path.display(),
        checked.rows,
        checked.fdes,
        checked.plt_rows,
        checked.signal_rows,
        checked.end_rows,
        checked.unsupported_rows,
        checked.gaps,
        table.rows.len()
    );
    (table, checked)
}

fn assert_invariants(table: &UnwindTable) {
    assert!(table.rows.len() <= MAX_TABLE_ROWS as usize);
    for w in table.rows.windows(2) {
        assert!(w[0].pc < w[1].pc, "{w:?}");
        assert!(!w[0].same_rule(&w[1]), "{w:?}");
    }
    if let Some(last) = table.rows.last() {
        assert_eq!(last.cfa_rule(), cfa::NONE);
        assert_eq!(table.rows[0].pc, 0);
    }
}

fn system_binaries() -> Vec<PathBuf> {
    let mut out = vec![
        PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
        fs::canonicalize("/usr/bin/python3").unwrap(),
    ];
    if Path::new("/usr/sbin/nginx").exists() {
        out.push(PathBuf::from("/usr/sbin/nginx"));
    }
    out
}

// ------------------------------------------------------------------ tests

#[test]
fn fixtures_match_readelf() {
    let dir = tempfile::tempdir().unwrap();
    let mut totals = Checked::default();
    for path in fixtures(dir.path()) {
        let (table, checked) = check_against_readelf(&path);
        let name = path.file_name().unwrap().to_str().unwrap();
        // Each fixture has what it was written for.
        match name {
            "c-O2-omit-fp" | "c-O2-nopie" => {
                // big_frame (rsp+70016) and realigned (r10, expressions).
                assert!(checked.unsupported_rows >= 3, "{name}: {checked:?}");
                assert!(
                    table.stats.unsupported_rbp >= 1,
                    "{name}: {:?}",
                    table.stats
                );
                assert!(
                    table.rows.iter().any(|r| r.cfa_rule() == cfa::RBP),
                    "{name}: uses_alloca has an rbp-based CFA"
                );
            }
            "c-O0-fp" => {
                assert!(table.rows.iter().any(|r| r.cfa_rule() == cfa::RBP
                    && r.cfa_offset == 16
                    && r.rbp_rule() == rbp::AT_CFA
                    && r.rbp_offset == -2));
            }
            "mixed-debug-frame" => {
                assert_eq!(table.stats.source, Source::Both, "{:?}", table.stats);
            }
            _ => assert_eq!(table.stats.source, Source::EhFrame),
        }
        // Every fixture calls through the PLT and starts at _start.
        assert!(checked.plt_rows > 0, "{name}: {checked:?}");
        assert!(checked.end_rows > 0, "{name}: {checked:?}");
        totals.rows += checked.rows;
    }
    assert!(totals.rows > 100, "{totals:?}");
}

#[test]
fn system_binaries_match_readelf() {
    for path in system_binaries() {
        let (table, checked) = check_against_readelf(&path);
        assert!(checked.rows > 1000, "{}: {checked:?}", path.display());
        if path.ends_with("libc.so.6") {
            // __restore_rt.
            assert_eq!(table.stats.signal, 1, "{:?}", table.stats);
        }
    }
}

#[test]
fn own_test_binary_matches_readelf() {
    check_against_readelf(&std::env::current_exe().unwrap());
}

#[test]
fn far_apart_code_is_an_address_span_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = compile(
        dir.path(),
        "far",
        "c",
        FAR_FIXTURE,
        &[
            "-O2",
            "-no-pie",
            "-mcmodel=large",
            "-g",
            "-fno-asynchronous-unwind-tables",
            "-Wl,--section-start=.far=0x200000000",
        ],
    );
    match build(&fs::read(&path).unwrap()) {
        Err(TableError::AddressSpan { start, end }) => {
            assert!(
                start < 0x1_0000_0000 && end > 0x2_0000_0000,
                "{start:#x}..{end:#x}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Prints what tables cost: rows, serialized and in-memory bytes, bytes per
/// MB of executable code, and build time (of this build profile: run with
/// `--release` for representative times).
#[test]
fn sizes_and_build_times() {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    for path in system_binaries() {
        let data = fs::read(&path).unwrap();
        let mut times = Vec::new();
        let mut table = None;
        for _ in 0..3 {
            let t = Instant::now();
            table = Some(build(&data).unwrap());
            times.push(t.elapsed());
        }
        times.sort();
        let table = table.unwrap();
        let bytes = table.to_bytes().len();
        let s = &table.stats;
        println!(
            "{}: {} rows ({} before merging, {} FDEs), {} bytes serialized, {} in memory, \
             {:.1} MB text, {:.0} bytes per MB of text; unsupported CFA {} rbp {} rows, plt {}, signal {}; \
             build {:.1} ms ({profile}, median of 3)",
            path.display(),
            table.rows.len(),
            s.rows_before_merge,
            s.fdes,
            bytes,
            table.memory_bytes(),
            s.text_bytes as f64 / 1e6,
            table.rows.len() as f64 * 8.0 / (s.text_bytes as f64 / 1e6),
            s.unsupported_cfa,
            s.unsupported_rbp,
            s.plt,
            s.signal,
            times[1].as_secs_f64() * 1e3
        );
    }
}

#[test]
fn bytes_round_trip_and_corruption_is_rejected() {
    let table = build(&fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap()).unwrap();
    let bytes = table.to_bytes();
    assert_eq!(UnwindTable::from_bytes(&bytes).unwrap(), table);

    // Any flipped byte (header, rows, checksum) or a short file is rejected.
    for i in [
        0,
        5,
        9,
        20,
        60,
        70,
        bytes.len() / 2,
        bytes.len() - 5,
        bytes.len() - 1,
    ] {
        let mut bad = bytes.clone();
        bad[i] ^= 0x40;
        assert!(UnwindTable::from_bytes(&bad).is_err(), "flipped byte {i}");
    }
    for len in [0, 3, 10, 70, bytes.len() - 8, bytes.len() - 1] {
        assert!(
            UnwindTable::from_bytes(&bytes[..len]).is_err(),
            "length {len}"
        );
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 8]);
    assert!(UnwindTable::from_bytes(&longer).is_err());

    // Rows past the end of the address space.
    let wrapping = UnwindTable {
        base: u64::MAX,
        rows: vec![
            UnwindRow::new(0, cfa::RSP, 8, rbp::SAME, 0),
            UnwindRow::new(1, cfa::NONE, 0, rbp::SAME, 0),
        ],
        stats: BuildStats::default(),
    };
    assert!(UnwindTable::from_bytes(&wrapping.to_bytes()).is_err());

    // An empty table round-trips too.
    let empty = UnwindTable::default();
    assert_eq!(UnwindTable::from_bytes(&empty.to_bytes()).unwrap(), empty);
}

#[test]
fn lookup_edges() {
    let table = UnwindTable {
        base: 0x1000,
        rows: vec![
            UnwindRow::new(0, cfa::RSP, 8, rbp::SAME, 0),
            UnwindRow::new(4, cfa::RSP, 16, rbp::SAME, 0),
            UnwindRow::new(0x20, cfa::NONE, 0, rbp::SAME, 0),
        ],
        stats: BuildStats::default(),
    };
    assert_eq!(table.lookup(0xfff), None);
    assert_eq!(table.lookup(0x1000).unwrap().cfa_offset, 8);
    assert_eq!(table.lookup(0x1003).unwrap().cfa_offset, 8);
    assert_eq!(table.lookup(0x1004).unwrap().cfa_offset, 16);
    assert_eq!(table.lookup(0x101f).unwrap().cfa_offset, 16);
    assert_eq!(table.lookup(0x1020).unwrap().cfa_rule(), cfa::NONE);
    assert_eq!(
        table
            .lookup(0x1000 + u64::from(u32::MAX))
            .unwrap()
            .cfa_rule(),
        cfa::NONE
    );
    assert_eq!(table.lookup(0x1000 + u64::from(u32::MAX) + 1), None);
    assert_eq!(table.lookup(u64::MAX), None);
    assert_eq!(UnwindTable::default().lookup(0), None);
}

#[test]
fn sorting_and_merging() {
    let text = [(0u64, 1u64 << 40)];
    let raw = |pc, rule, off| RawRow {
        pc,
        row: UnwindRow::new(0, rule, off, rbp::SAME, 0),
    };
    let mut b = Builder::new(&text, 0);
    b.rows = vec![
        // FDE 0x200..0x300, read first.
        raw(0x200, cfa::RSP, 8),
        raw(0x210, cfa::RSP, 16),
        raw(0x2f0, cfa::RSP, 8),
        raw(0x300, cfa::NONE, 0),
        // FDE 0x100..0x200: its gap row at 0x200 loses to the real row there.
        raw(0x100, cfa::RSP, 8),
        raw(0x180, cfa::RSP, 8),
        raw(0x180, cfa::RSP, 24),
        raw(0x200, cfa::NONE, 0),
    ];
    let t = b.finish().unwrap();
    assert_eq!(t.base, 0x100);
    let got: Vec<(u32, u8, u16)> = t
        .rows
        .iter()
        .map(|r| (r.pc, r.cfa_rule(), r.cfa_offset))
        .collect();
    assert_eq!(
        got,
        [
            (0, cfa::RSP, 8),
            // Two rows at 0x180: the later one wins.
            (0x80, cfa::RSP, 24),
            (0x100, cfa::RSP, 8),
            (0x110, cfa::RSP, 16),
            (0x1f0, cfa::RSP, 8),
            (0x200, cfa::NONE, 0),
        ]
    );
    assert_eq!(t.stats.rows_before_merge, 8);
}

#[test]
fn too_many_rows_is_an_error() {
    let text = [(0u64, 1u64 << 40)];
    let mut b = Builder::new(&text, 0);
    // Alternating rules: nothing merges.
    b.rows = (0..=u64::from(MAX_TABLE_ROWS))
        .map(|i| RawRow {
            pc: i,
            row: UnwindRow::new(0, cfa::RSP, 8 * (1 + (i % 2) as u16), rbp::SAME, 0),
        })
        .collect();
    match b.finish() {
        Err(TableError::TooManyRows { rows }) => assert_eq!(rows, u64::from(MAX_TABLE_ROWS) + 1),
        other => panic!("{:?}", other.map(|t| t.rows.len())),
    }
    assert!(MAX_RAW_ROWS > u64::from(MAX_TABLE_ROWS));
}

/// A xorshift generator: deterministic mutations without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let libc = fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    for bad in [
        &b""[..],
        b"\x7fELF",
        &[0u8; 64],
        &libc[..4096],
        &libc[..libc.len() / 2],
    ] {
        assert!(build(bad).is_err());
    }
    // Not x86-64.
    let mut other_arch = libc.clone();
    other_arch[18] = 183; // EM_AARCH64
    assert!(matches!(build(&other_arch), Err(TableError::Elf(_))));
    // No unwind sections: the names renamed in .shstrtab.
    let mut renamed = libc.clone();
    for name in [&b".eh_frame\0"[..], b".debug_frame\0"] {
        let mut at = 0;
        while let Some(i) = renamed[at..].windows(name.len()).position(|w| w == name) {
            renamed[at + i + 1] = b'X';
            at += i + 1;
        }
    }
    assert!(matches!(build(&renamed), Err(TableError::NoUnwindInfo)));

    // Random damage to .eh_frame (and its neighbours) of a small binary:
    // an error or a table that keeps the invariants, never a panic.
    let dir = tempfile::tempdir().unwrap();
    let path = compile(dir.path(), "small", "c++", CXX_FIXTURE, &["-O2"]);
    let data = fs::read(&path).unwrap();
    let eh = readelf_sections(&path)
        .into_iter()
        .find(|s| s.name == ".eh_frame")
        .unwrap();
    let (start, len) = (eh.offset as usize, eh.size as usize);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err) = (0, 0);
    for round in 0..3000 {
        let mut d = data.clone();
        for _ in 0..1 + round % 8 {
            let i = start + (rng.next() as usize % len);
            d[i] = match rng.next() % 4 {
                0 => 0,
                1 => 0xff,
                _ => rng.next() as u8,
            };
        }
        match build(&d) {
            Ok(t) => {
                assert_invariants(&t);
                for _ in 0..16 {
                    let _ = t.lookup(t.base.wrapping_add(rng.next() % 0x10000));
                }
                ok += 1;
            }
            Err(_) => err += 1,
        }
    }
    println!("damaged .eh_frame: {ok} tables, {err} errors");
    assert!(ok > 0 && err > 0, "{ok} {err}");
}

fn libc_bytes() -> std::io::Result<Vec<u8>> {
    fs::read("/lib/x86_64-linux-gnu/libc.so.6")
}

#[test]
fn cache_memory_disk_and_corrupt_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = "0123456789abcdef";
    let mut cache = TableCache::new(64 << 20, Some(dir.path().to_owned())).unwrap();
    let first = cache.get_or_build(key, libc_bytes).unwrap();
    let second = cache
        .get_or_build(key, || panic!("a memory hit reads nothing"))
        .unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    let s = cache.stats();
    assert_eq!(
        (s.builds, s.memory_hits, s.disk_hits, s.tables),
        (1, 1, 0, 1)
    );
    assert_eq!(s.bytes, first.memory_bytes());

    let file = dir.path().join(format!("{key}.v1"));
    assert!(file.exists());

    // A new cache on the same directory: a disk hit, the same table.
    let mut cache = TableCache::new(64 << 20, Some(dir.path().to_owned())).unwrap();
    let from_disk = cache
        .get_or_build(key, || panic!("a disk hit reads nothing"))
        .unwrap();
    assert_eq!(*from_disk, *first);
    assert_eq!(cache.stats().disk_hits, 1);

    // A damaged file is rebuilt and replaced.
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&file, &bytes).unwrap();
    let mut cache = TableCache::new(64 << 20, Some(dir.path().to_owned())).unwrap();
    let rebuilt = cache.get_or_build(key, libc_bytes).unwrap();
    assert_eq!(*rebuilt, *first);
    let s = cache.stats();
    assert_eq!((s.disk_rejects, s.builds, s.disk_hits), (1, 1, 0));
    assert_eq!(fs::read(&file).unwrap(), first.to_bytes());
    // No temporary files are left behind.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // Build failures are errors, counted, and not cached.
    let err = cache.get_or_build("not-an-elf", || Ok(b"hello".to_vec()));
    assert!(matches!(err, Err(TableError::Elf(_))), "{err:?}");
    let err = cache.get_or_build("missing", || fs::read("/nonexistent/file"));
    assert!(matches!(err, Err(TableError::Io(_))), "{err:?}");
    let s = cache.stats();
    assert_eq!((s.build_failures, s.tables), (2, 1));
}

#[test]
fn cache_evicts_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = fixtures(dir.path());
    let tables: Vec<Vec<u8>> = fixtures.iter().map(|p| fs::read(p).unwrap()).collect();
    let one = build(&tables[0]).unwrap().memory_bytes();
    // Room for two tables of about that size, no directory.
    let mut cache = TableCache::new(one * 2 + one / 2, None).unwrap();
    for (i, data) in tables.iter().enumerate() {
        cache
            .get_or_build(&format!("k{i}"), || Ok(data.clone()))
            .unwrap();
        let s = cache.stats();
        assert!(s.bytes <= one * 2 + one / 2, "{s:?}");
    }
    let s = cache.stats();
    assert!(s.tables < tables.len() && s.tables >= 1, "{s:?}");
    // The most recent one is still there; the first was evicted.
    cache
        .get_or_build(&format!("k{}", tables.len() - 1), || panic!("evicted"))
        .unwrap();
    cache.get_or_build("k0", || Ok(tables[0].clone())).unwrap();
    assert_eq!(cache.stats().builds, tables.len() as u64 + 1);
}

#[test]
fn cache_file_names_are_safe() {
    assert_eq!(cache_file_name("00ff"), "00ff.v1");
    for key in [
        "../../etc/passwd",
        "/a/b",
        "dev:1:2 inode 3",
        "",
        ".hidden",
        "ABCD",
    ] {
        let name = cache_file_name(key);
        assert!(name.starts_with("k-") && name.ends_with(".v1"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "{name}"
        );
        assert!(!name.contains('/'));
    }
    // Keys differing only in unsafe characters get different files.
    assert_ne!(cache_file_name("a/b"), cache_file_name("a:b"));
    assert!(cache_file_name(&"x".repeat(1000)).len() < 100);
}
