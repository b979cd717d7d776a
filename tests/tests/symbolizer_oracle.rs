//! The symbolizer's accuracy against an independent oracle,
//! `addr2line -a -f -i -C` (GNU binutils).
//!
//! Fixture programs in C, C++, Rust and Go (tests/fixtures/symbolizer/) are
//! compiled here with pinned flags (builds are cached in the target dir by a
//! hash of source, compiler version and flags). The addresses come from the
//! binary as other tools see it: every FUNC symbol of size > 0 in an
//! executable section (`readelf -sW`) plus every Nth instruction inside those
//! functions (`objdump -d`). For each address the whole inline chain
//! (innermost first) must name the same functions as `addr2line`, and the
//! file:line of each frame must agree. Stripped copies whose debug info lives
//! in a separate file (next to the binary through `.gnu_debuglink`, or in a
//! configured debug dir under `.build-id/xx/rest.debug`) must give the same
//! answers as the unstripped binary.
//!
//! Where our name differs from addr2line's and neither is wrong, the
//! difference must fall in one of the [`Deviation`]s, each identified by a
//! precise, independently checked condition and bounded per binary; anything
//! else fails.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
};

use fathom_symbolizer::{Symbol, Symbolizer, SymbolizerConfig};
use fathom_tests::{require_tool, workspace_root};

/// C and C++, with frame pointers.
const CC_FP: &[&str] = &["-O2", "-g", "-fno-omit-frame-pointer"];
/// C and C++, without frame pointers.
const CC_NO_FP: &[&str] = &["-O2", "-g", "-fomit-frame-pointer"];
/// Rust with the default (legacy) symbol mangling: on stable rustc
/// `-C symbol-mangling-version=legacy` needs `-Z unstable-options`, and
/// legacy is what stable uses without the flag.
const RUST_LEGACY: &[&str] = &["--edition=2021", "-C", "opt-level=3", "-g"];
/// Rust with v0 symbol mangling (stable since Rust 1.59).
const RUST_V0: &[&str] = &[
    "--edition=2021",
    "-C",
    "opt-level=3",
    "-g",
    "-C",
    "symbol-mangling-version=v0",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lang {
    C,
    Cpp,
    Rust,
    Go,
}

impl Lang {
    fn compiler(self) -> &'static str {
        match self {
            Lang::C => "gcc",
            Lang::Cpp => "g++",
            Lang::Rust => "rustc",
            Lang::Go => "go",
        }
    }
}

/// Why a function name of ours may differ from addr2line's although ours is
/// right (or both are): each is recognised by a precise condition checked
/// with other tools, counted, and bounded per fixture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Deviation {
    /// binutils (`_bfd_dwarf2_find_nearest_line`, bfd/dwarf2.c) may name
    /// the innermost function after the ELF symbol that starts where it
    /// starts when its DWARF entry has no `DW_AT_linkage_name` (seen here:
    /// Go functions, C++ functions instantiated on lambda types), and keeps
    /// that name for later lookups, where the function may be an outer
    /// frame. For a real function that is the same function by its symbol
    /// name (`_M_manager` is `std::_Function_handler<…>::_M_manager(…)`,
    /// `runtime.call64` is `runtime.call64.abi0`); for an inlined function
    /// that starts at its caller's entry it is the wrong function (the
    /// caller), as `llvm-addr2line` confirms. We report the DWARF name for
    /// inlined frames and Go functions; an outermost C++ function gets
    /// its ELF symbol's name (so it agrees with addr2line at the entry). Condition: our frame has no mangled name, addr2line's
    /// is a name of the ELF symbol covering the address, and ours is the
    /// DWARF name: a part of that symbol's name for the outermost frame,
    /// `llvm-addr2line`'s name at the same depth for an inlined one.
    SymbolRename,
    /// The reverse of the outermost [`Deviation::SymbolRename`], away from
    /// a function's entry: there addr2line names a function without
    /// `DW_AT_linkage_name` by its bare DWARF name (`sum_of_squares<int>`,
    /// `_M_invoke`), while we name it, at every address, after the mangled
    /// ELF symbol that starts where it starts (our choice: pprof's
    /// `system_name` is the linkage name, its function name the
    /// demangling). Condition: the outermost frame, our `system_name` is
    /// the name of the ELF symbol covering the address (readelf), and
    /// libiberty's demangling of it names addr2line's function (equal, or
    /// it after `::` or a return type, before the parameters).
    ElfSymbolName,
    /// Identical code folding: several ELF symbols at the address, and the
    /// two tools picked different ones (both names are of that address).
    Alias,
    /// C++: `c++filt` (libiberty, which addr2line uses) demangles our very
    /// mangled name (`system_name`) to addr2line's name; our demangler
    /// (the `cpp_demangle` crate) renders it differently. Includes
    /// `cpp_demangle` bugs: template constructors lose their first parameter,
    /// `&&` on parameter packs and empty packs are misprinted, `sr` template
    /// arguments fail to demangle; and renderings: `(unsigned long)0` for
    /// `0ul`, `std::nullptr_t` for `decltype(nullptr)`.
    CppDemangler,
}

