//! `Symbolizer::elf_virtual_addresses` and `elf_file_offsets` on arbitrary
//! bytes written to a file, at the input's symbol addresses (and midpoints),
//! segment starts and ends, and addresses from its last bytes. One
//! long-lived `Symbolizer` per process, as in the agent, so inputs go
//! through the caches left by earlier ones. Nothing may panic; every
//! address gets a result, a known one has frames, and asking again (from
//! the cache) gives the same answers.
//!
//! blazesym 0.2.7 panics on some malformed files; `Symbolizer` catches
//! that (an unreadable batch). libfuzzer-sys's panic hook would abort at
//! the panic, before it is caught, so this target installs its own: it
//! keeps the message, and a panic that leaves `check` (through our API or
//! from a failed assertion here) is printed and aborts.
//!
//! blazesym's file cache keeps an entry (an open file and what it parsed)
//! for every version of every file it has seen until told to evict: each
//! input is evicted after its checks (as the agent evicts a file when its
//! last mapping goes), which keeps memory and open files bounded.
#![no_main]

use std::{
    cell::RefCell,
    panic::{self, AssertUnwindSafe},
    path::Path,
    sync::Once,
};

use fathom_symbolizer::{Symbol, Symbolizer, SymbolizerConfig};
use libfuzzer_sys::fuzz_target;
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

const MAX_ADDRESSES: usize = 96;

struct State {
    symbolizer: Symbolizer,
    dir: tempfile::TempDir,
    files: u64,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    /// Where and why the last panic happened.
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

fn keep_panics_quiet() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        panic::set_hook(Box::new(|info| {
            let location = info.location().map(ToString::to_string).unwrap_or_default();
            LAST_PANIC.set(format!(
                "panicked at {location}:\n{}",
                info.payload_as_str().unwrap_or("?")
            ));
        }));
    });
}

fn new_symbolizer() -> Symbolizer {
    Symbolizer::new(&SymbolizerConfig {
        line_numbers: true,
        inlined_functions: true,
        // Only the input itself: no debug files of this machine.
        debug_dirs: Vec::new(),
        ..SymbolizerConfig::default()
    })
}

fuzz_target!(|data: &[u8]| {
    STATE.with_borrow_mut(|state| {
        let state = state.get_or_insert_with(|| State {
            symbolizer: new_symbolizer(),
            dir: tempfile::tempdir().expect("temporary directory"),
            files: 0,
        });
        // A new file (and inode) per input: the cache must not confuse them.
        state.files += 1;
        let path = state.dir.path().join(format!("input-{}", state.files));
        std::fs::write(&path, data).expect("write the input");
        keep_panics_quiet();
        if panic::catch_unwind(AssertUnwindSafe(|| check(&state.symbolizer, &path, data))).is_err()
        {
            eprintln!("{}", LAST_PANIC.take());
            std::process::abort();
        }
        state.symbolizer.evict_elf(&path);
        std::fs::remove_file(&path).expect("remove the input");
    });
});

fn check(symbolizer: &Symbolizer, path: &Path, data: &[u8]) {
    let (mut addrs, mut offsets) = (vec![0, 1, u64::MAX], vec![0, u64::MAX]);
    if let Ok(object) = object::File::parse(data) {
        for s in object.symbols().take(32) {
            addrs.extend([s.address(), s.address().wrapping_add(s.size() / 2)]);
        }
        for s in object.segments().take(8) {
            let (offset, size) = s.file_range();
            addrs.extend([s.address(), s.address().wrapping_add(s.size())]);
            offsets.extend([
                offset,
                offset.wrapping_add(size / 2),
                offset.wrapping_add(size),
            ]);
        }
    }
    for chunk in data.rchunks(8).take(2) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        addrs.push(u64::from_le_bytes(b));
        offsets.push(u64::from_le_bytes(b) % (data.len() as u64 + 1));
    }
    addrs.truncate(MAX_ADDRESSES);
    offsets.truncate(MAX_ADDRESSES);

    let first = symbolizer.elf_virtual_addresses(path, &addrs);
    valid(&first, addrs.len());
    assert_eq!(
        symbolizer.elf_virtual_addresses(path, &addrs),
        first,
        "cached virtual addresses"
    );
    let first = symbolizer.elf_file_offsets(path, &offsets);
    valid(&first, offsets.len());
    assert_eq!(
        symbolizer.elf_file_offsets(path, &offsets),
        first,
        "cached file offsets"
    );
}

fn valid(symbols: &[Symbol], n: usize) {
    assert_eq!(symbols.len(), n, "one result per address");
    for s in symbols {
        if let Symbol::Known(frames) = s {
            assert!(!frames.is_empty(), "a known symbol has frames");
        }
    }
}
