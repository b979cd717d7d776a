//! Incremental HTTP/1.x message parsing of one direction of one connection,
//! from what the kernel captured of each syscall: the first bytes (`head`),
//! the last bytes (`tail`, only for long transfers) and the total length.
//!
//! The parser keeps a byte position within each syscall's transfer: bytes it
//! needs (start lines, headers, chunk size lines) must have been captured;
//! bytes it only counts (bodies framed by `Content-Length`, chunk data) need
//! not. What it finds goes to a [`Sink`] in stream order: a complete head
//! ([`Sink::head`]), the end of that message ([`Sink::complete`]), or why the
//! message in progress was given up ([`Sink::error`]).
//!
//! Framing follows RFC 9112: `Transfer-Encoding: chunked` first, then
//! `Content-Length`; requests without either have no body; responses to
//! HEAD, 1xx, 204 and 304 have none; other responses without either end
//! when the connection closes ([`MessageParser::close`]). `101 Switching
//! Protocols` and a 2xx answer to CONNECT end HTTP on the connection.
//!
//! Heuristics, where the capture is incomplete:
//! - **Chunked end without bytes.** When a chunk size line or the CRLF after
//!   chunk data falls in bytes that were not captured, the parser can no
//!   longer follow the chunks; the message then ends with the first syscall
//!   whose captured last bytes are the last chunk `\n0\r\n\r\n` (or that
//!   moved exactly `0\r\n\r\n`). Trailers and a message pipelined after the
//!   end in the same syscall are not seen in that case.
//! - **Head longer than the capture.** When a head continues into bytes that
//!   were not captured, the start line and the headers seen are kept
//!   ([`MessageHead::truncated`]). If the syscall's captured last bytes end
//!   with an empty line, the head is taken to end there; otherwise it ends
//!   somewhere unknown in that syscall, and a `Content-Length` body is taken
//!   to start after the captured bytes (the message may end a little early,
//!   never late).
//! - **Lost events.** A syscall whose first bytes are a complete, valid
//!   request line (of a method the kernel knows) or status line while a
//!   message is still in progress (in a head: at a line start) means events
//!   were lost: the message in progress is given up (a close-delimited
//!   response is completed instead) and parsing restarts there. A body that
//!   itself starts a syscall with such a line is misread this way.
//! - **Out of sync.** After anything inconsistent (a bad start line, a bad
//!   chunk size, a head over [`MAX_HEAD_BYTES`], a message start in bytes
//!   not captured), whole syscalls are skipped until one starts like an HTTP
//!   message ([`is_request_start`] / [`is_response_start`], as the kernel
//!   decides).
//!
//! Memory is bounded: at most [`MAX_HEAD_BYTES`] of a head and a few bytes
//! of chunk framing are kept. Nothing panics on any input.

use fathom_common::http::{is_request_start, is_response_start, parse_traceparent};

/// Longest head (start line and headers) kept; longer messages are given up.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Longest chunk size line (with extensions).
const MAX_CHUNK_LINE: usize = 1024;
/// Longest trailer section.
const MAX_TRAILER_BYTES: usize = 4096;
/// Longest method token.
const MAX_METHOD: usize = 32;
/// Longest request target kept (longer ones are cut at a character
/// boundary): spans stay small whatever clients send.
pub const MAX_TARGET: usize = 2048;
/// Longest `Host` and `User-Agent` values kept.
pub const MAX_HOST: usize = 256;
pub const MAX_USER_AGENT: usize = 512;

/// What one syscall moved, as far as it was captured: `head` holds bytes
/// `0..head.len()`, `tail` holds the last `tail.len()` bytes, `len` is the
/// total.
#[derive(Clone, Copy, Debug)]
pub struct Fragment<'a> {
    head: &'a [u8],
    tail: &'a [u8],
    len: u64,
}

impl<'a> Fragment<'a> {
    /// A fragment; inconsistent parts are cut (a head longer than `len`, a
    /// tail longer than `len`).
    pub fn new(head: &'a [u8], tail: &'a [u8], len: u64) -> Self {
        let head = &head[..head.len().min(usize::try_from(len).unwrap_or(usize::MAX))];
        let keep = tail.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        let tail = &tail[tail.len() - keep..];
        Self { head, tail, len }
    }

    /// Bytes moved.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was moved.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The captured bytes that start at `pos` and follow each other (empty:
    /// the byte at `pos` was not captured).
    fn known_from(&self, pos: u64) -> &'a [u8] {
        if pos < self.head.len() as u64 {
            return &self.head[pos as usize..];
        }
        let tail_start = self.len - self.tail.len() as u64;
        if pos >= tail_start && pos < self.len {
            return &self.tail[(pos - tail_start) as usize..];
        }
        &[]
    }

    /// The captured bytes that end the transfer, if any were.
    fn known_end(&self) -> Option<&'a [u8]> {
        if !self.tail.is_empty() {
            Some(self.tail)
        } else if self.head.len() as u64 == self.len && self.len > 0 {
            Some(self.head)
        } else {
            None
        }
    }
}

/// HTTP/1 minor version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    /// As in `network.protocol.version`.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "1.0",
            Version::Http11 => "1.1",
        }
    }
}

/// The first line of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, target: String },
    Response { status: u16 },
}

/// A parsed message head: the start line and the headers Fathom uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageHead {
    pub start: StartLine,
    pub version: Version,
    /// `Host` (requests).
    pub host: Option<String>,
    /// `User-Agent` (requests).
    pub user_agent: Option<String>,
    /// A valid `traceparent`: (trace id, parent span id, flags).
    pub traceparent: Option<([u8; 16], [u8; 8], u8)>,
    pub content_length: Option<u64>,
    /// `Transfer-Encoding` ends with `chunked`.
    pub chunked: bool,
    /// The head went on past the captured bytes: headers after them are
    /// missing.
    pub truncated: bool,
}

