//! CPython processes: finding the interpreter in a process (its version,
//! `_PyRuntime`, `_PyEval_EvalFrameDefault`), the offsets the kernel's
//! frame walk needs for that version, and naming the code objects the walk
//! returns (read from the process's memory, cached by code object).
//!
//! The offsets come from CPython's own headers (3.9.18, 3.10.13, 3.11.7,
//! 3.12.1, 3.13.0, x86-64, `offsetof` with `Py_BUILD_CORE`); they hold for
//! every patch release of a minor version that keeps those structures
//! (checked for Debian's 3.11.2 by
//! `offsets_match_a_running_interpreter`).

use std::{
    collections::HashMap, fs::File, ops::Range, os::unix::fs::FileExt as _, path::Path, sync::Arc,
};

use fathom_common::python::{ENTRY_BIT, NONE, PyProcess, entry};
use fathom_symbolizer::{Frame, ObjectKey};
use object::{Object as _, ObjectSymbol as _};

use super::{
    pprof::Location,
    process::{ObjectFile, Vma, VmaKind},
};

/// Offsets of one CPython minor version (x86-64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub minor: u8,
    pub interpreters_head: u32,
    pub tstate_current: u32,
    pub threads_head: u32,
    pub tstate_next: u32,
    pub tstate_native_thread_id: u32,
    pub tstate_frame: u32,
    pub cframe_current_frame: u32,
    pub frame_code: u32,
    pub frame_previous: u32,
    pub entry_kind: u32,
    pub entry_offset: u32,
    /// `co_qualname` (3.11+), else `co_name`.
    pub code_name: u32,
    pub code_filename: u32,
    pub code_firstlineno: u32,
    /// `sizeof(PyASCIIObject)`, `sizeof(PyCompactUnicodeObject)`.
    pub ascii_size: u32,
    pub compact_size: u32,
}

/// The versions covered.
pub const VERSIONS: [Offsets; 5] = [
    Offsets {
        minor: 9,
        interpreters_head: 32,
        tstate_current: 568,
        threads_head: 8,
        tstate_next: 8,
        tstate_native_thread_id: NONE,
        tstate_frame: 24,
        cframe_current_frame: NONE,
        frame_code: 32,
        frame_previous: 24,
        entry_kind: entry::EVERY_FRAME,
        entry_offset: NONE,
        code_name: 112,
        code_filename: 104,
        code_firstlineno: 40,
        ascii_size: 48,
        compact_size: 72,
    },
    Offsets {
        minor: 10,
        interpreters_head: 32,
        tstate_current: 568,
        threads_head: 8,
        tstate_next: 8,
        tstate_native_thread_id: NONE,
        tstate_frame: 24,
        cframe_current_frame: NONE,
        frame_code: 32,
        frame_previous: 24,
        entry_kind: entry::EVERY_FRAME,
        entry_offset: NONE,
        code_name: 112,
        code_filename: 104,
        code_firstlineno: 40,
        ascii_size: 48,
        compact_size: 72,
    },
    Offsets {
        minor: 11,
        interpreters_head: 40,
        tstate_current: 576,
        threads_head: 16,
        tstate_next: 8,
        tstate_native_thread_id: 160,
        tstate_frame: 56,
        cframe_current_frame: 8,
        frame_code: 32,
        frame_previous: 48,
        entry_kind: entry::IS_ENTRY_FLAG,
        entry_offset: 68,
        code_name: 128,
        code_filename: 112,
        code_firstlineno: 72,
        ascii_size: 48,
        compact_size: 72,
    },
    Offsets {
        minor: 12,
        interpreters_head: 40,
        tstate_current: NONE,
        threads_head: 72,
        tstate_next: 8,
        tstate_native_thread_id: 144,
        tstate_frame: 56,
        cframe_current_frame: 0,
        frame_code: 0,
        frame_previous: 8,
        entry_kind: entry::CSTACK_OWNER,
        entry_offset: 70,
        code_name: 128,
        code_filename: 112,
        code_firstlineno: 68,
        ascii_size: 40,
        compact_size: 56,
    },
    Offsets {
        minor: 13,
        interpreters_head: 632,
        tstate_current: NONE,
        threads_head: 7344,
        tstate_next: 8,
        tstate_native_thread_id: 160,
        tstate_frame: 72,
        cframe_current_frame: NONE,
        frame_code: 0,
        frame_previous: 8,
        entry_kind: entry::CSTACK_OWNER,
        entry_offset: 70,
        code_name: 128,
        code_filename: 112,
        code_firstlineno: 68,
        ascii_size: 40,
        compact_size: 56,
    },
];

