//! `ElfLayout::read` on arbitrary bytes (through a file, as the agent reads
//! binaries), then `file_offset_to_vaddr` and `text_segment` at offsets
//! derived from the segments and from the input's last bytes. Nothing may
//! panic; a translated offset lies in a segment whose range maps it.
#![no_main]

use std::io::Write as _;

use fathom_symbolizer::elf::ElfLayout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::tempfile().expect("temporary file");
    file.write_all(data).expect("write the input");
    let Ok(layout) = ElfLayout::read(&file) else {
        return;
    };
    assert_eq!(
        layout.build_id_hex().len(),
        2 * layout.build_id.as_ref().map_or(0, Vec::len)
    );

    let mut offsets: Vec<u64> = vec![0, 1, u64::MAX];
    for s in &layout.segments {
        offsets.extend([
            s.offset,
            s.offset.wrapping_add(s.file_size / 2),
            s.offset.wrapping_add(s.file_size).wrapping_sub(1),
            s.offset.wrapping_add(s.file_size),
            s.offset.wrapping_sub(1),
        ]);
    }
    for chunk in data.rchunks(8).take(2) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        offsets.push(u64::from_le_bytes(b));
    }

    for &offset in &offsets {
        if let Some(vaddr) = layout.file_offset_to_vaddr(offset) {
            assert!(
                layout.segments.iter().any(|s| offset >= s.offset
                    && offset - s.offset < s.file_size.max(1)
                    && s.vaddr.checked_add(offset - s.offset) == Some(vaddr)),
                "{offset:#x} -> {vaddr:#x} through no segment of {layout:?}"
            );
        }
        if let Some(text) = layout.text_segment(offset) {
            assert!(text.executable, "{text:?}");
            assert!(layout.segments.contains(text));
        }
    }
});
