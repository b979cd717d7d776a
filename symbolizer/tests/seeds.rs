//! The ELF seeds of symbolizer/fuzz (symbolizer/fuzz/make-seeds: a small C
//! program built by gcc -O2 with DWARF 5, with zlib-compressed DWARF, with
//! DWARF 4, and stripped) through `ElfLayout` and the `Symbolizer`, with
//! binutils as the oracle: `readelf` for segments and build id, `objdump`
//! for the instructions of each function, `addr2line -f -i` for the inline
//! chain and lines at every one of them.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use fathom_symbolizer::{
    Symbol, Symbolizer, SymbolizerConfig,
    elf::{ElfLayout, Segment},
};

const WITH_DWARF: [&str; 3] = ["prog-dwarf5", "prog-zdebug", "prog-dwarf4"];
/// `strip` of prog-dwarf4.
const STRIPPED: &str = "prog-stripped";

fn seed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/elf_symbolize")
        .join(name)
}

/// The tool on PATH; without it the test is skipped loudly, or fails under
/// CI=true (as `fathom_tests::require_tool`, which this crate cannot use).
fn require_tool(test: &str, tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()));
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: {tool} is missing"
        );
        eprintln!("*** SKIPPED {test}: {tool} is missing ***");
    }
    found
}

fn run(tool: &str, args: &[&str], file: &Path) -> String {
    let out = Command::new(tool).args(args).arg(file).output().unwrap();
    assert!(out.status.success(), "{tool} {args:?} {}", file.display());
    String::from_utf8(out.stdout).unwrap()
}

/// PT_LOAD segments as `readelf -lW` prints them.
fn readelf_segments(file: &Path) -> Vec<Segment> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    run("readelf", &["-lW"], file)
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD "))
        .map(|l| {
            // LOAD Offset VirtAddr PhysAddr FileSiz MemSiz Flg... Align; the
            // flags are "R E", "RW", ...: one or two words.
            let f: Vec<&str> = l.split_whitespace().collect();
            Segment {
                offset: hex(f[1]),
                vaddr: hex(f[2]),
                file_size: hex(f[4]),
                mem_size: hex(f[5]),
                executable: f[6..f.len() - 1].iter().any(|w| w.contains('E')),
            }
        })
        .collect()
}

fn readelf_build_id(file: &Path) -> String {
    run("readelf", &["-n"], file)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn layouts_match_readelf() {
    if !require_tool("layouts_match_readelf", "readelf") {
        return;
    }
    for name in WITH_DWARF.into_iter().chain([STRIPPED]) {
        let path = seed(name);
        let layout = ElfLayout::read(&File::open(&path).unwrap()).unwrap();
        let expected = readelf_segments(&path);
        assert!(expected.len() >= 2, "{name}: {expected:?}");
        assert_eq!(layout.segments, expected, "{name}");
        let build_id = readelf_build_id(&path);
        assert_eq!(build_id.len(), 40, "{name}: gcc's default sha1 build id");
        assert_eq!(layout.build_id_hex(), build_id, "{name}");
    }
    // strip keeps the program headers and the build id.
    let stripped = ElfLayout::read(&File::open(seed(STRIPPED)).unwrap()).unwrap();
    let original = ElfLayout::read(&File::open(seed("prog-dwarf4")).unwrap()).unwrap();
    assert_eq!(stripped.segments, original.segments);
    assert_eq!(stripped.build_id, original.build_id);
}

/// Instruction addresses of each function named in `names`, from `objdump
/// -d`, inside the function's size as `nm -S` gives it (objdump also lists
/// the padding after it).
fn instructions(file: &Path, names: &[&str]) -> Vec<(String, Vec<u64>)> {
    let symtab = if file.ends_with(STRIPPED) {
        seed("prog-dwarf4")
    } else {
        file.to_owned()
    };
    let sizes: Vec<(String, u64, u64)> = run("nm", &["-S"], &symtab)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            (f.len() == 4).then(|| Some((f[3].to_owned(), hex(f[0])?, hex(f[1])?)))?
        })
        .collect();
    let inside = |name: &str, addr: u64| {
        sizes
            .iter()
            .any(|(n, start, size)| n == name && addr >= *start && addr - start < *size)
    };
    let mut functions: Vec<(String, Vec<u64>)> = Vec::new();
    let mut current = None;
    for line in run("objdump", &["-d", "--no-show-raw-insn"], file).lines() {
        // "0000000000001190 <hash>:"
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|(_, n)| n)
        {
            current = names.contains(&name).then(|| {
                functions.push((name.to_owned(), Vec::new()));
                functions.len() - 1
            });
        } else if let (Some(i), Some((addr, _))) = (current, line.trim_start().split_once(":\t"))
            && let Ok(addr) = u64::from_str_radix(addr, 16)
            && inside(&functions[i].0, addr)
        {
            functions[i].1.push(addr);
        }
    }
    functions
}

