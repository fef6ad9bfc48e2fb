//! The archive URL grammar (`docs/urls.md`), in one place for both tiers.
//!
//! Two shapes name the same archive:
//!
//! ```text
//! /{owner}/{repo}/archive/{ref}.{ext}[.sha256]   github.com style
//! /{owner}/{repo}/{ext}/{ref}                    codeload style
//! ```
//!
//! Parsing is strict on purpose: whatever passes here is later looked up in a
//! repository, so every string that survives is already free of control
//! bytes, option-like prefixes (`-`), `..` and git's revision syntax
//! (`~ ^ : @{`). The ref still never reaches a command line: the resolver
//! turns it into a commit id first (see `repo`).

use std::fmt;

use http::StatusCode;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::protocol::code;

/// Longest accepted ref, in bytes. Git itself allows more, but no real
/// branch or tag is this long and the bound keeps log lines and labels sane.
pub const MAX_REF_BYTES: usize = 255;

/// Longest accepted `?path=` subtree, in bytes.
pub const MAX_SUBTREE_BYTES: usize = 1024;

/// An archive format, as named by a URL extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Tar,
    TarGz,
    TarZst,
    Zip,
}

impl Format {
    /// Every format, in the order of the table in `docs/urls.md`.
    pub const ALL: [Format; 4] = [Format::TarGz, Format::TarZst, Format::Zip, Format::Tar];

    /// Parses a URL extension; `tgz` is an alias of `tar.gz`.
    pub fn from_ext(ext: &str) -> Option<Format> {
        match ext {
            "tar" => Some(Format::Tar),
            "tar.gz" | "tgz" => Some(Format::TarGz),
            "tar.zst" => Some(Format::TarZst),
            "zip" => Some(Format::Zip),
            _ => None,
        }
    }

    /// The canonical extension (what file names and canonical URLs use).
    pub fn ext(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::TarGz => "tar.gz",
            Format::TarZst => "tar.zst",
            Format::Zip => "zip",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Tar => "application/x-tar",
            Format::TarGz => "application/gzip",
            Format::TarZst => "application/zstd",
            Format::Zip => "application/zip",
        }
    }

    /// The `--format` git is asked for: always its plain tar; compressed
    /// tars and the zip are made from it in-process (see the archiver's
    /// `generate` and `zip` for why).
    pub fn git_format(self) -> &'static str {
        "tar"
    }

    /// The label used in metrics.
    pub fn metric_label(self) -> &'static str {
        self.ext()
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ext())
    }
}

/// What a URL asks for, before anything is looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveRequest {
    pub owner: String,
    pub repo: String,
    /// The ref exactly as the user wrote it (percent-decoded, validated).
    pub reference: String,
    pub format: Format,
    /// `…/archive/{ref}.{ext}.sha256`: the checksum line instead of the archive.
    pub checksum: bool,
}

