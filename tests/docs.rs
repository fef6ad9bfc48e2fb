//! `docs/` held to the code, for the kinds of claim a reader looks up and a
//! change silently breaks:
//!
//! - every metric family both tiers export is in `docs/observability.md`
//!   with its type and labels, every family there is exported, the label
//!   values seen are in its table of label values, the histogram buckets
//!   are the ones it lists, and the series it says exist at start-up do;
//! - every link between the documents (and from the READMEs) leads to a
//!   file in the repository and, with an anchor, to a heading there; the
//!   test names and source files the documents cite exist; the documents
//!   need nothing outside the repository;
//! - the module lists of `docs/architecture.md` are the crates' modules.
//!
//! The flags tables are held to clap in `archiver/src/config.rs` and
//! `proxy/src/config.rs`, the request log's table in `core/src/log.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gitball_e2e::metrics::Metrics;
use gitball_e2e::proxy::{Cluster, fetch, fetch_ok, small_repository};
use gitball_e2e::{Sandbox, wait_until};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path))
        .unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The part of `markdown` from the line `heading` to the next heading of
/// its level or above.
fn section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let start = markdown
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    let rest = &markdown[start + heading.len() + 2..];
    let level = heading.split(' ').next().unwrap_or_default().len();
    let end = rest
        .match_indices("\n#")
        .find(|(at, _)| {
            let hashes = rest[at + 1..].chars().take_while(|c| *c == '#').count();
            hashes <= level && rest[at + 1 + hashes..].starts_with(' ')
        })
        .map_or(rest.len(), |(at, _)| at);
    &rest[..end]
}

/// The cells of the table rows in `text` whose first cell starts with
/// `` `{prefix} `` (cut at every `|`: the first cells hold none).
fn rows<'a>(text: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    text.lines()
        .filter(|line| line.starts_with(&format!("| `{prefix}")))
        .map(|line| line.trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

/// The backticked words of `text`.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

// ---------------------------------------------------------------------------
// Metrics

/// A documented family: its type and labels.
#[derive(Debug)]
struct Documented {
    kind: String,
    labels: BTreeSet<String>,
}

fn documented_families(observability: &str) -> BTreeMap<String, Documented> {
    rows(observability, "gitball_")
        .into_iter()
        .map(|cells| {
            let name = cells[0].trim_matches('`').to_owned();
            let labels = backticked(cells[2])
                .into_iter()
                .map(str::to_owned)
                .collect();
            (
                name,
                Documented {
                    kind: cells[1].to_owned(),
                    labels,
                },
            )
        })
        .collect()
}

/// A series key of [`Metrics`] (`name{k="v",…}`) as its name and labels.
fn name_and_labels(series: &str) -> (&str, Vec<(String, String)>) {
    let Some(open) = series.find('{') else {
        return (series, Vec::new());
    };
    let mut labels = Vec::new();
    let mut rest = &series[open + 1..series.len() - 1];
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((at, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '"' => {
                    end = at + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), value));
        rest = &after[end..];
    }
    (&series[..open], labels)
}

/// The family a sample belongs to (a histogram's `_bucket`, `_sum` and
/// `_count` samples belong to the histogram).
fn family_of<'a>(sample: &'a str, metrics: &Metrics) -> &'a str {
    if metrics.types.contains_key(sample) {
        return sample;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix)
            && metrics
                .types
                .get(base)
                .is_some_and(|kind| kind == "histogram")
        {
            return base;
        }
    }
    sample
}

/// Each family of `metrics` with the label names and values its samples
/// carry (`le` left out).
fn exported(metrics: &Metrics) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut families: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for name in metrics.types.keys() {
        families.entry(name.clone()).or_default();
    }
    for series in metrics.series.keys() {
        let (sample, labels) = name_and_labels(series);
        let family = families
            .entry(family_of(sample, metrics).to_owned())
            .or_default();
        for (key, value) in labels {
            if key != "le" {
                family.entry(key).or_default().insert(value);
            }
        }
    }
    families
}

/// The label names of each sample of `family`, as sets.
fn label_sets(metrics: &Metrics, family: &str) -> BTreeSet<BTreeSet<String>> {
    metrics
        .series
        .keys()
        .filter_map(|series| {
            let (sample, labels) = name_and_labels(series);
            (family_of(sample, metrics) == family).then(|| {
                labels
                    .into_iter()
                    .map(|(key, _)| key)
                    .filter(|key| key != "le")
                    .collect()
            })
        })
        .collect()
}

