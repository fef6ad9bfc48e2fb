//! What the crates' unit tests use to hold `docs/` to the code: each figure
//! the contract quotes (a size, a timeout, a count) is built from the
//! constant it comes from and looked for in the document, so a figure
//! changed on one side only fails a test.

/// `text` with every run of whitespace made one space: a phrase is found
/// however the document wraps it.
pub fn prose(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `n` as the documents write a count: `262,144`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (at, digit) in digits.chars().enumerate() {
        if at > 0 && (digits.len() - at).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Panics, naming `name` and every phrase of `figures` it lacks, unless
/// `document` says each of them (whitespace compared as [`prose`] does).
#[track_caller]
pub fn assert_says<I, S>(document: &str, name: &str, figures: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let text = prose(document);
    let missing: Vec<String> = figures
        .into_iter()
        .map(|figure| prose(figure.as_ref()))
        .filter(|figure| !text.contains(figure.as_str()))
        .collect();
    assert!(missing.is_empty(), "{name} does not say {missing:#?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phrase_is_found_across_line_breaks_and_a_missing_one_is_named() {
        let document = "at most 64\n  downloads are\tspliced";
        assert_says(document, "doc.md", ["at most 64 downloads are spliced"]);
        let missing = std::panic::catch_unwind(|| {
            assert_says(document, "doc.md", ["at most 32 downloads"]);
        })
        .expect_err("a phrase the document lacks");
        let message = missing.downcast_ref::<String>().expect("a message");
        assert!(message.contains("doc.md") && message.contains("at most 32 downloads"));
    }

    #[test]
    fn counts_are_written_with_a_comma_between_thousands() {
        assert_eq!(thousands(64), "64");
        assert_eq!(thousands(1_024), "1,024");
        assert_eq!(thousands(262_144), "262,144");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
