//! Refs to commits, as `git rev-parse` resolves them: git's "dwim" order of
//! candidate names, symbolic refs followed only to `HEAD` or `refs/`
//! names, abbreviated ids, annotated tags peeled within a bound; and the
//! listing of every ref (`RefsSnapshot`) that an `export-subst` archive's
//! bytes depend on.

use std::path::Path;

use gix::{hash::ObjectId, object::Kind, refs::TargetRef};

use gitball_core::url::RefKind;

use super::confine::{RefsRefused, refs_without_symlinks};
use super::open_isolated;
use crate::error::Error;

/// git's `SYMREF_MAXDEPTH`: the most refs read to resolve a name, the
/// last a direct one, so at most 4 symbolic refs in a row (one more had
/// been read, and a name `git rev-parse` does not resolve served: attack).
pub(super) const SYMREF_MAX_DEPTH: usize = 5;

/// How a `HEAD` gix cannot read is listed: the null id, no commit.
const UNREADABLE_HEAD: &str = "0000000000000000000000000000000000000000";

/// Length of a full SHA-1 object id in hex.
pub(super) const FULL_HEX_LEN: usize = 40;

/// Shortest abbreviated object id accepted (`docs/urls.md#refs`; git
/// itself takes 4).
pub(super) const MIN_ABBREV_HEX_LEN: usize = 7;

/// The most bytes of commit and tag objects read to resolve a ref, the
/// whole chain of tags included (git has no bound; a commit message of
/// hundreds of MB, pushed, was read whole on every request for it:
/// attack).
pub(super) const MAX_PEELED_OBJECT_BYTES: u64 = 16 * 1024 * 1024;

/// A repository's refs and `HEAD` as listed once: what the bytes of an
/// archive whose `export-subst` reads refs depend on. Its [`digest`] keys
/// such an archive, and git makes it from exactly these refs
/// (`shadow::Shadows::snapshot`), not from the live ones.
///
/// [`digest`]: RefsSnapshot::digest
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefsSnapshot {
    /// Every ref but `HEAD`, sorted by name: its name and its target, an
    /// object id in hex or `ref: {name}` for a symbolic ref.
    pub refs: Vec<(String, String)>,
    /// `HEAD`: `ref: {name}` (also when that branch is unborn), or the id
    /// of a detached `HEAD`.
    pub head: String,
}

impl RefsSnapshot {
    /// Lists `repo`'s refs and `HEAD`.
    fn of(repo: &gix::Repository) -> Result<RefsSnapshot, Error> {
        RefsSnapshot::of_each(repo, |_| {})
    }

