//! What the agent needs from an ELF file besides symbols: its build id and
//! its loadable segments, to turn file offsets into the virtual addresses
//! tools like `addr2line` use.

use std::{fmt, fs::File, os::unix::fs::FileExt as _};

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

/// A compressed section whose claimed size must not be handed to blazesym.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OversizedSection {
    pub index: usize,
    /// Bytes after the compression header.
    pub compressed: u64,
    /// `ch_size` of the compression header.
    pub claimed: u64,
}

impl fmt::Display for OversizedSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "section {} claims {} bytes from {} zlib-compressed ones",
            self.index, self.claimed, self.compressed
        )
    }
}

/// Deflate's largest expansion: 258 bytes from a 2-bit match code.
const DEFLATE_MAX_RATIO: u64 = 1032;
/// The most an inflated section may claim (real `.debug_info` sections of
/// the largest binaries stay below it).
pub const MAX_INFLATED_SECTION: u64 = 4 << 30;
const SHF_COMPRESSED: u64 = 0x800;
const ELFCOMPRESS_ZLIB: u32 = 1;

/// blazesym (0.2.7) allocates the uncompressed size an ELF compression
/// header claims before it inflates the section; when the allocator cannot
/// provide it the process aborts (not a panic: nothing to catch). Found by
/// symbolizer/fuzz (elf_symbolize/regression-compressed-size-claim). This
/// finds a zlib-compressed section claiming more than deflate can produce
/// from its bytes, or more than [`MAX_INFLATED_SECTION`]. It reads the
/// headers as blazesym does: little-endian whatever `EI_DATA` says, section
/// headers of the class's size, the count from `e_shnum` or, when 0, from
/// the first header. Files blazesym cannot read give `None`.
pub fn oversized_compressed_section(file: &File) -> Option<OversizedSection> {
    let u16_at =
        |b: &[u8], at: usize| Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?));
    let u32_at =
        |b: &[u8], at: usize| Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
    let u64_at =
        |b: &[u8], at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    let file_len = file.metadata().ok()?.len();
    let mut ehdr = [0u8; 64];
    file.read_exact_at(&mut ehdr[..16], 0).ok()?;
    if ehdr[..4] != *b"\x7fELF" {
        return None;
    }
    // (header, section header, compression header) sizes, where the fields are.
    let is64 = match ehdr[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let (ehdr_size, shdr_size, chdr_size) = if is64 { (64, 64, 24) } else { (52, 40, 12) };
    file.read_exact_at(&mut ehdr[..ehdr_size], 0).ok()?;
    let (shoff, shnum) = if is64 {
        (u64_at(&ehdr, 0x28)?, u16_at(&ehdr, 0x3c)?)
    } else {
        (u64::from(u32_at(&ehdr, 0x20)?), u16_at(&ehdr, 0x30)?)
    };
    let shnum = if shnum == 0 {
        let mut first = [0u8; 64];
        file.read_exact_at(&mut first[..shdr_size], shoff).ok()?;
        if is64 {
            u64_at(&first, 0x20)?
        } else {
            u64::from(u32_at(&first, 0x14)?)
        }
    } else {
        u64::from(shnum)
    };
    let table = shnum.checked_mul(shdr_size as u64)?;
    if shoff.checked_add(table)? > file_len {
        return None;
    }
    let mut shdrs = vec![0u8; usize::try_from(table).ok()?];
    file.read_exact_at(&mut shdrs, shoff).ok()?;
    for (index, shdr) in shdrs.chunks_exact(shdr_size).enumerate() {
        let (flags, offset, size) = if is64 {
            (u64_at(shdr, 8)?, u64_at(shdr, 0x18)?, u64_at(shdr, 0x20)?)
        } else {
            let field = |at| u32_at(shdr, at).map(u64::from);
            (field(8)?, field(0x10)?, field(0x14)?)
        };
        let in_file = offset.checked_add(size).is_some_and(|end| end <= file_len);
        if flags & SHF_COMPRESSED == 0 || !in_file || size < chdr_size as u64 {
            continue;
        }
        let mut chdr = [0u8; 24];
        if file.read_exact_at(&mut chdr[..chdr_size], offset).is_err() {
            continue;
        }
        let claimed = if is64 {
            u64_at(&chdr, 8)?
        } else {
            u64::from(u32_at(&chdr, 4)?)
        };
        let compressed = size - chdr_size as u64;
        let possible = (compressed + 1).saturating_mul(DEFLATE_MAX_RATIO);
        if u32_at(&chdr, 0)? == ELFCOMPRESS_ZLIB
            && (claimed > possible || claimed > MAX_INFLATED_SECTION)
        {
            return Some(OversizedSection {
                index,
                compressed,
                claimed,
            });
        }
    }
    None
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
            segments: vec![Segment {
                vaddr: u64::MAX - 0xf,
                mem_size: 0x100,
                offset: 0x1000,
                file_size: 0x100,
                executable: true,
            }],
            ..ElfLayout::default()
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
    fn finds_compressed_sections_claiming_too_much() {
        let seed = |name| File::open(format!("fuzz/corpus/elf_symbolize/{name}")).unwrap();
        // gcc -gz=zlib: honest claims.
        assert_eq!(oversized_compressed_section(&seed("prog-zdebug")), None);
        assert_eq!(oversized_compressed_section(&seed("prog-dwarf5")), None);
        // The fuzzed one: .debug_aranges claims 2^48 + 64 bytes.
        let oversized = oversized_compressed_section(&seed("regression-compressed-size-claim"));
        assert_eq!(
            oversized,
            Some(OversizedSection {
                index: 28,
                compressed: 0x39 - 24,
                claimed: (1 << 48) + 0x40,
            })
        );
    }

    #[test]
    fn rejects_non_elf() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(ElfLayout::read(&file).is_err());
    }
}
