//! Packs written by hand, as a push may send them: `git index-pack` takes
//! any delta chain, however deep and through however large intermediate
//! objects, as long as the pack is well formed.

use std::io::Write;

use crate::git::RepoBuilder;

/// Pack entry types (`Documentation/gitformat-pack.txt`).
const OBJ_COMMIT: u8 = 1;
const OBJ_OFS_DELTA: u8 = 6;

/// Bytes of the base object every chain starts from (zeros, typed as a
/// commit: `index-pack` checks no object's syntax).
const BASE_BYTES: usize = 64 * 1024;

/// Stores `commit` (a commit object's text) in `repo` as the last delta of
/// a chain: a 64 KiB base, then `intermediates` objects of
/// `intermediate_bytes` each, each a delta of the one before, then
/// `commit` as a delta of the last. The pack is a few KiB; `index-pack`
/// hashes every intermediate, as `receive-pack` does on a push. Points
/// `refs/heads/{branch}` at the commit, and returns its id.
pub fn commit_behind_deltas(
    repo: &RepoBuilder,
    branch: &str,
    commit: &[u8],
    intermediate_bytes: usize,
    intermediates: usize,
) -> String {
    assert!(intermediates >= 1 && intermediate_bytes >= BASE_BYTES);
    let mut entries: Vec<Vec<u8>> = Vec::new();
    entries.push(entry(OBJ_COMMIT, BASE_BYTES, &zlib(&vec![0u8; BASE_BYTES])));
    let mut previous = BASE_BYTES;
    for index in 0..intermediates {
        let mut delta = sizes(previous, intermediate_bytes);
        // Zeros copied from the start of its base, 64 KiB at a time, then
        // a tag unique to this object.
        let kept = intermediate_bytes - 16;
        let mut written = 0;
        while written < kept {
            let size = (kept - written).min(BASE_BYTES);
            copy(&mut delta, 0, size);
            written += size;
        }
        insert(&mut delta, format!("{index:015}\n").as_bytes());
        entries.push(delta_entry(&delta));
        previous = intermediate_bytes;
    }
    let mut last = sizes(previous, commit.len());
    insert(&mut last, commit);
    entries.push(delta_entry(&last));

    let mut pack = b"PACK".to_vec();
    pack.extend_from_slice(&2u32.to_be_bytes());
    pack.extend_from_slice(&u32::try_from(entries.len()).unwrap().to_be_bytes());
    let mut previous_offset = None;
    for entry in entries {
        let here = pack.len();
        let mut entry = entry;
        if let Some(base) = previous_offset {
            // An OFS_DELTA's header is followed by the distance back to its base.
            let header_end = entry.iter().position(|byte| byte & 0x80 == 0).unwrap() + 1;
            let distance = ofs_distance(here - base);
            entry.splice(header_end..header_end, distance);
        }
        pack.extend_from_slice(&entry);
        previous_offset = Some(here);
    }
    let sum = crate::pipe_through("sha1sum", &[], &pack);
    pack.extend_from_slice(&hex::decode(&sum[..40]).unwrap());

    repo.git_with_input(None, &["index-pack", "--stdin", "--keep"], &pack);
    // Literally: the commit may be one git would refuse to make.
    let id = repo.git_with_input(
        None,
        &["hash-object", "-t", "commit", "--literally", "--stdin"],
        commit,
    );
    repo.git(&["update-ref", &format!("refs/heads/{branch}"), &id]);
    id
}

/// A delta entry: its header (the distance to its base is put in when the
/// pack is laid out) and its compressed instructions.
fn delta_entry(delta: &[u8]) -> Vec<u8> {
    entry(OBJ_OFS_DELTA, delta.len(), &zlib(delta))
}

/// A pack entry: its type and size header, then its compressed data.
fn entry(kind: u8, size: usize, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut byte = (kind << 4) | (size & 0x0f) as u8;
    let mut rest = size >> 4;
    while rest > 0 {
        out.push(byte | 0x80);
        byte = (rest & 0x7f) as u8;
        rest >>= 7;
    }
    out.push(byte);
    out.extend_from_slice(data);
    out
}

fn ofs_distance(mut distance: usize) -> Vec<u8> {
    let mut out = vec![(distance & 0x7f) as u8];
    distance >>= 7;
    while distance > 0 {
        distance -= 1;
        out.insert(0, 0x80 | (distance & 0x7f) as u8);
        distance >>= 7;
    }
    out
}

fn varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A delta's header: its base's size and its result's.
fn sizes(base: usize, result: usize) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, base);
    varint(&mut out, result);
    out
}

/// A copy instruction: `size` bytes (at most 2^24 - 1) from `offset` of the base.
/// A size of 0x10000 may be written as no size at all; it is written whole.
fn copy(out: &mut Vec<u8>, offset: usize, size: usize) {
    let mut instruction = 0x80u8;
    let mut operands = Vec::new();
    for (index, byte) in offset.to_le_bytes()[..4].iter().enumerate() {
        if *byte != 0 {
            instruction |= 1 << index;
            operands.push(*byte);
        }
    }
    for (index, byte) in size.to_le_bytes()[..3].iter().enumerate() {
        if *byte != 0 {
            instruction |= 0x10 << index;
            operands.push(*byte);
        }
    }
    out.push(instruction);
    out.extend_from_slice(&operands);
}

/// Insert instructions for `data`, 127 bytes at most each.
fn insert(out: &mut Vec<u8>, data: &[u8]) {
    for chunk in data.chunks(127) {
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}