impl MessageHead {
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The status of a response.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { status } => Some(status),
            StartLine::Request { .. } => None,
        }
    }
}

/// What the request a response answers was, as far as framing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Answering {
    /// No request known (or a request head): usual framing.
    #[default]
    Other,
    /// A HEAD request: no body, whatever the headers say.
    Head,
    /// A CONNECT request: a 2xx answer makes the connection a tunnel.
    Connect,
}

/// Why a message (or a whole syscall) was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamError {
    /// Bytes where a message should start are not an HTTP/1.x message.
    Garbage,
    /// A message would start in bytes that were not captured.
    NotCaptured,
    /// The start line went on past the captured bytes.
    StartLineNotCaptured,
    /// The head is longer than [`MAX_HEAD_BYTES`].
    HeadTooLarge,
    /// An invalid start line or header (`Content-Length`, `Transfer-Encoding`).
    BadHead,
    /// An invalid chunk size line, chunk end or trailer section.
    BadChunk,
    /// A new message started while one was in progress (lost events).
    Resync,
    /// The connection closed before the message ended.
    Incomplete,
    /// A syscall skipped while out of sync (not a message).
    Skipped,
}

/// Where parsed messages go.
pub trait Sink<O> {
    /// A complete head. `origin` is that of the syscall in which the
    /// message's first byte was; `first` is whether it is the first message
    /// that started in that syscall. For a final response, returns what the
    /// request it answers was (it decides the framing).
    fn head(&mut self, head: MessageHead, origin: O, first: bool) -> Answering;
    /// A head that began in an earlier syscall (`started`) continues in one
    /// whose origin is `later`: the sink may take from it what the first
    /// lacked (the kernel opens a request at the read where its request
    /// line became whole, which may be the second).
    fn continue_head(&mut self, _started: &mut O, _later: &O) {}
    /// The message whose head was reported last ended, with `body_len`
    /// bytes of body (counted from the framing; chunked bodies without
    /// bytes count what was moved).
    fn complete(&mut self, body_len: u64);
    /// The message in progress (if any) was given up, or a syscall skipped.
    fn error(&mut self, error: StreamError);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk size line.
    Size,
    /// Chunk data still to come.
    Data(u64),
    /// The CRLF after chunk data; `true` once the CR was seen.
    DataEnd(bool),
    /// Trailer section; `true` at the start of a line, `Some` CR seen there.
    Trailer {
        line_start: bool,
        cr: bool,
        bytes: usize,
    },
}

#[derive(Debug)]
enum State<O> {
    /// Between messages: the next byte starts one.
    Idle,
    /// Reading a head.
    Head {
        buf: Vec<u8>,
        origin: O,
        first: bool,
    },
    /// `Content-Length` body.
    Body { remaining: u64, body: u64 },
    /// Chunked body, followed byte by byte.
    Chunked {
        chunk: Chunk,
        line: Vec<u8>,
        body: u64,
    },
    /// Chunked body whose framing was lost: ends with a syscall ending in
    /// the last chunk.
    ChunkedBlind { body: u64 },
    /// Body up to the connection's close.
    UntilClose { body: u64 },
    /// Not HTTP any more (upgrade, CONNECT tunnel).
    Tunnel,
    /// Skipping syscalls until one starts a message.
    Desync,
}

/// Parser of the messages of one direction of one connection. `O` is what
/// the caller wants back about the syscall a message started in.
#[derive(Debug)]
pub struct MessageParser<O> {
    state: State<O>,
}

impl<O> Default for MessageParser<O> {
    fn default() -> Self {
        Self { state: State::Idle }
    }
}

