//! Tests of the multipart observer: parsing, boundaries cut at every
//! offset, truncated and malformed bodies, a 500 MiB upload in bounded
//! memory, and type detection from content.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::multipart::{FileRecord, Limits, MultipartObserver, detect_type};

const B: &str = "----WebKitFormBoundary7MA4YWxkTrZu0gW";

fn content_type() -> String {
    format!("multipart/form-data; boundary={B}")
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A body of `parts`, each its header lines and content.
fn body(parts: &[(&[&str], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (headers, content) in parts {
        out.extend_from_slice(format!("--{B}\r\n").as_bytes());
        for h in *headers {
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{B}--\r\n").as_bytes());
    out
}

fn observe(limits: Limits, chunks: &[&[u8]]) -> Vec<FileRecord> {
    let mut observer = MultipartObserver::new(&content_type(), limits).expect("multipart");
    for chunk in chunks {
        observer.feed(chunk);
    }
    observer.finish()
}

const PNG: &[u8] =
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
const NOTES: &[u8] = b"plain notes\r\nline two";
const PHP: &[u8] = b"<?php system($_GET['c']); ?>\n";

fn sample() -> Vec<u8> {
    body(&[
        (
            &["Content-Disposition: form-data; name=\"title\""],
            b"holiday pictures",
        ),
        (
            &[
                "Content-Disposition: form-data; name=\"photo\"; filename=\"cat.png\"",
                "Content-Type: image/png",
            ],
            PNG,
        ),
        (
            &[
                "content-disposition: form-data; name=\"avatar\"; filename=\"fallback.jpg\"; filename*=UTF-8''%E7%8C%AB%20shell.php.jpg",
                "Content-Type: Image/JPEG; charset=binary",
            ],
            PHP,
        ),
        // A browser's "no file chosen".
        (
            &[
                "Content-Disposition: form-data; name=\"other\"; filename=\"\"",
                "Content-Type: application/octet-stream",
            ],
            b"",
        ),
        (
            &[
                "Content-Disposition: form-data; name=\"notes\"; filename=\"C:\\Users\\me\\notes.txt\"",
            ],
            NOTES,
        ),
    ])
}

fn expected_sample() -> Vec<FileRecord> {
    vec![
        FileRecord {
            file_name: "cat.png".into(),
            file_size: PNG.len() as u64,
            file_type: "image/png".into(),
            claimed_type: Some("image/png".into()),
            file_content: None,
            file_hash256: hex_sha256(PNG),
        },
        FileRecord {
            file_name: "猫 shell.php.jpg".into(),
            file_size: PHP.len() as u64,
            file_type: "text/x-php".into(),
            claimed_type: Some("image/jpeg".into()),
            file_content: None,
            file_hash256: hex_sha256(PHP),
        },
        FileRecord {
            file_name: "C:\\Users\\me\\notes.txt".into(),
            file_size: NOTES.len() as u64,
            file_type: "text/plain".into(),
            claimed_type: None,
            file_content: None,
            file_hash256: hex_sha256(NOTES),
        },
    ]
}

#[test]
fn only_multipart_types_with_a_boundary_are_observed() {
    let limits = Limits::default();
    assert!(MultipartObserver::new("application/json", limits).is_none());
    assert!(MultipartObserver::new("multipart/form-data", limits).is_none());
    assert!(MultipartObserver::new("multipart/form-data; boundary=", limits).is_none());
    assert!(MultipartObserver::new("multipart/form-data; boundary=\"\"", limits).is_none());
    let long = format!("multipart/form-data; boundary={}", "x".repeat(201));
    assert!(MultipartObserver::new(&long, limits).is_none());
    assert!(MultipartObserver::new("multipart", limits).is_none());
    assert!(MultipartObserver::new("", limits).is_none());
    assert!(MultipartObserver::new("täxt/plain; boundary=x", limits).is_none());
    assert!(
        MultipartObserver::new(
            "Multipart/Form-Data; charset=utf-8; BOUNDARY=\"a b\"",
            limits
        )
        .is_some()
    );
    assert!(MultipartObserver::new("multipart/mixed; boundary=abc", limits).is_some());
}

#[test]
fn files_are_reported_with_names_sizes_types_and_hashes() {
    let records = observe(Limits::default(), &[&sample()]);
    assert_eq!(records, expected_sample());
    let json = serde_json::to_value(&records[0]).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "file_name": "cat.png",
            "file_size": PNG.len(),
            "file_type": "image/png",
            "claimed_type": "image/png",
            "file_content": null,
            "file_hash256": hex_sha256(PNG),
        })
    );
}

#[test]
fn boundaries_cut_at_every_offset_give_the_same_records() {
    let body = sample();
    let expected = expected_sample();
    for i in 0..=body.len() {
        let records = observe(Limits::default(), &[&body[..i], &body[i..]]);
        assert_eq!(records, expected, "cut at {i}");
    }
    for i in (0..=body.len()).step_by(3) {
        for j in (i..=body.len()).step_by(11) {
            let records = observe(Limits::default(), &[&body[..i], &body[i..j], &body[j..]]);
            assert_eq!(records, expected, "cut at {i} and {j}");
        }
    }
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(observe(Limits::default(), &bytes), expected, "byte by byte");
}

#[test]
fn content_is_kept_up_to_the_cap_in_base64() {
    let limits = Limits {
        max_content_bytes: 8,
        ..Limits::default()
    };
    let records = observe(limits, &[&sample()]);
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    assert_eq!(records[0].file_content, Some(b64(&PNG[..8])));
    assert_eq!(records[1].file_content, Some(b64(&PHP[..8])));
    let small = body(&[(
        &["Content-Disposition: form-data; name=\"f\"; filename=\"a\""],
        b"abc",
    )]);
    assert_eq!(
        observe(limits, &[&small])[0].file_content,
        Some(b64(b"abc"))
    );
}

#[test]
fn boundary_lookalikes_inside_content_are_content() {
    let content = format!(
        "a\r\n--{B}x not it\r\n--{B}-y\r\n--{B} \tz\r\n--{B}\t\t-\r\n--{B}{}end --{B}\r\n",
        " ".repeat(40)
    );
    let body = body(&[(
        &["Content-Disposition: form-data; name=\"f\"; filename=\"tricky.txt\""],
        content.as_bytes(),
    )]);
    for i in 0..=body.len() {
        let records = observe(Limits::default(), &[&body[..i], &body[i..]]);
        assert_eq!(records.len(), 1, "cut at {i}");
        assert_eq!(records[0].file_size, content.len() as u64, "cut at {i}");
        assert_eq!(records[0].file_hash256, hex_sha256(content.as_bytes()));
    }
}

#[test]
fn padding_after_a_boundary_preamble_and_epilogue_are_handled() {
    let mut body = b"This is the preamble. --not a boundary\r\n".to_vec();
    body.extend_from_slice(
        format!(
            "--{B} \t\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\n\r\nhello\r\n--{B}--  \r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!("--{B}\r\nContent-Disposition: form-data; name=\"g\"; filename=\"b.txt\"\r\n\r\nepilogue\r\n--{B}--\r\n")
            .as_bytes(),
    );
    let records = observe(Limits::default(), &[&body]);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].file_name, "a.txt");
    assert_eq!(records[0].file_size, 5);
}

