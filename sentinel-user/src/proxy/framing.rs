//! An independent reading of HTTP/1 message framing on a client
//! connection, to catch request smuggling that hyper tolerates.
//!
//! hyper answers 400 to most framing attacks itself (duplicate
//! Content-Length with different values, invalid chunk sizes, obs-fold,
//! invalid header names), but a request with both Content-Length and
//! Transfer-Encoding it accepts, dropping Content-Length as RFC 9112 §6.1
//! allows. A proxy must not: the next hop may frame the message the other
//! way. This tracker follows the byte stream as hyper reads it, finds each
//! request head with httparse (the parser hyper uses; a plain head without
//! a body by a scan of its lines, see `quick_head`), and records a
//! verdict per head, in order; the handler takes one verdict per request
//! and refuses the flagged ones with 400 before anything is forwarded.
//!
//! It also holds heads to `limits.max-header-bytes` exactly: hyper's own
//! bound is its read buffer, which cannot be smaller than 8 KiB.
//!
//! When the tracker cannot follow the stream any more (a head hyper will
//! reject anyway, HTTP/2), it stops and records nothing more; requests
//! without a verdict are not flagged. An upgrade request (or CONNECT) does
//! not stop it: whether the connection leaves HTTP is the upstream's
//! answer, and when that is not 101 the client may go on sending requests.
//! After a switch the tracker reads tunnel bytes that hyper no longer
//! parses, and its verdicts on them are never asked for.

use std::{collections::VecDeque, mem::MaybeUninit};

/// What the tracker found in one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// A framing conflict: the reason, for the log.
    Smuggling(&'static str),
    /// The head is longer than the configured maximum.
    HeadTooLarge,
}

#[derive(Debug)]
enum State {
    Head,
    /// Bytes of a Content-Length body still to come.
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    /// Not followed any more.
    Lost,
}

/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4096;

pub struct Framing {
    state: State,
    /// The head (or line) read so far.
    pending: Vec<u8>,
    max_head: usize,
    /// hyper's header count limit: a head with more is one hyper refuses,
    /// any head with fewer must be followed.
    max_headers: usize,
    /// The last head asked to leave HTTP (an `Upgrade` header, CONNECT):
    /// whether it does is the upstream's answer, which the tracker cannot
    /// see.
    upgrade: bool,
    pub verdicts: VecDeque<Verdict>,
}

