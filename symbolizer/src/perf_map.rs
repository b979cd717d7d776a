//! perf's JIT symbol maps, `/tmp/perf-PID.map`.
//!
//! One entry per line, `START SIZE NAME`: START and SIZE in hex (with or
//! without `0x`), NAME the rest of the line (may contain spaces, may be
//! empty). Node (`--perf-basic-prof`), the JVM (perf-map-agent,
//! `-XX:+DumpPerfMapAtExit`), .NET (`DOTNET_PerfMapEnabled`) and Python
//! 3.12+ (`-X perf`) write it, appending while they run.
//!
//! A JIT reuses the memory of code it has thrown away, so entries can
//! overlap. The later line wins for the addresses it covers: it describes
//! the code at those addresses now. perf itself has no such rule: its
//! `dso__load_perf_map` (tools/perf/util/symbol.c) inserts every line into
//! an rbtree keyed by start address (`symbols__insert`, equal starts go
//! right) and `symbols__find` returns the first node on the way down whose
//! range contains the address, so for overlapping entries its answer
//! depends on the tree's shape, not on the order of the lines.
//!
//! Parsing never fails: a malformed line is skipped and counted. Lines are
//! split on `\n` (a `\r` before it is dropped); START may be preceded by
//! blanks (spaces or tabs) and is separated from SIZE by one or more; NAME
//! starts after the one blank that follows SIZE. Malformed: no SIZE, a
//! field that is not hex or does not fit 64 bits, SIZE 0, START + SIZE
//! beyond 2^64 - 1, and a last line without `\n` (the JIT may be writing
//! it, or the file was cut at [`MAX_FILE_BYTES`]). A blank line counts as
//! malformed too, so `lines == entries + malformed`. Names that are not
//! UTF-8 are converted lossily (U+FFFD).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Read as _},
    mem::size_of,
    ops::{Bound, Range},
    path::Path,
};

/// The most [`PerfMap::read`] reads of a file; the rest is ignored (and the
/// line cut at the limit dropped). A long-running Node or JVM process can
/// write tens of megabytes; parsing holds about 3× the text while it runs.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The symbols of a perf map, as non-overlapping address ranges sorted by
/// start, each pointing at the line that owns it after "later wins".
#[derive(Clone, Debug, Default)]
pub struct PerfMap {
    /// Sorted by start, non-overlapping, never empty ranges.
    ranges: Vec<OwnedRange>,
    /// The lines that own at least one range.
    functions: Vec<Function>,
    /// Their names, concatenated.
    names: String,
}

#[derive(Clone, Copy, Debug)]
struct OwnedRange {
    start: u64,
    /// Exclusive.
    end: u64,
    function: usize,
}

#[derive(Clone, Debug)]
struct Function {
    start: u64,
    size: u64,
    name: Range<usize>,
}

/// The entry covering an address: the line as the JIT wrote it. Its range
/// may be larger than the addresses it still owns when later lines took
/// parts of it. Borrows the name from the [`PerfMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerfMapEntry<'a> {
    pub start: u64,
    pub size: u64,
    pub name: &'a str,
}

/// What parsing saw: `lines == entries + malformed`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PerfMapStats {
    pub lines: u64,
    pub entries: u64,
    pub malformed: u64,
}

/// A well-formed line; `name` borrows the text.
struct Line<'t> {
    start: u64,
    end: u64,
    name: &'t [u8],
}

impl PerfMap {
    /// Reads at most [`MAX_FILE_BYTES`] of the file at `path` and parses
    /// them. Only opening and reading the file can fail.
    pub fn read(path: &Path) -> io::Result<(PerfMap, PerfMapStats)> {
        read_limited(path, MAX_FILE_BYTES)
    }

    /// Parses a perf map. O(n log n) in the number of lines, whatever the
    /// overlaps.
    pub fn parse(text: &[u8]) -> (PerfMap, PerfMapStats) {
        let mut stats = PerfMapStats::default();
        let mut lines = Vec::new();
        for raw in text.split_inclusive(|&b| b == b'\n') {
            stats.lines += 1;
            match raw.strip_suffix(b"\n").and_then(parse_line) {
                Some(line) => {
                    stats.entries += 1;
                    lines.push(line);
                }
                None => stats.malformed += 1,
            }
        }
        (Self::later_wins(&lines), stats)
    }