#[test]
fn parts_beyond_max_parts_are_ignored() {
    let part = |name: &'static str| -> (&'static [&'static str], &'static [u8]) {
        match name {
            "a" => (
                &["Content-Disposition: form-data; name=\"a\"; filename=\"a\""],
                b"1",
            ),
            "b" => (
                &["Content-Disposition: form-data; name=\"b\"; filename=\"b\""],
                b"2",
            ),
            _ => (
                &["Content-Disposition: form-data; name=\"c\"; filename=\"c\""],
                b"3",
            ),
        }
    };
    let body = body(&[part("a"), part("b"), part("c")]);
    let limits = Limits {
        max_parts: 2,
        ..Limits::default()
    };
    let names: Vec<String> = observe(limits, &[&body])
        .into_iter()
        .map(|r| r.file_name)
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn a_part_with_oversized_headers_is_skipped_and_memory_stays_bounded() {
    let huge = format!("X-Filler: {}", "h".repeat(20_000));
    let body = body(&[
        (
            &[
                "Content-Disposition: form-data; name=\"a\"; filename=\"hidden\"",
                huge.as_str(),
            ],
            b"skipped",
        ),
        (
            &["Content-Disposition: form-data; name=\"b\"; filename=\"seen\""],
            b"kept",
        ),
    ]);
    let mut observer =
        MultipartObserver::new(&content_type(), Limits::default()).expect("multipart");
    for chunk in body.chunks(500) {
        observer.feed(chunk);
        assert!(
            observer.buffered_bytes() < 8 * 1024,
            "{}",
            observer.buffered_bytes()
        );
    }
    let records = observer.finish();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].file_name, "seen");
}

