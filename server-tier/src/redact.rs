//! Redaction of text that arrives whole or in chunks, with the same result either way.
//!
//! A [`StreamRedactor`] holds back only the text a match could still grow into: a match
//! starting at byte `s` is settled once the text reaches `s + max_len + 1` bytes (the
//! extra byte lets assertions such as `\b` or `$` see what follows). Matches are taken
//! leftmost-first and never overlap, as in a scan of the whole text, so any chunking of
//! a text gives the output of redacting it whole, provided no match is longer than
//! `max_len` (exact for literals and bounded regexes; unbounded regexes use
//! [`crate::rules::UNBOUNDED_MATCH_WINDOW`]).

use std::sync::Arc;

use regex::Regex;

/// What a match becomes.
#[derive(Clone, Debug)]
pub(crate) enum Replacement {
    /// This text, expanded with capture groups when `expand` is true.
    Text { text: String, expand: bool },
    /// One mask character per character of the match.
    Mask(char),
}

/// A compiled redaction: a regex (literals are escaped), its replacement and the longest
/// match it can produce.
#[derive(Clone, Debug)]
pub(crate) struct Redactor {
    regex: Regex,
    replacement: Replacement,
    max_len: usize,
}

impl Redactor {
    /// Compiles `pattern`; refuses regexes that can match the empty string (they would
    /// insert the replacement between every two characters).
    pub(crate) fn new(
        pattern: &str,
        is_regex: bool,
        replacement: Replacement,
    ) -> Result<Redactor, String> {
        let source = if is_regex {
            pattern.to_owned()
        } else {
            regex::escape(pattern)
        };
        if pattern.is_empty() {
            return Err("the pattern is empty".into());
        }
        let (regex, max_len) = compile_bounded(&source)?;
        let replacement = match replacement {
            Replacement::Text { text, .. } => Replacement::Text {
                text,
                expand: is_regex,
            },
            mask => mask,
        };
        Ok(Redactor {
            regex,
            replacement,
            max_len,
        })
    }

    /// Redacts a whole text; returns it and the number of bytes matched.
    pub(crate) fn redact_all(self: &Arc<Self>, text: &str) -> (String, usize) {
        let mut stream = StreamRedactor::new(Arc::clone(self));
        let mut out = stream.push(text);
        out.push_str(&stream.finish());
        (out, stream.bytes_matched)
    }

    fn replace_into(&self, caps: &regex::Captures<'_>, out: &mut String) {
        match &self.replacement {
            Replacement::Text { text, expand: true } => caps.expand(text, out),
            Replacement::Text { text, .. } => out.push_str(text),
            Replacement::Mask(c) => {
                let n = caps.get(0).map_or(0, |m| m.as_str().chars().count());
                out.extend(std::iter::repeat_n(*c, n));
            }
        }
    }
}

/// Compiles a regex and bounds its match length; refuses ones that match nothing.
pub(crate) fn compile_bounded(source: &str) -> Result<(Regex, usize), String> {
    let regex = Regex::new(source).map_err(|e| format!("invalid regex: {e}"))?;
    let hir = regex_syntax::Parser::new()
        .parse(source)
        .map_err(|e| format!("invalid regex: {e}"))?;
    let properties = hir.properties();
    if properties.minimum_len().unwrap_or(0) == 0 {
        return Err("the pattern can match the empty string".into());
    }
    let max_len = properties
        .maximum_len()
        .unwrap_or(crate::rules::UNBOUNDED_MATCH_WINDOW);
    Ok((regex, max_len.max(1)))
}

/// Redacts text that arrives in chunks.
#[derive(Debug)]
pub(crate) struct StreamRedactor {
    redactor: Arc<Redactor>,
    /// Some settled text (context for look-behind assertions), then pending text.
    buffer: String,
    /// Where the pending text starts in `buffer`.
    cursor: usize,
    /// Bytes of text matched so far.
    pub(crate) bytes_matched: usize,
}

impl StreamRedactor {
    pub(crate) fn new(redactor: Arc<Redactor>) -> StreamRedactor {
        StreamRedactor {
            redactor,
            buffer: String::new(),
            cursor: 0,
            bytes_matched: 0,
        }
    }

    /// Takes the next chunk; returns the text now settled.
    pub(crate) fn push(&mut self, chunk: &str) -> String {
        self.buffer.push_str(chunk);
        let mut out = String::new();
        let max_len = self.redactor.max_len;
        loop {
            let len = self.buffer.len();
            let found = self.redactor.regex.captures_at(&self.buffer, self.cursor);
            if let Some(caps) = found {
                let Some(whole) = caps.get(0) else { break };
                if whole.start() + max_len < len {
                    out.push_str(&self.buffer[self.cursor..whole.start()]);
                    self.redactor.replace_into(&caps, &mut out);
                    self.bytes_matched += whole.len();
                    self.cursor = whole.end();
                    continue;
                }
            }
            // No settled match: every start before `len - max_len` is settled as none.
            let mut safe = len.saturating_sub(max_len).max(self.cursor);
            while !self.buffer.is_char_boundary(safe) {
                safe -= 1;
            }
            if safe > self.cursor {
                out.push_str(&self.buffer[self.cursor..safe]);
                self.cursor = safe;
            }
            break;
        }
        self.trim();
        out
    }

    /// Ends the text; returns what was held back, redacted.
    pub(crate) fn finish(&mut self) -> String {
        let mut out = String::new();
        while let Some(caps) = self.redactor.regex.captures_at(&self.buffer, self.cursor) {
            let Some(whole) = caps.get(0) else { break };
            out.push_str(&self.buffer[self.cursor..whole.start()]);
            self.redactor.replace_into(&caps, &mut out);
            self.bytes_matched += whole.len();
            self.cursor = whole.end();
        }
        out.push_str(&self.buffer[self.cursor..]);
        self.cursor = self.buffer.len();
        self.trim();
        out
    }