    /// Lists `repo`'s refs and `HEAD`, calling `each` with every ref (not
    /// `HEAD`) as it is listed: what `each` makes of the refs is made of
    /// exactly the refs listed.
    pub(super) fn of_each(
        repo: &gix::Repository,
        mut each: impl FnMut(gix::Reference<'_>),
    ) -> Result<RefsSnapshot, Error> {
        let mut refs = Vec::new();
        for_each_ref(repo, |reference| {
            let target = match reference.target() {
                TargetRef::Object(id) => id.to_hex().to_string(),
                TargetRef::Symbolic(name) => format!("ref: {}", name.as_bstr()),
            };
            refs.push((reference.name().as_bstr().to_string(), target));
            each(reference);
        })?;
        refs.sort();
        // `HEAD` as its file says, not followed: a `HEAD` naming a ref git
        // ignores (an empty file) is an unborn one, and following it had
        // failed the listing, and every request by commit id (attack).
        let head = match repo.find_reference("HEAD") {
            Ok(head) => match head.target() {
                TargetRef::Object(id) => id.to_hex().to_string(),
                TargetRef::Symbolic(name) => format!("ref: {}", name.as_bstr()),
            },
            // A `HEAD` file gix cannot read as a ref (git reads `ref:`
            // without its space; other tools write it so): listed as no
            // commit, which a snapshot's git takes as a `HEAD` that names
            // nothing. It had failed the listing too.
            Err(err) if is_broken_ref(&err) => UNREADABLE_HEAD.to_owned(),
            Err(err) => return Err(Error::internal(format_args!("reading HEAD: {err}"))),
        };
        Ok(RefsSnapshot { refs, head })
    }

    /// Reads the refs of the repository at `git_dir` (canonical, checked
    /// when it was first opened) afresh.
    /// A symlink anywhere under `refs/` (which gix would list, reading
    /// through it) makes the repository's refs unlisted: `RepoNotFound`.
    pub fn at(git_dir: &Path) -> Result<RefsSnapshot, Error> {
        let repo = open_isolated(git_dir)
            .map_err(|err| Error::internal(format_args!("opening {}: {err}", git_dir.display())))?
            .to_thread_local();
        let mut dirs = vec![repo.common_dir()];
        if repo.git_dir() != repo.common_dir() {
            dirs.push(repo.git_dir());
        }
        for dir in dirs {
            match refs_without_symlinks(dir) {
                Ok(()) => {}
                Err(RefsRefused::NotAFile(path)) => {
                    tracing::warn!(
                        path = %path.display(),
                        "a ref file is a symlink (which leads outside the repository), not a regular file, or too large; its refs are not listed"
                    );
                    return Err(Error::RepoNotFound);
                }
                Err(RefsRefused::Unreadable(path, error)) => {
                    return Err(Error::internal(format_args!(
                        "listing refs: {}: {error}",
                        path.display()
                    )));
                }
            }
        }
        RefsSnapshot::of(&repo)
    }

    /// The digest of every ref and `HEAD`.
    pub fn digest(&self) -> String {
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        for (name, target) in &self.refs {
            sha2::Digest::update(&mut hasher, format!("{name} {target}\n").as_bytes());
        }
        sha2::Digest::update(&mut hasher, format!("HEAD {}\n", self.head).as_bytes());
        hex::encode(sha2::Digest::finalize(hasher))
    }
}

/// Calls `each` with every ref of `repo` (not `HEAD`).
pub(super) fn for_each_ref(
    repo: &gix::Repository,
    mut each: impl FnMut(gix::Reference<'_>),
) -> Result<(), Error> {
    let references = repo
        .references()
        .map_err(|err| Error::internal(format_args!("listing refs: {err}")))?;
    let all = references
        .all()
        .map_err(|err| Error::internal(format_args!("listing refs: {err}")))?;
    for (count, reference) in all.enumerate() {
        if count == MAX_LISTED_REFS {
            return Err(Error::internal(format_args!(
                "more than {MAX_LISTED_REFS} refs: not listed"
            )));
        }
        match reference {
            Ok(reference) => each(reference),
            // Listed without it, as git lists the refs ("ignoring broken
            // ref"): one such file had made every listing fail, and every
            // request by commit id a `500` (attack).
            Err(err) if is_broken_ref(&err) => {
                tracing::warn!(error = %err, "a loose ref that cannot be read as one is ignored");
            }
            Err(err) => return Err(Error::internal(format_args!("reading a ref: {err}"))),
        }
    }
    Ok(())
}

/// Whether `err` is gix's for a loose ref file whose content is no ref (an
/// empty file, as a crash leaves one): git ignores such a ref, as if it
/// were not there, and so does the archiver.
fn is_broken_ref(err: &gix::Error) -> bool {
    err.downcast_any_ref::<gix::refs::file::find::ReferenceDecode>()
        .is_some()
}

/// The most refs a listing takes (for the refs digest, and the tips of the
/// reachability walk): 8 million refs in a `packed-refs` within its bound
/// had aborted the archiver out of memory (attack).
pub(super) const MAX_LISTED_REFS: usize = 1_000_000;

/// A full hex object id, in either case (as git accepts it).
pub(super) fn parse_full_hex(reference: &str) -> Option<ObjectId> {
    if reference.len() == FULL_HEX_LEN && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        ObjectId::from_hex(reference.to_ascii_lowercase().as_bytes()).ok()
    } else {
        None
    }
}

/// The refs `reference` may mean, in git's `ref_rev_parse_rules` order.
///
/// git's first rule is the name itself: a full name (`refs/heads/x`) or a
/// root ref in the git dir. Of the root refs only `HEAD` is published:
/// `ORIG_HEAD`, `FETCH_HEAD` and the like are the server's own working state.
pub(super) fn ref_candidates(reference: &str) -> impl Iterator<Item = String> + '_ {
    let as_is =
        (reference == "HEAD" || reference.starts_with("refs/")).then(|| reference.to_owned());
    as_is.into_iter().chain([
        format!("refs/{reference}"),
        format!("refs/tags/{reference}"),
        format!("refs/heads/{reference}"),
        format!("refs/remotes/{reference}"),
        format!("refs/remotes/{reference}/HEAD"),
    ])
}

/// The ref a user's name matched, and what reading it involved.
pub(super) struct FoundRef {
    pub(super) id: ObjectId,
    pub(super) kind: RefKind,
    /// How many of the candidates were read, the match included.
    pub(super) tried: usize,
    /// The symbolic refs' targets followed on the way, in any candidate.
    pub(super) followed: Vec<String>,
}

