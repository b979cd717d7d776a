//! Builds an executable's unwind table: its `.eh_frame` (and `.debug_frame`)
//! call-frame information evaluated into the sorted [`UnwindRow`]s that the
//! eBPF unwinder binary-searches (`fathom_common::unwind`).
//!
//! Pure logic over the file's bytes, so that it is tested against readelf and
//! fuzzed. The input is untrusted (any file a process maps): malformed input
//! gives an error, never a panic, and what is allocated is bounded by the
//! input's size and by [`MAX_RAW_ROWS`].

use std::collections::HashMap;

use fathom_common::unwind::{MAX_TABLE_ROWS, UnwindRow, cfa, rbp, signal_frame};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, CommonInformationEntry, DebugFrame, EhFrame, EndianSlice,
    LittleEndian, Operation, Reader as _, Register, RegisterRule, UnwindContext, UnwindOffset,
    UnwindSection, UnwindTableRow,
};
use object::{Object as _, ObjectSection as _, SectionKind};

type R<'a> = EndianSlice<'a, LittleEndian>;

/// x86-64 DWARF register numbers.
const RBP: Register = Register(6);
const RSP: Register = Register(7);
const RIP: Register = Register(16);

/// Rows collected before sorting and merging: merging usually removes few
/// (consecutive FDEs rarely share a rule), so this only keeps hostile input
/// from allocating without bound (16 bytes a row: 128 MiB at most).
pub const MAX_RAW_ROWS: u64 = 4 * MAX_TABLE_ROWS as u64;

/// Where the rows came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Source {
    /// `.eh_frame` only (what nearly every binary has).
    #[default]
    EhFrame,
    /// `.debug_frame` only (built with `-fno-asynchronous-unwind-tables`).
    DebugFrame,
    /// `.eh_frame`, with `.debug_frame` for the code it does not cover.
    Both,
}

/// What went into a table: for logs and for the bytes-per-MB-of-text figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BuildStats {
    pub source: Source,
    /// FDEs whose rows are in the table.
    pub fdes: u32,
    /// FDEs left out: malformed (their instructions or CIE do not parse),
    /// or describing addresses outside the executable sections (the
    /// zero-address leftovers of discarded functions in `.debug_frame`).
    pub skipped_fdes: u32,
    /// Rows (gaps included) before rows with the same rule were merged.
    pub rows_before_merge: u64,
    /// Rows before merging, by rule: CFA rules the unwinder cannot follow,
    /// RBP rules it cannot follow (outside signal frames, whose RBP comes
    /// from the saved context), PLT stubs and signal trampolines.
    pub unsupported_cfa: u32,
    pub unsupported_rbp: u32,
    pub plt: u32,
    pub signal: u32,
    /// Bytes of executable sections (`SHF_EXECINSTR`).
    pub text_bytes: u64,
}

