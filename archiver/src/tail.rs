//! Reading an archive file, complete or still growing, as a body.
//!
//! Where the connection allows it, the body is sent with `sendfile` around
//! hyper ([`FileSend`], `gitball_core::server::takeover`): a growing
//! archive in chunks as its bytes are announced, a complete one longer than
//! a block whole. Everything else is a body stream read as below.
//!
//! A reader holds an open file (its own for a complete archive, the
//! generation's shared handle for a growing one) and a `watch` receiver of
//! the generation's progress; it reads up to the length the writer has
//! announced and then waits for more. It never reads ahead of the client:
//! hyper polls the body only when the socket can take more.
//!
//! Reads go through [`SharedBlocks`]: the file is read in blocks aligned to
//! `READ_CHUNK_BYTES`, and a block that was just read is handed, as the
//! same reference-counted `Bytes`, to every download that wants the same
//! bytes. Thirty clients tailing one generation read each block from the
//! file once between them; stalled downloads of one archive share the
//! blocks hyper holds for them; and a small archive that is asked for
//! again is served from memory, without opening the file. Bytes are shared
//! only where they can never change: below the length the writer
//! announced (it only appends), and in complete files, whose names carry
//! the SHA-256 of their content.
//!
//! A generation that fails makes the stream return an error, which makes
//! hyper abort the connection: a truncated archive never ends cleanly.
//!
//! Everything a download holds (the fd, the `Arc<CacheFile>` that keeps
//! held-bytes accounting right, the active-downloads gauge, the request's
//! log record) lives in the stream's (or the `FileSend`'s) state and is
//! released when the body is dropped, at whatever point the client went
//! away.

use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use gitball_core::log::{Ending, Fault, RequestLog};
use gitball_core::server::takeover::{BodySocket, FileBody, Takeover};
use lru::LruCache;
use tokio::sync::{OnceCell, watch};

use crate::cache::{CacheFile, Generation, Progress, State};
use crate::conditional::ByteRange;
use crate::generate::Failure;
use crate::metrics as m;

/// Size of one body read, and the alignment of shared blocks. A stalled
/// download holds at most one block besides hyper's write buffer.
pub const READ_CHUNK_BYTES: usize = 128 * 1024;

/// Longest the bytes of a growing file wait, once written, before its
/// readers are told of them ([`Announcer`]): a generation that writes
/// slowly still reaches its readers piece by piece.
const PIECE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// How far a growing file grows between wake-ups of its readers (past its
/// first bytes; pieces wake them after `PIECE_WAIT`): a multiple of
/// `READ_CHUNK_BYTES`. Each wake-up of a reader costs a write to its
/// serving thread's eventfd, that thread's wake-up, a chunk's size line
/// and a `sendfile`, and its client a wake-up and reads.
const WAKE_BYTES: u64 = 1024 * 1024;

/// Most bytes handed to one `sendfile` call. The socket takes what fits
/// in its send buffer and the call returns; this only bounds the work of a
/// call when the client keeps up.
const SENDFILE_CALL_BYTES: usize = 1024 * 1024;

/// Most bytes of recently read blocks kept for other downloads (what hyper
/// still holds is shared on top of this, and freed with the last holder).
const SHARED_BLOCKS_BYTES: u64 = 16 * 1024 * 1024;

/// Which bytes a block is: the file (a complete archive's content-addressed
/// path, or a generation's unique partial path) and the byte range.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct BlockKey {
    path: PathBuf,
    start: u64,
    end: u64,
}

type Block = Arc<OnceCell<Bytes>>;

/// Recently read blocks of archive files, by what they are: one per
/// process, in front of the page cache. A block is read once however many
/// downloads ask for it at the same time (the first reads, the others wait
/// for its bytes).
struct SharedBlocks {
    index: Mutex<BlockIndex>,
}

struct BlockIndex {
    blocks: LruCache<BlockKey, Block>,
    bytes: u64,
}

static SHARED_BLOCKS: LazyLock<SharedBlocks> = LazyLock::new(|| SharedBlocks {
    index: Mutex::new(BlockIndex {
        blocks: LruCache::unbounded(),
        bytes: 0,
    }),
});

impl SharedBlocks {
    fn index(&self) -> std::sync::MutexGuard<'_, BlockIndex> {
        // Each operation under the lock is a single map call.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The block's bytes if they were read already.
    fn cached(&self, key: &BlockKey) -> Option<Bytes> {
        self.index().blocks.get(key)?.get().cloned()
    }

    /// The block's bytes, read from `file` by the first download that asks.
    async fn read(&self, key: BlockKey, file: &Arc<std::fs::File>) -> io::Result<Bytes> {
        let block = {
            let mut index = self.index();
            match index.blocks.get(&key) {
                Some(block) => block.clone(),
                None => {
                    let block = Block::default();
                    index.bytes += key.end - key.start;
                    index.blocks.put(key.clone(), block.clone());
                    while index.bytes > SHARED_BLOCKS_BYTES {
                        let Some((old, _)) = index.blocks.pop_lru() else {
                            break;
                        };
                        index.bytes -= old.end - old.start;
                    }
                    block
                }
            }
        };
        let bytes = block
            .get_or_try_init(|| {
                let file = file.clone();
                let (start, end) = (key.start, key.end);
                // On the runtime, not the blocking pool: the cache is on
                // tmpfs, where a 128 KiB `pread` is a memory copy of a few
                // microseconds, and the hand-off to the pool and back (four
                // futex calls and an idle runtime waking) cost more than the
                // read and serialised a large download's reads with its
                // writes. nginx reads files the same way in its event loop.
                async move { read_exactly_at(&file, start, end) }
            })
            .await?;
        Ok(bytes.clone())
    }
}

/// Bytes `start..end` of `file`; an error if the file is shorter.
///
/// A whole block is read into a buffer from [`BLOCK_POOL`]; shorter reads
/// (a small archive, the tail of a file) get an allocation of their size.
fn read_exactly_at(file: &std::fs::File, start: u64, end: u64) -> io::Result<Bytes> {
    let want = usize::try_from(end - start).map_err(io::Error::other)?;
    if want == READ_CHUNK_BYTES {
        let mut buffer = BLOCK_POOL.take();
        fill_at(file, &mut buffer.0, start)?;
        return Ok(Bytes::from_owner(buffer));
    }
    let mut buffer = BytesMut::zeroed(want);
    fill_at(file, &mut buffer, start)?;
    Ok(buffer.freeze())
}