impl Framing {
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        Self {
            state: State::Head,
            pending: Vec::new(),
            max_head,
            max_headers,
            upgrade: false,
            verdicts: VecDeque::new(),
        }
    }

    pub fn lost(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    /// Whether the stream is between messages: every byte fed so far
    /// belongs to complete requests, and the last of them did not ask to
    /// leave HTTP.
    pub fn between_messages(&self) -> bool {
        matches!(self.state, State::Head) && self.pending.is_empty() && !self.upgrade
    }

    /// Follows `data`, the next bytes the client sent.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Lost => return,
                State::Head => {
                    if self.pending.is_empty() {
                        // Usually a whole head arrives in one read: parse
                        // it in place, without copying.
                        if let Some(len) = self.parse_head(data) {
                            data = &data[len.min(data.len())..];
                            continue;
                        }
                        if self.lost() {
                            return;
                        }
                        self.pending.extend_from_slice(data);
                    } else {
                        let before = self.pending.len();
                        let mut buf = std::mem::take(&mut self.pending);
                        buf.extend_from_slice(data);
                        if let Some(len) = self.parse_head(&buf) {
                            // The previous, shorter `pending` was partial,
                            // so the head ends inside `data`; the buffer
                            // is released rather than kept for an idle
                            // connection.
                            data = &data[len.saturating_sub(before).min(data.len())..];
                            continue;
                        }
                        self.pending = buf;
                    }
                    if self.pending.len() > self.max_head && !self.lost() {
                        // hyper answers 431 itself past its buffer, the
                        // handler does below it.
                        self.verdicts.push_back(Verdict::HeadTooLarge);
                        self.state = State::Lost;
                    }
                    return;
                }
                State::Fixed(n) => {
                    let skip = (data.len() as u64).min(n);
                    data = &data[skip as usize..];
                    self.state = if n == skip {
                        State::Head
                    } else {
                        State::Fixed(n - skip)
                    };
                }
                State::ChunkData(n) => {
                    let skip = (data.len() as u64).min(n);
                    data = &data[skip as usize..];
                    self.state = if n == skip {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(n - skip)
                    };
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let Some(line) = self.line(&mut data) else {
                        return;
                    };
                    self.state = match self.state {
                        State::ChunkSize => match chunk_size(&line) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            None => State::Lost,
                        },
                        State::ChunkEnd if line.is_empty() => State::ChunkSize,
                        State::Trailers if line.is_empty() => State::Head,
                        State::Trailers => State::Trailers,
                        _ => State::Lost,
                    };
                }
            }
        }
    }

    /// The next line without its line ending, once whole.
    fn line(&mut self, data: &mut &[u8]) -> Option<Vec<u8>> {
        match data.iter().position(|b| *b == b'\n') {
            Some(end) => {
                self.pending.extend_from_slice(&data[..end]);
                *data = &data[end + 1..];
                let mut line = std::mem::take(&mut self.pending);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(line)
            }
            None => {
                self.pending.extend_from_slice(data);
                *data = &[];
                if self.pending.len() > MAX_LINE {
                    self.state = State::Lost;
                }
                None
            }
        }
    }

    /// Parses the head in `pending`; its length once complete.
    fn parse_head(&mut self, buf: &[u8]) -> Option<usize> {
        if let Some(len) = quick_head(buf, self.max_head) {
            self.upgrade = false;
            self.verdicts.push_back(Verdict::Clean);
            self.state = State::Head;
            return Some(len);
        }
        // Uninitialised: httparse writes the entries it returns, and
        // zeroing 128 of them (4 KiB) cost as much as the parse itself.
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut heap;
        let headers: &mut [MaybeUninit<httparse::Header<'_>>] = if self.max_headers <= stack.len() {
            &mut stack[..self.max_headers]
        } else {
            heap = Vec::with_capacity(self.max_headers);
            heap.resize_with(self.max_headers, MaybeUninit::uninit);
            &mut heap
        };
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                // hyper rejects it too (400 or 431) and closes.
                self.state = State::Lost;
                return None;
            }
        };
        let mut content_length: Option<&[u8]> = None;
        let mut lengths_differ = false;
        let mut transfer_encoding: Option<&[u8]> = None;
        self.upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("upgrade") {
                self.upgrade = true;
            } else if h.name.eq_ignore_ascii_case("content-length") {
                match content_length {
                    Some(prev) if prev != h.value => lengths_differ = true,
                    _ => content_length = Some(h.value),
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = Some(h.value);
            }
        }
        let verdict = if len > self.max_head {
            Verdict::HeadTooLarge
        } else if content_length.is_some() && transfer_encoding.is_some() {
            Verdict::Smuggling("Content-Length together with Transfer-Encoding")
        } else if lengths_differ {
            Verdict::Smuggling("Content-Length given twice with different values")
        } else {
            Verdict::Clean
        };
        self.verdicts.push_back(verdict);
        self.state = if verdict != Verdict::Clean {
            // Refused heads close the connection.
            State::Lost
        } else if let Some(te) = transfer_encoding {
            let last = te.rsplit(|b| *b == b',').next().unwrap_or(te);
            if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                State::ChunkSize
            } else {
                State::Lost
            }
        } else if let Some(cl) = content_length {
            match std::str::from_utf8(cl)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                Some(0) => State::Head,
                Some(n) => State::Fixed(n),
                None => State::Lost,
            }
        } else {
            State::Head
        };
        Some(len)
    }
}

