//! HTTP/1.1 to upstream targets on a connection the request's own task
//! drives: the request head is written from the request's parts into a
//! buffer the connection keeps, the body streamed after it, the response
//! head parsed with httparse and its body decoded in place.
//!
//! hyper's client connection reaches its dispatcher through a channel, a
//! oneshot for the response and a second channel for the body: about
//! 13,000 instructions an exchange by callgrind, a quarter of what the
//! proxy spent on a small request. This is the part of it a proxy needs.
//! Upgrades and CONNECT, whose connections leave the pool, keep hyper's
//! client (`pool.rs`).
//!
//! Framing follows RFC 9112 §6: a request body of known length goes out
//! with `Content-Length`, any other with `chunked`; a response body is
//! chunked when its last transfer coding says so, delimited by the close
//! when another coding is named or neither header is there, and otherwise
//! as long as its `Content-Length` (several values must agree). Responses
//! to HEAD and 204 and 304 responses have none; 1xx interim responses are
//! skipped.

use std::{
    io::{self, IoSlice},
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version,
    header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING},
    request::Parts,
};
use http_body::{Body, Frame, SizeHint};
use hyper::rt::{Read, ReadBuf, Write};

use super::{ProxyBody, body::BoxError, forward};

/// The most header fields a response head or trailer section may have.
const MAX_HEADERS: usize = 128;
/// The most bytes a response head may take (nginx's default is 4 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line, with its extensions.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The most bytes a trailer section may take.
const MAX_TRAILERS: usize = 16 * 1024;
/// The header fields the proxy adds to a forwarded request's map (`Host`
/// and `X-Request-Id`; the forwarding fields go straight to the wire, see
/// [`super::forward::Forwarded`]).
const FORWARDING_FIELDS: usize = 2;
/// What a read asks room for.
const READ_SIZE: usize = 8 * 1024;
/// Reads into a body of known length ask for up to this much room.
const BODY_READ_MAX: usize = 64 * 1024;
/// Request body data shorter than this is copied behind the head or the
/// chunk framing, so that they go out in one write; longer data is
/// written from its own buffer.
const COPY_BELOW: usize = 8 * 1024;
/// Gathering body frames stops once this much waits to be written.
const GATHER_MAX: usize = 64 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection error")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before the response was complete")]
    Closed,
    #[error("invalid response from the upstream: {0}")]
    Invalid(&'static str),
    #[error("the request body failed")]
    Body(#[source] BoxError),
    #[error("the request body is {0} than its Content-Length")]
    BodyLength(&'static str),
}

/// A failed exchange: why, and whether any of the request was written (a
/// request none of which went out may go to another connection).
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    pub sent: bool,
}

/// One upstream connection between exchanges: its stream, what it read
/// that no response has taken yet, and the buffer request heads are
/// assembled in.
pub struct Conn<T> {
    /// Boxed: a TLS stream is over a kilobyte, and the connection moves
    /// in and out of its pool with every request.
    io: Box<T>,
    buf: BytesMut,
    out: Vec<u8>,
}

impl<T: Read + Write + Unpin> Conn<T> {
    pub fn new(io: T) -> Self {
        Self {
            io: Box::new(io),
            buf: BytesMut::new(),
            out: Vec::new(),
        }
    }

    /// Whether the idle connection is still usable: not closed by the
    /// target and with nothing unasked-for to read. Registers `cx` for
    /// readiness, so that a later close wakes it. With nothing to read
    /// this makes no system call: tokio remembers the socket is not
    /// readable.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        self.buf.is_empty() && self.poll_fill(cx, 512).is_pending()
    }

    /// Reads what the socket has into the buffer, with room for `want`
    /// bytes; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.buf.reserve(want);
        let mut read = ReadBuf::uninit(self.buf.spare_capacity_mut());
        ready!(Pin::new(&mut *self.io).poll_read(cx, read.unfilled()))?;
        let n = read.filled().len();
        // SAFETY: the reader initialised the first `n` spare bytes.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Poll::Ready(Ok(n))
    }

    /// Sends the request of `parts` (in origin form, with its `Host`), the
    /// header lines `extra` (the forwarding fields) and `body`, and waits
    /// for the response head. The response's body holds the connection until it
    /// has ended; [`ResponseBody::reusable`] gives it back then. With `raw`,
    /// the fields to pass on may come apart from the response's map, as
    /// [`RawFields`].
    pub async fn send(
        mut self,
        parts: &Parts,
        host: Option<&HeaderValue>,
        extra: &[u8],
        body: ProxyBody,
        raw: bool,
    ) -> Result<(Response<ResponseBody<T>>, Option<RawFields>), Failed> {
        let head_only = parts.method == Method::HEAD;
        let mut out = std::mem::take(&mut self.out);
        let framing = encode_head(&mut out, parts, host, extra, &body);
        let mut writer = Writer::new(out, body, framing);
        let answer = std::future::poll_fn(|cx| {
            if !writer.finished {
                match writer.poll_write(cx, &mut *self.io) {
                    Poll::Ready(Ok(())) => writer.finished = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            // The target may answer before it has the whole body (a 413,
            // say): read while writing.
            self.poll_head(cx, head_only, raw)
        })
        .await;
        let Writer {
            mut out,
            wrote,
            finished,
            ..
        } = writer;
        out.clear();
        self.out = out;
        match answer {
            Ok((head, decoder, keep_alive, fields)) => {
                // A body cut short leaves the target expecting the rest.
                let reusable = keep_alive && finished;
                let body = ResponseBody {
                    conn: Some(self),
                    decoder,
                    reusable,
                };
                Ok((head.map(|()| body), fields))
            }
            Err(error) => Err(Failed { error, sent: wrote }),
        }
    }

    /// Parses the response head once it is all in the buffer, skipping 1xx
    /// interim responses.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_only: bool,
        raw: bool,
    ) -> Poll<Result<Head, Error>> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, head_only, raw)? {
                    Parsed::Head(head) => return Poll::Ready(Ok(head)),
                    Parsed::Interim => continue,
                    Parsed::Partial if self.buf.len() >= MAX_HEAD => {
                        return Poll::Ready(Err(Error::Invalid("response head too large")));
                    }
                    Parsed::Partial => {}
                }
            }
            if ready!(self.poll_fill(cx, READ_SIZE))? == 0 {
                return Poll::Ready(Err(Error::Closed));
            }
        }
    }
}

