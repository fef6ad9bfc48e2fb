//! Reading an archive file, complete or still growing, as a body stream.
//!
//! A reader holds one open file, one read buffer and a `watch` receiver of
//! the generation's progress; it reads up to the length the writer has
//! announced and then waits for more. It never reads ahead of the client:
//! hyper polls the body only when the socket can take more, so a slow client
//! costs one `READ_CHUNK_BYTES` buffer, not the archive.
//!
//! A generation that fails makes the stream return an error, which makes
//! hyper abort the connection: a truncated archive never ends cleanly.
//!
//! Everything a download holds (the fd, the `Arc<CacheFile>` that keeps
//! held-bytes accounting right, the active-downloads gauge) lives in the
//! stream's state and is released when hyper drops the body, at whatever
//! point the client went away.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use metrics::{counter, gauge, histogram};
use tokio::sync::watch;

use crate::cache::{CacheFile, Generation, Progress, State};
use crate::metrics as m;

/// Size of one body read.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;

/// What a download reads from.
pub enum Source {
    Complete(Arc<CacheFile>),
    Growing(Arc<Generation>),
}

/// Accounts one download in the metrics and writes its log line; its `Drop`
/// ends it, however the body ended.
pub struct Download {
    log: RequestLog,
    sent: u64,
    finished: bool,
    failed: bool,
}

/// What the one log line of a request says.
#[derive(Clone, Debug)]
pub struct RequestLog {
    pub started: Instant,
    pub request_id: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub cache: &'static str,
    pub commit: String,
}

impl RequestLog {
    /// Logs a request whose response has no streamed body.
    pub fn emit(&self, outcome: &'static str, sent: u64) {
        let seconds = self.started.elapsed().as_secs_f64();
        histogram!(m::REQUEST_DURATION).record(seconds);
        tracing::info!(
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            status = self.status,
            cache = self.cache,
            commit = %self.commit,
            bytes = sent,
            seconds,
            outcome,
            "request"
        );
    }
}

impl Download {
    pub fn start(log: RequestLog) -> Download {
        gauge!(m::ACTIVE_DOWNLOADS).increment(1.0);
        Download {
            log,
            sent: 0,
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
}

impl Drop for Download {
    fn drop(&mut self) {
        gauge!(m::ACTIVE_DOWNLOADS).decrement(1.0);
        let outcome = if self.finished {
            "complete"
        } else if self.failed {
            "aborted"
        } else {
            counter!(m::CLIENT_DISCONNECTS_TOTAL).increment(1);
            "client_disconnected"
        };
        self.log.emit(outcome, self.sent);
    }
}

struct Reader {
    file: Arc<std::fs::File>,
    position: u64,
    /// Exclusive end for a range; `None` reads to the archive's end.
    end: Option<u64>,
    /// Holds the complete file (held-bytes accounting) or the generation.
    source: Source,
    progress: Option<watch::Receiver<Progress>>,
    complete_len: Option<u64>,
    download: Download,
}

/// Opens `source` and returns the body stream from `start` to `end`
/// (exclusive; `None` for the end of the archive).
pub fn open(
    source: Source,
    start: u64,
    end: Option<u64>,
    download: Download,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send + 'static> {
    let (file, progress, complete_len) = match &source {
        Source::Complete(file) => (std::fs::File::open(&file.path)?, None, Some(file.len)),
        Source::Growing(generation) => {
            let progress = generation.progress();
            let file = match std::fs::File::open(&generation.partial) {
                Ok(file) => file,
                // Renamed meanwhile: the generation completed.
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    match &progress.borrow().state {
                        State::Complete(file) => std::fs::File::open(&file.path)?,
                        _ => return Err(error),
                    }
                }
                Err(error) => return Err(error),
            };
            (file, Some(progress), None)
        }
    };
    let reader = Reader {
        file: Arc::new(file),
        position: start,
        end,
        source,
        progress,
        complete_len,
        download,
    };
    Ok(futures_util::stream::unfold(
        reader,
        |mut reader| async move {
            match reader.next().await {
                Ok(Some(chunk)) => Some((Ok(chunk), reader)),
                Ok(None) => {
                    reader.download.finish();
                    None
                }
                Err(error) => {
                    reader.download.failed = true;
                    Some((Err(error), reader))
                }
            }
        },
    ))
}

impl Reader {
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        if self.download.failed {
            return Ok(None);
        }
        let available = loop {
            let available = match (self.complete_len, &mut self.progress) {
                (Some(len), _) => len,
                (None, Some(progress)) => {
                    let snapshot = progress.borrow_and_update().clone();
                    match snapshot.state {
                        State::Complete(file) => {
                            self.complete_len = Some(file.len);
                            let len = file.len;
                            // From now on this reader holds the indexed file:
                            // if it is evicted while we read, its bytes count
                            // as held until we are done.
                            self.source = Source::Complete(file);
                            len
                        }
                        State::Failed(failure) => {
                            return Err(io::Error::other(format!(
                                "generation failed: {}",
                                failure.outcome()
                            )));
                        }
                        State::Running if snapshot.written > self.position => snapshot.written,
                        State::Running => {
                            if progress.changed().await.is_err() {
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
        let complete = self
            .complete_len
            .map(|len| self.end.map_or(len, |end| end.min(len)));
        if complete.is_some_and(|end| self.position >= end) {
            return Ok(None);
        }
        let want = usize::try_from(available - self.position)
            .unwrap_or(usize::MAX)
            .min(READ_CHUNK_BYTES);
        let file = self.file.clone();
        let position = self.position;
        let chunk = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let mut buffer = BytesMut::zeroed(want);
            let mut filled = 0;
            while filled < want {
                match file.read_at(&mut buffer[filled..], position + filled as u64)? {
                    0 => break,
                    n => filled += n,
                }
            }
            buffer.truncate(filled);
            Ok(buffer.freeze())
        })
        .await
        .map_err(io::Error::other)??;
        if chunk.is_empty() {
            return Err(io::Error::other("archive file shorter than announced"));
        }
        self.position += chunk.len() as u64;
        self.download.sent += chunk.len() as u64;
        counter!(m::SENT_BYTES_TOTAL).increment(chunk.len() as u64);
        // With a Content-Length, hyper stops polling after the last byte:
        // the end is reached now, not on a next poll that never comes.
        if complete.is_some_and(|end| self.position >= end) {
            self.download.finish();
        }
        Ok(Some(chunk))
    }
}