/// Fills `buffer` from `file` at `offset`; an error if the file is shorter.
fn fill_at(file: &std::fs::File, buffer: &mut [u8], offset: u64) -> io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read_at(&mut buffer[filled..], offset + filled as u64)? {
            0 => return Err(io::Error::other("archive file shorter than announced")),
            n => filled += n,
        }
    }
    Ok(())
}

/// Most whole-block buffers kept for reuse once no `Bytes` refers to them
/// (4 MiB): a process-wide bound, not a per-download one.
const POOLED_BLOCKS: usize = 32;

/// Buffers of `READ_CHUNK_BYTES` whose blocks were dropped, for the next
/// reads. A fresh 128 KiB allocation per block cost a `memset` of the
/// whole block and, once glibc had handed the memory back to the kernel, a
/// page fault per 4 KiB on the next one: a quarter of the archiver's CPU in
/// a 1 GiB download. A reused buffer is already initialised and mapped, so
/// a read is the one copy out of the page cache.
static BLOCK_POOL: BlockPool = BlockPool {
    free: Mutex::new(Vec::new()),
};

struct BlockPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BlockPool {
    fn take(&self) -> PooledBlock {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        PooledBlock(reused.unwrap_or_else(|| vec![0; READ_CHUNK_BYTES]))
    }

    fn give_back(&self, buffer: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < POOLED_BLOCKS {
            free.push(buffer);
        }
    }
}

/// A block's buffer; back to [`BLOCK_POOL`] when its last `Bytes` is
/// dropped. Its bytes are never written again before that: the pool hands
/// out only buffers nothing refers to.
struct PooledBlock(Vec<u8>);

impl AsRef<[u8]> for PooledBlock {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for PooledBlock {
    fn drop(&mut self) {
        BLOCK_POOL.give_back(std::mem::take(&mut self.0));
    }
}

/// Tells the readers of a growing file of its length, the writer's side of
/// [`Reader`]: every length is stored as it is written (a reader that looks
/// sees it), but readers are woken only for the generation's first bytes,
/// `WAKE_BYTES` past the length they were last woken for, and bytes that have waited `PIECE_WAIT`
/// since they were written ([`Announcer::pieces`], which runs beside the
/// generation). A generation writes every few KiB (one compressed block of
/// git's 128 KiB); waking thirty readers per write cost thirty wake-ups
/// per write, and readers did nothing with most of them. Their end
/// (complete or failed) is sent on the same channel, and wakes them at
/// once.
pub struct Announcer {
    progress: watch::Sender<Progress>,
    told: Mutex<Told>,
    piece: tokio::sync::Notify,
}

/// What the readers of a generation were last woken for.
struct Told {
    /// The length then.
    len: u64,
    /// When the first byte past it was written, while it waits.
    piece_since: Option<tokio::time::Instant>,
}

impl Announcer {
    pub fn new(progress: watch::Sender<Progress>) -> Announcer {
        Announcer {
            progress,
            told: Mutex::new(Told {
                len: 0,
                piece_since: None,
            }),
            piece: tokio::sync::Notify::new(),
        }
    }

    fn told(&self) -> std::sync::MutexGuard<'_, Told> {
        self.told.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The file holds `len` bytes readers may read. Called by the writer
    /// after each write; never blocks on readers.
    pub fn grown(&self, len: u64) {
        // Under the lock, so that `pieces` never misses a length stored
        // after it looked.
        let mut told = self.told();
        // `WAKE_BYTES` past the length readers were last woken for, not
        // past a multiple of it: after a wake for a piece that waited
        // `PIECE_WAIT` (as long as 1 MiB takes to compress on a busy host),
        // the next multiple came a few blocks later, and woke every reader
        // again for them.
        let wake = told.len == 0 || len >= told.len + WAKE_BYTES;
        self.progress.send_if_modified(|p| {
            p.written = len;
            wake
        });
        if wake {
            told.len = len;
            told.piece_since = None;
        } else if len > told.len && told.piece_since.is_none() {
            told.piece_since = Some(tokio::time::Instant::now());
            self.piece.notify_one();
        }
    }

    /// Wakes readers for bytes that have waited `PIECE_WAIT` since they
    /// were written. Runs for as long as the generation writes;
    /// never returns.
    pub async fn pieces(&self) -> std::convert::Infallible {
        loop {
            self.piece.notified().await;
            loop {
                let waiting = self.told().piece_since;
                let Some(since) = waiting else { break };
                tokio::time::sleep_until(since + PIECE_WAIT).await;
                let mut told = self.told();
                // Unless growing by `WAKE_BYTES` woke the readers
                // meanwhile.
                if told.piece_since == Some(since) {
                    told.piece_since = None;
                    self.progress.send_if_modified(|p| {
                        told.len = p.written;
                        true
                    });
                }
            }
        }
    }
}

/// What a download reads from.
pub enum Source {
    Complete(Arc<CacheFile>),
    Growing(Arc<Generation>),
}

/// One download in the metrics, holding its request's log record: its
/// `Drop` ends both, however the body ended.
struct Download {
    log: RequestLog,
    finished: bool,
    failed: bool,
}

impl Download {
    fn start(log: RequestLog) -> Download {
        m::active_downloads().increment(1.0);
        Download {
            log,
            finished: false,
            failed: false,
        }
    }
}

impl Download {
    /// The body reached its end: not a disconnect.
    fn finish(&mut self) {
        self.finished = true;
    }