/// The offsets of CPython 3.`minor`.
pub fn offsets(minor: u8) -> Option<&'static Offsets> {
    VERSIONS.iter().find(|o| o.minor == minor)
}

/// A Python process as the agent found it.
#[derive(Debug)]
pub struct PythonProcess {
    pub minor: u8,
    pub offsets: &'static Offsets,
    /// What the kernel is told.
    pub kernel: PyProcess,
    /// Where `_PyEval_EvalFrameDefault` runs in the process.
    pub eval: Range<u64>,
}

/// The CPython minor version of a mapped file's name: `python3.X` (the
/// interpreter, statically linked) or `libpython3.X.so…`.
pub fn version_of(path: &str) -> Option<u8> {
    let name = path.rsplit('/').next()?;
    let rest = name
        .strip_prefix("libpython3.")
        .or_else(|| name.strip_prefix("python3."))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let tail = &rest[digits.len()..];
    if !(tail.is_empty() || tail.starts_with(".so") || tail.starts_with('d')) {
        return None;
    }
    digits.parse().ok()
}

/// The interpreter's symbols in its file (virtual addresses).
#[derive(Clone, Debug)]
pub struct InterpreterSymbols {
    runtime: u64,
    eval: Range<u64>,
}

/// Interpreter symbols by file contents: a process that maps one more
/// library, and every process of the same interpreter, does not read the
/// file again.
#[derive(Default)]
pub struct SymbolCache(HashMap<ObjectKey, Result<InterpreterSymbols, String>>);

impl std::fmt::Debug for SymbolCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SymbolCache({} files)", self.0.len())
    }
}

/// Files remembered before the cache starts over.
const MAX_FILES: usize = 64;

impl SymbolCache {
    fn get(&mut self, object: &ObjectFile) -> Result<InterpreterSymbols, String> {
        if let Some(found) = self.0.get(&object.key) {
            return found.clone();
        }
        if self.0.len() >= MAX_FILES {
            self.0.clear();
        }
        let found = read_symbols(object);
        self.0.insert(object.key.clone(), found.clone());
        found
    }
}

fn read_symbols(object: &ObjectFile) -> Result<InterpreterSymbols, String> {
    let data = std::fs::read(&object.read_path).map_err(|e| e.to_string())?;
    let file = object::File::parse(&*data).map_err(|e| e.to_string())?;
    let mut runtime = None;
    let mut eval = None;
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        match symbol.name() {
            Ok("_PyRuntime") if runtime.is_none() => runtime = Some(symbol.address()),
            Ok("_PyEval_EvalFrameDefault") if eval.is_none() => {
                eval = Some(symbol.address()..symbol.address() + symbol.size().max(1))
            }
            _ => {}
        }
    }
    Ok(InterpreterSymbols {
        runtime: runtime.ok_or("no _PyRuntime symbol")?,
        eval: eval.ok_or("no _PyEval_EvalFrameDefault symbol")?,
    })
}

/// Finds CPython in a process's executable mappings: the file defining
/// `_PyRuntime` among those named like the interpreter or its library.
/// `None`: not a Python process (or a version not covered); `Some(Err)`:
/// Python, but unusable (the reason is logged).
pub fn detect(vmas: &[Vma], cache: &mut SymbolCache) -> Option<Result<PythonProcess, String>> {
    // The library, when there is one, holds the runtime.
    let mut candidates: Vec<(&Vma, &ObjectFile, u8)> = vmas
        .iter()
        .filter_map(|v| match &v.kind {
            VmaKind::Object(o) => version_of(&o.path).map(|m| (v, &**o, m)),
            _ => None,
        })
        .collect();
    candidates.sort_by_key(|(_, o, _)| !o.path.contains("libpython"));
    let (vma, object, minor) = *candidates.first()?;
    let Some(offsets) = offsets(minor) else {
        return Some(Err(format!("CPython 3.{minor} is not covered")));
    };
    Some(locate(vma, object, minor, offsets, cache))
}