/// The length of the complete head at the start of `buf` when it needs
/// no parse to be followed: a request line ending in HTTP/1.1 or
/// HTTP/1.0 (not CONNECT), lines ending in CRLF, no field named
/// Content-Length, Transfer-Encoding or Upgrade, and no longer than
/// `max_head`. Such a head has no body and does not ask to leave HTTP;
/// its verdict is clean. Anything else (`None`) is for httparse to read.
///
/// Most requests are such a GET: finding its lines with memchr costs a
/// fraction of a full parse, which hyper does once more anyway. For every
/// head hyper accepts, the names found here are httparse's (a name is
/// what precedes the line's first colon); a head it refuses closes the
/// connection with 400 whatever the verdict.
fn quick_head(buf: &[u8], max_head: usize) -> Option<usize> {
    let mut at = 0;
    let mut first = true;
    loop {
        let end = at + memchr::memchr(b'\n', buf.get(at..)?)?;
        if end == at || buf[end - 1] != b'\r' {
            return None;
        }
        let line = &buf[at..end - 1];
        at = end + 1;
        if at > max_head {
            return None;
        }
        if first {
            first = false;
            let version = line.len().checked_sub(9).map(|i| &line[i..]);
            if !matches!(version, Some(b" HTTP/1.1" | b" HTTP/1.0"))
                || line.starts_with(b"CONNECT ")
            {
                return None;
            }
            continue;
        }
        if line.is_empty() {
            return Some(at);
        }
        let name = &line[..memchr::memchr(b':', line)?];
        let watched = match name.len() {
            7 => name.eq_ignore_ascii_case(b"upgrade"),
            14 => name.eq_ignore_ascii_case(b"content-length"),
            17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
            _ => false,
        };
        if watched {
            return None;
        }
    }
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|b| *b == b';').next()?.trim_ascii();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[u8], step: usize) -> (Vec<Verdict>, bool) {
        let mut f = Framing::new(65536, 100);
        for piece in stream.chunks(step) {
            f.feed(piece);
        }
        (f.verdicts.iter().copied().collect(), f.lost())
    }

    #[test]
    fn reads_plain_heads_without_a_parse_and_leaves_the_rest_to_httparse() {
        let clean: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /x?y=1 HTTP/1.0\r\nHost: a\r\nX-Content-Length: 5\r\nUpgrades: no\r\n\r\nGET",
            b"DELETE /r HTTP/1.1\r\nAccept: */*\r\nUser-Agent: a:b\r\n\r\n",
        ];
        for head in clean {
            let len = quick_head(head, 65536).expect("a quick head");
            // httparse finds the same end and none of the watched fields.
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            assert_eq!(req.parse(head), Ok(httparse::Status::Complete(len)));
        }
        let parsed: &[&[u8]] = &[
            // Partial, a body, an upgrade, a tunnel, bare LF, HTTP/2.
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"POST / HTTP/1.1\r\ncontent-LENGTH: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUPGRADE: websocket\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"POST / HTTP/1.1\nContent-Length: 4\n\nab\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon\r\n\r\n",
        ];
        for head in parsed {
            assert_eq!(
                quick_head(head, 65536),
                None,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // Over the size limit: httparse's path gives the verdict.
        assert_eq!(quick_head(clean[0], 10), None);
    }

    #[test]
    fn follows_pipelined_requests_in_any_split() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n\
            GET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let (v, lost) = verdicts(stream, step);
            assert_eq!(v, vec![Verdict::Clean; 4], "step {step}");
            assert!(!lost, "step {step}");
        }
    }

    #[test]
    fn flags_content_length_with_transfer_encoding() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
            0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        let (v, lost) = verdicts(stream, 5);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0], Verdict::Clean);
        assert!(matches!(v[1], Verdict::Smuggling(_)));
        assert!(lost);
    }

    #[test]
    fn holds_heads_to_the_configured_size() {
        let head = |n: usize| {
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
                "a".repeat(n)
            )
        };
        for step in [1, 100, 5000] {
            let mut f = Framing::new(1024, 100);
            let stream = head(900) + &head(2000);
            for piece in stream.as_bytes().chunks(step) {
                f.feed(piece);
            }
            assert_eq!(
                f.verdicts.iter().copied().collect::<Vec<_>>(),
                [Verdict::Clean, Verdict::HeadTooLarge],
                "step {step}"
            );
            assert!(f.lost());
        }
    }

    #[test]
    fn follows_heads_with_as_many_headers_as_allowed() {
        let mut stream = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..300 {
            stream.push_str(&format!("X-H{i}: {i}\r\n"));
        }
        stream.push_str(
            "\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let mut f = Framing::new(65536, 1000);
        f.feed(stream.as_bytes());
        assert_eq!(f.verdicts.len(), 2);
        assert_eq!(f.verdicts[0], Verdict::Clean);
        assert!(matches!(f.verdicts[1], Verdict::Smuggling(_)));
    }

    #[test]
    fn knows_when_it_is_between_messages() {
        let mut f = Framing::new(65536, 100);
        assert!(f.between_messages());
        f.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel");
        assert!(!f.between_messages(), "inside a body");
        f.feed(b"lo");
        assert!(f.between_messages());
        f.feed(b"GET / HTTP/1.1\r\nHo");
        assert!(!f.between_messages(), "inside a head");
        f.feed(b"st: a\r\n\r\n");
        assert!(f.between_messages());
        f.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(!f.between_messages(), "after an upgrade request");
        f.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(
            f.between_messages(),
            "the upgrade was refused, HTTP goes on"
        );
        f.feed(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n");
        assert!(!f.between_messages(), "after CONNECT");
    }

    #[test]
    fn keeps_following_after_an_upgrade_request() {
        // The upstream did not switch protocols: the client goes on.
        let stream =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\
            POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        for step in [1, 9, stream.len()] {
            let (v, _) = verdicts(stream, step);
            assert_eq!(v.len(), 2, "step {step}");
            assert_eq!(v[0], Verdict::Clean);
            assert!(matches!(v[1], Verdict::Smuggling(_)), "step {step}");
        }
    }

    #[test]
    fn stops_following_what_it_cannot_read() {
        let (v, lost) = verdicts(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 100);
        assert!(v.is_empty());
        assert!(lost);
        let (v, lost) = verdicts(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
            100,
        );
        assert_eq!(v, vec![Verdict::Clean]);
        assert!(lost);
        let (_, lost) = verdicts(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            100,
        );
        assert!(lost);
    }
}