    /// The download failed with `error` (not the client's doing): its record
    /// says so when dropped. Returns the error.
    fn fail(&mut self, error: io::Error) -> io::Error {
        self.failed = true;
        self.log.error = Some(error.to_string());
        error
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        m::active_downloads().decrement(1.0);
        self.log.ending = Some(if self.finished {
            Ending::Complete
        } else if self.failed {
            Ending::Aborted
        } else {
            Ending::ClientGone
        });
        if self.failed {
            self.log.fault = Some(Fault::Internal);
        }
        // The log record is dropped next, and writes the line.
    }
}

/// An open archive file and where the download is in it.
pub struct Reader {
    /// `None` when every byte asked for was in memory at the start.
    file: Option<Arc<std::fs::File>>,
    /// Names the bytes for `SharedBlocks`.
    path: PathBuf,
    /// The whole download, found in memory at the start.
    preloaded: Option<Bytes>,
    position: u64,
    /// Exclusive end for a range; `None` reads to the archive's end.
    end: Option<u64>,
    /// Holds the complete file (held-bytes accounting) or the generation.
    source: Source,
    progress: Option<watch::Receiver<Progress>>,
    complete_len: Option<u64>,
    /// The length of a growing file the reader was last told of: bytes
    /// below it are read at once, pieces of a block or not.
    told: u64,
    /// How far past its position a growing file must reach, in multiples
    /// of this, for the reader to take its bytes without being told of
    /// them ([`worth_reading`]).
    step: u64,
}

impl Reader {
    /// Opens `source` for reading `range` (the whole archive for `None`).
    pub fn open(source: Source, range: Option<ByteRange>) -> io::Result<Reader> {
        let position = range.map_or(0, |range| range.first);
        let mut preloaded = None;
        let (file, path, progress, complete_len) = match &source {
            Source::Complete(complete) => {
                let end = range.map_or(complete.len, |range| range.last + 1);
                // A small archive asked for again: no file to open.
                let key = BlockKey {
                    path: complete.path.clone(),
                    start: position,
                    end,
                };
                preloaded = (end > position && block_end(position, end) == end)
                    .then(|| SHARED_BLOCKS.cached(&key))
                    .flatten();
                let file = match preloaded {
                    Some(_) => None,
                    None => Some(Arc::new(complete.open()?)),
                };
                (file, complete.path.clone(), None, Some(complete.len))
            }
            Source::Growing(generation) => (
                Some(generation.file().ok_or_else(|| {
                    io::Error::other("a growing archive read before its generation started")
                })?),
                generation.partial.clone(),
                Some(generation.progress()),
                None,
            ),
        };
        Ok(Reader {
            file,
            path,
            preloaded,
            position,
            end: range.map(|range| range.last + 1),
            source,
            progress,
            complete_len,
            told: 0,
            step: READ_CHUNK_BYTES as u64,
        })
    }

    /// The response body: sent with `sendfile` around hyper when the
    /// connection allows it (`takeover`), for a growing archive and for
    /// more than one block of a complete file that is not already in
    /// memory; otherwise the body stream ([`Reader::into_stream`]). A small
    /// complete archive stays a stream, so that its one block is read into
    /// memory once and shared by the next downloads. `log` is written when
    /// the body is dropped.
    pub fn into_body(self, log: RequestLog, takeover: Option<&Takeover>) -> axum::body::Body {
        let length = match self.complete_len {
            // Chunked: the length is not known yet.
            None => None,
            Some(len) => {
                let end = self.end.map_or(len, |end| end.min(len));
                let in_file = self.file.is_some() && self.preloaded.is_none();
                match end.saturating_sub(self.position) {
                    length if in_file && length > READ_CHUNK_BYTES as u64 => Some(length),
                    _ => return axum::body::Body::from_stream(self.into_stream(log)),
                }
            }
        };
        let Some(takeover) = takeover else {
            return axum::body::Body::from_stream(self.into_stream(log));
        };
        let body = FileSend::new(self, length.is_none(), Download::start(log));
        takeover.body(Box::new(body), length)
    }

    /// The body stream; `log` is written when the stream is dropped.
    pub fn into_stream(
        self,
        log: RequestLog,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let download = Download::start(log);
        futures_util::stream::unfold((self, download), |(mut reader, mut download)| async move {
            if download.failed {
                return None;
            }
            match reader.next().await {
                Ok(Some(chunk)) => {
                    download.log.bytes += chunk.len() as u64;
                    m::sent_bytes().increment(chunk.len() as u64);
                    // With a Content-Length, hyper stops polling after
                    // the last byte: the end is reached now, not on a
                    // next poll that never comes.
                    if reader.at_end() {
                        download.finish();
                    }
                    Some((Ok(chunk), (reader, download)))
                }
                Ok(None) => {
                    download.finish();
                    None
                }
                Err(error) => {
                    let error = download.fail(error);
                    Some((Err(error), (reader, download)))
                }
            }
        })
    }

    /// Every byte of a complete archive (or range) has been read.
    fn at_end(&self) -> bool {
        match (self.complete_len, self.end) {
            (Some(len), end) => self.position >= end.map_or(len, |end| end.min(len)),
            // A range of a growing file (not served today: ranges need a
            // complete archive) ends at its end.
            (None, Some(end)) => self.position >= end,
            (None, None) => false,
        }
    }

    /// Waits until there are bytes worth taking past `position` (see
    /// [`worth_reading`]) and returns where they end (within the range asked
    /// for), or `None` once every byte has been read. A failed generation is
    /// an error.
    async fn available(&mut self) -> io::Result<Option<u64>> {
        // Woken by the writer (`changed`, which marks the news as seen).
        let mut woken = false;
        let available = loop {
            let available = match (self.complete_len, &mut self.progress) {
                (Some(len), _) => len,
                (None, Some(progress)) => {
                    // Told (woken, or while it was sending) of bytes: the
                    // `Announcer` tells only of bytes worth taking now.
                    let told = woken || progress.has_changed().unwrap_or(true);
                    let snapshot = progress.borrow_and_update().clone();
                    if told {
                        self.told = snapshot.written;
                    }
                    match snapshot.state {
                        State::Complete(file) => {
                            self.complete_len = Some(file.len);
                            let len = file.len;
                            // The same bytes under their final name, which
                            // later downloads of the archive use.
                            self.path = file.path.clone();
                            // From now on this reader holds the indexed file:
                            // if it is evicted while we read, its bytes count
                            // as held until we are done.
                            self.source = Source::Complete(file);
                            len
                        }
                        State::Failed(failure) => return Err(generation_failed(&failure)),
                        State::Running
                            if self.position < self.told
                                || worth_reading(
                                    self.position,
                                    self.end,
                                    snapshot.written,
                                    self.step,
                                ) =>
                        {
                            snapshot.written
                        }
                        State::Running => {
                            woken = progress.changed().await.is_ok();
                            if !woken {
                                // The generation task is gone; its last state
                                // is final and is read on the next turn.
                                if matches!(progress.borrow().state, State::Running) {
                                    return Err(io::Error::other(
                                        "generation ended without a result",
                                    ));
                                }
                            }
                            continue;
                        }
                    }
                }
                (None, None) => return Err(io::Error::other("reader without a length")),
            };
            break self.end.map_or(available, |end| end.min(available));
        };
        Ok((!self.at_end()).then_some(available))
    }

