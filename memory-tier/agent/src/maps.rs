//! Which file mapping an address lies in, from `/proc/self/maps`.

/// A mapping of a file that covers an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMapping {
    /// The mapped file.
    pub path: String,
    /// The address's offset in the file.
    pub file_offset: u64,
    /// Whether the mapping is writable.
    pub writable: bool,
}

/// The file mapping of `maps` (the text of `/proc/PID/maps`) that holds `addr`.
pub fn find(maps: &str, addr: usize) -> Option<FileMapping> {
    for line in maps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(_dev), Some(inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        if !(start <= addr && addr < end) {
            continue;
        }
        // The path is the rest of the line (it may hold spaces); inode 0 is anonymous.
        let path = line
            .splitn(6, |c: char| c.is_ascii_whitespace())
            .nth(5)
            .map(str::trim)
            .unwrap_or("");
        if inode == "0" || !path.starts_with('/') {
            return None;
        }
        return Some(FileMapping {
            path: path.trim_end_matches(" (deleted)").to_owned(),
            file_offset: offset + (addr - start) as u64,
            writable: perms.as_bytes().get(1) == Some(&b'w'),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0021000 r--p 00000000 fd:01 1311 /usr/bin/llama-server
7f0000000000-7f0010000000 r--s 00000000 fd:01 4242 /models/my model.gguf
7f0010000000-7f0010100000 rw-p 00000000 00:00 0 
7f0020000000-7f0020001000 rw-s 00002000 fd:01 99 /tmp/x.bin
";

    #[test]
    fn finds_the_file_and_offset_of_an_address_in_a_read_only_mapping() {
        let m = find(MAPS, 0x7f00_0000_1234).unwrap();
        assert_eq!(m.path, "/models/my model.gguf");
        assert_eq!(m.file_offset, 0x1234);
        assert!(!m.writable);
    }

    #[test]
    fn anonymous_memory_is_no_file_and_offsets_add_up() {
        assert_eq!(find(MAPS, 0x7f00_1000_0010), None);
        assert_eq!(find(MAPS, 0x1000), None);
        let m = find(MAPS, 0x7f00_2000_0010).unwrap();
        assert_eq!((m.file_offset, m.writable), (0x2010, true));
    }
}
