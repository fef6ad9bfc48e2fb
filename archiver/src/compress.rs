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
//! The compressors are driven synchronously (flate2's and zstd's `Write`
//! encoders on blocking threads) rather than through `async-compression`:
//! the parallel gzip needs to set each run's dictionary and end it with a
//! sync flush, which only the low-level encoder exposes, and an async
//! encoder would flush whenever its source returns `Pending`, making the
//! bytes depend on pipe timing.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;

/// How git's tar is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip(u32),
    Zstd(i32),
}

/// deflate's window: how much of the previous block primes the next one.
const DICTIONARY_BYTES: usize = 32 * 1024;
/// Upper bound of gzip compression threads per generation.
const MAX_GZIP_THREADS: usize = 4;

/// A streaming encoder in front of a writer.
pub enum Encoder<W: Write> {
    Plain(W),
    Gzip(ParallelGzip<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub fn new(sink: W, compression: Compression) -> io::Result<Encoder<W>> {
        Ok(match compression {
            Compression::None => Encoder::Plain(sink),
            Compression::Gzip(level) => {
                Encoder::Gzip(ParallelGzip::new(sink, level, gzip_threads())?)
            }
            // Single-threaded zstd: its output then depends on the input
            // alone (and it keeps up with git's tar speed).
            Compression::Zstd(level) => {
                Encoder::Zstd(zstd::stream::write::Encoder::new(sink, level)?)
            }
        })
    }

    /// Feeds one block of input (never flushes: see the module docs).
    pub fn write_block(&mut self, block: Bytes) -> io::Result<()> {
        match self {
            Encoder::Plain(sink) => sink.write_all(&block),
            Encoder::Gzip(encoder) => encoder.write_block(block),
            Encoder::Zstd(encoder) => encoder.write_all(&block),
        }
    }

    pub fn sink(&self) -> &W {
        match self {
            Encoder::Plain(sink) => sink,
            Encoder::Gzip(encoder) => &encoder.sink,
            Encoder::Zstd(encoder) => encoder.get_ref(),
        }
    }

    /// Ends the stream (gzip trailer, zstd epilogue) and returns the sink.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(sink) => Ok(sink),
            Encoder::Gzip(encoder) => encoder.finish(),
            Encoder::Zstd(encoder) => encoder.finish(),
        }
    }
}

fn gzip_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_GZIP_THREADS)
}

/// One block for a compression thread.
struct Job {
    dictionary: Option<Bytes>,
    block: Bytes,
    last: bool,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<io::Result<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

/// pigz-style gzip: blocks compressed on `threads` threads, written in order.
/// At most one block per thread is in flight, so memory stays a few blocks.
pub struct ParallelGzip<W: Write> {
    sink: W,
    workers: Workers,
    /// Blocks handed out and not yet written, oldest first (worker index).
    in_flight: VecDeque<usize>,
    dispatched: usize,
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
        let workers = (0..threads.max(1))
            .map(|_| {
                let (jobs, job_receiver) = mpsc::channel::<Job>();
                let (result_sender, results) = mpsc::channel();
                let thread = std::thread::Builder::new()
                    .name("gitball-gzip".into())
                    .spawn(move || compress_blocks(level, job_receiver, result_sender))?;
                Ok(Worker {
                    jobs,
                    results,
                    thread: Some(thread),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ParallelGzip {
            sink,
            workers: Workers(workers),
            in_flight: VecDeque::new(),
            dispatched: 0,
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
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        let last = self.held.take().unwrap_or_default();
        self.dispatch(last, true)?;
        while !self.in_flight.is_empty() {
            self.collect_oldest()?;
        }
        let crc = self.crc.clone().finalize();
        // ISIZE is the input length modulo 2^32, as RFC 1952 says.
        let input_len = (self.input_len & 0xffff_ffff) as u32;
        self.sink.write_all(&crc.to_le_bytes())?;
        self.sink.write_all(&input_len.to_le_bytes())?;
        Ok(self.sink)
    }

    fn dispatch(&mut self, block: Bytes, last: bool) -> io::Result<()> {
        if self.in_flight.len() == self.workers.0.len() {
            self.collect_oldest()?;
        }
        let dictionary = self
            .previous
            .as_ref()
            .map(|previous| previous.slice(previous.len().saturating_sub(DICTIONARY_BYTES)..));
        let worker = self.dispatched % self.workers.0.len();
        self.workers.0[worker]
            .jobs
            .send(Job {
                dictionary,
                block: block.clone(),
                last,
            })
            .map_err(|_| io::Error::other("gzip thread gone"))?;
        self.in_flight.push_back(worker);
        self.dispatched += 1;
        self.previous = Some(block);
        Ok(())
    }

    fn collect_oldest(&mut self) -> io::Result<()> {
        let Some(worker) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let compressed = self.workers.0[worker]
            .results
            .recv()
            .map_err(|_| io::Error::other("gzip thread gone"))??;
        self.sink.write_all(&compressed)
    }
}

/// The compression threads of one stream; dropping them ends the threads
/// (their job channels close) and joins them.
struct Workers(Vec<Worker>);

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in self.0.drain(..) {
            drop(worker.jobs);
            if let Some(thread) = worker.thread {
                let _ = thread.join();
            }
        }
    }
}

/// A compression thread: one block at a time.
fn compress_blocks(
    level: u32,
    jobs: mpsc::Receiver<Job>,
    results: mpsc::Sender<io::Result<Vec<u8>>>,
) {
    while let Ok(job) = jobs.recv() {
        // A fresh deflate state per block: a reset one is not guaranteed to
        // emit the same bytes as a new one (stale window contents), and the
        // bytes must not depend on which thread got which block before.
        let mut deflate = flate2::Compress::new(flate2::Compression::new(level), false);
        let result = compress_block(&mut deflate, &job);
        if results.send(result).is_err() {
            return;
        }
    }
}

fn compress_block(deflate: &mut flate2::Compress, job: &Job) -> io::Result<Vec<u8>> {
    use flate2::{FlushCompress, Status};
    if let Some(dictionary) = &job.dictionary {
        deflate
            .set_dictionary(dictionary)
            .map_err(io::Error::other)?;
    }
    let flush = if job.last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut output = Vec::with_capacity(job.block.len() + job.block.len() / 8 + 1024);
    let start = deflate.total_in();
    loop {
        let consumed = (deflate.total_in() - start) as usize;
        if output.capacity() - output.len() < 1024 {
            output.reserve(64 * 1024);
        }
        let status = deflate
            .compress_vec(&job.block[consumed..], &mut output, flush)
            .map_err(io::Error::other)?;
        let consumed = (deflate.total_in() - start) as usize;
        let room_left = output.capacity() > output.len();
        match status {
            Status::StreamEnd => return Ok(output),
            // A sync flush is complete when all input is in and the output
            // was not cut short by a full buffer.
            Status::Ok | Status::BufError
                if !job.last && consumed == job.block.len() && room_left =>
            {
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
}