fn locate(
    vma: &Vma,
    object: &ObjectFile,
    minor: u8,
    offsets: &'static Offsets,
    cache: &mut SymbolCache,
) -> Result<PythonProcess, String> {
    let layout = object.layout.as_ref().map_err(Clone::clone)?;
    let mapped_vaddr = layout
        .file_offset_to_vaddr(vma.offset)
        .ok_or("mapping outside the file's segments")?;
    let bias = vma.start.wrapping_sub(mapped_vaddr);
    let InterpreterSymbols { runtime, eval } = cache.get(object)?;
    let o = offsets;
    Ok(PythonProcess {
        minor,
        offsets,
        kernel: PyProcess {
            runtime: runtime.wrapping_add(bias),
            interpreters_head: o.interpreters_head,
            tstate_current: o.tstate_current,
            threads_head: o.threads_head,
            tstate_next: o.tstate_next,
            tstate_native_thread_id: o.tstate_native_thread_id,
            tstate_frame: o.tstate_frame,
            cframe_current_frame: o.cframe_current_frame,
            frame_code: o.frame_code,
            frame_previous: o.frame_previous,
            entry_kind: o.entry_kind,
            entry_offset: o.entry_offset,
            version: 0x0300 | minor as u32,
        },
        eval: eval.start.wrapping_add(bias)..eval.end.wrapping_add(bias),
    })
}

/// A code object's name, file and first line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeInfo {
    pub name: String,
    pub filename: String,
    pub first_line: u32,
}

/// Reads another process's memory.
pub struct Memory {
    file: File,
}

impl Memory {
    pub fn open(proc_root: &Path, pid: u32) -> std::io::Result<Self> {
        Ok(Self {
            file: File::open(proc_root.join(pid.to_string()).join("mem"))?,
        })
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        self.file
            .read_exact_at(buf, addr)
            .map_err(|e| format!("reading {len} bytes at {addr:#x}: {e}", len = buf.len()))
    }

    fn u64(&self, addr: u64) -> Result<u64, String> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// The code object at `addr`.
    pub fn code(&self, offsets: &Offsets, addr: u64) -> Result<CodeInfo, String> {
        // ob_type->tp_name must be "code" (3.13's f_executable may be another object).
        let ty = self.u64(addr + 8)?;
        let tp_name = self.u64(ty + 24)?;
        let mut name = [0u8; 5];
        self.read(tp_name, &mut name)?;
        if &name != b"code\0" {
            return Err("not a code object".into());
        }
        let mut first = [0; 4];
        self.read(addr + offsets.code_firstlineno as u64, &mut first)?;
        Ok(CodeInfo {
            name: self.string(offsets, self.u64(addr + offsets.code_name as u64)?)?,
            filename: self.string(offsets, self.u64(addr + offsets.code_filename as u64)?)?,
            first_line: i32::from_ne_bytes(first).max(0) as u32,
        })
    }

    /// A `str` object (compact forms: every identifier and file name).
    fn string(&self, offsets: &Offsets, addr: u64) -> Result<String, String> {
        const MAX_CHARS: u64 = 4096;
        let length = self.u64(addr + 16)?;
        let mut state = [0; 4];
        self.read(addr + 32, &mut state)?;
        let state = u32::from_ne_bytes(state);
        let (kind, compact, ascii) = ((state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1);
        if compact == 0 || !matches!(kind, 1 | 2 | 4) {
            return Err("not a compact str".into());
        }
        let data = addr
            + if ascii == 1 {
                offsets.ascii_size
            } else {
                offsets.compact_size
            } as u64;
        let chars = length.min(MAX_CHARS) as usize;
        let mut raw = vec![0u8; chars * kind as usize];
        self.read(data, &mut raw)?;
        Ok(match kind {
            1 => raw.iter().map(|&b| b as char).collect(),
            2 => String::from_utf16_lossy(
                &raw.chunks_exact(2)
                    .map(|c| u16::from_ne_bytes([c[0], c[1]]))
                    .collect::<Vec<_>>(),
            ),
            _ => raw
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or('\u{fffd}')
                })
                .collect(),
        })
    }
}

/// Names Python frames, cached by (process, code object).
#[derive(Default)]
pub struct PythonSymbols {
    locations: HashMap<(u32, u64), Arc<Location>>,
    memories: HashMap<u32, Option<Memory>>,
}

/// Entries kept before the cache starts over.
const MAX_CACHED: usize = 1 << 16;

