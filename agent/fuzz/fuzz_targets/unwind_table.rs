//! `unwind::build` on arbitrary bytes (ELF files, mostly damaged seeds), and
//! `UnwindTable::from_bytes` on the same bytes. Nothing may panic; a built
//! table keeps its invariants (rows strictly increasing, no two consecutive
//! rows with the same rule, a gap last, at most MAX_TABLE_ROWS), every row
//! is what `lookup` finds at its address, and it survives `to_bytes`.
#![no_main]

#[path = "../../src/profiles/unwind/table.rs"]
#[allow(dead_code)]
mod table;

use fathom_common::unwind::{MAX_TABLE_ROWS, cfa, rbp};
use libfuzzer_sys::fuzz_target;

fn check(t: &table::UnwindTable, data: &[u8]) {
    assert!(t.rows.len() <= MAX_TABLE_ROWS as usize);
    let (Some(first), Some(last)) = (t.rows.first(), t.rows.last()) else {
        return;
    };
    assert_eq!(first.pc, 0);
    assert_eq!(last.cfa_rule(), cfa::NONE);
    for w in t.rows.windows(2) {
        assert!(w[0].pc < w[1].pc, "{w:?}");
        assert!(!w[0].same_rule(&w[1]), "{w:?}");
    }
    for r in &t.rows {
        assert!(
            r.cfa_rule() <= cfa::UNSUPPORTED && r.rbp_rule() <= rbp::UNKNOWN,
            "{r:?}"
        );
        assert_eq!(t.lookup(t.base + u64::from(r.pc)), Some(r));
    }
    assert_eq!(
        t.lookup(t.base.wrapping_sub(1)).filter(|_| t.base > 0),
        None
    );
    for chunk in data.rchunks(8).take(4) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        let _ = t.lookup(u64::from_le_bytes(b));
        let _ = t.lookup(t.base.wrapping_add(u64::from_le_bytes(b) & 0xffff_ffff));
    }
    let bytes = t.to_bytes();
    assert_eq!(
        table::UnwindTable::from_bytes(&bytes).as_ref().ok(),
        Some(t)
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = table::build(data) {
        check(&t, data);
    }
    if let Ok(t) = table::UnwindTable::from_bytes(data) {
        check(&t, data);
    }
});