#[test]
fn a_truncated_body_reports_what_arrived_and_never_panics() {
    let body = sample();
    // Cut inside the PHP file's content, where no CR can start a delimiter.
    let php_at = body
        .windows(PHP.len())
        .position(|w| w == PHP)
        .expect("php in body");
    let cut = php_at + 10;
    let records = observe(Limits::default(), &[&body[..cut]]);
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].file_size, 10);
    assert_eq!(records[1].file_hash256, hex_sha256(&PHP[..10]));
    assert_eq!(records[1].file_name, "猫 shell.php.jpg");

    let full = expected_sample();
    let names = [
        "cat.png",
        "猫 shell.php.jpg",
        "",
        "C:\\Users\\me\\notes.txt",
    ];
    for i in 0..=body.len() {
        let records = observe(Limits::default(), &[&body[..i]]);
        let Some((last, before)) = records.split_last() else {
            continue;
        };
        // Files that ended before the cut are reported exactly; the one
        // the cut fell in (even the empty one) with what arrived of it.
        assert_eq!(before, &full[..before.len()], "cut at {i}");
        assert!(
            names.contains(&last.file_name.as_str()),
            "cut at {i}: {last:?}"
        );
        assert!(records.len() <= full.len(), "cut at {i}");
    }
    assert_eq!(observe(Limits::default(), &[&body]), full);
}

/// xorshift64*: fast, reproducible test bytes.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[test]
fn garbage_never_panics_and_memory_stays_bounded() {
    let mut rng = Bytes(0x1234_5678_9abc_def1);
    let pieces: [&[u8]; 8] = [
        b"\r\n",
        b"--",
        B.as_bytes(),
        b"Content-Disposition: form-data; filename=\"",
        b"\r\n\r\n",
        b"\"; filename*=UTF-8''%zz%4",
        b" ",
        b"\x89PNG",
    ];
    for round in 0..300 {
        let mut body = Vec::new();
        let n = (rng.next() % 200) as usize;
        for _ in 0..n {
            match rng.next() % 3 {
                0 => body.extend_from_slice(pieces[(rng.next() % 8) as usize]),
                _ => body.push(rng.next() as u8),
            }
        }
        let limits = Limits {
            max_content_bytes: (rng.next() % 64) as usize,
            max_parts: (rng.next() % 10) as usize,
            max_header_bytes: (rng.next() % 300) as usize,
        };
        let mut observer = MultipartObserver::new(&content_type(), limits).expect("multipart");
        let mut at = 0;
        while at < body.len() {
            let len = 1 + (rng.next() % 40) as usize;
            let end = (at + len).min(body.len());
            observer.feed(&body[at..end]);
            assert!(observer.buffered_bytes() < 4096, "round {round}");
            at = end;
        }
        for record in observer.finish() {
            assert_eq!(record.file_hash256.len(), 64);
        }
    }
}