/// Checks the scrapes of one tier (`prefix`) against the docs.
fn check_scrape(
    problems: &mut Vec<String>,
    what: &str,
    metrics: &Metrics,
    documented: &BTreeMap<String, Documented>,
    process: &BTreeSet<String>,
    label_values: &[Vec<&str>],
) {
    for (family, labels) in exported(metrics) {
        // "Every family has `# HELP` and `# TYPE` lines."
        if !metrics.help.contains_key(&family) || !metrics.types.contains_key(&family) {
            problems.push(format!("{what}: {family} lacks its # HELP or # TYPE line"));
        }
        if family.starts_with("process_") {
            if !process.contains(&family) {
                problems.push(format!("{what}: {family} is not in Process metrics"));
            }
            continue;
        }
        let Some(docs) = documented.get(&family) else {
            problems.push(format!("{what}: {family} is exported but not documented"));
            continue;
        };
        let kind = metrics.types.get(&family).map_or("", String::as_str);
        if kind != docs.kind {
            problems.push(format!(
                "{what}: {family} is a {kind}, documented as {}",
                docs.kind
            ));
        }
        for set in label_sets(metrics, &family) {
            if set != docs.labels {
                problems.push(format!(
                    "{what}: {family} has labels {set:?}, documented {:?}",
                    docs.labels
                ));
            }
        }
        let short = family
            .trim_start_matches("gitball_archiver_")
            .trim_start_matches("gitball_proxy_");
        for (label, values) in labels {
            if matches!(label.as_str(), "code" | "upstream") {
                continue;
            }
            let candidates: Vec<&Vec<&str>> = label_values
                .iter()
                .filter(|row| row[0].starts_with(&format!("`{label}`")))
                .collect();
            let row = match candidates.as_slice() {
                [one] => Some(*one),
                several => several
                    .iter()
                    .find(|row| row[0].contains(&format!("`{short}`")))
                    .copied(),
            };
            let Some(row) = row else {
                problems.push(format!(
                    "{what}: no Label values row for {label} on {family}"
                ));
                continue;
            };
            for value in values {
                if !row[1].contains(&format!("`{value}`")) {
                    problems.push(format!(
                        "{what}: {family}{{{label}=\"{value}\"}} is not in Label values"
                    ));
                }
            }
        }
    }
}

/// Families that exist at start-up with labels must be the ones
/// `docs/observability.md`'s "Series at start-up" names, every
/// unlabelled family of the tier must exist, and every counter reads 0.
fn check_start_up(
    problems: &mut Vec<String>,
    what: &str,
    prefix: &str,
    metrics: &Metrics,
    documented: &BTreeMap<String, Documented>,
    start_up: &str,
) {
    let families = exported(metrics);
    for (family, labels) in &families {
        if labels.is_empty() || !family.starts_with("gitball_") {
            continue;
        }
        let wildcard = family
            .replacen("gitball_archiver_", "gitball_*_", 1)
            .replacen("gitball_proxy_", "gitball_*_", 1);
        let named = backticked(start_up).iter().any(|word| {
            word.split('{').next() == Some(family) || word.split('{').next() == Some(&wildcard)
        });
        if !named {
            problems.push(format!(
                "{what}: {family} has labelled series at start-up, which Series at start-up does not name"
            ));
        }
    }
    for (series, value) in &metrics.series {
        let (sample, _) = name_and_labels(series);
        let family = family_of(sample, metrics);
        if family.starts_with(prefix)
            && metrics.types.get(family).map(String::as_str) == Some("counter")
            && *value != 0.0
        {
            problems.push(format!("{what}: {series} is {value} at start-up"));
        }
    }
    for (family, docs) in documented {
        if family.starts_with(prefix) && docs.labels.is_empty() && !families.contains_key(family) {
            problems.push(format!("{what}: unlabelled {family} is absent at start-up"));
        }
    }
}

/// Series at start-up's rule, the half traffic can refute: every counter
/// and histogram series the traffic made existed at start-up, but an
/// upstream's attempts of an outcome other than `too_many_connections`.
/// (A first event of a series born with it is no `increase()`: before the
/// rule, a first `404` or `416` after a start went uncounted, and a
/// format's `generation_duration_seconds` was no data until its first
/// generation.)
fn check_no_counter_series_since_start_up(
    problems: &mut Vec<String>,
    what: &str,
    start: &Metrics,
    now: &Metrics,
) {
    for series in now.series.keys() {
        let (sample, labels) = name_and_labels(series);
        let family = family_of(sample, now);
        if labels.is_empty()
            || !matches!(
                now.types.get(family).map(String::as_str),
                Some("counter" | "histogram")
            )
            || family == "gitball_proxy_upstream_attempts_total"
            || start.series.contains_key(series)
        {
            continue;
        }
        problems.push(format!(
            "{what}: {series} appeared with traffic, not at start-up"
        ));
    }
}

