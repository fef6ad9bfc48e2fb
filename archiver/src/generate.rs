//! One generation: a `git archive` child whose stdout is compressed
//! in-process and written to a partial file in the cache.
//!
//! Invariants:
//! - Only a resolved commit id reaches git's command line (plus the prefix
//!   built from a validated ref, and a validated literal `path` after `--`).
//!   The child gets a clean environment, `stdin` null, its own process group
//!   (so a kill reaches anything it started), and its stderr is drained
//!   concurrently into a bounded buffer that goes to the log, never to a
//!   client. It is always waited for, whatever happens.
//! - git runs in a shadow git dir (`shadow`): no command that the
//!   repository's config defines (a `tar.<format>.command`, a filter driver)
//!   can run, and what git writes must start like the format asked for
//!   (`FormatCheck`), or the generation fails.
//! - The child is bounded by rlimits set between fork and exec: data
//!   segment (`--generation-memory-limit`: `export-subst` padding is
//!   expanded in memory) and CPU time (`--generation-timeout`), and it is
//!   killed when the archiver dies (`PR_SET_PDEATHSIG`), so a `SIGKILL`ed
//!   archiver leaves no git behind. A child killed by a limit fails the
//!   generation like any other failure.
//! - The archive is complete only when git exited 0 *and* the compressor
//!   finished writing; EOF on stdout alone proves nothing.
//! - Compressed bytes do not depend on timing: git's output is cut into
//!   fixed `INPUT_CHUNK_BYTES` pieces (whatever sizes the pipe delivers) and
//!   fed to the encoder block by block, never flushed (`compress`).
//!   Uncompressed formats are git's bytes as they are, passed on as they
//!   arrive (the first byte leaves with git's first).
//! - What an archive starts with whatever git writes is written and
//!   announced before git is spawned (`writes_ahead`): a tar.gz's gzip
//!   header, and a zip's first local header (the prefix directory, git's
//!   first entry; the zip writer then requires git's first entry to be
//!   exactly it). From that moment a failure, even of the spawn, aborts
//!   readers; it is never cached, like any failure.
//!   The encoders and their versions are pinned in the workspace; the golden
//!   tests fail if a dependency update changes a single byte.
//! - Readers see a length only after those bytes are in the file: the file is
//!   written with plain `write` syscalls (no user-space buffer after the
//!   encoder), and the length announced is what reached the file. Every
//!   write is announced as it is made (`Sink`), also those an encoder makes
//!   while it waits for its compressors: readers wait at most for the next
//!   block's compression, never for a whole queue of them.
//!
//! Compression runs off the runtime (a blocking thread, and for gzip its
//! own compression threads, see `compress`): at level 6 gzip costs ~10 ms
//! per MiB, which must not stall the workers that serve downloads.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::sync::CancellationToken;

pub use crate::compress::Compression;
use crate::compress::Encoder;
use gitball_core::slots::{Slot, Slots};
use gitball_core::url::Format;

/// git's output is handed to the compressor in pieces of exactly this size
/// (the last one shorter), which makes the compressed bytes independent of
/// pipe timing.
pub const INPUT_CHUNK_BYTES: usize = 128 * 1024;
/// How much of git's stderr is kept for the log.
pub const STDERR_KEEP_BYTES: usize = 4 * 1024;
/// The capacity of git's stdout pipe for a tar.zst (the kernel's default
/// is 64 KiB): git writes its tar into the pipe without waiting while the
/// writer waits for a free zstd worker. git's tar is the one part of a
/// generation that cannot be spread over cores, so each wait of git's
/// lengthens the generation: on 2 cores a cold tar.zst of the benchmark's
/// `bench/large` took 1.79-1.81 s instead of 1.99-2.08 with the same CPU
/// time (BENCHMARKS.md). tar.gz and zip queue up to 4 and 8 MiB of git's
/// output themselves, and their git did not wait.
pub const GIT_PIPE_BYTES: i32 = 1024 * 1024;

/// git pipes of [`GIT_PIPE_BYTES`] at once, at most. The kernel charges a
/// pipe's whole capacity to its user's `fs.pipe-user-pages-soft` (64 MiB by
/// default) for as long as it is open, and past that budget gives every
/// new pipe of the user two pages (8 KiB): 16 MiB here, as the proxy's spliced
/// downloads take at most, leaves half of the default to everything else
/// (both tiers run as one user in embedded mode). A generation beyond them
/// keeps the default pipe.
pub const MAX_WIDE_GIT_PIPES: usize = 16;
static WIDE_GIT_PIPES: Slots = Slots::new(MAX_WIDE_GIT_PIPES);

/// Everything that decides the bytes of an archive.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The repository's git dir (canonical): part of the cache key.
    pub git_dir: PathBuf,
    /// Where its objects and refs live (the git dir but for a linked work
    /// tree).
    pub common_dir: PathBuf,
    /// `owner/repo`, for logs only: the bytes do not depend on it.
    pub repository: String,
    pub commit: String,
    pub format: Format,
    /// `{repo}-{label}/`
    pub prefix: String,
    pub subtree: Option<String>,
    pub compression: Compression,
    /// The commit's committer time, Unix seconds: git's mtime for every
    /// entry. Decided by the commit, so not part of the variant; the zip's
    /// first entry is written from it before git starts.
    pub commit_time: i64,
    /// For a tree that asks for `export-subst`: the digest of the refs
    /// (`Repository::refs_digest`), whose state the bytes then depend on.
    pub refs: Option<String>,
    /// `--repos`, which the repository's layout must still stay under when
    /// the generation starts (`repo::layout_inside`); `None` for a
    /// repository the operator named alone. Not part of the bytes.
    pub confined_to: Option<PathBuf>,
    /// What of git's canary fingerprint differs from the reference git's
    /// and reaches this archive (`canary::TarWriter::current`); `None`: its
    /// bytes are the reference git's.
    pub tar_writer: Option<String>,
}