/// The first existing ref of `candidates` (from `ref_candidates`),
/// followed through symbolic refs to the object it names, with the kind its
/// full name implies.
pub(super) fn find_reference(
    repo: &gix::Repository,
    candidates: &[String],
    inside: &dyn Fn(&str) -> Result<(), Error>,
) -> Result<Option<FoundRef>, Error> {
    let mut followed = Vec::new();
    for (index, full_name) in candidates.iter().enumerate() {
        if let Some(id) = follow_ref(repo, full_name, inside, &mut followed)? {
            return Ok(Some(FoundRef {
                id,
                kind: ref_kind(full_name),
                tried: index + 1,
                followed,
            }));
        }
    }
    Ok(None)
}

/// Reads the ref named exactly `full_name` and follows symbolic refs to an
/// object id, noting each target in `followed`. A missing or dangling ref
/// (an unborn `HEAD`) is `None`, so the next candidate is tried, as git
/// does. `inside` checks each name before its file is read.
pub(super) fn follow_ref(
    repo: &gix::Repository,
    full_name: &str,
    inside: &dyn Fn(&str) -> Result<(), Error>,
    followed: &mut Vec<String>,
) -> Result<Option<ObjectId>, Error> {
    let mut name = full_name.to_owned();
    for _ in 0..SYMREF_MAX_DEPTH {
        // gix reads these from another git dir than the name says, where
        // the checks of `inside` do not look (attack: a symbolic ref to
        // `main-worktree/refs/heads/x` was read through a symlink there).
        // A served repository has no other work tree to name: not found.
        // Nor anything but `HEAD` or a name under `refs/` (a symbolic
        // ref's target may be any name gix accepts, and for `foo/bar` gix
        // opens `refs/foo/bar` and more, never `foo/bar`, so no answer
        // could have the asked name: review), nor a name that is not ASCII
        // (gix may open another spelling of it, precomposed).
        if !(name == "HEAD" || name.starts_with("refs/")) || !name.is_ascii() {
            return Ok(None);
        }
        inside(&name)?;
        let Some(reference) = find_exact(repo, &name)? else {
            return Ok(None);
        };
        match reference.target() {
            TargetRef::Object(id) => return Ok(Some(id.to_owned())),
            TargetRef::Symbolic(target) => match std::str::from_utf8(target.as_bstr()) {
                Ok(target) => {
                    name = target.to_owned();
                    followed.push(name.clone());
                }
                Err(_) => return Ok(None),
            },
        }
    }
    Ok(None)
}

/// Looks up one ref by its full name, loose or packed.
///
/// `gix`'s lookup also tries other spellings when the name is missing (its
/// own dwim); those answers carry another name and are discarded here, so
/// the order of `ref_candidates` is the only one that applies.
pub(super) fn find_exact<'repo>(
    repo: &'repo gix::Repository,
    full_name: &str,
) -> Result<Option<gix::Reference<'repo>>, Error> {
    // A name gix considers invalid cannot exist as a ref.
    let Ok(partial) = <&gix::refs::PartialNameRef>::try_from(full_name) else {
        return Ok(None);
    };
    let found = match repo.try_find_reference(partial) {
        Ok(found) => found,
        // No ref, as for git, which tries the next candidate of a short
        // name: a `500` before (attack).
        Err(err) if is_broken_ref(&err) => None,
        Err(err) => {
            return Err(Error::internal(format_args!(
                "reading ref {full_name}: {err}"
            )));
        }
    };
    Ok(found.filter(|reference| reference.name().as_bstr() == full_name))
}

/// `Branch`/`Tag` by the matched ref's namespace; `HEAD`, remotes and
/// anything else are labelled by their commit.
pub(super) fn ref_kind(full_name: &str) -> RefKind {
    if let Some(branch) = full_name.strip_prefix("refs/heads/") {
        RefKind::Branch(branch.to_owned())
    } else if let Some(tag) = full_name.strip_prefix("refs/tags/") {
        RefKind::Tag(tag.to_owned())
    } else {
        RefKind::Commit
    }
}

/// An abbreviated object id of 7 to 39 hex digits naming exactly one object.
pub(super) fn find_abbreviated(
    repo: &gix::Repository,
    reference: &str,
) -> Result<Option<ObjectId>, Error> {
    if !(MIN_ABBREV_HEX_LEN..FULL_HEX_LEN).contains(&reference.len())
        || !reference.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(None);
    }
    let Ok(prefix) = gix::hash::Prefix::from_hex(&reference.to_ascii_lowercase()) else {
        return Ok(None);
    };
    match repo
        .objects
        .lookup_prefix(prefix, None)
        .map_err(|err| Error::internal(format_args!("looking up {reference}: {err}")))?
    {
        Some(Ok(id)) => Ok(Some(id)),
        // Ambiguous: git would refuse too (unless a commit-only hint could
        // settle it, which is rare at 7+ digits and not worth guessing).
        Some(Err(())) | None => Ok(None),
    }
}