    /// Resolves when the generation this reader tails has failed; never
    /// for a complete archive. Owned: it borrows nothing of the reader.
    fn generation_failed(&self) -> impl Future<Output = io::Error> + Send + 'static {
        let tailed = match &self.source {
            Source::Growing(generation) => {
                Some((generation.failed().clone(), generation.progress()))
            }
            Source::Complete(_) => None,
        };
        async move {
            let Some((failed, progress)) = tailed else {
                return std::future::pending().await;
            };
            failed.cancelled_owned().await;
            match &progress.borrow().state {
                State::Failed(failure) => generation_failed(failure),
                _ => io::Error::other("generation failed"),
            }
        }
    }

    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        let Some(available) = self.available().await? else {
            return Ok(None);
        };
        let chunk = match self.preloaded.take() {
            Some(chunk) => chunk,
            None => {
                let file = self
                    .file
                    .as_ref()
                    .ok_or_else(|| io::Error::other("archive file not open"))?;
                let key = BlockKey {
                    path: self.path.clone(),
                    start: self.position,
                    end: block_end(self.position, available),
                };
                SHARED_BLOCKS.read(key, file).await?
            }
        };
        self.position += chunk.len() as u64;
        Ok(Some(chunk))
    }
}

/// The longest chunk size line with the previous chunk's end before it:
/// "\r\n", 16 hex digits, "\r\n".
const CHUNK_LINE_BYTES: usize = 20;

/// An archive file sent with `sendfile`: a complete one (or a range of it)
/// with its `Content-Length`, or a growing one in chunks as its bytes are
/// announced (the chunk's size line is sent ahead of its data, and the
/// terminating chunk only once the generation completed).
struct FileSend {
    reader: Reader,
    chunked: bool,
    download: Download,
}

impl FileSend {
    fn new(mut reader: Reader, chunked: bool, download: Download) -> FileSend {
        reader.step = WAKE_BYTES;
        FileSend {
            reader,
            chunked,
            download,
        }
    }
}

impl FileBody for FileSend {
    fn send<'a>(
        self: Box<Self>,
        socket: &'a mut BodySocket,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let FileSend {
                mut reader,
                chunked,
                mut download,
            } = *self;
            let mut chunks = 0;
            // Made once: every wait on the socket below races it.
            let mut generation_failed = std::pin::pin!(reader.generation_failed());
            loop {
                let waited = tokio::select! {
                    biased;
                    waited = reader.available() => waited,
                    // Noticed now, not at the next write, which may be long
                    // in coming while git works.
                    () = socket.closed() => {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "the client closed the connection",
                        ));
                    }
                };
                let available = match waited {
                    Ok(Some(available)) => available,
                    Ok(None) => break,
                    Err(error) => return Err(download.fail(error)),
                };
                let file = match &reader.file {
                    // `available` promises bytes; a zero-size chunk would
                    // end the body as if complete.
                    Some(file) if available > reader.position => file.clone(),
                    _ => {
                        let error = io::Error::other("no open file or no bytes to send");
                        return Err(download.fail(error));
                    }
                };
                if chunked {
                    // The previous chunk's end and this one's size line.
                    let separator = if chunks == 0 { "" } else { "\r\n" };
                    let mut line = [0u8; CHUNK_LINE_BYTES];
                    let mut rest = &mut line[..];
                    // Cannot fail: a u64 in hex and two line ends fit.
                    write!(rest, "{separator}{:x}\r\n", available - reader.position)?;
                    let line_len = CHUNK_LINE_BYTES - rest.len();
                    tokio::select! {
                        biased;
                        error = &mut generation_failed => return Err(download.fail(error)),
                        sent = socket.send_bytes(&line[..line_len], true) => sent?,
                    }
                    chunks += 1;
                }
                while reader.position < available {
                    let count = usize::try_from(available - reader.position)
                        .unwrap_or(usize::MAX)
                        .min(SENDFILE_CALL_BYTES);
                    // A socket error is the client's (gone, or stalled past
                    // the timeout): the download's record says so when
                    // dropped. A generation that fails meanwhile ends the
                    // body at once, also while the client is slow to take
                    // bytes: what it announced before is not sent on, and
                    // its unlinked file is let go.
                    let sent = tokio::select! {
                        biased;
                        error = &mut generation_failed => return Err(download.fail(error)),
                        sent = socket.send_file(&file, reader.position, count) => sent?,
                    };
                    if sent == 0 {
                        let error = io::Error::other("archive file shorter than announced");
                        return Err(download.fail(error));
                    }
                    reader.position += sent as u64;
                    download.log.bytes += sent as u64;
                    m::sent_bytes().increment(sent as u64);
                }
            }
            if chunked {
                let last = if chunks == 0 {
                    "0\r\n\r\n"
                } else {
                    "\r\n0\r\n\r\n"
                };
                socket.send_bytes(last.as_bytes(), false).await?;
            }
            download.finish();
            Ok(())
        })
    }
}

/// The error a download of a failed generation ends with.
fn generation_failed(failure: &Failure) -> io::Error {
    io::Error::other(format!("generation failed: {}", failure.outcome()))
}

/// Whether a growing file has enough past a reader's `position` to
/// read now without being told to: its first bytes (a cold download starts
/// with the generation's first bytes), or the rest of the `step` the reader
/// is in (or of its range): a block for a body stream, which reads one
/// block at a time; `WAKE_BYTES` for a `sendfile` download, which takes
/// everything written and then waits where the [`Announcer`] would wake it
/// (a chunk, its size line, a pass of its loop and its client's read per
/// 1 MiB, not per block it finds when it comes back). A piece is read when the
/// [`Announcer`] tells of it, once it has waited `PIECE_WAIT`. A generation
/// writes every few KiB of output; a reader that took each piece woke,
/// wrote and made its client read once per piece, thirty times over with
/// thirty clients on one generation. The end comes with `Complete`.
fn worth_reading(position: u64, end: Option<u64>, written: u64, step: u64) -> bool {
    let wanted = ((position / step + 1) * step).min(end.unwrap_or(u64::MAX));
    written > position && (position == 0 || written >= wanted)
}