/// Every family `/metrics` exports is in `docs/observability.md` with its
/// type and labels, and every family there is exported once traffic made
/// its labelled series; the label values seen are in its Label values
/// table, the buckets are the ones it lists, and Series at start-up names
/// the labelled series made at start. (Docs review: the start-up list said
/// "four exceptions" while the proxy made `resumes_total` and
/// `splices_total` at 0 too; nothing compared the tables with a scrape.)
#[test]
fn every_metric_family_is_documented_with_its_type_labels_and_values() {
    let observability = read("docs/observability.md");
    let documented = documented_families(&observability);
    let process: BTreeSet<String> = backticked(section(&observability, "### Process metrics"))
        .into_iter()
        .filter(|word| word.starts_with("process_") && !word.contains(' '))
        .map(str::to_owned)
        .collect();
    let label_values = rows(section(&observability, "### Label values"), "");
    let start_up = section(&observability, "### Series at start-up");

    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    let commit = small_repository(&repo).second;
    let cluster = Cluster::start(&sandbox.repos(), &sandbox.repos(), 1, &[]);
    let mut problems = Vec::new();
    let proxy = cluster.proxy.scrape();
    let archiver = cluster.primary.metrics();
    check_start_up(
        &mut problems,
        "proxy",
        "gitball_proxy_",
        &proxy,
        &documented,
        start_up,
    );
    check_start_up(
        &mut problems,
        "archiver",
        "gitball_archiver_",
        &archiver,
        &documented,
        start_up,
    );

    // Traffic that makes every labelled family appear: each format missed
    // and hit, a conditional request, a bad format, an unknown repository,
    // a routes reload.
    for ext in ["tar", "tar.gz", "zip", "tar.zst"] {
        for _ in 0..2 {
            fetch_ok(
                cluster.proxy.addr,
                &format!("/acme/widget/archive/{commit}.{ext}"),
            );
        }
    }
    let _ = fetch(cluster.proxy.addr, "/acme/widget/archive/main.rar");
    let _ = fetch(cluster.proxy.addr, "/acme/nothing/archive/main.tar");
    cluster.proxy.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || {
            cluster
                .proxy
                .scrape()
                .value("gitball_proxy_routes_reloads_total", &[("outcome", "ok")])
                >= 1.0
        }),
        "the reload is counted"
    );

    let mut exported_names = BTreeSet::new();
    for (what, service) in std::iter::once(("proxy", &*cluster.proxy))
        .chain(cluster.archivers().into_iter().map(|a| ("archiver", &**a)))
    {
        let metrics = Metrics::parse(&service.metrics_text());
        check_scrape(
            &mut problems,
            what,
            &metrics,
            &documented,
            &process,
            &label_values,
        );
        let start = if what == "proxy" { &proxy } else { &archiver };
        check_no_counter_series_since_start_up(&mut problems, what, start, &metrics);
        exported_names.extend(metrics.types.keys().cloned());
    }
    for family in documented.keys().chain(&process) {
        if !exported_names.contains(family) {
            problems.push(format!("{family} is documented but no tier exports it"));
        }
    }

    // The one bucket list.
    let scraping = section(&observability, "### Scraping");
    let listed: Vec<f64> = scraping
        .split("in seconds:")
        .nth(1)
        .expect("the bucket list")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter_map(|word| word.trim_end_matches('.').parse().ok())
        .collect();
    let metrics = cluster.primary.metrics();
    let mut buckets: Vec<f64> = metrics
        .series
        .keys()
        .filter_map(|series| {
            let (sample, labels) = name_and_labels(series);
            (sample == "gitball_archiver_request_duration_seconds_bucket")
                .then(|| {
                    labels
                        .into_iter()
                        .find(|(key, _)| key == "le")?
                        .1
                        .parse()
                        .ok()
                })
                .flatten()
        })
        .filter(|le: &f64| le.is_finite())
        .collect();
    buckets.sort_by(f64::total_cmp);
    if buckets != listed {
        problems.push(format!("buckets {buckets:?}, documented {listed:?}"));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------
// Links, cited tests and files

/// The documents a reader of the contract follows links through.
fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut found = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    for dir in ["docs", "ops"] {
        let mut stack = vec![root.join(dir)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read a dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|ext| ext == "md") {
                    found.push(path);
                }
            }
        }
    }
    found.sort();
    found
}