impl Spec {
    /// The variant part of the ETag and cache key: everything but the commit
    /// that changes the bytes (the refs too, when `export-subst` reads them).
    /// It starts with the format's gitball byte series (`byte_series`).
    pub fn variant(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(byte_series(self.format));
        hasher.update(b"\0");
        hasher.update(self.format.ext());
        hasher.update(b"\0");
        // `{:?}` of the compression, hashed as it is formatted.
        let _ = std::fmt::Write::write_fmt(
            &mut HashWriter(&mut hasher),
            format_args!("{:?}", self.compression),
        );
        hasher.update(b"\0");
        hasher.update(&self.prefix);
        hasher.update(b"\0");
        hasher.update(self.subtree.as_deref().unwrap_or(""));
        // Absent for every archive whose bytes depend on the commit alone,
        // so their variants (and ETags) are what they always were.
        if let Some(refs) = &self.refs {
            hasher.update(b"\0refs\0");
            hasher.update(refs);
            hasher.update(b"\0");
            hasher.update(SUBSTITUTION_SERIES);
        }
        // Absent for every archive whose commit time fits the ustar field.
        if self.format == Format::Zip && !fits_ustar_mtime(self.commit_time) {
            hasher.update(b"\0time\0");
            hasher.update(FAR_TIME_ZIP_SERIES);
        }
        // Absent for the reference git's tar writer (`canary`).
        if let Some(writer) = &self.tar_writer {
            hasher.update(b"\0git-tar\0");
            hasher.update(writer);
        }
        // The first 16 hex digits of the digest.
        let digest = hasher.finalize();
        format!("{}-{}", self.format.ext(), hex_string(&digest[..8]))
    }
}

/// Feeds what is formatted into a hash.
struct HashWriter<'a>(&'a mut Sha256);

impl std::fmt::Write for HashWriter<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.update(text);
        Ok(())
    }
}

/// Lower-case hex of `bytes`. `hex::encode` collects an iterator char by
/// char: it was 2 % of a small cache hit, which hexes two digests.
pub fn hex_string(bytes: &[u8]) -> String {
    let mut digits = vec![0; bytes.len() * 2];
    // The buffer is exactly twice as long as the input.
    let _ = hex::encode_to_slice(bytes, &mut digits);
    // Hex digits are ASCII.
    String::from_utf8(digits).unwrap_or_default()
}

/// The gitball byte series of a format: bumped whenever a change (a
/// compressor update, a new writer) changes its output bytes, so no cache
/// anywhere serves old bytes under a new ETag or the reverse. Part of the
/// variant, so of the ETag and the cache key: a file of an older series left
/// in the cache directory is under another key and never served.
///
/// - `v2` (tar, tar.gz): tar.gz compressed pigz-style on all cores.
/// - `v3` (zip, tar.zst): the zip written by the archiver from git's tar,
///   its entries deflated on all cores (`zip`); tar.zst compressed by zstd's
///   multi-threaded mode (`compress::zstd_encoder`) in 1 MiB jobs.
/// - `v4` (tar.zst): the same in 4 MiB jobs (`compress::ZSTD_JOB_BYTES`),
///   smaller and faster to make.
/// - `v5` (zip): every entry and block deflated on a fresh state; under v3
///   a thread's reused state could change the bytes of an entry over 1 MiB
///   with which thread got which block (attack), so a v3 file may hold
///   bytes no other run makes, and none is served as v5. A name holding
///   U+FFFE or U+FFFF no longer gets the UTF-8 flag (git refuses them).
/// - `v6` (zip): a symlink's target of up to 100 bytes is stored whole, as
///   git's zip stores it, not cut at its first NUL byte (attack). Only such
///   zips change, but v5 had been served: a v5 file of one is never served
///   as v6, nor resumed from under its ETag.
pub fn byte_series(format: Format) -> &'static str {
    match format {
        Format::Tar | Format::TarGz => "v2",
        Format::Zip => "v6",
        Format::TarZst => "v4",
    }
}

/// The byte series of what `export-subst` writes, part of the variant of
/// every archive whose tree asks for it (on top of its format's series).
/// Series 2 (December 2026): abbreviated ids are written whole and relative
/// dates are relative to the commit (`shadow::CONFIG`, [`command`]); in
/// series 1 both depended on things the refs digest does not cover (the
/// object count, other objects' prefixes, the clock).
/// Series 3 (December 2026): signature placeholders (`%G?`, `%GS`, …)
/// verify nothing (no signature program can run, `shadow::CONFIG`): `%G?`
/// is `N` on every host, where series 2 said what the host's keys said.
pub const SUBSTITUTION_SERIES: &str = "s3";

/// The byte series of a zip whose commit time does not fit the ustar
/// mtime field (after year 2242; only a forged date does), part of its
/// variant on top of the zip's series. Series `t2` (December 2026): its
/// entries carry the commit time, as git's zip does; in the series before,
/// the clamped time of git's tar headers (review: attack).
pub const FAR_TIME_ZIP_SERIES: &str = "t2";

/// Whether git's tar carries `time` in its ustar mtime field as it is
/// (`0o77777777777` at most; git clamps a later time and writes the real
/// one in its global pax header).
fn fits_ustar_mtime(time: i64) -> bool {
    (0..=0o777_7777_7777).contains(&time)
}

/// Limits one generation runs under.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub timeout: Duration,
    pub max_bytes: u64,
    /// The child's `RLIMIT_DATA` (heap and anonymous mappings), bytes;
    /// `None` for no limit.
    pub memory: Option<u64>,
}

/// Why a generation did not produce an archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No slot within `--queue-timeout`.
    Busy,
    /// Every request waiting for it left before it had its slot: it left
    /// the queue, and git never ran.
    Abandoned,
    /// git failed, or writing the file failed.
    Failed,
    Timeout,
    TooLarge,
    /// The server is shutting down.
    Cancelled,
    /// The refs an archive is keyed by (`Spec::refs`), or git's tar writer
    /// (`Spec::tar_writer`, `canary`), changed between the request and the
    /// generation's start.
    RefsChanged,
}

impl Failure {
    /// The `outcome` label of `generations_total`.
    pub fn outcome(self) -> &'static str {
        match self {
            Failure::Busy => "busy",
            Failure::Abandoned => "abandoned",
            Failure::Failed | Failure::Cancelled => "failed",
            Failure::Timeout => "timeout",
            Failure::TooLarge => "too_large",
            Failure::RefsChanged => "refs_changed",
        }
    }
}

/// A finished archive in its partial file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished {
    pub len: u64,
    pub sha256: [u8; 32],
}

/// Told a length in bytes; says whether the cache could make room.
pub type RoomFor = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// What the cache did for a write that found its file system full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// It evicted archives: the write is tried again.
    Made,
    /// The policy denied the generation room: the archives left are
    /// requested more often than it. The generation fails as too large,
    /// as when the bound denies it.
    Denied,
    /// Nothing is left that it may evict: the write fails.
    None,
}

/// Told the bytes a write that found the file system full needs.
pub type FullFor = Arc<dyn Fn(u64) -> Room + Send + Sync>;

/// Told a length in bytes readers may now read up to.
pub type Grown = Arc<dyn Fn(u64) + Send + Sync>;

