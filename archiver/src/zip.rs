//! The zip writer: git's tar stream in, a zip out, its entries deflated on
//! all cores.
//!
//! `git archive --format=zip` deflates file after file on one core; the
//! "Download ZIP" link is the most clicked one, so the archiver asks git for
//! its tar instead (the same entries in the same order, export-ignore and
//! export-subst already applied) and writes the zip itself.
//!
//! Invariants:
//! - **Every entry is git's.** Names (bytes as git wrote them, the UTF-8 flag
//!   when not ASCII), the executable bit and symlinks in the external
//!   attributes and "version made by" exactly as git's `archive-zip.c`
//!   writes them, the commit time as DOS time and as an extended-timestamp
//!   extra field, directories (and submodules) as git writes them, the
//!   "text" bit from git's NUL-byte heuristic, the commit id (from the tar's
//!   pax global header) as the archive comment. Stored or deflated per entry
//!   as git decides (deflate, but store what deflate does not shrink).
//! - **The bytes depend on the input alone.** Each entry up to
//!   `WHOLE_ENTRY_MAX_BYTES` is one independent raw deflate run at a fixed
//!   level; a larger one is cut into `STREAM_BLOCK_BYTES` blocks, each an
//!   independent run primed with the previous block's last 32 KiB and closed
//!   with a sync flush (the last one finished): the pigz construction, one
//!   valid deflate stream. Which thread compresses what, how entries are
//!   batched into jobs and how git's pipe cut its output change nothing:
//!   results are written in entry order.
//! - **Memory is bounded.** At most `MAX_QUEUED_JOBS` jobs and
//!   `MAX_QUEUED_INPUT_BYTES` of input wait for compression or writing; a
//!   large entry is never held whole (it is streamed block by block, with its
//!   CRC and compressed size in a data descriptor after its data). The
//!   central directory (about 60 bytes plus the name per entry), which
//!   grows with the archive (git's own zip holds it in memory), is held in
//!   memory up to `CENTRAL_SPILL_BYTES` and spilled to an unlinked
//!   temporary file beyond, and copied out at the end (review: attack; a
//!   tree of 262,144 entries with long names, 196 KB pushed, took 1.2 GB
//!   of the archiver's memory).
//! - **The first byte is not held back.** git's first entry is always the
//!   prefix directory (`{repo}-{label}/`, the commit time as mtime), whose
//!   local header depends on nothing git computes: `write_ahead_directory`
//!   writes it before git runs, and git's own first entry must then be
//!   exactly that one (name, kind, mtime) or the writer fails (the bytes
//!   already sent would not be git's entry). After it, an entry is handed
//!   to the workers at once when nothing is waiting before it, and whatever
//!   is finished at the front is written after every piece of git's output
//!   (`generate` also waits for the oldest job whenever git's pipe is idle).
//! - **zip64** records appear exactly where a field does not fit: entries,
//!   offsets and sizes of `0xFFFFFFFF` (4 GiB − 1, the value that marks a
//!   zip64 field) and more, more than 65 534 entries.
//!
//! Two deliberate differences from git's own zip, which change no entry:
//! the DOS time is the commit time in UTC (git converts with the server's
//! local time zone, so its zip changes with `TZ`), and a large entry's
//! data descriptor is in zip64 form exactly when its local header has a
//! zip64 field.

use std::collections::VecDeque;
use std::io::{self, Seek, Write};
use std::sync::mpsc;

use bytes::{Buf, Bytes, BytesMut};

use crate::compress::{Pool, Wait, deflate_run, receive};

/// Entries up to this size are compressed whole, as one job, and written
/// with their sizes and CRC in the local header.
const WHOLE_ENTRY_MAX_BYTES: u64 = 1024 * 1024;
/// A larger entry is cut into blocks of this size (its last one shorter).
const STREAM_BLOCK_BYTES: usize = 1024 * 1024;
/// Small entries are batched into jobs of about this much input.
const BATCH_INPUT_BYTES: usize = 64 * 1024;
/// Bounds of the work queued behind the oldest unwritten entry.
const MAX_QUEUED_JOBS: usize = 64;
const MAX_QUEUED_INPUT_BYTES: usize = 8 * 1024 * 1024;
/// deflate's window: how much of the previous block primes the next one.
const DICTIONARY_BYTES: usize = 32 * 1024;
/// Upper bound of compression threads per generation.
const MAX_ZIP_THREADS: usize = 4;
/// git's `buffer_is_binary`: a NUL in the first 8000 bytes.
const BINARY_SNIFF_BYTES: usize = 8000;
/// Bound of one pax header's data (git writes a path or link target there).
const PAX_MAX_BYTES: u64 = 1024 * 1024;
/// Central directory records held in memory before they are spilled to an
/// unlinked temporary file ([`ZipWriter::spill_central`]).
const CENTRAL_SPILL_BYTES: usize = 1024 * 1024;
const TAR_BLOCK: usize = 512;

const LOCAL_HEADER_SIGNATURE: u32 = 0x0403_4b50;
const CENTRAL_HEADER_SIGNATURE: u32 = 0x0201_4b50;
const DATA_DESCRIPTOR_SIGNATURE: u32 = 0x0807_4b50;
const END_SIGNATURE: u32 = 0x0605_4b50;
const ZIP64_END_SIGNATURE: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
const FLAG_DATA_DESCRIPTOR: u16 = 1 << 3;
const FLAG_UTF8: u16 = 1 << 11;
/// "Version made by" for an entry with Unix attributes (git's 0x0317).
const CREATOR_UNIX: u16 = 0x0317;
const METHOD_STORED: u16 = 0;
const METHOD_DEFLATED: u16 = 8;
/// The extended timestamp extra field: tag, size 5, flags "mtime", mtime.
const EXTRA_MTIME_BYTES: u16 = 9;
const ZIP64_LOCAL_EXTRA_BYTES: u16 = 20;

/// Where zip64 records start. Fixed by the format; tests lower them to
/// exercise the zip64 paths without writing 4 GiB.
#[derive(Clone, Copy, Debug)]
pub struct Zip64At {
    /// A 32-bit size or offset field holds values below this.
    pub field: u64,
    /// A streamed entry of this size or more gets zip64 sizes in its local
    /// header and data descriptor (git's threshold: its compressed size
    /// could reach 4 GiB).
    pub streamed_entry: u64,
    /// The 16-bit entry counts hold values below this.
    pub entries: u64,
}

impl Zip64At {
    pub const FORMAT: Zip64At = Zip64At {
        field: 0xffff_ffff,
        streamed_entry: 0x8000_0000,
        entries: 0xffff,
    };
}

pub fn zip_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_ZIP_THREADS)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Directory,
    File { executable: bool },
    Symlink,
}

/// What the central directory needs of an entry besides its data.
#[derive(Debug)]
struct Meta {
    name: Vec<u8>,
    kind: Kind,
    mtime: i64,
}

impl Meta {
    /// The UTF-8 flag for a name that is not ASCII and that git's
    /// `is_utf8` takes: valid UTF-8 without U+FFFE or U+FFFF, which git
    /// refuses.
    fn flags(&self) -> u16 {
        let utf8 = std::str::from_utf8(&self.name)
            .is_ok_and(|name| !name.contains(['\u{fffe}', '\u{ffff}']));
        if !self.name.is_ascii() && utf8 {
            FLAG_UTF8
        } else {
            0
        }
    }

    /// "Version made by" and the external attributes, as git writes them.
    fn attributes(&self) -> (u16, u32) {
        match self.kind {
            Kind::Directory => (0, 16),
            Kind::File { executable: false } => (0, 0),
            Kind::File { executable: true } => (CREATOR_UNIX, 0o100_755 << 16),
            Kind::Symlink => (CREATOR_UNIX, 0o120_777 << 16),
        }
    }
}

/// A whole entry's data after its worker is done with it.
#[derive(Debug)]
struct Output {
    crc: u32,
    method: u16,
    size: u64,
    data: Bytes,
    text: bool,
}

/// An entry's input for a batch job.
struct Input {
    data: Bytes,
    deflate: bool,
    /// git's `is_binary` is unset (-1) for a directory: never "text".
    directory: bool,
}

enum Job {
    Batch {
        entries: Vec<Input>,
        reply: mpsc::SyncSender<io::Result<Vec<Output>>>,
    },
    Block {
        dictionary: Option<Bytes>,
        block: Bytes,
        last: bool,
        reply: mpsc::SyncSender<io::Result<Vec<u8>>>,
    },
}