/// Why a URL or query was rejected. Each maps to `400` (or `404` for a path
/// that is no archive URL at all).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("no such route")]
    NotAnArchiveUrl,
    #[error(
        "owner and repository names are 1 to 100 characters of A-Z a-z 0-9 _ . - and do not start with '.'"
    )]
    BadName,
    #[error("unknown archive format; use tar.gz, tgz, zip, tar or tar.zst")]
    BadFormat,
    #[error("invalid ref: {0}")]
    BadRef(&'static str),
    #[error("invalid path: {0}")]
    BadSubtree(&'static str),
    #[error("invalid percent-encoding or non-UTF-8 in URL")]
    BadEncoding,
}

impl UrlError {
    /// The JSON `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            UrlError::NotAnArchiveUrl => code::NOT_FOUND,
            UrlError::BadName => code::BAD_NAME,
            UrlError::BadFormat => code::BAD_FORMAT,
            UrlError::BadRef(_) => code::BAD_REF,
            UrlError::BadSubtree(_) => code::BAD_PATH,
            UrlError::BadEncoding => code::BAD_URL,
        }
    }

    /// `404` for a path that is no archive URL at all, else `400`.
    pub fn status(&self) -> StatusCode {
        match self {
            UrlError::NotAnArchiveUrl => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Parses an archive URL path (still percent-encoded, as in the request line).
pub fn parse_path(path: &str) -> Result<ArchiveRequest, UrlError> {
    let rest = path.strip_prefix('/').ok_or(UrlError::NotAnArchiveUrl)?;
    let (owner, repo, kind, tail) = four_segments(rest).ok_or(UrlError::NotAnArchiveUrl)?;
    validate_name(owner)?;
    validate_name(repo)?;
    let mut tail = percent_decode(tail)?;

    let (reference, format, checksum) = if kind == "archive" {
        let (stem, checksum) = match tail.strip_suffix(".sha256") {
            Some(stem) => (stem, true),
            None => (tail.as_str(), false),
        };
        let (reference, format) = split_extension(stem).ok_or(UrlError::BadFormat)?;
        // The ref is the decoded tail's start: cut in place, not copied.
        tail.truncate(reference.len());
        (tail, format, checksum)
    } else {
        let format = Format::from_ext(kind).ok_or(UrlError::NotAnArchiveUrl)?;
        (tail, format, false)
    };
    validate_ref(&reference)?;
    Ok(ArchiveRequest {
        owner: owner.to_owned(),
        repo: repo.to_owned(),
        reference,
        format,
        checksum,
    })
}

/// `rest` cut at its first three `/`, as `rest.splitn(4, '/')` cuts it
/// when it has them all, by a plain byte search (`splitn`'s searcher cost
/// a request more than the rest of the parse); `None` with fewer.
fn four_segments(rest: &str) -> Option<(&str, &str, &str, &str)> {
    fn cut(text: &str) -> Option<(&str, &str)> {
        let at = text.bytes().position(|byte| byte == b'/')?;
        Some((&text[..at], &text[at + 1..]))
    }
    let (owner, rest) = cut(rest)?;
    let (repo, rest) = cut(rest)?;
    let (kind, tail) = cut(rest)?;
    Some((owner, repo, kind, tail))
}

/// What a prewarm URL names: `/{owner}/{repo}/prewarm/{ref}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrewarmRequest {
    pub owner: String,
    pub repo: String,
    /// The ref exactly as written (percent-decoded, validated).
    pub reference: String,
}

impl PrewarmRequest {
    /// The canonical archive URL of one format of this ref.
    pub fn archive(&self, format: Format) -> ArchiveRequest {
        ArchiveRequest {
            owner: self.owner.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            format,
            checksum: false,
        }
    }

    /// The canonical prewarm path, what the proxy asks the archiver.
    pub fn canonical_path(&self) -> String {
        format!("/{}/{}/prewarm/{}", self.owner, self.repo, self.reference)
    }
}

/// Whether `path` is under a prewarm URL (`/{owner}/{repo}/prewarm/…`),
/// whatever the rest says: such a path is never an archive URL (`prewarm`
/// is no format), so the tiers send it to their prewarm handler, which
/// validates it with [`parse_prewarm_path`].
pub fn is_prewarm_path(path: &str) -> bool {
    // The third segment follows a `/`: most paths (archive URLs) are told
    // apart by one substring search, before any splitting.
    if !path.contains("/prewarm") {
        return false;
    }
    let mut parts = path.strip_prefix('/').unwrap_or(path).splitn(4, '/');
    parts.nth(2) == Some("prewarm")
}

/// Parses a prewarm URL path (still percent-encoded).
pub fn parse_prewarm_path(path: &str) -> Result<PrewarmRequest, UrlError> {
    let rest = path.strip_prefix('/').ok_or(UrlError::NotAnArchiveUrl)?;
    let mut parts = rest.splitn(4, '/');
    let (Some(owner), Some(repo), Some("prewarm"), Some(tail)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(UrlError::NotAnArchiveUrl);
    };
    validate_name(owner)?;
    validate_name(repo)?;
    let reference = percent_decode(tail)?;
    validate_ref(&reference)?;
    Ok(PrewarmRequest {
        owner: owner.to_owned(),
        repo: repo.to_owned(),
        reference,
    })
}

/// Parses a comma-separated list of archive formats (`tar.gz,zip`), as
/// `--prewarm-formats` and the prewarm `format` query take it.
pub fn parse_formats(text: &str) -> Result<Vec<Format>, UrlError> {
    let mut formats = Vec::new();
    for ext in text.split(',').map(str::trim) {
        let format = Format::from_ext(ext).ok_or(UrlError::BadFormat)?;
        if !formats.contains(&format) {
            formats.push(format);
        }
    }
    Ok(formats)
}

/// Splits `{ref}.{ext}` at the longest known extension.
fn split_extension(stem: &str) -> Option<(&str, Format)> {
    for ext in ["tar.gz", "tar.zst", "tgz", "zip", "tar"] {
        if let Some(reference) = stem.strip_suffix(ext).and_then(|s| s.strip_suffix('.')) {
            return Format::from_ext(ext).map(|format| (reference, format));
        }
    }
    None
}

/// `owner` and `repo`: `[A-Za-z0-9_.-]{1,100}`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<(), UrlError> {
    let ok = (1..=100).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok { Ok(()) } else { Err(UrlError::BadName) }
}

