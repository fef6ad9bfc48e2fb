//! The in-process compressors for `tar.gz` and `tar.zst`, and why their
//! bytes never change.
//!
//! Archive bytes are pinned by checksums all over the world, so the output
//! depends on nothing but the input bytes, the level and the pinned
//! compressor versions: no timestamps, no thread timing, no pipe timing.
//! The caller feeds whole blocks of exactly `generate::INPUT_CHUNK_BYTES`
//! (the last one shorter), whatever sizes git's pipe delivered.
//!
//! gzip is the expensive one (about 85 MB/s per core with zlib-rs at level
//! 6, several times git's own tar speed), so it is compressed in parallel,
//! the way pigz does it: every input block is an independent deflate run
//! primed with the previous block's last 32 KiB as dictionary and closed
//! with a sync flush (byte-aligned, not final); the last block is finished.
//! The runs concatenate into one valid deflate stream inside one gzip
//! member, with the CRC-32 and length of the whole input in the trailer.
//! Which thread compresses a block cannot change its bytes: each run is a
//! function of (dictionary, block, level, last) alone, and the blocks are
//! written in input order.
//!
//! zstd runs in its multi-threaded mode, whose bytes do not depend on the
//! number of workers (`zstd_encoder`), and flushes once, after the first
//! block (`ZstdStream`).
//!
//! Compression yields the CPU to git and to cache hits: every thread that
//! compresses runs `COMPRESSION_NICE` below the archiver's other threads
//! (`lower_this_thread`).
//!
//! The compressors are driven synchronously (flate2's and zstd's `Write`
//! encoders on blocking threads) rather than through `async-compression`:
//! the parallel gzip needs to set each run's dictionary and end it with a
//! sync flush, which only the low-level encoder exposes, and an async
//! encoder would flush whenever its source returns `Pending`, making the
//! bytes depend on pipe timing.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use bytes::Bytes;

/// Added to the nice value of every thread that compresses a cold archive:
/// the generation's writer thread (and zstd's workers, which inherit it
/// from the thread that starts them) and the gzip and zip threads. On busy
/// cores the scheduler then gives git and the threads serving requests
/// (cache hits, readers of a growing file) about ten times the share of a
/// compressing thread; on idle ones nothing changes. A generation alone
/// does the same work in the same time; beside busy hits it takes longer
/// by the CPU the hits took (docs/archiver.md, "Compression yields to git
/// and to requests").
pub const COMPRESSION_NICE: i32 = 10;

/// Sets the calling thread's nice value (on Linux a thread's own, inherited
/// by the threads it starts) to `COMPRESSION_NICE` above the archiver's
/// main thread: the same whichever thread, lowered or not, started it.
/// Raising it needs no privilege; a failure (a seccomp filter, say) is
/// logged once and the thread compresses at its old priority.
pub(crate) fn lower_this_thread() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    // The main thread's id is the process id.
    let main = Some(rustix::process::getpid());
    let lowered = rustix::process::getpriority_process(main).and_then(|nice| {
        let thread = Some(rustix::thread::gettid());
        rustix::process::setpriority_process(thread, (nice + COMPRESSION_NICE).min(19))
    });
    if let Err(error) = lowered {
        WARNED.call_once(|| {
            tracing::warn!(%error, "cannot lower the compression threads' priority");
        });
    }
}

/// How git's tar is compressed (or, for `Zip`, rewritten as a zip whose
/// entries are deflated at that level, see `zip`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip(u32),
    Zstd(i32),
    Zip(u32),
}

impl Compression {
    /// Whether the encoder's bytes depend on where its input is cut, so it
    /// must be fed fixed-size blocks. The zip writer's do not (it parses the
    /// tar), nor do git's own.
    pub fn needs_whole_blocks(self) -> bool {
        matches!(self, Compression::Gzip(_) | Compression::Zstd(_))
    }
}