/// How a body goes out: a request's to an upstream, or a response's to
/// a client (`server.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    /// This many bytes are still to come.
    Length(u64),
    Chunked,
    /// Delimited by closing the connection (a response to an HTTP/1.0
    /// client whose length is not known).
    Close,
}

/// Writes the request line (in origin form, whatever the form of
/// `parts.uri`) and headers into `out`, `host` first when given, with the
/// framing the body calls for, which it returns.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &Parts,
    host: Option<&HeaderValue>,
    extra: &[u8],
    body: &ProxyBody,
) -> Framing {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut declared = None;
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH {
            declared = declared.or_else(|| parse_length(value.as_bytes()));
            continue;
        }
        if name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(extra);
    // The body's own length wins over a header (an agent may have changed
    // the body); a header is kept for a body that cannot tell.
    let framing = if body.is_end_stream() {
        if declared.is_some() {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Empty
    } else {
        match body.size_hint().exact().or(declared) {
            Some(n) => {
                put_length(out, n);
                Framing::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// Writes a `content-length: n` line.
pub(super) fn put_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A message going out: its head in `out`, then its body's frames.
pub(super) struct Writer {
    body: ProxyBody,
    framing: Framing,
    /// The body has ended (its last framing is in `out`).
    done: bool,
    /// Bytes to write, from `out_pos`: the head, framing, short data.
    out: Vec<u8>,
    out_pos: usize,
    /// Long data to write after `out`, then `trail` (a chunk's CRLF).
    data: Bytes,
    trail: &'static [u8],
    /// Something was written.
    wrote: bool,
    /// All was written and flushed.
    finished: bool,
}

impl Writer {
    /// Writes `out` (a head), then `body` framed as `framing` says.
    pub(super) fn new(out: Vec<u8>, body: ProxyBody, framing: Framing) -> Self {
        Self {
            done: framing == Framing::Empty,
            body,
            framing,
            out,
            out_pos: 0,
            data: Bytes::new(),
            trail: b"",
            wrote: false,
            finished: false,
        }
    }

    /// The head buffer, for the next message.
    pub(super) fn into_buffer(self) -> Vec<u8> {
        let mut out = self.out;
        out.clear();
        out
    }

    fn pending(&self) -> usize {
        self.out.len() - self.out_pos + self.data.len() + self.trail.len()
    }

    /// Gathers body frames and writes them until the body has ended and
    /// all is flushed.
    pub(super) fn poll_write<T: Write + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut T,
    ) -> Poll<Result<(), Error>> {
        loop {
            while !self.done && self.data.is_empty() && self.pending() < GATHER_MAX {
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => self.finish()?,
                    Poll::Ready(Some(Ok(frame))) => self.encode(frame)?,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::Body(e))),
                }
            }
            if self.pending() == 0 {
                if !self.done {
                    // The body has nothing yet; it wakes us.
                    return Poll::Pending;
                }
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                return Poll::Ready(Ok(()));
            }
            let slices = [
                IoSlice::new(&self.out[self.out_pos..]),
                IoSlice::new(&self.data),
                IoSlice::new(self.trail),
            ];
            let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
            }
            self.wrote = true;
            self.advance(n);
        }
    }

    fn advance(&mut self, mut n: usize) {
        let from_out = n.min(self.out.len() - self.out_pos);
        self.out_pos += from_out;
        n -= from_out;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        let from_data = n.min(self.data.len());
        let _ = self.data.split_to(from_data);
        n -= from_data;
        self.trail = &self.trail[n.min(self.trail.len())..];
    }

    fn encode(&mut self, frame: Frame<Bytes>) -> Result<(), Error> {
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Ok(trailers), Framing::Chunked) = (frame.into_trailers(), self.framing) {
                    self.out.extend_from_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        self.out.extend_from_slice(name.as_str().as_bytes());
                        self.out.extend_from_slice(b": ");
                        self.out.extend_from_slice(value.as_bytes());
                        self.out.extend_from_slice(b"\r\n");
                    }
                    self.out.extend_from_slice(b"\r\n");
                    self.done = true;
                }
                // Trailers have no place in a body of fixed length.
                return Ok(());
            }
        };
        if data.is_empty() {
            return Ok(());
        }
        let trail: &'static [u8] = match &mut self.framing {
            Framing::Length(left) => {
                *left = left
                    .checked_sub(data.len() as u64)
                    .ok_or(Error::BodyLength("longer"))?;
                b""
            }
            Framing::Chunked => {
                self.out.extend_from_slice(hex_len(data.len()).as_bytes());
                self.out.extend_from_slice(b"\r\n");
                b"\r\n"
            }
            Framing::Close => b"",
            Framing::Empty => return Err(Error::BodyLength("longer")),
        };
        if data.len() < COPY_BELOW {
            self.out.extend_from_slice(&data);
            self.out.extend_from_slice(trail);
        } else {
            self.data = data;
            self.trail = trail;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Error> {
        match self.framing {
            Framing::Length(0) | Framing::Empty | Framing::Close => {}
            Framing::Length(_) => return Err(Error::BodyLength("shorter")),
            Framing::Chunked => self.out.extend_from_slice(b"0\r\n\r\n"),
        }
        self.done = true;
        Ok(())
    }
}

