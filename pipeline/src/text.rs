//! Python string semantics the reference relies on.

/// Python's `str.isspace` for one character: Unicode White_Space plus the ASCII information
/// separators U+001C..U+001F, which Python counts as whitespace and Rust does not.
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` (also Jinja's `trim` filter, used by the Llama-3 chat template).
pub fn python_strip(s: &str) -> &str {
    s.trim_matches(is_python_space)
}

/// Python's `len(s.split())`: the reference's "length" of a turn (a word count).
pub fn python_word_count(s: &str) -> usize {
    s.split(is_python_space).filter(|w| !w.is_empty()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_matches_python() {
        assert_eq!(python_strip("\u{1c} a b \u{85}\u{3000}"), "a b");
        assert_eq!(python_strip("\n\n"), "");
        assert_eq!(python_strip("x"), "x");
    }

    #[test]
    fn word_count_matches_python() {
        assert_eq!(python_word_count("a\u{1f}b  c\n"), 3);
        assert_eq!(python_word_count(""), 0);
    }
}
