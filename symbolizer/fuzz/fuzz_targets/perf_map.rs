//! `PerfMap::parse` on arbitrary bytes, then `find` at addresses derived
//! from the lines (each start, last byte, end, byte before) and from the
//! input's last bytes. A found entry contains the address; the last
//! well-formed line owns all of its range; and on small inputs `find`
//! agrees with a separate, naive reading of the format: the last
//! well-formed line that contains the address.
#![no_main]

use fathom_symbolizer::perf_map::{PerfMap, PerfMapEntry, PerfMapStats};
use libfuzzer_sys::fuzz_target;

/// Lines up to which every address is also checked against the model
/// (which scans all lines for each address).
const MODEL_LINES: usize = 200;

fuzz_target!(|data: &[u8]| {
    let (map, stats) = PerfMap::parse(data);
    let (lines, model_stats) = model(data);
    assert_eq!(stats, model_stats, "line counts");
    assert!(
        map.len() <= (2 * lines.len()).saturating_sub(1),
        "at most 2n - 1 ranges"
    );
    assert_eq!(map.is_empty(), lines.is_empty());

    let mut addrs: Vec<u64> = vec![0, u64::MAX];
    for l in &lines {
        let last = l.start + (l.size - 1);
        addrs.extend([l.start, last, last.wrapping_add(1), l.start.wrapping_sub(1)]);
    }
    for chunk in data.rchunks(8).take(4) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        addrs.push(u64::from_le_bytes(b));
    }

    for &addr in &addrs {
        if let Some(e) = map.find(addr) {
            assert!(
                addr >= e.start && addr - e.start < e.size,
                "{e:?} does not contain {addr:#x}"
            );
        }
    }
    if let Some(last) = lines.last() {
        let owner = Some(entry(last));
        assert_eq!(map.find(last.start), owner, "the last line owns its start");
        assert_eq!(
            map.find(last.start + (last.size - 1)),
            owner,
            "and its last byte"
        );
    }
    if lines.len() <= MODEL_LINES {
        for &addr in &addrs {
            let expected = lines
                .iter()
                .rev()
                .find(|l| addr >= l.start && addr - l.start < l.size)
                .map(entry);
            assert_eq!(map.find(addr), expected, "at {addr:#x}");
        }
    }
});

struct Line {
    start: u64,
    size: u64,
    name: String,
}

fn entry(l: &Line) -> PerfMapEntry<'_> {
    PerfMapEntry {
        start: l.start,
        size: l.size,
        name: &l.name,
    }
}

/// The format as documented in perf_map.rs, read another way.
fn model(data: &[u8]) -> (Vec<Line>, PerfMapStats) {
    let mut stats = PerfMapStats::default();
    let mut lines = Vec::new();
    let mut parts: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    // After the last '\n': an unterminated line, or nothing.
    let tail = parts.pop().unwrap_or_default();
    for part in parts {
        stats.lines += 1;
        match model_line(part) {
            Some(l) => {
                stats.entries += 1;
                lines.push(l);
            }
            None => stats.malformed += 1,
        }
    }
    if !tail.is_empty() {
        stats.lines += 1;
        stats.malformed += 1;
    }
    (lines, stats)
}

fn model_line(line: &[u8]) -> Option<Line> {
    let blank = |b: u8| b == b' ' || b == b'\t';
    let line = match line.last() {
        Some(b'\r') => &line[..line.len() - 1],
        _ => line,
    };
    let mut i = 0;
    while i < line.len() && blank(line[i]) {
        i += 1;
    }
    let start_from = i;
    while i < line.len() && !blank(line[i]) {
        i += 1;
    }
    let start = model_hex(&line[start_from..i])?;
    if i == line.len() {
        return None;
    }
    while i < line.len() && blank(line[i]) {
        i += 1;
    }
    let size_from = i;
    while i < line.len() && !blank(line[i]) {
        i += 1;
    }
    let size = model_hex(&line[size_from..i])?;
    let name = if i < line.len() {
        &line[i + 1..]
    } else {
        &[][..]
    };
    if size == 0 || start.checked_add(size).is_none() {
        return None;
    }
    Some(Line {
        start,
        size,
        name: String::from_utf8_lossy(name).into_owned(),
    })
}

fn model_hex(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}