/// A chunk size in hexadecimal, on the stack.
fn hex_len(n: usize) -> HexLen {
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    HexLen { buf, start: i }
}

struct HexLen {
    buf: [u8; 16],
    start: usize,
}

impl HexLen {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// A response head, how its body is framed, whether the connection stays
/// open after it, and the fields left out of its map.
type Head = (Response<()>, Decoder, bool, Option<RawFields>);

// Returned once a response, by value: boxing the head would cost an
// allocation a response.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Head(Head),
    /// A 1xx response, now consumed.
    Interim,
    Partial,
}

/// Where a header field's name and value sit in the response head.
struct Place {
    name: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

/// A `Content-Length` value: digits only.
pub(super) fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Whether a comma-separated header value lists `token`.
pub(super) fn lists(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a `Connection` value may name a field to drop: a token other
/// than `keep-alive`, itself hop-by-hop (`close` too, as
/// `forward::strip_hop_by_hop` treats it).
fn names_more(value: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive")
    })
}

/// Parses a response head at the start of `buf`, taking it out when it is
/// complete. With `raw`, the fields to pass on are left in the head's bytes
/// (see [`RawFields`]) where they can be.
fn parse_head(buf: &mut BytesMut, head_only: bool, raw: bool) -> Result<Parsed, Error> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Invalid("too many header fields"));
        }
        Err(_) => return Err(Error::Invalid("malformed head")),
    };
    let code = response.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("invalid status"))?;
    if status.is_informational() {
        if code == 101 {
            // Upgrades go through hyper's client; none was asked for here.
            return Err(Error::Invalid("unexpected 101 Switching Protocols"));
        }
        let _ = buf.split_to(len);
        return Ok(Parsed::Interim);
    }
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Where each name and value sits in the head, so that the values can
    // share the head's bytes once it is frozen.
    let base = buf.as_ptr() as usize;
    let mut places = [const { MaybeUninit::<Place>::uninit() }; MAX_HEADERS];
    let count = response.headers.len();
    for (place, header) in places.iter_mut().zip(response.headers.iter()) {
        let name = header.name.as_ptr() as usize - base;
        let value = header.value.as_ptr() as usize - base;
        place.write(Place {
            name: name..name + header.name.len(),
            value: value..value + header.value.len(),
        });
    }
    let reason = response.reason.unwrap_or_default();
    let custom_reason = !reason.is_empty() && Some(reason) != status.canonical_reason();
    let reason_at = reason.as_ptr() as usize - base;
    let reason_len = reason.len();
    // SAFETY: the loop above wrote the first `count` places.
    let places = unsafe { std::slice::from_raw_parts(places.as_ptr().cast::<Place>(), count) };
    let no_body = head_only || matches!(code, 204 | 304);

    // A HEAD or 304 response's Content-Length describes a body it does not
    // carry: it is passed on as a field, through the map.
    let raw = raw && !no_body;
    if raw && let Some((fields, framed)) = RawFields::find(&buf[..len], places, version) {
        let decoder = decoder_for(framed, version)?;
        let keep_alive = framed.keep_alive && decoder != Decoder::Eof;
        let head = buf.split_to(len).freeze();
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        if custom_reason
            && let Ok(phrase) =
                hyper::ext::ReasonPhrase::try_from(head.slice(reason_at..reason_at + reason_len))
        {
            response.extensions_mut().insert(phrase);
        }
        let fields = RawFields { head, ..fields };
        return Ok(Parsed::Head((response, decoder, keep_alive, Some(fields))));
    }

    let head = buf.split_to(len).freeze();
    // hyper keeps a response's emptied map for the next request on the
    // client's connection: room for the fields the proxy adds to a
    // request's map spares that request's map a rehash.
    let mut map = HeaderMap::with_capacity(count + FORWARDING_FIELDS);
    let mut keep_alive = version == Version::HTTP_11;
    let mut saw_close = false;
    let mut chunked = None;
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    // `Connection` values that may name fields to drop (not the usual
    // `keep-alive`).
    let mut named = Vec::new();
    for place in places {
        let name = HeaderName::from_bytes(&head[place.name.clone()])
            .map_err(|_| Error::Invalid("invalid header name"))?;
        let value = &head[place.value.clone()];
        // Standard names compare as enum tags. Hop-by-hop fields are read
        // for this connection and not kept: the response goes on to
        // another one (what `forward::strip_hop_by_hop` does for hyper's
        // responses).
        if name == CONNECTION {
            if saw_close || lists(value, "close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = lists(value, "keep-alive");
            }
            if names_more(value) {
                named.push(place.value.clone());
            }
            continue;
        } else if name == TRANSFER_ENCODING {
            // The last coding of the last field decides.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            continue;
        } else if forward::is_hop_by_hop(&name) {
            continue;
        } else if name == CONTENT_LENGTH {
            for v in value.split(|&b| b == b',') {
                match (parse_length(v.trim_ascii()), length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => bad_length = true,
                }
            }
        }
        let value = HeaderValue::from_maybe_shared(head.slice(place.value.clone()))
            .map_err(|_| Error::Invalid("invalid header value"))?;
        map.append(name, value);
    }
    for value in named {
        forward::remove_named(&mut map, &head[value]);
    }

    let decoder = if no_body {
        Decoder::Done
    } else {
        decoder_for(
            Framed {
                keep_alive,
                chunked,
                length,
                bad_length,
            },
            version,
        )?
    };
    if decoder == Decoder::Eof {
        keep_alive = false;
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = map;
    if custom_reason
        && let Ok(phrase) =
            hyper::ext::ReasonPhrase::try_from(head.slice(reason_at..reason_at + reason_len))
    {
        response.extensions_mut().insert(phrase);
    }
    Ok(Parsed::Head((response, decoder, keep_alive, None)))
}