#[test]
fn a_500_mib_upload_streams_in_bounded_memory_with_the_right_hash() {
    const SIZE: u64 = 500 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let head = format!(
        "--{B}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"big.bin\"\r\nContent-Type: application/x-executable\r\n\r\n\x7fELF"
    );
    let trailer = format!("\r\n--{B}--\r\n");
    let limits = Limits {
        max_content_bytes: 1024,
        ..Limits::default()
    };
    let mut observer = MultipartObserver::new(&content_type(), limits).expect("multipart");
    // The reference hash runs on another thread: an unoptimized SHA-256
    // over 500 MiB takes long enough to do it twice in a row.
    let (to_reference, chunks) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let reference = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        for chunk in chunks {
            hasher.update(&chunk);
        }
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });
    let mut first = Vec::new();
    let mut rng = Bytes(0x9e37_79b9_7f4a_7c15);
    let mut chunk = vec![0u8; CHUNK];
    // The file is "\x7fELF" then random bytes, SIZE in all; chunks are
    // cut without regard to where parts start or end.
    let mut head_left: &[u8] = head.as_bytes();
    let mut data_left = SIZE - 4;
    let mut trailer_left: &[u8] = trailer.as_bytes();
    to_reference.send(b"\x7fELF".to_vec()).expect("reference");
    first.extend_from_slice(b"\x7fELF");
    let mut max_buffered = 0;
    loop {
        let mut filled = 0;
        let n = head_left.len().min(CHUNK);
        chunk[..n].copy_from_slice(&head_left[..n]);
        head_left = &head_left[n..];
        filled += n;
        let n = (data_left.min((CHUNK - filled) as u64)) as usize;
        rng.fill(&mut chunk[filled..filled + n]);
        to_reference
            .send(chunk[filled..filled + n].to_vec())
            .expect("reference");
        if first.len() < 1024 {
            let k = (1024 - first.len()).min(n);
            first.extend_from_slice(&chunk[filled..filled + k]);
        }
        data_left -= n as u64;
        filled += n;
        let n = trailer_left.len().min(CHUNK - filled);
        chunk[filled..filled + n].copy_from_slice(&trailer_left[..n]);
        trailer_left = &trailer_left[n..];
        filled += n;
        if filled == 0 {
            break;
        }
        observer.feed(&chunk[..filled]);
        max_buffered = max_buffered.max(observer.buffered_bytes());
    }
    assert!(
        max_buffered < 4 * 1024,
        "buffers reached {max_buffered} bytes"
    );
    let records = observer.finish();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.file_size, SIZE);
    drop(to_reference);
    let want = reference.join().expect("reference thread");
    assert_eq!(record.file_hash256, want);
    assert_eq!(record.file_type, "application/x-elf");
    assert_eq!(
        record.claimed_type.as_deref(),
        Some("application/x-executable")
    );
    let kept = base64::engine::general_purpose::STANDARD
        .decode(record.file_content.as_deref().expect("content"))
        .expect("base64");
    assert_eq!(kept, first);
}

/// A ZIP whose local headers name `names`, each with `data` stored.
fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
    }
    out
}

