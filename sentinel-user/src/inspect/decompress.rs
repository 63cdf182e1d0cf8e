//! Decompression of bodies for inspection, bounded twice: by the ratio of
//! output to input (`max-decompression-ratio`, zip bombs) and by an
//! absolute output cap (`max-decompressed-bytes`, 10 MiB by default).
//! Output is produced in small steps and both bounds are checked after
//! each, so a bomb costs at most the cap in memory and never finishes
//! expanding.

use std::io::Read;

/// A `Content-Encoding` Sentinel can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    /// zlib-wrapped (RFC 9110) or, as many clients send it, raw deflate.
    Deflate,
    Br,
}

impl Encoding {
    pub const fn as_str(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Br => "br",
        }
    }

    /// Parses a `Content-Encoding` value. `Ok(None)`: nothing to undo
    /// (absent or `identity`). `Err(name)`: an encoding (or a stack of
    /// several) that cannot be undone.
    pub fn parse(value: &str) -> Result<Option<Self>, String> {
        let codings: Vec<String> = value
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity")
            .collect();
        match codings.as_slice() {
            [] => Ok(None),
            [one] => match one.as_str() {
                "gzip" | "x-gzip" => Ok(Some(Encoding::Gzip)),
                "deflate" => Ok(Some(Encoding::Deflate)),
                "br" => Ok(Some(Encoding::Br)),
                other => Err(other.to_owned()),
            },
            _ => Err(codings.join(", ")),
        }
    }
}

/// The seed's result labels.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecompressError {
    #[error("decompressed size passed {ratio}x the compressed size")]
    RatioExceeded { ratio: f64 },
    #[error("decompressed size passed {max} bytes")]
    SizeExceeded { max: u64 },
    #[error("invalid compressed data: {reason}")]
    InvalidData { reason: String },
    #[error("i/o error while decompressing: {reason}")]
    Io { reason: String },
}