/// How a generation tells the cache about the room its file takes.
pub struct Space {
    /// Called with the file's length after each write to it, before readers
    /// are told of the bytes (`grown`): the cache counts them and makes
    /// room for them within its bound as they reach the file, not when a
    /// compressor returns (a zstd write at level 19 can put megabytes in
    /// the file over a second or more). Returning `false` stops the
    /// generation as too large: the cache could not make room for it.
    pub used: RoomFor,
    /// Called with each new total length readers may read up to.
    pub grown: Grown,
    /// Called when a write finds the cache's file system full (`ENOSPC`,
    /// `EDQUOT`) with the bytes it needs: the cache evicts archives to make
    /// room and says what it did ([`Room`]). The write is then tried again;
    /// once nothing is left to evict, it fails, and a denial fails the
    /// generation as too large.
    pub full: FullFor,
    /// Kept with the file's write handle and let go just after it: the
    /// cache counts a failed generation's bytes as held for as long as
    /// this lives. The handle can outlive the generation's failure: an
    /// abandoned zstd stream is dropped on a thread of its own, file and
    /// all, once zstd's workers are done (seconds at level 19).
    pub writing: Arc<dyn std::any::Any + Send + Sync>,
}

/// Runs `git archive` for `spec`, in the git dir `shadow` (see `shadow`),
/// into `output`, the partial file as the cache created it, opened for
/// appending (`O_APPEND`). Reports the written length
/// through `space` as the file grows. On failure the child is killed and
/// reaped; removing the file is the caller's job. `git_unchanged` says
/// whether the binary is still the one the request's fingerprint was
/// checked of (`canary`). It is asked before anything reaches readers and
/// again once git has started (exec done); false fails the generation as
/// `RefsChanged` before git writes a byte, and the first time, before a
/// byte written ahead reaches readers, so the request is resolved again.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    git: &Path,
    spec: &Spec,
    shadow: &Path,
    output: std::fs::File,
    limits: Limits,
    space: Space,
    cancel: &CancellationToken,
    git_unchanged: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Finished, Failure> {
    let Space {
        used,
        grown: growth,
        full,
        writing,
    } = space;
    // Appending: a file cut short behind the archiver's back (an outsider,
    // a tmp cleaner) then ends shorter than what was written, which the
    // end checks, instead of a hole of zeros at the length written so far
    // (attack: such a file was cached and served as complete).
    let sink = Sink {
        file: output,
        len: 0,
        hasher: Sha256::new(),
        used,
        grown: growth,
        telling: false,
        told: 0,
        max_bytes: limits.max_bytes,
        full,
        _writing: writing,
    };
    // Replaced since the check (preparing the git dir can take long: a
    // snapshot of many refs), the generation must fail now, while no byte
    // of its answer has been given: after the bytes written ahead, its
    // readers hold a `200` under the old ETag, and only an abort is left
    // (attack: 52 of 60 tar.gz downloads cut so, git swapped as they
    // began).
    if !git_unchanged() {
        tracing::info!("git was replaced before the generation started");
        return Err(Failure::RefsChanged);
    }
    // What the output starts with whatever git writes (the gzip header,
    // the zip's prefix directory) reaches readers now, not after git's
    // start-up: starting git (fork of this multi-threaded process, exec,
    // git's own set-up) takes longer than `git archive` takes to its first
    // byte. From here on the response has begun, so a git that fails even
    // at once aborts it (never a clean end), and nothing is cached.
    // Other encoders are made by the writer thread, while git starts.
    let start = if writes_ahead(spec) {
        let mut encoder = Encoder::new(sink, spec.compression).map_err(write_failure)?;
        encoder
            .write_ahead(&spec.prefix, spec.commit_time)
            .map_err(write_failure)?;
        encoder.sink_mut().tell_readers();
        Start::Encoder(encoder)
    } else {
        Start::Sink(sink, spec.compression)
    };

    let mut command = command(git, spec, shadow);
    bound_child(&mut command, &limits);
    let mut child = command.spawn().map_err(|error| {
        tracing::error!(%error, "cannot spawn git");
        Failure::Failed
    })?;
    // `spawn` returns once exec succeeded: the binary running is the one
    // at the path then. Replaced since the check, it may write other bytes
    // than the key's fingerprint says.
    if !git_unchanged() {
        tracing::info!("git was replaced as the generation started");
        kill_group(&child);
        let _ = child.wait().await;
        return Err(Failure::RefsChanged);
    }
    let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        // Both were configured as pipes; a missing one is a bug, but never
        // leave the child behind.
        kill_group(&child);
        let _ = child.wait().await;
        return Err(Failure::Failed);
    };
    let stderr = tokio::spawn(drain_bounded(stderr));
    // Held until git is waited for and its pipe is closed.
    let _wide_pipe = matches!(spec.compression, Compression::Zstd(_))
        .then(|| widen_pipe(&stdout, &WIDE_GIT_PIPES))
        .flatten();

    // The writer thread owns the encoder and the file. Two chunks in flight
    // bound the memory to ~3 chunks whatever the archive's size.
    let (chunks, receiver) = mpsc::channel::<Chunk>(2);
    let writer = {
        let check = FormatCheck::new(spec.format);
        writer_thread(move || write_chunks(start, receiver, check))
    };
    let writer = match writer {
        Ok(writer) => writer,
        Err(error) => {
            tracing::error!(%error, "cannot start the writer thread");
            kill_group(&child);
            let _ = child.wait().await;
            return Err(Failure::Failed);
        }
    };

    let deadline = tokio::time::Instant::now() + limits.timeout;
    let pumped = tokio::select! {
        pumped = pump(&mut stdout, &chunks, spec.compression.needs_whole_blocks()) => pumped,
        // The writer stopped (too large, I/O error): git is stopped now,
        // not at its next write, which a git that pauses (a large blob
        // inflating, a stub) may make seconds later or never.
        () = chunks.closed() => Err(None),
        () = tokio::time::sleep_until(deadline) => Err(Some(Failure::Timeout)),
        () = cancel.cancelled() => Err(Some(Failure::Cancelled)),
    };
    drop(stdout);

    let status = match pumped {
        Ok(()) => tokio::select! {
            status = child.wait() => status.map_err(|_| Some(Failure::Failed)),
            () = tokio::time::sleep_until(deadline) => Err(Some(Failure::Timeout)),
            () = cancel.cancelled() => Err(Some(Failure::Cancelled)),
        },
        Err(failure) => Err(failure),
    };
    let status = match status {
        Ok(status) => status,
        Err(failure) => {
            kill_group(&child);
            let _ = child.wait().await;
            drop(chunks);
            let writer = writer.await.unwrap_or(Err(Failure::Failed));
            let _ = stderr.await;
            // A closed channel means the writer stopped first: its reason
            // (too large, I/O error) is the real one.
            return Err(failure.unwrap_or(match writer {
                Err(reason) => reason,
                Ok(_) => Failure::Failed,
            }));
        }
    };
    let stderr = stderr.await.unwrap_or_default();
    if !status.success() {
        // Escaped: it quotes the tree's paths, which a push chooses.
        tracing::warn!(
            %status,
            stderr = %gitball_core::log::untrusted(stderr.trim_end()),
            "git archive failed"
        );
        drop(chunks);
        let _ = writer.await;
        return Err(Failure::Failed);
    }
    // Only now, with git's exit status known, may the writer finish the
    // stream (gzip trailer, zstd epilogue).
    // (If the writer already stopped, the send fails and its result says why.)
    let _ = chunks.send(Chunk::End).await;
    drop(chunks);
    writer.await.unwrap_or(Err(Failure::Failed))
}

