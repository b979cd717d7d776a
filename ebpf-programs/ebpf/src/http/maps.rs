//! Maps and globals shared by the capture and inject programs.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use fathom_common::http::{ConnInfo, ConnKey, GoPending, HttpCounter, Serving, TraceContext};

/// Non-zero: only processes in `MONITORED` are traced. Set by the loader.
#[unsafe(no_mangle)]
static HTTP_FILTER_PIDS: u8 = 0;
/// Non-zero: insert `traceparent` into outgoing requests. Set by the loader.
#[unsafe(no_mangle)]
static HTTP_INJECT: u8 = 0;
/// Non-zero: pair exchanges in the kernel (`pair`). Set by the loader.
#[unsafe(no_mangle)]
static HTTP_PAIR: u8 = 0;

// Sizes are defaults; the loader may change them.
/// Events to user space (`ConnEvent`, `DataEvent`), written with
/// [`RING_FLAGS`].
#[map]
pub static HTTP_EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);
#[map]
pub static HTTP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HttpCounter::COUNT, 0);
/// Registered sockets of monitored processes.
#[map]
pub static CONNS: HashMap<ConnKey, ConnInfo> = HashMap::with_max_entries(65536, 0);
/// Thread id -> the server request it is serving.
#[map]
pub static SERVING: HashMap<u32, Serving> = HashMap::with_max_entries(16384, 0);
/// Processes to trace when `HTTP_FILTER_PIDS` is set (tgid -> 1).
#[map]
pub static MONITORED: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);
/// Injection switches set by user space (`fathom_common::http::control`).
#[map]
pub static INJECT_CONTROL: Array<u8> =
    Array::with_max_entries(fathom_common::http::control::COUNT, 0);
/// Thread id -> the context `sk_msg` injected into the request the thread
/// is writing; taken by the write's `sys_exit`.
#[map]
pub static INJECTED: HashMap<u32, TraceContext> = HashMap::with_max_entries(16384, 0);

/// Go: goroutine (its `runtime.g` address) -> the context of the server
/// request it serves, or its creator served when it was started.
#[map]
pub static GO_CONTEXT: LruHashMap<u64, TraceContext> = LruHashMap::with_max_entries(65536, 0);
/// Go: `*http.Request` -> its caller goroutine's context, from the client's
/// round trip to the transport's write loop that writes it.
#[map]
pub static GO_REQUESTS: LruHashMap<u64, GoPending> = LruHashMap::with_max_entries(16384, 0);
/// Go: thread id -> the context of the request its goroutine is writing
/// now; taken by `sk_msg`.
#[map]
pub static GO_WRITING: LruHashMap<u32, GoPending> = LruHashMap::with_max_entries(16384, 0);
/// Go: thread id -> the goroutine starting another (`runtime.newproc1`).
#[map]
pub static GO_NEWPROC: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);
/// Go processes (tgid -> 1), marked by user space when it finds their
/// executable is Go and by the `net/http` uprobes when they fire: their
/// threads say nothing of which request a write belongs to.
#[map]
pub static GO_PROCS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(4096, 0);

/// Records are written without waking the reader: it drains the ring on a
/// timer (new connections excepted, see `send_conn`). A wake-up per record (the default) costs an inter-processor
/// interrupt — in a VM an exit to the hypervisor — per request, and a
/// reader woken for a handful of records; measured at about a fifth of all
/// CPU time under load (README, HTTP tracing cost).
pub const RING_FLAGS: u64 = aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64;

/// Adds one to a counter.
#[inline(always)]
pub fn count(c: HttpCounter) {
    if let Some(v) = HTTP_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: a valid per-CPU map value; programs on one CPU do not
        // interleave mid-update for a plain add on a per-CPU slot.
        unsafe { *v += 1 };
    }
}

/// Whether only the processes in `MONITORED` are traced.
#[inline(always)]
pub fn filter_pids() -> bool {
    // SAFETY: a plain read of a loader-set global.
    unsafe { read_volatile(&HTTP_FILTER_PIDS) != 0 }
}