/// `markdown` without its fenced code blocks.
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The anchors GitHub makes of `markdown`'s headings.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for line in prose(markdown).lines() {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let slug: String = line[hashes..]
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let count = seen.entry(slug.clone()).or_default();
        anchors.insert(if *count == 0 {
            slug.clone()
        } else {
            format!("{slug}-{count}")
        });
        *count += 1;
    }
    anchors
}

/// The targets of `markdown`'s inline links (`[text](target)`).
fn link_targets(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    text.match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            let end = rest.find(')')?;
            Some(rest[..end].to_owned())
        })
        .filter(|target| !target.contains(' '))
        .collect()
}

/// Every function and constant name in the workspace's Rust sources.
fn function_names() -> BTreeSet<String> {
    let root = repo_root();
    let mut names = BTreeSet::new();
    let mut stack: Vec<PathBuf> = ["core", "archiver", "proxy", "tests"]
        .iter()
        .map(|dir| root.join(dir))
        .collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path).expect("read a source file");
                for keyword in ["fn ", "const "] {
                    for (at, _) in text.match_indices(keyword) {
                        let name: String = text[at + keyword.len()..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        names.insert(name);
                    }
                }
            }
        }
    }
    names
}

/// Links between the documents lead to files in the repository and to
/// headings that exist; the tests and source files they cite exist; they
/// send no reader outside the repository; and docs/README.md links every
/// document of docs/. (Docs review: a renamed
/// heading or test left its citations dangling with nothing to notice.)
#[test]
fn links_and_cited_tests_and_files_resolve_within_the_repository() {
    let root = repo_root().canonicalize().expect("the root");
    let functions = function_names();
    let mut problems = Vec::new();
    for document in documents() {
        let name = document
            .strip_prefix(&root)
            .unwrap_or(&document)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&document).expect("read a document");
        for target in link_targets(&text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file = if path.is_empty() {
                document.clone()
            } else {
                document.parent().expect("a dir").join(path)
            };
            let Ok(file) = file.canonicalize() else {
                problems.push(format!("{name}: link to {target}: no such file"));
                continue;
            };
            if !file.starts_with(&root) {
                problems.push(format!("{name}: link to {target} leaves the repository"));
                continue;
            }
            if !anchor.is_empty() {
                let markdown = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&markdown).contains(anchor) {
                    problems.push(format!("{name}: link to {target}: no such heading"));
                }
            }
        }
        for word in backticked(&prose(&text)) {
            // A test or function cited by name (`module::tests::name` or
            // `name`): snake case with at least three underscores, not a
            // metric family.
            // `overload.rs::name` cites a test by its file too.
            let cited = word.split_once(".rs::").map_or(word, |(_, name)| name);
            let last = cited.rsplit("::").next().unwrap_or(cited);
            let is_name = cited
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == ':')
                && last.matches('_').count() >= 3
                && !last.starts_with('_')
                && !last.starts_with("gitball_")
                && !last.starts_with("process_")
                && !last.ends_with("_total");
            if is_name && !functions.contains(last) && !is_kernel_symbol(last) {
                problems.push(format!("{name}: cites `{word}`, which no function is"));
            }
            // A constant cited by its module (`generate::MAX_WIDE_GIT_PIPES`).
            let is_constant = word.contains("::")
                && last.len() > 1
                && last
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if is_constant && !functions.contains(last) {
                problems.push(format!("{name}: cites `{word}`, which no constant is"));
            }
            // A source file of the repository, by its path.
            let is_path = word.contains('/')
                && [".rs", ".py", ".sh", ".yml", ".json", ".toml", ".conf"]
                    .iter()
                    .any(|ext| word.ends_with(ext))
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c))
                && !word.starts_with('/');
            if is_path {
                let candidates = [
                    root.join(word),
                    document.parent().expect("a dir").join(word),
                    root.join("core/src").join(word),
                    root.join("archiver/src").join(word),
                    root.join("proxy/src").join(word),
                ];
                if !candidates.iter().any(|path| path.exists()) {
                    problems.push(format!("{name}: cites {word}, which is no file"));
                }
            }
        }
        for outside in ["SPEC.md", "NOTES.md", "STYLE.md", "../shared"] {
            if text.contains(outside) {
                problems.push(format!(
                    "{name}: refers to {outside}, outside the repository"
                ));
            }
        }
    }
    // The index names every document of the contract.
    let index = read("docs/README.md");
    for entry in std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") && name != "README.md" && !index.contains(&format!("]({name})")) {
            problems.push(format!("docs/README.md does not link {name}"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Kernel functions BENCHMARKS.md names in its profiles.
fn is_kernel_symbol(name: &str) -> bool {
    matches!(name, "shmem_file_read_iter")
}

// ---------------------------------------------------------------------------
// Architecture

/// The module names declared in `lib` (a crate's `lib.rs`).
fn modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|line| {
            let line = line.trim();
            line.strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("mod "))?
                .strip_suffix(';')
                .map(str::to_owned)
        })
        .filter(|name| name != "test_support" && name != "tests")
        .collect()
}

