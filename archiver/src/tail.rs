//! Reading an archive file, complete or still growing, as a body stream.
//!
//! A reader holds an open file (its own for a complete archive, the
//! generation's shared handle for a growing one), one read buffer and a
//! `watch` receiver of the generation's progress; it reads up to the length
//! the writer has announced and then waits for more. It never reads ahead
//! of the client:
//! hyper polls the body only when the socket can take more, so a slow client
//! costs one `READ_CHUNK_BYTES` buffer, not the archive.
//!
//! A generation that fails makes the stream return an error, which makes
//! hyper abort the connection: a truncated archive never ends cleanly.
//!
//! Everything a download holds (the fd, the `Arc<CacheFile>` that keeps
//! held-bytes accounting right, the active-downloads gauge, the request's
//! log record) lives in the stream's state and is released when hyper drops
//! the body, at whatever point the client went away.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use gitball_core::log::{Ending, Fault, RequestLog};
use metrics::{counter, gauge};
use tokio::sync::watch;

use crate::cache::{CacheFile, Generation, Progress, State};
use crate::conditional::ByteRange;
use crate::metrics as m;

/// Size of one body read.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;

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
        gauge!(m::ACTIVE_DOWNLOADS).increment(1.0);
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
}

impl Drop for Download {
    fn drop(&mut self) {
        gauge!(m::ACTIVE_DOWNLOADS).decrement(1.0);
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
    file: Arc<std::fs::File>,
    position: u64,
    /// Exclusive end for a range; `None` reads to the archive's end.
    end: Option<u64>,
    /// Holds the complete file (held-bytes accounting) or the generation.
    source: Source,
    progress: Option<watch::Receiver<Progress>>,
    complete_len: Option<u64>,
}

impl Reader {
    /// Opens `source` for reading `range` (the whole archive for `None`).
    pub fn open(source: Source, range: Option<ByteRange>) -> io::Result<Reader> {
        let (file, progress, complete_len) = match &source {
            Source::Complete(file) => (
                Arc::new(std::fs::File::open(&file.path)?),
                None,
                Some(file.len),
            ),
            Source::Growing(generation) => {
                (generation.file.clone(), Some(generation.progress()), None)
            }
        };
        Ok(Reader {
            file,
            position: range.map_or(0, |range| range.first),
            end: range.map(|range| range.last + 1),
            source,
            progress,
            complete_len,
        })
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
                    counter!(m::SENT_BYTES_TOTAL).increment(chunk.len() as u64);
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
                    download.failed = true;
                    download.log.error = Some(error.to_string());
                    Some((Err(error), (reader, download)))
                }
            }
        })
    }

    /// Every byte of a complete archive (or range) has been read.
    fn at_end(&self) -> bool {
        self.complete_len
            .map(|len| self.end.map_or(len, |end| end.min(len)))
            .is_some_and(|end| self.position >= end)
    }

    async fn next(&mut self) -> io::Result<Option<Bytes>> {
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
        if self.at_end() {
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
        Ok(Some(chunk))
    }
}