/// An executable's unwind rows, as the eBPF unwinder reads them.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UnwindTable {
    /// The ELF virtual address that row pc 0 stands for (the lowest address
    /// an FDE covers): row pcs are 32-bit offsets from it.
    pub base: u64,
    /// Sorted by strictly increasing `pc`; no two consecutive rows have the
    /// same rule; the last one is a [`cfa::NONE`] gap.
    pub rows: Vec<UnwindRow>,
    pub stats: BuildStats,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("not a usable ELF file: {0}")]
    Elf(String),
    #[error("no unwind information (.eh_frame or .debug_frame)")]
    NoUnwindInfo,
    #[error("{rows} unwind rows, more than the {MAX_TABLE_ROWS} a table may have")]
    TooManyRows { rows: u64 },
    #[error("unwind information spans {start:#x}..{end:#x}, more than 4 GiB")]
    AddressSpan { start: u64, end: u64 },
    #[error("malformed {section}: {error}")]
    Parse {
        section: &'static str,
        error: gimli::Error,
    },
    /// A serialized table ([`UnwindTable::from_bytes`]) that is not one.
    #[error("bad serialized unwind table: {0}")]
    Format(&'static str),
    /// Reading the ELF file (for [`super::TableCache`]).
    #[error("reading the file: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the unwind table of an x86-64 ELF executable or shared object.
///
/// `.eh_frame` is used where it covers code; `.debug_frame` fills only the
/// address ranges no `.eh_frame` FDE overlaps (files built without
/// asynchronous unwind tables have only `.debug_frame`). Compressed
/// `.debug_frame` sections are ignored.
pub fn build(elf: &[u8]) -> Result<UnwindTable, TableError> {
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(elf)
        .map_err(|e| TableError::Elf(e.to_string()))?;
    if file.architecture() != object::Architecture::X86_64 || !file.is_little_endian() {
        return Err(TableError::Elf(format!(
            "not x86-64 little-endian ({:?})",
            file.architecture()
        )));
    }
    if file.kind() == object::ObjectKind::Relocatable {
        return Err(TableError::Elf("a relocatable object".into()));
    }

    let mut text = Vec::new();
    let mut text_bytes = 0u64;
    let mut got = None;
    let mut text_section = None;
    for section in file.sections() {
        let name = section.name().unwrap_or("");
        if section.kind() == SectionKind::Text {
            let (start, size) = (section.address(), section.size());
            text_bytes = text_bytes.saturating_add(size);
            if let Some(end) = start.checked_add(size)
                && size > 0
            {
                text.push((start, end));
            }
            if name == ".text" {
                text_section = Some(start);
            }
        } else if name == ".got" {
            got = Some(section.address());
        }
    }
    text.sort_unstable();
    let text = merge_ranges(text);

    let section_data = |name: &str| -> Option<(u64, &[u8])> {
        let section = file.section_by_name(name)?;
        // A compressed section would need decompressing; no linker
        // compresses .eh_frame, and a compressed .debug_frame is skipped.
        let compressed = section
            .compressed_file_range()
            .is_ok_and(|r| r.format != object::CompressionFormat::None);
        let data = section.data().ok()?;
        (!compressed && !data.is_empty()).then_some((section.address(), data))
    };
    let eh_frame = section_data(".eh_frame");
    let debug_frame = section_data(".debug_frame");
    if eh_frame.is_none() && debug_frame.is_none() {
        return Err(TableError::NoUnwindInfo);
    }

    let mut builder = Builder::new(&text, text_bytes);

    let mut eh_fdes = 0;
    if let Some((address, data)) = eh_frame {
        let mut bases = BaseAddresses::default().set_eh_frame(address);
        if let Some(text) = text_section {
            bases = bases.set_text(text);
        }
        if let Some(got) = got {
            bases = bases.set_got(got);
        }
        let mut section = EhFrame::new(data, LittleEndian);
        section.set_address_size(8);
        builder.add_section(&section, &bases, ".eh_frame", false)?;
        eh_fdes = builder.stats.fdes;
    }
    if let Some((_, data)) = debug_frame {
        let mut section = DebugFrame::new(data, LittleEndian);
        section.set_address_size(8);
        builder.covered.sort_unstable();
        let covered = merge_ranges(std::mem::take(&mut builder.covered));
        builder.covered = covered;
        builder.add_section(&section, &BaseAddresses::default(), ".debug_frame", true)?;
    }
    builder.stats.source = match (eh_fdes, builder.stats.fdes - eh_fdes) {
        (_, 0) => Source::EhFrame,
        (0, _) => Source::DebugFrame,
        _ => Source::Both,
    };
    builder.finish()
}

/// A row before its address is made relative to the table's base.
#[derive(Clone, Copy)]
pub(super) struct RawRow {
    pub(super) pc: u64,
    pub(super) row: UnwindRow,
}

pub(super) struct Builder<'t> {
    /// Executable address ranges, sorted and disjoint.
    text: &'t [(u64, u64)],
    pub(super) rows: Vec<RawRow>,
    stats: BuildStats,
    ctx: UnwindContext<usize>,
    /// Ranges of the `.eh_frame` FDEs taken (sorted and merged before
    /// `.debug_frame` is read).
    covered: Vec<(u64, u64)>,
}

