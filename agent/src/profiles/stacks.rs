//! Turns the kernel's raw stacks into pprof locations: user addresses are
//! placed in their files through the process table, then user and kernel
//! addresses are symbolized in one batch per file.

use std::{
    collections::{HashMap, HashSet},
    fs,
    sync::{Arc, Mutex},
};

use fathom_common::profiler::{COMM_LEN, SampleKey, stack_id};
use fathom_symbolizer::{
    Addressing, Frame, ObjectRequest, Request, Response, Symbol, SymbolizerService, elf,
};

use super::{
    capture::stack_marker_reason,
    pprof::{Location, Mapping},
    process::{ObjectFile, ProcessTable, UserAddress},
    python::{Merged, PythonSymbols, merge},
};

/// A sample ready for the pprof builder.
#[derive(Clone, Debug)]
pub struct ResolvedSample {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// Leaf first: kernel frames, then user frames.
    pub stack: Vec<Arc<Location>>,
    pub count: u64,
    /// The server span the thread was serving (trace id, span id), when the
    /// tracer shared which.
    pub span: Option<([u8; 16], [u8; 8])>,
}

/// Counters of what was resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolveStats {
    pub user_frames: u64,
    pub kernel_frames: u64,
    /// Distinct addresses (per drain) that could not be resolved.
    pub unknown_frames: u64,
    pub lost_stacks: u64,
}

/// Places stacks in their files and has them symbolized by the
/// symbolizer's thread.
pub struct StackResolver {
    symbolizer: SymbolizerService,
    kernel_mapping: Arc<Mapping>,
    stats: ResolveStats,
    python: PythonSymbols,
}

#[derive(Clone)]
enum Slot {
    Kernel(u64),
    User { object: usize, offset: u64 },
    Fixed(Arc<Location>),
}

impl StackResolver {
    pub fn new(symbolizer: SymbolizerService) -> Self {
        Self {
            symbolizer,
            kernel_mapping: Arc::new(kernel_mapping()),
            stats: ResolveStats::default(),
            python: PythonSymbols::default(),
        }
    }

    pub fn stats(&self) -> ResolveStats {
        self.stats
    }

    /// Forgets the Python code objects of processes that are gone.
    pub fn retain_python(&mut self, alive: impl Fn(u32) -> bool) {
        self.python.retain(alive);
    }

    pub fn symbolizer_stats(&self) -> fathom_symbolizer::ServiceStats {
        self.symbolizer.stats()
    }

