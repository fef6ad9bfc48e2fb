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

/// The rows of the flags tables in `markdown`: each row whose first cell
/// is a flag, by long name, with its cells.
pub fn documented_flags(markdown: &str) -> Vec<(String, Vec<String>)> {
    markdown
        .lines()
        .filter(|line| line.starts_with("| `--"))
        .map(|line| {
            let cells: Vec<String> = line
                .trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_owned())
                .collect();
            let name = cells[0]
                .trim_start_matches("`--")
                .split([' ', '`'])
                .next()
                .unwrap_or_default()
                .to_owned();
            (name, cells)
        })
        .collect()
}

/// The part of `markdown` from the line `heading` to the next heading of
/// its level.
pub fn section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let start = markdown
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    let rest = &markdown[start + heading.len() + 2..];
    let level = heading.split(' ').next().unwrap_or_default();
    let end = rest.find(&format!("\n{level} ")).unwrap_or(rest.len());
    &rest[..end]
}

/// Checks `command`'s flags against `table` (cells: flag, environment,
/// default, …) and `short` (cells: flag, default, …; may leave flags
/// out), naming `what` in each problem: what does not agree, empty when all does.
/// Flags in `skip` are another table's.
pub fn check_flags(
    command: &clap::Command,
    table: &[(String, Vec<String>)],
    short: &[(String, Vec<String>)],
    skip: &[String],
    what: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut names = Vec::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") || skip.iter().any(|name| name == long) {
            continue;
        }
        names.push(long.to_owned());
        let rows: Vec<_> = table.iter().filter(|(name, _)| name == long).collect();
        let [(_, cells)] = rows.as_slice() else {
            problems.push(format!("{what} --{long}: {} rows", rows.len()));
            continue;
        };
        let env = arg
            .get_env()
            .map(|env| format!("`{}`", env.to_string_lossy()));
        if Some(&cells[1]) != env.as_ref() {
            problems.push(format!(
                "{what} --{long}: docs say {}, clap {env:?}",
                cells[1]
            ));
        }
        let mut defaults = vec![&cells[2]];
        defaults.extend(
            short
                .iter()
                .filter(|(name, row)| name == long && !row[0].contains("`, `"))
                .map(|(_, row)| &row[1]),
        );
        for default in defaults {
            match arg.get_default_values() {
                [value] => {
                    let value = format!("`{}`", value.to_string_lossy());
                    if !default.starts_with(&value) {
                        problems.push(format!("{what} --{long}: default {default}, clap {value}"));
                    }
                }
                [] if arg.is_required_set() => {
                    if default != "required" {
                        problems.push(format!(
                            "{what} --{long}: default {default}, clap: required"
                        ));
                    }
                }
                [] => {
                    if default == "required" {
                        problems.push(format!("{what} --{long}: documented as required"));
                    }
                }
                values => problems.push(format!("{what} --{long}: defaults {values:?}")),
            }
        }
    }
    for (name, _) in table.iter().chain(short) {
        if !names.contains(name) {
            problems.push(format!("{what}: --{name} is documented but is no flag"));
        }
    }
    problems
}

/// Values a row's meaning says a flag takes or refuses: (value,
/// accepted) for "at least 1", "more than 0", "N to M" and "`0`: …".
pub fn documented_bounds(meaning: &str) -> Vec<(String, bool)> {
    let mut cases = Vec::new();
    if meaning.contains("at least 1") {
        cases.extend([("0".to_owned(), false), ("1".to_owned(), true)]);
    }
    if meaning.contains("more than 0") {
        cases.extend([("0".to_owned(), false), ("0.5".to_owned(), true)]);
    }
    if meaning.contains("`0`:") || meaning.contains("`0` turns") {
        cases.push(("0".to_owned(), true));
    }
    let words: Vec<&str> = meaning.split_whitespace().collect();
    for window in words.windows(3) {
        let [low, "to", high] = window else { continue };
        let high = high.trim_end_matches(['.', ',']);
        if let (Ok(low), Ok(high)) = (low.parse::<i64>(), high.parse::<i64>()) {
            cases.extend([
                ((low - 1).to_string(), false),
                (low.to_string(), true),
                (high.to_string(), true),
                ((high + 1).to_string(), false),
            ]);
        }
    }
    cases
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