/// One fixture binary: a source built with one set of flags.
#[derive(Clone, Copy, Debug)]
struct Fixture {
    /// Names the binary (and its cache directory).
    name: &'static str,
    /// File in tests/fixtures/symbolizer/.
    source: &'static str,
    lang: Lang,
    flags: &'static [&'static str],
    /// The most addresses each deviation may explain (none when unlisted).
    deviations: &'static [(Deviation, usize)],
}

const C_FP: Fixture = Fixture {
    name: "c-fp",
    source: "inline.c",
    lang: Lang::C,
    flags: CC_FP,
    // No deviation: C function names agree exactly.
    deviations: &[],
};
const C_NO_FP: Fixture = Fixture {
    name: "c-nofp",
    flags: CC_NO_FP,
    ..C_FP
};
const CPP_FP: Fixture = Fixture {
    name: "cpp-fp",
    source: "templates.cpp",
    lang: Lang::Cpp,
    flags: CC_FP,
    // Measured (GCC 12, binutils 2.40): 24..25, 3 and 119..129 addresses.
    // SymbolRename is only of inlined frames (where addr2line is wrong):
    // outermost functions without linkage name get their ELF symbol's name.
    deviations: &[
        (Deviation::SymbolRename, 25),
        (Deviation::ElfSymbolName, 3),
        (Deviation::CppDemangler, 155),
    ],
};
const CPP_NO_FP: Fixture = Fixture {
    name: "cpp-nofp",
    flags: CC_NO_FP,
    ..CPP_FP
};
const RUST_LEGACY_FX: Fixture = Fixture {
    name: "rust-legacy",
    source: "generics.rs",
    lang: Lang::Rust,
    flags: RUST_LEGACY,
    // Measured (Rust 1.95): 0 (legacy) and 5 (v0) folded std functions.
    deviations: &[(Deviation::Alias, 10)],
};
const RUST_V0_FX: Fixture = Fixture {
    name: "rust-v0",
    flags: RUST_V0,
    ..RUST_LEGACY_FX
};
const GO: Fixture = Fixture {
    name: "go",
    source: "goprog.go",
    lang: Lang::Go,
    flags: &[],
    // Measured (Go 1.19): 267 addresses, mostly `.abi0` assembly symbols.
    // Our deliberate choice: the symbolizer keeps Go's DWARF name
    // (`runtime.call64`, as Go's own tools show it) rather than the ELF
    // symbol with the linker's ABI-wrapper suffix (`runtime.call64.abi0`).
    deviations: &[(Deviation::SymbolRename, 267)],
};

/// Whether the tools this test runs are here; `false` (after a printed
/// reason) skips.
fn tools_present(test: &str, fixture: &Fixture, stripped: bool) -> bool {
    let mut tools = vec![
        "addr2line",
        "llvm-addr2line",
        "readelf",
        "objdump",
        "nm",
        "c++filt",
        fixture.lang.compiler(),
    ];
    if stripped {
        tools.push("objcopy");
    }
    tools
        .into_iter()
        .all(|tool| require_tool(test, tool).is_some())
}

fn run(cmd: &mut Command) -> String {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs `cmd` with `input` on stdin; returns stdout.
fn run_with_input(cmd: &mut Command, input: String) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(output.status.success(), "{cmd:?} failed");
    String::from_utf8(output.stdout).unwrap()
}

fn cache_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("symbolizer-oracle")
}

/// Builds `fixture` (or reuses the build cached under the hash of source,
/// source path, compiler version and flags) and returns the binary.
fn build(fixture: &Fixture) -> PathBuf {
    let source = workspace_root()
        .join("tests/fixtures/symbolizer")
        .join(fixture.source);
    let compiler = fixture.lang.compiler();
    let version = run(Command::new(compiler).arg(if fixture.lang == Lang::Go {
        "version"
    } else {
        "--version"
    }));
    let mut hasher = DefaultHasher::new();
    std::fs::read(&source).unwrap().hash(&mut hasher);
    source.hash(&mut hasher);
    version.hash(&mut hasher);
    fixture.flags.hash(&mut hasher);
    let dir = cache_root().join(format!("{}-{:016x}", fixture.name, hasher.finish()));
    let binary = dir.join(fixture.name);
    if binary.exists() {
        return binary;
    }
    std::fs::create_dir_all(&dir).unwrap();
    // Built under a name of this process and renamed: a binary that exists
    // is complete, also when test processes share the target dir.
    let partial = dir.join(format!("{}.partial-{}", fixture.name, std::process::id()));
    let mut cmd = Command::new(compiler);
    match fixture.lang {
        Lang::C | Lang::Cpp => {
            cmd.args(fixture.flags).arg("-o").arg(&partial).arg(&source);
        }
        Lang::Rust => {
            cmd.args(fixture.flags)
                .args(["--crate-name", "generics", "-o"])
                .arg(&partial)
                .arg(&source);
        }
        Lang::Go => {
            // A go.mod-less build of one file that imports only the standard
            // library (GOPATH mode: no module resolution, no proxy); all that
            // Go writes stays under the target dir.
            let go = cache_root().join("go");
            cmd.args(["build", "-o"])
                .arg(&partial)
                .arg(&source)
                .current_dir(&dir)
                .env("GOCACHE", go.join("cache"))
                .env("GOPATH", go.join("path"))
                .env("GOFLAGS", "")
                .env("GO111MODULE", "off")
                .env("GOPROXY", "off")
                .env("GOTOOLCHAIN", "local")
                .env("GOENV", "off");
        }
    }
    run(&mut cmd);
    std::fs::rename(&partial, &binary).unwrap();
    binary
}

