//! Reads just enough of an ELF file to tell a static executable (one that runs inside any
//! Linux sandbox of the same architecture) from a dynamic one: the `--agent` binary must be
//! static.

use std::io::Read;
use std::path::Path;

/// True when the binary at `path` is statically linked (an ELF without a program
/// interpreter), so that it runs inside any Linux sandbox of the same architecture.
pub fn is_static_executable(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    /// The ELF header and the program headers sit in the first pages; never read the whole
    /// binary (a debug build is tens of MB).
    const HEAD_BYTES: u64 = 64 * 1024;
    let mut bytes = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|file| file.take(HEAD_BYTES).read_to_end(&mut bytes));
    if read.is_err() || bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let u64_at = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(word) as usize
    };
    let (table, entry_size, count) = (u64_at(32), u16_at(54), u16_at(56));
    if table + entry_size * count > bytes.len() {
        return false;
    }
    (0..count).all(|index| {
        let at = table + index * entry_size;
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) != PT_INTERP
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_executables_are_told_apart() {
        // Debian's sh is dynamically linked; busybox-static (in the test bed) is not.
        assert!(!is_static_executable(Path::new("/bin/sh")));
        assert!(!is_static_executable(Path::new("/etc/passwd")));
        if Path::new("/bin/busybox").exists() {
            assert!(is_static_executable(Path::new("/bin/busybox")));
        }
    }
}