impl<O: Copy> MessageParser<O> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a message is in progress (a head or a body).
    pub fn in_message(&self) -> bool {
        !matches!(self.state, State::Idle | State::Desync | State::Tunnel)
    }

    /// Whether the connection left HTTP (an upgrade or a CONNECT tunnel).
    pub fn is_tunnel(&self) -> bool {
        matches!(self.state, State::Tunnel)
    }

    /// Bytes kept (for memory accounting).
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Head { buf, .. } => buf.capacity(),
            State::Chunked { line, .. } => line.capacity(),
            _ => 0,
        }
    }

    /// Parses one syscall's transfer.
    pub fn feed(&mut self, frag: Fragment<'_>, origin: O, sink: &mut impl Sink<O>) {
        if frag.is_empty() {
            return;
        }
        let start = frag.known_from(0);
        match self.state {
            State::Tunnel => return,
            State::Desync => {
                if is_request_start(start) || is_response_start(start) {
                    self.state = State::Idle;
                } else {
                    sink.error(StreamError::Skipped);
                    return;
                }
            }
            State::Idle => {}
            // Bytes that continue a line of a head never restart.
            State::Head { ref buf, .. } if buf.last() != Some(&b'\n') => {}
            // A body that fits its declared length is body, whatever it
            // looks like (an echo service's body starts like a request).
            State::Body { remaining, .. } if frag.len <= remaining => {}
            _ => {
                if starts_message(start) {
                    if let State::UntilClose { body } = self.state {
                        sink.complete(body);
                    } else {
                        sink.error(StreamError::Resync);
                    }
                    self.state = State::Idle;
                }
            }
        }
        let mut pos = 0u64;
        let mut started = false;
        while pos < frag.len {
            pos = match self.step(frag, pos, origin, &mut started, sink) {
                Some(p) => p,
                None => break,
            };
        }
    }

    /// The connection closed: ends a close-delimited response, gives up
    /// any other message in progress.
    pub fn close(&mut self, sink: &mut impl Sink<O>) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::UntilClose { body } => sink.complete(body),
            State::Idle | State::Desync | State::Tunnel => {}
            _ => sink.error(StreamError::Incomplete),
        }
    }

    /// One step from `pos`; the next position, or `None` when the rest of
    /// the syscall is not parsed.
    fn step(
        &mut self,
        frag: Fragment<'_>,
        pos: u64,
        origin: O,
        started: &mut bool,
        sink: &mut impl Sink<O>,
    ) -> Option<u64> {
        let len = frag.len;
        match &mut self.state {
            State::Tunnel => None,
            State::Desync => None,
            State::Idle => {
                let known = frag.known_from(pos);
                if known.is_empty() {
                    self.state = State::Desync;
                    sink.error(StreamError::NotCaptured);
                    return None;
                }
                // Empty lines between messages are allowed (RFC 9112 2.2).
                let skip = known
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                if skip > 0 {
                    return Some(pos + skip as u64);
                }
                if !plausible_start(known) {
                    self.state = State::Desync;
                    sink.error(StreamError::Garbage);
                    return None;
                }
                let first = !*started;
                *started = true;
                // The whole head in this syscall (the common case): parsed
                // where it lies, not copied into a buffer.
                let take = known.len().min(MAX_HEAD_BYTES + 4);
                if let Some(end) = head_end(&known[..take]) {
                    self.complete_head(&known[..end], origin, first, false, sink);
                    return Some(pos + end as u64);
                }
                self.state = State::Head {
                    buf: Vec::new(),
                    origin,
                    first,
                };
                Some(pos)
            }
            State::Head {
                buf,
                origin: started,
                ..
            } => {
                sink.continue_head(started, &origin);
                let known = frag.known_from(pos);
                if known.is_empty() {
                    return self.truncated_head(frag, sink);
                }
                let before = buf.len();
                // Search from a little before the new bytes: the blank line
                // may straddle syscalls.
                let from = before.saturating_sub(3);
                let room = MAX_HEAD_BYTES + 4 - before;
                let take = known.len().min(room);
                buf.extend_from_slice(&known[..take]);
                match head_end(&buf[from..]) {
                    Some(end) => {
                        let end = from + end;
                        buf.truncate(end);
                        let consumed = end.saturating_sub(before) as u64;
                        self.finish_head(false, sink);
                        Some(pos + consumed)
                    }
                    None if buf.len() > MAX_HEAD_BYTES => {
                        self.state = State::Desync;
                        sink.error(StreamError::HeadTooLarge);
                        None
                    }
                    None => Some(pos + take as u64),
                }
            }
            State::Body { remaining, body } => {
                let n = (*remaining).min(len - pos);
                *remaining -= n;
                *body += n;
                if *remaining == 0 {
                    let body = *body;
                    self.state = State::Idle;
                    sink.complete(body);
                }
                Some(pos + n)
            }
            State::Chunked { .. } => self.chunked(frag, pos, sink),
            State::ChunkedBlind { body } => {
                *body += len - pos;
                if ends_with_last_chunk(frag) {
                    let body = *body;
                    self.state = State::Idle;
                    sink.complete(body);
                }
                None
            }
            State::UntilClose { body } => {
                *body += len - pos;
                None
            }
        }
    }

    /// The head went on into bytes that were not captured.
    fn truncated_head(&mut self, frag: Fragment<'_>, sink: &mut impl Sink<O>) -> Option<u64> {
        let State::Head { buf, .. } = &self.state else {
            return None;
        };
        if first_line(buf).is_none() {
            self.state = State::Desync;
            sink.error(StreamError::StartLineNotCaptured);
            return None;
        }
        let buffered = buf.len() as u64;
        let ends_here = frag
            .known_end()
            .is_some_and(|e| e.ends_with(b"\n\r\n") || e.ends_with(b"\n\n"));
        if !self.finish_head(true, sink) {
            return None;
        }
        if ends_here {
            // The head ended with the syscall; the body (if any) follows.
            return None;
        }
        // The head ends somewhere in this syscall: the rest of it is body.
        match &mut self.state {
            State::Body { remaining, body } => {
                // Body bytes in this syscall: at most what was not captured.
                let here = frag.len.saturating_sub(buffered).min(*remaining);
                *remaining -= here;
                *body += here;
                if *remaining == 0 {
                    let body = *body;
                    self.state = State::Idle;
                    sink.complete(body);
                }
            }
            State::Chunked { .. } => {
                self.state = State::ChunkedBlind { body: 0 };
                if ends_with_last_chunk(frag) {
                    self.state = State::Idle;
                    sink.complete(0);
                }
            }
            State::UntilClose { body } => *body += frag.len.saturating_sub(buffered),
            _ => {}
        }
        // Whatever follows in this syscall is unknown: the next message must
        // start a syscall.
        if matches!(self.state, State::Idle) {
            self.state = State::Desync;
        }
        None
    }

    /// Parses the buffered head and sets the framing of the body. `false`:
    /// the head was invalid (now out of sync).
    fn finish_head(&mut self, truncated: bool, sink: &mut impl Sink<O>) -> bool {
        let State::Head {
            mut buf,
            origin,
            first,
        } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return false;
        };
        if truncated {
            // Only whole lines: a cut name or value would mislead.
            let keep = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            buf.truncate(keep);
        }
        self.complete_head(&buf, origin, first, truncated, sink)
    }

    /// A whole head (`bytes`): the message it starts, and the state after
    /// it. The parser is idle when called.
    fn complete_head(
        &mut self,
        bytes: &[u8],
        origin: O,
        first: bool,
        truncated: bool,
        sink: &mut impl Sink<O>,
    ) -> bool {
        let Some(mut head) = parse_head(bytes) else {
            self.state = State::Desync;
            sink.error(StreamError::BadHead);
            return false;
        };
        head.truncated = truncated;
        let status = head.status();
        let chunked = head.chunked;
        let content_length = head.content_length;
        let answering = sink.head(head, origin, first);
        let state = match status {
            None => {
                if chunked {
                    Some(State::Chunked {
                        chunk: Chunk::Size,
                        line: Vec::new(),
                        body: 0,
                    })
                } else {
                    match content_length {
                        Some(n) if n > 0 => Some(State::Body {
                            remaining: n,
                            body: 0,
                        }),
                        _ => None,
                    }
                }
            }
            Some(101) => Some(State::Tunnel),
            Some(s) if s < 200 || s == 204 || s == 304 || answering == Answering::Head => None,
            Some(s) if answering == Answering::Connect && (200..300).contains(&s) => {
                Some(State::Tunnel)
            }
            Some(_) => {
                if chunked {
                    Some(State::Chunked {
                        chunk: Chunk::Size,
                        line: Vec::new(),
                        body: 0,
                    })
                } else {
                    match content_length {
                        Some(0) => None,
                        Some(n) => Some(State::Body {
                            remaining: n,
                            body: 0,
                        }),
                        None => Some(State::UntilClose { body: 0 }),
                    }
                }
            }
        };
        match state {
            None => {
                self.state = State::Idle;
                sink.complete(0);
            }
            Some(State::Tunnel) => {
                self.state = State::Tunnel;
                sink.complete(0);
            }
            Some(s) => self.state = s,
        }
        true
    }

    /// Follows chunked framing from `pos`.
    fn chunked(
        &mut self,
        frag: Fragment<'_>,
        mut pos: u64,
        sink: &mut impl Sink<O>,
    ) -> Option<u64> {
        let State::Chunked { chunk, line, body } = &mut self.state else {
            return None;
        };
        let len = frag.len;
        while pos < len {
            if let Chunk::Data(remaining) = chunk {
                let n = (*remaining).min(len - pos);
                *remaining -= n;
                *body += n;
                pos += n;
                if *remaining == 0 {
                    *chunk = Chunk::DataEnd(false);
                }
                continue;
            }
            let Some(&c) = frag.known_from(pos).first() else {
                // Framing lost: wait for the last chunk at a syscall's end.
                let b = *body + (len - pos);
                if ends_with_last_chunk(frag) {
                    self.state = State::Idle;
                    sink.complete(b);
                } else {
                    self.state = State::ChunkedBlind { body: b };
                }
                return None;
            };
            pos += 1;
            match chunk {
                Chunk::Size => {
                    if c == b'\n' {
                        *chunk = match parse_chunk_size(line) {
                            Some(0) => Chunk::Trailer {
                                line_start: true,
                                cr: false,
                                bytes: 0,
                            },
                            Some(n) => Chunk::Data(n),
                            None => return self.bad_chunk(sink),
                        };
                        line.clear();
                    } else if line.len() >= MAX_CHUNK_LINE {
                        return self.bad_chunk(sink);
                    } else {
                        line.push(c);
                    }
                }
                Chunk::DataEnd(cr) => match c {
                    b'\r' if !*cr => *cr = true,
                    b'\n' => *chunk = Chunk::Size,
                    _ => return self.bad_chunk(sink),
                },
                Chunk::Trailer {
                    line_start,
                    cr,
                    bytes,
                } => {
                    *bytes += 1;
                    if *bytes > MAX_TRAILER_BYTES {
                        return self.bad_chunk(sink);
                    }
                    if c == b'\n' {
                        if *line_start {
                            let b = *body;
                            self.state = State::Idle;
                            sink.complete(b);
                            return Some(pos);
                        }
                        *line_start = true;
                        *cr = false;
                    } else if c == b'\r' && *line_start && !*cr {
                        *cr = true;
                    } else {
                        *line_start = false;
                        *cr = false;
                    }
                }
                // Handled above.
                Chunk::Data(_) => {}
            }
        }
        Some(pos)
    }

    fn bad_chunk(&mut self, sink: &mut impl Sink<O>) -> Option<u64> {
        self.state = State::Desync;
        sink.error(StreamError::BadChunk);
        None
    }
}

