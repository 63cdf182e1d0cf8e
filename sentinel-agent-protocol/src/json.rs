//! Writing and scanning JSON strings eight bytes at a time.
//!
//! Nearly every string the proxy and its agents exchange (header names and
//! values, paths, metadata) needs no escaping. serde_json still looks each
//! byte up in its escape table; checking a word at a time and copying the
//! string whole is several times cheaper, and what serde_json would write
//! for the rest is exactly what it writes, since those go through it.

/// Where the first byte JSON must escape in a string (`"`, `\` or a
/// control character) is in `bytes`, checked eight bytes at a time.
#[inline]
pub fn first_special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // The high bit of each byte below `n` (the first such byte exactly; a
    // borrow may flag bytes after it).
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let hit = below(w ^ (ONES * u64::from(b'"')), 1)
            | below(w ^ (ONES * u64::from(b'\\')), 1)
            | below(w, 0x20);
        if hit != 0 {
            // Little-endian: the lowest set bit is the first byte.
            return Some(at + (hit.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| at + i)
}

/// Whether JSON needs anything in `bytes` escaped.
#[inline]
pub fn needs_escape(bytes: &[u8]) -> bool {
    first_special(bytes).is_some()
}

/// Appends `s` as a JSON string, the same bytes serde_json writes.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_special_finds_the_first_byte_serde_escapes() {
        let reference = |b: &[u8]| b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
        let interesting = [
            0, 1, 0x1f, 0x20, 0x21, b'"', 0x23, b'\\', 0x7f, 0x80, 0xa2, 0xdc, 0xff,
        ];
        // Every position of every interesting byte in texts of every length
        // up to 24, over a background of each harmless byte too.
        for len in 0..24 {
            for &background in &[b'a', 0x80, 0xff, 0x21, 0x23] {
                for at in 0..len {
                    for &stop in &interesting {
                        let mut text = vec![background; len];
                        text[at] = stop;
                        assert_eq!(first_special(&text), reference(&text), "{text:?}");
                        if at + 1 < len {
                            text[at + 1] = b'"';
                            assert_eq!(first_special(&text), reference(&text), "{text:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "plain text / with: punctuation ~ and \u{7f}",
            "quote \" and backslash \\",
            "control \u{0}\u{1f} tab\t",
            "non-ASCII é ☃ 𝄞",
            "eight by",
            "sixteen bytes ok",
            "a quote at sixteen byte\"",
            "control in the second word:\u{1b}",
            "\u{80}\u{ff}\u{1f}",
        ] {
            let mut out = Vec::new();
            write_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }
}