/// Why an object did not peel to a commit, and so whether that answer
/// may be remembered (`Repository::peel`): an object id names its
/// content, so what follows from the content alone never changes, while a
/// missing object may be pushed or fetched, and a pack may be repacked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PeelFailure {
    /// The object, or one a tag on the way names, is not there (yet).
    Missing,
    /// A tree or a blob, or a tag of one: its content says so.
    NotACommit,
    /// The chain of tags and the commit are over `MAX_PEELED_OBJECT_BYTES`:
    /// their headers say so, and each names the next by its content.
    TooLarge,
    /// A commit or tag whose content does not parse.
    Malformed(String),
    /// Reading it would allocate more than `gitoxide.objects.allocLimit`
    /// (`MAX_OBJECT_READ_BYTES`, ours, not the repository's): not the
    /// content alone but how it is stored (a delta of a huge base) decides,
    /// and a repack may store it otherwise. Found from the pack entries'
    /// headers, before anything is inflated: cheap to find again.
    OverAllocLimit(String),
    /// Anything else (an I/O error, a damaged pack): may pass.
    Unreadable(String),
}

impl PeelFailure {
    /// Whether the object's content alone decides this failure, so that it
    /// never changes.
    pub(super) fn is_content(&self) -> bool {
        match self {
            PeelFailure::NotACommit | PeelFailure::TooLarge | PeelFailure::Malformed(_) => true,
            PeelFailure::Missing | PeelFailure::OverAllocLimit(_) | PeelFailure::Unreadable(_) => {
                false
            }
        }
    }

    pub(super) fn error(&self) -> Error {
        match self {
            PeelFailure::Missing | PeelFailure::NotACommit => Error::RefNotFound,
            PeelFailure::TooLarge => Error::TooLarge,
            PeelFailure::Malformed(detail)
            | PeelFailure::OverAllocLimit(detail)
            | PeelFailure::Unreadable(detail) => Error::internal(detail),
        }
    }

    /// An object read failing: over the allocation limit, or unreadable.
    fn reading(id: ObjectId, error: &gix::Error) -> PeelFailure {
        use gix::error::{Class, ResourceExhaustionKind};
        let detail = format!("reading object {id}: {error}");
        if error.classify().has(Class::ResourceExhaustion(
            ResourceExhaustionKind::AllocationLimit,
        )) {
            PeelFailure::OverAllocLimit(detail)
        } else {
            PeelFailure::Unreadable(detail)
        }
    }
}

/// Peels annotated tags (nested ones too) down to a commit and reads its
/// committer time. A tree, a blob or a missing object is "not found".
pub(super) fn peel_to_commit(
    repo: &gix::Repository,
    mut id: ObjectId,
) -> Result<(ObjectId, i64), PeelFailure> {
    // No depth bound: object ids are hashes of their content, so a chain of
    // tags cannot loop.
    // The bound is on the whole chain: 1,200 chained tags of 16 MB each
    // had cost seconds of a serving thread per request (attack).
    let mut read_bytes = 0u64;
    loop {
        let header = repo
            .try_find_header(id)
            .map_err(|err| PeelFailure::reading(id, &err))?
            .ok_or(PeelFailure::Missing)?;
        if matches!(header.kind(), Kind::Tree | Kind::Blob) {
            return Err(PeelFailure::NotACommit);
        }
        read_bytes = read_bytes.saturating_add(header.size());
        if read_bytes > MAX_PEELED_OBJECT_BYTES {
            tracing::warn!(
                object = %id,
                bytes = header.size(),
                "a commit or tag object larger than the archiver reads; refused"
            );
            return Err(PeelFailure::TooLarge);
        }
        let object = repo
            .try_find_object(id)
            .map_err(|err| PeelFailure::reading(id, &err))?
            .ok_or(PeelFailure::Missing)?;
        let malformed = |what: &str, err: &dyn std::fmt::Display| {
            PeelFailure::Malformed(format!("{what} of {id}: {err}"))
        };
        match object.kind {
            Kind::Commit => {
                let committer = object
                    .try_to_commit_ref_iter()
                    .ok_or_else(|| malformed("the kind", &"not a commit"))?
                    .committer()
                    .map_err(|err| malformed("the committer", &err))?;
                return Ok((id, committer.seconds()));
            }
            Kind::Tag => {
                id = object
                    .try_to_tag_ref_iter()
                    .ok_or_else(|| malformed("the kind", &"not a tag"))?
                    .target_id()
                    .map_err(|err| malformed("the target", &err))?;
            }
            Kind::Tree | Kind::Blob => return Err(PeelFailure::NotACommit),
        }
    }
}