/// The zip's deflate level: git's default (zlib's default, 6).
pub const ZIP_LEVEL: u32 = 6;
/// deflate's window: how much of the previous block primes the next one.
const DICTIONARY_BYTES: usize = 32 * 1024;
/// Upper bound of gzip compression threads per generation.
const MAX_GZIP_THREADS: usize = 4;
/// Upper bound of zstd worker threads per generation.
const MAX_ZSTD_THREADS: u32 = 4;
/// zstd's multi-threaded job size and overlap (a fraction of the window:
/// 5 is 1/16), pinned rather than left to the library's defaults, which may
/// change between releases and would change the bytes.
///
/// Each job starts afresh but for the overlap, so small jobs cost ratio
/// and CPU: a cold tar.zst of the bench's `bench/large` (358 MiB of tar)
/// took 2.27–2.50 s and made 71.7 MB with 1 MiB jobs (byte series v3),
/// 2.10–2.12 s and 68.9 MB with 2 MiB, 1.99–2.03 s and 67.3 MB with 4 MiB,
/// 1.99–2.01 s and 66.5 MB with 8 MiB, against 1.74–1.82 s and 66.5 MB
/// for `git archive | zstd -3` (BENCHMARKS.md). Larger jobs also hold more
/// memory (the archiver's peak RSS over one generation on 2 workers: +12
/// MiB with 1 MiB jobs, +25 MiB with 4 MiB) and bound how long a write can
/// block on a busy worker (one job's time: about 15 ms at level 3, a few
/// seconds at level 19), which is how long a cancelled generation can
/// take to stop. 4 MiB.
const ZSTD_JOB_BYTES: u32 = 4 * 1024 * 1024;
const ZSTD_OVERLAP_LOG: u32 = 5;

/// A streaming encoder in front of a writer.
pub enum Encoder<W: Write + Send + 'static> {
    Plain(W),
    Gzip(ParallelGzip<W>),
    Zstd(ZstdStream<W>),
    Zip(Box<crate::zip::ZipWriter<W>>),
}

impl<W: Write + Send + 'static> Encoder<W> {
    pub fn new(sink: W, compression: Compression) -> io::Result<Encoder<W>> {
        Ok(match compression {
            Compression::None => Encoder::Plain(sink),
            Compression::Gzip(level) => {
                Encoder::Gzip(ParallelGzip::new(sink, level, gzip_threads())?)
            }
            Compression::Zstd(level) => {
                Encoder::Zstd(ZstdStream::new(sink, level, zstd_threads())?)
            }
            Compression::Zip(level) => Encoder::Zip(Box::new(crate::zip::ZipWriter::new(
                sink,
                level,
                crate::zip::zip_threads(),
            )?)),
        })
    }

    /// Feeds one block of input (never flushes on timing: see the module
    /// docs; zstd flushes once, at a fixed input position).
    pub fn write_block(&mut self, block: Bytes) -> io::Result<()> {
        match self {
            Encoder::Plain(sink) => sink.write_all(&block),
            Encoder::Gzip(encoder) => encoder.write_block(block),
            Encoder::Zstd(stream) => stream.write_block(&block),
            Encoder::Zip(writer) => writer.write_block(block),
        }
    }

    /// Writes, before git runs, what the output starts with whatever git
    /// then writes: for the zip, the local header of the prefix directory,
    /// git's first entry (`ZipWriter::write_ahead_directory`). Nothing for
    /// the other formats (`new` already wrote the gzip header).
    pub fn write_ahead(&mut self, prefix: &str, commit_time: i64) -> io::Result<()> {
        match self {
            Encoder::Zip(writer) => writer.write_ahead_directory(prefix.as_bytes(), commit_time),
            _ => Ok(()),
        }
    }

    /// Whether finished work waits to be written: then `write_pending`
    /// should run before the caller blocks for more input.
    pub fn has_pending(&self) -> bool {
        match self {
            Encoder::Gzip(encoder) => !encoder.in_flight.is_empty(),
            Encoder::Zip(writer) => writer.has_pending(),
            _ => false,
        }
    }

    /// Waits a moment (`PENDING_WAIT`) for the oldest pending work and
    /// writes what is finished.
    pub fn write_pending(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(encoder) => encoder.write_finished(Wait::Briefly),
            Encoder::Zip(writer) => writer.wait_oldest(),
            _ => Ok(()),
        }
    }

    pub fn sink_mut(&mut self) -> &mut W {
        match self {
            Encoder::Plain(sink) => sink,
            Encoder::Gzip(encoder) => &mut encoder.sink,
            Encoder::Zstd(stream) => stream.sink_mut(),
            Encoder::Zip(writer) => writer.sink_mut(),
        }
    }

    /// Ends the stream (gzip trailer, zstd epilogue) and returns the sink.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(sink) => Ok(sink),
            Encoder::Gzip(encoder) => encoder.finish(),
            Encoder::Zstd(stream) => stream.finish(),
            Encoder::Zip(writer) => (*writer).finish(),
        }
    }
}

