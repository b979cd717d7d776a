//! Address symbolization for Fathom, wrapping [blazesym].
//!
//! One long-lived [`Symbolizer`] is the cache: blazesym keeps parsed ELF,
//! DWARF and kallsyms data between calls. It is not `Send`; own it on one
//! thread. Failure to resolve one address is a value ([`Symbol::Unknown`]),
//! never an error for the batch.

pub mod cache;
pub mod debug_file;
mod demangle;
pub mod elf;
pub mod perf_map;
pub mod service;

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    fmt,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use blazesym::symbolize::{
    self as bz, CodeInfo, Input, Symbolized,
    source::{Elf, Kernel, Source},
};

pub use cache::{Addressing, ObjectKey};
pub use demangle::demangle;
pub use service::{
    Lease, ObjectRequest, Request, Response, ServiceError, ServiceStats, SymbolizerService,
};

/// What the symbolizer resolves and where it looks.
#[derive(Clone, Debug)]
pub struct SymbolizerConfig {
    /// Resolve source files and line numbers (DWARF).
    pub line_numbers: bool,
    /// Report the chain of inlined functions at each address.
    pub inlined_functions: bool,
    /// Directories searched for separate debug files.
    pub debug_dirs: Vec<PathBuf>,
    /// Memory bound of the result cache of [`SymbolizerService`].
    pub cache_bytes: usize,
}

impl Default for SymbolizerConfig {
    fn default() -> Self {
        Self {
            line_numbers: true,
            inlined_functions: true,
            debug_dirs: vec![PathBuf::from("/usr/lib/debug")],
            cache_bytes: 16 << 20,
        }
    }
}

/// One function at an address. An address inside inlined code has several,
/// innermost first (the pprof `Location.line` order).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Demangled name.
    pub function: String,
    /// The name as in the binary (mangled for C++ and Rust).
    pub system_name: String,
    /// Source file, when debug information has it.
    pub file: Option<String>,
    /// Source line, when debug information has it (the call site for frames
    /// that inlined the next one).
    pub line: Option<u32>,
}

/// Why an address has no symbol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Unknown {
    /// No symbol covers the address.
    NoSymbol,
    /// The file offset is in no loadable segment of the file.
    InvalidFileOffset,
    /// The file has neither symbol tables nor debug information.
    MissingSymbols,
    /// The address is in no mapping of the process.
    Unmapped,
    /// The file could not be read or parsed.
    Unreadable(String),
    /// Something else the symbolizer does not support.
    Unsupported(String),
}

impl Unknown {
    /// A short stable label of the reason (for metrics).
    pub fn label(&self) -> &'static str {
        match self {
            Unknown::NoSymbol => "no_symbol",
            Unknown::InvalidFileOffset => "invalid_file_offset",
            Unknown::MissingSymbols => "missing_symbols",
            Unknown::Unmapped => "unmapped",
            Unknown::Unreadable(_) => "unreadable",
            Unknown::Unsupported(_) => "unsupported",
        }
    }
}

impl fmt::Display for Unknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unknown::NoSymbol => f.write_str("no symbol at address"),
            Unknown::InvalidFileOffset => f.write_str("offset outside loadable segments"),
            Unknown::MissingSymbols => f.write_str("no symbols in file"),
            Unknown::Unmapped => f.write_str("unmapped address"),
            Unknown::Unreadable(why) => write!(f, "unreadable file: {why}"),
            Unknown::Unsupported(why) => write!(f, "unsupported: {why}"),
        }
    }
}

/// The result for one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Symbol {
    /// Innermost frame first; never empty.
    Known(Vec<Frame>),
    Unknown(Unknown),
}

/// Counts of what was resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub resolved: u64,
    pub unknown: u64,
}

/// The symbolizer. Keeps its caches for its whole life.
pub struct Symbolizer {
    inner: bz::Symbolizer,
    kernel: Source<'static>,
    stats: Cell<Stats>,
    debug_dirs: Vec<PathBuf>,
    /// Separate debug files found for ELF symbol lookups, per binary.
    debug_files: RefCell<HashMap<PathBuf, Option<PathBuf>>>,
}

