//! Request and response paired in the kernel: one [`SpanRecord`] per
//! exchange instead of a data event per read and write, on the
//! socket-tracepoint path (`HTTP_PAIR`).
//!
//! An exchange is paired when its request comes whole in one call with no
//! body (no `Content-Length` but 0, no `Transfer-Encoding`) and nothing
//! after it, and its response's head comes whole in its first call, framed
//! by `Content-Length`, `chunked`, the request (`HEAD`), the status (204,
//! 304) or the connection's close. The kernel then follows the response's
//! body to its end and sends the record.
//!
//! Anything else on a connection (a request with a body, a head in pieces
//! or past the capture, a pipelined request, an interim or unframed
//! response, bytes where none were expected) makes it *streamed* from
//! there on: its data events go to user space, which parses them as before
//! (a paired request already read goes first, as a
//! [`span_flags::PENDING`] record, for its response to find). A connection
//! never goes back from streamed, so user space's parser never sees a gap.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use fathom_common::http::{
    CAPTURE_HEAD, CAPTURE_TAIL, ConnInfo, HttpCounter, SPAN_AGENT, SPAN_HOST, SPAN_LINE,
    SpanRecord, ctx_flags, data_flags, direction, event_kind, role, span_flags, syscall,
};

use crate::{
    capture::{Scratch, message_start, scan_head, scan_response_head},
    maps::{HTTP_EVENTS, RING_FLAGS, count},
    mem::{copy_words, load, word_at},
};

/// No exchange under way.
const IDLE: u8 = 0;
/// A paired request is in; its response has not started.
const AWAIT: u8 = 1;
/// The paired response is being written (server) or read (client).
const BODY: u8 = 2;
/// Streamed: every event of the connection goes to user space.
const STREAMED: u8 = 3;

/// How the response's body ends.
const BY_LENGTH: u8 = 0;
const BY_CHUNKS: u8 = 1;
const BY_CLOSE: u8 = 2;

/// `PAIRS` value: the exchange under way on a connection.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Pair {
    rec: SpanRecord,
    mode: u8,
    framing: u8,
    _pad: [u8; 6],
    /// Response body bytes still to come (`BY_LENGTH`).
    body_left: u64,
}

// The record's text fields are 8-aligned in a `Pair` (map memory): `mem`'s
// word copies and loads rely on it.
const _: () = assert!(
    core::mem::align_of::<Pair>() >= 8
        && core::mem::offset_of!(Pair, rec) == 0
        && core::mem::offset_of!(SpanRecord, line) % 8 == 0
        && core::mem::offset_of!(SpanRecord, host) % 8 == 0
        && core::mem::offset_of!(SpanRecord, agent) % 8 == 0
        && SPAN_LINE % 8 == 0
        && SPAN_HOST % 8 == 0
        && SPAN_AGENT % 8 == 0
);

/// Connection id -> its exchange under way.
#[map]
static PAIRS: LruHashMap<u64, Pair> = LruHashMap::with_max_entries(65536, 0);
/// Never written: an all-zero (`IDLE`) `Pair` to insert from (too large
/// for the stack beside the capture's frames).
#[map]
static PAIR_ZERO: PerCpuArray<Pair> = PerCpuArray::with_max_entries(1, 0);

/// Whether the event in `scratch` was taken into a paired exchange (and is
/// not to be sent as a data event).
#[inline(always)]
pub(crate) fn consume(scratch: &mut Scratch, info: &ConnInfo) -> bool {
    let conn_id = info.conn_id;
    let server = info.role == role::SERVER;
    if !server && info.role != role::CLIENT {
        return false;
    }
    let request_side = server == (scratch.event.direction == direction::READ);
    let (request, response) = message_start(&scratch.event);
    let pair = match PAIRS.get_ptr_mut(&conn_id) {
        Some(p) => p,
        None => {
            let Some(zero) = PAIR_ZERO.get_ptr(0) else {
                return false;
            };
            // SAFETY: a valid map value, never written.
            if PAIRS.insert(&conn_id, unsafe { &*zero }, 0).is_err() {
                return false;
            }
            match PAIRS.get_ptr_mut(&conn_id) {
                Some(p) => p,
                None => return false,
            }
        }
    };
    // SAFETY: a valid map value.
    let pair = unsafe { &mut *pair };
    if pair.mode == STREAMED {
        return false;
    }
    if request_side {
        if request {
            if pair.mode == AWAIT {
                // A second request before the first one's response.
                return stream(pair, true);
            }
            if pair.mode == BODY {
                // The last response ended without a framing we could follow
                // to its end (its close-delimited or chunked end unseen).
                emit(pair);
            }
            if open_request(scratch, info, pair) {
                return true;
            }
            return stream(pair, false);
        }
        // Request bytes where none were expected (a body, a request's first
        // bytes alone): the response so far, if any, is done.
        if pair.mode == BODY {
            emit(pair);
            return stream(pair, false);
        }
        return stream(pair, pair.mode == AWAIT);
    }
    match pair.mode {
        AWAIT => {
            if response && open_response(scratch, pair) {
                return true;
            }
            stream(pair, true)
        }
        BODY => {
            continue_response(scratch, pair);
            true
        }
        _ => stream(pair, false),
    }
}

