//! Showing text that nothing has authenticated (an image header's name, key ids read from
//! keyslots) to a person: control characters are escaped, so that a hostile image cannot
//! send escape sequences to the terminal (move the cursor, rewrite earlier lines, set the
//! window title).

/// `text` with every control character (C0, DEL and C1) written as `\u{..}`, and
/// backslashes doubled so that an escape cannot be faked.
pub fn escape_untrusted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_untrusted;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_untrusted("vm1 disk"), "vm1 disk");
        assert_eq!(escape_untrusted("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape_untrusted("x\ny\rz\x07"), "x\\u{a}y\\u{d}z\\u{7}");
        assert_eq!(escape_untrusted("\u{9b}31m\u{7f}"), "\\u{9b}31m\\u{7f}");
        assert_eq!(escape_untrusted("back\\slash"), "back\\\\slash");
        assert_eq!(escape_untrusted("café ✓"), "café ✓");
    }
}