/// A ref as a user may write it: git's `check-ref-format` rules, narrowed to
/// characters that are safe unquoted in a file name and a header
/// (`A-Z a-z 0-9 . _ - / + @ =`).
pub fn validate_ref(reference: &str) -> Result<(), UrlError> {
    if reference.is_empty() {
        return Err(UrlError::BadRef("empty"));
    }
    if reference.len() > MAX_REF_BYTES {
        return Err(UrlError::BadRef("longer than 255 bytes"));
    }
    if !reference.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b'+' | b'@' | b'=')
    }) {
        return Err(UrlError::BadRef(
            "only A-Z a-z 0-9 . _ - / + @ = are allowed",
        ));
    }
    if reference.starts_with('-') {
        return Err(UrlError::BadRef("starts with '-'"));
    }
    // Pairs and components by bytes: `str::contains` and `split` build a
    // searcher each, which cost a request more than the checks themselves.
    let bytes = reference.as_bytes();
    if bytes.windows(2).any(|pair| pair == b".." || pair == b"@{") || reference == "@" {
        return Err(UrlError::BadRef("contains '..' or '@{'"));
    }
    if reference.ends_with('.') || reference.ends_with('/') || reference.starts_with('/') {
        return Err(UrlError::BadRef("starts or ends with '/' or ends with '.'"));
    }
    for component in bytes.split(|&byte| byte == b'/') {
        if component.is_empty() || component[0] == b'.' || component.ends_with(b".lock") {
            return Err(UrlError::BadRef(
                "empty component, component starting with '.' or ending with '.lock'",
            ));
        }
    }
    Ok(())
}

/// Validates and normalises the `?path=` subtree (already percent-decoded):
/// a literal path inside the tree, without pathspec magic, with trailing
/// `/` removed. Empty or `/`-only input is refused: for the whole tree, omit
/// the query.
pub fn validate_subtree(path: &str) -> Result<String, UrlError> {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(UrlError::BadSubtree("empty"));
    }
    if trimmed.len() > MAX_SUBTREE_BYTES {
        return Err(UrlError::BadSubtree("longer than 1024 bytes"));
    }
    if trimmed.starts_with('/') {
        return Err(UrlError::BadSubtree("absolute"));
    }
    if trimmed.starts_with(':') {
        return Err(UrlError::BadSubtree("pathspec magic (leading ':')"));
    }
    if trimmed.chars().any(|c| c.is_control() || c == '\\') {
        return Err(UrlError::BadSubtree("control character or backslash"));
    }
    for component in trimmed.split('/') {
        if matches!(component, "" | "." | "..") {
            return Err(UrlError::BadSubtree("empty, '.' or '..' component"));
        }
    }
    Ok(trimmed.to_owned())
}

/// Decodes `%XX` escapes; the result must be UTF-8 without control bytes.
/// A `%` not followed by two hex digits is refused (`percent-encoding`
/// would pass it through as it is).
pub fn percent_decode(input: &str) -> Result<String, UrlError> {
    let bytes = input.as_bytes();
    if !bytes.contains(&b'%') {
        // Nothing to decode (most URLs): the text is the input, which is
        // UTF-8 already; only the control characters are left to refuse.
        if input.chars().any(char::is_control) {
            return Err(UrlError::BadEncoding);
        }
        return Ok(input.to_owned());
    }
    let malformed = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(UrlError::BadEncoding);
    }
    let text = percent_decode_str(input)
        .decode_utf8()
        .map_err(|_| UrlError::BadEncoding)?;
    if text.chars().any(char::is_control) {
        return Err(UrlError::BadEncoding);
    }
    Ok(text.into_owned())
}