/// (function, file name, line) innermost first, as `addr2line -f -i` says.
type Chain = Vec<(String, String, Option<u32>)>;

fn addr2line(file: &Path, addrs: &[u64]) -> Vec<Chain> {
    let mut args = vec![
        "-f".to_owned(),
        "-i".to_owned(),
        "-a".to_owned(),
        "-e".to_owned(),
    ];
    args.push(file.display().to_string());
    args.extend(addrs.iter().map(|a| format!("{a:#x}")));
    let out = Command::new("addr2line").args(&args).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut chains: Vec<Chain> = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("0x") {
            chains.push(Vec::new());
            continue;
        }
        let function = line.to_owned();
        // "/src/prog.c:13", "/src/prog.c:14 (discriminator 1)", "??:?"
        let location = lines.next().unwrap();
        let location = location.split(" (discriminator").next().unwrap();
        let (path, line) = location.rsplit_once(':').unwrap();
        let file = path.rsplit('/').next().unwrap().to_owned();
        chains
            .last_mut()
            .unwrap()
            .push((function, file, line.parse().ok().filter(|&l| l != 0)));
    }
    assert_eq!(chains.len(), addrs.len());
    chains
}

fn chain(symbol: &Symbol) -> Chain {
    match symbol {
        Symbol::Known(frames) => frames
            .iter()
            .map(|f| {
                let file = f.file.as_deref().unwrap_or("??");
                let file = file.rsplit('/').next().unwrap().to_owned();
                (f.function.clone(), file, f.line)
            })
            .collect(),
        Symbol::Unknown(why) => panic!("unknown: {why}"),
    }
}

#[test]
fn every_instruction_matches_addr2line() {
    for tool in ["objdump", "addr2line", "nm"] {
        if !require_tool("every_instruction_matches_addr2line", tool) {
            return;
        }
    }
    let symbolizer = Symbolizer::new(&SymbolizerConfig {
        debug_dirs: Vec::new(),
        ..SymbolizerConfig::default()
    });
    for name in WITH_DWARF {
        let path = seed(name);
        let functions = instructions(&path, &["main", "hash", "work"]);
        assert_eq!(functions.len(), 3, "{name}: {functions:?}");
        let mut inlined = 0;
        for (function, addrs) in functions {
            assert!(addrs.len() >= 5, "{name} {function}: {addrs:?}");
            let expected = addr2line(&path, &addrs);
            let got = symbolizer.elf_virtual_addresses(&path, &addrs);
            for ((addr, expected), got) in addrs.iter().zip(&expected).zip(&got) {
                let at = format!("{name} at {addr:#x} in {function}");
                assert!(
                    matches!(got, Symbol::Known(_)),
                    "{at}: {got:?}, addr2line: {expected:?}"
                );
                assert_eq!(&chain(got), expected, "{at}");
                inlined += usize::from(expected.len() > 1);
            }
        }
        // mix() is inlined into hash(), and hash() into work().
        assert!(inlined >= 3, "{name}: {inlined} inlined addresses");
    }
}

#[test]
fn stripped_seed_has_no_function_symbols() {
    for tool in ["objdump", "nm"] {
        if !require_tool("stripped_seed_has_no_function_symbols", tool) {
            return;
        }
    }
    // The oracle: nm finds no symbol table, and the dynamic one has only
    // imports and weak references.
    let out = Command::new("nm").arg(seed(STRIPPED)).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no symbols"));
    assert!(
        run("nm", &["-D", "--defined-only"], &seed(STRIPPED))
            .lines()
            .all(|l| l.trim().is_empty())
    );
    let addrs: Vec<u64> = instructions(&seed("prog-dwarf4"), &["hash"])
        .into_iter()
        .flat_map(|(_, a)| a)
        .collect();
    assert!(!addrs.is_empty());
    let symbolizer = Symbolizer::new(&SymbolizerConfig::default());
    for s in symbolizer.elf_virtual_addresses(&seed(STRIPPED), &addrs) {
        assert!(matches!(s, Symbol::Unknown(_)), "{s:?}");
    }
}
