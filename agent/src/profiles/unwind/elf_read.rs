//! Reading an ELF file for [`super::build`] without holding all of it in
//! memory: an image as long as the file in which only the bytes the table
//! builder reads are filled in (the ELF header, the program and section
//! header tables, the section names, `.eh_frame` and `.debug_frame`); the
//! rest is zero pages the allocator never touched (a zeroed allocation
//! this large is fresh anonymous memory, not resident until written). A
//! 160 MB binary with debug information took 160 MB of heap while its
//! table was built; `.eh_frame` is a few MB of it.
//!
//! Anything unusual (not a 64-bit little-endian ELF, extended section
//! numbering, headers or sections past the end of the file) is read whole,
//! as before.
use std::{fs::File, io, os::unix::fs::FileExt as _, path::Path};

/// Sections the table builder reads the data of.
const SECTIONS: [&[u8]; 2] = [b".eh_frame", b".debug_frame"];
/// `SHT_NOBITS`: a section without file data.
const SHT_NOBITS: u32 = 8;
/// Files smaller than this are read whole (nothing to save).
const SPARSE_MIN: u64 = 1 << 20;

/// The file at `path` as [`super::build`] needs it (see the module doc).
pub fn read_for_unwind(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len >= SPARSE_MIN
        && let Some(image) = sparse(&file, len)?
    {
        return Ok(image);
    }
    std::fs::read(path)
}

/// The sparse image, or `None` when the file is not one it handles.
fn sparse(file: &File, len: u64) -> io::Result<Option<Vec<u8>>> {
    let Ok(size) = usize::try_from(len) else {
        return Ok(None);
    };
    let mut header = [0u8; 64];
    file.read_exact_at(&mut header, 0)?;
    // ELF magic, ELFCLASS64, ELFDATA2LSB.
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Ok(None);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(w)
    };
    let ph = (
        u64_at(&header, 0x20),
        u64::from(u16_at(&header, 0x36)) * u64::from(u16_at(&header, 0x38)),
    );
    let sh_off = u64_at(&header, 0x28);
    let (sh_entsize, sh_num, shstrndx) = (
        u64::from(u16_at(&header, 0x3a)),
        u64::from(u16_at(&header, 0x3c)),
        usize::from(u16_at(&header, 0x3e)),
    );
    // Extended numbering (counts in section 0) and odd entry sizes: whole.
    if sh_num == 0 || sh_entsize != 64 || shstrndx as u64 >= sh_num {
        return Ok(None);
    }
    let sh = (sh_off, sh_num * 64);
    let within = |(off, n): (u64, u64)| off.checked_add(n).is_some_and(|end| end <= len);
    if !within(ph) || !within(sh) {
        return Ok(None);
    }

    let mut image = vec![0u8; size];
    // Both fit `usize`: ranges are within the file, whose length does.
    let fill = |image: &mut [u8], (off, n): (u64, u64)| -> io::Result<()> {
        let (start, n) = (off as usize, n as usize);
        file.read_exact_at(&mut image[start..start + n], off)
    };
    fill(&mut image, (0, 64))?;
    fill(&mut image, ph)?;
    fill(&mut image, sh)?;
    let section = |image: &[u8], i: usize| {
        let h = &image[sh.0 as usize + i * 64..][..64];
        (
            u32_at(h, 0),  // sh_name
            u32_at(h, 4),  // sh_type
            u64_at(h, 24), // sh_offset
            u64_at(h, 32), // sh_size
        )
    };
    let (_, strtab_type, strtab_off, strtab_size) = section(&image, shstrndx);
    if strtab_type == SHT_NOBITS || !within((strtab_off, strtab_size)) {
        return Ok(None);
    }
    fill(&mut image, (strtab_off, strtab_size))?;
    let mut wanted = Vec::new();
    for i in 0..sh_num as usize {
        let (name, kind, off, size) = section(&image, i);
        let Some(name_at) = strtab_off.checked_add(u64::from(name)) else {
            continue;
        };
        if u64::from(name) >= strtab_size || kind == SHT_NOBITS {
            continue;
        }
        let names = &image[name_at as usize..(strtab_off + strtab_size) as usize];
        let name = names.split(|&b| b == 0).next().unwrap_or_default();
        if SECTIONS.contains(&name) {
            if !within((off, size)) {
                return Ok(None);
            }
            wanted.push((off, size));
        }
    }
    for range in wanted {
        fill(&mut image, range)?;
    }
    Ok(Some(image))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real binaries of this machine: the table built from the sparse image
    /// is the table built from the whole file, row for row.
    #[test]
    fn the_sparse_image_builds_the_same_table() {
        let mut checked = 0;
        let me = std::env::current_exe().unwrap();
        for path in [
            me.as_path(),
            Path::new("/lib/x86_64-linux-gnu/libc.so.6"),
            Path::new("/usr/bin/python3"),
            Path::new("/usr/sbin/nginx"),
        ] {
            if !path.exists() {
                eprintln!("(no {}: not compared)", path.display());
                continue;
            }
            let whole = std::fs::read(path).unwrap();
            let image = read_for_unwind(path).unwrap();
            assert_eq!(image.len(), whole.len());
            let (a, b) = (super::super::build(&whole), super::super::build(&image));
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.to_bytes(), b.to_bytes(), "{}", path.display());
                    assert!(!a.rows.is_empty());
                }
                (a, b) => assert_eq!(
                    a.map(|t| t.rows.len()).map_err(|e| e.to_string()),
                    b.map(|t| t.rows.len()).map_err(|e| e.to_string()),
                    "{}",
                    path.display()
                ),
            }
            if whole.len() as u64 >= SPARSE_MIN {
                // Sparse indeed: most of a large file is left zero.
                let filled = image.iter().filter(|&&b| b != 0).count();
                let nonzero = whole.iter().filter(|&&b| b != 0).count();
                assert!(filled < nonzero, "{}", path.display());
            }
            checked += 1;
        }
        assert!(checked >= 2, "no binaries compared");
    }

    #[test]
    fn odd_files_are_read_whole_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Not ELF, large: read whole.
        let p = dir.path().join("data");
        let data = vec![7u8; (SPARSE_MIN + 10) as usize];
        std::fs::write(&p, &data).unwrap();
        assert_eq!(read_for_unwind(&p).unwrap(), data);
        // An ELF header whose section table lies past the end: read whole.
        let mut elf = vec![0u8; (SPARSE_MIN + 64) as usize];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x28..0x30].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        std::fs::write(&p, &elf).unwrap();
        assert_eq!(read_for_unwind(&p).unwrap(), elf);
        // Gone: the error.
        assert!(read_for_unwind(&dir.path().join("missing")).is_err());
    }
}