/// Multi-threaded zstd with one flush, after the first input block.
///
/// In multi-threaded mode zstd emits nothing until a whole job
/// ([`ZSTD_JOB_BYTES`] of input) is compressed, which would hold the first
/// byte back by tens of milliseconds (seconds at level 19). A flush after the first block cuts
/// the first job there and writes it out at once. The block is always the
/// first `INPUT_CHUNK_BYTES` of git's output (or all of it), so the cut is
/// at a fixed input position and the bytes still depend on the input alone
/// (the unit tests check 1, 2 and 4 workers through this path).
///
/// An abandoned stream (a failed, timed-out or cancelled generation) is
/// dropped on a thread of its own: zstd's context first compresses what its
/// workers hold (up to a few jobs, seconds at level 19), which must hold up
/// neither the generation's failure nor a shutdown.
pub struct ZstdStream<W: Write + Send + 'static> {
    encoder: Option<zstd::stream::write::Encoder<'static, W>>,
    flushed_first: bool,
}

impl<W: Write + Send + 'static> ZstdStream<W> {
    fn new(sink: W, level: i32, workers: u32) -> io::Result<ZstdStream<W>> {
        Ok(ZstdStream {
            encoder: Some(zstd_encoder(sink, level, workers)?),
            flushed_first: false,
        })
    }

    fn encoder(&mut self) -> io::Result<&mut zstd::stream::write::Encoder<'static, W>> {
        self.encoder
            .as_mut()
            .ok_or_else(|| io::Error::other("zstd stream already finished"))
    }

    fn write_block(&mut self, block: &[u8]) -> io::Result<()> {
        let first = !self.flushed_first;
        self.flushed_first = true;
        let encoder = self.encoder()?;
        encoder.write_all(block)?;
        if first {
            encoder.flush()?;
        }
        Ok(())
    }

    #[cfg(test)]
    fn sink(&self) -> &W {
        // Only `finish` takes the encoder, and it consumes the stream.
        self.encoder
            .as_ref()
            .map(|encoder| encoder.get_ref())
            .expect("the encoder lives until finish")
    }

    fn sink_mut(&mut self) -> &mut W {
        // Only `finish` takes the encoder, and it consumes the stream.
        self.encoder
            .as_mut()
            .map(|encoder| encoder.get_mut())
            .expect("the encoder lives until finish")
    }

    fn finish(mut self) -> io::Result<W> {
        self.encoder()?;
        let encoder = self.encoder.take().expect("checked above");
        encoder.finish()
    }
}

impl<W: Write + Send + 'static> Drop for ZstdStream<W> {
    fn drop(&mut self) {
        if let Some(encoder) = self.encoder.take() {
            let _ = std::thread::Builder::new()
                .name("gitball-zstd-drop".into())
                .spawn(move || drop(encoder));
        }
    }
}

fn zstd_threads() -> u32 {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() as u32)
        .clamp(1, MAX_ZSTD_THREADS)
}

/// zstd in multi-threaded mode with `workers` (at least 1) worker threads.
///
/// zstd's streaming multi-threaded compression makes the same bytes whatever
/// the number of workers (which differ from single-threaded mode's: `zstd(1)`
/// on `--single-thread`: "Final compressed result is also slightly different
/// from -T1"; facebook/zstd#2327: the supported property is that the output
/// of *streaming* multi-threaded compression does not depend on `nbWorkers`,
/// not the one-shot `ZSTD_e_end` first call, which this encoder never makes
/// with input). The unit tests check it for 1, 2 and 4 workers.
fn zstd_encoder<W: Write>(
    sink: W,
    level: i32,
    workers: u32,
) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    use zstd::stream::raw::CParameter;
    let mut encoder = zstd::stream::write::Encoder::new(sink, level)?;
    encoder.multithread(workers.max(1))?;
    encoder.set_parameter(CParameter::JobSize(ZSTD_JOB_BYTES))?;
    encoder.set_parameter(CParameter::OverlapSizeLog(ZSTD_OVERLAP_LOG))?;
    Ok(encoder)
}

