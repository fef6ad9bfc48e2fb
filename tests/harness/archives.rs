//! Archive bytes, checked without trusting an archive library: entry
//! listings parsed here, decompression by the system's `gzip` and `zstd`,
//! and streams too large to hold compared piece by piece.

use std::io::{self, Read, Write};
use std::process::{Child, Command, Stdio};

/// Runs `program args` with `input` on stdin and returns its stdout; panics
/// (with its stderr) unless it exits 0. Used for `gzip -dc` and `zstd -dc`.
pub fn pipe_through(program: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let output = std::thread::scope(|scope| {
        scope.spawn(move || {
            // A decompressor that stops early closes its stdin: that is its
            // exit status's business, not a panic here.
            let _ = stdin.write_all(input);
        });
        child.wait_with_output().expect("wait for the child")
    });
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

// ---------------------------------------------------------------------------
// Archive listings (to check the top folder without trusting a library)

/// Entry names of a tar archive (ustar + pax `path` records), without the
/// `pax_global_header` entry.
pub fn tar_entry_names(tar: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut offset = 0;
    let mut pax_path: Option<String> = None;
    while offset + 512 <= tar.len() {
        let header = &tar[offset..offset + 512];
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let field = |range: std::ops::Range<usize>| {
            let raw = &header[range];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let size_text = field(124..136);
        let size = u64::from_str_radix(size_text.trim(), 8)
            .unwrap_or_else(|_| panic!("bad tar size field {size_text:?} at {offset}"));
        let size = usize::try_from(size).expect("tar entry size fits usize");
        let typeflag = header[156];
        let data = &tar[offset + 512..(offset + 512 + size).min(tar.len())];
        match typeflag {
            b'g' => {}
            b'x' => pax_path = pax_record(data, "path"),
            _ => {
                let name = pax_path.take().unwrap_or_else(|| {
                    let prefix = field(345..500);
                    let name = field(0..100);
                    if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}/{name}")
                    }
                });
                names.push(name);
            }
        }
        offset += 512 + size.div_ceil(512) * 512;
    }
    names
}

fn pax_record(data: &[u8], key: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|line| {
        let (_, record) = line.split_once(' ')?;
        let (k, v) = record.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// Entry names of a zip archive, from its central directory.
pub fn zip_entry_names(zip: &[u8]) -> Vec<String> {
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([zip[at], zip[at + 1]]));
    let u32_at =
        |at: usize| u32::from_le_bytes([zip[at], zip[at + 1], zip[at + 2], zip[at + 3]]) as usize;
    let end = (0..=zip.len().saturating_sub(22))
        .rev()
        .find(|&at| zip[at..at + 4] == [0x50, 0x4b, 0x05, 0x06])
        .expect("zip end of central directory");
    let count = u16_at(end + 10);
    let mut at = u32_at(end + 16);
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        assert_eq!(
            zip[at..at + 4],
            [0x50, 0x4b, 0x01, 0x02],
            "zip central directory entry"
        );
        let (name_len, extra_len, comment_len) =
            (u16_at(at + 28), u16_at(at + 30), u16_at(at + 32));
        names.push(String::from_utf8_lossy(&zip[at + 46..at + 46 + name_len]).into_owned());
        at += 46 + name_len + extra_len + comment_len;
    }
    names
}

/// Reads `actual` to its end and asserts it equals what `expected` (a
/// spawned command with piped stdout) prints, without holding either whole.
/// Returns the number of bytes compared.
pub fn assert_same_stream(mut actual: impl Read, mut expected: Child, what: &str) -> u64 {
    let mut expected_out = expected.stdout.take().expect("stdout is piped");
    let mut a = vec![0u8; 1 << 20];
    let mut e = vec![0u8; 1 << 20];
    let mut offset: u64 = 0;
    loop {
        let n = read_full(&mut actual, &mut a).unwrap_or_else(|error| {
            panic!("{what}: reading the body failed at byte {offset}: {error}")
        });
        let m = read_full(&mut expected_out, &mut e).expect("read git's output");
        let common = n.min(m);
        // Slices compare with memcmp, quick even in a debug build; the
        // offset of a difference is looked for only when there is one.
        if a[..common] != e[..common] {
            let at = a[..common]
                .iter()
                .zip(&e[..common])
                .position(|(x, y)| x != y)
                .unwrap_or(common);
            panic!("{what}: bytes differ at offset {}", offset + at as u64);
        }
        assert_eq!(
            n,
            m,
            "{what}: lengths differ (body ends near {}, expected near {})",
            offset + n as u64,
            offset + m as u64
        );
        offset += n as u64;
        if n == 0 {
            break;
        }
    }
    assert!(
        expected.wait().expect("wait for git").success(),
        "{what}: git failed"
    );
    offset
}

fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Python's `zipfile` view of every entry of a zip, as one line each, and
/// the comment first: name, the UTF-8 flag, DOS time, "version made by",
/// version needed, internal and external attributes, the central extra
/// fields, CRC, size and a digest of the data it reads back (which checks
/// the CRC). Not compared: the compression method and sizes (gitball
/// deflates with another zlib, on several cores), offsets, the data
/// descriptor flag.
pub fn zip_entries(zip: &[u8]) -> Vec<String> {
    try_zip_entries(zip).unwrap_or_else(|error| panic!("{error}"))
}

/// `zip_entries`, with an unreadable zip as an error rather than a panic
/// (for checks made on background threads).
pub fn try_zip_entries(zip: &[u8]) -> Result<Vec<String>, String> {
    const SCRIPT: &str = r#"
import hashlib, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
print("comment", z.comment.decode())
for i in z.infolist():
    data = z.read(i)
    print(repr(i.filename), i.flag_bits & 0x800, i.date_time, i.create_system,
          i.create_version, i.extract_version, i.internal_attr, oct(i.external_attr),
          i.extra.hex(), i.CRC, i.file_size, hashlib.sha256(data).hexdigest())
"#;
    let dir = tempfile::tempdir().map_err(|error| format!("temp dir: {error}"))?;
    let path = dir.path().join("archive.zip");
    std::fs::write(&path, zip).map_err(|error| format!("write the zip: {error}"))?;
    let output = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(&path)
        .output()
        .map_err(|error| format!("run python3: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "python zipfile: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let listing = String::from_utf8(output.stdout).map_err(|_| "listing is not UTF-8")?;
    Ok(listing.lines().map(str::to_owned).collect())
}

/// Asserts that `actual` holds the same entries as `expected` (git's own
/// zip), entry by entry, in the same order (see `zip_entries`).
pub fn assert_same_zip_entries(actual: &[u8], expected: &[u8], what: &str) {
    let (actual, expected) = (zip_entries(actual), zip_entries(expected));
    for (index, (a, e)) in actual.iter().zip(&expected).enumerate() {
        assert_eq!(a, e, "{what}: entry {index} differs from git's");
    }
    assert_eq!(actual.len(), expected.len(), "{what}: entry count");
}

/// Asserts that independent readers accept the zip and read every entry:
/// `unzip -t`, `bsdtar` (libarchive) extracting to stdout, and Java's
/// `ZipInputStream` (streaming from the local headers, as a browser-side
/// or servlet reader would) reading `entries` entries.
pub fn assert_zip_readers_accept(zip: &[u8], entries: usize, what: &str) {
    const JAVA: &str = r#"
import java.io.*;
import java.util.zip.*;
public class ReadZip {
    public static void main(String[] args) throws Exception {
        int count = 0;
        try (ZipInputStream in = new ZipInputStream(new BufferedInputStream(new FileInputStream(args[0])))) {
            byte[] buffer = new byte[65536];
            for (ZipEntry entry; (entry = in.getNextEntry()) != null; ) {
                while (in.read(buffer) >= 0) { }
                count++;
            }
        }
        System.out.println(count);
    }
}
"#;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("archive.zip");
    std::fs::write(&path, zip).expect("write the zip");
    let run = |command: &mut Command| {
        let output = command.output().expect("run a zip reader");
        assert!(
            output.status.success(),
            "{what}: {command:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    };
    run(Command::new("unzip").arg("-tq").arg(&path));
    run(Command::new("bsdtar").arg("-xOf").arg(&path));
    let source = dir.path().join("ReadZip.java");
    std::fs::write(&source, JAVA).expect("write the java reader");
    let counted = run(Command::new("java").arg(&source).arg(&path));
    assert_eq!(
        String::from_utf8_lossy(&counted).trim(),
        entries.to_string(),
        "{what}: entries read by ZipInputStream"
    );
}
