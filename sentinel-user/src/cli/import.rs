//! `sentinel deny import FILE` and `allow import`: reads and checks every
//! line before anything is sent (a bad file changes nothing), then sends
//! the whole list in one `import_packed` request when the daemon offers it,
//! else in JSON `import` chunks as older daemons expect.

use std::{
    fs,
    io::{self, Read as _},
    path::Path,
};

use anyhow::{Context as _, ensure};
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    admin::{FEATURE_IMPORT_PACKED, ImportResult, Ready, Request, client::Client, packed},
    net::{RuleList, validate_prefix},
};

/// Prefixes per JSON `import` request: keeps each line near 1.5 MB.
const JSON_CHUNK: usize = 50_000;

/// Smallest part of a file parsed on a thread of its own.
const PART_MIN_BYTES: usize = 1 << 20;

/// Reads `file` (`-`: standard input) and checks every prefix in it for
/// `list`: one per line, blank lines and `#` comments skipped. The first
/// bad line, by line number, fails the whole file.
pub fn read_prefixes(file: &Path, list: RuleList) -> anyhow::Result<Vec<IpNet>> {
    let mut text = Vec::new();
    if file == Path::new("-") {
        io::stdin()
            .lock()
            .read_to_end(&mut text)
            .context("cannot read standard input")?;
    } else {
        text = fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    }
    // Parsing is most of the CLI's work on a large list: split the text
    // at line boundaries and parse the parts side by side.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let parts = split_at_lines(&text, threads, PART_MIN_BYTES);
    let parsed: Vec<Result<Part, PartError>> = if parts.len() == 1 {
        vec![parse_part(parts[0], list)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .iter()
                .map(|part| scope.spawn(move || parse_part(part, list)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(PartError::panicked())))
                .collect()
        })
    };
    let total = parsed
        .iter()
        .map(|p| p.as_ref().map_or(0, |p| p.prefixes.len()))
        .sum();
    let mut prefixes = Vec::with_capacity(total);
    let mut lines_before = 0;
    for part in parsed {
        match part {
            Ok(part) => {
                lines_before += part.lines;
                prefixes.extend(part.prefixes);
            }
            Err(e) => {
                let line = lines_before + e.line;
                return Err(anyhow::Error::msg(e.message))
                    .with_context(|| format!("{}:{line}", file.display()));
            }
        }
    }
    Ok(prefixes)
}

/// Up to `parts` pieces of `text`, each ending after a newline (the last
/// wherever the text ends), none shorter than `min_bytes` unless it is the
/// only one.
fn split_at_lines(text: &[u8], parts: usize, min_bytes: usize) -> Vec<&[u8]> {
    let parts = parts.min(text.len() / min_bytes.max(1)).max(1);
    let mut out = Vec::with_capacity(parts);
    let mut rest = text;
    for i in (1..parts).rev() {
        let target = rest.len() / (i + 1);
        match rest[target..].iter().position(|b| *b == b'\n') {
            Some(nl) => {
                let (head, tail) = rest.split_at(target + nl + 1);
                out.push(head);
                rest = tail;
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

struct Part {
    prefixes: Vec<IpNet>,
    /// Newline-terminated lines in the part.
    lines: usize,
}

struct PartError {
    /// 1-based within the part.
    line: usize,
    message: String,
}

impl PartError {
    fn panicked() -> Self {
        Self {
            line: 0,
            message: "internal error: a parsing thread panicked".into(),
        }
    }
}

fn parse_part(part: &[u8], list: RuleList) -> Result<Part, PartError> {
    let mut prefixes = Vec::with_capacity(part.len() / 16);
    let mut lines = 0;
    for (n, line) in part.split(|b| *b == b'\n').enumerate() {
        lines = n;
        let line = std::str::from_utf8(line).map_err(|_| PartError {
            line: n + 1,
            message: "not UTF-8 text".into(),
        })?;
        let text = line.split('#').next().unwrap_or("").trim();
        if text.is_empty() {
            continue;
        }
        prefixes.push(validate_prefix(text, list).map_err(|e| PartError {
            line: n + 1,
            message: e.to_string(),
        })?);
    }
    Ok(Part { prefixes, lines })
}

/// What `status` says about the protocol; older daemons send no
/// `features`.
#[derive(Deserialize)]
struct Features {
    #[serde(default)]
    features: Vec<String>,
}

/// Sends checked `prefixes`; (created, replaced).
pub fn send(
    client: &mut Client,
    list: RuleList,
    prefixes: &[IpNet],
    ttl_ms: Option<u64>,
    reason: Option<&str>,
) -> anyhow::Result<(usize, usize)> {
    let status: Features = client.call(&Request::Status {})?;
    let packed = status.features.iter().any(|f| f == FEATURE_IMPORT_PACKED);
    let (mut created, mut replaced) = (0, 0);
    let chunk = if packed {
        packed::MAX_RECORDS as usize
    } else {
        JSON_CHUNK
    };
    for part in prefixes.chunks(chunk) {
        let after = || format!("after {} entries were written", created + replaced);
        let result: ImportResult = if packed {
            let (v4, v6, body) = packed::encode(part);
            let ready: Ready = client
                .call(&Request::ImportPacked {
                    list,
                    v4,
                    v6,
                    ttl_ms,
                    reason: reason.map(str::to_owned),
                })
                .with_context(after)?;
            ensure!(
                ready.body_bytes == body.len(),
                "the daemon asked for {} bytes of a {}-byte body",
                ready.body_bytes,
                body.len()
            );
            client.send_body(&body).with_context(after)?
        } else {
            client
                .call(&Request::Import {
                    list,
                    prefixes: part.iter().map(IpNet::to_string).collect(),
                    ttl_ms,
                    reason: reason.map(str::to_owned),
                })
                .with_context(after)?
        };
        created += result.created;
        replaced += result.replaced;
    }
    Ok((created, replaced))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_end_at_line_boundaries_and_cover_the_text() {
        let text: Vec<u8> = (0..1000)
            .flat_map(|i| format!("192.0.2.{}\n", i % 256).into_bytes())
            .collect();
        for parts in 1..6 {
            let split = split_at_lines(&text, parts, 100);
            assert_eq!(split.len(), parts);
            assert_eq!(split.concat(), text);
            for part in &split {
                assert_eq!(part.last(), Some(&b'\n'));
            }
        }
        // Small texts stay whole.
        assert_eq!(split_at_lines(b"192.0.2.1\n", 4, 100).len(), 1);
        assert_eq!(split_at_lines(b"", 4, 100), vec![&b""[..]]);
    }

    #[test]
    fn line_numbers_count_across_parts() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("list.txt");
        let mut text = String::new();
        for i in 0..200_000u32 {
            text.push_str(&format!("{}\n", std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        }
        text.push_str("# a comment\n\n10.9.9.9/8\n");
        fs::write(&file, &text).unwrap();
        let error = read_prefixes(&file, RuleList::Deny).unwrap_err();
        assert_eq!(
            format!("{error:#}"),
            format!(
                "{}:200003: 10.9.9.9/8 has host bits set (did you mean 10.0.0.0/8?)",
                file.display()
            )
        );
        text.truncate(text.len() - "10.9.9.9/8\n".len());
        fs::write(&file, &text).unwrap();
        let prefixes = read_prefixes(&file, RuleList::Deny).unwrap();
        assert_eq!(prefixes.len(), 200_000);
        assert_eq!(prefixes[199_999].to_string(), "10.3.13.63/32");
    }
}
