//! Memory access LLVM's BPF backend would otherwise make slow: it splits a
//! load it cannot prove aligned into single bytes (8 loads and 14 shifts
//! and ors for a `u64`), and turns small zeroings and copies into calls of
//! `memset`/`memmove`, byte loops of about four instructions a byte. Both
//! ran on every send and receive. Here: aligned word loads, unaligned
//! words joined from the aligned words around them, word copies and word
//! zeroing, each relying on alignment asserted at compile time.

use core::mem::{align_of, offset_of, size_of};

use fathom_common::http::{DataEvent, SpanRecord, TraceContext};

/// Zeroes `*v` eight bytes at a time.
#[inline(always)]
pub(crate) fn zero_words<T>(v: &mut T) {
    const {
        assert!(align_of::<T>() >= 8 && size_of::<T>() % 8 == 0);
    }
    let p = (v as *mut T).cast::<u64>();
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        // SAFETY: inside `*v`, which is 8-aligned (asserted above).
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
}

/// `event.ctx = TraceContext::default()`, five word stores.
#[inline(always)]
pub(crate) fn clear_ctx(event: &mut DataEvent) {
    const {
        assert!(align_of::<DataEvent>() >= 8);
        assert!(offset_of!(DataEvent, ctx) % 8 == 0);
        assert!(size_of::<TraceContext>() == 40);
    }
    let p = (&mut event.ctx as *mut TraceContext).cast::<u64>();
    let mut i = 0;
    while i < 5 {
        // SAFETY: inside `event.ctx`, 8-aligned (asserted above).
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
}

/// `rec.ctx = ev.ctx`, five word copies (the compiler's is a call of a
/// byte loop: `TraceContext` is only 1-aligned as a type).
#[inline(always)]
pub(crate) fn copy_ctx(rec: &mut SpanRecord, ev: &DataEvent) {
    const {
        assert!(align_of::<DataEvent>() >= 8 && align_of::<SpanRecord>() >= 8);
        assert!(offset_of!(DataEvent, ctx) % 8 == 0);
        assert!(offset_of!(SpanRecord, ctx) % 8 == 0);
        assert!(size_of::<TraceContext>() == 40);
    }
    let dst = (&mut rec.ctx as *mut TraceContext).cast::<u64>();
    let src = (&ev.ctx as *const TraceContext).cast::<u64>();
    let mut i = 0;
    while i < 5 {
        // SAFETY: inside both contexts, 8-aligned (asserted above).
        unsafe { dst.add(i).write_volatile(src.add(i).read()) };
        i += 1;
    }
}

/// Stores `value` into `field` as one store: the compiler merged adjacent
/// plain stores of zero into a `memset` call.
#[inline(always)]
pub(crate) fn set<T>(field: &mut T, value: T) {
    // SAFETY: a store to a valid, aligned field.
    unsafe { core::ptr::write_volatile(field, value) };
}

/// The 8-aligned word at `p`. LLVM's BPF backend splits a load it cannot
/// prove aligned into single bytes (8 loads, 14 shifts and ors); this one
/// it emits as one instruction.
///
/// # Safety
/// `p` is 8-aligned and 8 bytes from it are readable.
#[inline(always)]
pub(crate) unsafe fn load(p: *const u8) -> u64 {
    // SAFETY: the caller's.
    unsafe { p.cast::<u64>().read() }
}

/// The 8 bytes at `base + off`, little-endian, from the two aligned words
/// around them (5 instructions instead of 22 for an unaligned load).
///
/// # Safety
/// `base` is 8-aligned and the 16 bytes from `base + (off & !7)` are
/// readable.
#[inline(always)]
pub(crate) unsafe fn word_at(base: *const u8, off: usize) -> u64 {
    let k = off & !7;
    let s = ((off & 7) * 8) as u32;
    // SAFETY: the caller's.
    let (lo, hi) = unsafe { (load(base.add(k)), load(base.add(k + 8))) };
    join(lo, hi, s)
}

/// The 8 bytes `s / 8` bytes into the aligned words `lo`, `hi`
/// (`s` = 0, 8, ..., 56).
#[inline(always)]
pub(crate) fn join(lo: u64, hi: u64, s: u32) -> u64 {
    // `hi << (64 - s)` without a shift by 64 when `s` is 0.
    (lo >> s) | ((hi << (63 - s)) << 1)
}

/// Copies `N` bytes (a multiple of 8) from `src + off` to `dst`, a word at
/// a time (the compiler's copy of unaligned bytes is a call of a byte loop).
///
/// # Safety
/// `dst` and `src` are 8-aligned, `N` bytes from `dst` are writable and
/// `N + 8` bytes from `src + (off & !7)` are readable.
#[inline(always)]
pub(crate) unsafe fn copy_words<const N: usize>(dst: *mut u8, src: *const u8, off: usize) {
    const {
        assert!(N % 8 == 0);
    }
    let mut i = 0;
    while i < N {
        // SAFETY: the caller's.
        unsafe {
            dst.add(i)
                .cast::<u64>()
                .write_volatile(word_at(src, off + i));
        }
        i += 8;
    }
}