/// What a response head says about its body and its connection.
#[derive(Debug, Clone, Copy, Default)]
struct Framed {
    keep_alive: bool,
    /// Whether the last transfer coding is chunked, when one is named.
    chunked: Option<bool>,
    length: Option<u64>,
    /// A `Content-Length` that is no number, or several that differ.
    bad_length: bool,
}

/// How a response body that may be there is framed (RFC 9112 §6.3).
fn decoder_for(framed: Framed, version: Version) -> Result<Decoder, Error> {
    Ok(if let Some(chunked) = framed.chunked {
        if version == Version::HTTP_10 {
            return Err(Error::Invalid("Transfer-Encoding in an HTTP/1.0 response"));
        }
        if chunked {
            Decoder::Chunked(Chunk::Size)
        } else {
            Decoder::Eof
        }
    } else if framed.bad_length {
        return Err(Error::Invalid("invalid Content-Length"));
    } else {
        match framed.length {
            Some(0) => Decoder::Done,
            Some(n) => Decoder::Length(n),
            None => Decoder::Eof,
        }
    })
}

/// The most runs of passed-on fields a [`RawFields`] holds; a head whose
/// fields to pass on are split more often goes through a map.
const MAX_RUNS: usize = 6;

/// The header fields of an upstream's response head that the proxy passes
/// on as they came, left in the head's own bytes: runs of whole field lines
/// between the fields it drops (hop-by-hop fields, `Content-Length`, whose
/// framing for the client is the proxy's, and `X-Request-Id`, which is the
/// proxy's own). Written to an HTTP/1 client as they are, where a map of
/// them would be built only to be written out again (about 2,500
/// instructions a small response, callgrind). They travel beside the
/// response (its map holds only what the proxy adds; in its extensions
/// they would cost three allocations), and the handler asks for them only
/// when nothing on the way (agents, secure headers) reads or changes the
/// response's fields.
#[derive(Clone)]
pub struct RawFields {
    head: Bytes,
    /// Byte ranges of the runs in `head`, each from its first field's name
    /// to its last field's value.
    runs: [(u32, u32); MAX_RUNS],
    len: usize,
    /// The fields include `Date`.
    pub has_date: bool,
}

/// What the raw path tells apart in a field name.
enum Field {
    Connection,
    TransferEncoding,
    ContentLength,
    /// Dropped: hop-by-hop, or the proxy's own.
    Dropped,
    Date,
    Other,
}

fn classify(name: &[u8]) -> Field {
    // The length and the first letter leave at most one name to compare.
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    let first = name.first().map_or(0, u8::to_ascii_lowercase);
    match (name.len(), first) {
        (2, b't') if is("te") => Field::Dropped,
        (4, b'd') if is("date") => Field::Date,
        (7, b't') if is("trailer") => Field::Dropped,
        (7, b'u') if is("upgrade") => Field::Dropped,
        (10, b'c') if is("connection") => Field::Connection,
        (10, b'k') if is("keep-alive") => Field::Dropped,
        (12, b'x') if is("x-request-id") => Field::Dropped,
        (14, b'c') if is("content-length") => Field::ContentLength,
        (16, b'p') if is("proxy-connection") => Field::Dropped,
        (17, b't') if is("transfer-encoding") => Field::TransferEncoding,
        (19, b'p') if is("proxy-authorization") => Field::Dropped,
        _ => Field::Other,
    }
}

impl RawFields {
    /// The runs of fields to pass on in `head`, and its framing; `None`
    /// when they need a map: a `Connection` that names fields to drop, or
    /// too many runs. `head` is empty in the result until it is frozen.
    fn find(head: &[u8], places: &[Place], version: Version) -> Option<(RawFields, Framed)> {
        let mut fields = RawFields {
            head: Bytes::new(),
            runs: [(0, 0); MAX_RUNS],
            len: 0,
            has_date: false,
        };
        let mut framed = Framed {
            keep_alive: version == Version::HTTP_11,
            ..Framed::default()
        };
        let mut saw_close = false;
        // The run being extended: its start, and its last value's end.
        let mut run: Option<(usize, usize)> = None;
        for place in places {
            let value = &head[place.value.clone()];
            let keep = match classify(&head[place.name.clone()]) {
                // The usual value, read as the lines below would.
                Field::Connection if value.eq_ignore_ascii_case(b"keep-alive") => {
                    if !saw_close {
                        framed.keep_alive = true;
                    }
                    false
                }
                Field::Connection => {
                    // As the map's path reads it.
                    if saw_close || lists(value, "close") {
                        saw_close = true;
                        framed.keep_alive = false;
                    } else if !framed.keep_alive {
                        framed.keep_alive = lists(value, "keep-alive");
                    }
                    // A token that may name a field to drop (`close`
                    // too): the map's path drops it.
                    if names_more(value) {
                        return None;
                    }
                    false
                }
                Field::TransferEncoding => {
                    let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
                    framed.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                    false
                }
                Field::ContentLength => {
                    for v in value.split(|&b| b == b',') {
                        match (parse_length(v.trim_ascii()), framed.length) {
                            (Some(n), None) => framed.length = Some(n),
                            (Some(n), Some(m)) if n == m => {}
                            _ => framed.bad_length = true,
                        }
                    }
                    false
                }
                Field::Dropped => false,
                Field::Date => {
                    fields.has_date = true;
                    true
                }
                Field::Other => true,
            };
            run = match (keep, run) {
                // The next line, right after the run's last one.
                (true, Some((start, end)))
                    if head.get(end..place.name.start) == Some(&b"\r\n"[..]) =>
                {
                    Some((start, place.value.end))
                }
                (true, open) => {
                    if let Some(done) = open {
                        fields.push(done)?;
                    }
                    Some((place.name.start, place.value.end))
                }
                (false, open) => {
                    if let Some(done) = open {
                        fields.push(done)?;
                    }
                    None
                }
            };
        }
        if let Some(done) = run {
            fields.push(done)?;
        }
        Some((fields, framed))
    }

