//! Uploads seen in a multipart/form-data body, observed as it streams by,
//! in bounded memory.
//!
//! Contract:
//! - [`MultipartObserver::new`] takes the request's `Content-Type`; it is
//!   `None` unless that is a `multipart/*` type with a usable boundary.
//! - [`MultipartObserver::feed`] takes the body's chunks as they arrive, cut
//!   anywhere (a boundary may be split across chunks), and never fails: a
//!   malformed body just yields fewer records. Memory is bounded whatever
//!   the body: a window of about the boundary's length plus a few bytes,
//!   one part's headers (at most `max_header_bytes`), the first
//!   [`MAGIC_BYTES`] of the current file for type detection, and
//!   `max_content_bytes` of it for `file_content`
//!   ([`MultipartObserver::buffered_bytes`] tells).
//! - [`MultipartObserver::finish`] returns a [`FileRecord`] per part that
//!   has a `filename` or `filename*` parameter (a part with an empty name
//!   and no content, a browser's "no file chosen", is left out), in body
//!   order. A body cut short still reports the file it was in, with what
//!   arrived of it.
//! - `file_type` comes from the content's first bytes ([`detect_type`]),
//!   whatever the part claims; the claim is `claimed_type`.
//! - After `max_parts` parts (files or not) the rest of the body is
//!   ignored.

use std::fmt::Write as _;

use base64::Engine as _;
use memchr::memmem;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Bytes of each file kept to detect its type.
pub const MAGIC_BYTES: usize = 2048;
/// Spaces and tabs allowed after a boundary before its CRLF (RFC 2046's
/// transport padding); more, and it was not a boundary.
const MAX_PADDING: usize = 32;
/// Longest boundary accepted (RFC 2046 allows 70; some clients go past).
const MAX_BOUNDARY: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of each file kept, base64-encoded, as `file_content`; 0 keeps
    /// none (`file_content` is then `None`).
    pub max_content_bytes: usize,
    /// Parts looked at; the rest of the body is ignored.
    pub max_parts: usize,
    /// Size of one part's header block; a larger one makes the part
    /// skipped.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content_bytes: 0,
            max_parts: 64,
            max_header_bytes: 4096,
        }
    }
}

/// One uploaded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileRecord {
    /// As the client sent it (`filename*` wins over `filename`).
    pub file_name: String,
    pub file_size: u64,
    /// Detected from the content.
    pub file_type: String,
    /// The part's own `Content-Type` (its media type, lowercased).
    pub claimed_type: Option<String>,
    /// Base64 of the first `max_content_bytes` bytes.
    pub file_content: Option<String>,
    /// SHA-256 of the whole content, lowercase hex.
    pub file_hash256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first boundary.
    Preamble,
    /// Right after `CRLF--boundary`: its end (`--`, or padding and CRLF)
    /// tells whether it really was one. `in_part`: it was found in a
    /// part's body, which ends here if it was.
    AfterDelimiter {
        in_part: bool,
    },
    Headers,
    Body,
    /// After the closing boundary, or past `max_parts`.
    Done,
}

struct FilePart {
    name: String,
    claimed: Option<String>,
    size: u64,
    hasher: Sha256,
    magic: Vec<u8>,
    content: Vec<u8>,
}

