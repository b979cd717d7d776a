//! Fathom's CPU profiler programs (the `fathom` object): the sampling chain
//! (`sample`: `profile_cpu` → `profile_unwind` → `profile_python` → `profile_record`, joined by
//! tail calls), the table unwinder it uses (`unwind`), and the scheduler
//! tracepoints that keep process discovery right; their maps in `maps`.
//! Each program is a thin entry point calling a `try_*` function. The
//! contract is `fathom_common::profiler` and `fathom_common::unwind`.
#![no_std]
#![no_main]

mod maps;
mod offcpu;
mod python;
mod sample;
mod unwind;

fathom_ebpf::object!();