impl<'t> Builder<'t> {
    pub(super) fn new(text: &'t [(u64, u64)], text_bytes: u64) -> Self {
        Self {
            text,
            rows: Vec::new(),
            stats: BuildStats {
                text_bytes,
                ..BuildStats::default()
            },
            ctx: UnwindContext::new(),
            covered: Vec::new(),
        }
    }

    fn add_section<'a, S>(
        &mut self,
        section: &S,
        bases: &BaseAddresses,
        name: &'static str,
        fill_only: bool,
    ) -> Result<(), TableError>
    where
        S: UnwindSection<R<'a>>,
        S::Offset: UnwindOffset<usize>,
    {
        let parse = |error| TableError::Parse {
            section: name,
            error,
        };
        // Most FDEs share a handful of CIEs: parse each once (keeping at
        // most MAX_CIES, so that hostile input cannot make this map many
        // times its size).
        const MAX_CIES: usize = 4096;
        let mut cies: HashMap<usize, CommonInformationEntry<R<'a>>> = HashMap::new();
        let mut entries = section.entries(bases);
        while let Some(entry) = entries.next().map_err(parse)? {
            let CieOrFde::Fde(partial) = entry else {
                continue;
            };
            let fde = partial.parse(|section, bases, offset| {
                let key = UnwindOffset::into(offset);
                if let Some(cie) = cies.get(&key) {
                    return Ok(cie.clone());
                }
                let cie = section.cie_from_offset(bases, offset)?;
                if cies.len() < MAX_CIES {
                    cies.insert(key, cie.clone());
                }
                Ok(cie)
            });
            let Ok(fde) = fde else {
                self.stats.skipped_fdes += 1;
                continue;
            };
            let (start, end) = (fde.initial_address(), fde.end_address());
            if start >= end {
                continue;
            }
            if !self.in_text(start, end) {
                self.stats.skipped_fdes += 1;
                continue;
            }
            if fill_only && overlaps(&self.covered, start, end) {
                continue;
            }
            let ra = fde.cie().return_address_register();
            let before = self.rows.len();
            let stats_before = self.stats;
            match self.add_fde(section, bases, &fde, ra, end) {
                Ok(()) => {
                    self.stats.fdes += 1;
                    if !fill_only {
                        self.covered.push((start, end));
                    }
                }
                Err(FdeError::Gimli(error)) => {
                    tracing::debug!(%error, start, end, section = name, "skipping an FDE");
                    self.rows.truncate(before);
                    self.stats = stats_before;
                    self.stats.skipped_fdes += 1;
                }
                Err(FdeError::TooManyRows) => {
                    return Err(TableError::TooManyRows {
                        rows: self.rows.len() as u64,
                    });
                }
            }
        }
        Ok(())
    }

    fn add_fde<'a, S>(
        &mut self,
        section: &S,
        bases: &BaseAddresses,
        fde: &gimli::FrameDescriptionEntry<R<'a>>,
        ra: Register,
        end: u64,
    ) -> Result<(), FdeError>
    where
        S: UnwindSection<R<'a>>,
    {
        let mut table = fde.rows(section, bases, &mut self.ctx)?;
        while let Some(row) = table.next_row()? {
            // Empty rows (an advance by 0) and rows past the FDE's end (a
            // hostile advance) describe nothing.
            if row.start_address() >= row.end_address().min(end) {
                continue;
            }
            let rule = classify(row, ra, section, &mut self.stats);
            push(&mut self.rows, row.start_address(), rule)?;
        }
        // The gap after the function; a row at the same address from the
        // next FDE wins over it when sorting.
        push(&mut self.rows, end, UnwindRow::default())
    }

    fn in_text(&self, start: u64, end: u64) -> bool {
        let i = self.text.partition_point(|&(s, _)| s <= start);
        i > 0 && self.text[i - 1].1 >= end
    }

    pub(super) fn finish(self) -> Result<UnwindTable, TableError> {
        let mut raw = self.rows;
        let mut stats = self.stats;
        stats.rows_before_merge = raw.len() as u64;
        if raw.is_empty() {
            return Err(TableError::NoUnwindInfo);
        }
        // Stable: at one address, gaps sort first, then real rows in the order
        // they were read; the last one wins (a later row of the same FDE at
        // the same address, or a function starting where another ends).
        raw.sort_by_key(|r| (r.pc, r.row.cfa_rule() != cfa::NONE));
        let base = raw[0].pc;
        let last = raw[raw.len() - 1].pc;
        if last - base > u64::from(u32::MAX) {
            return Err(TableError::AddressSpan {
                start: base,
                end: last,
            });
        }
        let mut rows: Vec<UnwindRow> = Vec::with_capacity(raw.len() / 2);
        let mut i = 0;
        while i < raw.len() {
            let mut j = i;
            while j + 1 < raw.len() && raw[j + 1].pc == raw[i].pc {
                j += 1;
            }
            let mut row = raw[j].row;
            // Cannot truncate: the span was checked above.
            row.pc = (raw[j].pc - base) as u32;
            if rows.last().is_none_or(|prev| !prev.same_rule(&row)) {
                rows.push(row);
            }
            i = j + 1;
        }
        if rows.len() > MAX_TABLE_ROWS as usize {
            return Err(TableError::TooManyRows {
                rows: rows.len() as u64,
            });
        }
        rows.shrink_to_fit();
        Ok(UnwindTable { base, rows, stats })
    }
}