    /// Drops settled text but the last character, which look-behind assertions need.
    fn trim(&mut self) {
        if self.cursor == 0 {
            return;
        }
        let keep_from = self.buffer[..self.cursor]
            .char_indices()
            .next_back()
            .map_or(self.cursor, |(i, _)| i);
        if keep_from > 0 {
            self.buffer.drain(..keep_from);
            self.cursor -= keep_from;
        }
    }
}

/// Finds a stop pattern in text that arrives in chunks.
#[derive(Debug)]
pub(crate) struct StopDetector {
    regex: Regex,
    max_len: usize,
    tail: String,
}

impl StopDetector {
    pub(crate) fn new(regex: Regex, max_len: usize) -> StopDetector {
        StopDetector {
            regex,
            max_len,
            tail: String::new(),
        }
    }

    /// Takes the next chunk of emitted text; returns how many of its bytes to keep when
    /// the pattern ends inside it (the text stops at the end of the match).
    pub(crate) fn push(&mut self, chunk: &str) -> Option<usize> {
        let before = self.tail.len();
        self.tail.push_str(chunk);
        if let Some(m) = self.regex.find(&self.tail) {
            // A match that ended in earlier text was reported then; this one ends in the
            // new chunk.
            let keep = m.end().saturating_sub(before).min(chunk.len());
            return Some(keep);
        }
        let mut cut = self.tail.len().saturating_sub(self.max_len);
        while !self.tail.is_char_boundary(cut) {
            cut -= 1;
        }
        self.tail.drain(..cut);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn redactor(pattern: &str, regex: bool, replacement: Replacement) -> Arc<Redactor> {
        Arc::new(Redactor::new(pattern, regex, replacement).unwrap())
    }

    fn text(s: &str) -> Replacement {
        Replacement::Text {
            text: s.into(),
            expand: false,
        }
    }

    fn chunked(r: &Arc<Redactor>, input: &str, cuts: &[usize]) -> String {
        let mut stream = StreamRedactor::new(Arc::clone(r));
        let mut out = String::new();
        let mut start = 0;
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|c| c % (input.len() + 1))
            .filter(|&c| input.is_char_boundary(c))
            .collect();
        points.sort_unstable();
        for point in points {
            out.push_str(&stream.push(&input[start..point]));
            start = point;
        }
        out.push_str(&stream.push(&input[start..]));
        out.push_str(&stream.finish());
        out
    }

    #[test]
    fn whole_text_cases() {
        let check = |r: &Arc<Redactor>, input: &str, expected: &str| {
            assert_eq!(r.redact_all(input).0, expected, "input {input:?}");
        };
        let literal = redactor("secret", false, text("[x]"));
        check(&literal, "a secret and secrets", "a [x] and [x]s");
        check(&literal, "no match", "no match");
        let mask = redactor("a.c", false, Replacement::Mask('*'));
        check(&mask, "abc a.c", "abc ***");
        let regex = redactor(r"sk-(\d+)", true, text("key<$1>"));
        check(&regex, "use sk-123 now", "use key<123> now");
        let word = redactor(r"\bcat\b", true, Replacement::Mask('#'));
        check(&word, "cat concat cat.", "### concat ###.");
        let unicode = redactor("é", false, Replacement::Mask('_'));
        check(&unicode, "café é", "caf_ _");
        let (_, matched) = literal.redact_all("secret secret");
        assert_eq!(matched, 12);
    }

    #[test]
    fn straddling_matches_are_found() {
        let literal = redactor("secret", false, text("[x]"));
        assert_eq!(
            chunked(&literal, "my secret is out", &[4, 5, 6]),
            "my [x] is out"
        );
        let regex = redactor(r"\d{3}-\d{4}", true, Replacement::Mask('#'));
        assert_eq!(
            chunked(&regex, "call 555-1234 or 555-9876", &[6, 9, 10, 20]),
            "call ######## or ########"
        );
        // A regex whose longest alternative only shows later in the stream.
        let alternation = redactor("abc|b", true, text("_"));
        assert_eq!(chunked(&alternation, "xabcx", &[2, 3]), "x_x");
    }

    #[test]
    fn stop_detector_cuts_at_the_match_end() {
        let (regex, max_len) = compile_bounded("END").unwrap();
        let mut stop = StopDetector::new(regex, max_len);
        assert_eq!(stop.push("abc E"), None);
        assert_eq!(stop.push("NDxyz"), Some(2));
    }

    proptest! {
        #[test]
        fn any_chunking_matches_the_whole_text(
            input in "[a-e0-9 é\\-]{0,60}",
            cuts in proptest::collection::vec(0usize..80, 0..12),
            pattern_index in 0usize..5,
        ) {
            let patterns: [(&str, bool, Replacement); 5] = [
                ("abc", false, text("[x]")),
                ("a-b", false, Replacement::Mask('*')),
                (r"\d{2,4}", true, text("<$0>")),
                (r"\bd[a-e]*e\b", true, Replacement::Mask('#')),
                ("b+c|e", true, text("")),
            ];
            let (pattern, is_regex, replacement) = patterns[pattern_index].clone();
            let r = redactor(pattern, is_regex, replacement);
            let whole = r.redact_all(&input).0;
            let expected = r.regex.replace_all(&input, |caps: &regex::Captures<'_>| {
                let mut out = String::new();
                r.replace_into(caps, &mut out);
                out
            }).into_owned();
            prop_assert_eq!(&whole, &expected);
            prop_assert_eq!(chunked(&r, &input, &cuts), whole);
        }
    }
}