enum Chunk {
    Data(Bytes),
    /// git exited 0: finish the stream. Without it the writer aborts.
    End,
}

/// Reads git's stdout and hands it to the writer: in fixed-size pieces when
/// a compressor follows (`whole_blocks`), as it arrives otherwise.
/// `Err(None)`: the writer closed its end (too large, I/O error) and its
/// result says why.
async fn pump(
    stdout: &mut (impl AsyncRead + Unpin),
    chunks: &mpsc::Sender<Chunk>,
    whole_blocks: bool,
) -> Result<(), Option<Failure>> {
    loop {
        let mut buffer = BytesMut::with_capacity(INPUT_CHUNK_BYTES);
        let mut at_end = false;
        while buffer.len() < INPUT_CHUNK_BYTES {
            let read = stdout
                .read_buf(&mut buffer)
                .await
                .map_err(|_| Some(Failure::Failed))?;
            if read == 0 {
                at_end = true;
                break;
            }
            // Uncompressed bytes are git's own whatever the cut: pass them
            // on as they come, so the first byte leaves with git's first.
            if !whole_blocks {
                break;
            }
        }
        if !buffer.is_empty() && chunks.send(Chunk::Data(buffer.freeze())).await.is_err() {
            return Err(None);
        }
        if at_end {
            return Ok(());
        }
    }
}

/// Gives git's stdout pipe [`GIT_PIPE_BYTES`] if one of `places` is free;
/// the place is held as long as the pipe is wide. Refused (a lower
/// `fs.pipe-max-size`, the user's pipe budget used up), the pipe keeps its
/// size: the generation is the same, only slower; logged once.
fn widen_pipe(pipe: &impl std::os::fd::AsFd, places: &'static Slots) -> Option<Slot> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let place = places.take()?;
    match nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(GIT_PIPE_BYTES)) {
        Ok(_) => Some(place),
        Err(error) => {
            WARNED.call_once(|| {
                tracing::warn!(%error, "git's stdout pipe keeps the kernel's default size; tar.zst generations run slower");
            });
            None
        }
    }
}

/// Whether the spec's archive starts with bytes written before git runs:
/// the tar.gz (the gzip header, which depends on nothing); the zip, when
/// git's tar will carry the commit time as it is (the ustar mtime field
/// holds up to `0o77777777777`; git clamps a later time).
fn writes_ahead(spec: &Spec) -> bool {
    match spec.compression {
        Compression::Gzip(_) => true,
        Compression::Zip(_) => fits_ustar_mtime(spec.commit_time),
        Compression::None | Compression::Zstd(_) => false,
    }
}

/// Runs `write` on a thread of its own at the compressors' lower priority
/// (`compress::lower_this_thread`): the encoder it makes, and zstd's
/// workers that start from it, compress there. Not on one of tokio's
/// blocking threads, which are reused for other work and would keep the
/// lower priority; but a blocking task waits for it, so the runtime still
/// counts the writing as blocking work in flight (a paused test clock does
/// not jump ahead of it). A panic on the thread is a failed generation.
fn writer_thread(
    write: impl FnOnce() -> Result<Finished, Failure> + Send + 'static,
) -> io::Result<tokio::task::JoinHandle<Result<Finished, Failure>>> {
    let thread = std::thread::Builder::new()
        .name("gitball-writer".into())
        .spawn(move || {
            crate::compress::lower_this_thread();
            write()
        })?;
    Ok(tokio::task::spawn_blocking(move || {
        thread.join().unwrap_or(Err(Failure::Failed))
    }))
}

/// What the writer thread starts from.
enum Start {
    /// The file, and the encoder to make for it.
    Sink(Sink, Compression),
    /// An encoder that already wrote (`Encoder::write_ahead`).
    Encoder(Encoder<Sink>),
}

/// The blocking half: format check → encoder → counting file writer, which
/// tells readers of every write once git's output was recognised (the
/// bytes written ahead of git were told before it ran).
fn write_chunks(
    start: Start,
    mut chunks: mpsc::Receiver<Chunk>,
    mut check: FormatCheck,
) -> Result<Finished, Failure> {
    let mut encoder = match start {
        Start::Sink(sink, compression) => Encoder::new(sink, compression).map_err(write_failure)?,
        Start::Encoder(encoder) => encoder,
    };
    loop {
        let chunk = match chunks.try_recv() {
            Ok(chunk) => Some(chunk),
            // git's pipe is idle: finished compression work goes out now
            // rather than with git's next bytes (the zip writer).
            Err(TryRecvError::Empty) if encoder.has_pending() => {
                encoder.write_pending().map_err(write_failure)?;
                continue;
            }
            Err(TryRecvError::Empty) => chunks.blocking_recv(),
            Err(TryRecvError::Disconnected) => None,
        };
        match chunk {
            Some(Chunk::Data(data)) => {
                let passed = check.pass(data)?;
                // Nothing of git's is told (so no reader sees a byte of it)
                // before the format was recognised; from then on, every
                // write is.
                if check.passed {
                    encoder.sink_mut().tell_readers();
                }
                for data in passed {
                    encoder.write_block(data).map_err(write_failure)?;
                }
            }
            Some(Chunk::End) => {
                check.finish()?;
                // The sink counted (and bounded) every byte as written, and
                // told readers of each write.
                let sink = encoder.finish().map_err(write_failure)?;
                let on_disk = sink.file.metadata().map_err(io_failure)?.len();
                if on_disk != sink.len {
                    tracing::error!(
                        written = sink.len,
                        on_disk,
                        "the partial file was changed behind the archiver's back; not cached"
                    );
                    return Err(Failure::Failed);
                }
                return Ok(Finished {
                    len: sink.len,
                    sha256: sink.hasher.finalize().into(),
                });
            }
            None => return Err(Failure::Failed),
        }
    }
}