enum FdeError {
    Gimli(gimli::Error),
    TooManyRows,
}

impl From<gimli::Error> for FdeError {
    fn from(e: gimli::Error) -> Self {
        Self::Gimli(e)
    }
}

fn push(rows: &mut Vec<RawRow>, pc: u64, row: UnwindRow) -> Result<(), FdeError> {
    if rows.len() as u64 >= MAX_RAW_ROWS {
        return Err(FdeError::TooManyRows);
    }
    rows.push(RawRow { pc, row });
    Ok(())
}

/// Sorted ranges with overlapping or touching ones joined.
fn merge_ranges(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Whether `[start, end)` overlaps one of the sorted, disjoint `ranges`.
fn overlaps(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|&(_, e)| e <= start);
    ranges.get(i).is_some_and(|&(s, _)| s < end)
}

/// The row (pc 0) for one row of the DWARF table.
fn classify<'a, S: UnwindSection<R<'a>>>(
    row: &UnwindTableRow<usize>,
    ra: Register,
    section: &S,
    stats: &mut BuildStats,
) -> UnwindRow {
    let unsupported = |stats: &mut BuildStats| {
        stats.unsupported_cfa += 1;
        UnwindRow::new(0, cfa::UNSUPPORTED, 0, rbp::SAME, 0)
    };
    let ra_rule = row.register(ra);
    if ra_rule == Some(RegisterRule::Undefined) {
        return UnwindRow::new(0, cfa::END, 0, rbp::SAME, 0);
    }
    let (cfa_rule, cfa_offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(offset) = u16::try_from(*offset) else {
                return unsupported(stats);
            };
            match *register {
                RSP => (cfa::RSP, offset),
                RBP => (cfa::RBP, offset),
                _ => return unsupported(stats),
            }
        }
        CfaRule::Expression(expr) => match expr.get(section).ok().and_then(cfa_expression) {
            Some(CfaExpression::Signal) => {
                // The trampoline's registers (RBP too) are in the saved
                // context; the other rules do not matter.
                stats.signal += 1;
                return UnwindRow::new(0, cfa::SIGNAL, 0, rbp::SAME, 0);
            }
            Some(CfaExpression::Plt { threshold }) => {
                stats.plt += 1;
                (cfa::PLT, threshold)
            }
            None => return unsupported(stats),
        },
    };
    // The unwinder reads the return address at CFA - 8, as x86-64 CIEs say.
    if ra_rule != Some(RegisterRule::Offset(-8)) {
        if cfa_rule == cfa::PLT {
            stats.plt -= 1;
        }
        return unsupported(stats);
    }
    let (rbp_rule, rbp_offset) = match row.register(RBP) {
        None | Some(RegisterRule::Undefined | RegisterRule::SameValue) => (rbp::SAME, 0),
        Some(RegisterRule::Offset(n)) if n % 8 == 0 && i8::try_from(n / 8).is_ok() => {
            (rbp::AT_CFA, (n / 8) as i8)
        }
        Some(_) => {
            stats.unsupported_rbp += 1;
            (rbp::UNKNOWN, 0)
        }
    };
    UnwindRow::new(0, cfa_rule, cfa_offset, rbp_rule, rbp_offset)
}