    /// Resolves and symbolizes every sample.
    pub fn resolve(
        &mut self,
        samples: &[(SampleKey, u64)],
        stacks: &HashMap<u64, Vec<u64>>,
        table: &Mutex<ProcessTable>,
    ) -> Vec<ResolvedSample> {
        let mut kernel_addrs = HashSet::new();
        let mut objects: Vec<Arc<ObjectFile>> = Vec::new();
        let mut object_index: HashMap<*const ObjectFile, usize> = HashMap::new();
        let mut offsets: Vec<HashSet<u64>> = Vec::new();
        let mut plans = Vec::with_capacity(samples.len());
        let mut user_plans: HashMap<(u32, u64, bool, u64), Vec<Slot>> = HashMap::new();
        {
            let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
            table.begin_round();
            for (key, _) in samples {
                let mut slots = Vec::new();
                let kernel = self.stack(key.kernel_stack, stacks, "kernel", &mut slots);
                for (i, &ip) in kernel.iter().enumerate() {
                    // Return addresses point after the call: step back into it.
                    let addr = if i > 0 { ip - 1 } else { ip };
                    kernel_addrs.insert(addr);
                    slots.push(Slot::Kernel(addr));
                }
                // Threads of a process often share a stack: place its user
                // frames once per (process, stack), not once per thread.
                let had_kernel = !kernel.is_empty();
                let plan_key = (key.pid, key.user_stack, had_kernel, key.python_stack);
                if let Some(plan) = user_plans.get(&plan_key) {
                    slots.extend_from_slice(plan);
                } else {
                    let mut plan = Vec::new();
                    let user = self.stack(key.user_stack, stacks, "user", &mut plan);
                    // Below kernel frames the first user address is the
                    // return address of the system call.
                    let addrs: Vec<u64> = user
                        .iter()
                        .enumerate()
                        .map(|(i, &ip)| {
                            if i > 0 || had_kernel {
                                ip.saturating_sub(1)
                            } else {
                                ip
                            }
                        })
                        .collect();
                    // A Python sample: its interpreter's frames replace the
                    // native frames of the evaluation loop that ran them.
                    let python_frames = stacks
                        .get(&key.python_stack)
                        .filter(|_| key.python_stack >= stack_id::FIRST_HASH)
                        .map_or(&[][..], Vec::as_slice);
                    let python = (!python_frames.is_empty())
                        .then(|| table.process(key.pid).and_then(|p| p.python.clone()))
                        .flatten();
                    let merged = match &python {
                        Some(python) => merge(
                            addrs.len(),
                            |i| python.eval.contains(&addrs[i]),
                            python_frames,
                        ),
                        None => (0..addrs.len()).map(Merged::Native).collect(),
                    };
                    for entry in merged {
                        let addr = match (entry, &python) {
                            (Merged::Native(i), _) => addrs[i],
                            (Merged::Python(raw), Some(python)) => {
                                plan.push(Slot::Fixed(self.python.location(
                                    table.proc_root(),
                                    key.pid,
                                    python.offsets,
                                    raw,
                                )));
                                continue;
                            }
                            (Merged::Python(_), None) => continue,
                        };
                        plan.push(match table.resolve(key.pid, addr) {
                            UserAddress::Object {
                                object,
                                file_offset,
                            } => {
                                let index = *object_index
                                    .entry(Arc::as_ptr(&object))
                                    .or_insert_with(|| {
                                        objects.push(Arc::clone(&object));
                                        offsets.push(HashSet::new());
                                        objects.len() - 1
                                    });
                                offsets[index].insert(file_offset);
                                Slot::User {
                                    object: index,
                                    offset: file_offset,
                                }
                            }
                            UserAddress::Vdso => Slot::Fixed(special(None, addr, "[vdso]", "vdso")),
                            UserAddress::Jit(name) => {
                                Slot::Fixed(special(None, addr, &name, "jit (perf map)"))
                            }
                            UserAddress::Anonymous => Slot::Fixed(special(
                                None,
                                addr,
                                "[anonymous]",
                                "anonymous executable memory",
                            )),
                            UserAddress::Unknown(reason) => {
                                self.stats.unknown_frames += 1;
                                Slot::Fixed(special(None, addr, "[unknown]", &reason))
                            }
                        });
                    }
                    slots.extend_from_slice(&plan);
                    user_plans.insert(plan_key, plan);
                }
                if slots.is_empty() {
                    slots.push(Slot::Fixed(special(None, 0, "[no stack]", "no stack")));
                }
                plans.push(slots);
            }
        }

        let kernel_addrs: Vec<u64> = kernel_addrs.into_iter().collect();
        let offsets: Vec<Vec<u64>> = offsets
            .into_iter()
            .map(|o| o.into_iter().collect())
            .collect();
        let mut request = Request {
            kernel: kernel_addrs.clone(),
            objects: Vec::new(),
        };
        // Files whose layout could not be read are not asked about.
        let mut asked = Vec::new();
        for (index, object) in objects.iter().enumerate() {
            let Ok(layout) = &object.layout else {
                continue;
            };
            asked.push(index);
            request.objects.push(match &object.debug {
                // A stripped binary: its debug file has the symbols, at the
                // binary's virtual addresses (offsets outside every segment
                // become address 0, which resolves to nothing).
                Some(debug) => ObjectRequest {
                    key: object.key.clone(),
                    path: debug.read_path.clone(),
                    addressing: Addressing::Virtual,
                    addrs: offsets[index]
                        .iter()
                        .map(|&o| layout.file_offset_to_vaddr(o).unwrap_or(0))
                        .collect(),
                },
                None => ObjectRequest {
                    key: object.key.clone(),
                    path: object.read_path.clone(),
                    addressing: Addressing::FileOffset,
                    addrs: offsets[index].clone(),
                },
            });
        }
        let response = self.symbolizer.symbolize(request).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "symbolizer unavailable");
            Response::default()
        });
        // One shared value per unresolvable batch.
        let same = |symbol: Symbol, n: usize| std::iter::repeat_n(Arc::new(symbol), n).collect();
        let gone = |n: usize| {
            same(
                Symbol::Unknown(fathom_symbolizer::Unknown::Unsupported(
                    "symbolizer unavailable".into(),
                )),
                n,
            )
        };
        let kernel_symbols = if response.kernel.len() == kernel_addrs.len() {
            response.kernel
        } else {
            gone(kernel_addrs.len())
        };
        self.stats.unknown_frames += count_unknown(&kernel_symbols);
        let kernel: HashMap<u64, Arc<Location>> = kernel_addrs
            .iter()
            .zip(kernel_symbols)
            .map(|(&addr, symbol)| (addr, location(Some(&self.kernel_mapping), addr, &symbol)))
            .collect();

        let mut answers: Vec<Option<Vec<Arc<Symbol>>>> = vec![None; objects.len()];
        for (index, symbols) in asked.into_iter().zip(response.objects) {
            answers[index] = Some(symbols);
        }
        let mut user: HashMap<(usize, u64), Arc<Location>> = HashMap::new();
        for (index, object) in objects.iter().enumerate() {
            let offsets = &offsets[index];
            let symbols = match (&object.layout, answers[index].take()) {
                (Ok(_), Some(symbols)) if symbols.len() == offsets.len() => symbols,
                (Ok(_), _) => gone(offsets.len()),
                (Err(e), _) => same(
                    Symbol::Unknown(fathom_symbolizer::Unknown::Unreadable(e.clone())),
                    offsets.len(),
                ),
            };
            self.stats.unknown_frames += count_unknown(&symbols);
            for (&offset, symbol) in offsets.iter().zip(symbols) {
                let address = object
                    .layout
                    .as_ref()
                    .ok()
                    .and_then(|l| l.file_offset_to_vaddr(offset))
                    .unwrap_or(offset);
                user.insert(
                    (index, offset),
                    location(Some(&object.mapping), address, &symbol),
                );
            }
        }

        let mut resolved = Vec::with_capacity(samples.len());
        for ((key, count), slots) in samples.iter().zip(plans) {
            let stack: Vec<Arc<Location>> = slots
                .into_iter()
                .map(|slot| match slot {
                    Slot::Kernel(addr) => {
                        self.stats.kernel_frames += 1;
                        Arc::clone(&kernel[&addr])
                    }
                    Slot::User { object, offset } => {
                        self.stats.user_frames += 1;
                        Arc::clone(&user[&(object, offset)])
                    }
                    Slot::Fixed(location) => location,
                })
                .collect();
            resolved.push(ResolvedSample {
                pid: key.pid,
                tid: key.tid,
                comm: comm(&key.comm),
                stack,
                count: *count,
                span: (key.span_id != [0; 8]).then_some((key.trace_id, key.span_id)),
            });
        }
        resolved
    }

    /// The addresses of a stack, or a synthetic frame saying why it is lost.
    fn stack<'s>(
        &mut self,
        id: u64,
        stacks: &'s HashMap<u64, Vec<u64>>,
        kind: &str,
        slots: &mut Vec<Slot>,
    ) -> &'s [u64] {
        if let Some(reason) = stack_marker_reason(id) {
            self.stats.lost_stacks += 1;
            slots.push(Slot::Fixed(special(
                None,
                0,
                &format!("[lost {kind} stack: {reason}]"),
                reason,
            )));
            return &[];
        }
        if id == stack_id::EMPTY {
            return &[];
        }
        match stacks.get(&id) {
            Some(ips) => ips,
            None => {
                self.stats.lost_stacks += 1;
                slots.push(Slot::Fixed(special(
                    None,
                    0,
                    &format!("[lost {kind} stack: not stored]"),
                    "not stored",
                )));
                &[]
            }
        }
    }
}