/// What git's output must start with, checked before any of it is written:
/// git is always asked for its tar (the zip is written from it), whose first
/// header carries `ustar` at offset 257. Git only writes something else when
/// something other than its own writer ran.
///
/// Chunks are held back whole (never re-cut: the compressed bytes depend on
/// the cut) until enough bytes arrived to tell.
struct FormatCheck {
    format: Format,
    held: Vec<Bytes>,
    held_bytes: usize,
    passed: bool,
}

/// Bytes needed to recognise a tar header (`ustar` at 257..262).
const TAR_MAGIC_END: usize = 262;

impl FormatCheck {
    fn new(format: Format) -> FormatCheck {
        FormatCheck {
            format,
            held: Vec::new(),
            held_bytes: 0,
            passed: false,
        }
    }

    /// The chunks that may be written now.
    fn pass(&mut self, data: Bytes) -> Result<Vec<Bytes>, Failure> {
        if self.passed {
            return Ok(vec![data]);
        }
        self.held_bytes += data.len();
        self.held.push(data);
        if self.held_bytes < TAR_MAGIC_END {
            return Ok(Vec::new());
        }
        self.verify()?;
        Ok(std::mem::take(&mut self.held))
    }

    /// git exited 0: whatever it wrote must have been recognised by now
    /// (fewer bytes than a header are no archive at all).
    fn finish(&mut self) -> Result<(), Failure> {
        if self.passed {
            return Ok(());
        }
        tracing::error!(
            format = self.format.git_format(),
            bytes = self.held_bytes,
            "git's output is too short to be an archive; refused"
        );
        Err(Failure::Failed)
    }

    fn verify(&mut self) -> Result<(), Failure> {
        let head: Vec<u8> = self
            .held
            .iter()
            .flat_map(|chunk| chunk.iter().copied())
            .take(TAR_MAGIC_END)
            .collect();
        let ok = head.len() >= TAR_MAGIC_END && &head[257..262] == b"ustar";
        if !ok {
            tracing::error!(
                format = self.format.git_format(),
                "git's output is not the format asked for; refused"
            );
            return Err(Failure::Failed);
        }
        self.passed = true;
        Ok(())
    }
}

/// Sets the child's limits between fork and exec: `RLIMIT_DATA` and
/// `RLIMIT_CPU`, and `SIGKILL` when the archiver dies.
///
/// `PR_SET_PDEATHSIG` fires when the thread that forked exits; the fork
/// happens on a runtime worker thread, which lives as long as the archiver.
fn bound_child(command: &mut Command, limits: &Limits) {
    use nix::sys::resource::{Resource, setrlimit};
    let parent = std::process::id();
    let memory = limits.memory;
    // git is mostly single-threaded: CPU time beyond the wall-clock timeout
    // is a runaway.
    let cpu_seconds = limits.timeout.as_secs().saturating_add(1);
    let hook = move || -> io::Result<()> {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        // The archiver may have died before the line above: then no signal
        // will come.
        if nix::unistd::getppid().as_raw() as u32 != parent {
            // Not `io::Error::other`: nothing may allocate here.
            return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
        }
        // SIGXCPU would dump core: a runaway git leaves nothing on disk.
        setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
        if let Some(bytes) = memory {
            setrlimit(Resource::RLIMIT_DATA, bytes, bytes)?;
        }
        setrlimit(Resource::RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)?;
        Ok(())
    };
    #[allow(unsafe_code)]
    // SAFETY: the hook runs in the forked child before exec. It only makes
    // system calls (prctl, getppid, setrlimit) and allocates nothing, so it
    // is async-signal-safe as `pre_exec` requires.
    unsafe {
        command.pre_exec(hook);
    }
}

fn io_failure(error: io::Error) -> Failure {
    tracing::error!(%error, "writing the archive failed");
    Failure::Failed
}

/// Why a [`Sink`] write failed when the file may not grow: past
/// `--max-archive-bytes`, or no room in the cache.
#[derive(Debug, thiserror::Error)]
#[error("the archive is too large")]
struct NoRoom;

/// A failed write through the encoder: too large when the sink said so
/// (the encoders pass its error on as it is), else an I/O failure.
fn write_failure(error: io::Error) -> Failure {
    if error.get_ref().is_some_and(|inner| inner.is::<NoRoom>()) {
        Failure::TooLarge
    } else {
        io_failure(error)
    }
}