impl fmt::Debug for Symbolizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Symbolizer")
            .field("stats", &self.stats.get())
            .finish_non_exhaustive()
    }
}

impl Symbolizer {
    pub fn new(config: &SymbolizerConfig) -> Self {
        let inner = bz::Symbolizer::builder()
            .enable_code_info(config.line_numbers)
            .enable_inlined_fns(config.inlined_functions)
            // We demangle ourselves to keep the mangled name too.
            .enable_demangling(false)
            .set_debug_dirs(Some(&config.debug_dirs))
            .build();
        let kernel = Source::Kernel(Kernel {
            // Line numbers for the kernel would need a vmlinux with DWARF;
            // blazesym finds one in /boot or /usr/lib/debug/boot when present.
            debug_syms: config.line_numbers,
            ..Kernel::default()
        });
        Self {
            inner,
            kernel,
            stats: Cell::new(Stats::default()),
            debug_dirs: config.debug_dirs.clone(),
            debug_files: RefCell::new(HashMap::new()),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats.get()
    }

    /// Symbolizes offsets into the ELF file at `path` (file offsets, as
    /// `/proc/PID/maps` gives them). One result per offset, in order.
    pub fn elf_file_offsets(&self, path: &Path, offsets: &[u64]) -> Vec<Symbol> {
        if let Some(refused) = self.refuse(path, offsets.len()) {
            return refused;
        }
        self.symbolize_elf(path, offsets, |o| Input::FileOffset(o))
    }

    /// Symbolizes ELF virtual addresses (as `addr2line` and `nm` show them).
    pub fn elf_virtual_addresses(&self, path: &Path, addrs: &[u64]) -> Vec<Symbol> {
        if let Some(refused) = self.refuse(path, addrs.len()) {
            return refused;
        }
        self.symbolize_elf(path, addrs, |a| Input::VirtOffset(a))
    }

    /// Drops what blazesym keeps for the file at `path` (parsed data and its
    /// descriptor).
    pub fn evict_elf(&mut self, path: &Path) {
        let debug_file = self.debug_files.get_mut().remove(path).flatten();
        for path in std::iter::once(path).chain(debug_file.as_deref()) {
            if let Err(e) = self
                .inner
                .evict(&bz::evict::Elf::new(path.to_path_buf()).into())
            {
                tracing::debug!(path = %path.display(), error = %e, "evicting cached ELF data");
            }
        }
    }

    /// Symbolizes kernel addresses with kallsyms (and a vmlinux when found).
    pub fn kernel(&self, addrs: &[u64]) -> Vec<Symbol> {
        self.symbolize(&self.kernel, Input::AbsAddr(addrs), addrs.len())
    }

    /// An unreadable batch for a file blazesym would abort the process on
    /// (see [`elf::oversized_compressed_section`]); `None` for the others.
    fn refuse(&self, path: &Path, n: usize) -> Option<Vec<Symbol>> {
        // A file we cannot open: blazesym says why.
        let file = std::fs::File::open(path).ok()?;
        let oversized = elf::oversized_compressed_section(&file)?;
        tracing::warn!(path = %path.display(), %oversized, "not symbolizing a malformed ELF file");
        Some(self.count(vec![
            Symbol::Unknown(Unknown::Unreadable(
                oversized.to_string()
            ));
            n
        ]))
    }

    /// Symbolizes with DWARF (and the symbol tables), then names functions
    /// whose DWARF entry has no linkage name after their ELF symbol where
    /// that is the same function's mangled name (see [`elf_symbol_name`]).
    fn symbolize_elf(
        &self,
        path: &Path,
        addrs: &[u64],
        input: fn(&[u64]) -> Input<&[u64]>,
    ) -> Vec<Symbol> {
        let source = Source::Elf(Elf::new(path));
        let symbolized = match self.symbolize_raw(&source, input(addrs)) {
            Ok(symbolized) => symbolized,
            Err(unknown) => return self.count(vec![Symbol::Unknown(unknown); addrs.len()]),
        };
        let renames = self.elf_symbol_names(path, &symbolized);
        let symbols = symbolized
            .into_iter()
            .zip(renames)
            .map(|(symbolized, rename)| {
                let mut symbol = convert(symbolized);
                if let (Symbol::Known(frames), Some((system_name, function))) =
                    (&mut symbol, rename)
                    && let Some(outer) = frames.last_mut()
                {
                    outer.system_name = system_name;
                    outer.function = function;
                }
                symbol
            })
            .collect();
        self.count(symbols)
    }

    /// For each result, the (mangled, demangled) name of the ELF symbol to
    /// use for its outermost function instead of blazesym's, if any.
    ///
    /// blazesym names a function after its DWARF `DW_AT_linkage_name`, and
    /// after the bare `DW_AT_name` when it has none (GCC omits it for, e.g.,
    /// members of templates instantiated on lambda types: `_M_manager` for
    /// `std::_Function_handler<int (int), main::{lambda(int)#2}>::_M_manager`).
    /// The ELF symbol starting at the function's address has the mangled
    /// name. Only candidates (see [`may_lack_linkage_name`]) are looked up,
    /// by their function's start address, in one batch against the ELF
    /// symbol tables alone: blazesym shares the parsed file (and its
    /// address-sorted symbol index) between that resolver and the DWARF
    /// one, so it costs a binary search per candidate, not a second parse.
    /// A stripped binary's symbols are in its separate debug file, which is
    /// looked up (once per binary) when the binary itself has none there.
    fn elf_symbol_names(
        &self,
        path: &Path,
        symbolized: &[Symbolized<'_>],
    ) -> Vec<Option<(String, String)>> {
        let mut renames = vec![None; symbolized.len()];
        let candidates: Vec<(usize, &bz::Sym<'_>)> = symbolized
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Symbolized::Sym(sym) if may_lack_linkage_name(&sym.name) => Some((i, sym)),
                _ => None,
            })
            .collect();
        if candidates.is_empty() {
            return renames;
        }
        let starts: Vec<u64> = candidates.iter().map(|(_, sym)| sym.addr).collect();
        let mut found = self.elf_symbols_at(path, &starts);
        let missing: Vec<usize> = (0..found.len()).filter(|&j| found[j].is_none()).collect();
        if !missing.is_empty()
            && let Some(debug_file) = self.debug_file(path)
        {
            let starts: Vec<u64> = missing.iter().map(|&j| starts[j]).collect();
            for (j, name) in missing
                .into_iter()
                .zip(self.elf_symbols_at(&debug_file, &starts))
            {
                found[j] = name;
            }
        }
        for ((i, dwarf), elf) in candidates.into_iter().zip(found) {
            if let (Some(elf), Some(slot)) = (elf, renames.get_mut(i)) {
                *slot = elf_symbol_name(&dwarf.name, &elf);
            }
        }
        renames
    }

    /// The name of the ELF symbol (symbol tables only) starting at each of
    /// `starts`, a virtual address.
    fn elf_symbols_at(&self, path: &Path, starts: &[u64]) -> Vec<Option<String>> {
        let elf_only = Source::Elf(Elf {
            debug_syms: false,
            ..Elf::new(path)
        });
        match self.symbolize_raw(&elf_only, Input::VirtOffset(starts)) {
            Ok(symbols) => symbols
                .iter()
                .zip(starts)
                .map(|(s, &start)| match s {
                    Symbolized::Sym(sym) if sym.addr == start => Some(sym.name.to_string()),
                    _ => None,
                })
                .collect(),
            Err(_) => vec![None; starts.len()],
        }
    }

    /// The separate debug file of the binary at `path`, if it has one
    /// (remembered per binary until [`Self::evict_elf`]).
    fn debug_file(&self, path: &Path) -> Option<PathBuf> {
        if let Some(known) = self.debug_files.borrow().get(path) {
            return known.clone();
        }
        let found = std::fs::File::open(path)
            .ok()
            .and_then(|file| elf::ElfLayout::read(&file).ok())
            .and_then(|layout| {
                let search = debug_file::DebugSearch {
                    roots: &[PathBuf::from("/")],
                    debug_dirs: &self.debug_dirs,
                };
                debug_file::find(&layout, path, &search)
            })
            .map(|debug| debug.path);
        self.debug_files
            .borrow_mut()
            .insert(path.to_path_buf(), found.clone());
        found
    }

    fn symbolize(&self, source: &Source<'_>, input: Input<&[u64]>, n: usize) -> Vec<Symbol> {
        let symbols = match self.symbolize_raw(source, input) {
            Ok(symbolized) => symbolized.into_iter().map(convert).collect(),
            Err(unknown) => vec![Symbol::Unknown(unknown); n],
        };
        self.count(symbols)
    }

    /// blazesym's answer; an error of the whole batch as the reason for
    /// each address.
    fn symbolize_raw(
        &self,
        source: &Source<'_>,
        input: Input<&[u64]>,
    ) -> Result<Vec<Symbolized<'_>>, Unknown> {
        // blazesym 0.2.7 panics on some malformed files: an unwrap in
        // dwarf/lines.rs when a line-table row names a file past the file
        // table (release builds too), overflowing additions in elf/parser.rs
        // and dwarf/units.rs (overflow checks). Found by symbolizer/fuzz; the
        // inputs are its elf_symbolize/regression-* seeds. The panic is
        // caught here and the batch is unreadable. Unwind safety: a panic
        // leaves at most a cache entry of that file unfilled, which the next
        // call fills again (or fails on again).
        let result = panic::catch_unwind(AssertUnwindSafe(|| self.inner.symbolize(source, input)));
        match result {
            Ok(Ok(symbols)) => Ok(symbols),
            Err(payload) => {
                let why = payload
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("unknown panic");
                tracing::warn!(?source, panic = why, "blazesym panicked; batch unresolved");
                Err(Unknown::Unreadable(format!("symbolizer panicked: {why}")))
            }
            Ok(Err(err)) => {
                let unknown = match err.kind() {
                    blazesym::ErrorKind::Unsupported => Unknown::Unsupported(format!("{err:#}")),
                    _ => Unknown::Unreadable(format!("{err:#}")),
                };
                tracing::debug!(?source, error = %unknown, "symbolization failed for a batch");
                Err(unknown)
            }
        }
    }