impl PythonSymbols {
    /// The location of a frame of the kernel's Python stack (the entry bit
    /// cleared): `module.py:qualname`, or a bracketed reason.
    pub fn location(
        &mut self,
        proc_root: &Path,
        pid: u32,
        offsets: &Offsets,
        raw: u64,
    ) -> Arc<Location> {
        let addr = raw & !ENTRY_BIT;
        if let Some(location) = self.locations.get(&(pid, addr)) {
            return Arc::clone(location);
        }
        if self.locations.len() >= MAX_CACHED {
            self.locations.clear();
            self.memories.clear();
        }
        let memory = self
            .memories
            .entry(pid)
            .or_insert_with(|| Memory::open(proc_root, pid).ok());
        let frame = match memory.as_ref().map(|m| m.code(offsets, addr)) {
            Some(Ok(code)) => Frame {
                function: code.name,
                system_name: "python".into(),
                file: Some(code.filename),
                line: Some(code.first_line),
            },
            Some(Err(reason)) => unreadable(&reason),
            None => unreadable("process memory unreadable"),
        };
        let location = Arc::new(Location {
            mapping: None,
            address: addr,
            frames: vec![frame],
        });
        // An unreadable code object may be read next time (a process not
        // yet readable); a named one is kept.
        if location.frames[0].system_name == "python" {
            self.locations.insert((pid, addr), Arc::clone(&location));
        }
        location
    }

    /// Keeps the entries of the processes `alive` says are.
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.locations.retain(|(pid, _), _| alive(*pid));
        self.memories.retain(|pid, _| alive(*pid));
    }
}

fn unreadable(reason: &str) -> Frame {
    Frame {
        function: "[python: unreadable code object]".into(),
        system_name: reason.to_owned(),
        file: None,
        line: None,
    }
}

/// Where the Python frames go in a native user stack (leaf first): each
/// native frame inside `_PyEval_EvalFrameDefault` (`is_eval`) is replaced
/// by the Python frames it ran, up to and including the next one marked
/// with [`ENTRY_BIT`]; Python frames left when the native stack ends (it
/// was cut short) go outermost. Returns, per output position, either a
/// native index or a Python entry.
pub fn merge(native_len: usize, is_eval: impl Fn(usize) -> bool, python: &[u64]) -> Vec<Merged> {
    let mut out = Vec::with_capacity(native_len + python.len());
    let mut next = 0;
    for i in 0..native_len {
        if next < python.len() && is_eval(i) {
            while next < python.len() {
                let raw = python[next];
                out.push(Merged::Python(raw));
                next += 1;
                if raw & ENTRY_BIT != 0 {
                    break;
                }
            }
        } else {
            out.push(Merged::Native(i));
        }
    }
    out.extend(python[next..].iter().map(|&raw| Merged::Python(raw)));
    out
}