    /// Lays the lines over each other, the later ones on top: going from
    /// the last line to the first, each line gets the parts of its range
    /// that no later line covers. `covered` holds the union of the later
    /// lines as disjoint ranges (start → exclusive end); each line merges
    /// the ranges it touches into one, so every range is inserted once and
    /// removed at most once: O(n log n) in all, at most 2n - 1 pieces.
    fn later_wins(lines: &[Line<'_>]) -> PerfMap {
        let mut map = PerfMap::default();
        let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
        let mut merged = Vec::new();
        for line in lines.iter().rev() {
            let (start, end) = (line.start, line.end);
            let first_piece = map.ranges.len();
            let (mut union_start, mut union_end, mut cursor) = (start, end, start);
            // A covered range that starts at or before ours and reaches it.
            if let Some((&s, &e)) = covered.range(..=start).next_back()
                && e >= start
            {
                (union_start, union_end, cursor) = (s, e.max(end), e.max(start));
                merged.push(s);
            }
            // The covered ranges that start inside ours (or right at its end).
            for (&s, &e) in covered.range((Bound::Excluded(start), Bound::Included(end))) {
                if cursor < s {
                    map.push_range(cursor, s);
                }
                cursor = cursor.max(e);
                union_end = union_end.max(e);
                merged.push(s);
            }
            if cursor < end {
                map.push_range(cursor, end);
            }
            for s in merged.drain(..) {
                covered.remove(&s);
            }
            covered.insert(union_start, union_end);

            if map.ranges.len() > first_piece {
                let name_start = map.names.len();
                map.names.push_str(&String::from_utf8_lossy(line.name));
                let function = map.functions.len();
                map.functions.push(Function {
                    start,
                    size: end - start,
                    name: name_start..map.names.len(),
                });
                for piece in &mut map.ranges[first_piece..] {
                    piece.function = function;
                }
            }
        }
        map.ranges.sort_unstable_by_key(|r| r.start);
        map.ranges.shrink_to_fit();
        map.functions.shrink_to_fit();
        map.names.shrink_to_fit();
        map
    }

    fn push_range(&mut self, start: u64, end: u64) {
        // The function index is set once the line is known to own a range.
        self.ranges.push(OwnedRange {
            start,
            end,
            function: usize::MAX,
        });
    }

    /// The entry that covers `addr` (the latest line whose range contains
    /// it). O(log n).
    pub fn find(&self, addr: u64) -> Option<PerfMapEntry<'_>> {
        let i = self.ranges.partition_point(|r| r.start <= addr);
        let range = self.ranges.get(i.checked_sub(1)?)?;
        if addr >= range.end {
            return None;
        }
        let function = self.functions.get(range.function)?;
        Some(PerfMapEntry {
            start: function.start,
            size: function.size,
            name: self.names.get(function.name.clone()).unwrap_or_default(),
        })
    }

    /// The number of disjoint address ranges (a line partly covered by
    /// later ones can own several; one fully covered owns none).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Approximate heap memory held, for cache accounting.
    pub fn heap_bytes(&self) -> usize {
        self.ranges.capacity() * size_of::<OwnedRange>()
            + self.functions.capacity() * size_of::<Function>()
            + self.names.capacity()
    }
}

fn read_limited(path: &Path, limit: u64) -> io::Result<(PerfMap, PerfMapStats)> {
    let file = File::open(path)?;
    let mut text = Vec::new();
    file.take(limit).read_to_end(&mut text)?;
    if text.len() as u64 >= limit {
        tracing::warn!(
            path = %path.display(),
            limit,
            "perf map larger than the limit: the rest is ignored"
        );
    }
    Ok(PerfMap::parse(&text))
}

fn is_blank(b: &u8) -> bool {
    matches!(b, b' ' | b'\t')
}