/// One function symbol, as `readelf -sW` shows it.
#[derive(Clone, Debug)]
struct FuncSym {
    addr: u64,
    size: u64,
    name: String,
}

/// Every FUNC symbol of size > 0 in an executable section (`.symtab` and
/// `.dynsym`), one per address (aliases share the first name seen).
fn function_symbols(binary: &Path) -> Vec<FuncSym> {
    let sections = run(Command::new("readelf").arg("-SW").arg(binary));
    // "  [14] .text   PROGBITS  0000000000001040 001040 000183 00  AX  0   0 16"
    let executable: Vec<String> = sections
        .lines()
        .filter_map(|l| {
            let l = l.trim_start().strip_prefix('[')?;
            let (index, rest) = l.split_once(']')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // name type addr off size es flags...: the flags field is the
            // one after the entry size.
            let flags = fields.get(6)?;
            flags.contains('X').then(|| index.trim().to_owned())
        })
        .collect();
    assert!(!executable.is_empty(), "no executable section: {sections}");
    let symbols = run(Command::new("readelf").arg("-sW").arg(binary));
    let mut by_addr: BTreeMap<u64, FuncSym> = BTreeMap::new();
    for line in symbols.lines() {
        // "    27: 0000000000001139    35 FUNC    GLOBAL DEFAULT   14 main"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[3] != "FUNC" || !executable.iter().any(|s| s == f[6]) {
            continue;
        }
        let size = match f[2].strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => f[2].parse().unwrap(),
        };
        let addr = u64::from_str_radix(f[1], 16).unwrap();
        if size > 0 {
            by_addr.entry(addr).or_insert_with(|| FuncSym {
                addr,
                size,
                name: f[7].split('@').next().unwrap().to_owned(),
            });
        }
    }
    by_addr.into_values().collect()
}

/// Demangled names (`nm -C`, libiberty like addr2line) of the defined
/// symbols at each address; several where code was folded.
fn nm_names(binary: &Path) -> HashMap<u64, Vec<String>> {
    let text = run(Command::new("nm")
        .args(["-C", "--defined-only"])
        .arg(binary));
    let mut names: HashMap<u64, Vec<String>> = HashMap::new();
    for line in text.lines() {
        // "0000000000001d70 t double (anonymous namespace)::sum<double>(…)"
        let mut parts = line.splitn(3, ' ');
        let (Some(addr), Some(_kind), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if let Ok(addr) = u64::from_str_radix(addr, 16) {
            names.entry(addr).or_default().push(name.to_owned());
        }
    }
    names
}

/// Instruction addresses of `binary` (`objdump -d`), sorted.
fn instructions(binary: &Path) -> Vec<u64> {
    let text = run(Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(binary));
    // "    1139:\tpush   %rbp"
    let mut addrs: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with(' '))
        .filter_map(|l| {
            let (addr, rest) = l.trim_start().split_once(":\t")?;
            (!rest.trim().is_empty() && !rest.starts_with("(bad)"))
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// Whether a function (by its symbol) is the fixture's own code, as
/// opposed to the standard library or runtime linked into Rust and Go
/// binaries (C and C++ binaries link theirs dynamically: all is own code).
fn own_function(lang: Lang, name: &str) -> bool {
    match lang {
        Lang::C | Lang::Cpp => true,
        // Mangled names of the crate's items and of generic std code
        // instantiated for its types both spell the crate name.
        Lang::Rust => name.contains("generics"),
        Lang::Go => name.starts_with("main."),
    }
}

/// The addresses checked in a binary: every function entry of its own code
/// and of about 300 library functions, plus every Nth instruction inside
/// those functions (about 1500 in all). Deterministic.
fn sample_addresses(binary: &Path, lang: Lang) -> (Vec<FuncSym>, Vec<u64>) {
    let all = function_symbols(binary);
    let (own, other): (Vec<FuncSym>, Vec<FuncSym>) =
        all.into_iter().partition(|f| own_function(lang, &f.name));
    let stride = other.len().div_ceil(300).max(1);
    let mut functions: Vec<FuncSym> = own
        .into_iter()
        .chain(other.into_iter().step_by(stride))
        .collect();
    functions.sort_by_key(|f| f.addr);
    let insns = instructions(binary);
    let inside: Vec<u64> = functions
        .iter()
        .flat_map(|f| {
            let lo = insns.partition_point(|&a| a <= f.addr);
            let hi = insns.partition_point(|&a| a < f.addr + f.size);
            insns[lo..hi.max(lo)].iter().copied()
        })
        .collect();
    let stride = inside.len().div_ceil(1500).max(1);
    let mut addrs: Vec<u64> = functions.iter().map(|f| f.addr).collect();
    addrs.extend(inside.into_iter().step_by(stride));
    (functions, addrs)
}

/// One function of an inline chain.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Frame {
    function: String,
    file: Option<String>,
    line: Option<u32>,
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {}:{}",
            self.function,
            self.file.as_deref().unwrap_or("??"),
            self.line.map_or_else(|| "?".to_owned(), |l| l.to_string())
        )
    }
}