/// Where a read from `position` ends: at the next multiple of
/// `READ_CHUNK_BYTES`, or at `available` if that comes first. Downloads at
/// the same place thus ask for the same blocks.
fn block_end(position: u64, available: u64) -> u64 {
    let chunk = READ_CHUNK_BYTES as u64;
    ((position / chunk + 1) * chunk).min(available)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::path::PathBuf;
    use std::pin::Pin;
    use std::sync::Mutex;

    /// `docs/archiver.md`'s tailing readers give these block, shared-block and
    /// pool sizes.
    /// (Docs review: a figure changed on one side only had nothing to
    /// fail.)
    #[test]
    fn the_figures_docs_give_for_readers_are_these_constants() {
        gitball_core::docs::assert_says(
            include_str!("../../README.md"),
            "README.md",
            [format!("at most one {} KiB block", READ_CHUNK_BYTES >> 10)],
        );
        gitball_core::docs::assert_says(
            include_str!("../../docs/archiver.md"),
            "docs/archiver.md",
            [
                format!(
                    "A body stream reads at most {} KiB at a time",
                    READ_CHUNK_BYTES >> 10
                ),
                format!("each {} MiB the file grows by", WAKE_BYTES >> 20),
                format!(
                    "bytes that have waited {} ms since they reached the file",
                    PIECE_WAIT.as_millis()
                ),
                format!(
                    "{} MiB of recent blocks are kept per process",
                    SHARED_BLOCKS_BYTES >> 20
                ),
                format!(
                    "at most {POOLED_BLOCKS} free buffers ({} MiB)",
                    (POOLED_BLOCKS * READ_CHUNK_BYTES) >> 20
                ),
            ],
        );
    }

    use futures_util::{FutureExt, StreamExt};
    use gitball_core::log::{Finished, Tier};
    use http::Method;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::cache::{Cache, Lookup};
    use crate::generate::Failure;
    use crate::test_support::{CLIENT, HEADER_LEN, StubGit, printed, within};

    /// What a request's log record said when it was dropped.
    #[derive(Clone, Debug)]
    struct Ended {
        ending: Ending,
        bytes: u64,
        fault: Option<Fault>,
        error: Option<String>,
    }

    /// Every record dropped so far, by request id: tests run in parallel,
    /// each with its own ids.
    static ENDED: Mutex<BTreeMap<String, Ended>> = Mutex::new(BTreeMap::new());

    fn remember(log: &RequestLog, finished: &Finished) {
        let ended = Ended {
            ending: finished.ending,
            bytes: log.bytes,
            fault: log.fault,
            error: log.error.clone(),
        };
        let previous = ENDED.lock().unwrap().insert(log.request_id.clone(), ended);
        assert!(previous.is_none(), "request id used twice");
    }

    fn log(id: &str) -> RequestLog {
        let mut log = RequestLog::new(
            Tier::Archiver,
            id.to_owned(),
            Method::GET,
            "/owner/repo/archive/main.tar",
            remember,
        );
        log.status = Some(http::StatusCode::OK);
        log
    }

    fn record(id: &str) -> Option<Ended> {
        ENDED.lock().unwrap().get(id).cloned()
    }

    type Body = Pin<Box<dyn futures_util::Stream<Item = io::Result<Bytes>> + Send>>;

    fn download(source: Source, range: Option<ByteRange>, id: &str) -> Body {
        Box::pin(Reader::open(source, range).unwrap().into_stream(log(id)))
    }

    async fn next_chunk(body: &mut Body) -> Bytes {
        within(body.next()).await.unwrap().unwrap()
    }

    /// Reads chunks until `len` bytes came, however git's output was cut.
    async fn read_exactly(body: &mut Body, len: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        while (bytes.len() as u64) < len {
            bytes.extend_from_slice(&next_chunk(body).await);
        }
        bytes
    }

    /// Nothing is ready without something else happening first.
    fn is_waiting(body: &mut Body) -> bool {
        body.next().now_or_never().is_none()
    }

    /// Reads to the end; the chunks' sizes and their bytes.
    async fn read_all(body: &mut Body) -> (Vec<usize>, Vec<u8>) {
        let mut sizes = Vec::new();
        let mut bytes = Vec::new();
        while let Some(chunk) = within(body.next()).await {
            let chunk = chunk.unwrap();
            sizes.push(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        (sizes, bytes)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 % 253) as u8).collect()
    }

    /// A complete file outside any cache.
    fn complete_file(dir: &tempfile::TempDir, data: &[u8]) -> Arc<CacheFile> {
        let path = dir.path().join("complete");
        std::fs::write(&path, data).unwrap();
        CacheFile::unindexed(path, data.len() as u64, Sha256::digest(data).into())
    }

    /// A generation the test drives, and a handle to append to its file.
    fn growing(
        dir: &tempfile::TempDir,
    ) -> (
        Arc<Generation>,
        tokio::sync::watch::Sender<Progress>,
        std::fs::File,
        PathBuf,
    ) {
        let path = dir.path().join("growing.partial");
        let (generation, progress) = Generation::driven(path.clone());
        let writer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        (generation, progress, writer, path)
    }

    #[tokio::test]
    async fn a_growing_file_is_read_as_announced_exactly_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (generation, progress, mut writer, path) = growing(&dir);
        let mut body = download(Source::Growing(generation), None, "tail-grow");
        assert!(is_waiting(&mut body), "nothing announced yet");

        let announcer = Announcer::new(progress.clone());

        // Bytes in the file are read only once announced; the first ones at
        // once.
        writer.write_all(b"hello ").unwrap();
        assert!(is_waiting(&mut body));
        announcer.grown(6);
        assert_eq!(next_chunk(&mut body).await, "hello ");
        assert!(is_waiting(&mut body));

        // Then whole blocks: the rest of the first one, never past the
        // announced length, whatever is in the file.
        let data = pattern(2 * READ_CHUNK_BYTES);
        writer.write_all(&data).unwrap();
        announcer.grown(6 + 1000);
        assert!(
            is_waiting(&mut body),
            "a piece of a block waits for the rest"
        );
        // Told (as a wake-up or a piece that waited tells), it reads to
        // the block's end, then the rest it was told of.
        let block = READ_CHUNK_BYTES as u64;
        progress.send_modify(|p| p.written = block + 10);
        assert_eq!(next_chunk(&mut body).await, &data[..READ_CHUNK_BYTES - 6]);
        assert_eq!(
            next_chunk(&mut body).await,
            &data[READ_CHUNK_BYTES - 6..READ_CHUNK_BYTES + 4]
        );
        assert!(is_waiting(&mut body));

        // The end comes with the generation's, whatever is left.
        let len = 6 + data.len() as u64;
        let mut whole = b"hello ".to_vec();
        whole.extend_from_slice(&data);
        progress.send_modify(|p| {
            p.written = len;
            p.state = State::Complete(CacheFile::unindexed(
                path.clone(),
                len,
                Sha256::digest(&whole).into(),
            ))
        });
        let (sizes, rest) = read_all(&mut body).await;
        assert_eq!(sizes, [READ_CHUNK_BYTES - 10, 6]);
        assert_eq!(rest, &data[READ_CHUNK_BYTES + 4..]);
        // The stream let go of the record at its end.
        let ended = record("tail-grow").unwrap();
        assert_eq!(ended.ending, Ending::Complete);
        assert_eq!(ended.bytes, len);
        assert_eq!(ended.fault, None);
    }

    /// A generation writes every few KiB of output; thirty downloads of
    /// one generation taking each piece meant thirty wake-ups, writes and
    /// client reads per piece. After its first bytes, a download of a
    /// growing file reads whole shared blocks (or the rest of its range),
    /// a piece being held back for at most `PIECE_WAIT` after it was
    /// written.
    #[tokio::test(start_paused = true)]
    async fn a_growing_file_is_read_in_whole_blocks_after_its_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (generation, progress, mut writer, _path) = growing(&dir);
        let announcer = Arc::new(Announcer::new(progress));
        tokio::spawn({
            let announcer = announcer.clone();
            async move { announcer.pieces().await }
        });
        let wake = usize::try_from(WAKE_BYTES).unwrap();
        let data = pattern(wake + 3 * READ_CHUNK_BYTES);
        writer.write_all(&data).unwrap();
        let mut body = download(Source::Growing(generation.clone()), None, "tail-blocks");
        let mut ranged = download(
            Source::Growing(generation),
            Some(ByteRange {
                first: 100,
                last: 2_099,
            }),
            "tail-blocks-range",
        );
        let mut sizes = Vec::new();
        let mut ranged_sizes = Vec::new();
        let mut ranged_done = false;
        // Polled after every write; a reader waiting for bytes looks again
        // only when the writer wakes it.
        for written in (1..=WAKE_BYTES + 1).step_by(8 * 1024) {
            announcer.grown(written);
            while let Some(Some(chunk)) = body.next().now_or_never() {
                sizes.push(chunk.unwrap().len());
            }
            while !ranged_done {
                match ranged.next().now_or_never() {
                    Some(Some(chunk)) => ranged_sizes.push(chunk.unwrap().len()),
                    Some(None) => ranged_done = true,
                    None => break,
                }
            }
        }
        // The first byte at once; then nothing until the file passed
        // `WAKE_BYTES`, and then every whole block, and the byte past them
        // it was woken for.
        let mut expected = vec![1, READ_CHUNK_BYTES - 1];
        expected.extend([READ_CHUNK_BYTES; 7]);
        expected.push(1);
        assert_eq!(sizes, expected);
        // The range's first read is not a download's first byte; it waits
        // for its whole range (within one block).
        assert_eq!(ranged_sizes, [2_000]);
        assert!(ranged_done);

        // A piece of a block waits; `PIECE_WAIT` after its first byte was
        // written, it is read.
        let started = tokio::time::Instant::now();
        announcer.grown(WAKE_BYTES + 3 * READ_CHUNK_BYTES as u64 - 1);
        assert!(is_waiting(&mut body));
        assert_eq!(next_chunk(&mut body).await.len(), READ_CHUNK_BYTES - 1);
        // docs/archiver.md's figure, not the constant: a longer wait would
        // leave a live archiver silent past what it promises (mutation
        // review: the constant raised to 5 s passed).
        assert_eq!(started.elapsed(), std::time::Duration::from_millis(50));
    }

    /// Readers are woken `WAKE_BYTES` past the length they were last woken
    /// for: after a piece that waited, not again a few blocks later where
    /// the file passes a multiple of `WAKE_BYTES` (benchmark 4's generation
    /// writes 1 MiB in about `PIECE_WAIT`, and woke its thirty readers
    /// about twice per MiB).
    #[tokio::test(start_paused = true)]
    async fn after_a_piece_readers_are_woken_a_whole_step_later() {
        let dir = tempfile::tempdir().unwrap();
        let (generation, progress, _writer, _path) = growing(&dir);
        let announcer = Arc::new(Announcer::new(progress));
        tokio::spawn({
            let announcer = announcer.clone();
            async move { announcer.pieces().await }
        });
        let mut readers = generation.progress();
        let mut woken_at = Vec::new();
        let mut written = 0;
        // 64 KiB every 4 ms: 1 MiB in 64 ms, so pieces wait `PIECE_WAIT`.
        for _ in 0..64 {
            written += 64 * 1024;
            announcer.grown(written);
            tokio::time::sleep(std::time::Duration::from_millis(4)).await;
            if readers.has_changed().unwrap() {
                woken_at.push(readers.borrow_and_update().written);
            }
        }
        // The first bytes, then pieces every 50 ms (about 800 KiB): never
        // again a few writes after one, where the file passed 1 MiB.
        assert_eq!(woken_at[0], 64 * 1024);
        assert!(woken_at.len() >= 4, "{woken_at:?}");
        for pair in woken_at[1..].windows(2) {
            assert!(pair[1] - pair[0] >= 512 * 1024, "{woken_at:?}");
        }
    }

    #[tokio::test]
    async fn a_generation_that_completes_with_bytes_unread_is_read_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let (generation, progress, mut writer, path) = growing(&dir);
        let data = pattern(READ_CHUNK_BYTES + 1000);
        writer.write_all(&data[..10]).unwrap();
        progress.send_modify(|p| p.written = 10);
        let mut body = download(Source::Growing(generation), None, "tail-finish");
        assert_eq!(next_chunk(&mut body).await, &data[..10]);

        // The rest arrives and the generation completes before the next poll.
        writer.write_all(&data[10..]).unwrap();
        let len = data.len() as u64;
        progress.send_modify(|p| {
            p.written = len;
            p.state = State::Complete(CacheFile::unindexed(path, len, [0; 32]));
        });
        let (sizes, rest) = read_all(&mut body).await;
        // Reads end at block boundaries, so downloads share blocks.
        assert_eq!(sizes, [READ_CHUNK_BYTES - 10, 1000]);
        assert_eq!(rest, &data[10..]);
        drop(body);
        assert_eq!(record("tail-finish").unwrap().ending, Ending::Complete);
    }

    #[tokio::test]
    async fn a_complete_file_is_read_in_read_sized_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(2 * READ_CHUNK_BYTES + 1234);
        let mut body = download(
            Source::Complete(complete_file(&dir, &data)),
            None,
            "tail-whole",
        );
        let (sizes, bytes) = read_all(&mut body).await;
        assert_eq!(sizes, [READ_CHUNK_BYTES, READ_CHUNK_BYTES, 1234]);
        assert_eq!(bytes, data);
        drop(body);
        let ended = record("tail-whole").unwrap();
        assert_eq!(ended.ending, Ending::Complete);
        assert_eq!(ended.bytes, data.len() as u64);
    }

    #[tokio::test]
    async fn a_range_of_a_complete_file_is_exactly_that_range() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(2 * READ_CHUNK_BYTES + 1234);
        let file = complete_file(&dir, &data);

        let range = ByteRange {
            first: 1000,
            last: READ_CHUNK_BYTES as u64 + 1999,
        };
        let mut body = download(Source::Complete(file.clone()), Some(range), "tail-range");
        // Up to the block boundary, then to the range's end.
        assert_eq!(next_chunk(&mut body).await, &data[1000..READ_CHUNK_BYTES]);
        assert_eq!(
            next_chunk(&mut body).await,
            &data[READ_CHUNK_BYTES..READ_CHUNK_BYTES + 2000]
        );
        // hyper stops polling once Content-Length bytes went out: reaching
        // the range's end is complete, without a last poll.
        drop(body);
        let ended = record("tail-range").unwrap();
        assert_eq!(ended.ending, Ending::Complete);
        assert_eq!(ended.bytes, range.len());

        let last = data.len() as u64 - 1;
        let range = ByteRange { first: last, last };
        let mut body = download(Source::Complete(file), Some(range), "tail-last-byte");
        let (sizes, bytes) = read_all(&mut body).await;
        assert_eq!(sizes, [1]);
        assert_eq!(bytes, [data[data.len() - 1]]);
    }

    #[tokio::test]
    async fn downloads_of_the_same_bytes_share_one_read_and_small_ones_need_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(READ_CHUNK_BYTES + 100);
        let file = complete_file(&dir, &data);
        let mut first = download(Source::Complete(file.clone()), None, "tail-share-1");
        let mut second = download(Source::Complete(file.clone()), None, "tail-share-2");
        let (a, b) = (next_chunk(&mut first).await, next_chunk(&mut second).await);
        assert_eq!(a, &data[..READ_CHUNK_BYTES]);
        // The very same memory, not a copy.
        assert_eq!(a.as_ptr(), b.as_ptr());

        // A small archive read once is served again from memory: its file
        // may even be gone.
        let other = tempfile::tempdir().unwrap();
        let small = complete_file(&other, b"small archive");
        let (_, bytes) = read_all(&mut download(
            Source::Complete(small.clone()),
            None,
            "tail-small-1",
        ))
        .await;
        assert_eq!(bytes, b"small archive");
        std::fs::remove_file(&small.path).unwrap();
        let reader = Reader::open(Source::Complete(small), None).unwrap();
        assert!(reader.file.is_none());
        let mut body: Body = Box::pin(reader.into_stream(log("tail-small-2")));
        let (_, bytes) = read_all(&mut body).await;
        assert_eq!(bytes, b"small archive");
    }

    #[tokio::test]
    async fn an_empty_archive_ends_at_once_and_completely() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = download(
            Source::Complete(complete_file(&dir, b"")),
            None,
            "tail-empty",
        );
        assert!(within(body.next()).await.is_none());
        drop(body);
        assert_eq!(record("tail-empty").unwrap().ending, Ending::Complete);
    }

    #[tokio::test]
    async fn a_failed_generation_is_an_error_never_a_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        let (generation, progress, mut writer, _path) = growing(&dir);
        let mut body = download(Source::Growing(generation), None, "tail-failed");
        writer.write_all(b"0123456789").unwrap();
        progress.send_modify(|p| p.written = 10);
        assert_eq!(next_chunk(&mut body).await, "0123456789");

        progress.send_modify(|p| p.state = State::Failed(Failure::TooLarge));
        let error = within(body.next()).await.unwrap().unwrap_err();
        assert!(error.to_string().contains("too_large"), "{error}");
        assert!(within(body.next()).await.is_none());
        drop(body);
        let ended = record("tail-failed").unwrap();
        assert_eq!(ended.ending, Ending::Aborted);
        assert_eq!(ended.fault, Some(Fault::Internal));
        assert_eq!(ended.bytes, 10);
        assert!(ended.error.unwrap().contains("too_large"));
    }

    #[tokio::test]
    async fn a_failure_wins_over_announced_bytes_not_yet_read() {
        let dir = tempfile::tempdir().unwrap();
        let (generation, progress, mut writer, _path) = growing(&dir);
        writer.write_all(b"0123456789").unwrap();
        progress.send_modify(|p| {
            p.written = 10;
            p.state = State::Failed(Failure::Failed);
        });
        let mut body = download(Source::Growing(generation), None, "tail-failed-first");
        assert!(within(body.next()).await.unwrap().is_err());
        drop(body);
        assert_eq!(record("tail-failed-first").unwrap().ending, Ending::Aborted);
    }

    #[tokio::test]
    async fn a_generation_gone_without_a_result_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (generation, progress, mut writer, _path) = growing(&dir);
        let mut body = download(Source::Growing(generation), None, "tail-vanished");
        writer.write_all(b"abc").unwrap();
        progress.send_modify(|p| p.written = 3);
        assert_eq!(next_chunk(&mut body).await, "abc");
        drop(progress);
        assert!(within(body.next()).await.unwrap().is_err());
        drop(body);
        assert_eq!(record("tail-vanished").unwrap().ending, Ending::Aborted);
    }

    #[tokio::test]
    async fn a_download_dropped_early_is_client_gone() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(2 * READ_CHUNK_BYTES);
        let mut body = download(
            Source::Complete(complete_file(&dir, &data)),
            None,
            "tail-left-complete",
        );
        assert_eq!(next_chunk(&mut body).await.len(), READ_CHUNK_BYTES);
        drop(body);
        let ended = record("tail-left-complete").unwrap();
        assert_eq!(ended.ending, Ending::ClientGone);
        assert_eq!(ended.bytes, READ_CHUNK_BYTES as u64);
        assert_eq!(ended.fault, None);

        // Left while waiting for a generation's next bytes.
        let (generation, _progress, _writer, _path) = growing(&dir);
        let mut body = download(Source::Growing(generation), None, "tail-left-growing");
        assert!(is_waiting(&mut body));
        drop(body);
        let ended = record("tail-left-growing").unwrap();
        assert_eq!(ended.ending, Ending::ClientGone);
        assert_eq!(ended.bytes, 0);
    }

    #[tokio::test]
    async fn a_git_generation_is_tailed_while_it_runs() {
        let stub = StubGit::printing(b"head ");
        let mut feed = stub.feed();
        let cache = Cache::open(stub.settings(1 << 20)).unwrap();
        let Lookup::Miss(generation) = cache.lookup(stub.spec(1), CLIENT, "tail-git").unwrap()
        else {
            panic!("a miss expected")
        };
        // As a request does: its file is made once it has its slot.
        within(generation.started()).await;
        let mut body = download(
            Source::Growing(generation.into_generation()),
            None,
            "tail-git",
        );
        assert_eq!(
            read_exactly(&mut body, HEADER_LEN + 5).await,
            printed(b"head ")
        );
        feed.send(b"and tail");
        assert_eq!(next_chunk(&mut body).await, "and tail");
        drop(feed);
        assert!(within(body.next()).await.is_none());
        drop(body);
        let ended = record("tail-git").unwrap();
        assert_eq!(ended.ending, Ending::Complete);
        assert_eq!(ended.bytes, HEADER_LEN + 13);
    }

    #[tokio::test]
    async fn a_failing_git_makes_its_tail_fail() {
        let stub = StubGit::new(b"head ", 1);
        let mut feed = stub.feed();
        let cache = Cache::open(stub.settings(1 << 20)).unwrap();
        let Lookup::Miss(generation) = cache
            .lookup(stub.spec(1), CLIENT, "tail-git-fails")
            .unwrap()
        else {
            panic!("a miss expected")
        };
        // As a request does: its file is made once it has its slot.
        within(generation.started()).await;
        let mut body = download(
            Source::Growing(generation.into_generation()),
            None,
            "tail-git-fails",
        );
        assert_eq!(
            read_exactly(&mut body, HEADER_LEN + 5).await,
            printed(b"head ")
        );
        feed.send(b"and tail");
        assert_eq!(next_chunk(&mut body).await, "and tail");
        // git exits 1.
        drop(feed);
        assert!(within(body.next()).await.unwrap().is_err());
        drop(body);
        assert_eq!(record("tail-git-fails").unwrap().ending, Ending::Aborted);
    }

    #[tokio::test]
    async fn an_evicted_file_being_read_is_read_whole_and_held_until_the_end() {
        let stub = StubGit::printing(&pattern(100));
        let data = printed(&pattern(100));
        let archive = data.len() as u64;
        // Room for one archive, not two.
        let cache = Cache::open(stub.settings(archive + 50)).unwrap();
        let generate = |n| {
            let cache = cache.clone();
            let spec = stub.spec(n);
            async move {
                let Lookup::Miss(generation) = cache.lookup(spec, CLIENT, "tail-evict").unwrap()
                else {
                    panic!("a miss expected")
                };
                match within(generation.finished()).await {
                    State::Complete(file) => file,
                    other => panic!("{other:?}"),
                }
            }
        };
        let first = generate(1).await;
        let mut body = download(Source::Complete(first), None, "tail-evicted");

        // Room for the second only: the first is evicted while open.
        drop(generate(2).await);
        assert!(cache.peek(&stub.spec(1)).is_none());
        assert_eq!(cache.held_bytes(), archive);
        assert_eq!(next_chunk(&mut body).await, data);
        assert_eq!(cache.held_bytes(), archive, "held until the download ends");
        assert!(within(body.next()).await.is_none());
        assert_eq!(cache.held_bytes(), 0);
    }

    #[test]
    fn a_reused_block_buffer_holds_only_the_bytes_of_its_new_block() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        let second = dir.path().join("second");
        std::fs::write(&first, vec![1u8; READ_CHUNK_BYTES]).unwrap();
        std::fs::write(&second, pattern(READ_CHUNK_BYTES)).unwrap();
        let end = READ_CHUNK_BYTES as u64;

        let block = read_exactly_at(&std::fs::File::open(&first).unwrap(), 0, end).unwrap();
        assert!(block.iter().all(|&byte| byte == 1));
        // Still referred to: its buffer is not handed out again.
        let kept = block.clone();
        drop(block);
        let other = read_exactly_at(&std::fs::File::open(&second).unwrap(), 0, end).unwrap();
        assert!(kept.iter().all(|&byte| byte == 1));
        assert_eq!(other, pattern(READ_CHUNK_BYTES));
        drop((kept, other));
        // Back in the pool, then reused: the new block's bytes only.
        let again = read_exactly_at(&std::fs::File::open(&first).unwrap(), 0, end).unwrap();
        assert!(again.iter().all(|&byte| byte == 1));
        // A short file fails the whole-block read instead of serving old bytes.
        std::fs::write(&second, [7u8; 10]).unwrap();
        drop(again);
        assert!(read_exactly_at(&std::fs::File::open(&second).unwrap(), 0, end).is_err());
    }

    #[test]
    fn the_block_pool_keeps_a_bounded_number_of_buffers() {
        let pool = BlockPool {
            free: Mutex::new(Vec::new()),
        };
        for _ in 0..POOLED_BLOCKS * 2 {
            pool.give_back(vec![0; READ_CHUNK_BYTES]);
        }
        assert_eq!(pool.free.lock().unwrap().len(), POOLED_BLOCKS);
    }

    /// The deleted partial file of a failed generation, if this process
    /// still has it open.
    fn deleted_partial_open(path: &std::path::Path) -> bool {
        let deleted = format!("{} (deleted)", path.display());
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .any(|target| target.as_os_str() == deleted.as_str())
    }

    #[tokio::test]
    async fn a_sendfile_download_ends_at_once_when_its_generation_fails_while_the_client_is_slow() {
        const LEN: usize = 16 * 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let (generation, progress, mut writer, path) = growing(&dir);
        let data = pattern(LEN);
        writer.write_all(&data).unwrap();
        progress.send_modify(|p| p.written = LEN as u64);

        // A client that takes nothing: the body fills the socket buffers and
        // waits on the socket, far from the end of what was announced.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(64 * 1024).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut socket = gitball_core::server::StallGuard::new(
            server,
            // Far beyond the test's bound: not what ends the body.
            std::time::Duration::from_secs(600),
            gitball_core::server::ClientWrites::default(),
        );
        let body = Box::new(FileSend::new(
            Reader::open(Source::Growing(generation.clone()), None).unwrap(),
            true,
            Download::start(log("tail-sendfile-failed")),
        ));
        let mut sending = tokio::spawn(async move { body.send(&mut socket).await });
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(200), &mut sending);
        assert!(waiting.await.is_err(), "the body waits for the client");

        // The generation fails as `Cache::fail` does it.
        std::fs::remove_file(&path).unwrap();
        progress.send_modify(|p| p.state = State::Failed(Failure::TooLarge));
        generation.failed().cancel();
        drop((generation, writer));

        // The body ends with the failure, without a byte more taken by the
        // client, and lets the unlinked file go.
        let error = within(sending).await.unwrap().unwrap_err();
        assert!(error.to_string().contains("too_large"), "{error}");
        assert_eq!(
            record("tail-sendfile-failed").unwrap().ending,
            Ending::Aborted
        );
        assert!(!deleted_partial_open(&path));
        drop(client);
    }
}