/// Appends the start of `data` to `buf` up to `max` bytes, growing `buf`
/// by doubling but never past `max`.
fn keep(buf: &mut Vec<u8>, data: &[u8], max: usize) {
    let n = max.saturating_sub(buf.len()).min(data.len());
    if n == 0 {
        return;
    }
    if buf.capacity() < buf.len() + n {
        let target = (buf.capacity() * 2).max(buf.len() + n).min(max);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(&data[..n]);
}

impl FilePart {
    fn take(&mut self, data: &[u8], max_content: usize) {
        self.size += data.len() as u64;
        self.hasher.update(data);
        keep(&mut self.magic, data, MAGIC_BYTES);
        keep(&mut self.content, data, max_content);
    }

    fn record(self, keep_content: bool) -> FileRecord {
        let mut hash = String::with_capacity(64);
        for b in self.hasher.finalize() {
            let _ = write!(hash, "{b:02x}");
        }
        let complete = self.size <= self.magic.len() as u64;
        FileRecord {
            file_type: detect_type(&self.magic, complete).to_owned(),
            file_content: keep_content
                .then(|| base64::engine::general_purpose::STANDARD.encode(&self.content)),
            file_name: self.name,
            file_size: self.size,
            claimed_type: self.claimed,
            file_hash256: hash,
        }
    }
}

pub struct MultipartObserver {
    /// `CRLF--boundary`.
    delimiter: Vec<u8>,
    finder: memmem::Finder<'static>,
    limits: Limits,
    state: State,
    /// Bytes not yet decided on: a possible start of a delimiter, or the
    /// end of one waiting for what follows.
    tail: Vec<u8>,
    /// The current part's header block, after a leading CRLF so that an
    /// empty block is found like any other.
    headers: Vec<u8>,
    /// The current part, when it is a file.
    part: Option<FilePart>,
    parts: usize,
    files: Vec<FileRecord>,
}

impl MultipartObserver {
    /// An observer for a body of this `Content-Type`, or `None` when it is
    /// not multipart or has no usable boundary.
    pub fn new(content_type: &str, limits: Limits) -> Option<Self> {
        let (media_type, params) = content_type.split_once(';').unwrap_or((content_type, ""));
        let media_type = media_type.trim();
        if !media_type
            .get(..10)
            .is_some_and(|p| p.eq_ignore_ascii_case("multipart/"))
        {
            return None;
        }
        let boundary = parameters(params)
            .into_iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("boundary"))
            .map(|(_, value)| value)?;
        if boundary.is_empty()
            || boundary.len() > MAX_BOUNDARY
            || boundary.bytes().any(|b| b == b'\r' || b == b'\n')
        {
            return None;
        }
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        let finder = memmem::Finder::new(&delimiter).into_owned();
        Some(Self {
            delimiter,
            finder,
            limits,
            state: State::Preamble,
            // The first boundary needs no CRLF before it: give it one.
            tail: b"\r\n".to_vec(),
            headers: Vec::new(),
            part: None,
            parts: 0,
            files: Vec::new(),
        })
    }

    /// Observes the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.state == State::Done {
            return;
        }
        // Enough bytes to decide on anything the tail may hold.
        let lookahead = self.delimiter.len() + MAX_PADDING + 2;
        let mut pos = 0;
        while !self.tail.is_empty() && pos < chunk.len() {
            let take = (chunk.len() - pos).min(lookahead);
            self.tail.extend_from_slice(&chunk[pos..pos + take]);
            pos += take;
            let mut tail = std::mem::take(&mut self.tail);
            let consumed = self.process(&tail);
            let left = tail.len() - consumed;
            if left <= take {
                // What is left came from this chunk: read it from there.
                pos -= left;
                tail.clear();
            } else {
                tail.drain(..consumed);
            }
            self.tail = tail;
        }
        if pos < chunk.len() {
            let consumed = self.process(&chunk[pos..]);
            self.tail.extend_from_slice(&chunk[pos + consumed..]);
        }
    }

    /// The files of the body, in order.
    pub fn finish(mut self) -> Vec<FileRecord> {
        match self.state {
            State::Body => {
                // No boundary will come: what was held back is content.
                let tail = std::mem::take(&mut self.tail);
                self.body(&tail);
                self.end_part();
            }
            State::AfterDelimiter { in_part: true } => self.end_part(),
            _ => {}
        }
        self.files
    }

    /// Bytes held in working buffers (their capacity), records aside.
    pub fn buffered_bytes(&self) -> usize {
        self.tail.capacity()
            + self.headers.capacity()
            + self
                .part
                .as_ref()
                .map_or(0, |p| p.magic.capacity() + p.content.capacity())
    }

    /// Consumes what it can decide on from `data`; the rest must be given
    /// again with more bytes after it.
    fn process(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            let rest = &data[pos..];
            if rest.is_empty() {
                return pos;
            }
            match self.state {
                State::Done => return data.len(),
                State::Preamble | State::Body => {
                    let in_part = self.state == State::Body;
                    match self.finder.find(rest) {
                        Some(i) => {
                            if in_part {
                                self.body(&rest[..i]);
                            }
                            pos += i + self.delimiter.len();
                            self.state = State::AfterDelimiter { in_part };
                        }
                        None => {
                            let keep = partial_suffix(rest, &self.delimiter);
                            let take = rest.len() - keep;
                            if in_part {
                                self.body(&rest[..take]);
                            }
                            return pos + take;
                        }
                    }
                }
                State::AfterDelimiter { in_part } => {
                    if rest.starts_with(b"--") {
                        if in_part {
                            self.end_part();
                        }
                        self.state = State::Done;
                        return data.len();
                    }
                    let padding = rest
                        .iter()
                        .take_while(|b| **b == b' ' || **b == b'\t')
                        .count();
                    let after = &rest[padding..];
                    if padding <= MAX_PADDING && after.starts_with(b"\r\n") {
                        if in_part {
                            self.end_part();
                        }
                        pos += padding + 2;
                        self.start_headers();
                        continue;
                    }
                    let undecided = padding <= MAX_PADDING
                        && (after.is_empty() || after == b"\r" || rest == b"-");
                    if undecided {
                        return pos;
                    }
                    // Not a boundary after all: those bytes were content.
                    if in_part {
                        let delimiter = std::mem::take(&mut self.delimiter);
                        self.body(&delimiter);
                        self.delimiter = delimiter;
                        self.state = State::Body;
                    } else {
                        self.state = State::Preamble;
                    }
                }
                State::Headers => {
                    let cap = self.limits.max_header_bytes.saturating_add(6);
                    let before = self.headers.len();
                    let take = rest.len().min(cap.saturating_sub(before));
                    self.headers.extend_from_slice(&rest[..take]);
                    let from = before.saturating_sub(3);
                    match memmem::find(&self.headers[from..], b"\r\n\r\n") {
                        Some(i) => {
                            let end = from + i;
                            pos += end + 4 - before;
                            self.headers.truncate(end);
                            self.start_part();
                        }
                        None if self.headers.len() >= cap => {
                            // Headers past the limit: skip the part.
                            pos += take;
                            self.headers = Vec::new();
                            self.part = None;
                            self.state = State::Body;
                        }
                        None => return pos + take,
                    }
                }
            }
        }
    }

    fn start_headers(&mut self) {
        self.parts += 1;
        if self.parts > self.limits.max_parts {
            self.state = State::Done;
            return;
        }
        self.headers = b"\r\n".to_vec();
        self.state = State::Headers;
    }

    fn start_part(&mut self) {
        let block = String::from_utf8_lossy(self.headers.get(2..).unwrap_or_default()).into_owned();
        self.headers = Vec::new();
        self.state = State::Body;
        let mut file_name = None;
        let mut claimed = None;
        for (name, value) in header_fields(&block) {
            if name.eq_ignore_ascii_case("content-disposition") {
                file_name = disposition_file_name(&value);
            } else if name.eq_ignore_ascii_case("content-type") {
                let media = value.split(';').next().unwrap_or_default().trim();
                if !media.is_empty() {
                    claimed = Some(media.chars().take(255).collect::<String>().to_lowercase());
                }
            }
        }
        self.part = file_name.map(|name| FilePart {
            name,
            claimed,
            size: 0,
            hasher: Sha256::new(),
            magic: Vec::new(),
            content: Vec::new(),
        });
    }

    fn body(&mut self, data: &[u8]) {
        if let Some(part) = &mut self.part {
            part.take(data, self.limits.max_content_bytes);
        }
    }

    fn end_part(&mut self) {
        if let Some(part) = self.part.take() {
            if part.name.is_empty() && part.size == 0 {
                return;
            }
            self.files
                .push(part.record(self.limits.max_content_bytes > 0));
        }
    }
}