/// `TOOL -a -f -i -C -e BINARY` on all `addrs` at once (on stdin): the
/// inline chain of each address, innermost first. GNU addr2line prints each
/// address as `0x%016x`, llvm-addr2line as `0x%x`.
fn inline_chains(tool: &str, binary: &Path, addrs: &[u64]) -> Vec<Vec<Frame>> {
    let header = |a: u64| {
        if tool == "addr2line" {
            format!("{a:#018x}")
        } else {
            format!("{a:#x}")
        }
    };
    let input: String = addrs.iter().map(|a| format!("{a:#x}\n")).collect();
    let text = run_with_input(
        Command::new(tool)
            .args(["-a", "-f", "-i", "-C", "-e"])
            .arg(binary),
        input,
    );
    let mut lines = text.lines().peekable();
    let mut chains = Vec::with_capacity(addrs.len());
    for (i, &addr) in addrs.iter().enumerate() {
        assert_eq!(lines.next(), Some(header(addr).as_str()), "{tool} output");
        let next = addrs.get(i + 1).map(|&a| header(a));
        let mut chain = Vec::new();
        while lines.peek().is_some() && lines.peek().copied() != next.as_deref() {
            let function = lines.next().unwrap().to_owned();
            let location = lines.next().expect("function without location");
            chain.push(parse_location(function, location));
        }
        assert!(!chain.is_empty(), "{tool} printed nothing for {addr:#x}");
        chains.push(chain);
    }
    assert!(lines.next().is_none(), "{tool} printed more than asked");
    chains
}

/// "FILE:LINE", "FILE:LINE (discriminator N)", "FILE:?" (line 0), "??:0".
fn parse_location(function: String, location: &str) -> Frame {
    let location = location
        .split_once(" (discriminator ")
        .map_or(location, |(l, _)| l);
    let (file, line) = location
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("addr2line location {location:?}"));
    Frame {
        function,
        file: (file != "??").then(|| file.to_owned()),
        // Line 0: code attributed to no source line.
        line: line.parse().ok().filter(|&l| l != 0),
    }
}

/// `c++filt` (libiberty) on each name.
fn cxxfilt(names: &[&str]) -> Vec<String> {
    let input: String = names.iter().map(|n| format!("{n}\n")).collect();
    let text = run_with_input(&mut Command::new("c++filt"), input);
    let out: Vec<String> = text.lines().map(str::to_owned).collect();
    assert_eq!(out.len(), names.len(), "c++filt output: {text}");
    out
}

/// What addr2line (and the binary's symbol tables) say about a fixture's
/// sampled addresses: computed once per test binary and shared by the tests
/// of the fixture's variants.
struct Oracle {
    fixture: Fixture,
    binary: PathBuf,
    functions: Vec<FuncSym>,
    nm: HashMap<u64, Vec<String>>,
    addrs: Vec<u64>,
    chains: Vec<Vec<Frame>>,
}

impl Oracle {
    /// The sampled function whose symbol covers `addr`.
    fn covering(&self, addr: u64) -> Option<&FuncSym> {
        let i = self.functions.partition_point(|f| f.addr <= addr);
        self.functions[..i]
            .iter()
            .rev()
            .find(|f| addr < f.addr + f.size)
    }

    /// Demangled names of the ELF symbols covering `addr` (aliases too).
    fn symbol_names(&self, addr: u64) -> &[String] {
        self.covering(addr)
            .and_then(|f| self.nm.get(&f.addr))
            .map_or(&[], Vec::as_slice)
    }
}

fn oracle(fixture: &Fixture) -> &'static Oracle {
    static ORACLES: Mutex<Vec<(&'static str, &'static OnceLock<Oracle>)>> = Mutex::new(Vec::new());
    let cell = {
        let mut oracles = ORACLES.lock().unwrap_or_else(|e| e.into_inner());
        match oracles.iter().find(|(name, _)| *name == fixture.name) {
            Some((_, cell)) => *cell,
            None => {
                let cell: &'static OnceLock<Oracle> = Box::leak(Box::default());
                oracles.push((fixture.name, cell));
                cell
            }
        }
    };
    cell.get_or_init(|| {
        let binary = build(fixture);
        let (functions, addrs) = sample_addresses(&binary, fixture.lang);
        let chains = inline_chains("addr2line", &binary, &addrs);
        Oracle {
            fixture: *fixture,
            nm: nm_names(&binary),
            binary,
            functions,
            addrs,
            chains,
        }
    })
}

