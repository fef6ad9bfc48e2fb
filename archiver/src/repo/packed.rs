//! `packed-refs` read as git reads it (`refs/packed-backend.c`), byte for
//! byte: where git finds a ref, which lines it lists and in what order,
//! and which files it dies on.
//!
//! gix's parser refused whole files git reads (a tab after the id, a name
//! git skips as bad: a trailing space, `a..b`, a CR), which made every
//! lookup and listing of the repository a `500`; and it sorted a file
//! whose header says `sorted` when git trusts the header, so the two
//! binary searches found different refs. Here:
//!
//! - The header, if the file starts with `#`, must be one line
//!   `# pack-refs with:{traits}`, the traits split on spaces (git needs
//!   no space after the colon); `sorted` among them means the records are
//!   taken in file order, as git takes them, sorted or not.
//!   Otherwise they are sorted by name, stably (git's merge sort), each
//!   with its `^` line.
//! - A ref is looked up by git's own binary search over the records
//!   (`find_reference_location`), which compares names up to the LF of a
//!   record and reads the id at its start: in a file git trusts to be
//!   sorted and is not, both miss the same refs.
//! - Listed, each record is `{40 hex}{space, tab, CR or LF}{name}\n`,
//!   then maybe `^{40 hex}\n`; a name that is no ref name to git is left
//!   out ("broken"), unless it is dangerous (leads out of `refs/`), on
//!   which git dies.
//! - git dies on everything else: a file that does not end in LF, a
//!   record shorter than an id, a malformed `^` line, another header.
//!   Those are `Err` here, a `500`, as for git.

use gix::{
    bstr::{BString, ByteSlice},
    hash::ObjectId,
    refs::FullName,
};

use super::refs::FULL_HEX_LEN;

/// A record's shortest length: an id, a separator and a name's first byte
/// (git's `snapshot_hexsz + 2`).
const MIN_RECORD_BYTES: usize = FULL_HEX_LEN + 2;

/// A parsed `packed-refs`: its records, in the order git reads them.
#[derive(Debug)]
pub(super) struct PackedRefs {
    /// The file as read, its records from `start` on; or, for one that
    /// did not say it was sorted and was not, its records sorted (git's
    /// `sort_snapshot`). One copy of the file, never two: the file may be
    /// `MAX_PACKED_REFS_BYTES`.
    buffer: Vec<u8>,
    /// Where the records start in `buffer`: after the header.
    start: usize,
}

/// One line of `packed-refs` as git lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PackedRef {
    pub(super) name: FullName,
    pub(super) id: ObjectId,
}

/// Why git would die reading the file.
pub(super) type Fatal = String;

/// git's `isspace`: space, tab, LF and CR.
fn is_git_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// An object id of 40 hex digits of either case at the start of `bytes`.
fn hex_id(bytes: &[u8]) -> Option<ObjectId> {
    let hex = bytes.get(..FULL_HEX_LEN)?;
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    ObjectId::from_hex(&hex.to_ascii_lowercase()).ok()
}

/// The first line of `bytes` (to 75 bytes), for a message.
fn line_of(bytes: &[u8]) -> String {
    let line = bytes
        .split(|&byte| byte == b'\n')
        .next()
        .unwrap_or_default();
    String::from_utf8_lossy(&line[..line.len().min(75)]).into_owned()
}

fn invalid(bytes: &[u8]) -> Fatal {
    format!("unexpected line in packed-refs: {}", line_of(bytes))
}

/// Where the record holding `bytes[at]` starts: after an LF that no `^`
/// follows (git's `find_start_of_record`).
fn start_of_record(bytes: &[u8], mut at: usize) -> usize {
    while at > 0 && (bytes[at - 1] != b'\n' || bytes[at] == b'^') {
        at -= 1;
    }
    at
}