/// In entry order, what is still to be written.
enum Pending {
    Done(Vec<(Meta, Output)>),
    Batch {
        metas: Vec<Meta>,
        reply: mpsc::Receiver<io::Result<Vec<Output>>>,
        input_bytes: usize,
    },
    StreamStart {
        meta: Meta,
        size: u64,
    },
    Block {
        reply: mpsc::Receiver<io::Result<Vec<u8>>>,
        input_bytes: usize,
    },
    StreamEnd {
        crc: u32,
        text: bool,
    },
}

/// The tar reader's position in git's stream.
enum TarState {
    Header,
    Pax { global: bool, remaining: u64 },
    Body { remaining: u64, padding: usize },
    Padding { remaining: usize },
    End,
}

/// The entry whose body is being read.
enum Body {
    None,
    Whole { meta: Meta, data: BytesMut },
    Stream(StreamIn),
}

/// A large entry being cut into blocks.
struct StreamIn {
    crc: crc32fast::Hasher,
    /// git's "text" bit, decided by the entry's first bytes.
    text: Option<bool>,
    block: BytesMut,
    previous: Option<Bytes>,
}

impl StreamIn {
    /// The dictionary for `block` (the previous block's tail); `block`
    /// becomes the previous one.
    fn dictionary_for(&mut self, block: &Bytes) -> Option<Bytes> {
        if self.text.is_none() {
            self.text = Some(is_text(block));
        }
        self.previous
            .replace(block.clone())
            .map(|previous| previous.slice(previous.len().saturating_sub(DICTIONARY_BYTES)..))
    }
}

/// The entry whose blocks are being written.
struct StreamOut {
    meta: Meta,
    offset: u64,
    size: u64,
    compressed: u64,
    zip64: bool,
    flags: u16,
}

pub struct ZipWriter<W: Write> {
    sink: W,
    pool: Pool<Job>,
    zip64: Zip64At,
    // The tar side.
    state: TarState,
    header: Vec<u8>,
    pax: Vec<u8>,
    pax_path: Option<Vec<u8>>,
    pax_linkpath: Option<Vec<u8>>,
    pax_size: Option<u64>,
    /// git's global `mtime` record: the commit time, written only when it
    /// does not fit the ustar field (after year 2242), which then holds the
    /// largest time it can.
    pax_mtime: Option<i64>,
    body: Body,
    comment: Vec<u8>,
    // Work between the two sides.
    batch_metas: Vec<Meta>,
    batch_inputs: Vec<Input>,
    batch_bytes: usize,
    queue: VecDeque<Pending>,
    queued_jobs: usize,
    queued_input_bytes: usize,
    // The zip side.
    offset: u64,
    streaming: Option<StreamOut>,
    /// The central directory's records not yet spilled.
    central: Vec<u8>,
    /// Its records past `central_spill_at` bytes, in an unlinked file.
    central_spill: Option<(std::fs::File, u64)>,
    central_spill_at: usize,
    entries: u64,
    max_creator_version: u16,
    /// The directory written ahead (name, mtime), until git's first entry
    /// confirmed it.
    ahead: Option<(Vec<u8>, i64)>,
}

impl<W: Write> ZipWriter<W> {
    pub fn new(sink: W, level: u32, threads: usize) -> io::Result<ZipWriter<W>> {
        Self::with_zip64_at(sink, level, threads, Zip64At::FORMAT)
    }

    pub fn with_zip64_at(
        sink: W,
        level: u32,
        threads: usize,
        zip64: Zip64At,
    ) -> io::Result<ZipWriter<W>> {
        Ok(ZipWriter {
            sink,
            pool: Pool::new("gitball-zip", threads, || move |job| work(level, job))?,
            zip64,
            state: TarState::Header,
            header: Vec::with_capacity(TAR_BLOCK),
            pax: Vec::new(),
            pax_path: None,
            pax_linkpath: None,
            pax_size: None,
            body: Body::None,
            pax_mtime: None,
            comment: Vec::new(),
            batch_metas: Vec::new(),
            batch_inputs: Vec::new(),
            batch_bytes: 0,
            queue: VecDeque::new(),
            queued_jobs: 0,
            queued_input_bytes: 0,
            offset: 0,
            streaming: None,
            central: Vec::new(),
            central_spill: None,
            central_spill_at: CENTRAL_SPILL_BYTES,
            entries: 0,
            max_creator_version: 0,
            ahead: None,
        })
    }

    /// Writes the local header of git's first entry, the directory `name`
    /// (the prefix, with its `/`) with the commit time `mtime`, before any
    /// of git's output: only a fresh writer may. git's first entry must
    /// then be that directory, or `write_block` fails.
    pub fn write_ahead_directory(&mut self, name: &[u8], mtime: i64) -> io::Result<()> {
        if self.offset != 0 || !self.queue.is_empty() || !self.header.is_empty() {
            return Err(invalid("an entry can be written ahead only first"));
        }
        if name.len() > 0xffff {
            return Err(invalid("path too long for a zip entry"));
        }
        let meta = Meta {
            name: name.to_vec(),
            kind: Kind::Directory,
            mtime,
        };
        let output = stored(Input {
            data: Bytes::new(),
            deflate: false,
            directory: true,
        });
        let mut out = Vec::new();
        self.write_whole(&mut out, meta, output)?;
        self.sink.write_all(&out)?;
        self.ahead = Some((name.to_vec(), mtime));
        Ok(())
    }

    #[cfg(test)]
    pub fn sink(&self) -> &W {
        &self.sink
    }

    pub fn sink_mut(&mut self) -> &mut W {
        &mut self.sink
    }

    /// Whether compressed work waits to be written (see `wait_oldest`).
    pub fn has_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Waits a moment for the oldest pending job and writes everything
    /// finished (git's pipe is idle: see `compress::Wait::Briefly`).
    pub fn wait_oldest(&mut self) -> io::Result<()> {
        self.write_ready(Wait::Briefly)
    }