/// Finds one query parameter and percent-decodes it (`+` is a space, as in
/// HTML forms). The last occurrence wins. `name` is never empty.
pub fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, UrlError> {
    // Most URLs have no query: nothing to split.
    let Some(query) = query else {
        return Ok(None);
    };
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            found = Some(percent_decode(&value.replace('+', " "))?);
        }
    }
    Ok(found)
}

/// What a ref turned out to be; decides the label (`docs/urls.md#naming`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefKind {
    Branch(String),
    Tag(String),
    /// A commit id, `HEAD`, or any other ref: labelled by the full commit id.
    Commit,
}

/// The `{label}` in `{repo}-{label}`: the tag with one leading `v` dropped
/// when a digit follows, the branch as it is; in both, `/` becomes `-` (a
/// `/` would nest the archive's top folder and put a path in the download
/// file name); else the full commit id.
pub fn label(kind: &RefKind, commit: &str) -> String {
    match kind {
        RefKind::Tag(tag) => match tag.strip_prefix('v') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => rest.replace('/', "-"),
            _ => tag.replace('/', "-"),
        },
        RefKind::Branch(branch) => branch.replace('/', "-"),
        RefKind::Commit => commit.to_owned(),
    }
}

/// What [`ArchiveRequest::canonical_path`] leaves unescaped in a `path`
/// query: unreserved characters and `/`. `+` is escaped, since
/// [`query_param`] reads it as a space.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

impl ArchiveRequest {
    /// The canonical URL of this archive (path and `path` query), whichever
    /// shape it was asked in: what the proxy asks the archiver for.
    pub fn canonical_path(&self, subtree: Option<&str>) -> String {
        archive_path(
            &self.owner,
            &self.repo,
            &self.reference,
            self.format,
            self.checksum,
            subtree,
        )
    }
}

/// `/{owner}/{repo}/archive/{reference}.{ext}`, `.sha256` for a `checksum`,
/// and the `path` query of a `subtree`.
fn archive_path(
    owner: &str,
    repo: &str,
    reference: &str,
    format: Format,
    checksum: bool,
    subtree: Option<&str>,
) -> String {
    // Pieces pushed one by one, not `format!` (a proxied hit's CPU).
    let ext = format.ext();
    let mut path = String::with_capacity(
        "///archive/.".len()
            + owner.len()
            + repo.len()
            + reference.len()
            + ext.len()
            + ".sha256".len(),
    );
    for piece in ["/", owner, "/", repo, "/archive/", reference, ".", ext] {
        path.push_str(piece);
    }
    if checksum {
        path.push_str(".sha256");
    }
    if let Some(subtree) = subtree {
        path.push_str("?path=");
        path.extend(utf8_percent_encode(subtree, QUERY_VALUE));
    }
    path
}

/// The immutable URL of an archive: what `Link: rel="immutable"` points at.
/// It keeps the archive's `?path=` (`subtree`): without it the link named
/// the whole tree's archive, and a client that pins the link (Nix's
/// lockable tarballs) got other contents than it had asked for.
pub fn immutable_path(
    owner: &str,
    repo: &str,
    commit: &str,
    format: Format,
    subtree: Option<&str>,
) -> String {
    archive_path(owner, repo, commit, format, false, subtree)
}

#[cfg(test)]
mod tests {

    #[test]
    fn prewarm_paths_parse_with_the_archive_rules() {
        assert!(is_prewarm_path("/acme/widget/prewarm/v1.0"));
        assert!(is_prewarm_path("/acme/widget/prewarm/../../x"));
        assert!(!is_prewarm_path("/acme/widget/archive/v1.0.zip"));
        let parsed = parse_prewarm_path("/acme/widget/prewarm/release%2F1.0").unwrap();
        assert_eq!(parsed.reference, "release/1.0");
        assert_eq!(parsed.canonical_path(), "/acme/widget/prewarm/release/1.0");
        assert_eq!(
            parsed.archive(Format::Zip).canonical_path(None),
            "/acme/widget/archive/release/1.0.zip"
        );
        assert_eq!(
            parse_prewarm_path("/acme/widget/prewarm/a..b"),
            Err(UrlError::BadRef("contains '..' or '@{'"))
        );
        assert_eq!(
            parse_prewarm_path("/.acme/widget/prewarm/v1"),
            Err(UrlError::BadName)
        );
        assert_eq!(
            parse_prewarm_path("/acme/widget/prewarm/%ff"),
            Err(UrlError::BadEncoding)
        );
        assert_eq!(
            parse_prewarm_path("/acme/widget/archive/v1"),
            Err(UrlError::NotAnArchiveUrl)
        );
    }