/// The connection goes streamed; with `pending`, its paired request goes
/// to user space first for the response to find.
#[inline(always)]
fn stream(pair: &mut Pair, pending: bool) -> bool {
    if pending {
        pair.rec.flags |= span_flags::PENDING;
        pair.rec.status = 0;
        send(&pair.rec);
    }
    pair.mode = STREAMED;
    count(HttpCounter::PairStreamed);
    false
}

/// A paired exchange is complete.
#[inline(always)]
fn emit(pair: &mut Pair) {
    send(&pair.rec);
    count(HttpCounter::SpansPaired);
    pair.mode = IDLE;
}

#[inline(always)]
fn send(rec: &SpanRecord) {
    if HTTP_EVENTS.output::<SpanRecord>(rec, RING_FLAGS).is_err() {
        count(HttpCounter::EventsLost);
    }
}

/// A request head in `scratch` (its own bytes start it): paired when it is
/// whole, bodiless and alone in the call.
#[inline(always)]
fn open_request(scratch: &mut Scratch, info: &ConnInfo, pair: &mut Pair) -> bool {
    let ev = &scratch.event;
    let flags = ev.ctx.flags;
    // Ids the kernel chose (server) or injected (client): user space would
    // otherwise choose or infer them.
    if info.role == role::SERVER {
        if flags & ctx_flags::SERVER == 0 {
            return false;
        }
    } else if flags & ctx_flags::CLIENT_INJECTED == 0 {
        return false;
    }
    if ev.len > CAPTURE_HEAD as u64 || u64::from(ev.head_len) != ev.len {
        return false;
    }
    if info.role != role::SERVER {
        // The server's read was scanned when its request was opened.
        scan_head(scratch);
    }
    let end = read_u32(&scratch.head_end);
    if end == u32::MAX || u64::from(end) + 2 != scratch.event.len {
        return false;
    }
    if read_u32(&scratch.transfer_encoding) != u32::MAX {
        return false;
    }
    let cl = read_u32(&scratch.content_length);
    if cl != u32::MAX && decimal(scratch, cl as usize + 15) != Some(0) {
        return false;
    }
    // The request line with its `\r` fits the record.
    let line_end = read_u32(&scratch.line_end);
    if line_end == u32::MAX || line_end as usize > SPAN_LINE + 1 {
        return false;
    }
    let ev = &scratch.event;
    let rec = &mut pair.rec;
    rec.kind = event_kind::SPAN;
    rec.role = info.role;
    rec.flags = 0;
    rec.status = 0;
    rec.tgid = ev.tgid;
    rec.tid = ev.tid;
    rec.conn_id = ev.conn_id;
    rec.start_ns = ev.end_ns;
    rec.end_ns = ev.end_ns;
    rec.response_body = 0;
    rec.retrans_first = ev.total_retrans;
    rec.retrans_last = ev.total_retrans;
    rec.srtt_us = ev.srtt_us;
    if ev.flags & data_flags::TCP != 0 {
        rec.flags |= span_flags::TCP;
    }
    if ev.head[0] == b'H' && ev.head[1] == b'E' {
        rec.flags |= span_flags::HEAD;
    }
    crate::mem::copy_ctx(rec, ev);
    // SAFETY: SPAN_LINE + 8 bytes from the head's start are inside the
    // event; both 8-aligned.
    unsafe { copy_words::<SPAN_LINE>(rec.line.as_mut_ptr(), ev.head.as_ptr(), 0) };
    rec.host[0] = 0;
    rec.agent[0] = 0;
    let host = read_u32(&scratch.host);
    if host != u32::MAX {
        let from = value_start(scratch, host as usize + 5);
        // SAFETY: from < CAPTURE_HEAD and the overflow area follows head;
        // both 8-aligned.
        unsafe {
            copy_words::<SPAN_HOST>(
                pair.rec.host.as_mut_ptr(),
                scratch.event.head.as_ptr(),
                from,
            )
        };
    }
    let agent = read_u32(&scratch.agent);
    if agent != u32::MAX {
        let from = value_start(scratch, agent as usize + 11);
        // SAFETY: as above.
        unsafe {
            copy_words::<SPAN_AGENT>(
                pair.rec.agent.as_mut_ptr(),
                scratch.event.head.as_ptr(),
                from,
            )
        };
    }
    // A value that does not end within its room is not cut: the exchange
    // goes to user space whole.
    if (host != u32::MAX && !has_cr(&pair.rec.host))
        || (agent != u32::MAX && !has_cr(&pair.rec.agent))
    {
        return false;
    }
    pair.mode = AWAIT;
    true
}