    fn count(&self, symbols: Vec<Symbol>) -> Vec<Symbol> {
        let mut stats = self.stats.get();
        for symbol in &symbols {
            match symbol {
                Symbol::Known(_) => stats.resolved += 1,
                Symbol::Unknown(_) => stats.unknown += 1,
            }
        }
        self.stats.set(stats);
        symbols
    }
}

/// Whether a function name from blazesym may be a DWARF `DW_AT_name`
/// standing in for a mangled name: not mangled itself, and without a `.`
/// (Go's `runtime.call64` is Go's own name for its function, which its
/// tools show; the ELF symbol's `.abi0` is a linker ABI-wrapper suffix, and
/// Go names are not mangled, so looking them up would change nothing). C
/// names pass too, and are looked up in vain: the ELF symbol at a C
/// function is its plain name.
fn may_lack_linkage_name(name: &str) -> bool {
    !name.is_empty() && !is_mangled(name) && !name.contains('.')
}

fn is_mangled(name: &str) -> bool {
    name.starts_with("_Z") || name.starts_with("_R")
}

/// The (mangled, demangled) name of the ELF symbol `elf` to report instead
/// of the DWARF name `dwarf` of the function starting at the same address,
/// when `elf` is mangled and its demangling names that function: `dwarf`
/// itself or its last qualified component (`…::_M_manager`), followed by
/// the parameter list or nothing; a return type may come first (`int
/// fold<int>(int)`). Otherwise `None` (an alias of other code folded into
/// it, or a rendering of template arguments that differs from the
/// compiler's).
fn elf_symbol_name(dwarf: &str, elf: &str) -> Option<(String, String)> {
    if !is_mangled(elf) {
        return None;
    }
    let demangled = demangle(elf);
    if demangled == elf {
        return None;
    }
    let names_function = demangled.match_indices(dwarf).any(|(at, _)| {
        let before = &demangled[..at];
        let after = &demangled[at + dwarf.len()..];
        (before.is_empty() || before.ends_with("::") || before.ends_with(' '))
            && (after.is_empty() || after.starts_with('('))
    });
    names_function.then(|| (elf.to_owned(), demangled.into_owned()))
}