/// Our answer, in the oracle's terms (an unknown address is addr2line's
/// "??" at "??:0"), with each frame's name as in the binary.
fn ours(symbol: &Symbol) -> Vec<OurFrame> {
    match symbol {
        Symbol::Known(frames) => frames
            .iter()
            .map(|f| {
                let frame = Frame {
                    function: f.function.clone(),
                    file: f.file.clone(),
                    line: f.line,
                };
                (frame, f.system_name.clone())
            })
            .collect(),
        Symbol::Unknown(_) => vec![(
            Frame {
                function: "??".into(),
                file: None,
                line: None,
            },
            "??".into(),
        )],
    }
}

/// Our frame, with its function's name as in the binary.
type OurFrame = (Frame, String);

/// An address whose chains name different functions: (address, oracle's
/// chain, ours).
type NameDifference<'a> = (u64, &'a Vec<Frame>, &'a Vec<OurFrame>);

/// Whether the demangled `full` name is of the function `short` (a DWARF
/// name): equal, or `short` after `::` or a return type and before the
/// parameter list.
fn names_function(full: &str, short: &str) -> bool {
    full == short
        || [format!("::{short}("), format!(" {short}(")]
            .iter()
            .any(|n| full.contains(n.as_str()))
        || full.starts_with(&format!("{short}("))
}

fn is_mangled(name: &str) -> bool {
    name.starts_with("_Z") || name.starts_with("_R")
}

/// Agreement of one symbolization with the oracle.
#[derive(Debug, Default)]
struct Agreement {
    addresses: usize,
    /// Addresses whose chains name the same functions in the same order.
    names: usize,
    /// Addresses whose chains differ only by explained deviations.
    deviations: BTreeMap<Deviation, usize>,
    /// Frames of the oracle's chains, and those whose line / file ours has
    /// the same at the same depth. A frame addr2line gives no line (a line
    /// 0 row, printed "FILE:?") has its file compared only when ours has a
    /// file: line 0 means no source position, and we report none.
    frames: usize,
    lines: usize,
    files: usize,
    /// Frames whose file is not compared: addr2line prints a line 0 row's
    /// file, we report no location.
    line_zero_files: usize,
    /// The addresses that differ in anything: (address, oracle, ours).
    differences: Vec<(u64, Vec<Frame>, Vec<Frame>)>,
    /// Addresses whose names differ in a way no deviation explains.
    unexplained: Vec<u64>,
}

impl Agreement {
    /// `what` describes the comparison; `key` names its file of
    /// differences.
    fn measure(what: &str, key: &str, oracle: &Oracle, symbols: &[Symbol]) -> Self {
        let ours: Vec<Vec<OurFrame>> = symbols.iter().map(ours).collect();
        let mut a = Agreement {
            addresses: oracle.addrs.len(),
            ..Agreement::default()
        };
        let mut name_differences = Vec::new();
        for ((&addr, theirs), ours) in oracle.addrs.iter().zip(&oracle.chains).zip(&ours) {
            let names_equal = theirs.len() == ours.len()
                && theirs
                    .iter()
                    .zip(ours)
                    .all(|(t, (o, _))| t.function == o.function);
            if names_equal {
                a.names += 1;
            } else {
                name_differences.push((addr, theirs, ours));
            }
            a.frames += theirs.len();
            for (t, (o, _)) in theirs.iter().zip(ours) {
                a.lines += usize::from(t.line == o.line);
                if t.file == o.file {
                    a.files += 1;
                } else if t.line.is_none() && o.file.is_none() {
                    a.files += 1;
                    a.line_zero_files += 1;
                }
            }
            let ours: Vec<Frame> = ours.iter().map(|(f, _)| f.clone()).collect();
            if *theirs != ours {
                a.differences.push((addr, theirs.clone(), ours));
            }
        }
        a.explain(oracle, &name_differences);
        a.report(what, key);
        a
    }