impl DecompressError {
    pub const fn label(&self) -> &'static str {
        match self {
            DecompressError::RatioExceeded { .. } => "ratio_exceeded",
            DecompressError::SizeExceeded { .. } => "size_exceeded",
            DecompressError::InvalidData { .. } => "invalid_data",
            DecompressError::Io { .. } => "io_error",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_ratio: f64,
    pub max_output: u64,
}

/// Decompresses `input`. When `complete` is false the input is only the
/// first part of a longer body (it was cut at the inspection cap): an
/// early end of the stream is then expected, and what was decoded so far
/// is returned.
pub fn decompress(
    encoding: Encoding,
    input: &[u8],
    complete: bool,
    limits: Limits,
) -> Result<Vec<u8>, DecompressError> {
    match encoding {
        Encoding::Gzip => drain(
            flate2::read::MultiGzDecoder::new(input),
            input.len(),
            complete,
            limits,
        ),
        Encoding::Deflate if zlib_header(input) => drain(
            flate2::read::ZlibDecoder::new(input),
            input.len(),
            complete,
            limits,
        ),
        Encoding::Deflate => drain(
            flate2::read::DeflateDecoder::new(input),
            input.len(),
            complete,
            limits,
        ),
        Encoding::Br => drain(
            brotli::Decompressor::new(input, 4096),
            input.len(),
            complete,
            limits,
        ),
    }
}

/// RFC 1950: compression method 8 and a header checksum divisible by 31.
fn zlib_header(input: &[u8]) -> bool {
    match input {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

fn drain(
    mut decoder: impl Read,
    input_len: usize,
    complete: bool,
    limits: Limits,
) -> Result<Vec<u8>, DecompressError> {
    let ratio_cap = (limits.max_ratio * input_len.max(1) as f64).min(u64::MAX as f64) as u64;
    let mut out = Vec::new();
    let mut step = [0u8; 16 * 1024];
    loop {
        let n = match decoder.read(&mut step) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !complete => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData
                        | std::io::ErrorKind::InvalidInput
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::Other
                ) =>
            {
                return Err(DecompressError::InvalidData {
                    reason: e.to_string(),
                });
            }
            Err(e) => {
                return Err(DecompressError::Io {
                    reason: e.to_string(),
                });
            }
        };
        let total = out.len() as u64 + n as u64;
        if total > ratio_cap {
            return Err(DecompressError::RatioExceeded {
                ratio: limits.max_ratio,
            });
        }
        if total > limits.max_output {
            return Err(DecompressError::SizeExceeded {
                max: limits.max_output,
            });
        }
        out.extend_from_slice(&step[..n]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const LIMITS: Limits = Limits {
        max_ratio: 100.0,
        max_output: 10 * 1024 * 1024,
    };

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn br(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            w.write_all(data).unwrap();
        }
        out
    }

    #[test]
    fn every_encoding_round_trips() {
        let text = br#"{"user": "alice", "query": "' OR 1=1 --"}"#.repeat(20);
        for (enc, packed) in [
            (Encoding::Gzip, gzip(&text)),
            (Encoding::Deflate, zlib(&text)),
            (Encoding::Deflate, raw_deflate(&text)),
            (Encoding::Br, br(&text)),
        ] {
            assert_eq!(
                decompress(enc, &packed, true, LIMITS).unwrap(),
                text,
                "{enc:?}"
            );
        }
    }

    #[test]
    fn bombs_stop_at_the_ratio_or_the_cap() {
        let zeros = vec![0u8; 20 * 1024 * 1024];
        let bomb = gzip(&zeros);
        assert!(bomb.len() < 64 * 1024);
        assert_eq!(
            decompress(Encoding::Gzip, &bomb, true, LIMITS)
                .unwrap_err()
                .label(),
            "ratio_exceeded"
        );
        let generous = Limits {
            max_ratio: 1e9,
            max_output: 1024 * 1024,
        };
        assert_eq!(
            decompress(Encoding::Br, &br(&zeros), true, generous)
                .unwrap_err()
                .label(),
            "size_exceeded"
        );
    }

    #[test]
    fn corrupt_and_cut_streams() {
        // Text that compresses about 2:1, so that half the stream holds
        // whole blocks of output.
        let mut seed = 7u32;
        let text: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                b"abcdefghijklmnop "[(seed >> 16) as usize % 17]
            })
            .collect();
        let packed = gzip(&text);
        let mut corrupt = packed.clone();
        corrupt[12] ^= 0xff;
        corrupt[20] ^= 0xff;
        assert_eq!(
            decompress(Encoding::Gzip, &corrupt, true, LIMITS)
                .unwrap_err()
                .label(),
            "invalid_data"
        );
        assert_eq!(
            decompress(Encoding::Gzip, b"not gzip at all", true, LIMITS)
                .unwrap_err()
                .label(),
            "invalid_data"
        );
        let cut = &packed[..packed.len() / 2];
        assert_eq!(
            decompress(Encoding::Gzip, cut, true, LIMITS)
                .unwrap_err()
                .label(),
            "invalid_data",
            "a complete body that ends early is corrupt"
        );
        let partial = decompress(Encoding::Gzip, cut, false, LIMITS).unwrap();
        assert!(!partial.is_empty() && text.starts_with(&partial));
        assert_eq!(
            decompress(Encoding::Br, b"\xff\xff\xff\xff", true, LIMITS)
                .unwrap_err()
                .label(),
            "invalid_data"
        );
    }

    #[test]
    fn content_encoding_values() {
        assert_eq!(Encoding::parse("gzip"), Ok(Some(Encoding::Gzip)));
        assert_eq!(Encoding::parse(" BR "), Ok(Some(Encoding::Br)));
        assert_eq!(Encoding::parse("identity"), Ok(None));
        assert_eq!(Encoding::parse(""), Ok(None));
        assert_eq!(Encoding::parse("zstd"), Err("zstd".to_owned()));
        assert_eq!(Encoding::parse("gzip, br"), Err("gzip, br".to_owned()));
    }
}