/// `docs/architecture.md` lists each crate's modules, no more and no
/// fewer: the archiver's and the proxy's in their "Modules" paragraphs,
/// the core's in its table.
#[test]
fn the_architecture_names_every_module() {
    let architecture = read("docs/architecture.md");
    let mut problems = Vec::new();
    for (crate_dir, heading) in [("archiver", "## Archiver"), ("proxy", "## Proxy")] {
        let text = section(&architecture, heading);
        let paragraph = &text[..text.find("\n\n1.").unwrap_or(text.len())];
        let listed: BTreeSet<String> = backticked(paragraph)
            .into_iter()
            .filter(|word| word.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .map(str::to_owned)
            .collect();
        let declared = modules(&read(&format!("{crate_dir}/src/lib.rs")));
        for module in declared.difference(&listed) {
            problems.push(format!("{heading}: module {module} is not listed"));
        }
        for module in listed.difference(&declared) {
            problems.push(format!("{heading}: lists {module}, which is no module"));
        }
    }
    let core_listed: BTreeSet<String> =
        rows(section(&architecture, "## Shared crate"), "gitball_core::")
            .into_iter()
            .map(|cells| {
                cells[0]
                    .trim_matches('`')
                    .trim_start_matches("gitball_core::")
                    .to_owned()
            })
            .collect();
    let core_declared = modules(&read("core/src/lib.rs"));
    if core_listed != core_declared {
        problems.push(format!(
            "## Shared crate lists {core_listed:?}, core declares {core_declared:?}"
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Every `GITBALL_…` variable the documents and env files name is one a
/// binary reads: a flag's, from the flags tables of `docs/archiver.md` and
/// `docs/proxy.md` (which the config modules' tests hold to clap), or one
/// of the scripts' own. (Docs review: the ops README's tables of variables
/// were held to nothing.)
#[test]
fn every_environment_variable_named_is_read() {
    let mut read: BTreeSet<String> = ["docs/archiver.md", "docs/proxy.md"]
        .iter()
        .flat_map(|path| {
            rows(&read(path), "--")
                .into_iter()
                .filter_map(|cells| Some(cells.get(1)?.trim_matches('`').to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    // The prewarm hook's and the benchmark's own, and the README's example.
    read.extend(
        [
            "GITBALL_PREWARM_URL",
            "GITBALL_REPOSITORY",
            "GITBALL_BENCH_REAL_REPO",
            "GITBALL_FOO_BAR",
        ]
        .map(str::to_owned),
    );
    let root = repo_root();
    let mut files = documents();
    for entry in std::fs::read_dir(root.join("ops/systemd"))
        .expect("ops/systemd")
        .flatten()
    {
        if entry.path().extension().is_some_and(|ext| ext == "env") {
            files.push(entry.path());
        }
    }
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a document");
        for (at, _) in text.match_indices("GITBALL_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let name = name.trim_end_matches('_');
            // `GITBALL_<FLAG>`, the rule rather than a variable.
            if name != "GITBALL" && !read.contains(name) {
                problems.push(format!("{}: {name} is read by nothing", file.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The tree at the top of `ops/README.md` names every entry of `ops/`.
/// (Docs review: it had left out `hooks/` and `bench/`.)
#[test]
fn the_ops_readme_tree_names_every_entry_of_ops() {
    let readme = read("ops/README.md");
    let tree = readme
        .split("```\nops/\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the tree of ops/");
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("ops"))
        .expect("ops/")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "README.md" {
            continue;
        }
        let shown = if entry.path().is_dir() {
            format!(" {name}/ ")
        } else {
            format!(" {name} ")
        };
        if !tree.contains(&shown) {
            problems.push(name);
        }
    }
    assert!(
        problems.is_empty(),
        "not in the tree of ops/README.md: {problems:?}"
    );
}
