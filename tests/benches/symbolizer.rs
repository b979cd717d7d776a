//! Symbolization speed: frames per second of Fathom's symbolizer, cold (a new
//! symbolizer parses the file) and warm (again, answered from the result
//! cache), plus blazesym alone once warm (result cache off), against
//! `addr2line -f -i -C` on the same address set, on the same machine; and
//! the memory the caches take.
//!
//! The binary is the agent's release build (~100 MiB: a large Rust program
//! with line tables and inline information, deep inlining). Addresses: the start and the middle of every
//! Nth function `nm` lists, the kind of addresses profiles hold.
//!
//!   cargo bench -p fathom-tests --bench symbolizer
//!
//! FATHOM_BENCH_FUNCTIONS (default 1000): functions sampled; FATHOM_BENCH_BINARY:
//! another ELF file to symbolize.
#![allow(
    clippy::unwrap_used,
    reason = "benchmark: a failed unwrap is a failed run"
)]

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use fathom_symbolizer::{
    Addressing, ObjectKey, ObjectRequest, Request, Symbol, SymbolizerConfig, SymbolizerService,
    elf::ElfLayout,
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Start and middle of every Nth sized text symbol, as `nm` lists them.
fn addresses(binary: &Path, functions: usize) -> Vec<u64> {
    let out = Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(binary)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut all: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [addr, size, kind, ..] if matches!(*kind, "t" | "T") => Some((
                    u64::from_str_radix(addr, 16).ok()?,
                    u64::from_str_radix(size, 16).ok()?,
                )),
                _ => None,
            }
        })
        .filter(|&(_, size)| size > 0)
        .collect();
    all.sort_unstable();
    all.dedup();
    let step = (all.len() / functions.max(1)).max(1);
    all.iter()
        .step_by(step)
        .take(functions)
        .flat_map(|&(addr, size)| [addr, addr + size / 2])
        .collect()
}

fn request(key: &ObjectKey, binary: &Path, addrs: &[u64]) -> Request {
    Request {
        kernel: Vec::new(),
        objects: vec![ObjectRequest {
            key: key.clone(),
            path: binary.to_path_buf(),
            addressing: Addressing::Virtual,
            addrs: addrs.to_vec(),
        }],
    }
}

/// Frames (functions including inlined ones) in a response.
fn frames(symbols: &[std::sync::Arc<Symbol>]) -> usize {
    symbols
        .iter()
        .map(|s| match &**s {
            Symbol::Known(f) => f.len(),
            Symbol::Unknown(_) => 1,
        })
        .sum()
}

fn main() {
    let binary: PathBuf = std::env::var_os("FATHOM_BENCH_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| fathom_tests::agent_binary().to_path_buf());
    let functions: usize = std::env::var("FATHOM_BENCH_FUNCTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let size_mib = std::fs::metadata(&binary).unwrap().len() as f64 / (1 << 20) as f64;
    let addrs = addresses(&binary, functions);
    println!(
        "binary {} ({size_mib:.0} MiB), {} addresses",
        binary.display(),
        addrs.len()
    );
    let layout = ElfLayout::read(&std::fs::File::open(&binary).unwrap()).unwrap();
    let key = ObjectKey::of_file(
        layout.build_id.as_deref(),
        &std::fs::metadata(&binary).unwrap(),
    );

    // addr2line: the same addresses, one process, on stdin.
    let started = Instant::now();
    let mut child = Command::new("addr2line")
        .args(["-f", "-i", "-C", "-e"])
        .arg(&binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        let input: String = addrs.iter().map(|a| format!("{a:#x}\n")).collect();
        stdin.write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let addr2line_secs = started.elapsed().as_secs_f64();
    // Two lines (function, file:line) per frame.
    let addr2line_frames = String::from_utf8_lossy(&out.stdout).lines().count() / 2;

    let rss_before = rss_kib();
    let service = SymbolizerService::spawn(SymbolizerConfig::default()).unwrap();
    let _lease = service.lease(key.clone());
    let started = Instant::now();
    let cold = service.symbolize(request(&key, &binary, &addrs)).unwrap();
    let cold_secs = started.elapsed().as_secs_f64();
    let our_frames = frames(&cold.objects[0]);

    let rounds = 50;
    let started = Instant::now();
    for _ in 0..rounds {
        let warm = service.symbolize(request(&key, &binary, &addrs)).unwrap();
        assert_eq!(warm.objects[0].len(), addrs.len());
    }
    let warm_secs = started.elapsed().as_secs_f64() / f64::from(rounds);
    let stats = service.stats();
    let rss_after = rss_kib();

    // blazesym alone, warm: no result cache.
    let uncached = SymbolizerService::spawn(SymbolizerConfig {
        cache_bytes: 0,
        ..SymbolizerConfig::default()
    })
    .unwrap();
    uncached.symbolize(request(&key, &binary, &addrs)).unwrap();
    let started = Instant::now();
    uncached.symbolize(request(&key, &binary, &addrs)).unwrap();
    let blazesym_secs = started.elapsed().as_secs_f64();

    let per_sec = |frames: usize, secs: f64| frames as f64 / secs;
    println!("{:<34} {:>10} {:>14}", "mode", "seconds", "frames/s");
    for (name, frames, secs) in [
        ("addr2line -f -i -C", addr2line_frames, addr2line_secs),
        ("fathom cold", our_frames, cold_secs),
        ("fathom warm (result cache)", our_frames, warm_secs),
        ("fathom warm, blazesym only", our_frames, blazesym_secs),
    ] {
        println!("{name:<34} {secs:>10.4} {:>14.0}", per_sec(frames, secs));
    }
    println!(
        "frames: ours {our_frames}, addr2line {addr2line_frames}; warm / addr2line: {:.0}x; cold / addr2line: {:.1}x",
        addr2line_secs / warm_secs,
        addr2line_secs / cold_secs
    );
    println!(
        "result cache: {} entries, {:.1} MiB (bound {} MiB); process RSS +{:.0} MiB after cold + warm (blazesym's parsed DWARF and mapped file pages included)",
        stats.cache_entries,
        stats.cache_bytes as f64 / (1 << 20) as f64,
        SymbolizerConfig::default().cache_bytes >> 20,
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0
    );
}