fn convert(symbolized: Symbolized<'_>) -> Symbol {
    let sym = match symbolized {
        Symbolized::Sym(sym) => sym,
        Symbolized::Unknown(reason) => {
            return Symbol::Unknown(match reason {
                bz::Reason::Unmapped => Unknown::Unmapped,
                bz::Reason::InvalidFileOffset => Unknown::InvalidFileOffset,
                bz::Reason::MissingSyms | bz::Reason::MissingComponent => Unknown::MissingSymbols,
                bz::Reason::UnknownAddr => Unknown::NoSymbol,
                other => Unknown::Unsupported(other.to_string()),
            });
        }
    };
    // blazesym lists inlined functions outermost first and attaches to each
    // the location inside it (the direct location to the innermost one, the
    // call site to the others); pprof wants innermost first.
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    for inlined in sym.inlined.iter().rev() {
        frames.push(frame(&inlined.name, inlined.code_info.as_ref()));
    }
    frames.push(frame(&sym.name, sym.code_info.as_deref()));
    Symbol::Known(frames)
}

fn frame(name: &str, code_info: Option<&CodeInfo<'_>>) -> Frame {
    Frame {
        function: demangle(name).into_owned(),
        system_name: name.to_owned(),
        file: code_info.map(|c| c.to_path().to_string_lossy().into_owned()),
        // DWARF line 0: code attributed to no source line.
        line: code_info.and_then(|c| c.line).filter(|&l| l != 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_file_is_a_value_for_every_address() {
        let symbolizer = Symbolizer::new(&SymbolizerConfig::default());
        let symbols = symbolizer.elf_file_offsets(Path::new("/nonexistent/binary"), &[1, 2, 3]);
        assert_eq!(symbols.len(), 3);
        assert!(
            symbols
                .iter()
                .all(|s| matches!(s, Symbol::Unknown(Unknown::Unreadable(_))))
        );
        assert_eq!(symbolizer.stats().unknown, 3);
    }

    #[test]
    fn garbage_file_is_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage");
        std::fs::write(&path, b"\x7fELF\x02\x01\x01 this is not really an ELF file").unwrap();
        let symbolizer = Symbolizer::new(&SymbolizerConfig::default());
        let symbols = symbolizer.elf_file_offsets(&path, &[0x10]);
        assert!(matches!(symbols.as_slice(), [Symbol::Unknown(_)]));
    }

    #[test]
    fn blazesym_panic_is_a_value() {
        // A fuzzed gcc -O2 -g binary whose line program sets file 19 of 4:
        // blazesym 0.2.7 unwraps the missing file at any address with lines.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad-line-table");
        let bytes = include_bytes!("../fuzz/corpus/elf_symbolize/regression-line-row-file-index");
        std::fs::write(&path, bytes).unwrap();
        let symbolizer = Symbolizer::new(&SymbolizerConfig::default());
        for _ in 0..2 {
            let symbols = symbolizer.elf_virtual_addresses(&path, &[0x1190, 0x11d0]);
            assert_eq!(symbols.len(), 2);
            for s in &symbols {
                let Symbol::Unknown(Unknown::Unreadable(why)) = s else {
                    panic!("{s:?}");
                };
                assert!(why.starts_with("symbolizer panicked: "), "{why}");
            }
        }
        // The symbolizer still works for other files.
        let exe = std::env::current_exe().unwrap();
        let addr = nm_address("blazesym_panic_is_a_value");
        let symbols = symbolizer.elf_virtual_addresses(&exe, &[addr]);
        assert!(matches!(&symbols[0], Symbol::Known(_)), "{symbols:?}");
        assert_eq!(symbolizer.stats().unknown, 4);
    }

    #[test]
    fn oversized_compressed_section_is_a_value() {
        // A fuzzed gcc -gz=zlib binary whose .debug_aranges claims 2^48
        // bytes: blazesym 0.2.7 would abort on the allocation.
        let path = Path::new("fuzz/corpus/elf_symbolize/regression-compressed-size-claim");
        let symbolizer = Symbolizer::new(&SymbolizerConfig::default());
        for symbols in [
            symbolizer.elf_virtual_addresses(path, &[0x1149, 0x1190]),
            symbolizer.elf_file_offsets(path, &[0x1149]),
        ] {
            for s in &symbols {
                let Symbol::Unknown(Unknown::Unreadable(why)) = s else {
                    panic!("{s:?}");
                };
                assert_eq!(
                    why,
                    "section 28 claims 281474976710720 bytes from 33 zlib-compressed ones"
                );
            }
        }
        assert_eq!(symbolizer.stats().unknown, 3);
    }

    #[test]
    fn symbolizes_own_function_with_line() {
        // This test binary is built with debug info; find a function's
        // address in it and look it up by its virtual address.
        let exe = std::env::current_exe().unwrap();
        let symbolizer = Symbolizer::new(&SymbolizerConfig::default());
        let addr = nm_address("symbolizes_own_function_with_line");
        let symbols = symbolizer.elf_virtual_addresses(&exe, &[addr]);
        let Symbol::Known(frames) = &symbols[0] else {
            panic!("unresolved: {symbols:?}");
        };
        let outer = frames.last().unwrap();
        assert!(
            outer
                .function
                .ends_with("tests::symbolizes_own_function_with_line"),
            "{outer:?}"
        );
        assert!(outer.system_name.starts_with("_ZN") || outer.system_name.starts_with("_R"));
        assert!(
            outer
                .file
                .as_deref()
                .unwrap()
                .ends_with("symbolizer/src/lib.rs")
        );
        assert!(outer.line.is_some());
    }

    #[test]
    fn elf_symbol_names_the_dwarf_function() {
        // From GCC 12's build of tests/fixtures/symbolizer/templates.cpp.
        let manager = "_ZNSt17_Function_handlerIFiiEZ4mainEUliE0_E10_M_managerERSt9_Any_dataRKS3_St18_Manager_operation";
        let (system_name, function) = elf_symbol_name("_M_manager", manager).unwrap();
        assert_eq!(system_name, manager);
        assert!(function.contains(">::_M_manager("), "{function}");
        // A return type before the name.
        let sum = "_ZN12_GLOBAL__N_114sum_of_squaresIiEEiRKSt6vectorIT_SaIS2_EE";
        assert!(elf_symbol_name("sum_of_squares<int>", sum).is_some());
        // Another function, a plain name, a name only as a prefix.
        assert_eq!(elf_symbol_name("_M_invoke", manager), None);
        assert_eq!(elf_symbol_name("main", "main"), None);
        assert_eq!(elf_symbol_name("_M_man", manager), None);
        assert!(!may_lack_linkage_name("runtime.call64"));
        assert!(!may_lack_linkage_name(manager));
        assert!(may_lack_linkage_name("_M_manager"));
    }

    /// Address of the first text symbol of this test binary whose name
    /// contains `needle`, as `nm` (the oracle, not blazesym) reports it.
    pub(crate) fn nm_address(needle: &str) -> u64 {
        let output = std::process::Command::new("nm")
            .arg(std::env::current_exe().unwrap())
            .output()
            .unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains(needle) && (l.contains(" T ") || l.contains(" t ")))
            .unwrap_or_else(|| panic!("{needle} not in nm output"));
        u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap()
    }
}