fn count_unknown(symbols: &[Arc<Symbol>]) -> u64 {
    symbols
        .iter()
        .filter(|s| matches!(&***s, Symbol::Unknown(_)))
        .count() as u64
}

/// A location of a symbolization result.
fn location(mapping: Option<&Arc<Mapping>>, address: u64, symbol: &Symbol) -> Arc<Location> {
    match symbol {
        Symbol::Known(frames) => Arc::new(Location {
            mapping: mapping.cloned(),
            address,
            frames: frames.clone(),
        }),
        Symbol::Unknown(reason) => special(mapping, address, "[unknown]", &reason.to_string()),
    }
}

/// A location whose single frame is a bracketed name; the reason goes into
/// the system name so that `go tool pprof -symbolize=none` users can see it.
fn special(
    mapping: Option<&Arc<Mapping>>,
    address: u64,
    name: &str,
    reason: &str,
) -> Arc<Location> {
    Arc::new(Location {
        mapping: mapping.cloned(),
        address,
        frames: vec![Frame {
            function: name.to_owned(),
            system_name: reason.to_owned(),
            file: None,
            line: None,
        }],
    })
}

pub fn comm(raw: &[u8; COMM_LEN]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// The kernel's pprof mapping: the kernel half of the address space, with
/// the running kernel's build id from `/sys/kernel/notes`.
fn kernel_mapping() -> Mapping {
    let build_id = fs::read("/sys/kernel/notes")
        .ok()
        .and_then(|notes| gnu_build_id(&notes))
        .map(|id| elf::hex(&id));
    Mapping {
        filename: crate::profiles::pprof::KERNEL_MAPPING.into(),
        build_id: build_id.unwrap_or_default(),
        memory_start: 0xffff_8000_0000_0000,
        memory_limit: u64::MAX,
        file_offset: 0,
    }
}

/// The GNU build id in a sequence of ELF notes.
fn gnu_build_id(mut notes: &[u8]) -> Option<Vec<u8>> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let word =
            |i: usize| u32::from_ne_bytes([notes[i], notes[i + 1], notes[i + 2], notes[i + 3]]);
        let (namesz, descsz, kind) = (word(0) as usize, word(4) as usize, word(8));
        let desc_start = 12 + align4(namesz);
        let end = desc_start.checked_add(align4(descsz))?;
        if end > notes.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && notes[12..12 + namesz].starts_with(b"GNU\0") {
            return Some(notes[desc_start..desc_start + descsz].to_vec());
        }
        notes = &notes[end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_note_parsing() {
        let mut notes = Vec::new();
        // An unrelated note first, then the GNU build id.
        for (name, kind, desc) in [
            (&b"Xen\0"[..], 6u32, &[1u8, 2, 3, 4, 5][..]),
            (b"GNU\0", 3, &[0xab, 0xcd, 0xef][..]),
        ] {
            notes.extend((name.len() as u32).to_ne_bytes());
            notes.extend((desc.len() as u32).to_ne_bytes());
            notes.extend(kind.to_ne_bytes());
            notes.extend(name);
            notes.resize(notes.len().div_ceil(4) * 4, 0);
            notes.extend(desc);
            notes.resize(notes.len().div_ceil(4) * 4, 0);
        }
        assert_eq!(gnu_build_id(&notes), Some(vec![0xab, 0xcd, 0xef]));
        assert_eq!(gnu_build_id(&notes[..20]), None, "truncated");
        assert_eq!(gnu_build_id(&[]), None);
    }

    #[test]
    fn resolves_own_frames_shares_them_between_threads_and_names_losses() {
        let pid = std::process::id();
        let here =
            resolves_own_frames_shares_them_between_threads_and_names_losses as *const () as u64;
        // Stack 101: an address in no mapping of this process.
        let stacks: HashMap<u64, Vec<u64>> =
            [(100, vec![here + 1, here + 5]), (101, vec![0x10])].into();
        let key = |tid, user_stack| SampleKey {
            pid,
            tid,
            user_stack,
            kernel_stack: stack_id::EMPTY,
            comm: *b"tester\0\0\0\0\0\0\0\0\0\0",
            user_unwind: 0,
            _reserved: 0,
            trace_id: [0; 16],
            span_id: [0; 8],
            python_stack: stack_id::EMPTY,
        };
        let table = Mutex::new(ProcessTable::default());
        let mut resolver = StackResolver::new(
            SymbolizerService::spawn(fathom_symbolizer::SymbolizerConfig::default()).unwrap(),
        );
        let samples = [
            (key(1, 100), 3),
            (key(2, 100), 4),
            (key(3, stack_id::WALK_FAILED), 1),
            (key(4, 999), 1), // a hash whose stack was not drained
            (key(5, 101), 1),
            (key(6, 101), 1),
        ];
        let out = resolver.resolve(&samples, &stacks, &table);
        assert_eq!(out.len(), 6);
        assert_eq!(
            (out[0].tid, out[0].count, out[0].comm.as_str()),
            (1, 3, "tester")
        );
        let leaf = &out[0].stack[0];
        let function = &leaf.frames.last().unwrap().function;
        assert!(
            function.ends_with("resolves_own_frames_shares_them_between_threads_and_names_losses"),
            "{function}"
        );
        assert!(
            leaf.mapping
                .as_ref()
                .unwrap()
                .filename
                .contains("fathom_agent")
        );
        // The caller frame is looked up one byte back, inside the same function.
        assert_eq!(out[0].stack[1].frames.last().unwrap().function, *function);
        // Two threads with one stack share the very same locations.
        assert!(Arc::ptr_eq(&out[0].stack[0], &out[1].stack[0]));
        assert_eq!(
            out[2].stack[0].frames[0].function,
            "[lost user stack: stack walk failed]"
        );
        assert_eq!(
            out[3].stack[0].frames[0].function,
            "[lost user stack: not stored]"
        );
        assert_eq!(resolver.stats().lost_stacks, 2);
        assert_eq!(out[4].stack[0].frames[0].function, "[unknown]");
        assert!(Arc::ptr_eq(&out[4].stack[0], &out[5].stack[0]));
        // One distinct unresolvable address, whatever the number of threads.
        assert_eq!(resolver.stats().unknown_frames, 1);
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut raw = [0u8; COMM_LEN];
        raw[..4].copy_from_slice(b"nginx"[..4].as_ref());
        assert_eq!(comm(&raw), "ngin");
        assert_eq!(comm(&[b'a'; COMM_LEN]), "a".repeat(COMM_LEN));
    }
}