/// One frame of a merged stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merged {
    Native(usize),
    Python(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::process::ProcessTable;

    /// The kernel's walk, in user space: the thread state of thread `tid`,
    /// then its frames' code objects (entry bits kept).
    fn walk(memory: &Memory, python: &PythonProcess, tid: u32) -> Result<Vec<u64>, String> {
        let k = &python.kernel;
        let at = |base: u64, offset: u32| memory.u64(base + offset as u64);
        let mut tstate = if k.tstate_native_thread_id == NONE {
            at(k.runtime, k.tstate_current)?
        } else {
            let mut t = at(at(k.runtime, k.interpreters_head)?, k.threads_head)?;
            while t != 0 && at(t, k.tstate_native_thread_id)? != tid as u64 {
                t = at(t, k.tstate_next)?;
            }
            t
        };
        if tstate == 0 {
            return Err("no thread state".into());
        }
        tstate = at(tstate, k.tstate_frame)?;
        let mut frame = if k.cframe_current_frame == NONE {
            tstate
        } else {
            at(tstate, k.cframe_current_frame)?
        };
        let mut out: Vec<u64> = Vec::new();
        while frame != 0 && out.len() < 128 {
            let code = at(frame, k.frame_code)?;
            let mut byte = [0u8];
            if k.entry_offset != NONE {
                memory.read(frame + k.entry_offset as u64, &mut byte)?;
            }
            match k.entry_kind {
                entry::EVERY_FRAME => out.push(code | ENTRY_BIT),
                entry::IS_ENTRY_FLAG if byte[0] != 0 => out.push(code | ENTRY_BIT),
                entry::IS_ENTRY_FLAG => out.push(code),
                _ if byte[0] == entry::OWNED_BY_CSTACK => {
                    if let Some(last) = out.last_mut() {
                        *last |= ENTRY_BIT;
                    }
                }
                _ => out.push(code),
            }
            frame = at(frame, k.frame_previous)?;
        }
        Ok(out)
    }

    /// The offsets read a running interpreter of each covered version
    /// found here (Debian's `/usr/bin/python3`, pyenv's) right: its main
    /// thread, running a known function called from the module, walked as
    /// the kernel walks it, names that function, its file and first line.
    #[test]
    fn offsets_match_a_running_interpreter() {
        let mut interpreters = vec![std::path::PathBuf::from("/usr/bin/python3")];
        if let Some(home) = std::env::var_os("HOME") {
            let pyenv = std::path::Path::new(&home).join(".pyenv/versions");
            for entry in std::fs::read_dir(pyenv).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let minor = name.split('.').nth(1).and_then(|m| m.parse::<u8>().ok());
                if name.starts_with("3.") && minor.is_some_and(|m| offsets(m).is_some()) {
                    let minor = minor.unwrap_or_default();
                    interpreters.push(entry.path().join(format!("bin/python3.{minor}")));
                }
            }
        }
        let script = "import sys\n\ndef deep_function_name():\n    print('ready', flush=True)\n    while True:\n        pass\n\ndeep_function_name()\n";
        let mut checked = 0;
        for python in interpreters.iter().filter(|p| p.is_file()) {
            let mut child = std::process::Command::new(python)
                .args(["-c", script])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.take().unwrap()),
                &mut line,
            )
            .unwrap();
            let pid = child.id();
            let mut table = ProcessTable::default();
            table.observe(pid).unwrap();
            let found = table.process(pid).and_then(|p| p.python.clone());
            let memory = Memory::open(Path::new("/proc"), pid).unwrap();
            let result = found
                .ok_or_else(|| "not detected".to_owned())
                .and_then(|python| {
                    let frames = walk(&memory, &python, pid)?;
                    frames
                        .iter()
                        .map(|&raw| memory.code(python.offsets, raw & !ENTRY_BIT))
                        .collect::<Result<Vec<_>, _>>()
                        .map(|codes| (frames, codes))
                });
            let _ = child.kill();
            let _ = child.wait();
            let (frames, codes) = result.unwrap_or_else(|e| panic!("{}: {e}", python.display()));
            let names: Vec<&str> = codes.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(
                names,
                ["deep_function_name", "<module>"],
                "{}",
                python.display()
            );
            assert_eq!(
                (codes[0].filename.as_str(), codes[0].first_line),
                ("<string>", 3)
            );
            // The module's frame ends the outermost evaluation call.
            assert!(frames[1] & ENTRY_BIT != 0, "{}", python.display());
            checked += 1;
        }
        assert!(checked > 0, "no Python interpreter here");
    }

    #[test]
    fn versions_from_file_names() {
        assert_eq!(version_of("/usr/bin/python3.11"), Some(11));
        assert_eq!(
            version_of("/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0"),
            Some(12)
        );
        assert_eq!(version_of("/usr/lib/libpython3.9d.so"), Some(9));
        assert_eq!(version_of("/usr/bin/python3"), None);
        assert_eq!(version_of("/usr/bin/python3.11-config"), None);
        assert_eq!(version_of("/usr/lib/x86_64-linux-gnu/libc.so.6"), None);
        assert!(offsets(11).is_some() && offsets(8).is_none());
    }

    #[test]
    fn python_frames_replace_their_eval_frames() {
        // Native: leaf, eval, helper, eval, main. Python: f, g (entry), h (entry).
        let e = ENTRY_BIT;
        let python = [0x10, 0x20 | e, 0x30 | e];
        let merged = merge(5, |i| i == 1 || i == 3, &python);
        use Merged::*;
        assert_eq!(
            merged,
            vec![
                Native(0),
                Python(0x10),
                Python(0x20 | e),
                Native(2),
                Python(0x30 | e),
                Native(4)
            ]
        );
        // More eval frames than calls: the extra ones stay native.
        assert_eq!(
            merge(2, |_| true, &[0x10 | e]),
            vec![Python(0x10 | e), Native(1)]
        );
        // A native stack cut short: the Python frames left go outermost.
        assert_eq!(
            merge(1, |_| false, &[0x10 | e]),
            vec![Native(0), Python(0x10 | e)]
        );
    }
}