    /// Feeds a piece of git's tar, cut anywhere.
    pub fn write_block(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            self.consume(&mut data)?;
        }
        // A piece of git's output ends here: whatever is collected goes to
        // the workers now rather than waiting for a full batch.
        self.dispatch_batch()?;
        self.write_ready(Wait::No)
    }

    /// Writes the rest, the central directory and the end records.
    pub fn finish(mut self) -> io::Result<W> {
        if !matches!(self.state, TarState::End) {
            return Err(invalid("git's tar ended early"));
        }
        if self.ahead.is_some() {
            return Err(invalid("git's tar has no entry"));
        }
        self.dispatch_batch()?;
        while !self.queue.is_empty() {
            self.write_ready(Wait::Done)?;
        }
        let central_offset = self.offset;
        let mut central_size = self.central.len() as u64;
        if let Some((mut file, spilled)) = self.central_spill.take() {
            // The spilled records first, in order, then the rest.
            central_size += spilled;
            file.seek(io::SeekFrom::Start(0))?;
            let copied = io::copy(
                &mut io::BufReader::with_capacity(64 * 1024, file),
                &mut self.sink,
            )?;
            if copied != spilled {
                return Err(invalid("the spilled central directory was cut short"));
            }
        }
        let mut out = std::mem::take(&mut self.central);
        let zip64 = self.entries >= self.zip64.entries
            || central_offset >= self.zip64.field
            || central_size >= self.zip64.field;
        if zip64 {
            put32(&mut out, ZIP64_END_SIGNATURE);
            put64(&mut out, 44);
            put16(&mut out, self.max_creator_version);
            put16(&mut out, 45);
            put32(&mut out, 0);
            put32(&mut out, 0);
            put64(&mut out, self.entries);
            put64(&mut out, self.entries);
            put64(&mut out, central_size);
            put64(&mut out, central_offset);
            put32(&mut out, ZIP64_LOCATOR_SIGNATURE);
            put32(&mut out, 0);
            put64(&mut out, central_offset + central_size);
            put32(&mut out, 1);
        }
        let entries = if self.entries >= self.zip64.entries {
            0xffff
        } else {
            self.entries as u16
        };
        put32(&mut out, END_SIGNATURE);
        put16(&mut out, 0);
        put16(&mut out, 0);
        put16(&mut out, entries);
        put16(&mut out, entries);
        put32(&mut out, self.clamp(central_size));
        put32(&mut out, self.clamp(central_offset));
        put16(&mut out, self.comment.len() as u16);
        out.extend_from_slice(&self.comment);
        self.sink.write_all(&out)?;
        Ok(self.sink)
    }

    // ---- the tar side

    /// Consumes some of `data` in the current state.
    fn consume(&mut self, data: &mut Bytes) -> io::Result<()> {
        match self.state {
            TarState::End => {
                // git pads its tar to a 10 KiB record after the end blocks.
                data.clear();
            }
            TarState::Header => {
                let take = (TAR_BLOCK - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data.split_to(take));
                if self.header.len() == TAR_BLOCK {
                    let header = std::mem::replace(&mut self.header, Vec::with_capacity(TAR_BLOCK));
                    self.read_header(&header)?;
                }
            }
            TarState::Pax { global, remaining } => {
                let take = remaining.min(data.len() as u64) as usize;
                self.pax.extend_from_slice(&data.split_to(take));
                let remaining = remaining - take as u64;
                self.state = TarState::Pax { global, remaining };
                if remaining == 0 {
                    let pax = std::mem::take(&mut self.pax);
                    self.read_pax(&pax, global)?;
                    self.state = after_data(padding_of(pax.len() as u64));
                }
            }
            TarState::Body { remaining, padding } => {
                let take = remaining.min(data.len() as u64) as usize;
                let piece = data.split_to(take);
                let remaining = remaining - take as u64;
                self.state = TarState::Body { remaining, padding };
                self.body_data(piece, remaining == 0)?;
                if remaining == 0 {
                    self.state = after_data(padding);
                }
            }
            TarState::Padding { remaining } => {
                let take = remaining.min(data.len());
                data.advance(take);
                self.state = after_data(remaining - take);
            }
        }
        Ok(())
    }

    fn read_header(&mut self, header: &[u8]) -> io::Result<()> {
        if header.iter().all(|&byte| byte == 0) {
            // The first of git's two end blocks; the rest is padding.
            self.state = TarState::End;
            return Ok(());
        }
        let typeflag = header[156];
        let size = match self.pax_size.take() {
            Some(size) => size,
            None => octal(&header[124..136])?,
        };
        if matches!(typeflag, b'g' | b'x') {
            if size > PAX_MAX_BYTES {
                return Err(invalid("pax header too large"));
            }
            self.state = TarState::Pax {
                global: typeflag == b'g',
                remaining: size,
            };
            if size == 0 {
                self.state = TarState::Header;
            }
            return Ok(());
        }
        let name = match self.pax_path.take() {
            Some(path) => path,
            None => {
                let prefix = field(&header[345..500]);
                let mut name = Vec::with_capacity(prefix.len() + 101);
                if !prefix.is_empty() {
                    name.extend_from_slice(prefix);
                    name.push(b'/');
                }
                name.extend_from_slice(field(&header[..100]));
                name
            }
        };
        let linkpath = self.pax_linkpath.take();
        if name.len() > 0xffff {
            return Err(invalid("path too long for a zip entry"));
        }
        let mode = octal(&header[100..108])?;
        // git's entries all carry the commit time: the real one when the
        // field holds a clamped one (review: attack; git's zip has the real
        // time, truncated to 32 bits in the extended timestamp).
        let mtime = match self.pax_mtime {
            Some(mtime) => mtime,
            None => octal(&header[136..148])? as i64,
        };
        let kind = match typeflag {
            b'5' => Kind::Directory,
            b'2' => Kind::Symlink,
            b'0' | 0 => Kind::File {
                executable: mode & 0o111 != 0,
            },
            _ => return Err(invalid("unexpected entry type in git's tar")),
        };
        let meta = Meta { name, kind, mtime };
        if let Some((name, mtime)) = self.ahead.take() {
            // Written already, byte for byte, if git's entry is that one.
            if meta.name != name || kind != Kind::Directory || meta.mtime != mtime || size != 0 {
                return Err(invalid(
                    "git's first entry is not the directory written ahead",
                ));
            }
            self.state = TarState::Header;
            return Ok(());
        }
        match kind {
            Kind::Directory => self.add_stored(meta, Bytes::new())?,
            Kind::Symlink => {
                let target = linkpath.unwrap_or_else(|| link_field(&header[157..257]).to_vec());
                self.add_stored(meta, Bytes::from(target))?;
            }
            Kind::File { .. } if size <= WHOLE_ENTRY_MAX_BYTES => {
                self.body = Body::Whole {
                    meta,
                    data: BytesMut::new(),
                };
            }
            Kind::File { .. } => {
                // Everything queued before it goes first.
                self.dispatch_batch()?;
                self.queue.push_back(Pending::StreamStart { meta, size });
                self.body = Body::Stream(StreamIn {
                    crc: crc32fast::Hasher::new(),
                    text: None,
                    block: BytesMut::with_capacity(STREAM_BLOCK_BYTES),
                    previous: None,
                });
            }
        }
        self.state = if size == 0 {
            self.body_data(Bytes::new(), true)?;
            TarState::Header
        } else {
            TarState::Body {
                remaining: size,
                padding: padding_of(size),
            }
        };
        Ok(())
    }

    /// pax records: `"{length} {key}={value}\n"`.
    fn read_pax(&mut self, mut data: &[u8], global: bool) -> io::Result<()> {
        while !data.is_empty() {
            let space = data
                .iter()
                .position(|&byte| byte == b' ')
                .ok_or_else(|| invalid("bad pax record"))?;
            let length: usize = std::str::from_utf8(&data[..space])
                .ok()
                .and_then(|length| length.parse().ok())
                .filter(|&length| length > space + 1 && length <= data.len())
                .ok_or_else(|| invalid("bad pax record length"))?;
            let record = &data[space + 1..length];
            data = &data[length..];
            let record = record.strip_suffix(b"\n").unwrap_or(record);
            let Some(equals) = record.iter().position(|&byte| byte == b'=') else {
                return Err(invalid("bad pax record"));
            };
            let (key, value) = (&record[..equals], &record[equals + 1..]);
            match (global, key) {
                (true, b"comment") => self.comment = value.to_vec(),
                (true, b"mtime") => self.pax_mtime = Some(pax_number(value, "bad pax mtime")?),
                (false, b"path") => self.pax_path = Some(value.to_vec()),
                (false, b"linkpath") => self.pax_linkpath = Some(value.to_vec()),
                (false, b"size") => self.pax_size = Some(pax_number(value, "bad pax size")?),
                _ => {}
            }
        }
        if self.comment.len() > 0xffff {
            return Err(invalid("archive comment too long"));
        }
        Ok(())
    }

    /// A piece of the current entry's data; `end`: its last piece.
    fn body_data(&mut self, piece: Bytes, end: bool) -> io::Result<()> {
        match std::mem::replace(&mut self.body, Body::None) {
            Body::None => Ok(()),
            Body::Whole { meta, mut data } => {
                if !end {
                    data.extend_from_slice(&piece);
                    self.body = Body::Whole { meta, data };
                    return Ok(());
                }
                let data = if data.is_empty() {
                    // The whole entry came in one piece: no copy.
                    piece
                } else {
                    data.extend_from_slice(&piece);
                    data.freeze()
                };
                self.add_file(meta, data)
            }
            Body::Stream(mut stream) => {
                stream.crc.update(&piece);
                let mut piece = piece;
                while !piece.is_empty() {
                    let take = (STREAM_BLOCK_BYTES - stream.block.len()).min(piece.len());
                    stream.block.extend_from_slice(&piece.split_to(take));
                    // A block that ends the entry waits to go out as the last.
                    if stream.block.len() == STREAM_BLOCK_BYTES && !(end && piece.is_empty()) {
                        let full = std::mem::take(&mut stream.block).freeze();
                        let dictionary = stream.dictionary_for(&full);
                        self.dispatch_block(dictionary, full, false)?;
                    }
                }
                if !end {
                    self.body = Body::Stream(stream);
                    return Ok(());
                }
                let last = std::mem::take(&mut stream.block).freeze();
                let dictionary = stream.dictionary_for(&last);
                let text = stream.text.unwrap_or(true);
                self.dispatch_block(dictionary, last, true)?;
                self.queue.push_back(Pending::StreamEnd {
                    crc: stream.crc.finalize(),
                    text,
                });
                Ok(())
            }
        }
    }
}