/// Whether `bytes` hold a `\r` (a word at a time).
#[inline(always)]
fn has_cr<const N: usize>(bytes: &[u8; N]) -> bool {
    const CRS: u64 = 0x0d0d_0d0d_0d0d_0d0d;
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while i + 8 <= N {
        // SAFETY: i + 8 <= N; `bytes` is a record's `host` or `agent`,
        // 8-aligned (asserted at `Pair`).
        let w = unsafe { load(bytes.as_ptr().add(i)) };
        let x = w ^ CRS;
        if x.wrapping_sub(LOW) & !x & HIGH != 0 {
            return true;
        }
        i += 8;
    }
    false
}

/// The response's first call: paired when its head is whole in it and its
/// framing is one we follow.
#[inline(always)]
fn open_response(scratch: &mut Scratch, pair: &mut Pair) -> bool {
    let ev = &scratch.event;
    if ev.head_len < 12 {
        return false;
    }
    let (h, t, u) = (ev.head[9], ev.head[10], ev.head[11]);
    if !h.is_ascii_digit() || !t.is_ascii_digit() || !u.is_ascii_digit() {
        return false;
    }
    let status = u16::from(h - b'0') * 100 + u16::from(t - b'0') * 10 + u16::from(u - b'0');
    if status < 200 {
        // Interim (100, 103) and 101: user space follows them.
        return false;
    }
    scan_response_head(scratch);
    let end = read_u32(&scratch.head_end);
    if end == u32::MAX {
        return false;
    }
    let head_bytes = u64::from(end) + 2;
    let ev = &scratch.event;
    if head_bytes > ev.len {
        return false;
    }
    let after = ev.len - head_bytes;
    let te = read_u32(&scratch.transfer_encoding);
    let cl = read_u32(&scratch.content_length);
    let no_body = pair.rec.flags & span_flags::HEAD != 0 || status == 204 || status == 304;
    if no_body {
        pair.framing = BY_LENGTH;
        pair.body_left = 0;
    } else if te != u32::MAX {
        if !is_chunked(scratch, te as usize + 18) {
            return false;
        }
        pair.framing = BY_CHUNKS;
        pair.body_left = 0;
    } else if cl != u32::MAX {
        let Some(n) = decimal(scratch, cl as usize + 15) else {
            return false;
        };
        pair.framing = BY_LENGTH;
        pair.body_left = n;
    } else {
        pair.framing = BY_CLOSE;
        pair.body_left = 0;
    }
    pair.rec.status = status;
    pair.rec.response_body = after;
    mark(pair, scratch);
    pair.mode = BODY;
    let done = match pair.framing {
        BY_LENGTH => {
            if after >= pair.body_left {
                true
            } else {
                pair.body_left -= after;
                false
            }
        }
        BY_CHUNKS => after >= 5 && chunks_end(scratch),
        _ => false,
    };
    if done {
        emit(pair);
    }
    true
}

/// A later call of the paired response.
#[inline(always)]
fn continue_response(scratch: &mut Scratch, pair: &mut Pair) {
    let moved = scratch.event.len;
    pair.rec.response_body += moved;
    mark(pair, scratch);
    let done = match pair.framing {
        BY_LENGTH => {
            if moved >= pair.body_left {
                true
            } else {
                pair.body_left -= moved;
                false
            }
        }
        BY_CHUNKS => chunks_end(scratch),
        _ => false,
    };
    if done {
        emit(pair);
    }
}

/// The response's latest call: its end and TCP state.
#[inline(always)]
fn mark(pair: &mut Pair, scratch: &Scratch) {
    let ev = &scratch.event;
    pair.rec.end_ns = ev.end_ns;
    if ev.flags & data_flags::TCP != 0 {
        pair.rec.srtt_us = ev.srtt_us;
        pair.rec.retrans_last = ev.total_retrans;
    }
}