enum CfaExpression {
    /// `DW_OP_breg7 8; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_litN;
    /// DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus`: the CFA of a lazy-binding
    /// PLT entry, RSP + 8 plus 8 once `rip & 15 >= N` (after its push).
    Plt { threshold: u16 },
    /// `DW_OP_breg7 160; DW_OP_deref`: glibc's `__restore_rt`, whose RSP
    /// points at the `ucontext_t` of the interrupted frame.
    Signal,
}

/// Recognizes the two CFA expressions x86-64 toolchains emit.
fn cfa_expression(expr: gimli::Expression<R<'_>>) -> Option<CfaExpression> {
    const MAX_OPS: usize = 9;
    let encoding = gimli::Encoding {
        address_size: 8,
        format: gimli::Format::Dwarf32,
        version: 4,
    };
    if expr.0.len() > 32 {
        return None;
    }
    let mut ops = Vec::with_capacity(MAX_OPS);
    let mut iter = expr.operations(encoding);
    while let Some(op) = iter.next().ok()? {
        if ops.len() == MAX_OPS {
            return None;
        }
        ops.push(op);
    }
    let breg = |op: &Operation<R<'_>>, reg: Register, off: i64| {
        matches!(op, Operation::RegisterOffset { register, offset, base_type }
            if *register == reg && *offset == off && base_type.0 == 0)
    };
    let lit = |op: &Operation<R<'_>>, v: u64| matches!(op, Operation::UnsignedConstant { value } if *value == v);
    match ops.as_slice() {
        [
            a,
            b,
            c,
            Operation::And,
            Operation::UnsignedConstant { value },
            Operation::Ge,
            d,
            Operation::Shl,
            Operation::Plus,
        ] if breg(a, RSP, 8) && breg(b, RIP, 0) && lit(c, 15) && lit(d, 3) => {
            Some(CfaExpression::Plt {
                threshold: u16::try_from(*value).ok()?,
            })
        }
        [
            a,
            Operation::Deref {
                base_type,
                size: 8,
                space: false,
            },
        ] if breg(a, RSP, signal_frame::RSP as i64) && base_type.0 == 0 => {
            Some(CfaExpression::Signal)
        }
        _ => None,
    }
}

impl UnwindTable {
    /// The row whose rule applies at ELF virtual address `vaddr`, or `None`
    /// below the table's base or past 4 GiB above it. Past the last FDE, the
    /// last row (a gap) applies.
    pub fn lookup(&self, vaddr: u64) -> Option<&UnwindRow> {
        let pc = u32::try_from(vaddr.checked_sub(self.base)?).ok()?;
        let i = self.rows.partition_point(|r| r.pc <= pc);
        i.checked_sub(1).map(|i| &self.rows[i])
    }

    /// Heap and inline bytes held.
    pub fn memory_bytes(&self) -> usize {
        size_of::<Self>() + self.rows.capacity() * size_of::<UnwindRow>()
    }