    /// Sorts the name differences into deviations or unexplained ones.
    fn explain(&mut self, oracle: &Oracle, differences: &[NameDifference<'_>]) {
        // The independent views the conditions need, for these addresses
        // only: libiberty's reading of our mangled names, and the chains
        // llvm-addr2line (DWARF names for inlined functions) sees.
        let mangled: Vec<&str> = differences
            .iter()
            .flat_map(|(_, _, ours)| ours.iter().map(|(_, s)| s.as_str()))
            .filter(|s| is_mangled(s))
            .collect();
        let libiberty: HashMap<&str, String> =
            mangled.iter().copied().zip(cxxfilt(&mangled)).collect();
        let addrs: Vec<u64> = differences.iter().map(|(a, _, _)| *a).collect();
        let llvm: HashMap<u64, Vec<Frame>> = if addrs.is_empty() {
            HashMap::new()
        } else {
            addrs
                .iter()
                .copied()
                .zip(inline_chains("llvm-addr2line", &oracle.binary, &addrs))
                .collect()
        };
        for &(addr, theirs, ours) in differences {
            if theirs.len() != ours.len() {
                self.unexplained.push(addr);
                continue;
            }
            let mut kinds = Vec::new();
            for (depth, (t, (o, system_name))) in theirs.iter().zip(ours).enumerate() {
                if t.function == o.function {
                    continue;
                }
                let symbol_names = oracle.symbol_names(addr);
                // The renamed function can be any frame of the chain:
                // binutils keeps the name it gave, and prints it again when
                // the function is the caller of another.
                let outermost = depth + 1 == theirs.len();
                let kind = if outermost
                    && is_mangled(system_name)
                    && oracle
                        .covering(addr)
                        .is_some_and(|f| f.name == *system_name)
                    && libiberty
                        .get(system_name.as_str())
                        .is_some_and(|d| names_function(d, &t.function))
                {
                    Some(Deviation::ElfSymbolName)
                } else if !is_mangled(system_name)
                    && symbol_names.contains(&t.function)
                    && (if outermost {
                        t.function.contains(&o.function)
                    } else {
                        llvm.get(&addr)
                            .and_then(|chain| chain.get(depth))
                            .is_some_and(|f| f.function == o.function)
                    })
                {
                    Some(Deviation::SymbolRename)
                } else if depth == 0
                    && symbol_names.contains(&t.function)
                    && symbol_names.contains(&o.function)
                {
                    Some(Deviation::Alias)
                } else if oracle.fixture.lang == Lang::Cpp
                    && libiberty.get(system_name.as_str()) == Some(&t.function)
                {
                    Some(Deviation::CppDemangler)
                } else {
                    None
                };
                kinds.push(kind);
            }
            match kinds.iter().copied().collect::<Option<Vec<Deviation>>>() {
                Some(kinds) => {
                    // An address counts once, under its first deviation.
                    *self.deviations.entry(kinds[0]).or_default() += 1;
                }
                None => self.unexplained.push(addr),
            }
        }
    }

    fn report(&self, what: &str, key: &str) {
        let pct = |n: usize, d: usize| 100.0 * n as f64 / d.max(1) as f64;
        eprintln!(
            "{what}: {} addresses, function names (whole inline chain) {}/{} = {:.2}% \
             (known deviations {:?}, unexplained {}), lines {}/{} = {:.2}%, files {}/{} = {:.2}% \
             (frames; {} line-0 frames without file)",
            self.addresses,
            self.names,
            self.addresses,
            pct(self.names, self.addresses),
            self.deviations,
            self.unexplained.len(),
            self.lines,
            self.frames,
            pct(self.lines, self.frames),
            self.files,
            self.frames,
            pct(self.files, self.frames),
            self.line_zero_files,
        );
        let mut all = String::new();
        for (addr, theirs, ours) in &self.differences {
            let mark = if self.unexplained.contains(addr) {
                " UNEXPLAINED"
            } else {
                ""
            };
            all += &format!("{addr:#x}:{mark}\n");
            for i in 0..theirs.len().max(ours.len()) {
                let (t, o) = (theirs.get(i), ours.get(i));
                if t != o {
                    let show =
                        |f: Option<&Frame>| f.map_or_else(|| "-".to_owned(), Frame::to_string);
                    all += &format!(
                        "  [{i}] addr2line: {}\n  [{i}] ours:      {}\n",
                        show(t),
                        show(o)
                    );
                }
            }
        }
        let file = cache_root().join(format!("{key}.differences"));
        std::fs::write(&file, &all).unwrap();
        if !self.unexplained.is_empty() {
            for block in all
                .split_inclusive("\n0x")
                .filter(|b| b.contains("UNEXPLAINED"))
                .take(10)
            {
                eprint!("{block}");
            }
        }
        if !all.is_empty() {
            eprintln!("  (every difference: {})", file.display());
        }
    }

    /// The bar: every function name of every chain, but for the bounded
    /// deviations of the fixture; at least 99% of lines and of files.
    fn assert_passes(&self, what: &str, fixture: &Fixture) {
        assert!(
            self.addresses >= 300,
            "{what}: only {} addresses",
            self.addresses
        );
        assert!(
            self.unexplained.is_empty(),
            "{what}: function names differ from addr2line at {:#x?} (see above)",
            self.unexplained
        );
        for (deviation, &count) in &self.deviations {
            let bound = fixture
                .deviations
                .iter()
                .find(|(d, _)| d == deviation)
                .map_or(0, |(_, bound)| *bound);
            assert!(
                count <= bound,
                "{what}: {count} addresses with {deviation:?}, at most {bound} expected"
            );
        }
        assert!(
            self.lines * 100 >= self.frames * 99,
            "{what}: lines agree for {}/{} frames (< 99%)",
            self.lines,
            self.frames
        );
        assert!(
            self.files * 100 >= self.frames * 99,
            "{what}: files agree for {}/{} frames (< 99%)",
            self.files,
            self.frames
        );
    }
}

/// Symbolizes the oracle's addresses in `binary` (the fixture or a
/// stripped copy of it).
fn symbolize(oracle: &Oracle, binary: &Path, config: &SymbolizerConfig) -> Vec<Symbol> {
    let symbolizer = Symbolizer::new(config);
    let symbols = symbolizer.elf_virtual_addresses(binary, &oracle.addrs);
    assert_eq!(symbols.len(), oracle.addrs.len());
    symbols
}

/// GCC, LLVM and Go linker suffixes of ELF symbols that DWARF's names do
/// not carry: clones (`.isra.0`, `.constprop.0`, `.part.0`), split cold
/// parts (`.cold`), LLVM's promoted locals (`.llvm.<hash>`) and Go's
/// assembly ABI wrappers (`.abi0`).
fn strip_symbol_suffixes(mut name: &str) -> &str {
    loop {
        let before = name;
        for suffix in [".cold", ".abi0"] {
            name = name.strip_suffix(suffix).unwrap_or(name);
        }
        if let Some((head, number)) = name.rsplit_once('.')
            && !number.is_empty()
            && number.bytes().all(|b| b.is_ascii_digit())
        {
            for clone in [".isra", ".constprop", ".part", ".llvm", ".lto_priv"] {
                if let Some(stripped) = head.strip_suffix(clone) {
                    name = stripped;
                    break;
                }
            }
        }
        if name == before {
            return name;
        }
    }
}

/// `system_name` keeps the name as in the binary: at a function's entry,
/// the outermost frame's is the ELF symbol there (less a compiler suffix),
/// unless DWARF has no linkage name for the function (then it is the DWARF
/// name, which the name comparison checks); for C++ and Rust every frame
/// with a qualified (`::`) name has a mangled one.
fn check_system_names(what: &str, oracle: &Oracle, symbols: &[Symbol]) {
    let lang = oracle.fixture.lang;
    let entries: HashMap<u64, &FuncSym> = oracle.functions.iter().map(|f| (f.addr, f)).collect();
    let raw = run(Command::new("nm").arg("--defined-only").arg(&oracle.binary));
    let mut raw_names: HashMap<u64, Vec<&str>> = HashMap::new();
    for line in raw.lines() {
        let mut parts = line.splitn(3, ' ');
        if let (Some(addr), Some(_), Some(name)) = (parts.next(), parts.next(), parts.next())
            && let Ok(addr) = u64::from_str_radix(addr, 16)
        {
            raw_names.entry(addr).or_default().push(name);
        }
    }
    let mut mangled = 0;
    for (addr, symbol) in oracle.addrs.iter().zip(symbols) {
        let Symbol::Known(frames) = symbol else {
            continue;
        };
        if let (Some(entry), Some(outer)) = (entries.get(addr), frames.last())
            && (is_mangled(&outer.system_name) || matches!(lang, Lang::C | Lang::Go))
        {
            let names = raw_names.get(addr).map_or(&[][..], Vec::as_slice);
            assert!(
                names
                    .iter()
                    .any(|n| *n == outer.system_name
                        || strip_symbol_suffixes(n) == outer.system_name),
                "{what}: system name {:?} at the entry of {} ({addr:#x}); symbols there: {names:?}",
                outer.system_name,
                entry.name
            );
        }
        for frame in frames {
            // Qualified before any template arguments or parameters: a
            // DWARF name without linkage name may still spell qualified
            // names in its template arguments (`fold<int, ns::T>`).
            let head = frame.function.split(['<', '(']).next().unwrap_or_default();
            if matches!(lang, Lang::Cpp | Lang::Rust) && head.contains("::") {
                assert!(
                    is_mangled(&frame.system_name),
                    "{what}: {addr:#x}: {frame:?} has no mangled name"
                );
                mangled += 1;
            }
        }
    }
    if matches!(lang, Lang::Cpp | Lang::Rust) {
        assert!(mangled > 100, "{what}: only {mangled} mangled frames");
    }
}

fn describe(fixture: &Fixture) -> String {
    format!("{} ({})", fixture.name, fixture.flags.join(" "))
}

/// The whole comparison for one unstripped fixture.
fn check_fixture(test: &str, fixture: &Fixture) {
    if !tools_present(test, fixture, false) {
        return;
    }
    let oracle = oracle(fixture);
    let what = describe(fixture);
    let symbols = symbolize(oracle, &oracle.binary, &SymbolizerConfig::default());
    let agreement = Agreement::measure(&what, fixture.name, oracle, &symbols);
    check_system_names(&what, oracle, &symbols);
    agreement.assert_passes(&what, fixture);
}

#[test]
fn c_with_frame_pointers() {
    check_fixture("c_with_frame_pointers", &C_FP);
}

#[test]
fn c_without_frame_pointers() {
    check_fixture("c_without_frame_pointers", &C_NO_FP);
}

#[test]
fn cpp_with_frame_pointers() {
    check_fixture("cpp_with_frame_pointers", &CPP_FP);
}

#[test]
fn cpp_without_frame_pointers() {
    check_fixture("cpp_without_frame_pointers", &CPP_NO_FP);
}

#[test]
fn rust_legacy_mangling() {
    check_fixture("rust_legacy_mangling", &RUST_LEGACY_FX);
}

#[test]
fn rust_v0_mangling() {
    check_fixture("rust_v0_mangling", &RUST_V0_FX);
}

#[test]
fn go_default_build() {
    check_fixture("go_default_build", &GO);
}

/// Stripped copies of a fixture whose debug information lives elsewhere.
struct Stripped {
    /// Stripped binary with `NAME.debug` next to it (found through its
    /// `.gnu_debuglink`).
    next_to: PathBuf,
    /// The same stripped binary alone in its directory; its debug file is
    /// only under `debug_dir/.build-id/xx/rest.debug`.
    alone: PathBuf,
    debug_dir: PathBuf,
}

/// `objcopy --only-keep-debug`, `objcopy --strip-all`,
/// `objcopy --add-gnu-debuglink`, and the two layouts (cached next to the
/// fixture's build).
fn strip(binary: &Path) -> Stripped {
    let name = binary.file_name().unwrap().to_str().unwrap().to_owned();
    let root = binary.parent().unwrap().join("stripped");
    let stripped = Stripped {
        next_to: root.join("next-to").join(&name),
        alone: root.join("alone").join(&name),
        debug_dir: root.join("debug"),
    };
    if root.exists() {
        return stripped;
    }
    let partial = binary
        .parent()
        .unwrap()
        .join(format!("stripped.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let next_to = partial.join("next-to");
    std::fs::create_dir_all(&next_to).unwrap();
    let debug = next_to.join(format!("{name}.debug"));
    let bin = next_to.join(&name);
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(binary)
        .arg(&debug));
    run(Command::new("objcopy")
        .arg("--strip-all")
        .arg(binary)
        .arg(&bin));
    run(Command::new("objcopy")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(&bin));
    // The build id as readelf shows it: "    Build ID: 8a9b...".
    let notes = run(Command::new("readelf").arg("-n").arg(&bin));
    let build_id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in {}: {notes}", bin.display()))
        .to_owned();
    let by_id = partial
        .join("debug/.build-id")
        .join(&build_id[..2])
        .join(format!("{}.debug", &build_id[2..]));
    std::fs::create_dir_all(by_id.parent().unwrap()).unwrap();
    std::fs::copy(&debug, &by_id).unwrap();
    std::fs::create_dir_all(partial.join("alone")).unwrap();
    std::fs::copy(&bin, partial.join("alone").join(&name)).unwrap();
    // Another process may have won the race: its copy is as good.
    if std::fs::rename(&partial, &root).is_err() {
        assert!(root.exists(), "could not move {}", partial.display());
        let _ = std::fs::remove_dir_all(&partial);
    }
    stripped
}

/// The stripped copies give the unstripped binary's answers, with the debug
/// file next to the binary and with it only in a configured debug dir; and
/// without a way to the debug file they have no source locations (so the
/// debug file is what gave them).
fn check_stripped(test: &str, fixture: &Fixture) {
    if !tools_present(test, fixture, true) {
        return;
    }
    let oracle = oracle(fixture);
    let stripped = strip(&oracle.binary);
    let sections = run(Command::new("readelf").arg("-SW").arg(&stripped.alone));
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "{test}: not stripped: {sections}"
    );
    assert!(sections.contains(".gnu_debuglink"), "{sections}");

    let unstripped = symbolize(oracle, &oracle.binary, &SymbolizerConfig::default());
    let layouts = [
        (
            "debug file next to the binary",
            &stripped.next_to,
            SymbolizerConfig {
                debug_dirs: vec![],
                ..SymbolizerConfig::default()
            },
        ),
        (
            "debug file in a debug dir by build id",
            &stripped.alone,
            SymbolizerConfig {
                debug_dirs: vec![stripped.debug_dir.clone()],
                ..SymbolizerConfig::default()
            },
        ),
    ];
    for (key, (layout, binary, config)) in ["next-to", "build-id"].into_iter().zip(layouts) {
        let what = format!("{} stripped, {layout}", describe(fixture));
        let symbols = symbolize(oracle, binary, &config);
        let key = format!("{}-stripped-{key}", fixture.name);
        let agreement = Agreement::measure(&what, &key, oracle, &symbols);
        agreement.assert_passes(&what, fixture);
        let same = symbols
            .iter()
            .zip(&unstripped)
            .filter(|(s, u)| s == u)
            .count();
        assert_eq!(
            same,
            symbols.len(),
            "{what}: only {same}/{} addresses as in the unstripped binary",
            symbols.len()
        );
    }

    let blind = symbolize(
        oracle,
        &stripped.alone,
        &SymbolizerConfig {
            debug_dirs: vec![],
            ..SymbolizerConfig::default()
        },
    );
    let located = blind
        .iter()
        .filter(|s| matches!(s, Symbol::Known(frames) if frames.iter().any(|f| f.line.is_some())))
        .count();
    assert_eq!(located, 0, "{test}: source lines without the debug file");
}

#[test]
fn c_stripped_with_separate_debug_file() {
    check_stripped("c_stripped_with_separate_debug_file", &C_FP);
}

#[test]
fn cpp_stripped_with_separate_debug_file() {
    check_stripped("cpp_stripped_with_separate_debug_file", &CPP_NO_FP);
}

#[test]
fn rust_stripped_with_separate_debug_file() {
    check_stripped("rust_stripped_with_separate_debug_file", &RUST_V0_FX);
}
