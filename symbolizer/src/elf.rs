//! What the agent needs from an ELF file besides symbols: its build id and
//! its loadable segments, to turn file offsets into the virtual addresses
//! tools like `addr2line` use.

use std::fs::File;

use object::{Object as _, ObjectSection as _, ObjectSegment as _, SegmentFlags, read::ReadCache};

/// A loadable (`PT_LOAD`) segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub mem_size: u64,
    pub offset: u64,
    pub file_size: u64,
    pub executable: bool,
}

/// Build id and segments of an ELF file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElfLayout {
    pub build_id: Option<Vec<u8>>,
    pub segments: Vec<Segment>,
    /// `.gnu_debuglink`: the name of a separate debug file and its CRC-32.
    pub debuglink: Option<(String, u32)>,
    /// Whether the file itself has DWARF (a non-empty `.debug_info`).
    pub has_dwarf: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not a parsable ELF file: {0}")]
    Parse(#[from] object::Error),
    #[error("not an ELF file")]
    NotElf,
}

const PF_X: u32 = 1;

impl ElfLayout {
    /// Reads the layout, touching only the headers and notes of the file.
    pub fn read(file: &File) -> Result<Self, ElfError> {
        let cache = ReadCache::new(file);
        let object = object::File::parse(&cache)?;
        if object.format() != object::BinaryFormat::Elf {
            return Err(ElfError::NotElf);
        }
        let segments = object
            .segments()
            .map(|s| {
                let (offset, file_size) = s.file_range();
                Segment {
                    vaddr: s.address(),
                    mem_size: s.size(),
                    offset,
                    file_size,
                    executable: matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0),
                }
            })
            .collect();
        // A broken note section is not a reason to give up on the file.
        let build_id = object.build_id().ok().flatten().map(<[u8]>::to_vec);
        let debuglink = object
            .gnu_debuglink()
            .ok()
            .flatten()
            .map(|(name, crc)| (String::from_utf8_lossy(name).into_owned(), crc));
        let has_dwarf = object
            .section_by_name(".debug_info")
            .is_some_and(|s| s.kind() != object::SectionKind::UninitializedData && s.size() > 0);
        Ok(Self {
            build_id,
            segments,
            debuglink,
            has_dwarf,
        })
    }

    /// The virtual address (as in the ELF file) of a file offset; `None`
    /// outside the segments, or past 2^64 in a malformed one.
    pub fn file_offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| offset >= s.offset && offset - s.offset < s.file_size.max(1))
            .and_then(|s| s.vaddr.checked_add(offset - s.offset))
    }

    /// The executable segment containing `offset`, else the first one: the
    /// range a pprof mapping of this file describes.
    pub fn text_segment(&self, offset: u64) -> Option<&Segment> {
        let exec = || self.segments.iter().filter(|s| s.executable);
        exec()
            .find(|s| offset >= s.offset && offset - s.offset < s.file_size.max(1))
            .or_else(|| exec().next())
    }

    /// The build id in lower-case hex, or "".
    pub fn build_id_hex(&self) -> String {
        self.build_id.as_deref().map(hex).unwrap_or_default()
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> ElfLayout {
        ElfLayout {
            build_id: Some(vec![0xde, 0xad, 0x01]),
            segments: vec![
                Segment {
                    vaddr: 0,
                    mem_size: 0x1000,
                    offset: 0,
                    file_size: 0x1000,
                    executable: false,
                },
                Segment {
                    vaddr: 0x401000,
                    mem_size: 0x3000,
                    offset: 0x1000,
                    file_size: 0x3000,
                    executable: true,
                },
                Segment {
                    vaddr: 0x405e10,
                    mem_size: 0x400,
                    offset: 0x4e10,
                    file_size: 0x200,
                    executable: false,
                },
            ],
            ..ElfLayout::default()
        }
    }

    #[test]
    fn offsets_translate_through_their_segment() {
        let l = layout();
        assert_eq!(l.file_offset_to_vaddr(0x10), Some(0x10));
        assert_eq!(l.file_offset_to_vaddr(0x1234), Some(0x401234));
        assert_eq!(l.file_offset_to_vaddr(0x4e20), Some(0x405e20));
        assert_eq!(l.file_offset_to_vaddr(0x9000), None);
        // A segment mapped past the end of the address space (fuzzed input).
        let wrapping = ElfLayout {
            build_id: None,
            segments: vec![Segment {
                vaddr: u64::MAX - 0xf,
                mem_size: 0x100,
                offset: 0x1000,
                file_size: 0x100,
                executable: true,
            }],
        };
        assert_eq!(wrapping.file_offset_to_vaddr(0x100f), Some(u64::MAX));
        assert_eq!(wrapping.file_offset_to_vaddr(0x1010), None);
        assert_eq!(l.text_segment(0x1234).map(|s| s.vaddr), Some(0x401000));
        assert_eq!(l.build_id_hex(), "dead01");
    }

    #[test]
    fn reads_own_executable() {
        let file = File::open(std::env::current_exe().unwrap()).unwrap();
        let layout = ElfLayout::read(&file).unwrap();
        assert!(layout.segments.iter().any(|s| s.executable));
        // The oracle: `readelf -n` prints the same build id.
        let out = std::process::Command::new("readelf")
            .arg("-n")
            .arg(std::env::current_exe().unwrap())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| l.contains("Build ID:")) {
            assert_eq!(
                line.split_whitespace().last().unwrap(),
                layout.build_id_hex()
            );
        } else {
            assert_eq!(layout.build_id, None);
        }
    }

    #[test]
    fn rejects_non_elf() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(ElfLayout::read(&file).is_err());
    }
}
