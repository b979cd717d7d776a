//! The chunked-body parse `sk_msg` follows request bodies with
//! (`fathom_common::http::ChunkState`), on arbitrary bytes. The first byte
//! picks split points; the rest is the stream. Checked: the parse takes the
//! same bytes and ends in the same state whether fed whole or in pieces
//! (a message boundary never changes where a body ends), and where it ends
//! a body, a plain decoder written here agrees. Nothing may panic.
#![no_main]

use fathom_common::http::{ChunkState, chunk};
use libfuzzer_sys::fuzz_target;

/// Where a chunked body at the start of `s` ends (RFC 9112 7.1, as the
/// parse accepts it: sizes of 1 to 15 hex digits, anything up to the LF
/// after them, trailer lines up to an empty one); `None` if `s` is not
/// such a body or ends first.
fn plain_end(s: &[u8]) -> Option<usize> {
    let mut pos = 0;
    loop {
        let lf = pos + s[pos..].iter().position(|&b| b == b'\n')?;
        let line = &s[pos..lf];
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 15 {
            return None;
        }
        let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()?;
        pos = lf + 1;
        if size == 0 {
            // Trailer lines until an empty one (a bare LF or CRLF).
            loop {
                let lf = pos + s[pos..].iter().position(|&b| b == b'\n')?;
                let line = &s[pos..lf];
                pos = lf + 1;
                if line.is_empty() || line == b"\r" {
                    return Some(pos);
                }
            }
        }
        pos = pos.checked_add(usize::try_from(size).ok()?.checked_add(2)?)?;
        if pos > s.len() {
            return None;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let mut whole = ChunkState::default();
    let taken = whole.feed(stream);
    assert!(taken <= stream.len());
    assert!(taken == stream.len() || whole.chunk >= chunk::DONE);

    // In pieces of 1 + step % 32 bytes, or at every LF when step >= 128.
    let mut pieces = ChunkState::default();
    let mut pos = 0;
    while pos < stream.len() && pieces.chunk < chunk::DONE {
        let end = if step >= 128 {
            stream[pos..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(stream.len(), |i| pos + i + 1)
        } else {
            (pos + 1 + usize::from(step % 32)).min(stream.len())
        };
        pos += pieces.feed(&stream[pos..end]);
    }
    assert_eq!((pieces, pos), (whole, taken), "split at {step}");

    if whole.chunk == chunk::DONE {
        assert_eq!(plain_end(stream), Some(taken));
    } else if let Some(end) = plain_end(stream) {
        panic!("the plain decoder ends a body at {end}, the parse says {whole:?}");
    }
});
