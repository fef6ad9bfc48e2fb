//! A parsed `/metrics` scrape (Prometheus text format), with the label
//! order of a series not mattering.

use std::collections::HashMap;

// ---------------------------------------------------------------------------
// Metrics

/// A `/metrics` scrape: series (name and labels, labels sorted) → value, and
/// the `# HELP` / `# TYPE` lines by family.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub series: HashMap<String, f64>,
    pub help: HashMap<String, String>,
    pub types: HashMap<String, String>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                metrics.help.insert(name.to_owned(), help.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
                metrics
                    .types
                    .insert(name.to_owned(), kind.trim().to_owned());
            } else if !line.is_empty() && !line.starts_with('#') {
                let Some((series, value)) = split_sample(line) else {
                    continue;
                };
                let Ok(value) = value.parse::<f64>() else {
                    continue;
                };
                metrics.series.insert(normalise_series(series), value);
            }
        }
        metrics
    }

    /// The value of `name{labels}` (label order does not matter).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.series.get(&series_key(name, labels)).copied()
    }

    /// The value of `name{labels}`, 0 when the series is absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Sum over every series of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        self.series
            .iter()
            .filter(|(series, _)| {
                let (series_name, series_labels) = split_labels(series);
                series_name == name && wanted.iter().all(|w| series_labels.contains(w))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Every series (normalised) of family `name`.
    pub fn series_of(&self, name: &str) -> Vec<(&str, f64)> {
        let mut found: Vec<(&str, f64)> = self
            .series
            .iter()
            .filter(|(series, _)| split_labels(series).0 == name)
            .map(|(series, value)| (series.as_str(), *value))
            .collect();
        found.sort_by(|a, b| a.0.cmp(b.0));
        found
    }
}

/// `name{a="1",b="2"} 3` → (`name{a="1",b="2"}`, `3`); a timestamp after the
/// value is ignored.
fn split_sample(line: &str) -> Option<(&str, &str)> {
    let series_end = match line.find('{') {
        Some(open) => {
            let close = closing_brace(line, open)?;
            close + 1
        }
        None => line.find(' ')?,
    };
    let (series, rest) = line.split_at(series_end);
    let value = rest.split_whitespace().next()?;
    Some((series, value))
}

fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (at, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(open + at),
            _ => {}
        }
    }
    None
}

/// (`name`, [`k="v"`, …]) of a series.
fn split_labels(series: &str) -> (&str, Vec<String>) {
    let Some(open) = series.find('{') else {
        return (series, Vec::new());
    };
    let name = &series[..open];
    let inner = &series[open + 1..series.len() - 1];
    let mut labels = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in inner.chars() {
        match c {
            _ if escaped => {
                escaped = false;
                current.push(c);
            }
            '\\' if in_quotes => {
                escaped = true;
                current.push(c);
            }
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            ',' if !in_quotes => {
                if !current.trim().is_empty() {
                    labels.push(current.trim().to_owned());
                }
                current.clear();
            }
            _ => current.push(c),
        }
    }
    if !current.trim().is_empty() {
        labels.push(current.trim().to_owned());
    }
    (name, labels)
}

fn normalise_series(series: &str) -> String {
    let (name, mut labels) = split_labels(series);
    if labels.is_empty() {
        return name.to_owned();
    }
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// A metric family as `docs/observability.md` documents it.
#[derive(Clone, Debug)]
pub struct DocumentedFamily {
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: String,
    /// The family has no labels.
    pub unlabelled: bool,
}

/// The families of the table under `heading` (`"### Archiver metrics"`,
/// `"### Proxy metrics"`) in `docs/observability.md`, so that a test of
/// what is exported checks what the contract says, not a copy of it.
pub fn documented_families(heading: &str) -> Vec<DocumentedFamily> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/observability.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    let (_, section) = text
        .split_once(&format!("{heading}\n"))
        .unwrap_or_else(|| panic!("no {heading:?} in {}", path.display()));
    let section = section.split("\n### ").next().unwrap_or_default();
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            DocumentedFamily {
                name: cells[1].trim_matches('`').to_owned(),
                kind: cells[2].to_owned(),
                unlabelled: cells[3].is_empty(),
            }
        })
        .collect()
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    parts.sort();
    format!("{name}{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_normalise_labels() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
                    a_total{outcome=\"ok\",format=\"tar\"} 3\nb 1.5\nc{x=\"a,}b\"} 2 1700000000\n";
        let metrics = Metrics::parse(text);
        assert_eq!(
            metrics.get("a_total", &[("format", "tar"), ("outcome", "ok")]),
            Some(3.0)
        );
        assert_eq!(metrics.get("b", &[]), Some(1.5));
        assert_eq!(metrics.get("c", &[("x", "a,}b")]), Some(2.0));
        assert_eq!(metrics.sum("a_total", &[("format", "tar")]), 3.0);
        assert_eq!(metrics.types["a_total"], "counter");
        assert_eq!(metrics.help["a_total"], "Things.");
    }
}
