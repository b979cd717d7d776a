//! CPython frames: what user space tells the kernel about a Python process
//! ([`PyProcess`], in `PYTHON_PROCS` under its pid) and how the kernel
//! hands the interpreter's frames back.
//!
//! The `profile_python` stage finds the sampled thread's `PyThreadState`
//! (3.11+: the one in the main interpreter's thread list whose
//! `native_thread_id` is the thread id; 3.9/3.10: the GIL holder,
//! `_PyRuntime.gilstate.tstate_current`), then follows its frame chain,
//! innermost first, storing each frame's code object address as one entry
//! of a stack (seed [`HASH_SEED_PYTHON`]) in the sample's set. An entry with
//! [`ENTRY_BIT`] set is the outermost Python frame run by one call of the
//! native `_PyEval_EvalFrameDefault`: user space replaces each such native
//! frame by the Python frames up to and including the next entry-marked one.

use crate::assert_size;

/// Offsets and markers meaning "none".
pub const NONE: u32 = u32::MAX;
/// Set on a frame that is the outermost of its `_PyEval_EvalFrameDefault` call.
pub const ENTRY_BIT: u64 = 1 << 63;
/// Seed of Python stack hashes (see `crate::profiler::stack_hash`).
pub const HASH_SEED_PYTHON: u64 = 0x2325_8422_9ce4_cbf2;
/// Threads of the interpreter's list looked at for the sampled one.
pub const MAX_THREADS: u32 = 64;

/// How the end of a `_PyEval_EvalFrameDefault` call shows in the frame chain.
pub mod entry {
    /// 3.9/3.10: every `PyFrameObject` is its own call.
    pub const EVERY_FRAME: u32 = 0;
    /// 3.11: `_PyInterpreterFrame.is_entry` (a byte at `entry_offset`).
    pub const IS_ENTRY_FLAG: u32 = 1;
    /// 3.12/3.13: a shim frame whose `owner` byte (at `entry_offset`) is
    /// `FRAME_OWNED_BY_CSTACK` follows the outermost frame of each call.
    pub const CSTACK_OWNER: u32 = 2;
    /// `FRAME_OWNED_BY_CSTACK`.
    pub const OWNED_BY_CSTACK: u8 = 3;
}

/// A Python process: where its runtime is and the offsets of its version.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PyProcess {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// `_PyRuntimeState.interpreters.head`.
    pub interpreters_head: u32,
    /// `_PyRuntimeState.gilstate.tstate_current`: used when
    /// `tstate_native_thread_id` is [`NONE`].
    pub tstate_current: u32,
    /// `PyInterpreterState.threads.head` (`tstate_head` before 3.11).
    pub threads_head: u32,
    pub tstate_next: u32,
    /// `PyThreadState.native_thread_id` (3.11+), or [`NONE`].
    pub tstate_native_thread_id: u32,
    /// `PyThreadState.frame` (3.9/3.10), `.cframe` (3.11/3.12),
    /// `.current_frame` (3.13).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame` when `tstate_frame` is `cframe`, else [`NONE`].
    pub cframe_current_frame: u32,
    /// `f_code` / `f_executable`.
    pub frame_code: u32,
    /// `previous` / `f_back`.
    pub frame_previous: u32,
    /// An [`entry`] kind.
    pub entry_kind: u32,
    /// The byte it reads, or [`NONE`].
    pub entry_offset: u32,
    /// `major << 8 | minor` (0x030b: 3.11).
    pub version: u32,
}
assert_size!(PyProcess, 8 + 12 * 4);

/// Names in the BPF object.
pub mod names {
    /// The stage walking the Python frames.
    pub const PROGRAM_PYTHON: &str = "profile_python";
    /// Pid -> [`super::PyProcess`].
    pub const PYTHON_PROCS: &str = "PYTHON_PROCS";
}
