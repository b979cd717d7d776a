//! The user-stack unwinder's kernel/user-space contract.
//!
//! User space turns each executable's `.eh_frame` (or `.debug_frame`) into
//! sorted [`UnwindRow`]s and writes them into one shared array (`UNWIND_ROWS`),
//! each table in a contiguous range. A process's executable mappings are
//! [`UnwindMapping`]s, sorted by address, in a contiguous range of
//! `UNWIND_MAPPINGS`; `UNWIND_PROCS[pid]` ([`UnwindProcess`]) names that range.
//! The perf-event program walks the user stack from the sampled registers:
//! per frame it finds the mapping of the instruction pointer, then either
//! binary-searches the mapping's rows or follows the frame pointer, as the
//! mapping says. Processes without an entry are walked by the kernel's
//! frame-pointer unwinder, as before.
//!
//! Only x86-64 rules are needed: the CFA is RSP or RBP plus an offset (or one
//! of two well-known expressions: PLT stubs and signal frames); RBP is either
//! unchanged or saved at CFA + offset; the return address is at CFA - 8.

use crate::assert_size;

/// One row of an unwind table: the rule for addresses from `pc` up to the
/// next row's `pc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct UnwindRow {
    /// Address relative to the table's base (see [`UnwindMapping::bias`]).
    pub pc: u32,
    /// [`cfa::RSP`]/[`cfa::RBP`]: the offset added to the register.
    /// [`cfa::PLT`]: the threshold of `rip & 15` above which 8 more bytes are
    /// on the stack.
    pub cfa_offset: u16,
    /// Low nibble: a [`cfa`] rule; high nibble: an [`rbp`] rule.
    pub rules: u8,
    /// [`rbp::AT_CFA`]: RBP was saved at `CFA + 8 * rbp_offset`.
    pub rbp_offset: i8,
}
assert_size!(UnwindRow, 8);

impl UnwindRow {
    pub const fn new(pc: u32, cfa_rule: u8, cfa_offset: u16, rbp_rule: u8, rbp_offset: i8) -> Self {
        Self {
            pc,
            cfa_offset,
            rules: (cfa_rule & 0xf) | (rbp_rule << 4),
            rbp_offset,
        }
    }

    #[inline(always)]
    pub const fn cfa_rule(&self) -> u8 {
        self.rules & 0xf
    }

    #[inline(always)]
    pub const fn rbp_rule(&self) -> u8 {
        self.rules >> 4
    }

    /// Same rule (everything but the address): consecutive rows with the
    /// same rule are merged.
    pub const fn same_rule(&self, other: &Self) -> bool {
        self.cfa_offset == other.cfa_offset
            && self.rules == other.rules
            && self.rbp_offset == other.rbp_offset
    }
}

/// How the canonical frame address (the caller's stack pointer) is found.
pub mod cfa {
    /// No unwind information covers the address (a gap between FDEs).
    pub const NONE: u8 = 0;
    /// CFA = RSP + offset.
    pub const RSP: u8 = 1;
    /// CFA = RBP + offset.
    pub const RBP: u8 = 2;
    /// A PLT stub: CFA = RSP + 8, plus 8 when `(rip & 15) >= offset`.
    pub const PLT: u8 = 3;
    /// A signal trampoline (`__restore_rt`): RSP points at a `ucontext_t`
    /// whose saved registers are the interrupted frame's.
    pub const SIGNAL: u8 = 4;
    /// The return address is undefined: the outermost frame (`_start`,
    /// `clone`). Unwinding is complete.
    pub const END: u8 = 5;
    /// A rule the unwinder cannot follow (another expression, a register
    /// other than RSP/RBP, an offset out of range).
    pub const UNSUPPORTED: u8 = 6;
}

/// How the caller's RBP is found.
pub mod rbp {
    /// Unchanged (callee-saved and not yet saved, or not touched).
    pub const SAME: u8 = 0;
    /// Saved at CFA + 8 * `rbp_offset`.
    pub const AT_CFA: u8 = 1;
    /// Recoverable only by a rule we do not follow: RBP is unknown from
    /// here on (a later RBP-based rule then fails).
    pub const UNKNOWN: u8 = 2;
}