/// Whether the process `tgid` is traced.
#[inline(always)]
pub fn monitored(tgid: u32) -> bool {
    // SAFETY: a plain read of a loader-set global.
    if unsafe { read_volatile(&HTTP_FILTER_PIDS) } == 0 {
        return true;
    }
    // SAFETY: the value is only tested for presence.
    unsafe { MONITORED.get(&tgid) }.is_some()
}

/// Whether exchanges are paired in the kernel.
#[inline(always)]
pub fn pair_enabled() -> bool {
    // SAFETY: a plain read of a loader-set global.
    unsafe { read_volatile(&HTTP_PAIR) != 0 }
}

/// Whether outgoing requests get a `traceparent`.
#[inline(always)]
pub fn inject_enabled() -> bool {
    // SAFETY: a plain read of a loader-set global.
    unsafe { read_volatile(&HTTP_INJECT) != 0 }
}

/// Whether client sockets stay in the sockhash after their first request:
/// set by user space once the stream verdict program that keeps `FIONREAD`
/// right is attached.
#[inline(always)]
pub fn keep_sockets() -> bool {
    INJECT_CONTROL
        .get(fathom_common::http::control::KEEP_ALIVE)
        .is_some_and(|v| *v != 0)
}

/// Whether the agent that owns these programs has stopped (sockets it
/// left in its pinned sockhash pass untouched from then on).
#[inline(always)]
pub fn inject_stopped() -> bool {
    INJECT_CONTROL
        .get(fathom_common::http::control::STOPPED)
        .is_some_and(|v| *v != 0)
}

/// Fills `out` with random bytes, never all zero (invalid W3C ids).
#[inline(always)]
pub fn random_id(out: &mut [u8]) {
    let mut i = 0;
    while i < out.len() {
        // SAFETY: a helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() }.to_le_bytes();
        let mut j = 0;
        while j < 4 && i < out.len() {
            out[i] = r[j];
            i += 1;
            j += 1;
        }
    }
    if out.iter().all(|b| *b == 0) {
        out[0] = 1;
    }
}

/// Whether bytes whose first eight are `word` (little-endian; `len` of them
/// valid) start an HTTP/1.x request, and whether they start a response:
/// `fathom_common::http::is_request_start` and `is_response_start` on one
/// word, with no `memcmp` loop for the verifier to walk.
#[inline(always)]
pub fn starts_message(word: u64, len: u32) -> (bool, bool) {
    let starts = |(text, n): (u64, u32)| len >= n && word & mask(n) == text;
    let request = starts(word_of(b"GET "))
        || starts(word_of(b"POST "))
        || starts(word_of(b"PUT "))
        || starts(word_of(b"PATCH "))
        || starts(word_of(b"DELETE "))
        || starts(word_of(b"HEAD "))
        || starts(word_of(b"OPTIONS "))
        || starts(word_of(b"CONNECT "))
        || starts(word_of(b"TRACE "));
    (request, !request && starts(word_of(b"HTTP/1.")))
}

/// Whether `len` (< 8) bytes, the low ones of `word`, may be the beginning
/// of a request line (`G`, `PO`, `DELET`): a read cut that short.
#[inline(always)]
pub fn may_begin_request(word: u64, len: u32) -> bool {
    let begins = |(text, n): (u64, u32)| len < n && (word ^ text) & mask(len) == 0;
    len > 0
        && (begins(word_of(b"GET "))
            || begins(word_of(b"POST "))
            || begins(word_of(b"PUT "))
            || begins(word_of(b"PATCH "))
            || begins(word_of(b"DELETE "))
            || begins(word_of(b"HEAD "))
            || begins(word_of(b"OPTIONS "))
            || begins(word_of(b"CONNECT "))
            || begins(word_of(b"TRACE ")))
}

/// Up to 8 bytes as a little-endian word, and their number.
const fn word_of(text: &[u8]) -> (u64, u32) {
    let mut word = 0u64;
    let mut i = 0;
    while i < text.len() {
        word |= (text[i] as u64) << (8 * i);
        i += 1;
    }
    (word, text.len() as u32)
}

/// The low `n` bytes of a word.
#[inline(always)]
pub(crate) const fn mask(n: u32) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    }
}