fn gzip_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_GZIP_THREADS)
}

/// Most blocks queued for the compression threads or waiting to be
/// written: git may run this far (4 MiB) ahead of the oldest unwritten
/// block, so neither git nor a thread waits on the other's scheduling.
const MAX_QUEUED_BLOCKS: usize = 32;

/// One block for a compression thread, and where its result goes.
struct Job {
    dictionary: Option<Bytes>,
    block: Bytes,
    last: bool,
    reply: mpsc::SyncSender<io::Result<Vec<u8>>>,
}

/// pigz-style gzip: blocks compressed on `threads` threads taking jobs from
/// one queue, written in input order. At most `MAX_QUEUED_BLOCKS` are
/// queued or unwritten, so memory stays a few MiB whatever the input.
pub struct ParallelGzip<W: Write> {
    sink: W,
    pool: Pool<Job>,
    /// Results of the blocks handed out and not yet written, oldest first.
    in_flight: VecDeque<mpsc::Receiver<io::Result<Vec<u8>>>>,
    /// The newest block is held back until the next arrives or the stream
    /// ends: only then is it known whether it is the last.
    held: Option<Bytes>,
    /// The block before `held`: its tail primes `held`'s compression.
    previous: Option<Bytes>,
    crc: crc32fast::Hasher,
    input_len: u64,
}

impl<W: Write> ParallelGzip<W> {
    pub fn new(mut sink: W, level: u32, threads: usize) -> io::Result<ParallelGzip<W>> {
        // RFC 1952 header: no name, no comment, mtime 0, XFL 0, OS "unknown".
        sink.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])?;
        let pool = Pool::new("gitball-gzip", threads, || {
            move |job: Job| {
                // A fresh deflate state per block: a reset one is not
                // guaranteed to emit the same bytes as a new one (stale
                // window contents), and the bytes must not depend on which
                // thread got which block before.
                let mut deflate = flate2::Compress::new(flate2::Compression::new(level), false);
                let result = deflate_run(
                    &mut deflate,
                    job.dictionary.as_deref(),
                    &job.block,
                    job.last,
                );
                let _ = job.reply.send(result);
            }
        })?;
        Ok(ParallelGzip {
            sink,
            pool,
            in_flight: VecDeque::new(),
            held: None,
            previous: None,
            crc: crc32fast::Hasher::new(),
            input_len: 0,
        })
    }

    pub fn write_block(&mut self, block: Bytes) -> io::Result<()> {
        if block.is_empty() {
            return Ok(());
        }
        self.crc.update(&block);
        self.input_len += block.len() as u64;
        if let Some(ready) = self.held.replace(block) {
            self.dispatch(ready, false)?;
        }
        // Finished blocks go out now, not when the window is full: readers
        // of the growing file see them as soon as they are compressed.
        self.write_finished(Wait::No)
    }

    pub fn finish(mut self) -> io::Result<W> {
        let last = self.held.take().unwrap_or_default();
        self.dispatch(last, true)?;
        while !self.in_flight.is_empty() {
            self.write_finished(Wait::Done)?;
        }
        let crc = self.crc.clone().finalize();
        // ISIZE is the input length modulo 2^32, as RFC 1952 says.
        let input_len = (self.input_len & 0xffff_ffff) as u32;
        self.sink.write_all(&crc.to_le_bytes())?;
        self.sink.write_all(&input_len.to_le_bytes())?;
        Ok(self.sink)
    }

    fn dispatch(&mut self, block: Bytes, last: bool) -> io::Result<()> {
        while self.in_flight.len() >= MAX_QUEUED_BLOCKS {
            self.write_finished(Wait::Done)?;
        }
        let dictionary = self
            .previous
            .as_ref()
            .map(|previous| previous.slice(previous.len().saturating_sub(DICTIONARY_BYTES)..));
        let (reply, result) = mpsc::sync_channel(1);
        self.pool.send(Job {
            dictionary,
            block: block.clone(),
            last,
            reply,
        })?;
        self.in_flight.push_back(result);
        self.previous = Some(block);
        Ok(())
    }

    /// Writes the finished blocks at the front, waiting for the first as
    /// `wait` says.
    fn write_finished(&mut self, mut wait: Wait) -> io::Result<()> {
        while let Some(result) = self.in_flight.front() {
            let Some(compressed) = receive(result, wait)? else {
                return Ok(());
            };
            self.in_flight.pop_front();
            self.sink.write_all(&compressed)?;
            wait = Wait::No;
        }
        Ok(())
    }
}