/// Where the record after the one holding `bytes[at]` starts, or `end`
/// (git's `find_end_of_record`).
fn end_of_record(bytes: &[u8], mut at: usize, end: usize) -> usize {
    loop {
        at += 1;
        if at >= end || (bytes[at - 1] == b'\n' && bytes[at] != b'^') {
            return at.min(end);
        }
    }
}

/// git's `verify_buffer_safe`: the last record ends in LF and is long
/// enough to hold an id, so no comparison reads past the end.
fn verify_safe(records: &[u8]) -> Result<(), Fatal> {
    let Some(&last) = records.last() else {
        return Ok(());
    };
    let last_line = start_of_record(records, records.len() - 1);
    if last != b'\n' || records.len() - last_line < MIN_RECORD_BYTES {
        return Err(invalid(&records[last_line..]));
    }
    Ok(())
}

/// A record's name, from after its id and separator to its LF.
fn record_name(record: &[u8]) -> &[u8] {
    let rest = &record[(FULL_HEX_LEN + 1).min(record.len())..];
    let end = rest
        .iter()
        .position(|&byte| byte == b'\n')
        .unwrap_or(rest.len());
    &rest[..end]
}

impl PackedRefs {
    /// The bytes it holds.
    pub(super) fn len(&self) -> usize {
        self.buffer.len()
    }