/// The length of the longest end of `data` that starts `delimiter` (and is
/// shorter than it).
fn partial_suffix(data: &[u8], delimiter: &[u8]) -> usize {
    let start = data.len().saturating_sub(delimiter.len() - 1);
    for i in start..data.len() {
        if data[i] == delimiter[0] && delimiter.starts_with(&data[i..]) {
            return data.len() - i;
        }
    }
    0
}

/// Header fields of a part's header block, with folded lines unfolded.
fn header_fields(block: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in block.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    fields
}

/// `name=value` parameters after a header's first `;`, quoted strings
/// unquoted (a backslash escapes only `"` and `\`, since browsers send
/// Windows paths unescaped).
fn parameters(params: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = params.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ';' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut name = String::new();
        while let Some(c) = chars.peek().copied() {
            if c == '=' || c == ';' {
                break;
            }
            name.push(c);
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' if matches!(chars.peek(), Some('"') | Some('\\')) => {
                            if let Some(escaped) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        c => value.push(c),
                    }
                }
                // Anything between the closing quote and the next `;`.
                while chars.peek().is_some_and(|c| *c != ';') {
                    chars.next();
                }
            } else {
                while let Some(c) = chars.peek().copied() {
                    if c == ';' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim_end().to_owned();
            }
        }
        out.push((name.trim().to_owned(), value));
    }
}

