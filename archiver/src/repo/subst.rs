//! Whether a commit's tree uses `export-subst`: a walk of its trees for a
//! `.gitattributes` that mentions it, bounded in what it reads, with the
//! trees found clean and the attributes blobs judged kept for the process
//! (both are named by their content, so the answers hold in every
//! repository).

use std::{
    collections::HashSet,
    num::NonZeroUsize,
    sync::{Mutex, PoisonError},
};

use gix::{hash::ObjectId, object::Kind};
use lru::LruCache;

use crate::error::Error;

/// How many tree ids `CLEAN_TREES` keeps (about 80 bytes each).
pub(super) const CLEAN_TREE_IDS: NonZeroUsize = match NonZeroUsize::new(64 * 1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// Trees in whose whole subtree no `.gitattributes` mentions `export-subst`.
/// A tree id names its content, so the fact holds in every repository: one
/// memo for the process, bounded. Without it, the first request for each
/// new commit walked every tree object before git was started (2,161 trees,
/// about 9 ms, on the benchmark's repository), though a new commit shares
/// almost all of its trees with the one before.
pub(super) static CLEAN_TREES: std::sync::LazyLock<Mutex<LruCache<ObjectId, ()>>> =
    std::sync::LazyLock::new(|| Mutex::new(LruCache::new(CLEAN_TREE_IDS)));

/// Attributes blobs already judged, and whether they mention
/// `export-subst`: a blob's answer is its content's, so it is kept for the
/// process (bounded). A walk stopped by its budget (`Busy`) leaves what it
/// judged here, so the next request goes on past it.
pub(super) static JUDGED_BLOBS: std::sync::LazyLock<Mutex<LruCache<ObjectId, bool>>> =
    std::sync::LazyLock::new(|| Mutex::new(LruCache::new(JUDGED_BLOB_IDS)));

/// How many blob answers `JUDGED_BLOBS` keeps: more than one walk can judge
/// (`ATTRIBUTES_BYTES_PER_WALK` / `MIN_BLOB_CHARGE`), 40 bytes each.
pub(super) const JUDGED_BLOB_IDS: NonZeroUsize = match NonZeroUsize::new(64 * 1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// What each blob read costs the walk's budget at least.
pub(super) const MIN_BLOB_CHARGE: u64 = 4 * 1024;

/// git ignores an attributes file of this size or more
/// (`ATTR_MAX_FILE_SIZE`).
pub(super) const GIT_MAX_ATTRIBUTES_BYTES: u64 = 100 * 1024 * 1024;

/// The largest attributes blob read to see whether it mentions
/// `export-subst`; a larger one is taken as mentioning it.
pub(super) const MAX_ATTRIBUTES_BLOB_BYTES: u64 = 1024 * 1024;

/// The attributes bytes one walk of a tree reads at most; past them, the
/// request is answered busy and the next one goes on.
pub(super) const ATTRIBUTES_BYTES_PER_WALK: u64 = 64 * 1024 * 1024;

/// Whether some `.gitattributes` under `root` mentions `export-subst`, and
/// how many tree objects were read to find out. Subtrees in `clean` are not
/// read; every subtree found clean is added to it. Iterative (depth-first),
/// so a deeply nested tree cannot overflow the stack.
pub(super) fn tree_substitutes(
    repo: &gix::Repository,
    root: ObjectId,
    clean: &Mutex<LruCache<ObjectId, ()>>,
) -> Result<(bool, usize), Error> {
    /// A tree being walked: its id and the subtrees not yet visited;
    /// `cacheable` when none of them waits elsewhere in the walk (only a
    /// tree whose every subtree this walk saw clean is kept as clean).
    struct Frame {
        id: ObjectId,
        subtrees: Vec<ObjectId>,
        cacheable: bool,
    }
    let is_clean = |id: &ObjectId| {
        clean
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .is_some()
    };
    // The bytes of attributes blobs this walk may still read.
    let mut budget = ATTRIBUTES_BYTES_PER_WALK;
    // Trees read and found clean but not kept as clean while the walk ran
    // (a subtree of theirs waited elsewhere): all proven clean when the
    // whole walk finds nothing.
    let mut unproven: Vec<ObjectId> = Vec::new();
    // Every tree this walk has put on its stack, and those it found clean:
    // each is read once, and what waits to be read is at most the distinct
    // trees a push holds (attack: 1,000 nested trees of 100,000 entries
    // naming one empty tree, a 300 KB push, held 2 GB of ids and aborted
    // the archiver).
    let seen: std::cell::RefCell<HashSet<ObjectId>> = Default::default();
    let done: std::cell::RefCell<HashSet<ObjectId>> = Default::default();
    // `None`: the tree has a `.gitattributes` that mentions `export-subst`.
    let mut read = |id: ObjectId| -> Result<Option<Frame>, Error> {
        let tree = repo
            .find_tree(id)
            .map_err(|err| Error::internal(format_args!("tree {id}: {err}")))?;
        let mut subtrees = Vec::new();
        let mut cacheable = true;
        for entry in tree.iter() {
            let entry = entry.map_err(|err| Error::internal(format_args!("tree {id}: {err}")))?;
            if entry.mode().is_tree() {
                let subtree = entry.object_id();
                if done.borrow().contains(&subtree) {
                    continue;
                }
                if seen.borrow().contains(&subtree) {
                    // Waiting in another tree's list (or read and not
                    // proven yet): read there.
                    cacheable = false;
                    continue;
                }
                if is_clean(&subtree) {
                    continue;
                }
                if seen.borrow_mut().insert(subtree) {
                    subtrees.push(subtree);
                } else {
                    // Waiting in another tree's list: read there.
                    cacheable = false;
                }
            } else if is_attributes_path(entry.filename()) {
                let blob = entry.object_id();
                let known = JUDGED_BLOBS
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&blob)
                    .copied();
                let mentions = match known {
                    Some(mentions) => mentions,
                    None => {
                        let mentions = mentions_export_subst(repo, &blob, &mut budget)?;
                        JUDGED_BLOBS
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .put(blob, mentions);
                        mentions
                    }
                };
                if mentions {
                    return Ok(None);
                }
            }
        }
        Ok(Some(Frame {
            id,
            subtrees,
            cacheable,
        }))
    };
    if is_clean(&root) {
        return Ok((false, 0));
    }
    let mut trees_read = 1;
    let Some(frame) = read(root)? else {
        return Ok((true, trees_read));
    };
    let mut stack = vec![frame];
    while let Some(frame) = stack.last_mut() {
        match frame.subtrees.pop() {
            Some(child) if is_clean(&child) => {}
            Some(child) => {
                trees_read += 1;
                match read(child)? {
                    Some(frame) => stack.push(frame),
                    None => return Ok((true, trees_read)),
                }
            }
            None => {
                // Every subtree of this one is clean, and so is it.
                // Unless a subtree of it waits elsewhere: then it stays
                // only seen, and a tree naming it is not kept clean either.
                let (id, cacheable) = (frame.id, frame.cacheable);
                stack.pop();
                if cacheable {
                    done.borrow_mut().insert(id);
                    clean
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .put(id, ());
                } else {
                    // Nor is the tree that names it (review: a parent of an
                    // unproven tree had been kept clean).
                    if let Some(parent) = stack.last_mut() {
                        parent.cacheable = false;
                    }
                    unproven.push(id);
                }
            }
        }
    }
    // Nothing mentions it anywhere: every tree read is clean.
    let mut clean = clean.lock().unwrap_or_else(PoisonError::into_inner);
    for id in unproven {
        clean.put(id, ());
    }
    Ok((false, trees_read))
}

/// Whether git reads a tree entry named `name` as a `.gitattributes` file.
/// git takes attributes from the index it builds of the tree, by path,
/// whatever the entry's mode: a symlink's target text or a gitlink's
/// object when it is a blob count too, and a name holding a slash
/// (`sub/.gitattributes`, which only a hand-made tree has) is the
/// attributes file of that path's directory.
pub(super) fn is_attributes_path(name: &gix::bstr::BStr) -> bool {
    name == ".gitattributes" || name.ends_with(b"/.gitattributes")
}

/// Whether the object `id` may give git `export-subst` for an attributes
/// entry: a blob that mentions it, or an object the repository does not
/// have, which a push could add as such a blob later (the answer is kept
/// per tree, and git would read it then: review). An object of another
/// kind (a gitlink's commit) gives git no attributes, and its kind never
/// changes.
///
/// Its size is looked up first, and `budget` (the bytes a walk may still
/// read) pays for what is read: a blob git ignores for its size (100 MiB
/// or more, `ATTR_MAX_FILE_SIZE`) gives nothing; one larger than
/// `MAX_ATTRIBUTES_BLOB_BYTES` is taken as mentioning it unread, which
/// only keys the archive by the refs too (attack: 1,500 trees sharing one
/// 8 MB attributes blob, read whole for each on a serving thread, took
/// 23 s and held every other request). Past the budget the walk stops
/// with `Busy`, its answer not kept: what it found clean is
/// (`CLEAN_TREES`), so the next request goes on from there, and the
/// answer depends on the tree alone, never on what a replica had cached
/// (review: a budget that answered "mentions" gave one commit two ETags).
pub(super) fn mentions_export_subst(
    repo: &gix::Repository,
    id: &gix::oid,
    budget: &mut u64,
) -> Result<bool, Error> {
    let header = repo
        .try_find_header(id)
        .map_err(|err| Error::internal(format_args!("object {id}: {err}")))?;
    let Some(header) = header else {
        return Ok(true);
    };
    if header.kind() != Kind::Blob || header.size() >= GIT_MAX_ATTRIBUTES_BYTES {
        return Ok(false);
    }
    if header.size() > MAX_ATTRIBUTES_BLOB_BYTES {
        return Ok(true);
    }
    let charge = header.size().max(MIN_BLOB_CHARGE);
    if charge > *budget {
        tracing::info!(
            "a tree's attributes files passed what one request reads; answering busy, the next goes on"
        );
        return Err(Error::Busy);
    }
    *budget -= charge;
    let object = repo
        .try_find_object(id)
        .map_err(|err| Error::internal(format_args!("object {id}: {err}")))?;
    Ok(object.is_none_or(|object| {
        object.kind == Kind::Blob
            && object
                .data
                .windows(12)
                .any(|window| window == b"export-subst")
    }))
}