/// Whether the transfer's captured last bytes are the last chunk of a
/// chunked body.
fn ends_with_last_chunk(frag: Fragment<'_>) -> bool {
    let Some(end) = frag.known_end() else {
        return false;
    };
    if !end.ends_with(b"0\r\n\r\n") {
        return false;
    }
    if end.len() >= 6 {
        end[end.len() - 6] == b'\n'
    } else {
        frag.len == 5
    }
}

/// A chunk size line: hex digits, optional whitespace and extensions.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = &line[digits..];
    let rest = trim_ows(rest);
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    let s = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(s, 16).ok()
}

/// Index just past the blank line that ends a head (`\n\r\n` or `\n\n`).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Whether `bytes` start with a complete request line of a known method or
/// a complete status line: a new message for sure.
fn starts_message(bytes: &[u8]) -> bool {
    (is_request_start(bytes) || is_response_start(bytes))
        && first_line(bytes).is_some_and(|l| parse_start_line(l).is_some())
}

/// The first line (without its line end), if complete.
fn first_line(bytes: &[u8]) -> Option<&[u8]> {
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let line = &bytes[..nl];
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Whether `bytes` may be the start of a request or status line (possibly
/// cut short).
fn plausible_start(bytes: &[u8]) -> bool {
    const HTTP: &[u8] = b"HTTP/1.";
    let n = bytes.len().min(HTTP.len());
    if bytes[..n] == HTTP[..n] {
        return true;
    }
    // A method: upper-case token characters, then a space.
    let method = bytes
        .iter()
        .take(MAX_METHOD + 1)
        .take_while(|&&c| c.is_ascii_uppercase() || c == b'-' || c == b'_')
        .count();
    if method == 0 || method > MAX_METHOD {
        return false;
    }
    match bytes.get(method) {
        None => true,
        Some(b' ') => true,
        Some(_) => false,
    }
}

fn parse_version(v: &[u8]) -> Option<Version> {
    match v {
        b"HTTP/1.1" => Some(Version::Http11),
        b"HTTP/1.0" => Some(Version::Http10),
        _ => None,
    }
}

/// A request line or a status line (without its line end).
fn parse_start_line(line: &[u8]) -> Option<(StartLine, Version)> {
    if let Some(rest) = line.strip_prefix(b"HTTP/1.") {
        let version = parse_version(line.get(..8)?)?;
        let rest = rest.get(1..)?.strip_prefix(b" ")?;
        let code = rest.get(..3)?;
        if !code.iter().all(u8::is_ascii_digit) || code[0] == b'0' {
            return None;
        }
        if rest.len() > 3 && rest[3] != b' ' {
            return None;
        }
        let status = u16::from(code[0] - b'0') * 100
            + u16::from(code[1] - b'0') * 10
            + u16::from(code[2] - b'0');
        return Some((StartLine::Response { status }, version));
    }
    let sp = line.iter().position(|&b| b == b' ')?;
    let method = &line[..sp];
    if method.is_empty() || method.len() > MAX_METHOD || !method.iter().all(|&c| is_tchar(c)) {
        return None;
    }
    let rest = &line[sp + 1..];
    let sp2 = rest.iter().rposition(|&b| b == b' ')?;
    let target = &rest[..sp2];
    let version = parse_version(&rest[sp2 + 1..])?;
    if target.is_empty() || !target.iter().all(|&c| c > b' ' && c != 0x7f) {
        return None;
    }
    Some((
        StartLine::Request {
            method: String::from_utf8_lossy(method).into_owned(),
            target: text(target, MAX_TARGET),
        },
        version,
    ))
}

/// A request line (without its line end) as (method, target, version),
/// as the parser reads it: the line of an exchange the kernel paired
/// (`SpanRecord::line`).
pub fn parse_request_line(line: &[u8]) -> Option<(String, String, Version)> {
    match parse_start_line(line)? {
        (StartLine::Request { method, target }, version) => Some((method, target, version)),
        _ => None,
    }
}

/// A `Host` value as the parser keeps it.
pub fn host_value(v: &[u8]) -> String {
    text(trim_ows(v), MAX_HOST)
}

/// A `User-Agent` value as the parser keeps it.
pub fn user_agent_value(v: &[u8]) -> String {
    text(trim_ows(v), MAX_USER_AGENT)
}

/// At most `max` bytes of `v` as text (invalid UTF-8 replaced, cut at a
/// character boundary).
fn text(v: &[u8], max: usize) -> String {
    let mut s = String::from_utf8_lossy(&v[..v.len().min(max)]).into_owned();
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// A whole head (or its captured part): start line and headers. `None`:
/// invalid.
fn parse_head(buf: &[u8]) -> Option<MessageHead> {
    let mut lines = buf
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let (start, version) = parse_start_line(lines.next()?)?;
    let mut head = MessageHead {
        start,
        version,
        host: None,
        user_agent: None,
        traceparent: None,
        content_length: None,
        chunked: false,
        truncated: false,
    };
    let mut transfer_encoding: Option<Vec<u8>> = None;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            // A line cut by the capture (truncated heads) or obs-fold.
            if line[0] == b' ' || line[0] == b'\t' {
                continue;
            }
            return None;
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&c| is_tchar(c)) {
            return None;
        }
        let value = trim_ows(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"host") {
            head.host.get_or_insert_with(|| text(value, MAX_HOST));
        } else if name.eq_ignore_ascii_case(b"user-agent") {
            head.user_agent
                .get_or_insert_with(|| text(value, MAX_USER_AGENT));
        } else if name.eq_ignore_ascii_case(b"traceparent") {
            if head.traceparent.is_none() {
                head.traceparent = parse_traceparent(value);
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            // A list of equal values is allowed (RFC 9110 8.6).
            for v in value.split(|&c| c == b',') {
                let v = trim_ows(v);
                if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                let n: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
                if head.content_length.is_some_and(|c| c != n) {
                    return None;
                }
                head.content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let te = transfer_encoding.get_or_insert_with(Vec::new);
            if !te.is_empty() {
                te.push(b',');
            }
            te.extend_from_slice(value);
        }
    }
    if let Some(te) = transfer_encoding {
        let last = te
            .rsplit(|&c| c == b',')
            .next()
            .map(trim_ows)
            .unwrap_or(b"");
        if last.eq_ignore_ascii_case(b"chunked") {
            head.chunked = true;
        } else if head.is_request() {
            // A request body without a known length (RFC 9112 6.3).
            return None;
        }
        // Transfer-Encoding overrides Content-Length.
        head.content_length = None;
    }
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the parser reports, as text.
    #[derive(Default)]
    struct Rec {
        out: Vec<String>,
        answer: Answering,
    }

    impl Sink<u32> for Rec {
        fn head(&mut self, head: MessageHead, origin: u32, first: bool) -> Answering {
            let what = match &head.start {
                StartLine::Request { method, target } => format!("{method} {target}"),
                StartLine::Response { status } => format!("{status}"),
            };
            let t = if head.truncated { " truncated" } else { "" };
            self.out.push(format!(
                "head {what} @{origin}{}{t}",
                if first { " first" } else { "" }
            ));
            self.answer
        }
        fn complete(&mut self, body_len: u64) {
            self.out.push(format!("end {body_len}"));
        }
        fn error(&mut self, error: StreamError) {
            self.out.push(format!("error {error:?}"));
        }
    }

    /// Feeds whole byte strings (as a kernel with a large capture would).
    fn feed_all(p: &mut MessageParser<u32>, rec: &mut Rec, chunks: &[&[u8]]) {
        for (i, c) in chunks.iter().enumerate() {
            p.feed(Fragment::new(c, &[], c.len() as u64), i as u32, rec);
        }
    }

    /// Feeds bytes as the kernel captures them: first 1024, last 16.
    fn feed_captured(p: &mut MessageParser<u32>, rec: &mut Rec, origin: u32, bytes: &[u8]) {
        let head = &bytes[..bytes.len().min(1024)];
        let tail = if bytes.len() > 1024 {
            &bytes[bytes.len() - 16..]
        } else {
            &[][..]
        };
        p.feed(Fragment::new(head, tail, bytes.len() as u64), origin, rec);
    }

    fn run(chunks: &[&[u8]]) -> Vec<String> {
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_all(&mut p, &mut rec, chunks);
        rec.out
    }

    #[test]
    fn curl_get_and_nginx_response() {
        let req = b"GET /api/items?id=7 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_all(&mut p, &mut rec, &[req]);
        assert_eq!(rec.out, ["head GET /api/items?id=7 @0 first", "end 0"]);
        assert!(!p.in_message());

        let resp = b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\nContent-Type: application/json\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n{\"ok\": true}\n";
        assert_eq!(run(&[resp]), ["head 200 @0 first", "end 13"]);
    }

    #[test]
    fn head_fields() {
        let req = b"POST /v1/x HTTP/1.0\r\nhost:  example.com \r\nUSER-AGENT: Go-http-client/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nContent-Length: 3, 3\r\n\r\n";
        let end = head_end(req).unwrap();
        assert_eq!(end, req.len());
        let h = parse_head(&req[..end]).unwrap();
        assert_eq!(
            h.start,
            StartLine::Request {
                method: "POST".into(),
                target: "/v1/x".into()
            }
        );
        assert_eq!(h.version, Version::Http10);
        assert_eq!(h.host.as_deref(), Some("example.com"));
        assert_eq!(h.user_agent.as_deref(), Some("Go-http-client/1.1"));
        let (t, s, f) = h.traceparent.unwrap();
        assert_eq!(t[0], 0x0a);
        assert_eq!(s[7], 0x31);
        assert_eq!(f, 1);
        assert_eq!(h.content_length, Some(3));
        // Conflicting lengths, bad lengths, unknown request encodings.
        assert!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n").is_none()
        );
        assert!(parse_head(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n").is_none());
        assert!(parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n").is_none());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n").is_some());
        assert!(parse_head(b"GET / HTTP/2.0\r\n").is_none());
        assert!(parse_head(b"GET  HTTP/1.1\r\n").is_none());
        assert!(parse_head(b"HTTP/1.1 20 OK\r\n").is_none());
        assert!(parse_head(b"HTTP/1.1 200\r\n").is_some());
        assert!(parse_head(b"HTTP/1.1 2000 OK\r\n").is_none());
        assert!(parse_head(b"GET / HTTP/1.1\r\nBad Header: x\r\n").is_none());
        // Long values are cut.
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', 3000));
        long.extend_from_slice(b" HTTP/1.1\r\nUser-Agent: \xc3\xa9");
        long.extend(std::iter::repeat_n(b'u', 600));
        let h = parse_head(&long).unwrap();
        let StartLine::Request { target, .. } = &h.start else {
            panic!("{h:?}");
        };
        assert_eq!(target.len(), MAX_TARGET);
        assert!(h.user_agent.as_deref().unwrap().starts_with("\u{e9}uuu"));
        assert_eq!(h.user_agent.unwrap().len(), MAX_USER_AGENT);
        assert_eq!(text(b"a\xc3\xa9", 2), "a");
        assert_eq!(text(b"a\xff", 2), "a");
        // TE overrides CL.
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n",
        )
        .unwrap();
        assert!(h.chunked);
        assert_eq!(h.content_length, None);
    }

    #[test]
    fn keep_alive_and_pipelining() {
        // Three pipelined requests in one read, the last with a body.
        let reads: &[&[u8]] = &[
            b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nPOST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n",
        ];
        assert_eq!(
            run(reads),
            [
                "head GET /a @0 first",
                "end 0",
                "head GET /b @0",
                "end 0",
                "head POST /c @0",
                "end 5",
                "head GET /d @1 first",
                "end 0"
            ]
        );
    }

    #[test]
    fn split_heads() {
        // Split inside the method, inside a header and inside the blank line.
        let reads: &[&[u8]] = &[
            b"PO",
            b"ST /upload HTTP/1.1\r\nHost: h\r\nContent-Le",
            b"ngth: 4\r\n\r",
            b"\nab",
            b"cd",
        ];
        assert_eq!(run(reads), ["head POST /upload @0 first", "end 4"]);
        // Byte by byte.
        let req: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        let bytes: Vec<&[u8]> = req.chunks(1).collect();
        assert_eq!(run(&bytes), ["head GET /x @0 first", "end 0"]);
    }

    #[test]
    fn content_length_body_over_many_events() {
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n"],
        );
        // 4 MiB in 64 KiB writes, only counts.
        for i in 0..64 {
            assert!(p.in_message());
            p.feed(
                Fragment::new(&[b'x'; 1024], &[b'y'; 16], 65536),
                i + 1,
                &mut rec,
            );
        }
        assert_eq!(rec.out, ["head 200 @0 first", "end 4194304"]);
        assert!(!p.in_message());
        // sendfile: no bytes at all.
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"],
        );
        p.feed(Fragment::new(&[], &[], 100000), 9, &mut rec);
        assert_eq!(rec.out, ["head 200 @0 first", "end 100000"]);
    }

    #[test]
    fn head_and_body_in_one_large_write() {
        // Go-style: head and a 3000-byte body in one write; only the first
        // 1024 bytes and the last 16 were captured.
        let mut w = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3000\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n".to_vec();
        w.extend(std::iter::repeat_n(b'z', 3000));
        w.extend_from_slice(b"HTTP/1.1 204 No Content\r\n\r\n");
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_captured(&mut p, &mut rec, 0, &w);
        // The second response's head is not captured: out of sync.
        assert_eq!(
            rec.out,
            ["head 200 @0 first", "end 3000", "error NotCaptured"]
        );
        feed_captured(
            &mut p,
            &mut rec,
            1,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(&rec.out[3..], ["head 200 @1 first", "end 0"]);
    }

    #[test]
    fn chunked_with_bytes() {
        let resp: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nMozilla\r\n11;ext=1\r\nDeveloper Network\r\n0\r\nX-Trailer: 1\r\n\r\nHTTP/1.1 304 Not Modified\r\n\r\n";
        assert_eq!(
            run(&[resp]),
            ["head 200 @0 first", "end 24", "head 304 @0", "end 0"]
        );
        // The same, split at every byte.
        let bytes: Vec<&[u8]> = resp.chunks(1).collect();
        assert_eq!(
            run(&bytes),
            [
                "head 200 @0 first",
                "end 24",
                "head 304 @107 first",
                "end 0"
            ]
        );
        // Bare LF line ends.
        assert_eq!(
            run(&[b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n"]),
            ["head 200 @0 first", "end 3"]
        );
    }

    #[test]
    fn chunked_large_chunks_without_bytes() {
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"],
        );
        // A 5000-byte chunk whose end and the next size line are in the
        // captured tail: followed exactly.
        let mut w = b"1388\r\n".to_vec();
        w.extend(std::iter::repeat_n(b'a', 5000));
        w.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(w.len() - 16, 5006 - 9);
        feed_captured(&mut p, &mut rec, 1, &w);
        assert_eq!(rec.out, ["head 200 @0 first", "end 5000"]);

        // Framing lost in uncaptured bytes (two chunks in one write): the
        // end comes from the tail of a later write.
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"],
        );
        let mut w = b"400\r\n".to_vec();
        w.extend(std::iter::repeat_n(b'a', 1024));
        w.extend_from_slice(b"\r\n400\r\n");
        w.extend(std::iter::repeat_n(b'b', 1024));
        w.extend_from_slice(b"\r\n");
        feed_captured(&mut p, &mut rec, 1, &w);
        assert_eq!(rec.out, ["head 200 @0 first"]);
        let mut w = b"800\r\n".to_vec();
        w.extend(std::iter::repeat_n(b'c', 2048));
        w.extend_from_slice(b"\r\n0\r\n\r\n");
        feed_captured(&mut p, &mut rec, 2, &w);
        // Body: both chunks (1024 exact + the rest of the write, 1033,
        // framing included), then the whole second write.
        assert_eq!(rec.out, ["head 200 @0 first", "end 4117"]);
        assert!(!p.in_message());
        // Without a captured terminator the message stays open...
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"],
        );
        let mut w = b"fa0\r\n".to_vec();
        w.extend(std::iter::repeat_n(b'q', 2995));
        feed_captured(&mut p, &mut rec, 1, &w);
        assert!(p.in_message());
        p.feed(Fragment::new(&[], &[], 4000), 2, &mut rec);
        assert!(p.in_message());
        // ... until a write that ends with the last chunk.
        p.feed(Fragment::new(b"\r\n0\r\n\r\n", &[], 7), 3, &mut rec);
        assert_eq!(rec.out[1..], ["end 7002"]);
    }

    #[test]
    fn responses_without_body() {
        let mut p = MessageParser::new();
        let mut rec = Rec {
            answer: Answering::Head,
            ..Rec::default()
        };
        // HEAD: Content-Length describes the GET body; none follows.
        feed_all(
            &mut p,
            &mut rec,
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"],
        );
        assert_eq!(
            rec.out,
            ["head 200 @0 first", "end 0", "head 200 @0", "end 0"]
        );
        assert_eq!(
            run(&[
                b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
                b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"
            ]),
            ["head 204 @0 first", "end 0", "head 304 @1 first", "end 0"]
        );
    }

    #[test]
    fn continue_then_final() {
        assert_eq!(
            run(&[
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
            ]),
            ["head 100 @0 first", "end 0", "head 201 @1 first", "end 2"]
        );
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_all(&mut p, &mut rec, &[b"POST /up HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"]);
        assert!(p.in_message());
        feed_all(&mut p, &mut rec, &[b"abc"]);
        assert_eq!(rec.out, ["head POST /up @0 first", "end 3"]);
    }

    #[test]
    fn close_delimited() {
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[
                b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.12.3\r\n\r\n<html>",
                b"</html>",
            ],
        );
        assert_eq!(rec.out, ["head 200 @0 first"]);
        p.close(&mut rec);
        assert_eq!(rec.out[1..], ["end 13"]);
        // A body cut by the close is incomplete.
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"],
        );
        p.close(&mut rec);
        assert_eq!(rec.out, ["head 200 @0 first", "error Incomplete"]);
    }

    #[test]
    fn upgrade_and_connect_become_tunnels() {
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
                b"GET / HTTP/1.1\r\n\r\n",
            ],
        );
        assert_eq!(rec.out, ["head 101 @0 first", "end 0"]);
        assert!(p.is_tunnel());
        let mut p = MessageParser::new();
        let mut rec = Rec {
            answer: Answering::Connect,
            ..Rec::default()
        };
        feed_all(
            &mut p,
            &mut rec,
            &[b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01"],
        );
        assert_eq!(rec.out, ["head 200 @0 first", "end 0"]);
        assert!(p.is_tunnel());
    }

    #[test]
    fn garbage_and_resync() {
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_all(
            &mut p,
            &mut rec,
            &[
                b"\x16\x03\x01\x02\x00\x01",
                b"more garbage",
                b"GET /ok HTTP/1.1\r\n\r\n",
                b"not http\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ],
        );
        assert_eq!(
            rec.out,
            [
                "error Garbage",
                "error Skipped",
                "head GET /ok @2 first",
                "end 0",
                "error Garbage",
                "head 200 @4 first",
                "end 0"
            ]
        );
        // A bad start line, then a header block too large.
        assert_eq!(run(&[b"GET /x HTTP/9.9\r\n\r\n"]), ["error BadHead"]);
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..2000 {
            big.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        let chunks: Vec<&[u8]> = big.chunks(1000).collect();
        // Given up with the 17th syscall (17000 bytes > 16 KiB); the rest
        // is skipped.
        let mut expected = vec!["error HeadTooLarge"];
        expected.resize(chunks.len() - 16, "error Skipped");
        assert_eq!(run(&chunks), expected);
        // A body that looks like a request but fits its length is body.
        assert_eq!(
            run(&[
                b"POST /a HTTP/1.1\r\nContent-Length: 19\r\n\r\n",
                b"GET /b HTTP/1.1\r\n\r\n"
            ]),
            ["head POST /a @0 first", "end 19"]
        );
        // Lost events: a new request where fewer body bytes were expected.
        assert_eq!(
            run(&[
                b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nxx",
                b"GET /b HTTP/1.1\r\n\r\n"
            ]),
            [
                "head POST /a @0 first",
                "error Resync",
                "head GET /b @1 first",
                "end 0"
            ]
        );
        // A bad chunk size.
        assert_eq!(
            run(&[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]),
            ["head 200 @0 first", "error BadChunk"]
        );
    }

    #[test]
    fn heads_longer_than_the_capture() {
        // A GET with a 3000-byte cookie written in one syscall, ending with
        // the blank line (captured in the tail).
        let mut req = b"GET /profile HTTP/1.1\r\nHost: h\r\nCookie: ".to_vec();
        req.extend(std::iter::repeat_n(b'c', 3000));
        req.extend_from_slice(b"\r\n\r\n");
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_captured(&mut p, &mut rec, 0, &req);
        assert_eq!(rec.out, ["head GET /profile @0 first truncated", "end 0"]);
        feed_captured(&mut p, &mut rec, 1, b"GET /next HTTP/1.1\r\n\r\n");
        assert_eq!(rec.out[2..], ["head GET /next @1 first", "end 0"]);

        // A response head of 2000 bytes with a Content-Length body in the
        // same write: the body is taken to start after the capture.
        let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\nX-Pad: ".to_vec();
        resp.extend(std::iter::repeat_n(b'p', 2000));
        resp.extend_from_slice(b"\r\n\r\n");
        let head_len = resp.len();
        resp.extend(std::iter::repeat_n(b'b', 3000));
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_captured(&mut p, &mut rec, 0, &resp);
        assert_eq!(rec.out, ["head 200 @0 first truncated"]);
        // Real remainder: 10000 - 3000; estimated: 10000 - (len - 1024).
        let estimated = 10000 - (resp.len() as u64 - 1024);
        assert!(estimated < 7000 && head_len > 1024);
        p.feed(Fragment::new(&[], &[], estimated), 1, &mut rec);
        assert_eq!(rec.out[1..], ["end 10000"]);
        // Cut inside a header name: the whole lines before it are kept.
        let mut req = b"POST /api HTTP/1.1\r\nContent-Length: 5\r\nX-Pad: ".to_vec();
        let pad = 1024 - req.len() - 2 - 6;
        req.extend(std::iter::repeat_n(b'p', pad));
        req.extend_from_slice(b"\r\nAccept-Language: en\r\n\r\nhello");
        assert_eq!(&req[1018..1024], b"Accept");
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        feed_captured(&mut p, &mut rec, 0, &req);
        // The body (5 bytes) is taken to be within the uncaptured part.
        assert_eq!(rec.out, ["head POST /api @0 first truncated", "end 5"]);
        // The start line itself not captured.
        let mut p = MessageParser::new();
        let mut rec = Rec::default();
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', 2000));
        long.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        feed_captured(&mut p, &mut rec, 0, &long);
        assert_eq!(rec.out, ["error StartLineNotCaptured"]);
    }

    #[test]
    fn fragments_are_clamped() {
        let f = Fragment::new(b"abcdef", b"0123456789abcdefXYZ", 4);
        assert_eq!(f.known_from(0), b"abcd");
        assert_eq!(f.known_from(2), b"cd");
        assert_eq!(f.known_from(4), b"");
        assert_eq!(f.known_end(), Some(&b"fXYZ"[..]));
        // A 2000-byte transfer: head 0..1024, tail 1984..2000, a gap between.
        let f = Fragment::new(&[b'h'; 1024], &[b't'; 16], 2000);
        assert_eq!(f.known_from(1023), b"h");
        assert_eq!(f.known_from(1024), b"");
        assert_eq!(f.known_from(1983), b"");
        assert_eq!(f.known_from(1990), &[b't'; 10]);
        assert_eq!(f.known_from(2000), b"");
        let f = Fragment::new(b"", b"", 0);
        assert!(f.is_empty());
    }
}