// ---- between the sides: batches and jobs
impl<W: Write> ZipWriter<W> {
    /// A directory or symlink: nothing to compress.
    fn add_stored(&mut self, meta: Meta, data: Bytes) -> io::Result<()> {
        let input = Input {
            data,
            deflate: false,
            directory: meta.kind == Kind::Directory,
        };
        if self.batch_metas.is_empty() {
            let output = stored(input);
            self.queue.push_back(Pending::Done(vec![(meta, output)]));
            return Ok(());
        }
        self.batch_metas.push(meta);
        self.batch_inputs.push(input);
        Ok(())
    }

    fn add_file(&mut self, meta: Meta, data: Bytes) -> io::Result<()> {
        self.batch_bytes += data.len();
        self.batch_metas.push(meta);
        self.batch_inputs.push(Input {
            deflate: !data.is_empty(),
            data,
            directory: false,
        });
        // Nothing waits before it: it goes now (the first byte must not
        // wait for a batch to fill).
        if self.batch_bytes >= BATCH_INPUT_BYTES || self.queue.is_empty() {
            self.dispatch_batch()?;
        }
        Ok(())
    }

    fn dispatch_batch(&mut self) -> io::Result<()> {
        if self.batch_metas.is_empty() {
            return Ok(());
        }
        let input_bytes = std::mem::take(&mut self.batch_bytes);
        let metas = std::mem::take(&mut self.batch_metas);
        let entries = std::mem::take(&mut self.batch_inputs);
        self.make_room(input_bytes)?;
        let (reply, receiver) = mpsc::sync_channel(1);
        self.pool.send(Job::Batch { entries, reply })?;
        self.queued_jobs += 1;
        self.queued_input_bytes += input_bytes;
        self.queue.push_back(Pending::Batch {
            metas,
            reply: receiver,
            input_bytes,
        });
        Ok(())
    }

    fn dispatch_block(
        &mut self,
        dictionary: Option<Bytes>,
        block: Bytes,
        last: bool,
    ) -> io::Result<()> {
        let input_bytes = block.len();
        self.make_room(input_bytes)?;
        let (reply, receiver) = mpsc::sync_channel(1);
        self.pool.send(Job::Block {
            dictionary,
            block,
            last,
            reply,
        })?;
        self.queued_jobs += 1;
        self.queued_input_bytes += input_bytes;
        self.queue.push_back(Pending::Block {
            reply: receiver,
            input_bytes,
        });
        Ok(())
    }

    /// Writes out the oldest work until a job of `input_bytes` fits.
    fn make_room(&mut self, input_bytes: usize) -> io::Result<()> {
        while self.queued_jobs > 0
            && (self.queued_jobs >= MAX_QUEUED_JOBS
                || self.queued_input_bytes + input_bytes > MAX_QUEUED_INPUT_BYTES)
        {
            self.write_ready(Wait::Done)?;
        }
        Ok(())
    }

    /// Writes what is finished at the front of the queue, waiting for the
    /// front first as `wait` says.
    fn write_ready(&mut self, mut wait: Wait) -> io::Result<()> {
        let mut out = Vec::new();
        while let Some(front) = self.queue.pop_front() {
            match front {
                Pending::Done(entries) => {
                    for (meta, output) in entries {
                        self.write_whole(&mut out, meta, output)?;
                    }
                }
                Pending::Batch {
                    metas,
                    reply,
                    input_bytes,
                } => {
                    let Some(outputs) = receive(&reply, wait)? else {
                        self.queue.push_front(Pending::Batch {
                            metas,
                            reply,
                            input_bytes,
                        });
                        break;
                    };
                    self.queued_jobs -= 1;
                    self.queued_input_bytes -= input_bytes;
                    for (meta, output) in metas.into_iter().zip(outputs) {
                        self.write_whole(&mut out, meta, output)?;
                    }
                }
                Pending::StreamStart { meta, size } => {
                    self.write_stream_start(&mut out, meta, size)
                }
                Pending::Block { reply, input_bytes } => {
                    let Some(compressed) = receive(&reply, wait)? else {
                        self.queue.push_front(Pending::Block { reply, input_bytes });
                        break;
                    };
                    self.queued_jobs -= 1;
                    self.queued_input_bytes -= input_bytes;
                    let stream = self
                        .streaming
                        .as_mut()
                        .ok_or_else(|| invalid("block outside an entry"))?;
                    stream.compressed += compressed.len() as u64;
                    self.offset += compressed.len() as u64;
                    if out.is_empty() {
                        self.sink.write_all(&compressed)?;
                    } else {
                        out.extend_from_slice(&compressed);
                    }
                }
                Pending::StreamEnd { crc, text } => self.write_stream_end(&mut out, crc, text)?,
            }
            wait = Wait::No;
            if out.len() >= STREAM_BLOCK_BYTES {
                self.sink.write_all(&out)?;
                out.clear();
            }
        }
        if !out.is_empty() {
            self.sink.write_all(&out)?;
        }
        Ok(())
    }
}

// ---- the zip side
impl<W: Write> ZipWriter<W> {
    fn clamp(&self, value: u64) -> u32 {
        if value >= self.zip64.field {
            0xffff_ffff
        } else {
            value as u32
        }
    }

    /// An entry whose data and sizes are known: local header, data.
    fn write_whole(&mut self, out: &mut Vec<u8>, meta: Meta, output: Output) -> io::Result<()> {
        let offset = self.offset;
        let flags = meta.flags();
        let (time, date) = dos_time(meta.mtime);
        let start = out.len();
        put32(out, LOCAL_HEADER_SIGNATURE);
        put16(out, 10);
        put16(out, flags);
        put16(out, output.method);
        put16(out, time);
        put16(out, date);
        put32(out, output.crc);
        put32(out, output.data.len() as u32);
        put32(out, output.size as u32);
        put16(out, meta.name.len() as u16);
        put16(out, EXTRA_MTIME_BYTES);
        out.extend_from_slice(&meta.name);
        put_extra_mtime(out, meta.mtime);
        out.extend_from_slice(&output.data);
        self.offset += (out.len() - start) as u64;
        self.central_record(
            &meta,
            Central {
                flags,
                method: output.method,
                crc: output.crc,
                compressed: output.data.len() as u64,
                size: output.size,
                offset,
                zip64_local: false,
                text: output.text,
            },
        )?;
        Ok(())
    }

    /// A large entry's local header: sizes and CRC follow its data.
    fn write_stream_start(&mut self, out: &mut Vec<u8>, meta: Meta, size: u64) {
        let offset = self.offset;
        let flags = meta.flags() | FLAG_DATA_DESCRIPTOR;
        let zip64 = size >= self.zip64.streamed_entry;
        let (time, date) = dos_time(meta.mtime);
        let start = out.len();
        put32(out, LOCAL_HEADER_SIGNATURE);
        put16(out, if zip64 { 45 } else { 10 });
        put16(out, flags);
        put16(out, METHOD_DEFLATED);
        put16(out, time);
        put16(out, date);
        put32(out, 0);
        if zip64 {
            put32(out, 0xffff_ffff);
            put32(out, 0xffff_ffff);
        } else {
            put32(out, 0);
            put32(out, size as u32);
        }
        put16(out, meta.name.len() as u16);
        put16(
            out,
            EXTRA_MTIME_BYTES + if zip64 { ZIP64_LOCAL_EXTRA_BYTES } else { 0 },
        );
        out.extend_from_slice(&meta.name);
        put_extra_mtime(out, meta.mtime);
        if zip64 {
            put16(out, 0x0001);
            put16(out, 16);
            put64(out, size);
            put64(out, 0);
        }
        self.offset += (out.len() - start) as u64;
        self.streaming = Some(StreamOut {
            meta,
            offset,
            size,
            compressed: 0,
            zip64,
            flags,
        });
    }

    fn write_stream_end(&mut self, out: &mut Vec<u8>, crc: u32, text: bool) -> io::Result<()> {
        let stream = self
            .streaming
            .take()
            .ok_or_else(|| invalid("entry end outside an entry"))?;
        let start = out.len();
        put32(out, DATA_DESCRIPTOR_SIGNATURE);
        put32(out, crc);
        if stream.zip64 {
            put64(out, stream.compressed);
            put64(out, stream.size);
        } else {
            put32(out, stream.compressed as u32);
            put32(out, stream.size as u32);
        }
        self.offset += (out.len() - start) as u64;
        self.central_record(
            &stream.meta,
            Central {
                flags: stream.flags,
                method: METHOD_DEFLATED,
                crc,
                compressed: stream.compressed,
                size: stream.size,
                offset: stream.offset,
                zip64_local: stream.zip64,
                text,
            },
        )?;
        Ok(())
    }