    /// The on-disk form: a header (magic, format version, base, stats, row
    /// count), the rows (8 bytes each, little-endian) and a CRC-32 of all
    /// that. [`Self::from_bytes`] checks all of it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.rows.len() * 8 + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.base.to_le_bytes());
        let s = &self.stats;
        out.extend_from_slice(&u32::from(source_code(s.source)).to_le_bytes());
        for v in [
            s.fdes,
            s.skipped_fdes,
            s.unsupported_cfa,
            s.unsupported_rbp,
            s.plt,
            s.signal,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&s.rows_before_merge.to_le_bytes());
        out.extend_from_slice(&s.text_bytes.to_le_bytes());
        // Fits: tables have at most MAX_TABLE_ROWS rows.
        out.extend_from_slice(&(self.rows.len() as u32).to_le_bytes());
        debug_assert_eq!(out.len(), HEADER_LEN);
        for r in &self.rows {
            out.extend_from_slice(&r.pc.to_le_bytes());
            out.extend_from_slice(&r.cfa_offset.to_le_bytes());
            out.push(r.rules);
            out.push(r.rbp_offset as u8);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads what [`Self::to_bytes`] wrote, rejecting anything else: a
    /// wrong magic or version, a wrong length, a bad checksum, rows out of
    /// order or with unknown rules.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TableError> {
        let bad = TableError::Format;
        let body_len = bytes.len().checked_sub(4).ok_or(bad("truncated"))?;
        if body_len < HEADER_LEN {
            return Err(bad("truncated"));
        }
        if &bytes[..4] != MAGIC {
            return Err(bad("not an unwind table (magic)"));
        }
        let (body, crc) = bytes.split_at(body_len);
        let mut r = ByteReader(&body[4..]);
        if r.u32()? != FORMAT_VERSION {
            return Err(bad("unknown format version"));
        }
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(bad("checksum mismatch"));
        }
        let base = r.u64()?;
        let source = match r.u32()? {
            0 => Source::EhFrame,
            1 => Source::DebugFrame,
            2 => Source::Both,
            _ => return Err(bad("unknown source")),
        };
        let mut stats = BuildStats {
            source,
            fdes: r.u32()?,
            skipped_fdes: r.u32()?,
            unsupported_cfa: r.u32()?,
            unsupported_rbp: r.u32()?,
            plt: r.u32()?,
            signal: r.u32()?,
            ..BuildStats::default()
        };
        stats.rows_before_merge = r.u64()?;
        stats.text_bytes = r.u64()?;
        let count = r.u32()?;
        if count > MAX_TABLE_ROWS || r.0.len() != count as usize * 8 {
            return Err(bad("row count does not match the length"));
        }
        let rows: Vec<UnwindRow> =
            r.0.chunks_exact(8)
                .map(|c| UnwindRow {
                    pc: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    cfa_offset: u16::from_le_bytes([c[4], c[5]]),
                    rules: c[6],
                    rbp_offset: c[7] as i8,
                })
                .collect();
        if rows.windows(2).any(|w| w[0].pc >= w[1].pc) {
            return Err(bad("rows out of order"));
        }
        if rows
            .last()
            .is_some_and(|r| base.checked_add(u64::from(r.pc)).is_none())
        {
            return Err(bad("rows past the end of the address space"));
        }
        if rows
            .iter()
            .any(|r| r.cfa_rule() > cfa::UNSUPPORTED || r.rbp_rule() > rbp::UNKNOWN)
        {
            return Err(bad("unknown rule"));
        }
        Ok(Self { base, rows, stats })
    }
}

const MAGIC: &[u8; 4] = b"FUWT";
/// Bump when the row semantics or the layout change: old cache files are
/// then rebuilt.
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 4 + 4 + 8 + 4 + 6 * 4 + 8 + 8 + 4;

fn source_code(source: Source) -> u8 {
    match source {
        Source::EhFrame => 0,
        Source::DebugFrame => 1,
        Source::Both => 2,
    }
}

struct ByteReader<'a>(&'a [u8]);

impl ByteReader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], TableError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(TableError::Format("truncated"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u32(&mut self) -> Result<u32, TableError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, TableError> {
        self.take().map(u64::from_le_bytes)
    }
}
