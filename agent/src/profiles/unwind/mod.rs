//! User-space half of the eBPF DWARF unwinder: turning an executable's
//! call-frame information into the sorted rows the BPF program
//! binary-searches (`table`), keeping built tables for reuse (`cache`),
//! loading them into the kernel's maps per process (`loader`), and counting
//! how stacks were walked (`stats`).
//! The row format is the contract in `fathom_common::unwind`.

mod cache;
mod elf_read;
pub mod loader;
pub mod stats;
mod table;

pub use cache::{CacheStats, TableCache, file_name as cache_file_name};
pub use elf_read::read_for_unwind;
pub use table::{BuildStats, MAX_RAW_ROWS, Source, TableError, UnwindTable, build};

#[cfg(test)]
mod tests;