/// One line without its `\n`.
fn parse_line(line: &[u8]) -> Option<Line<'_>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = &line[line.iter().position(|b| !is_blank(b))?..];
    let blank = line.iter().position(is_blank)?;
    let start = hex(&line[..blank])?;
    let rest = &line[blank..];
    let rest = &rest[rest.iter().position(|b| !is_blank(b))?..];
    let (size, name) = match rest.iter().position(is_blank) {
        Some(blank) => (hex(&rest[..blank])?, &rest[blank + 1..]),
        None => (hex(rest)?, &b""[..]),
    };
    if size == 0 {
        return None;
    }
    let end = start.checked_add(size)?;
    Some(Line { start, end, name })
}

/// Hex digits, optionally after `0x`; `None` if empty, not hex, or more
/// than 64 bits.
fn hex(field: &[u8]) -> Option<u64> {
    let digits = field
        .strip_prefix(b"0x")
        .or_else(|| field.strip_prefix(b"0X"))
        .unwrap_or(field);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = char::from(b).to_digit(16)?;
        acc.checked_mul(16)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (PerfMap, PerfMapStats) {
        PerfMap::parse(text.as_bytes())
    }

    fn stats(lines: u64, entries: u64, malformed: u64) -> PerfMapStats {
        PerfMapStats {
            lines,
            entries,
            malformed,
        }
    }

    fn entry(start: u64, size: u64, name: &str) -> Option<PerfMapEntry<'_>> {
        Some(PerfMapEntry { start, size, name })
    }

    #[test]
    fn parses_lines_and_finds_by_address() {
        let (map, st) = parse(concat!(
            "7f0000001000 40 JS:~f [eval]:1:11\n",
            "0x00007f0000002000 0x0000000000000010 long J.f(long)\n",
            "7F0000003000 8 \n",
            "7f0000004000 8\n",
            "\t 7f0000005000 \t 1  two  spaces\r\n",
        ));
        assert_eq!(st, stats(5, 5, 0));
        assert_eq!(map.len(), 5);
        assert_eq!(
            map.find(0x7f0000001000),
            entry(0x7f0000001000, 0x40, "JS:~f [eval]:1:11")
        );
        assert_eq!(
            map.find(0x7f000000103f),
            entry(0x7f0000001000, 0x40, "JS:~f [eval]:1:11")
        );
        assert_eq!(map.find(0x7f0000001040), None);
        assert_eq!(map.find(0x7f0000000fff), None);
        assert_eq!(
            map.find(0x7f0000002008),
            entry(0x7f0000002000, 0x10, "long J.f(long)")
        );
        assert_eq!(map.find(0x7f0000003007), entry(0x7f0000003000, 8, ""));
        assert_eq!(map.find(0x7f0000004000), entry(0x7f0000004000, 8, ""));
        assert_eq!(
            map.find(0x7f0000005000),
            entry(0x7f0000005000, 1, " two  spaces")
        );
        assert_eq!(map.find(0x7f0000005001), None);
        assert_eq!(map.find(0), None);
        assert_eq!(map.find(u64::MAX), None);
    }

    #[test]
    fn skips_and_counts_malformed_lines() {
        let text: &[u8] = concat!(
            "1000 10 ok\n",
            "\n",                                // blank
            "zz00 10 bad start\n",               // not hex
            "2000 -10 bad size\n",               // not hex
            "2000\n",                            // no size
            "3000 0 empty\n",                    // size 0
            "0x 10 no digits\n",                 // no digits
            "10000000000000000 1 too wide\n",    // start > 64 bits
            "ffffffffffffffff 1 past the end\n", // start + size = 2^64
            "fffffffffffffff0 f last byte\n",    // ends at 2^64 - 1: fine
            "+1000 10 sign\n",                   // strtoull would take it; we do not
        )
        .as_bytes();
        let mut text = text.to_vec();
        text.extend_from_slice(b"4000 10 caf\xc3\xa9 \xff\xfe\n");
        text.extend_from_slice(b"5000 10 unterminated");
        let (map, st) = PerfMap::parse(&text);
        assert_eq!(st, stats(13, 3, 10));
        assert_eq!(map.len(), 3);
        assert_eq!(map.find(0x100f), entry(0x1000, 0x10, "ok"));
        assert_eq!(
            map.find(0x4000),
            entry(0x4000, 0x10, "café \u{fffd}\u{fffd}")
        );
        assert_eq!(
            map.find(u64::MAX - 1),
            entry(0xfffffffffffffff0, 0xf, "last byte")
        );
        assert_eq!(map.find(u64::MAX), None);
        assert_eq!(map.find(0x5000), None);
        assert_eq!(map.find(0x3000), None);
    }

    #[test]
    fn empty_input() {
        let (map, st) = PerfMap::parse(b"");
        assert_eq!(st, PerfMapStats::default());
        assert!(map.is_empty());
        assert_eq!(map.find(0), None);
        assert_eq!(map.heap_bytes(), 0);
    }

    #[test]
    fn later_line_wins_inside_an_earlier_one() {
        let (map, st) = parse("1000 100 old\n1040 40 new\n");
        assert_eq!(st, stats(2, 2, 0));
        // old is cut in two around new.
        assert_eq!(map.len(), 3);
        assert_eq!(map.find(0x1000), entry(0x1000, 0x100, "old"));
        assert_eq!(map.find(0x103f), entry(0x1000, 0x100, "old"));
        assert_eq!(map.find(0x1040), entry(0x1040, 0x40, "new"));
        assert_eq!(map.find(0x107f), entry(0x1040, 0x40, "new"));
        assert_eq!(map.find(0x1080), entry(0x1000, 0x100, "old"));
        assert_eq!(map.find(0x10ff), entry(0x1000, 0x100, "old"));
        assert_eq!(map.find(0x1100), None);
    }

    #[test]
    fn later_line_hides_an_earlier_one_it_covers() {
        let (map, _) = parse("1040 40 old\n1000 100 new\n");
        assert_eq!(map.len(), 1);
        assert_eq!(map.find(0x1050), entry(0x1000, 0x100, "new"));
        // The hidden line's name is not kept.
        assert_eq!(map.names, "new");
    }

    #[test]
    fn same_range_reused_several_times() {
        let (map, st) = parse("2000 20 a\n2000 20 b\n2000 20 c\n");
        assert_eq!(st, stats(3, 3, 0));
        assert_eq!(map.len(), 1);
        assert_eq!(map.find(0x2000), entry(0x2000, 0x20, "c"));
        assert_eq!(map.find(0x201f), entry(0x2000, 0x20, "c"));
    }

    #[test]
    fn later_line_straddles_several_earlier_ones() {
        // a [0x10,0x20) b [0x20,0x30) c [0x30,0x40), then d [0x18,0x38)
        // and e [0x3c,0x50).
        let (map, _) = parse("10 10 a\n20 10 b\n30 10 c\n18 20 d\n3c 14 e\n");
        let owner = |addr| map.find(addr).map(|e| e.name);
        let expected = [
            (0x0f, None),
            (0x10, Some("a")),
            (0x17, Some("a")),
            (0x18, Some("d")),
            (0x2f, Some("d")),
            (0x37, Some("d")),
            (0x38, Some("c")),
            (0x3b, Some("c")),
            (0x3c, Some("e")),
            (0x4f, Some("e")),
            (0x50, None),
        ];
        for (addr, name) in expected {
            assert_eq!(owner(addr), name, "at {addr:#x}");
        }
        // b is hidden; a, d, c, e own one range each.
        assert_eq!(map.len(), 4);
        assert_eq!(map.functions.len(), 4);
    }

    #[test]
    fn earlier_line_fills_the_gaps_between_later_ones() {
        // Later lines first own [0x10,0x20) and [0x30,0x40); the earlier
        // wide line keeps the three gaps around them.
        let (map, _) = parse("0 60 wide\n10 10 x\n30 10 y\n");
        assert_eq!(map.len(), 5);
        let names: Vec<_> = [0x0, 0x10, 0x20, 0x30, 0x40, 0x5f, 0x60]
            .into_iter()
            .map(|a| map.find(a).map(|e| e.name))
            .collect();
        assert_eq!(
            names,
            [
                Some("wide"),
                Some("x"),
                Some("wide"),
                Some("y"),
                Some("wide"),
                Some("wide"),
                None
            ]
        );
    }

    #[test]
    fn adjacent_entries_do_not_overlap() {
        let (map, _) = parse("100 10 a\n110 10 b\n");
        assert_eq!(map.find(0x10f).map(|e| e.name), Some("a"));
        assert_eq!(map.find(0x110).map(|e| e.name), Some("b"));
        assert_eq!(map.len(), 2);
    }

    /// The oracle: the last well-formed line that contains the address.
    fn naive(lines: &[(u64, u64, String)], addr: u64) -> Option<PerfMapEntry<'_>> {
        lines
            .iter()
            .rev()
            .find(|(start, size, _)| addr >= *start && addr - start < *size)
            .map(|(start, size, name)| PerfMapEntry {
                start: *start,
                size: *size,
                name,
            })
    }

    #[test]
    fn agrees_with_a_scan_from_the_last_line() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for round in 0..300 {
            let mut text = String::new();
            let mut valid = Vec::new();
            let mut malformed = 0;
            let n = rng.usize(0..40);
            for i in 0..n {
                if rng.u8(..) < 20 {
                    text.push_str(["zz 10 x\n", "10 0 zero\n", "\n", "10\n"][rng.usize(..4)]);
                    malformed += 1;
                    continue;
                }
                let start = rng.u64(0..200);
                let size = rng.u64(1..60);
                let name = format!("f{i} r{round}");
                if rng.bool() {
                    text.push_str(&format!("{start:x} {size:x} {name}\n"));
                } else {
                    text.push_str(&format!("0x{start:016x} 0x{size:x} {name}\n"));
                }
                valid.push((start, size, name));
            }
            let (map, st) = PerfMap::parse(text.as_bytes());
            assert_eq!(st, stats(n as u64, valid.len() as u64, malformed));
            for addr in 0..280 {
                assert_eq!(map.find(addr), naive(&valid, addr), "{addr:#x} in\n{text}");
            }
            assert!(map.len() <= (2 * valid.len()).saturating_sub(1));
            assert!(
                map.ranges
                    .windows(2)
                    .all(|w| w[0].start < w[0].end && w[0].end <= w[1].start)
            );
        }
    }

    #[test]
    fn many_overlapping_lines_parse_in_n_log_n() {
        const N: u64 = 100_000;
        // Nested ranges, each line inside the previous one, then 100k small
        // lines under one wide line written last... and first.
        let mut text = String::new();
        for i in 0..N {
            text.push_str(&format!("{:x} {:x} nest{i}\n", i, 2 * (N - i)));
        }
        let (map, st) = parse(&text);
        assert_eq!(st.entries, N);
        // Every line keeps one byte on each side except the last, whole.
        assert_eq!(map.len() as u64, 2 * N - 1);
        assert_eq!(map.find(0).map(|e| e.name), Some("nest0"));
        assert_eq!(
            map.find(N - 1).map(|e| e.name),
            Some(format!("nest{}", N - 1)).as_deref()
        );
        assert_eq!(
            map.find(N).map(|e| e.name),
            Some(format!("nest{}", N - 1)).as_deref()
        );
        assert_eq!(map.find(2 * N - 1).map(|e| e.name), Some("nest0"));

        let mut text = String::from("0 100000000 first-wide\n");
        for i in 0..N {
            text.push_str(&format!("{:x} 1 small{i}\n", 2 * i));
        }
        let small_then_wide = format!("{text}0 100000000 last-wide\n");
        let (map, _) = parse(&text);
        // first-wide keeps the N gaps between the small lines and the rest.
        assert_eq!(map.len() as u64, 2 * N);
        assert_eq!(map.find(2 * 777).map(|e| e.name), Some("small777"));
        assert_eq!(map.find(2 * 777 + 1).map(|e| e.name), Some("first-wide"));
        let (map, _) = parse(&small_then_wide);
        assert_eq!(map.len(), 1);
        assert_eq!(map.find(2 * 777).map(|e| e.name), Some("last-wide"));
    }

    #[test]
    fn heap_bytes_counts_what_is_kept() {
        let (one, _) = parse("1000 10 a-name\n");
        let (hidden, _) = parse("1000 10 a-long-name-nobody-sees\n1000 10 a-name\n");
        assert!(one.heap_bytes() >= "a-name".len() + size_of::<OwnedRange>());
        assert_eq!(hidden.heap_bytes(), one.heap_bytes());
    }

    #[test]
    fn read_stops_at_the_limit_and_drops_the_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-1.map");
        std::fs::write(&path, "1000 10 first\n2000 10 second\n").unwrap();
        let (map, st) = PerfMap::read(&path).unwrap();
        assert_eq!(st, stats(2, 2, 0));
        assert_eq!(map.find(0x2000).map(|e| e.name), Some("second"));
        // 20 bytes: the first line and "2000 1" of the second.
        let (map, st) = read_limited(&path, 20).unwrap();
        assert_eq!(st, stats(2, 1, 1));
        assert_eq!(map.find(0x1000).map(|e| e.name), Some("first"));
        assert_eq!(map.find(0x2000), None);
        assert_eq!(
            PerfMap::read(&dir.path().join("missing"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    /// The hand-written seed with reused memory and malformed lines.
    #[test]
    fn reads_the_reuse_seed() {
        let (map, st) = PerfMap::parse(include_bytes!("../fuzz/corpus/perf_map/reuse.map"));
        assert_eq!(st, stats(12, 8, 4));
        let serve = entry(0x7f3a10000000, 0x600, "py::serve:/srv/app/main.py");
        // The three lines before py::serve are hidden by it; py::tick, later
        // still, cuts a hole in it.
        assert_eq!(map.find(0x7f3a10000000), serve);
        assert_eq!(map.find(0x7f3a10000120), serve);
        assert_eq!(map.find(0x7f3a10000400), serve);
        assert_eq!(
            map.find(0x7f3a10000580),
            entry(0x7f3a10000580, 8, "py::tick:/srv/app/main.py")
        );
        assert_eq!(map.find(0x7f3a10000588), serve);
        assert_eq!(map.find(0x7f3a10000600), None);
        assert_eq!(
            map.find(0x7f3a10000805),
            entry(0x7f3a10000800, 0x10, "café \u{fffd}")
        );
        assert_eq!(
            map.find(0x7f3a1000093f),
            entry(0x7f3a10000900, 0x40, "[unknown] with  two  spaces")
        );
        assert_eq!(map.find(0x7f3a10000a00), entry(0x7f3a10000a00, 0x20, ""));
        assert_eq!(map.find(0x7f3a10000b00), None);
        assert_eq!(map.len(), 6);
    }

    /// Maps written by real JITs (symbolizer/fuzz/make-seeds): every line is
    /// well-formed, none overlap, and each line's first and last byte find
    /// it. The expected entries come from a plain split of each line.
    #[test]
    fn reads_real_jit_maps() {
        let seeds: [(&str, &[u8]); 2] = [
            ("node", include_bytes!("../fuzz/corpus/perf_map/node.map")),
            ("java", include_bytes!("../fuzz/corpus/perf_map/java.map")),
        ];
        for (jit, text) in seeds {
            let text = std::str::from_utf8(text).unwrap();
            let (map, st) = parse(text);
            let n = text.lines().count() as u64;
            assert!(n >= 20, "{jit}: {n} lines");
            assert_eq!(st, stats(n, n, 0), "{jit}");
            assert_eq!(map.len() as u64, n, "{jit}");
            for line in text.lines() {
                let mut fields = line.splitn(3, ' ');
                let mut hex_field = || {
                    let f = fields.next().unwrap();
                    u64::from_str_radix(f.trim_start_matches("0x"), 16).unwrap()
                };
                let (start, size) = (hex_field(), hex_field());
                let name = fields.next().unwrap();
                for addr in [start, start + size - 1] {
                    assert_eq!(map.find(addr), entry(start, size, name), "{jit}: {line}");
                }
            }
        }
    }
}