/// How long the writer thread waits for a compression job's result while
/// git's pipe is idle (`Wait::Briefly`) before it looks at the pipe again.
/// Blocking until the oldest job was done held git's next bytes back that
/// long, and git, throttled, left a core idle: a cold zip of git/git took
/// 1.44–1.60 s where the same work as tar.gz took 1.1 s.
const PENDING_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// How long to wait for a compression job's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Not at all: only a result that is ready.
    No,
    /// Up to `PENDING_WAIT`: git's pipe is idle, and will not be for long.
    Briefly,
    /// Until it is done: nothing else can go on (the queue is full, or the
    /// stream ends).
    Done,
}

/// A job's result: `None` when it was not ready within `wait`.
pub(crate) fn receive<T>(
    reply: &mpsc::Receiver<io::Result<T>>,
    wait: Wait,
) -> io::Result<Option<T>> {
    match wait {
        Wait::Done => reply.recv().map_err(|_| gone())?.map(Some),
        Wait::Briefly => match reply.recv_timeout(PENDING_WAIT) {
            Ok(result) => result.map(Some),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        },
        Wait::No => match reply.try_recv() {
            Ok(result) => result.map(Some),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err(gone()),
        },
    }
}

fn gone() -> io::Error {
    io::Error::other("compression thread gone")
}

/// A fixed set of threads taking jobs from one queue (so a long job does not
/// hold up short ones behind it, and no thread idles while a job waits);
/// each job answers on its own channel. Dropping the pool closes the queue
/// and joins the threads once their current job is done: jobs still queued
/// are dropped, not run (an abandoned stream may have 32 blocks queued,
/// whose compression would hold up the generation's failure).
pub(crate) struct Pool<J: Send + 'static> {
    jobs: Option<mpsc::Sender<J>>,
    threads: Vec<JoinHandle<()>>,
    closed: Arc<AtomicBool>,
}

impl<J: Send + 'static> Pool<J> {
    /// `threads` (at least 1) threads named `name`; each makes its worker
    /// with `make_worker` (which may keep state across jobs) and runs it on
    /// the jobs it takes.
    pub(crate) fn new<F>(
        name: &str,
        threads: usize,
        make_worker: impl Fn() -> F,
    ) -> io::Result<Pool<J>>
    where
        F: FnMut(J) + Send + 'static,
    {
        let (jobs, receiver) = mpsc::channel::<J>();
        let receiver = Arc::new(Mutex::new(receiver));
        let closed = Arc::new(AtomicBool::new(false));
        let threads = (0..threads.max(1))
            .map(|_| {
                let receiver = Arc::clone(&receiver);
                let closed = Arc::clone(&closed);
                let mut work = make_worker();
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        lower_this_thread();
                        loop {
                            let job = receiver
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .recv();
                            let Ok(job) = job else { return };
                            if closed.load(Ordering::Acquire) {
                                return;
                            }
                            work(job);
                        }
                    })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Pool {
            jobs: Some(jobs),
            threads,
            closed,
        })
    }

    pub(crate) fn send(&self, job: J) -> io::Result<()> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(gone)
    }
}