    fn central_record(&mut self, meta: &Meta, entry: Central) -> io::Result<()> {
        let (creator, external) = meta.attributes();
        self.max_creator_version = self.max_creator_version.max(creator);
        let mut zip64 = Vec::new();
        for value in [entry.size, entry.compressed, entry.offset] {
            if value >= self.zip64.field {
                put64(&mut zip64, value);
            }
        }
        let version_needed = if entry.zip64_local || !zip64.is_empty() {
            45
        } else {
            10
        };
        let (time, date) = dos_time(meta.mtime);
        let extra_len = EXTRA_MTIME_BYTES
            + if zip64.is_empty() {
                0
            } else {
                4 + zip64.len() as u16
            };
        let central = &mut self.central;
        put32(central, CENTRAL_HEADER_SIGNATURE);
        put16(central, creator);
        put16(central, version_needed);
        put16(central, entry.flags);
        put16(central, entry.method);
        put16(central, time);
        put16(central, date);
        put32(central, entry.crc);
        let compressed = self.zip64.clamp_field(entry.compressed);
        let size = self.zip64.clamp_field(entry.size);
        let offset = self.zip64.clamp_field(entry.offset);
        put32(central, compressed);
        put32(central, size);
        put16(central, meta.name.len() as u16);
        put16(central, extra_len);
        put16(central, 0);
        put16(central, 0);
        put16(central, u16::from(entry.text));
        put32(central, external);
        put32(central, offset);
        central.extend_from_slice(&meta.name);
        put_extra_mtime(central, meta.mtime);
        if !zip64.is_empty() {
            put16(central, 0x0001);
            put16(central, zip64.len() as u16);
            central.extend_from_slice(&zip64);
        }
        self.entries += 1;
        if self.central.len() >= self.central_spill_at {
            self.spill_central()?;
        }
        Ok(())
    }

    /// Moves the central directory's records held in memory to the spill
    /// file (made on first use): memory stays bounded whatever the number
    /// and length of the entries' names.
    fn spill_central(&mut self) -> io::Result<()> {
        let (file, spilled) = match &mut self.central_spill {
            Some(spill) => spill,
            None => self.central_spill.insert((tempfile::tempfile()?, 0)),
        };
        file.write_all(&self.central)?;
        *spilled += self.central.len() as u64;
        self.central.clear();
        self.central.shrink_to(self.central_spill_at);
        Ok(())
    }
}

impl Zip64At {
    fn clamp_field(&self, value: u64) -> u32 {
        if value >= self.field {
            0xffff_ffff
        } else {
            value as u32
        }
    }
}

/// What a central directory record needs beyond the entry's `Meta`.
struct Central {
    flags: u16,
    method: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    offset: u64,
    zip64_local: bool,
    text: bool,
}

// ---- the compression threads

/// A fresh deflate state for each entry and each block: a reset one keeps
/// state that the next run can read (zlib-rs leaves `prev` entries a run
/// does not write), so a reused one made bytes that depended on what its
/// thread compressed before (attack: one 20 MiB entry, three different zips
/// in six restarts). A fresh state costs a 256 KiB `memset`, 10–20 µs.
fn fresh_deflate(level: u32) -> flate2::Compress {
    flate2::Compress::new(flate2::Compression::new(level), false)
}

fn work(level: u32, job: Job) {
    match job {
        Job::Batch { entries, reply } => {
            let outputs = entries
                .into_iter()
                .map(|input| compress_entry(level, input))
                .collect();
            let _ = reply.send(outputs);
        }
        Job::Block {
            dictionary,
            block,
            last,
            reply,
        } => {
            let _ = reply.send(deflate_run(
                &mut fresh_deflate(level),
                dictionary.as_deref(),
                &block,
                last,
            ));
        }
    }
}

/// One whole entry: deflated, or stored when deflate does not shrink it
/// (git's rule).
fn compress_entry(level: u32, input: Input) -> io::Result<Output> {
    if !input.deflate {
        return Ok(stored(input));
    }
    let compressed = deflate_run(&mut fresh_deflate(level), None, &input.data, true)?;
    if compressed.len() >= input.data.len() {
        return Ok(stored(input));
    }
    Ok(Output {
        crc: crc32fast::hash(&input.data),
        method: METHOD_DEFLATED,
        size: input.data.len() as u64,
        text: !input.directory && is_text(&input.data),
        data: Bytes::from(compressed),
    })
}

fn stored(input: Input) -> Output {
    Output {
        crc: crc32fast::hash(&input.data),
        method: METHOD_STORED,
        size: input.data.len() as u64,
        text: !input.directory && is_text(&input.data),
        data: input.data,
    }
}

// ---- helpers

/// git's `buffer_is_binary`, negated.
fn is_text(data: &[u8]) -> bool {
    !data[..data.len().min(BINARY_SNIFF_BYTES)].contains(&0)
}

/// A pax record's decimal value.
fn pax_number<T: std::str::FromStr>(value: &[u8], error: &'static str) -> io::Result<T> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| invalid(error))
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A NUL-terminated tar string field.
fn field(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(bytes.len());
    &bytes[..end]
}

/// A symlink's target of up to 100 bytes: git copies the blob into the
/// `linkname` field whole, NUL bytes included, and its zip stores the blob
/// whole, so the target ends at the field's last byte that is not NUL (the
/// padding) rather than at its first NUL (attack: a pushed target
/// `safe\0../x` was stored as `safe`, an entry git's zip does not have). A
/// target that itself ends in NUL bytes cannot be told from the padding in
/// git's tar: those bytes are left out.
fn link_field(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|&byte| byte != 0)
        .map_or(0, |last| last + 1);
    &bytes[..end]
}

/// A tar numeric field: octal digits, space or NUL terminated.
fn octal(bytes: &[u8]) -> io::Result<u64> {
    let digits = field(bytes);
    let digits = std::str::from_utf8(digits)
        .map_err(|_| invalid("bad tar number"))?
        .trim_matches(' ');
    if digits.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(digits, 8).map_err(|_| invalid("bad tar number"))
}

fn padding_of(size: u64) -> usize {
    ((TAR_BLOCK as u64 - size % TAR_BLOCK as u64) % TAR_BLOCK as u64) as usize
}

fn after_data(padding: usize) -> TarState {
    if padding == 0 {
        TarState::Header
    } else {
        TarState::Padding { remaining: padding }
    }
}

fn put16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// The extended timestamp field git writes: mtime only, 32 bits.
fn put_extra_mtime(out: &mut Vec<u8>, mtime: i64) {
    put16(out, 0x5455);
    put16(out, 5);
    out.push(1);
    put32(out, mtime as u32);
}

/// DOS time and date of a Unix time, in UTC, with git's arithmetic (which
/// wraps to 16 bits outside 1980..2107).
fn dos_time(mtime: i64) -> (u16, u16) {
    let days = mtime.div_euclid(86_400);
    let seconds = mtime.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let time = seconds % 60 / 2 + (seconds / 60 % 60) * 32 + (seconds / 3600) * 2048;
    let date = day + month * 32 + (year - 1980) * 512;
    (time as u16, date as u16)
}