/// Whether `error` says the file system is full (`ENOSPC`, `EDQUOT`).
pub fn is_full(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// The file end of the pipeline: counts and hashes what reaches the file.
struct Sink {
    file: std::fs::File,
    len: u64,
    hasher: Sha256,
    /// Told `len` after each write ([`Space::used`]).
    used: RoomFor,
    /// Told `len` after each write once `telling` ([`Space::grown`]): readers
    /// learn of every piece as it reaches the file, also of those an encoder
    /// writes while it waits for its compressors (a full queue, the last
    /// blocks after git ended) or several of at once (zstd's jobs), not
    /// only when the encoder returns.
    grown: Grown,
    /// Whether readers may be told: from the bytes written ahead of git, or
    /// from git's first recognised bytes (`FormatCheck`).
    telling: bool,
    /// The length readers were last told.
    told: u64,
    /// `--max-archive-bytes`: a write that passes it fails, so the file
    /// ends at most one write past it.
    max_bytes: u64,
    full: FullFor,
    /// After `file`, so dropped after it is closed ([`Space::writing`]).
    _writing: Arc<dyn std::any::Any + Send + Sync>,
}

impl Sink {
    /// Readers may be told from now on: tells them what the file holds, and
    /// then each write as it is made.
    fn tell_readers(&mut self) {
        self.telling = true;
        self.tell();
    }

    fn tell(&mut self) {
        if self.telling && self.len != self.told {
            (self.grown)(self.len);
            self.told = self.len;
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Each retry follows an eviction of at least one archive: bounded.
        let n = loop {
            match self.file.write(buf) {
                Err(error) if is_full(&error) => match (self.full)(buf.len() as u64) {
                    Room::Made => {}
                    Room::Denied => return Err(io::Error::other(NoRoom)),
                    Room::None => return Err(error),
                },
                written => break written?,
            }
        };
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        // Counted first, whatever follows: what a failure holds is all of
        // the file.
        let room = (self.used)(self.len);
        if !room || self.len > self.max_bytes {
            return Err(io::Error::other(NoRoom));
        }
        self.tell();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The `git archive` command line: nothing from the user but the validated
/// prefix and literal path; the commit is a resolved id. git runs in the
/// `shadow` git dir, so no configuration the repository carries applies.
pub fn command(git: &Path, spec: &Spec, shadow: &Path) -> Command {
    let mut command = git_command(git);
    command
        // "Now" for `export-subst`'s relative and human dates (`%cr`, `%ar`,
        // `%ch`, `%ah`): the commit's time, so they read the same whenever
        // the archive is made ("0 seconds ago" for `%cr`) instead of
        // following the clock. git's date code reads this variable (meant
        // for git's own tests) where it asks for the time to compare a date
        // with; `tests/security.rs` fails if a git stops reading it. Nothing
        // else of `git archive`'s reads the clock.
        .env("GIT_TEST_DATE_NOW", spec.commit_time.to_string())
        // And the zone those compare in: the host's would make replicas in
        // other zones write other bytes.
        .env("TZ", "UTC")
        .arg("--no-replace-objects")
        .arg("--literal-pathspecs")
        .arg(format!("--git-dir={}", shadow.display()))
        .arg("archive")
        .arg(format!("--format={}", spec.format.git_format()))
        .arg(format!("--prefix={}", spec.prefix))
        .arg(&spec.commit);
    if let Some(subtree) = &spec.subtree {
        command.arg("--").arg(subtree);
    }
    command
}

/// A `git` command as the archiver runs every git: an environment with
/// nothing of the server's and no configuration but the git dir's own,
/// stdin from `/dev/null`, stdout and stderr piped, in a process group of
/// its own (a kill reaches anything it starts), killed if dropped.
pub fn git_command(git: &Path) -> Command {
    let mut command = Command::new(git);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env_clear()
        // No program can be found: git runs its own commands from its exec
        // path, which it puts first itself, and anything else it would run
        // by name (a signature placeholder's `gpg`, `gpgsm`, `ssh-keygen`
        // on git before 2.41, which does not read `gpg.program` in
        // `git archive`: `shadow::CONFIG`) is not found (review).
        .env("PATH", "/dev/null")
        .env("HOME", "/nonexistent")
        .env("LC_ALL", "C")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_ATTR_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0");
    command
}

/// Kills the child's whole process group (it leads its own group).
fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Reads stderr to its end, keeping the first `STDERR_KEEP_BYTES`.
async fn drain_bounded(mut stderr: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stderr.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = STDERR_KEEP_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Finds `git` on the server's own `PATH` once, at start-up.
pub fn find_git() -> io::Result<PathBuf> {
    find_program(Path::new("git"))
}

/// `program` as `--git` names it: a bare name is looked up on the
/// server's own `PATH` once, at start-up, since git's children get a `PATH`
/// that finds nothing ([`command`]; review: `--git git` failed every
/// generation); a path is taken as it is.
pub fn find_program(program: &Path) -> io::Result<PathBuf> {
    if program.components().count() != 1 || program.is_absolute() {
        return Ok(program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found on PATH", program.display()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::sync::Mutex;

    /// `path`, opened as the cache opens a partial file for a generation.
    fn appending(path: &Path) -> std::fs::File {
        std::fs::OpenOptions::new().append(true).open(path).unwrap()
    }

    /// Every `outcome` a finished generation is counted with is in
    /// `docs/observability.md`'s label values for `generations_total`; a
    /// busy or abandoned one never ran and is never counted there. (Docs
    /// review.)
    #[test]
    fn every_generation_outcome_is_documented() {
        let docs = include_str!("../../docs/observability.md");
        let row = docs
            .lines()
            .find(|line| line.starts_with("| `outcome` on `generations_total` |"))
            .expect("the generations_total outcome row");
        let finished = [
            Failure::Failed,
            Failure::Timeout,
            Failure::TooLarge,
            Failure::Cancelled,
            Failure::RefsChanged,
        ];
        for outcome in std::iter::once("ok").chain(finished.map(Failure::outcome)) {
            assert!(
                row.contains(&format!("`{outcome}`")),
                "generations_total{{outcome=\"{outcome}\"}} is not documented"
            );
        }
        for failure in finished {
            // Exhaustive: a new variant must be added above.
            match failure {
                Failure::Busy
                | Failure::Abandoned
                | Failure::Failed
                | Failure::Timeout
                | Failure::TooLarge
                | Failure::Cancelled
                | Failure::RefsChanged => {}
            }
        }
    }

    /// `docs/archiver.md` gives the wide git pipes and the stderr kept as
    /// these constants.
    /// (Docs review: a figure changed on one side only had nothing to
    /// fail.)
    #[test]
    fn the_figures_docs_give_for_git_s_pipe_and_stderr_are_these_constants() {
        gitball_core::docs::assert_says(
            include_str!("../../docs/archiver.md"),
            "docs/archiver.md",
            [
                format!("into a pipe of {} MiB", GIT_PIPE_BYTES >> 20),
                format!("at most {MAX_WIDE_GIT_PIPES} generations at once get the wide pipe"),
                format!(
                    "`generate::MAX_WIDE_GIT_PIPES`, {} MiB",
                    (MAX_WIDE_GIT_PIPES * (GIT_PIPE_BYTES as usize)) >> 20
                ),
                format!("the first {} KiB go to the log", STDERR_KEEP_BYTES >> 10),
            ],
        );
    }

    /// A bare `--git` name is found on the server's `PATH` at start-up (git
    /// itself gets a `PATH` that finds nothing); a path is taken as is.
    #[test]
    fn a_bare_program_name_is_found_on_the_servers_path() {
        let found = find_program(Path::new("sh")).unwrap();
        assert!(found.is_absolute() && found.ends_with("sh"), "{found:?}");
        assert_eq!(
            find_program(Path::new("/opt/git/bin/git")).unwrap(),
            Path::new("/opt/git/bin/git")
        );
        assert_eq!(
            find_program(Path::new("./git")).unwrap(),
            Path::new("./git")
        );
        assert!(find_program(Path::new("no-such-program-gitball")).is_err());
    }

    #[test]
    fn git_writes_a_tar_zst_into_a_pipe_of_a_mebibyte_while_places_last() {
        static TWO: Slots = Slots::new(2);
        let size = |pipe: &std::os::fd::OwnedFd| {
            nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap()
        };
        // What the kernel allows this user (root: any size).
        let allowed = rustix::process::geteuid().is_root()
            || std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
                .ok()
                .and_then(|max| max.trim().parse::<i32>().ok())
                .is_some_and(|max| max >= GIT_PIPE_BYTES);
        let pipes: Vec<_> = (0..3).map(|_| nix::unistd::pipe().unwrap().0).collect();
        let before = size(&pipes[0]);
        let first = widen_pipe(&pipes[0], &TWO);
        if !allowed {
            assert!(size(&pipes[0]) >= before);
            return;
        }
        assert!(first.is_some());
        assert_eq!(size(&pipes[0]), GIT_PIPE_BYTES);
        let second = widen_pipe(&pipes[1], &TWO).expect("a second place");
        assert!(
            widen_pipe(&pipes[2], &TWO).is_none(),
            "a third place out of two"
        );
        assert_eq!(size(&pipes[2]), before, "the third pipe kept its size");
        drop((first, second));
        assert_eq!(TWO.held(), 0);
    }

    /// The variant as it was first written (`hex::encode` of the whole
    /// digest, `format!` of the compression): ETags and cache keys must not
    /// change with the way they are computed.
    fn variant_as_first_written(spec: &Spec) -> String {
        let mut hasher = Sha256::new();
        hasher.update(byte_series(spec.format));
        hasher.update(b"\0");
        hasher.update(spec.format.ext());
        hasher.update(b"\0");
        hasher.update(format!("{:?}", spec.compression));
        hasher.update(b"\0");
        hasher.update(&spec.prefix);
        hasher.update(b"\0");
        hasher.update(spec.subtree.as_deref().unwrap_or(""));
        if let Some(refs) = &spec.refs {
            hasher.update(b"\0refs\0");
            hasher.update(refs);
            // Added with substitution series 2; series 1 had nothing here.
            hasher.update(b"\0");
            hasher.update(SUBSTITUTION_SERIES);
        }
        let digest = hex::encode(hasher.finalize());
        format!("{}-{}", spec.format.ext(), &digest[..16])
    }

    #[test]
    fn variants_are_what_they_always_were() {
        let mut spec = Spec {
            git_dir: "/repos/acme/widget.git".into(),
            common_dir: "/repos/acme/widget.git".into(),
            repository: "acme/widget".to_owned(),
            commit: "d09ef0477bd07b7eae1deee68c5f502d5e75a88b".to_owned(),
            format: Format::TarGz,
            prefix: "widget-1.0/".to_owned(),
            subtree: None,
            compression: Compression::Gzip(6),
            refs: None,
            commit_time: 1_700_000_000,
            confined_to: None,
            tar_writer: None,
        };
        assert_eq!(spec.variant(), variant_as_first_written(&spec));
        spec.format = Format::Zip;
        spec.compression = Compression::Zip(6);
        spec.subtree = Some("src/lib".to_owned());
        spec.refs = Some("ab".repeat(32));
        assert_eq!(spec.variant(), variant_as_first_written(&spec));
        // Any time the ustar field holds: the same variant.
        let fits = spec.variant();
        spec.commit_time = 0o777_7777_7777;
        assert_eq!(spec.variant(), fits);
        // A zip of a later commit time is of its own series (its entries
        // carry the real time now); another format's is not.
        spec.commit_time = 9_000_000_000;
        assert_ne!(spec.variant(), fits);
        spec.format = Format::Tar;
        spec.compression = Compression::None;
        let tar = spec.variant();
        spec.commit_time = 1_700_000_000;
        assert_eq!(spec.variant(), tar);
        // A git whose tar writer is not the reference one: its own
        // variant, for every format.
        for (format, compression) in [
            (Format::Tar, Compression::None),
            (Format::TarGz, Compression::Gzip(6)),
            (Format::TarZst, Compression::Zstd(3)),
            (Format::Zip, Compression::Zip(6)),
        ] {
            spec.format = format;
            spec.compression = compression;
            spec.tar_writer = None;
            let reference = spec.variant();
            spec.tar_writer = Some("0123456789abcdef".to_owned());
            assert_ne!(spec.variant(), reference, "{format:?}");
        }
        assert_eq!(hex_string(&[0x00, 0x9f, 0xff]), "009fff");
    }

    /// An uncompressed tar of a commit of `acme/widget`.
    fn widget_tar(refs: Option<String>) -> Spec {
        Spec {
            git_dir: "/repos/acme/widget.git".into(),
            common_dir: "/repos/acme/widget.git".into(),
            repository: "acme/widget".to_owned(),
            commit: "d09ef0477bd07b7eae1deee68c5f502d5e75a88b".to_owned(),
            format: Format::Tar,
            prefix: "widget-1.0/".to_owned(),
            subtree: None,
            compression: Compression::None,
            refs,
            commit_time: 1_700_000_000,
            confined_to: None,
            tar_writer: None,
        }
    }

    /// What `export-subst` writes of dates is decided by the commit: git
    /// compares them with the commit's time, in UTC, whatever the host's
    /// clock and zone (`tests/security.rs` checks the bytes).
    #[test]
    fn git_runs_in_utc_at_the_commits_time() {
        let spec = widget_tar(None);
        let command = command(Path::new("git"), &spec, Path::new("/shadow"));
        let envs: Vec<_> = command.as_std().get_envs().collect();
        assert!(envs.contains(&(OsStr::new("TZ"), Some(OsStr::new("UTC")))));
        assert!(envs.contains(&(
            OsStr::new("GIT_TEST_DATE_NOW"),
            Some(OsStr::new("1700000000"))
        )));
    }

    /// docs/archiver.md (clean child environment) and observability.md
    /// (generation log): git's stderr is drained to its end, so git never
    /// blocks on it, and its first 4 KiB go to the log. (Mutation review:
    /// keeping another amount passed every test.)
    #[tokio::test]
    async fn the_first_4_kib_of_gits_stderr_are_kept_and_the_rest_drained() {
        let stderr: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut reader = std::io::Cursor::new(stderr.clone());
        let kept = drain_bounded(&mut reader).await;
        assert_eq!(kept.as_bytes(), &stderr[..4096]);
        assert_eq!(reader.position(), 20_000, "not drained to its end");
    }

    /// A git replaced between the fingerprint's check and its start
    /// (`canary`): the generation fails as `RefsChanged`, with nothing
    /// written, not even the bytes a tar.gz and a zip write ahead of git,
    /// which would have given the request a `200` under the old ETag.
    #[tokio::test]
    async fn a_git_replaced_before_it_started_writes_nothing() {
        for compression in [
            Compression::None,
            Compression::Gzip(6),
            Compression::Zip(6),
            Compression::Zstd(3),
        ] {
            a_git_replaced_before_it_started_writes_nothing_in(compression).await;
        }
    }

    async fn a_git_replaced_before_it_started_writes_nothing_in(compression: Compression) {
        let stub = crate::test_support::StubGit::printing(&[b'x'; 4096]);
        let mut spec = stub.spec(1);
        spec.compression = compression;
        spec.format = match compression {
            Compression::None => Format::Tar,
            Compression::Gzip(_) => Format::TarGz,
            Compression::Zip(_) => Format::Zip,
            Compression::Zstd(_) => Format::TarZst,
        };
        let partial = stub.cache_dir().join("partial");
        std::fs::create_dir_all(stub.cache_dir()).unwrap();
        std::fs::write(&partial, b"").unwrap();
        let grown = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let space = Space {
            grown: {
                let grown = grown.clone();
                Arc::new(move |len| {
                    grown.store(len, std::sync::atomic::Ordering::Relaxed);
                })
            },
            used: Arc::new(|_| true),
            full: Arc::new(|_| Room::None),
            writing: Arc::new(()),
        };
        let limits = Limits {
            timeout: Duration::from_secs(30),
            max_bytes: 1 << 20,
            memory: None,
        };
        let result = run(
            &stub.git(),
            &spec,
            &stub.git_dir(),
            appending(&partial),
            limits,
            space,
            &CancellationToken::new(),
            &|| false,
        )
        .await;
        assert_eq!(result, Err(Failure::RefsChanged), "{compression:?}");
        assert_eq!(
            grown.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{compression:?}: announced"
        );
        assert_eq!(
            std::fs::metadata(&partial).unwrap().len(),
            0,
            "{compression:?}: written"
        );
        assert!(stub.runs().is_empty(), "{compression:?}: git ran");
    }

    /// git's tar of a commit at the stub spec's time, prefix `repo-main/`,
    /// holding `bytes` of pseudo-random (incompressible) data in one file:
    /// what a generation of a large binary file compresses.
    fn tar_of_random_file(bytes: usize) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let output = std::process::Command::new("git")
                .args(args)
                .current_dir(dir.path())
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.com")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.com")
                .env("GIT_AUTHOR_DATE", "1234567890 +0000")
                .env("GIT_COMMITTER_DATE", "1234567890 +0000")
                .output()
                .unwrap();
            assert!(output.status.success(), "git {args:?}: {output:?}");
            output.stdout
        };
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let data: Vec<u8> = (0..bytes)
            .map(|_| {
                // xorshift64: incompressible, as a binary asset is.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        std::fs::write(dir.path().join("big.bin"), data).unwrap();
        git(&["init", "-q"]);
        git(&["add", "big.bin"]);
        git(&["commit", "-q", "-m", "big"]);
        git(&["archive", "--format=tar", "--prefix=repo-main/", "HEAD"])
    }

    /// docs/archiver.md (tailing readers): every write to the file is told
    /// to its readers as it reaches the file, also the writes made while
    /// the writer waits for the compressors (their queue is full, or git
    /// has ended and the last blocks are compressed) and zstd's output
    /// within one block. Told only when the encoder returned, the last
    /// 4 MiB of a tar.gz (the queue) or 8 MiB of a zip reached readers
    /// at once after all of it was compressed: on a loaded host, seconds
    /// of silence, past the proxies' `--header-timeout` (the fleet test's
    /// scenario 7 saw `the upstream sent nothing for 3s`, a cold zip).
    #[tokio::test]
    async fn every_write_of_a_generation_is_told_to_readers_as_it_reaches_the_file() {
        let tar = tar_of_random_file(6 << 20);
        let stub = crate::test_support::StubGit::without_header(&tar, 0);
        for (compression, format) in [
            (Compression::None, Format::Tar),
            (Compression::Gzip(6), Format::TarGz),
            (Compression::Zip(6), Format::Zip),
            (Compression::Zstd(3), Format::TarZst),
        ] {
            let mut spec = stub.spec(1);
            spec.compression = compression;
            spec.format = format;
            let partial = stub.cache_dir().join(format!("partial-{}", format.ext()));
            std::fs::create_dir_all(stub.cache_dir()).unwrap();
            std::fs::write(&partial, b"").unwrap();
            let written = Arc::new(Mutex::new(Vec::new()));
            let told = Arc::new(Mutex::new(Vec::new()));
            let space = Space {
                used: {
                    let written = written.clone();
                    Arc::new(move |len| {
                        written.lock().unwrap().push(len);
                        true
                    })
                },
                grown: {
                    let told = told.clone();
                    Arc::new(move |len| told.lock().unwrap().push(len))
                },
                full: Arc::new(|_| Room::None),
                writing: Arc::new(()),
            };
            let limits = Limits {
                timeout: Duration::from_secs(60),
                max_bytes: 64 << 20,
                memory: None,
            };
            let finished = run(
                &stub.git(),
                &spec,
                &stub.git_dir(),
                appending(&partial),
                limits,
                space,
                &CancellationToken::new(),
                &|| true,
            )
            .await
            .unwrap_or_else(|failure| panic!("{compression:?}: {failure:?}"));
            let written = written.lock().unwrap().clone();
            let told = told.lock().unwrap().clone();
            assert!(
                told.windows(2).all(|pair| pair[0] < pair[1]),
                "{compression:?}: told {told:?}"
            );
            assert_eq!(told.last(), Some(&finished.len), "{compression:?}");
            let untold: Vec<u64> = written
                .iter()
                .copied()
                .filter(|len| *len >= told[0] && !told.contains(len))
                .collect();
            let widest = told
                .windows(2)
                .map(|pair| pair[1] - pair[0])
                .max()
                .unwrap_or(0);
            assert!(
                untold.is_empty(),
                "{compression:?}: {} of {} writes not told to readers; they were told {} lengths, at most {widest} bytes apart",
                untold.len(),
                written.len(),
                told.len()
            );
        }
    }

    #[test]
    fn archives_that_substitute_left_substitution_series_1() {
        let spec = widget_tar(Some("ab".repeat(32)));
        // Series 1's variant of this spec, as served before: its files are
        // never served as series 2.
        let mut series_1 = Sha256::new();
        series_1.update(b"v2\0tar\0None\0widget-1.0/\0\0refs\0");
        series_1.update("ab".repeat(32));
        let series_1 = format!("tar-{}", &hex::encode(series_1.finalize())[..16]);
        assert_ne!(spec.variant(), series_1);
        // Nor series 2's (signatures verified by the host's programs).
        let mut series_2 = Sha256::new();
        series_2.update(b"v2\0tar\0None\0widget-1.0/\0\0refs\0");
        series_2.update("ab".repeat(32));
        series_2.update(b"\0s2");
        let series_2 = format!("tar-{}", &hex::encode(series_2.finalize())[..16]);
        assert_ne!(spec.variant(), series_2);
        assert_eq!(SUBSTITUTION_SERIES, "s3");
    }
}