    /// Its records, in the order git reads them.
    fn records(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    /// Reads `contents` as git's `create_snapshot` does, keeping them
    /// rather than a copy where they are in the order git reads them.
    pub(super) fn parse(contents: Vec<u8>) -> Result<PackedRefs, Fatal> {
        let mut start = 0;
        let mut sorted = false;
        if contents.first() == Some(&b'#') {
            let Some(end) = contents.iter().position(|&byte| byte == b'\n') else {
                return Err(format!(
                    "unterminated line in packed-refs: {}",
                    line_of(&contents)
                ));
            };
            // git's `skip_prefix(…, "# pack-refs with:")`: no space
            // needed after the colon, and the traits split on spaces.
            let Some(traits) = contents[..end].strip_prefix(b"# pack-refs with:") else {
                return Err(invalid(&contents));
            };
            sorted = traits
                .split(|&byte| byte == b' ')
                .any(|word| word == b"sorted");
            start = end + 1;
        }
        let records = &contents[start..];
        verify_safe(records)?;
        if sorted {
            return Ok(PackedRefs {
                buffer: contents,
                start,
            });
        }
        // Split into records, each with its `^` line, and sort them by
        // name, stably, as git's `sort_snapshot` does.
        let mut spans = Vec::new();
        let mut at = 0;
        while at < records.len() {
            let Some(end) = records[at..].iter().position(|&byte| byte == b'\n') else {
                return Err(invalid(&records[at..]));
            };
            if end < MIN_RECORD_BYTES {
                return Err(invalid(&records[at..]));
            }
            let mut next = at + end + 1;
            if records.get(next) == Some(&b'^') {
                let Some(peel_end) = records[next..].iter().position(|&byte| byte == b'\n') else {
                    return Err(invalid(&records[next..]));
                };
                next += peel_end + 1;
            }
            spans.push(at..next);
            at = next;
        }
        let name = |span: &std::ops::Range<usize>| record_name(&records[span.clone()]);
        // Already in order (as git writes it, with no header or an old
        // one): kept as it is, as git keeps it.
        if spans
            .windows(2)
            .all(|pair| name(&pair[0]) <= name(&pair[1]))
        {
            return Ok(PackedRefs {
                buffer: contents,
                start,
            });
        }
        spans.sort_by(|a, b| name(a).cmp(name(b)));
        let mut sorted_records = Vec::with_capacity(records.len());
        for span in spans {
            sorted_records.extend_from_slice(&records[span]);
        }
        verify_safe(&sorted_records)?;
        Ok(PackedRefs {
            buffer: sorted_records,
            start: 0,
        })
    }

    /// The id of the ref named exactly `name`, found as git finds it: its
    /// binary search over the records (`find_reference_location`), then
    /// the id at the record's start (git dies if there is none).
    pub(super) fn find(&self, name: &[u8]) -> Result<Option<ObjectId>, Fatal> {
        let records = self.records();
        let (mut low, mut high) = (0, records.len());
        while low != high {
            let middle = low + (high - low) / 2;
            let record = start_of_record(records, middle);
            match compare_record(&records[record..], name) {
                std::cmp::Ordering::Less => low = end_of_record(records, middle, high),
                std::cmp::Ordering::Greater => high = record,
                std::cmp::Ordering::Equal => {
                    return match hex_id(&records[record..]) {
                        Some(id) => Ok(Some(id)),
                        None => Err(invalid(&records[record..])),
                    };
                }
            }
        }
        Ok(None)
    }

    /// Every ref git lists from the file, in the order it reads them (a
    /// name it takes for no ref left out), or why git dies.
    pub(super) fn refs(&self) -> Result<Vec<PackedRef>, Fatal> {
        let records = self.records();
        let mut refs = Vec::new();
        let mut at = 0;
        while at < records.len() {
            let rest = &records[at..];
            if rest.len() < MIN_RECORD_BYTES || !is_git_space(rest[FULL_HEX_LEN]) {
                return Err(invalid(rest));
            }
            let Some(id) = hex_id(rest) else {
                return Err(invalid(rest));
            };
            let name_start = FULL_HEX_LEN + 1;
            let Some(end) = rest[name_start..].iter().position(|&byte| byte == b'\n') else {
                return Err(format!(
                    "unterminated line in packed-refs: {}",
                    line_of(rest)
                ));
            };
            let name = &rest[name_start..name_start + end];
            at += name_start + end + 1;
            if records.get(at) == Some(&b'^') {
                let peel = &records[at + 1..];
                if hex_id(peel).is_none() || peel.get(FULL_HEX_LEN) != Some(&b'\n') {
                    return Err(invalid(&records[at..]));
                }
                at += 1 + FULL_HEX_LEN + 1;
            }
            if name.contains(&0) {
                return Err(format!(
                    "packed refname contains embedded NUL: {}",
                    line_of(name)
                ));
            }
            match ref_name(name) {
                Name::Ref(name) => refs.push(PackedRef { name, id }),
                // A root ref (`HEAD`, `x`): none is published but `HEAD`,
                // whose packed line git does not read as `HEAD`.
                Name::Root => {}
                Name::Bad if is_safe(name) => {}
                Name::Bad => {
                    return Err(format!("packed refname is dangerous: {}", line_of(name)));
                }
            }
        }
        Ok(refs)
    }
}

/// git's `cmp_record_to_refname` with `start` set: a record's name (up to
/// its LF) against `name`.
fn compare_record(record: &[u8], name: &[u8]) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let mut index = 0;
    loop {
        let ours = record
            .get(FULL_HEX_LEN + 1 + index)
            .copied()
            .unwrap_or(b'\n');
        let theirs = name.get(index).copied();
        if ours == b'\n' {
            return if theirs.is_some() {
                Ordering::Less
            } else {
                Ordering::Equal
            };
        }
        let Some(theirs) = theirs else {
            return Ordering::Greater;
        };
        if ours != theirs {
            return ours.cmp(&theirs);
        }
        index += 1;
    }
}

/// What a packed line's name is to git's `check_refname_format` with
/// `REFNAME_ALLOW_ONELEVEL`.
enum Name {
    /// A ref under `refs/`.
    Ref(FullName),
    /// A valid name of one level (or `HEAD`): a root ref.
    Root,
    /// No ref name.
    Bad,
}