/// The connection `conn_id` closed (or its fd names another socket now): a
/// response delimited by the close, or whose end was not seen, ends at its
/// last call; a request without a response is given up.
#[inline(always)]
pub(crate) fn close(conn_id: u64) {
    if let Some(pair) = PAIRS.get_ptr_mut(&conn_id) {
        // SAFETY: a valid map value.
        let pair = unsafe { &mut *pair };
        if pair.mode == BODY {
            emit(pair);
        } else if pair.mode == AWAIT {
            count(HttpCounter::PairAborted);
        }
        let _ = PAIRS.remove(&conn_id);
    }
}

/// A u32 field the scan's callback wrote.
#[inline(always)]
fn read_u32(field: &u32) -> u32 {
    // SAFETY: a plain load of a valid field.
    unsafe { core::ptr::read_volatile(field) }
}

/// Where a header value starts: after at most two spaces from `pos`.
#[inline(always)]
fn value_start(scratch: &Scratch, pos: usize) -> usize {
    let head = &scratch.event.head;
    let mut at = pos & (CAPTURE_HEAD - 1);
    if head[at] == b' ' || head[at] == b'\t' {
        at = (at + 1) & (CAPTURE_HEAD - 1);
        if head[at] == b' ' || head[at] == b'\t' {
            at = (at + 1) & (CAPTURE_HEAD - 1);
        }
    }
    at
}

/// A decimal header value at `pos` (after optional spaces) ending at its
/// line's `\r` (or trailing spaces): at most 15 digits.
#[inline(always)]
fn decimal(scratch: &Scratch, pos: usize) -> Option<u64> {
    let from = value_start(scratch, pos);
    let head = &scratch.event.head;
    let mut value: u64 = 0;
    let mut digits = 0;
    let mut i = 0;
    while i < 16 {
        let c = head[(from + i) & (CAPTURE_HEAD - 1)];
        if c.is_ascii_digit() {
            value = value * 10 + u64::from(c - b'0');
            digits += 1;
        } else if c == b'\r' || c == b' ' || c == b'\t' {
            break;
        } else {
            return None;
        }
        i += 1;
    }
    if digits == 0 || i == 16 {
        return None;
    }
    Some(value)
}

/// A `Transfer-Encoding` value at `pos` that is `chunked` alone.
#[inline(always)]
fn is_chunked(scratch: &Scratch, pos: usize) -> bool {
    let from = value_start(scratch, pos);
    // SAFETY: from < CAPTURE_HEAD; the overflow area follows head.
    let word = unsafe { word_at(scratch.event.head.as_ptr(), from) };
    const CHUNKED: u64 = u64::from_le_bytes(*b"chunked\r");
    (word | 0x0020_2020_2020_2020) == CHUNKED
}

/// The call ends a chunked body: its last bytes are the last chunk
/// (`0\r\n\r\n`) after a chunk's end (`\r\n`), or the call is the last chunk
/// alone.
#[inline(always)]
fn chunks_end(scratch: &Scratch) -> bool {
    const LAST: u64 = 0x0a0d_0a0d_300a_0d00;
    const LAST_MASK: u64 = 0xffff_ffff_ffff_ff00;
    const ALONE: u64 = 0x0a_0d0a_0d30;
    let ev = &scratch.event;
    if ev.syscall == syscall::SENDFILE {
        return false;
    }
    let len = ev.len;
    let word: u64 = if len > CAPTURE_HEAD as u64 {
        if ev.tail_len as usize != CAPTURE_TAIL {
            return false;
        }
        // SAFETY: the tail has CAPTURE_TAIL (16) bytes.
        unsafe { load(ev.tail.as_ptr().add(8)) }
    } else if len >= 8 {
        if u64::from(ev.head_len) != len {
            return false;
        }
        let at = (len as usize - 8) & (CAPTURE_HEAD - 1);
        // SAFETY: at < CAPTURE_HEAD; the overflow area follows head.
        unsafe { word_at(ev.head.as_ptr(), at) }
    } else if len == 5 && ev.head_len == 5 {
        // SAFETY: the head has CAPTURE_HEAD bytes.
        let w = unsafe { load(ev.head.as_ptr()) };
        return w & 0xff_ffff_ffff == ALONE;
    } else {
        return false;
    };
    word & LAST_MASK == LAST
}