impl<J: Send + 'static> Drop for Pool<J> {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One deflate run over `input` on a fresh (or reset) raw-or-zlib state:
/// primed with `dictionary`, closed with a sync flush, or finished when
/// `last`. Shared by the parallel gzip and the zip writer (`zip`).
pub(crate) fn deflate_run(
    deflate: &mut flate2::Compress,
    dictionary: Option<&[u8]>,
    input: &[u8],
    last: bool,
) -> io::Result<Vec<u8>> {
    use flate2::{FlushCompress, Status};
    if let Some(dictionary) = dictionary {
        deflate
            .set_dictionary(dictionary)
            .map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut output = Vec::with_capacity(input.len() + input.len() / 8 + 1024);
    let start = deflate.total_in();
    loop {
        let consumed = (deflate.total_in() - start) as usize;
        if output.capacity() - output.len() < 1024 {
            output.reserve(64 * 1024);
        }
        let status = deflate
            .compress_vec(&input[consumed..], &mut output, flush)
            .map_err(io::Error::other)?;
        let consumed = (deflate.total_in() - start) as usize;
        let room_left = output.capacity() > output.len();
        match status {
            Status::StreamEnd => return Ok(output),
            // A sync flush is complete when all input is in and the output
            // was not cut short by a full buffer.
            Status::Ok | Status::BufError if !last && consumed == input.len() && room_left => {
                return Ok(output);
            }
            Status::Ok | Status::BufError => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// `docs/archiver.md` gives the tar.gz queue, the writer's wait and the
    /// compressing threads' nice value as these constants.
    /// (Docs review: a figure changed on one side only had nothing to
    /// fail.)
    #[test]
    fn the_figures_docs_give_for_compression_are_these_constants() {
        gitball_core::docs::assert_says(
            include_str!("../../docs/archiver.md"),
            "docs/archiver.md",
            [
                format!(
                    "at most {MAX_QUEUED_BLOCKS} blocks ({} MiB of git's output)",
                    (MAX_QUEUED_BLOCKS * crate::generate::INPUT_CHUNK_BYTES) >> 20
                ),
                format!(
                    "waits for the oldest job at most {} ms",
                    PENDING_WAIT.as_millis()
                ),
                format!("runs {COMPRESSION_NICE} nice levels below"),
            ],
        );
    }

    /// However fast git writes, at most `MAX_QUEUED_BLOCKS` blocks wait for
    /// compression or to be written (docs/archiver.md: "at most 32 blocks
    /// (4 MiB of git's output) wait"): the writer waits for the oldest
    /// rather than queue more. One thread at level 9 compresses far slower
    /// than blocks arrive here. (Mutation review: an unbounded queue passed
    /// every test.)
    #[test]
    fn at_most_the_queued_blocks_wait_however_fast_the_input_comes() {
        let data = sample((MAX_QUEUED_BLOCKS + 8) * 128 * 1024);
        let mut encoder = ParallelGzip::new(Vec::new(), 9, 1).unwrap();
        let mut most = 0;
        for block in data.chunks(128 * 1024) {
            encoder.write_block(Bytes::copy_from_slice(block)).unwrap();
            most = most.max(encoder.in_flight.len());
        }
        assert!(most <= MAX_QUEUED_BLOCKS, "{most} blocks waited");
        assert_eq!(gunzip(&encoder.finish().unwrap()), data);
    }

    /// Source-like text: words from a small vocabulary in a seeded order.
    fn sample(len: usize) -> Vec<u8> {
        const WORDS: [&str; 16] = [
            "fn ", "let ", "self", ".len()", " = ", "match ", "Some(", "None", "}\n", "{\n",
            "    ", "return ", "buffer", "index", "; ", "0x1f",
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(WORDS[(state % 16) as usize].as_bytes());
        }
        out.truncate(len);
        out
    }

    fn gzip(data: &[u8], block_bytes: usize, threads: usize) -> Vec<u8> {
        let mut encoder = ParallelGzip::new(Vec::new(), 6, threads).unwrap();
        for block in data.chunks(block_bytes) {
            encoder.write_block(Bytes::copy_from_slice(block)).unwrap();
        }
        encoder.finish().unwrap()
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// While git's pipe is idle the writer waits for the oldest block only
    /// a moment, then looks at the pipe again: blocking until the block was
    /// done held git's next bytes back, and git, throttled, left a core
    /// idle.
    #[test]
    fn waiting_for_pending_work_returns_while_a_block_is_still_compressing() {
        let data = sample(8 << 20);
        let mut encoder = Encoder::new(Vec::new(), Compression::Gzip(9)).unwrap();
        encoder.write_block(Bytes::from(data.clone())).unwrap();
        encoder.write_block(Bytes::from_static(b"tail")).unwrap();
        assert!(encoder.has_pending());
        encoder.write_pending().unwrap();
        assert!(
            encoder.has_pending(),
            "8 MiB at level 9 takes far longer than the wait"
        );
        let mut expected = data;
        expected.extend_from_slice(b"tail");
        assert_eq!(gunzip(&encoder.finish().unwrap()), expected);
    }

    /// An abandoned stream drops its pool with blocks still queued: the
    /// threads finish the job they are in and run none of the others.
    #[test]
    fn a_dropped_pool_runs_no_queued_job() {
        enum TestJob {
            Wait(mpsc::Sender<()>, mpsc::Receiver<()>),
            Count,
        }
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let pool = {
            let ran = Arc::clone(&ran);
            Pool::new("test-pool", 1, move || {
                let ran = Arc::clone(&ran);
                move |job| match job {
                    TestJob::Wait(started, release) => {
                        let _ = started.send(());
                        let _ = release.recv();
                    }
                    TestJob::Count => {
                        ran.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
            .unwrap()
        };
        let (started, started_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        pool.send(TestJob::Wait(started, release_rx)).unwrap();
        for _ in 0..10 {
            pool.send(TestJob::Count).unwrap();
        }
        started_rx.recv().unwrap();
        let closed = Arc::clone(&pool.closed);
        let dropper = std::thread::spawn(move || drop(pool));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !closed.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the pool was not dropped"
            );
            std::thread::yield_now();
        }
        release.send(()).unwrap();
        dropper.join().unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn parallel_gzip_round_trips_at_every_size() {
        for len in [
            0,
            1,
            1000,
            128 * 1024,
            128 * 1024 + 1,
            3 * 128 * 1024,
            1_000_003,
        ] {
            let data = sample(len);
            assert_eq!(gunzip(&gzip(&data, 128 * 1024, 2)), data, "length {len}");
        }
    }

    #[test]
    fn thread_count_does_not_change_the_bytes() {
        let data = sample(2_000_000);
        let one = gzip(&data, 128 * 1024, 1);
        assert_eq!(gzip(&data, 128 * 1024, 2), one);
        assert_eq!(gzip(&data, 128 * 1024, 4), one);
    }

    #[test]
    fn dictionary_keeps_the_ratio_close_to_single_stream_deflate() {
        let data = sample(4_000_000);
        let parallel = gzip(&data, 128 * 1024, 2).len();
        let mut single = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        single.write_all(&data).unwrap();
        let single = single.finish().unwrap().len();
        assert!(
            parallel as f64 <= single as f64 * 1.02,
            "parallel {parallel} vs single {single}"
        );
    }

    #[test]
    fn zstd_bytes_do_not_depend_on_the_worker_count() {
        // Several jobs' worth, so the workers really split the frame.
        let data = sample(3 * ZSTD_JOB_BYTES as usize + 12_345);
        let compress = |workers| {
            let mut stream = ZstdStream::new(Vec::new(), 3, workers).unwrap();
            for block in data.chunks(128 * 1024) {
                stream.write_block(block).unwrap();
            }
            stream.finish().unwrap()
        };
        let one = compress(1);
        assert!(compress(2) == one, "2 workers");
        assert!(compress(4) == one, "4 workers");
        assert_eq!(zstd::decode_all(&one[..]).unwrap(), data);
    }

    /// The tar.zst byte series (`generate::byte_series`, v4) over an input
    /// of several jobs, which the golden repository's archive is too small
    /// to span: a change of the job size, the overlap, the first flush or
    /// the zstd version changes this hash, and must bump the series.
    #[test]
    fn zstd_bytes_of_several_jobs_are_those_of_the_series() {
        use sha2::{Digest, Sha256};
        let data = sample(9 * 1024 * 1024 + 12_345);
        let mut stream = ZstdStream::new(Vec::new(), 3, 2).unwrap();
        for block in data.chunks(128 * 1024) {
            stream.write_block(block).unwrap();
        }
        let out = stream.finish().unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&out)),
            "b6bb2698506d7d77acfcdd275c12c9246558272a91be485669bc977c5e7a8dea",
            "{} bytes",
            out.len()
        );
    }

    #[test]
    fn zstd_writes_the_first_block_out_at_once() {
        let mut stream = ZstdStream::new(Vec::new(), 3, 2).unwrap();
        stream.write_block(&sample(128 * 1024)).unwrap();
        let written = stream.sink().len();
        assert!(written > 0, "nothing written after the first block");
        // Later blocks wait for their job, as multi-threaded zstd does.
        stream.write_block(&sample(128 * 1024)).unwrap();
        let mut out = stream.finish().unwrap();
        assert!(out.len() > written);
        out.truncate(written);
        assert_eq!(&out[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
    }
}