fn ref_name(name: &[u8]) -> Name {
    if name.starts_with(b"refs/") {
        return match FullName::try_from(BString::from(name)) {
            Ok(full) => Name::Ref(full),
            Err(_) => Name::Bad,
        };
    }
    // One level: valid where the same component would be under `refs/`.
    let under_refs = [&b"refs/heads/"[..], name].concat();
    if !name.contains(&b'/') && FullName::try_from(BString::from(under_refs)).is_ok() {
        Name::Root
    } else {
        Name::Bad
    }
}

/// git's `refname_is_safe`: under `refs/`, a path that normalizes to
/// itself; otherwise upper case and `_` only.
fn is_safe(name: &[u8]) -> bool {
    if let Some(rest) = name.strip_prefix(b"refs/") {
        return !rest.is_empty()
            && !rest.starts_with(b"/")
            && !rest.ends_with(b"/")
            && rest
                .split_str("/")
                .all(|part| !part.is_empty() && part != b"." && part != b"..");
    }
    !name.is_empty()
        && name
            .iter()
            .all(|&byte| byte.is_ascii_uppercase() || byte == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn id(hex: &str) -> ObjectId {
        ObjectId::from_hex(hex.as_bytes()).unwrap()
    }

    fn names(packed: &PackedRefs) -> Vec<String> {
        packed
            .refs()
            .unwrap()
            .into_iter()
            .map(|reference| format!("{} {}", reference.name.as_bstr(), reference.id))
            .collect()
    }

    #[test]
    fn lines_git_reads_are_read_and_bad_names_left_out() {
        let packed = PackedRefs::parse(
            format!(
                "{A}\trefs/heads/tab\n{A} refs/heads/space \n{A} refs/heads/a..b\n{A} refs/heads/cr\r\n{B} refs/heads/x\n"
            )
            .into_bytes(),
        )
        .unwrap();
        assert_eq!(
            names(&packed),
            [format!("refs/heads/tab {A}"), format!("refs/heads/x {B}")]
        );
        assert_eq!(packed.find(b"refs/heads/tab").unwrap(), Some(id(A)));
        assert_eq!(packed.find(b"refs/heads/space").unwrap(), None);
        assert_eq!(packed.find(b"refs/heads/x").unwrap(), Some(id(B)));
    }

    #[test]
    fn files_git_dies_on_are_refused() {
        for contents in [
            format!("{A} refs/heads/x"),
            format!("{A} refs/heads/x\n\n{B} refs/heads/y\n"),
            format!("# other\n{A} refs/heads/x\n"),
            format!("^{B}\n{A} refs/heads/x\n"),
            format!("{A}junk refs/heads/x\n"),
            format!("{A} refs/heads/../../x\n"),
        ] {
            let read =
                PackedRefs::parse(contents.clone().into_bytes()).and_then(|packed| packed.refs());
            assert!(read.is_err(), "{contents:?}: {read:?}");
        }
    }

    #[test]
    fn a_file_said_sorted_is_searched_as_it_is() {
        let packed = PackedRefs::parse(
            format!("# pack-refs with: peeled fully-peeled sorted \n{A} refs/tags/v\n{A} refs/heads/y\n{B} refs/heads/x\n")
                .into_bytes(),
        )
        .unwrap();
        // The search lands on `y` first, then goes left of it and of
        // `refs/tags/v`, and misses `x`, as git's does.
        assert_eq!(packed.find(b"refs/heads/y").unwrap(), Some(id(A)));
        assert_eq!(packed.find(b"refs/heads/x").unwrap(), None);
        assert_eq!(
            names(&packed),
            [
                format!("refs/tags/v {A}"),
                format!("refs/heads/y {A}"),
                format!("refs/heads/x {B}")
            ]
        );
        let unsaid = PackedRefs::parse(
            format!("{A} refs/tags/v\n{A} refs/heads/y\n{B} refs/heads/x\n").into_bytes(),
        )
        .unwrap();
        assert_eq!(unsaid.find(b"refs/heads/y").unwrap(), Some(id(A)));
        assert_eq!(unsaid.find(b"refs/heads/x").unwrap(), Some(id(B)));
    }
}