/// One executable mapping of a process, as the unwinder sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UnwindMapping {
    /// Process addresses `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// Row address = instruction pointer - `bias` (wrapping): the load bias
    /// plus the table's base.
    pub bias: u64,
    /// The mapping's rows: `UNWIND_ROWS[rows_start .. rows_start + rows_len]`.
    pub rows_start: u32,
    pub rows_len: u32,
    /// A [`mapping_kind`].
    pub kind: u32,
    pub _reserved: u32,
}
assert_size!(UnwindMapping, 40);

/// How frames in a mapping are unwound.
pub mod mapping_kind {
    /// Binary-search the mapping's rows.
    pub const TABLE: u32 = 1;
    /// Follow RBP: code known to keep frame pointers (Go), or code without
    /// tables (JIT, a file whose table could not be built or did not fit).
    pub const FRAME_POINTER: u32 = 2;
}

/// `UNWIND_PROCS` value: where a process's mappings are.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UnwindProcess {
    pub mappings_start: u32,
    pub mappings_len: u32,
}
assert_size!(UnwindProcess, 8);

/// Most mappings one process may have (executable ones only).
pub const MAX_PROCESS_MAPPINGS: u32 = 1 << 12;
/// Binary-search steps: enough for 2^20 rows (one table) or mappings.
pub const MAX_SEARCH_STEPS: u32 = 21;
/// Largest table: rows of one executable.
pub const MAX_TABLE_ROWS: u32 = 1 << MAX_SEARCH_STEPS;

/// Outcome of a user-stack walk, kept per sample in
/// [`crate::profiler::SampleKey::user_unwind`].
pub mod status {
    /// The kernel walked the stack by frame pointers (no tables were loaded
    /// for the process yet, or it is excluded from table unwinding).
    pub const KERNEL_FRAME_POINTERS: u32 = 0;
    /// Reached the outermost frame (undefined return address, or a zero
    /// frame pointer / return address).
    pub const COMPLETE: u32 = 1;
    /// Stopped at the frame limit.
    pub const TRUNCATED: u32 = 2;
    /// An instruction pointer in no known mapping of the process.
    pub const NO_MAPPING: u32 = 3;
    /// An address no unwind row covers.
    pub const NO_UNWIND_INFO: u32 = 4;
    /// A rule the unwinder cannot follow.
    pub const UNSUPPORTED_RULE: u32 = 5;
    /// Stack memory could not be read (not resident, or a bad address).
    pub const READ_FAILED: u32 = 6;
    /// An RBP-based rule after RBP was lost.
    pub const RBP_UNKNOWN: u32 = 7;
    /// The stack pointer did not grow toward the caller (a corrupt or
    /// misread frame), so the walk stopped.
    pub const NOT_ADVANCING: u32 = 8;
    /// The sample has no user stack (a kernel thread).
    pub const NO_USER_STACK: u32 = 9;

    /// Number of statuses.
    pub const COUNT: u32 = 10;

    /// Stable names (metric label values).
    pub const fn name(status: u32) -> &'static str {
        match status {
            KERNEL_FRAME_POINTERS => "kernel_frame_pointers",
            COMPLETE => "complete",
            TRUNCATED => "truncated",
            NO_MAPPING => "no_mapping",
            NO_UNWIND_INFO => "no_unwind_info",
            UNSUPPORTED_RULE => "unsupported_rule",
            READ_FAILED => "read_failed",
            RBP_UNKNOWN => "rbp_unknown",
            NOT_ADVANCING => "not_advancing",
            NO_USER_STACK => "no_user_stack",
            _ => "unknown",
        }
    }
}

/// Offsets used for signal frames on x86-64: RSP at `__restore_rt` points at
/// the `ucontext_t`; its `uc_mcontext` (a `struct sigcontext`) starts 40
/// bytes in.
pub mod signal_frame {
    pub const RBP: u64 = 40 + 80;
    pub const RSP: u64 = 40 + 120;
    pub const RIP: u64 = 40 + 128;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_pack_into_one_byte() {
        let row = UnwindRow::new(0x1234, cfa::RBP, 16, rbp::AT_CFA, -2);
        assert_eq!(row.cfa_rule(), cfa::RBP);
        assert_eq!(row.rbp_rule(), rbp::AT_CFA);
        assert!(row.same_rule(&UnwindRow::new(0x9999, cfa::RBP, 16, rbp::AT_CFA, -2)));
        assert!(!row.same_rule(&UnwindRow::new(0x1234, cfa::RSP, 16, rbp::AT_CFA, -2)));
    }
}