#[test]
fn types_come_from_the_content() {
    let mut pe = b"MZ".to_vec();
    pe.resize(0x3c, 0);
    pe.extend_from_slice(&0x80u32.to_le_bytes());
    pe.resize(0x80, 0);
    pe.extend_from_slice(b"PE\0\0\x64\x86");
    let mut dos = b"MZ".to_vec();
    dos.resize(0x40, 0);
    let docx = zip(&[
        ("[Content_Types].xml", b"<Types/>"),
        ("word/document.xml", b"<w:document/>"),
    ]);
    let xlsx = zip(&[
        ("[Content_Types].xml", b"<Types/>"),
        ("xl/workbook.xml", b"<wb/>"),
    ]);
    let pptx = zip(&[
        ("[Content_Types].xml", b"<Types/>"),
        ("ppt/presentation.xml", b"<p/>"),
    ]);
    let odt = zip(&[("mimetype", b"application/vnd.oasis.opendocument.text")]);
    let epub = zip(&[("mimetype", b"application/epub+zip")]);
    let jar = zip(&[("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\r\n")]);
    let apk = zip(&[
        ("AndroidManifest.xml", b"\x03\0\x08\0"),
        ("META-INF/MANIFEST.MF", b""),
    ]);
    let plain_zip = zip(&[("photo.jpg", b"\xff\xd8\xff")]);
    let cases: Vec<(&[u8], &str)> = vec![
        (PNG, "image/png"),
        (b"\xff\xd8\xff\xe0\0\x10JFIF\0", "image/jpeg"),
        (b"GIF89a\x01\0\x01\0", "image/gif"),
        (b"RIFF\x24\0\0\0WEBPVP8 ", "image/webp"),
        (b"RIFF\x24\0\0\0WAVEfmt ", "audio/wav"),
        (b"\0\0\0\x18ftypmp42\0\0\0\0", "video/mp4"),
        (b"\0\0\0\x18ftypheic\0\0\0\0", "image/heic"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "application/pdf"),
        (&plain_zip, "application/zip"),
        (
            b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            "application/zip",
        ),
        (
            &docx,
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        (
            &xlsx,
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        ),
        (
            &pptx,
            "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        ),
        (&odt, "application/vnd.oasis.opendocument.text"),
        (&epub, "application/epub+zip"),
        (&jar, "application/java-archive"),
        (&apk, "application/vnd.android.package-archive"),
        (
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\0\0",
            "application/x-ole-storage",
        ),
        (b"\x1f\x8b\x08\0\0\0\0\0", "application/gzip"),
        (b"7z\xbc\xaf\x27\x1c\0\x04", "application/x-7z-compressed"),
        (b"Rar!\x1a\x07\x00\xcf\x90", "application/vnd.rar"),
        (b"Rar!\x1a\x07\x01\x00\x33\x92", "application/vnd.rar"),
        (b"BZh91AY&SY", "application/x-bzip2"),
        (b"\xfd7zXZ\0\0\x04", "application/x-xz"),
        (b"\x28\xb5\x2f\xfd\x24\x05", "application/zstd"),
        (b"\x7fELF\x02\x01\x01\0", "application/x-elf"),
        (&pe, "application/vnd.microsoft.portable-executable"),
        (&dos, "application/x-dosexec"),
        (b"\xcf\xfa\xed\xfe\x07\0\0\x01", "application/x-mach-binary"),
        (b"\xca\xfe\xba\xbe\0\0\0\x02", "application/x-mach-binary"),
        (b"\xca\xfe\xba\xbe\0\0\0\x34", "application/java-vm"),
        (b"\0asm\x01\0\0\0", "application/wasm"),
        (b"SQLite format 3\0\x10\0", "application/vnd.sqlite3"),
        (b"#!/bin/sh\nrm -rf /\n", "text/x-shellscript"),
        (b"#!/usr/bin/env bash\necho hi\n", "text/x-shellscript"),
        (b"#!/usr/bin/env python3\nprint(1)\n", "text/x-python"),
        (b"#!/usr/bin/perl\n", "text/x-perl"),
        (PHP, "text/x-php"),
        (b"GIF89a<?php eval($_POST[1]); ?>", "image/gif"),
        (b"  <!DOCTYPE html><html><body>x</body></html>", "text/html"),
        (b"<html><script>alert(1)</script>", "text/html"),
        (b"\xef\xbb\xbf<script>alert(1)</script>", "text/html"),
        (b"<?xml version=\"1.0\"?><root/>", "application/xml"),
        (
            b"<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
            "image/svg+xml",
        ),
        (b"<svg onload=\"alert(1)\"/>", "image/svg+xml"),
        (b"{\"a\": [1, 2]}", "application/json"),
        (b"\n [1, 2, 3]", "application/json"),
        (b"name,age\nada,36\n", "text/plain"),
        ("héllo wörld".as_bytes(), "text/plain"),
        (b"text with a \0 in it", "application/octet-stream"),
        (b"\x00\x01\x02\x03\xff\xfe", "application/octet-stream"),
        (b"", "application/x-empty"),
    ];
    for (content, want) in cases {
        assert_eq!(
            detect_type(content, true),
            want,
            "{:?}",
            String::from_utf8_lossy(content)
        );
    }
    // A head cut in the middle of a character is still text, unless it
    // is the whole file.
    let cut = &"añb".as_bytes()[..2];
    assert_eq!(detect_type(cut, false), "text/plain");
    assert_eq!(detect_type(cut, true), "application/octet-stream");
}