    /// The byte-level parse (segments cut by a byte search, a ref's pairs
    /// and components checked by bytes, no decoding without a `%`) says
    /// what the `str` searchers it replaced said, for every short input
    /// over the characters that matter to it.
    #[test]
    fn the_byte_level_parse_agrees_with_the_searchers_it_replaced() {
        fn searched_parse_path(path: &str) -> Result<ArchiveRequest, UrlError> {
            let rest = path.strip_prefix('/').ok_or(UrlError::NotAnArchiveUrl)?;
            let mut parts = rest.splitn(4, '/');
            let (Some(owner), Some(repo), Some(kind), Some(tail)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(UrlError::NotAnArchiveUrl);
            };
            validate_name(owner)?;
            validate_name(repo)?;
            let tail = decoded_percent(tail)?;
            let (reference, format, checksum) = if kind == "archive" {
                let (stem, checksum) = match tail.strip_suffix(".sha256") {
                    Some(stem) => (stem, true),
                    None => (tail.as_str(), false),
                };
                let (reference, format) = split_extension(stem).ok_or(UrlError::BadFormat)?;
                (reference.to_owned(), format, checksum)
            } else {
                let format = Format::from_ext(kind).ok_or(UrlError::NotAnArchiveUrl)?;
                (tail, format, false)
            };
            searched_validate_ref(&reference)?;
            Ok(ArchiveRequest {
                owner: owner.to_owned(),
                repo: repo.to_owned(),
                reference,
                format,
                checksum,
            })
        }
        fn searched_validate_ref(reference: &str) -> Result<(), UrlError> {
            if reference.is_empty() {
                return Err(UrlError::BadRef("empty"));
            }
            if reference.len() > MAX_REF_BYTES {
                return Err(UrlError::BadRef("longer than 255 bytes"));
            }
            if !reference.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'.' | b'_' | b'-' | b'/' | b'+' | b'@' | b'=')
            }) {
                return Err(UrlError::BadRef(
                    "only A-Z a-z 0-9 . _ - / + @ = are allowed",
                ));
            }
            if reference.starts_with('-') {
                return Err(UrlError::BadRef("starts with '-'"));
            }
            if reference.contains("..") || reference.contains("@{") || reference == "@" {
                return Err(UrlError::BadRef("contains '..' or '@{'"));
            }
            if reference.ends_with('.') || reference.ends_with('/') || reference.starts_with('/') {
                return Err(UrlError::BadRef("starts or ends with '/' or ends with '.'"));
            }
            for component in reference.split('/') {
                if component.is_empty()
                    || component.starts_with('.')
                    || component.ends_with(".lock")
                {
                    return Err(UrlError::BadRef(
                        "empty component, component starting with '.' or ending with '.lock'",
                    ));
                }
            }
            Ok(())
        }
        fn decoded_percent(input: &str) -> Result<String, UrlError> {
            let bytes = input.as_bytes();
            let malformed = bytes.iter().enumerate().any(|(i, &b)| {
                b == b'%'
                    && !bytes
                        .get(i + 1..i + 3)
                        .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            });
            if malformed {
                return Err(UrlError::BadEncoding);
            }
            let text = percent_decode_str(input)
                .decode_utf8()
                .map_err(|_| UrlError::BadEncoding)?;
            if text.chars().any(char::is_control) {
                return Err(UrlError::BadEncoding);
            }
            Ok(text.into_owned())
        }
        fn searched_query_param(
            query: Option<&str>,
            name: &str,
        ) -> Result<Option<String>, UrlError> {
            let mut found = None;
            for pair in query.unwrap_or("").split('&') {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if key == name {
                    found = Some(decoded_percent(&value.replace('+', " "))?);
                }
            }
            Ok(found)
        }
        /// Every string of up to `max` characters from `alphabet`.
        fn strings(alphabet: &[&str], max: usize) -> Vec<String> {
            let mut all = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|start| alphabet.iter().map(move |next| format!("{start}{next}")))
                    .collect();
                all.extend(last.iter().cloned());
            }
            all
        }

        let refs = strings(&["a", ".", "/", "@", "{", "-", "l", "o", "c", "k", "+"], 5);
        for reference in &refs {
            assert_eq!(
                validate_ref(reference),
                searched_validate_ref(reference),
                "{reference:?}"
            );
        }
        for long in [
            "a".repeat(255),
            "a".repeat(256),
            format!("{}.lock", "a/".repeat(100)),
        ] {
            assert_eq!(validate_ref(&long), searched_validate_ref(&long));
        }
        let encoded = strings(
            &["a", "%", "2", "F", "f", "0", "é", "\u{7f}", "\u{85}", "+"],
            4,
        );
        for text in &encoded {
            assert_eq!(percent_decode(text), decoded_percent(text), "{text:?}");
        }
        let tails = strings(
            &["a", "/", ".", "%", "2", "F", "@", "-", "t", "z", "i", "p"],
            4,
        );
        let mut paths = Vec::new();
        for start in [
            "",
            "/",
            "/a",
            "/a/",
            "/a/b",
            "/a/b/",
            "/a/b/archive",
            "/a/b/archive/",
            "/a/b/tgz/",
            "/.a/b/zip/",
            "/a/b/x/",
            "//b/archive/",
            "/a/b//",
        ] {
            paths.extend(tails.iter().map(|tail| format!("{start}{tail}")));
        }
        for reference in strings(&["a", "/", ".", "%2F", "@", "-"], 3) {
            for ext in [
                ".tar.gz",
                ".zip.sha256",
                ".tgz",
                ".tar.zst",
                ".tar",
                "tar",
                ".rar",
            ] {
                paths.push(format!("/acme/widget/archive/{reference}{ext}"));
                paths.push(format!("/acme/widget/zip/{reference}{ext}"));
            }
        }
        for path in &paths {
            assert_eq!(parse_path(path), searched_parse_path(path), "{path:?}");
        }

        // Longer inputs than the exhaustive sets reach, drawn at random (a
        // fixed seed) from pieces those leave out: raw and encoded
        // multi-byte characters, overlong and surrogate encodings, encoded
        // control bytes, dots and slashes, query separators, and the
        // extensions; under each URL prefix, and as a query for
        // `query_param`, which nothing above compared.
        const PIECES: &[&str] = &[
            "a",
            "Z",
            "9",
            ".",
            "/",
            "@",
            "{",
            "-",
            "+",
            "=",
            "_",
            "~",
            ":",
            "?",
            "#",
            "&",
            "%",
            "%2",
            "%2F",
            "%2f",
            "%2e",
            "%2E",
            "%2e%2e",
            "%00",
            "%0a",
            "%0D",
            "%7f",
            "%C0%AE",
            "%c0%af",
            "%E0%80%AE",
            "%ED%A0%80",
            "%F4%90%80%80",
            "%C2%85",
            "%e2%80%8b",
            "%FF",
            "%80",
            "%25",
            "%252F",
            "%40%7B",
            "%2B",
            "é",
            "\u{85}",
            "\u{7f}",
            "\u{200b}",
            "𝄞",
            " ",
            "lock",
            ".lock",
            "..",
            ".tar",
            ".gz",
            ".tar.gz",
            ".tgz",
            ".zip",
            ".tar.zst",
            ".sha256",
            "archive",
            "path=",
            "path",
            "format=",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut below = |n: usize| {
            // xorshift64: enough to spread the draws.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for round in 0..100_000 {
            let pieces = below(13);
            let tail: String = (0..pieces).map(|_| PIECES[below(PIECES.len())]).collect();
            assert_eq!(percent_decode(&tail), decoded_percent(&tail), "{tail:?}");
            assert_eq!(
                validate_ref(&tail),
                searched_validate_ref(&tail),
                "{tail:?}"
            );
            for name in ["path", "format"] {
                assert_eq!(
                    query_param(Some(&tail), name),
                    searched_query_param(Some(&tail), name),
                    "{tail:?}"
                );
            }
            let prefix = [
                "/acme/widget/archive/",
                "/acme/widget/tar.gz/",
                "/acme/widget/zip/",
                "/acme/widget/",
                "/acme/",
                "//widget/archive/",
            ][round % 6];
            let path = format!("{prefix}{tail}");
            assert_eq!(parse_path(&path), searched_parse_path(&path), "{path:?}");
        }
        for name in ["path", "format"] {
            assert_eq!(query_param(None, name), searched_query_param(None, name));
        }
        // The ref's length bound, reached with plain and encoded bytes.
        for length in 250..=260 {
            for unit in ["a", "%61"] {
                let reference = unit.repeat(length);
                for path in [
                    format!("/acme/widget/archive/{reference}.tar.gz"),
                    format!("/acme/widget/zip/{reference}"),
                ] {
                    assert_eq!(parse_path(&path), searched_parse_path(&path), "{path:?}");
                }
            }
        }
    }

    #[test]
    fn format_lists_parse() {
        assert_eq!(
            parse_formats("tar.gz, zip,tgz").unwrap(),
            vec![Format::TarGz, Format::Zip]
        );
        assert_eq!(parse_formats("rar"), Err(UrlError::BadFormat));
        assert_eq!(parse_formats(""), Err(UrlError::BadFormat));
    }
    use super::*;

    fn parse(path: &str) -> Result<ArchiveRequest, UrlError> {
        parse_path(path)
    }

    #[test]
    fn github_style_parses_every_extension() {
        for (ext, format) in [
            ("tar.gz", Format::TarGz),
            ("tgz", Format::TarGz),
            ("zip", Format::Zip),
            ("tar", Format::Tar),
            ("tar.zst", Format::TarZst),
        ] {
            let req = parse(&format!("/acme/widget/archive/v1.2.3.{ext}")).unwrap();
            assert_eq!(req.owner, "acme");
            assert_eq!(req.repo, "widget");
            assert_eq!(req.reference, "v1.2.3");
            assert_eq!(req.format, format);
            assert!(!req.checksum);
        }
    }

    #[test]
    fn codeload_style_and_refs_with_slashes() {
        let req = parse("/acme/widget/tar.gz/feature/x").unwrap();
        assert_eq!(req.reference, "feature/x");
        assert_eq!(req.format, Format::TarGz);
        let req = parse("/acme/widget/archive/refs/heads/feature/x.zip").unwrap();
        assert_eq!(req.reference, "refs/heads/feature/x");
        assert_eq!(req.format, Format::Zip);
        let req = parse("/acme/widget/archive/feature%2Fx.tar").unwrap();
        assert_eq!(req.reference, "feature/x");
    }

    #[test]
    fn checksum_suffix_is_recognised() {
        let req = parse("/acme/widget/archive/main.tar.gz.sha256").unwrap();
        assert!(req.checksum);
        assert_eq!(req.format, Format::TarGz);
        assert_eq!(req.reference, "main");
    }

    /// `docs/urls.md`, "Shapes": codeload style has no `.sha256` form; the
    /// suffix is part of the ref. (Docs audit: no test held it.)
    #[test]
    fn codeload_style_has_no_checksum_form() {
        let req = parse("/o/r/tar.gz/v1.sha256").unwrap();
        assert!(!req.checksum);
        assert_eq!(req.reference, "v1.sha256");
        assert_eq!(req.format, Format::TarGz);
    }

    #[test]
    fn longest_extension_wins() {
        let req = parse("/a/b/archive/x.tar.tar.gz").unwrap();
        assert_eq!(req.reference, "x.tar");
        assert_eq!(req.format, Format::TarGz);
    }

    #[test]
    fn hostile_paths_are_rejected() {
        for path in [
            "/../etc/archive/main.tar",
            "/acme/../archive/main.tar",
            "/.acme/widget/archive/main.tar",
            "/acme/wid%2Fget/archive/main.tar",
            "/acme/widget/archive/-main.tar",
            "/acme/widget/archive/--output=x.tar",
            "/acme/widget/archive/a..b.tar",
            "/acme/widget/archive/main~1.tar",
            "/acme/widget/archive/main^{tree}.tar",
            "/acme/widget/archive/HEAD:README.tar",
            "/acme/widget/archive/main@{1}.tar",
            "/acme/widget/archive/ma%00in.tar",
            "/acme/widget/archive/ma%0ain.tar",
            "/acme/widget/archive/main.rar",
            "/acme/widget/archive/.tar",
            "/acme/widget/archive/main.lock.tar",
            "/acme/widget/archive/a//b.tar",
            "/acme/widget/archive/%zz.tar",
            "/acme/widget/archive/%ff.tar",
            "/acme/widget/rar/main",
        ] {
            assert!(parse(path).is_err(), "{path} was accepted");
        }
        assert_eq!(
            parse("/acme/widget").unwrap_err(),
            UrlError::NotAnArchiveUrl
        );
        let long = format!("/a/b/archive/{}.tar", "x".repeat(300));
        assert!(matches!(parse(&long), Err(UrlError::BadRef(_))));
    }

    #[test]
    fn subtrees_are_literal_and_inside_the_tree() {
        assert_eq!(validate_subtree("src/lib/").unwrap(), "src/lib");
        for bad in [
            "", "/etc", "../x", "a/../b", "a/./b", ":(glob)*", "a//b", "a\nb", "a\\b",
        ] {
            assert!(validate_subtree(bad).is_err(), "{bad:?} was accepted");
        }
        // At most 1,024 bytes (`docs/urls.md#subtree-query`), counted after
        // the trailing `/` are removed.
        let longest = format!("{}/{}", "a".repeat(511), "b".repeat(512));
        assert_eq!(validate_subtree(&format!("{longest}/")).unwrap(), longest);
        assert!(matches!(
            validate_subtree(&format!("{longest}c")),
            Err(UrlError::BadSubtree(_))
        ));
    }

    #[test]
    fn labels_follow_github_naming() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(label(&RefKind::Tag("v1.2.3".into()), commit), "1.2.3");
        assert_eq!(label(&RefKind::Tag("version".into()), commit), "version");
        assert_eq!(label(&RefKind::Tag("1.0".into()), commit), "1.0");
        assert_eq!(
            label(&RefKind::Tag("release/v1.0".into()), commit),
            "release-v1.0"
        );
        assert_eq!(label(&RefKind::Tag("v2/rc1".into()), commit), "2-rc1");
        assert_eq!(
            label(&RefKind::Branch("feature/x".into()), commit),
            "feature-x"
        );
        assert_eq!(label(&RefKind::Commit, commit), commit);
    }

    #[test]
    fn query_params_decode() {
        assert_eq!(
            query_param(Some("path=src%2Flib&x=1"), "path").unwrap(),
            Some("src/lib".into())
        );
        assert_eq!(query_param(Some("x=1"), "path").unwrap(), None);
        assert_eq!(query_param(None, "path").unwrap(), None);
        assert!(query_param(Some("path=%00"), "path").is_err());
        assert!(query_param(Some("path=%zz"), "path").is_err());
        assert!(query_param(Some("path=%f"), "path").is_err());
        assert!(query_param(Some("path=%ff"), "path").is_err());
        assert_eq!(
            query_param(Some("path=a+b%2Bc"), "path").unwrap(),
            Some("a b+c".into())
        );
    }

    #[test]
    fn canonical_path_is_the_github_shape_and_round_trips_the_subtree() {
        let codeload = parse_path("/acme/widget/tgz/feature/x").unwrap();
        assert_eq!(
            codeload.canonical_path(None),
            "/acme/widget/archive/feature/x.tar.gz"
        );
        let checksum = parse_path("/acme/widget/archive/v1.0.zip.sha256").unwrap();
        assert_eq!(
            checksum.canonical_path(None),
            "/acme/widget/archive/v1.0.zip.sha256"
        );
        let github = parse_path("/acme/widget/archive/main.tar").unwrap();
        assert_eq!(
            github.canonical_path(Some("docs/a b+c&d")),
            "/acme/widget/archive/main.tar?path=docs/a%20b%2Bc%26d"
        );
        // The archiver's query parser gets the subtree back unchanged.
        let path = github.canonical_path(Some("docs/a b+c&d/é"));
        let query = path.split_once('?').unwrap().1;
        assert_eq!(
            query_param(Some(query), "path").unwrap().as_deref(),
            Some("docs/a b+c&d/é")
        );
    }
}