/// The file name of a `Content-Disposition`, `None` when it names none.
fn disposition_file_name(value: &str) -> Option<String> {
    let params = value.split_once(';').map_or("", |(_, p)| p);
    let params = parameters(params);
    let extended = params
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("filename*"))
        .and_then(|(_, v)| decode_ext_value(v));
    extended.or_else(|| {
        params
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("filename"))
            .map(|(_, v)| v)
    })
}

/// RFC 8187 `charset'language'percent-encoded`.
fn decode_ext_value(value: &str) -> Option<String> {
    let mut pieces = value.splitn(3, '\'');
    let charset = pieces.next()?;
    let _language = pieces.next()?;
    let encoded = pieces.next()?.as_bytes();
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let b = encoded[i];
        if b == b'%' {
            let hex = encoded
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(decoded) = hex {
                bytes.push(decoded);
                i += 3;
                continue;
            }
        }
        bytes.push(b);
        i += 1;
    }
    if charset.eq_ignore_ascii_case("iso-8859-1") {
        Some(bytes.iter().map(|b| char::from(*b)).collect())
    } else {
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The media type of content starting with `head`; `complete` when `head`
/// is the whole content (an incomplete UTF-8 sequence at its end then
/// makes it binary).
pub fn detect_type(head: &[u8], complete: bool) -> &'static str {
    if head.is_empty() {
        return "application/x-empty";
    }
    let starts = |magic: &[u8]| head.starts_with(magic);
    let at = |offset: usize, magic: &[u8]| {
        head.get(offset..offset + magic.len())
            .is_some_and(|s| s == magic)
    };
    if starts(b"\x89PNG\r\n\x1a\n") {
        return "image/png";
    }
    if starts(b"\xff\xd8\xff") {
        return "image/jpeg";
    }
    if starts(b"GIF87a") || starts(b"GIF89a") {
        return "image/gif";
    }
    if starts(b"RIFF") {
        if at(8, b"WEBP") {
            return "image/webp";
        }
        if at(8, b"WAVE") {
            return "audio/wav";
        }
        if at(8, b"AVI ") {
            return "video/x-msvideo";
        }
    }
    if starts(b"II*\0") || starts(b"MM\0*") {
        return "image/tiff";
    }
    if starts(b"BM") && head.len() >= 14 && head[6..10] == [0, 0, 0, 0] {
        return "image/bmp";
    }
    if at(4, b"ftyp") {
        return match head.get(8..12) {
            Some(b"heic" | b"heix" | b"mif1" | b"msf1") => "image/heic",
            Some(b"avif") => "image/avif",
            Some(b"qt  ") => "video/quicktime",
            _ => "video/mp4",
        };
    }
    if starts(b"%PDF-") {
        return "application/pdf";
    }
    if starts(b"PK\x03\x04") || starts(b"PK\x05\x06") {
        return zip_type(head);
    }
    if starts(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1") {
        // Compound File: legacy Office documents, MSI installers.
        return "application/x-ole-storage";
    }
    if starts(b"\x1f\x8b") {
        return "application/gzip";
    }
    if starts(b"7z\xbc\xaf\x27\x1c") {
        return "application/x-7z-compressed";
    }
    if starts(b"Rar!\x1a\x07\x00") || starts(b"Rar!\x1a\x07\x01\x00") {
        return "application/vnd.rar";
    }
    if starts(b"BZh") && head.get(3).is_some_and(|b| (b'1'..=b'9').contains(b)) {
        return "application/x-bzip2";
    }
    if starts(b"\xfd7zXZ\0") {
        return "application/x-xz";
    }
    if starts(b"\x28\xb5\x2f\xfd") {
        return "application/zstd";
    }
    if starts(b"\x7fELF") {
        return "application/x-elf";
    }
    if starts(b"MZ") {
        let pe = head
            .get(0x3c..0x40)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .is_some_and(|at_pe| at(at_pe, b"PE\0\0"));
        return if pe {
            "application/vnd.microsoft.portable-executable"
        } else {
            "application/x-dosexec"
        };
    }
    if starts(b"\xfe\xed\xfa\xce")
        || starts(b"\xfe\xed\xfa\xcf")
        || starts(b"\xce\xfa\xed\xfe")
        || starts(b"\xcf\xfa\xed\xfe")
    {
        return "application/x-mach-binary";
    }
    if starts(b"\xca\xfe\xba\xbe") {
        // Universal Mach-O binaries count their architectures here; Java
        // classes have their version, 45 or more.
        let n = head
            .get(4..8)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        return if n < 45 {
            "application/x-mach-binary"
        } else {
            "application/java-vm"
        };
    }
    if starts(b"\0asm") {
        return "application/wasm";
    }
    if starts(b"SQLite format 3\0") {
        return "application/vnd.sqlite3";
    }
    if starts(b"OggS") {
        return "audio/ogg";
    }
    if starts(b"ID3") {
        return "audio/mpeg";
    }
    if starts(b"fLaC") {
        return "audio/flac";
    }
    text_type(head, complete)
}

