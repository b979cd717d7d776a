//! User-space half of the eBPF DWARF unwinder: turning an executable's
//! call-frame information into the sorted rows the BPF program
//! binary-searches (`table`), and keeping built tables for reuse (`cache`).
//! The row format is the contract in `fathom_common::unwind`.

mod cache;
mod table;

pub use cache::{CacheStats, TableCache, file_name as cache_file_name};
pub use table::{BuildStats, MAX_RAW_ROWS, Source, TableError, UnwindTable, build};

#[cfg(test)]
mod tests;