/// The proleptic Gregorian date of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/archiver.md` gives the zip writer's bounds as these constants.
    /// (Docs review: a figure changed on one side only had nothing to
    /// fail.)
    #[test]
    fn the_figures_docs_give_for_the_zip_writer_are_these_constants() {
        gitball_core::docs::assert_says(
            include_str!("../../docs/archiver.md"),
            "docs/archiver.md",
            [
                format!(
                    "at most {MAX_QUEUED_JOBS} jobs and {} MiB of input wait for compression",
                    MAX_QUEUED_INPUT_BYTES >> 20
                ),
                format!(
                    "a file over {} MiB is streamed in {} MiB blocks",
                    WHOLE_ENTRY_MAX_BYTES >> 20,
                    STREAM_BLOCK_BYTES >> 20
                ),
                format!(
                    "is held up to {} MiB and spilled",
                    CENTRAL_SPILL_BYTES >> 20
                ),
                format!("deflated on up to {MAX_ZIP_THREADS} cores"),
            ],
        );
    }

    const MTIME: i64 = 1_234_567_890;

    /// A ustar header for `name` (a pax `path` record first when it is long).
    fn tar_entry(out: &mut Vec<u8>, name: &str, typeflag: u8, mode: u32, data: &[u8], link: &str) {
        if name.len() > 100 {
            let record = format!("path={name}\n");
            let mut length = record.len() + 2;
            while format!("{length} {record}").len() != length {
                length += 1;
            }
            let pax = format!("{length} {record}");
            tar_header(out, "pax", b'x', 0o644, pax.len() as u64, "");
            out.extend_from_slice(pax.as_bytes());
            out.resize(out.len().next_multiple_of(TAR_BLOCK), 0);
        }
        let size = if typeflag == b'0' {
            data.len() as u64
        } else {
            0
        };
        tar_header(
            out,
            &name[..name.len().min(100)],
            typeflag,
            mode,
            size,
            link,
        );
        if typeflag == b'0' {
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(TAR_BLOCK), 0);
        }
    }

    fn tar_header(out: &mut Vec<u8>, name: &str, typeflag: u8, mode: u32, size: u64, link: &str) {
        let mut header = [0u8; TAR_BLOCK];
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[100..107].copy_from_slice(format!("{mode:07o}").as_bytes());
        header[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        header[136..147].copy_from_slice(format!("{MTIME:011o}").as_bytes());
        header[156] = typeflag;
        header[157..157 + link.len()].copy_from_slice(link.as_bytes());
        header[257..263].copy_from_slice(b"ustar\0");
        out.extend_from_slice(&header);
    }

    fn pseudo_text(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(
                [&b"alpha "[..], b"beta ", b"gamma\n", b"delta "][(state % 4) as usize],
            );
        }
        out.truncate(len);
        out
    }

    /// The start of a tar as git writes it: the pax global header with the
    /// commit id.
    fn tar_with_commit_comment() -> Vec<u8> {
        let mut tar = Vec::new();
        let comment = "52 comment=0123456789abcdef0123456789abcdef01234567\n";
        tar_header(
            &mut tar,
            "pax_global_header",
            b'g',
            0o666,
            comment.len() as u64,
            "",
        );
        tar.extend_from_slice(comment.as_bytes());
        tar.resize(tar.len().next_multiple_of(TAR_BLOCK), 0);
        tar
    }

    /// A tar like git's: global header with the commit, directories, files
    /// (one of them streamed in blocks), a symlink, a long name.
    fn sample_tar(large: usize) -> Vec<u8> {
        let mut tar = tar_with_commit_comment();
        tar_entry(&mut tar, "p/", b'5', 0o775, b"", "");
        tar_entry(&mut tar, "p/a.txt", b'0', 0o664, &pseudo_text(1, 5000), "");
        tar_entry(&mut tar, "p/empty", b'0', 0o664, b"", "");
        tar_entry(&mut tar, "p/run.sh", b'0', 0o775, b"#!/bin/sh\n", "");
        tar_entry(&mut tar, "p/link", b'2', 0o777, b"", "a.txt");
        tar_entry(
            &mut tar,
            "p/big.txt",
            b'0',
            0o664,
            &pseudo_text(2, large),
            "",
        );
        let long = format!("p/{}/é.txt", "d".repeat(150));
        tar_entry(&mut tar, &long, b'0', 0o664, &pseudo_text(3, 70_000), "");
        tar.extend_from_slice(&[0; 2 * TAR_BLOCK]);
        tar.resize(tar.len().next_multiple_of(10240), 0);
        tar
    }

    fn zip(tar: &[u8], piece: usize, threads: usize, zip64: Zip64At) -> Vec<u8> {
        let mut writer = ZipWriter::with_zip64_at(Vec::new(), 6, threads, zip64).unwrap();
        for chunk in tar.chunks(piece) {
            writer.write_block(Bytes::copy_from_slice(chunk)).unwrap();
        }
        writer.finish().unwrap()
    }

    /// Python's `zipfile` lists and tests the archive: name, size, CRC and
    /// attributes per entry, and the comment.
    fn python_listing(zip: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        std::fs::write(&path, zip).unwrap();
        let script = "import sys, zipfile\n\
            z = zipfile.ZipFile(sys.argv[1])\n\
            assert z.testzip() is None\n\
            print(z.comment.decode())\n\
            for i in z.infolist():\n    \
                print(i.filename, i.file_size, i.CRC, oct(i.external_attr >> 16), i.create_system, i.date_time, len(z.read(i)))\n";
        let listing = read_with("python3", &["-c", script], &path);
        read_with("unzip", &["-tq"], &path);
        listing
    }

    /// What an independent reader `program` run with `args` and the zip at
    /// `path` prints, once it has succeeded.
    fn read_with(program: &str, args: &[&str], path: &std::path::Path) -> String {
        let output = std::process::Command::new(program)
            .args(args)
            .arg(path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{program}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn bytes_do_not_depend_on_threads_or_how_the_tar_is_cut() {
        let tar = sample_tar(3 * STREAM_BLOCK_BYTES + 12_345);
        let reference = zip(&tar, tar.len(), 1, Zip64At::FORMAT);
        for (piece, threads) in [(1000, 2), (4096, 4), (65_536, 3)] {
            assert!(
                zip(&tar, piece, threads, Zip64At::FORMAT) == reference,
                "pieces of {piece}, {threads} threads"
            );
        }
    }

    /// The central directory spilled to a file, record by record here, makes
    /// the same bytes as one held in memory, with zip64 records too; and
    /// what stays in memory is bounded by the spill threshold.
    #[test]
    fn a_spilled_central_directory_makes_the_same_bytes() {
        let tar = sample_tar(2 * STREAM_BLOCK_BYTES + 1);
        let zip64 = Zip64At {
            field: 6000,
            streamed_entry: 1,
            entries: 3,
        };
        for limits in [Zip64At::FORMAT, zip64] {
            let reference = zip(&tar, 65_536, 2, limits);
            let mut writer = ZipWriter::with_zip64_at(Vec::new(), 6, 2, limits).unwrap();
            writer.central_spill_at = 1;
            let mut held = 0;
            for chunk in tar.chunks(4096) {
                writer.write_block(Bytes::copy_from_slice(chunk)).unwrap();
                held = held.max(writer.central.capacity());
            }
            assert!(writer.central_spill.is_some(), "nothing was spilled");
            assert!(held < 4096, "{held} bytes of records held");
            assert!(writer.finish().unwrap() == reference, "{limits:?}");
        }
    }

    #[test]
    fn entries_read_back_as_written() {
        let tar = sample_tar(2 * STREAM_BLOCK_BYTES + 1);
        let listing = python_listing(&zip(&tar, 65_536, 2, Zip64At::FORMAT));
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines[0], "0123456789abcdef0123456789abcdef01234567");
        let date = "(2009, 2, 13, 23, 31, 30)";
        assert_eq!(lines[1], format!("p/ 0 0 0o0 0 {date} 0"));
        assert!(lines[2].starts_with("p/a.txt 5000 "), "{}", lines[2]);
        assert!(
            lines[2].ends_with(&format!("0o0 0 {date} 5000")),
            "{}",
            lines[2]
        );
        assert_eq!(lines[3], format!("p/empty 0 0 0o0 0 {date} 0"));
        assert!(
            lines[4].ends_with(&format!("0o100755 3 {date} 10")),
            "{}",
            lines[4]
        );
        assert!(lines[5].starts_with("p/link 5 "), "{}", lines[5]);
        assert!(
            lines[5].ends_with(&format!("0o120777 3 {date} 5")),
            "{}",
            lines[5]
        );
        assert!(lines[6].starts_with(&format!("p/big.txt {} ", 2 * STREAM_BLOCK_BYTES + 1)));
        assert!(lines[7].starts_with(&format!("p/{}/é.txt 70000 ", "d".repeat(150))));
        assert_eq!(lines.len(), 8);
    }

    #[test]
    fn zip64_records_read_back_where_fields_overflow() {
        // The limits lowered so that sizes, offsets and the entry count all
        // take the zip64 paths (4 GiB of real data is too slow for a unit
        // test; the records are the same whatever the threshold).
        let tar = sample_tar(2 * STREAM_BLOCK_BYTES + 1);
        let normal = python_listing(&zip(&tar, 65_536, 2, Zip64At::FORMAT));
        let lowered = Zip64At {
            field: 4000,
            streamed_entry: 1,
            entries: 3,
        };
        let zip64 = zip(&tar, 65_536, 2, lowered);
        assert_eq!(python_listing(&zip64), normal);
        let find = |signature: u32| {
            zip64
                .windows(4)
                .any(|window| window == signature.to_le_bytes())
        };
        assert!(find(ZIP64_END_SIGNATURE) && find(ZIP64_LOCATOR_SIGNATURE));
    }

    /// At the format's own thresholds, an entry of 4 GiB + 1 byte (its
    /// sizes past `0xFFFFFFFF`, its local header past the streamed-entry
    /// threshold) and the entry after it read back whole in Python's
    /// `zipfile`, `unzip` and `bsdtar` (docs/urls.md, byte stability:
    /// "sizes or offsets of 4 GiB − 1 byte or more"). The other tests
    /// lower the thresholds; this one proves the real ones, which readers
    /// judge by, streaming the zeros through and the zip to a file (about
    /// 4 MB).
    #[test]
    fn an_entry_over_4_gib_reads_back_at_the_formats_thresholds() {
        const SIZE: u64 = (1 << 32) + 1;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large.zip");
        let sink = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        // Level 1: the zip64 records do not depend on the level.
        let mut writer = ZipWriter::new(sink, 1, 2).unwrap();
        let mut tar = tar_with_commit_comment();
        tar_entry(&mut tar, "p/", b'5', 0o775, b"", "");
        tar_header(&mut tar, "p/zeros", b'0', 0o664, SIZE, "");
        writer.write_block(Bytes::from(tar)).unwrap();
        let zeros = Bytes::from(vec![0; 1 << 20]);
        for _ in 0..SIZE >> 20 {
            writer.write_block(zeros.clone()).unwrap();
        }
        // The last byte, its block's padding, the entry after, the end.
        let mut tar = vec![0; TAR_BLOCK];
        tar_entry(&mut tar, "p/after.txt", b'0', 0o664, b"after\n", "");
        tar.extend_from_slice(&[0; 2 * TAR_BLOCK]);
        writer.write_block(Bytes::from(tar)).unwrap();
        writer.finish().unwrap().into_inner().unwrap();

        // Every entry read through, its CRC checked by the reader.
        let script = "import sys, zipfile\n\
            z = zipfile.ZipFile(sys.argv[1])\n\
            for i in z.infolist():\n    \
                n = 0\n    \
                with z.open(i) as f:\n        \
                    while b := f.read(1 << 24):\n            \
                        n += len(b)\n    \
                print(i.filename, i.file_size, n, i.header_offset)\n";
        let listing = read_with("python3", &["-c", script], &path);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines[0], "p/ 0 0 0");
        assert_eq!(
            lines[1],
            format!("p/zeros {SIZE} {SIZE} {}", 30 + 2 + EXTRA_MTIME_BYTES)
        );
        assert!(lines[2].starts_with("p/after.txt 6 6 "), "{listing}");
        assert_eq!(lines.len(), 3);
        read_with("unzip", &["-tq"], &path);
        let listing = read_with("bsdtar", &["-tvf"], &path);
        assert!(listing.contains(&format!(" {SIZE} ")), "{listing}");
    }

    /// At the format's own thresholds, zip64 end records appear exactly
    /// from 65,535 entries on (docs/urls.md, byte stability: "65 535
    /// entries or more"), where the 16-bit counts hold 0xffff, and not
    /// one entry before. (Mutation review: zip64 only past 65,535 entries
    /// passed every test, which lower the thresholds.)
    #[test]
    fn zip64_end_records_start_at_65535_entries() {
        let end_of = |entries: usize| {
            let mut tar = Vec::new();
            tar_entry(&mut tar, "p/", b'5', 0o775, b"", "");
            for index in 1..entries {
                tar_entry(&mut tar, &format!("p/{index:05}"), b'0', 0o664, b"", "");
            }
            tar.extend_from_slice(&[0; 2 * TAR_BLOCK]);
            tar.resize(tar.len().next_multiple_of(10240), 0);
            let zip = zip(&tar, 1 << 20, 2, Zip64At::FORMAT);
            let has_zip64 = zip
                .windows(4)
                .any(|window| window == ZIP64_END_SIGNATURE.to_le_bytes());
            // The end record (no comment: no global header): its counts.
            let end = &zip[zip.len() - 22..];
            assert_eq!(end[..4], END_SIGNATURE.to_le_bytes());
            let count = u16::from_le_bytes([end[10], end[11]]);
            (has_zip64, count)
        };
        assert_eq!(end_of(65_534), (false, 65_534), "one entry below");
        assert_eq!(end_of(65_535), (true, 0xffff), "65,535 entries");
    }

    /// The bytes of a zip with an entry over 1 MiB (deflated in primed
    /// blocks joined by sync flushes) are pinned, as the golden hashes pin
    /// a small zip's (docs/urls.md, byte stability: the series is bumped
    /// whenever a change alters output bytes). Another dictionary, block
    /// size or flush changes this hash, and must bump the zip's series.
    /// (Mutation review: priming the blocks with 16 KiB instead of 32 passed
    /// every test: the golden repository's entries are all under 1 MiB, and
    /// the other tests compare runs with each other or entries with git's.)
    #[test]
    fn zip_bytes_of_an_entry_of_several_blocks_are_those_of_the_series() {
        use sha2::{Digest, Sha256};
        let mut tar = tar_with_commit_comment();
        tar_entry(&mut tar, "p/", b'5', 0o775, b"", "");
        let big = vocabulary_text(5, 3 * STREAM_BLOCK_BYTES + 12_345);
        tar_entry(&mut tar, "p/big.txt", b'0', 0o664, &big, "");
        tar_entry(
            &mut tar,
            "p/small.txt",
            b'0',
            0o664,
            &pseudo_text(6, 5000),
            "",
        );
        tar.extend_from_slice(&[0; 2 * TAR_BLOCK]);
        tar.resize(tar.len().next_multiple_of(10240), 0);
        let out = zip(&tar, 65_536, 2, Zip64At::FORMAT);
        assert_eq!(
            hex::encode(Sha256::digest(&out)),
            "08595364f05ce42f950626b6b77d96909b329944a38e4dbad22d6a43a95a129e",
            "{} bytes",
            out.len()
        );
    }

    /// Text of made-up words from a vocabulary of 5,000, as a real file's
    /// text is: the input on which a reused deflate state made other bytes.
    fn vocabulary_text(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let words: Vec<Vec<u8>> = (0..5000)
            .map(|_| {
                let bits = next();
                (0..2 + (bits % 8) as usize)
                    .map(|k| b'a' + ((bits >> (k * 5)) % 26) as u8)
                    .collect()
            })
            .collect();
        let mut out = Vec::with_capacity(len + 128);
        while out.len() < len {
            for _ in 0..12 {
                out.extend_from_slice(&words[(next() % 5000) as usize]);
                out.push(b' ');
            }
            out.push(b'\n');
        }
        out.truncate(len);
        out
    }

    /// Each block of a large entry is deflated as on a fresh state, whatever
    /// its thread compressed before. On this input a reused (reset) zlib-rs
    /// state made other bytes for the third block than a fresh one, so the
    /// zip of one commit changed with which thread got which block (attack:
    /// three different zips of one 20 MiB file in six restarts).
    #[test]
    fn a_large_entrys_blocks_deflate_as_on_a_fresh_state() {
        let data = vocabulary_text(4, 3 * STREAM_BLOCK_BYTES + 1000);
        let mut tar = Vec::new();
        tar_entry(&mut tar, "big", b'0', 0o664, &data, "");
        tar.extend_from_slice(&[0; 2 * TAR_BLOCK]);
        let zip = zip(&tar, 65_536, 1, Zip64At::FORMAT);

        let mut expected = Vec::new();
        for (index, block) in data.chunks(STREAM_BLOCK_BYTES).enumerate() {
            let start = index * STREAM_BLOCK_BYTES;
            let dictionary = (index > 0).then(|| &data[start - DICTIONARY_BYTES..start]);
            let mut fresh = flate2::Compress::new(flate2::Compression::new(6), false);
            let last = start + block.len() == data.len();
            expected.extend(deflate_run(&mut fresh, dictionary, block, last).unwrap());
        }
        // The local header: 30 bytes, the name and the extra field.
        let name_len = u16::from_le_bytes([zip[26], zip[27]]) as usize;
        let extra_len = u16::from_le_bytes([zip[28], zip[29]]) as usize;
        let data_start = 30 + name_len + extra_len;
        assert_eq!(&zip[30..30 + name_len], b"big");
        assert!(zip[data_start..data_start + expected.len()] == expected[..]);
    }

    /// However fast git's tar comes, at most `MAX_QUEUED_JOBS` jobs wait
    /// for compression (docs/archiver.md: "at most 64 jobs and 8 MiB of
    /// input wait for compression"): files of one batch each, 64 KiB, on
    /// one thread at level 9, would otherwise queue up to what the input
    /// bound alone allows, 128. (Mutation review: bounding the jobs by
    /// their input alone passed every test.)
    #[test]
    fn at_most_the_queued_jobs_wait_however_fast_the_tar_comes() {
        let files = 2 * MAX_QUEUED_JOBS + 16;
        let mut writer = ZipWriter::new(Vec::new(), 9, 1).unwrap();
        let mut most = 0;
        for index in 0..files {
            let mut tar = Vec::new();
            let data = pseudo_text(index as u64 + 10, BATCH_INPUT_BYTES);
            tar_entry(&mut tar, &format!("f{index:04}"), b'0', 0o664, &data, "");
            writer.write_block(Bytes::from(tar)).unwrap();
            most = most.max(writer.queued_jobs);
            assert!(writer.queued_input_bytes <= MAX_QUEUED_INPUT_BYTES);
        }
        assert!(most <= MAX_QUEUED_JOBS, "{most} jobs waited");
        writer
            .write_block(Bytes::from(vec![0u8; 2 * TAR_BLOCK]))
            .unwrap();
        let zip = writer.finish().unwrap();
        assert!(python_listing(&zip).contains(&format!("f{:04} ", files - 1)));
    }

    #[test]
    fn a_large_entry_is_never_held_whole() {
        // 12 MiB of one file in pipe-sized pieces: the queued input stays
        // within its bound, and the entry is never buffered whole.
        let size = 12 * STREAM_BLOCK_BYTES;
        let mut tar = Vec::new();
        tar_header(&mut tar, "big", b'0', 0o664, size as u64, "");
        let mut writer = ZipWriter::new(Vec::new(), 1, 2).unwrap();
        writer.write_block(Bytes::from(tar)).unwrap();
        let zeros = Bytes::from(vec![0u8; 65_536]);
        for _ in 0..size / zeros.len() {
            writer.write_block(zeros.clone()).unwrap();
            assert!(writer.queued_input_bytes <= MAX_QUEUED_INPUT_BYTES);
            if let Body::Stream(stream) = &writer.body {
                assert!(stream.block.len() <= STREAM_BLOCK_BYTES);
            }
        }
        writer
            .write_block(Bytes::from(vec![0u8; 3 * TAR_BLOCK]))
            .unwrap();
        let zip = writer.finish().unwrap();
        assert!(python_listing(&zip).contains(&format!("big {size} ")));
    }

    /// The UTF-8 flag is set as git's `is_utf8` decides: valid UTF-8 that
    /// is not ASCII, where git also refuses U+FFFE and U+FFFF (attack:
    /// such a name got the flag where git's zip has none).
    #[test]
    fn the_utf8_flag_follows_gits_rule() {
        let flags = |name: &[u8]| {
            Meta {
                name: name.to_vec(),
                kind: Kind::File { executable: false },
                mtime: 0,
            }
            .flags()
        };
        assert_eq!(flags(b"plain.txt"), 0);
        assert_eq!(flags("é.txt".as_bytes()), FLAG_UTF8);
        assert_eq!(
            flags("\u{fffd}\u{fffc}\u{10ffff}\u{1fffe}".as_bytes()),
            FLAG_UTF8
        );
        assert_eq!(flags("a\u{ffff}.txt".as_bytes()), 0);
        assert_eq!(flags("a\u{fffe}".as_bytes()), 0);
        assert_eq!(flags(b"\xff.txt"), 0);
        assert_eq!(flags(b"\xed\xa0\x80"), 0, "a surrogate");
        assert_eq!(flags(b"\xc0\xaf"), 0, "overlong");
    }

    #[test]
    fn dos_time_is_the_utc_calendar_time() {
        // 2009-02-13 23:31:30 UTC.
        assert_eq!(
            dos_time(MTIME),
            (15 + 31 * 32 + 23 * 2048, 13 + 2 * 32 + 29 * 512)
        );
        // 2000-02-29 00:00:00 UTC, a leap day.
        assert_eq!(dos_time(951_782_400), (0, 29 + 2 * 32 + 20 * 512));
    }

    /// The zip's first bytes, the prefix directory's local header, go out
    /// before git's tar arrives at all (`generate` writes them before git
    /// starts); git's tar, its prefix directory included, then makes the
    /// same zip byte for byte as without the early write, in any cut.
    #[test]
    fn the_first_entry_goes_out_before_gits_first_piece() {
        let tar = sample_tar(10);
        let mut writer = ZipWriter::new(Vec::new(), 6, 1).unwrap();
        writer.write_ahead_directory(b"p/", MTIME).unwrap();
        let out = writer.sink().clone();
        assert_eq!(&out[..4], LOCAL_HEADER_SIGNATURE.to_le_bytes());
        assert_eq!(&out[30..32], b"p/");
        assert_eq!(out.len(), 30 + 2 + EXTRA_MTIME_BYTES as usize);
        // git's first piece (pax global header, its data, "p/", and half of
        // "p/a.txt") adds nothing before a.txt is compressed: "p/" is out.
        let first_piece = 5 * TAR_BLOCK;
        let expected = zip(&tar, tar.len(), 1, Zip64At::FORMAT);
        for piece in [1, 7, TAR_BLOCK, first_piece, tar.len()] {
            let mut writer = ZipWriter::new(Vec::new(), 6, 2).unwrap();
            writer.write_ahead_directory(b"p/", MTIME).unwrap();
            for chunk in tar.chunks(piece) {
                writer.write_block(Bytes::copy_from_slice(chunk)).unwrap();
            }
            assert!(writer.finish().unwrap() == expected, "pieces of {piece}");
        }
    }

    /// The bytes written ahead are a promise about git's first entry: a tar
    /// whose first entry is another one (name, time, kind) fails the
    /// writer, never a zip with two different first entries.
    #[test]
    fn a_first_entry_other_than_the_one_written_ahead_fails() {
        let tar = sample_tar(10);
        for (name, mtime) in [(&b"q/"[..], MTIME), (b"p", MTIME), (b"p/", MTIME + 1)] {
            let mut writer = ZipWriter::new(Vec::new(), 6, 1).unwrap();
            writer.write_ahead_directory(name, mtime).unwrap();
            assert!(
                writer.write_block(Bytes::copy_from_slice(&tar)).is_err(),
                "{name:?} {mtime}"
            );
        }
        // A file first, not a directory.
        let mut file_first = Vec::new();
        tar_entry(&mut file_first, "p/", b'0', 0o664, b"data", "");
        file_first.extend_from_slice(&[0; 2 * TAR_BLOCK]);
        let mut writer = ZipWriter::new(Vec::new(), 6, 1).unwrap();
        writer.write_ahead_directory(b"p/", MTIME).unwrap();
        assert!(writer.write_block(Bytes::from(file_first)).is_err());
        // No entry at all.
        let mut writer = ZipWriter::new(Vec::new(), 6, 1).unwrap();
        writer.write_ahead_directory(b"p/", MTIME).unwrap();
        writer
            .write_block(Bytes::from(vec![0u8; 2 * TAR_BLOCK]))
            .unwrap();
        assert!(writer.finish().is_err());
        // Only a fresh writer writes ahead.
        let mut writer = ZipWriter::new(Vec::new(), 6, 1).unwrap();
        writer
            .write_block(Bytes::copy_from_slice(&tar[..5 * TAR_BLOCK]))
            .unwrap();
        assert!(writer.write_ahead_directory(b"p/", MTIME).is_err());
    }

    #[test]
    fn a_truncated_tar_fails() {
        let tar = sample_tar(10);
        let mut writer = ZipWriter::new(Vec::new(), 6, 2).unwrap();
        writer
            .write_block(Bytes::copy_from_slice(&tar[..tar.len() / 2]))
            .unwrap();
        assert!(writer.finish().is_err());
    }
}