/// ZIP, or the format built on it that the first entries' names tell.
fn zip_type(head: &[u8]) -> &'static str {
    let has = |name: &[u8]| memmem::find(head, name).is_some();
    // OpenDocument and EPUB store their type first, uncompressed.
    if head.get(30..38) == Some(b"mimetype") {
        let rest = &head[38..];
        for (mime, found) in [
            (
                "application/vnd.oasis.opendocument.text",
                &b"application/vnd.oasis.opendocument.text"[..],
            ),
            (
                "application/vnd.oasis.opendocument.spreadsheet",
                b"application/vnd.oasis.opendocument.spreadsheet",
            ),
            (
                "application/vnd.oasis.opendocument.presentation",
                b"application/vnd.oasis.opendocument.presentation",
            ),
            ("application/epub+zip", b"application/epub+zip"),
        ] {
            if memmem::find(rest.get(..found.len() + 64).unwrap_or(rest), found).is_some() {
                return mime;
            }
        }
    }
    if has(b"word/") {
        return "application/vnd.openxmlformats-officedocument.wordprocessingml.document";
    }
    if has(b"xl/") {
        return "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";
    }
    if has(b"ppt/") {
        return "application/vnd.openxmlformats-officedocument.presentationml.presentation";
    }
    if has(b"AndroidManifest.xml") || has(b"classes.dex") {
        return "application/vnd.android.package-archive";
    }
    if has(b"META-INF/MANIFEST.MF") {
        return "application/java-archive";
    }
    "application/zip"
}

/// Text kinds, by their start; binary when it is not text.
fn text_type(head: &[u8], complete: bool) -> &'static str {
    let text = match std::str::from_utf8(head) {
        Ok(text) => text,
        // Cut in the middle of a character by the head's length.
        Err(e) if e.error_len().is_none() && !complete => {
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return "application/octet-stream",
    };
    if text
        .bytes()
        .any(|b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r' | 0x0c | 0x1b)) || b == 0x7f)
    {
        return "application/octet-stream";
    }
    let text = text.trim_start_matches('\u{feff}');
    if let Some(line) = text.strip_prefix("#!") {
        let line = line.lines().next().unwrap_or_default();
        return if line.contains("python") {
            "text/x-python"
        } else if line.contains("perl") {
            "text/x-perl"
        } else if line.contains("ruby") {
            "text/x-ruby"
        } else if line.contains("node") {
            "text/javascript"
        } else if line.contains("php") {
            "text/x-php"
        } else {
            "text/x-shellscript"
        };
    }
    let start = text.trim_start();
    let lower: String = start
        .chars()
        .take(256)
        .collect::<String>()
        .to_ascii_lowercase();
    if lower.starts_with("<?php") || lower.contains("<?php") {
        return "text/x-php";
    }
    if lower.starts_with("<?xml") {
        return if lower.contains("<svg") {
            "image/svg+xml"
        } else {
            "application/xml"
        };
    }
    if lower.starts_with("<svg") {
        return "image/svg+xml";
    }
    const HTML: [&str; 8] = [
        "<!doctype html",
        "<html",
        "<head",
        "<body",
        "<script",
        "<iframe",
        "<meta",
        "<title",
    ];
    if HTML.iter().any(|tag| lower.starts_with(tag)) {
        return "text/html";
    }
    if start.starts_with('{') || start.starts_with('[') {
        return "application/json";
    }
    "text/plain"
}