    fn push(&mut self, (start, end): (usize, usize)) -> Option<()> {
        let slot = self.runs.get_mut(self.len)?;
        *slot = (u32::try_from(start).ok()?, u32::try_from(end).ok()?);
        self.len += 1;
        Some(())
    }

    /// Writes the fields, each line ending in CRLF.
    pub fn write(&self, out: &mut Vec<u8>) {
        for &(start, end) in &self.runs[..self.len] {
            out.extend_from_slice(&self.head[start as usize..end as usize]);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The fields as a map's entries, for a response that goes on through
    /// a map (to an HTTP/2 client).
    pub fn append_to(&self, map: &mut HeaderMap) {
        for &(start, end) in &self.runs[..self.len] {
            for line in self.head[start as usize..end as usize].split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    continue;
                };
                let value = line[colon + 1..].trim_ascii();
                let value_at = value.as_ptr() as usize - self.head.as_ptr() as usize;
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(&line[..colon]),
                    HeaderValue::from_maybe_shared(
                        self.head.slice(value_at..value_at + value.len()),
                    ),
                ) {
                    map.append(name, value);
                }
            }
        }
    }
}

/// Where a body being read stands: a response's from an upstream, or a
/// request's from a client (`server.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decoder {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the target closes.
    Eof,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk: this many bytes to go.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

/// A response body read from its connection by whoever polls it.
pub struct ResponseBody<T> {
    conn: Option<Conn<T>>,
    decoder: Decoder,
    reusable: bool,
}

impl<T: Read + Write + Unpin> ResponseBody<T> {
    /// The connection, once the body has ended and if it can carry
    /// another request (taken: a second call gives none).
    pub fn reusable(&mut self) -> Option<Conn<T>> {
        if self.decoder != Decoder::Done || !self.reusable {
            return None;
        }
        let conn = self.conn.take()?;
        // Bytes after the response that no request asked for: the target
        // is confused, and its next answer could not be trusted.
        conn.buf.is_empty().then_some(conn)
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        self.decoder = Decoder::Done;
        Poll::Ready(Some(Err(error)))
    }
}

/// How much room the next read of a body asks for.
pub(super) fn read_size(decoder: Decoder) -> usize {
    match decoder {
        Decoder::Length(left) | Decoder::Chunked(Chunk::Data(left)) => {
            usize::try_from(left).map_or(BODY_READ_MAX, |l| l.clamp(READ_SIZE, BODY_READ_MAX))
        }
        _ => READ_SIZE,
    }
}

impl<T: Read + Write + Unpin> Body for ResponseBody<T> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match decode(&mut this.decoder, &mut conn.buf) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if this.decoder == Decoder::Done => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => return this.fail(e),
            }
            let want = read_size(this.decoder);
            match conn.poll_fill(cx, want) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if this.decoder == Decoder::Eof {
                        this.decoder = Decoder::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    return this.fail(Error::Closed);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// The next frame of a body from what is buffered, if it makes one.
pub(super) fn decode(
    decoder: &mut Decoder,
    buf: &mut BytesMut,
) -> Result<Option<Frame<Bytes>>, Error> {
    loop {
        match decoder {
            Decoder::Done => return Ok(None),
            Decoder::Length(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    *decoder = Decoder::Done;
                }
                return Ok(Some(Frame::data(buf.split_to(n).freeze())));
            }
            Decoder::Eof => {
                if buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Frame::data(buf.split().freeze())));
            }
            Decoder::Chunked(chunk) => match *chunk {
                Chunk::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = buf.split_to(used);
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(Error::Invalid("chunk-size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err(Error::Invalid("invalid chunk size")),
                },
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    *chunk = if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    };
                    return Ok(Some(Frame::data(buf.split_to(n).freeze())));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Invalid("chunk data not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    *chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        let _ = buf.split_to(2);
                        *decoder = Decoder::Done;
                        return Ok(None);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields.iter() {
                                if let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(field.name.as_bytes()),
                                    HeaderValue::from_bytes(field.value),
                                ) {
                                    trailers.append(name, value);
                                }
                            }
                            let _ = buf.split_to(used);
                            *decoder = Decoder::Done;
                            return Ok(Some(Frame::trailers(trailers)));
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                            return Err(Error::Invalid("trailer section too large"));
                        }
                        Ok(httparse::Status::Partial) => return Ok(None),
                        Err(_) => return Err(Error::Invalid("malformed trailers")),
                    }
                }
            },
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http::Request;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    type Io = TokioIo<DuplexStream>;

    fn pair() -> (Conn<Io>, DuplexStream) {
        let (ours, theirs) = duplex(1 << 20);
        (Conn::new(TokioIo::new(ours)), theirs)
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("a valid request").into_parts().0
    }

    fn empty() -> ProxyBody {
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed()
    }

    fn full(data: &'static [u8]) -> ProxyBody {
        Full::new(Bytes::from_static(data))
            .map_err(|never| match never {})
            .boxed()
    }

    /// A body that does not know its length: `chunks`, then, unless
    /// `endless`, its end.
    struct Chunks {
        chunks: std::collections::VecDeque<&'static [u8]>,
        endless: bool,
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.chunks.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(chunk))))),
                None if self.endless => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    /// A body of `chunks` that does not know its length.
    pub(in crate::proxy) fn streamed(chunks: &[&'static [u8]]) -> ProxyBody {
        Chunks {
            chunks: chunks.iter().copied().collect(),
            endless: false,
        }
        .boxed()
    }

    /// Reads from the target's side until `end` has arrived.
    async fn read_until(theirs: &mut DuplexStream, end: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(end) {
            let n = theirs.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed early; got {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    async fn collect(body: &mut ResponseBody<Io>) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok((data, trailers))
    }

    #[tokio::test]
    async fn a_request_without_a_body_and_a_response_of_known_length() {
        let (conn, mut theirs) = pair();
        let head = parts("GET", "/a?b=1", &[("host", "up.test"), ("x-one", "1")]);
        let target = tokio::spawn(async move {
            let request = read_until(&mut theirs, b"\r\n\r\n").await;
            theirs
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: yes\r\n\r\nhello")
                .await
                .expect("write");
            (request, theirs)
        });
        let mut response = conn
            .send(&head, None, b"", empty(), false)
            .await
            .map(|(response, _)| response)
            .expect("a response");
        let (request, _theirs) = target.await.expect("target");
        assert_eq!(
            String::from_utf8_lossy(&request),
            "GET /a?b=1 HTTP/1.1\r\nhost: up.test\r\nx-one: 1\r\n\r\n"
        );
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-up"], "yes");
        // Room for what the proxy adds to the next request (hyper reuses
        // the map).
        let headers = response.headers();
        assert!(headers.capacity() >= headers.len() + FORWARDING_FIELDS);
        assert_eq!(response.body().size_hint().exact(), Some(5));
        let (data, _) = collect(response.body_mut()).await.expect("a body");
        assert_eq!(data, b"hello");
        assert!(response.body_mut().reusable().is_some());
    }

    #[test]
    fn hop_by_hop_fields_are_read_and_not_kept() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n\
               X-Secret: 1\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nUpgrade: h2c\r\n\
               Proxy-Connection: close\r\nX-Kept: yes\r\nConnection: x-other\r\nX-Other: 2\r\n\r\n"
                [..],
        );
        let Ok(Parsed::Head((response, decoder, keep_alive, _))) =
            parse_head(&mut buf, false, false)
        else {
            panic!("a head");
        };
        let names: Vec<&str> = response.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        // What the dropped fields said still frames the body and the
        // connection.
        assert_eq!(decoder, Decoder::Chunked(Chunk::Size));
        assert!(keep_alive);
        assert!(names_more(b"close") && !names_more(b" Keep-Alive ,"));
        // A field named by `Connection: close` goes too, as
        // `forward::strip_hop_by_hop` drops it from hyper's responses.
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: 1\r\n\r\n"[..]);
        let Ok(Parsed::Head((response, _, keep_alive, _))) = parse_head(&mut buf, false, false)
        else {
            panic!("a head");
        };
        assert!(response.headers().is_empty());
        assert!(!keep_alive);
    }

    fn raw(text: &[u8], head_only: bool) -> Head {
        let mut buf = BytesMut::from(text);
        match parse_head(&mut buf, head_only, true) {
            Ok(Parsed::Head(head)) => head,
            _ => panic!("a head"),
        }
    }

    #[test]
    fn fields_to_pass_on_stay_in_the_head() {
        let (response, decoder, keep_alive, fields) = raw(
            b"HTTP/1.1 200 OK\r\nServer: up\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\
              Content-Length: 5\r\nKeep-Alive: timeout=5\r\nX-Request-Id: theirs\r\n\
              Content-Type: text/plain\r\nX-Two:  spaced\r\n\r\nhello",
            false,
        );
        assert!(response.headers().is_empty(), "a map was built");
        let fields = fields.expect("raw fields");
        assert!(fields.has_date);
        let mut out = Vec::new();
        fields.write(&mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "Server: up\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\
             Content-Type: text/plain\r\nX-Two:  spaced\r\n"
        );
        assert_eq!(decoder, Decoder::Length(5));
        assert!(keep_alive);
        // For an HTTP/2 client they join a map.
        let mut map = HeaderMap::new();
        fields.append_to(&mut map);
        let pairs: Vec<(&str, &[u8])> = map
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("server", &b"up"[..]),
                ("date", b"Tue, 01 Dec 2026 00:00:00 GMT"),
                ("content-type", b"text/plain"),
                ("x-two", b"spaced"),
            ]
        );
    }

    #[test]
    fn the_raw_path_reads_framing_as_the_map_path_does() {
        for (name, field) in [
            ("TE", "dropped"),
            ("dAtE", "date"),
            ("Trailer", "dropped"),
            ("UPGRADE", "dropped"),
            ("Connection", "connection"),
            ("Keep-Alive", "dropped"),
            ("X-Request-ID", "dropped"),
            ("content-LENGTH", "length"),
            ("Proxy-Connection", "dropped"),
            ("Transfer-Encoding", "te"),
            ("Proxy-Authorization", "dropped"),
            ("Data", "other"),
            ("Connectiom", "other"),
            ("Content-Type", "other"),
            ("Tf", "other"),
            ("", "other"),
        ] {
            let got = match classify(name.as_bytes()) {
                Field::Connection => "connection",
                Field::TransferEncoding => "te",
                Field::ContentLength => "length",
                Field::Dropped => "dropped",
                Field::Date => "date",
                Field::Other => "other",
            };
            assert_eq!(got, field, "{name:?}");
        }
        let heads: [&[u8]; 8] = [
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: keep-alive\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
        ];
        for text in heads {
            let (_, raw_decoder, raw_keep, fields) = raw(text, false);
            let mut buf = BytesMut::from(text);
            let Ok(Parsed::Head((_, decoder, keep_alive, _))) = parse_head(&mut buf, false, false)
            else {
                panic!("a head");
            };
            let text = String::from_utf8_lossy(text);
            assert!(fields.is_some(), "{text}");
            assert_eq!((raw_decoder, raw_keep), (decoder, keep_alive), "{text}");
        }
    }

    #[test]
    fn heads_the_raw_path_cannot_carry_go_through_a_map() {
        let through_map = |text: &[u8], head_only: bool| {
            let (response, _, _, fields) = raw(text, head_only);
            assert!(fields.is_none(), "{}", String::from_utf8_lossy(text));
            response
        };
        // A field named by `Connection` (or `close`) is dropped by the map.
        let r = through_map(
            b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
            false,
        );
        assert_eq!(r.headers().len(), 1);
        through_map(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-B: 2\r\n\r\n",
            false,
        );
        // HEAD and 304 keep a Content-Length for a body they do not carry.
        let r = through_map(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
        assert_eq!(r.headers()["content-length"], "9");
        through_map(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        // More runs than it holds.
        let mut text = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_RUNS {
            text.extend_from_slice(format!("X-{i}: {i}\r\nKeep-Alive: 1\r\n").as_bytes());
        }
        text.extend_from_slice(b"\r\n");
        let r = through_map(&text, false);
        assert_eq!(r.headers().len(), MAX_RUNS + 1);
        // Lines ending in a bare LF are runs of their own, written with CRLF.
        let (.., fields) = raw(b"HTTP/1.1 200 OK\nX-A: 1\nX-B: 2\n\n", false);
        let mut out = Vec::new();
        fields.expect("raw").write(&mut out);
        assert_eq!(out, b"X-A: 1\r\nX-B: 2\r\n");
    }

    #[test]
    fn an_absolute_target_goes_out_in_origin_form_with_the_host_given() {
        let head = parts("GET", "http://10.0.0.1:8080/a?b=1", &[("x-one", "1")]);
        let mut out = Vec::new();
        let host = HeaderValue::from_static("10.0.0.1:8080");
        let framing = encode_head(&mut out, &head, Some(&host), b"", &empty());
        assert_eq!(framing, Framing::Empty);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET /a?b=1 HTTP/1.1\r\nhost: 10.0.0.1:8080\r\nx-one: 1\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn bodies_go_out_with_their_length_or_chunked() {
        // Known length: Content-Length, whatever the client's header said.
        let (conn, mut theirs) = pair();
        let head = parts("POST", "/", &[("content-length", "99")]);
        let target = tokio::spawn(async move {
            let request = read_until(&mut theirs, b"abc").await;
            theirs
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("write");
            (request, theirs)
        });
        let mut response = conn
            .send(&head, None, b"", full(b"abc"), false)
            .await
            .map(|(response, _)| response)
            .expect("a response");
        let (request, _theirs) = target.await.expect("target");
        assert_eq!(
            String::from_utf8_lossy(&request),
            "POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"
        );
        assert!(response.body().is_end_stream());
        assert!(response.body_mut().reusable().is_some());

        // Unknown length: chunked, ended by the last chunk.
        let (conn, mut theirs) = pair();
        let head = parts("PUT", "/up", &[("transfer-encoding", "chunked")]);
        let target = tokio::spawn(async move {
            let request = read_until(&mut theirs, b"0\r\n\r\n").await;
            theirs
                .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                .await
                .expect("write");
            (request, theirs)
        });
        let big: &'static [u8] = Box::leak(vec![b'x'; COPY_BELOW + 1].into_boxed_slice());
        let response = conn
            .send(&head, None, b"", streamed(&[b"hello", b"", big]), false)
            .await
            .map(|(response, _)| response)
            .expect("a response");
        let (request, _theirs) = target.await.expect("target");
        let expected = format!(
            "PUT /up HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            big.len(),
            String::from_utf8_lossy(big)
        );
        assert_eq!(String::from_utf8_lossy(&request), expected);
        assert_eq!(response.status(), StatusCode::CREATED);
    }

    #[tokio::test]
    async fn chunked_responses_with_extensions_and_trailers() {
        let (conn, mut theirs) = pair();
        let target = tokio::spawn(async move {
            read_until(&mut theirs, b"\r\n\r\n").await;
            // Interim responses are skipped; the chunks arrive in pieces.
            for piece in [
                &b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"[..],
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4;ext=1\r\nab",
                b"cd\r\n3\r\nefg\r\n0\r\nX-Sum: 7\r\n\r\n",
            ] {
                theirs.write_all(piece).await.expect("write");
                tokio::task::yield_now().await;
            }
            theirs
        });
        let mut response = conn
            .send(&parts("GET", "/", &[]), None, b"", empty(), false)
            .await
            .map(|(response, _)| response)
            .expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
        let (data, trailers) = collect(response.body_mut()).await.expect("a body");
        assert_eq!(data, b"abcdefg");
        assert_eq!(trailers.expect("trailers")["x-sum"], "7");
        assert!(response.body_mut().reusable().is_some());
        drop(target.await);
    }

    #[tokio::test]
    async fn what_ends_a_body_and_what_keeps_the_connection() {
        async fn exchange(method: &str, answer: &'static [u8], close: bool) -> (Vec<u8>, bool) {
            let (conn, mut theirs) = pair();
            let target = tokio::spawn(async move {
                read_until(&mut theirs, b"\r\n\r\n").await;
                theirs.write_all(answer).await.expect("write");
                if close {
                    drop(theirs);
                    return None;
                }
                Some(theirs)
            });
            let mut response = conn
                .send(&parts(method, "/", &[]), None, b"", empty(), false)
                .await
                .map(|(response, _)| response)
                .expect("a response");
            let (data, _) = collect(response.body_mut()).await.expect("a body");
            let _theirs = target.await.expect("target");
            (data, response.body_mut().reusable().is_some())
        }
        /// The method, the answer, whether the target closes after it, the
        /// body, whether the connection is reused.
        type Case = (&'static str, &'static [u8], bool, &'static [u8], bool);
        let cases: [Case; 8] = [
            // HEAD: no body, whatever the length says.
            (
                "HEAD",
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                false,
                b"",
                true,
            ),
            // Neither length nor chunked: the body ends with the connection.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
                true,
                b"until the end",
                false,
            ),
            // A coding other than chunked last: the same.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nzz",
                true,
                b"zz",
                false,
            ),
            // Connection: close, and HTTP/1.0 without keep-alive.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nc",
                false,
                b"c",
                false,
            ),
            (
                "GET",
                b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\no",
                false,
                b"o",
                false,
            ),
            (
                "GET",
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nk",
                false,
                b"k",
                true,
            ),
            // Equal repeated lengths are one length.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok",
                false,
                b"ok",
                true,
            ),
            // Bytes past the response: the target cannot be trusted again.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n",
                false,
                b"x",
                false,
            ),
        ];
        for (method, answer, close, body, reused) in cases {
            assert_eq!(
                exchange(method, answer, close).await,
                (body.to_vec(), reused),
                "{method} {:?}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn invalid_responses_are_errors() {
        async fn failure(answer: &'static [u8]) -> Error {
            let (conn, mut theirs) = pair();
            let target = tokio::spawn(async move {
                read_until(&mut theirs, b"\r\n\r\n").await;
                theirs.write_all(answer).await.expect("write");
                drop(theirs);
            });
            let result = match conn
                .send(&parts("GET", "/", &[]), None, b"", empty(), false)
                .await
                .map(|(response, _)| response)
            {
                Ok(mut response) => collect(response.body_mut()).await.err(),
                Err(failed) => {
                    assert!(failed.sent, "the request went out");
                    Some(failed.error)
                }
            };
            target.await.expect("target");
            result.expect("an error")
        }
        let cases: [(&[u8], &str); 8] = [
            (b"", "closed"),
            (b"HTTP/1.1 200 OK\r\nContent-Le", "closed"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", "closed"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "invalid chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
                "not followed by CRLF",
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
        ];
        for (answer, expected) in cases {
            let error = failure(answer).await.to_string();
            assert!(
                error.contains(expected),
                "{:?}: {error}",
                String::from_utf8_lossy(answer)
            );
        }
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let huge: &'static [u8] = Box::leak(huge.into_bytes().into_boxed_slice());
        assert!(failure(huge).await.to_string().contains("too large"));
    }

    #[tokio::test]
    async fn an_early_answer_stops_the_body_and_the_connection() {
        let (conn, mut theirs) = pair();
        let body = Chunks {
            chunks: [&b"part"[..]].into(),
            endless: true,
        }
        .boxed();
        let target = tokio::spawn(async move {
            read_until(&mut theirs, b"part\r\n").await;
            theirs
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
                .await
                .expect("write");
            theirs
        });
        // The body never ends: the answer comes anyway.
        let mut response = conn
            .send(&parts("POST", "/", &[]), None, b"", body, false)
            .await
            .map(|(response, _)| response)
            .expect("a response");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            response.body_mut().reusable().is_none(),
            "the target still expects the rest"
        );
        drop(target.await);
    }

    #[tokio::test]
    async fn a_body_that_breaks_its_length_fails() {
        let (conn, _theirs) = pair();
        let mut head = parts("POST", "/", &[("content-length", "2")]);
        head.headers
            .insert(CONTENT_LENGTH, HeaderValue::from_static("2"));
        let failed = conn
            .send(&head, None, b"", streamed(&[b"abc"]), false)
            .await
            .map(|(response, _)| response)
            .err()
            .expect("an error");
        assert!(
            failed.error.to_string().contains("longer"),
            "{}",
            failed.error
        );
    }

    #[tokio::test]
    async fn idle_connections_notice_the_close() {
        let (mut conn, theirs) = pair();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(conn.poll_idle(&mut cx));
        drop(theirs);
        assert!(!conn.poll_idle(&mut cx));
    }
}
