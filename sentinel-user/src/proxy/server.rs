//! HTTP/1.1 from clients: one session on one connection, reading request
//! heads, handing each request to the handler, and writing its response,
//! request by request; HTTP/2 stays with hyper (`listener.rs`).
//!
//! hyper's server reaches the request handler through its dispatcher, a
//! channel for the request body and its own timers, and cannot hold a
//! head to fewer than 8 KiB or tell a proxy about framing it tolerates:
//! the listener used to follow the byte stream a second time for that
//! (Content-Length with Transfer-Encoding). Here the head is parsed once
//! with httparse, framing conflicts are found in that parse, and the
//! connection's clocks (head, keep-alive, park) are one timer of the
//! session's own.
//!
//! The handler's future is polled by the session, in its task, as hyper
//! polled its service: a request body is decoded from the connection's
//! buffer when the handler asks for it (see [`RequestBody`]), and the
//! response is written with [`h1::Writer`], the upstream side's writer.
//! Framing follows RFC 9112: a request body is as long as its
//! `Content-Length`, or chunked; a response carries `Content-Length` when
//! its length is known, is chunked otherwise, and to an HTTP/1.0 client is
//! delimited by the connection's close.

use std::{
    cell::RefCell,
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker, ready},
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE},
};
use http_body::{Body, Frame, SizeHint};
use hyper::rt::{Read as _, ReadBuf, Write as _};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{oneshot, watch},
    time::{Instant, Sleep},
};
use tracing::debug;

use super::{
    ProxyBody, ProxyError, Shared,
    body::BoxError,
    h1::{self, Chunk, Decoder, Framing, RawFields, Writer},
    handler::{self, Answer},
    listener::{Activity, ConnInfo, RequestGuard},
};

/// What a read asks room for.
const READ_SIZE: usize = 8 * 1024;
/// A read into less spare room than this first makes more: the spare room
/// after a request head belongs to the buffer the head's values share, and
/// asking for a full `READ_SIZE` then would allocate a new one.
const MIN_READ: usize = 1024;
/// How long a connection stays idle, its last response written and
/// nothing more received, before the session ends and gives back its
/// buffers (the connection parks, see `listener.rs`). Ending a session
/// and starting one cost about 15,000 instructions (callgrind): a client
/// that sends its next request within this time never pays it.
const PARK_AFTER: Duration = Duration::from_millis(20);
/// How long a request is handled before its session reads from the
/// client's connection again, to notice the client leaving: most requests
/// are answered sooner and never pay for the read.
const WATCH_AFTER: Duration = Duration::from_millis(50);
/// While a request is handled, the session reads at most this much of what
/// the client sends next (pipelined requests) before it stops reading.
const READ_AHEAD: usize = 64 * 1024;
/// Closing a connection whose client may still be sending (a body refused
/// before it was read), the session reads and drops what comes for this
/// long first, so that its answer is not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);
/// ... and at most this much.
const LINGER_BYTES: usize = 1024 * 1024;
/// How long closing writes its last bytes (a TLS close_notify, say).
const CLOSE_WRITE: Duration = Duration::from_secs(1);
/// The header fields the proxy may add to a request's map (`Host` and
/// `X-Request-Id`), room for which spares the map a rehash.
const ADDED_FIELDS: usize = 2;
/// What starts an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the session found in a request head that the handler must refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// A framing conflict a proxy must not resolve for the next hop
    /// (request smuggling): the reason, for the log.
    Smuggling(&'static str),
    /// The head is longer than `limits.max-header-bytes`.
    HeadTooLarge,
}

/// A connection's settings, read once when its session starts.
#[derive(Clone, Copy)]
pub(super) struct Settings {
    pub max_head: usize,
    pub max_headers: usize,
    pub header_read: Duration,
    pub keepalive: Duration,
    /// Whether the first bytes may be HTTP/2's preface.
    pub detect_h2: bool,
}

/// How a session ended.
pub(super) enum Ended<I> {
    /// The connection is closed, or was handed on (an upgrade).
    Closed,
    /// Idle for [`PARK_AFTER`] with nothing read and nothing owed: the
    /// stream, to wait for the client's next bytes without a session;
    /// `served` when it served a request.
    Idle { io: I, served: bool },
    /// The client spoke HTTP/2: the stream, and what was read of it.
    Http2 { io: I, read: Bytes },
}

/// Serves HTTP/1.1 requests on `io` until the connection closes or idles.
pub(super) async fn serve<I>(
    io: I,
    settings: Settings,
    info: &Arc<ConnInfo>,
    shared: &Arc<Shared>,
    activity: &Arc<Activity>,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn {
        io: TokioIo::new(io),
        buf: BytesMut::new(),
        out: Vec::new(),
        head_started: None,
    };
    let mut draining = shared.draining.clone();
    let mut peek = shared.draining.clone();
    let done = *draining.borrow_and_update();
    // Seen: `has_changed` tells of what comes after this moment.
    peek.mark_unchanged();
    let mut drain = Drain {
        done,
        registered: false,
        changed: std::pin::pin!(draining.changed()),
        peek,
    };
    // One timer for the session, set to the next moment a clock could
    // expire.
    let mut wake = Timer {
        sleep: std::pin::pin!(tokio::time::sleep(settings.keepalive)),
        armed: false,
    };
    let mut served = false;
    let mut idle_since = Instant::now();
    loop {
        let head = std::future::poll_fn(|cx| {
            conn.poll_next(
                cx,
                &settings,
                !served && settings.detect_h2,
                idle_since,
                &mut wake,
                &mut drain,
            )
        })
        .await;
        let head = match head {
            Next::Head(head) => head,
            Next::Idle => {
                return Ended::Idle {
                    io: conn.io.into_inner(),
                    served,
                };
            }
            Next::Http2 => {
                return Ended::Http2 {
                    io: conn.io.into_inner(),
                    read: conn.buf.freeze(),
                };
            }
            Next::Close => {
                conn.close(false).await;
                return Ended::Closed;
            }
            Next::Drop => return Ended::Closed,
            Next::Refuse(error) => {
                let response = error.response();
                let mut writer = conn.start_response(response, None, &Reply::refusal(), true);
                let written = std::future::poll_fn(|cx| writer.poll_write(cx, &mut conn.io)).await;
                if written.is_ok() {
                    conn.close(true).await;
                }
                return Ended::Closed;
            }
        };
        served = true;
        let started = Instant::now();
        let Head {
            request,
            body,
            reply,
            verdict,
        } = head;
        let mut reading = None;
        let body = match body {
            Decoder::Done => ClientBody::Empty,
            decoder => {
                let slot = Arc::new(Slot::default());
                reading = Some(Reading {
                    slot: slot.clone(),
                    decoder,
                    interim: reply.expect_continue.then_some(0),
                    registered: false,
                });
                ClientBody::H1(RequestBody {
                    slot,
                    left: match decoder {
                        Decoder::Length(n) => Some(n),
                        _ => None,
                    },
                })
            }
        };
        let mut request = request.map(|()| body);
        let upgrade = reply.upgrade.then(|| {
            let (tx, rx) = oneshot::channel();
            request.extensions_mut().insert(OnUpgrade::new(rx));
            tx
        });
        let handling = handler::handle(
            request,
            verdict,
            info.clone(),
            shared.clone(),
            activity.clone(),
        );
        let mut handling = std::pin::pin!(handling);
        let mut exchange = Exchange {
            stage: Stage::Handling,
            reading,
            reply,
            started,
            watching: false,
            close: verdict != Verdict::Clean,
            upgraded: false,
            guard: None,
        };
        let finished = std::future::poll_fn(|cx| {
            exchange.poll(cx, &mut conn, handling.as_mut(), &mut wake, &mut drain)
        })
        .await;
        match finished {
            Finished::KeepAlive => idle_since = Instant::now(),
            Finished::Close { linger } => {
                conn.close(linger).await;
                return Ended::Closed;
            }
            Finished::Abort => return Ended::Closed,
            Finished::Upgraded => {
                if let Some(tx) = upgrade {
                    let read = conn.buf.split().freeze();
                    let io = conn.io.into_inner();
                    let _ = tx.send(Upgraded::new(read, io));
                }
                return Ended::Closed;
            }
        }
    }
}

/// The daemon's drain, as one session sees it.
///
/// Polling the drain's `changed` future takes its notifier's lock (about
/// 350 instructions, callgrind); it is polled once, which registers the
/// session's task to be woken, and after that a look at the version says
/// whether it came. A session runs in one task, whose waker does not change.
struct Drain<'a, F> {
    done: bool,
    /// `changed` was polled and is pending.
    registered: bool,
    changed: Pin<&'a mut F>,
    /// The same channel, to look at without polling.
    peek: watch::Receiver<bool>,
}

impl<F: Future> Drain<'_, F> {
    /// Whether the daemon drains; registers `cx` for the change until it
    /// does.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if self.done {
            return true;
        }
        if self.registered {
            match self.peek.has_changed() {
                Ok(false) => {}
                Ok(true) => self.done = *self.peek.borrow_and_update(),
                Err(_) => self.done = true,
            }
        } else if self.changed.as_mut().poll(cx).is_ready() {
            self.done = true;
        } else {
            self.registered = true;
        }
        self.done
    }
}

/// The session's one timer, set to the next moment a clock could expire.
///
/// Moving it later is an atomic update; only moving it earlier registers it
/// with the timer wheel again. Once polled and pending, the session's task
/// is registered to be woken when it fires, and a look at its state says
/// whether it has (polling it again costs about 150 instructions).
struct Timer<'a> {
    sleep: Pin<&'a mut Sleep>,
    /// Polled and pending since it was last set.
    armed: bool,
}

impl Timer<'_> {
    /// Sets the timer to `at` if it is set later.
    fn not_after(&mut self, at: Instant) {
        if at < self.sleep.deadline() {
            self.set(at);
        }
    }

    fn set(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.armed = false;
    }

    /// Whether the timer has fired; registers `cx` until it does.
    fn fired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.armed && !self.sleep.is_elapsed() {
            return false;
        }
        let fired = self.sleep.as_mut().poll(cx).is_ready();
        self.armed = !fired;
        fired
    }
}

/// The client connection: its stream, what was read of it and not yet
/// parsed, and the buffer response heads are assembled in.
struct Conn<I> {
    io: TokioIo<I>,
    buf: BytesMut,
    out: Vec<u8>,
    /// When the first bytes of a head still incomplete were seen: its
    /// clock runs from then.
    head_started: Option<Instant>,
}

/// What the session does next, between requests.
// Returned once per request, by value: boxing the head would cost an
// allocation a request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    /// Idle long enough to park.
    Idle,
    /// The first bytes are HTTP/2's.
    Http2,
    /// Close without a response: the client closed, the keep-alive
    /// expired, the daemon drains.
    Close,
    /// Drop the connection at once: the head did not come in time, or the
    /// stream failed.
    Drop,
    /// Refuse a head that cannot be read, and close.
    Refuse(ProxyError),
}

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    /// Reads what the stream has into the buffer; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_READ.min(want) {
            self.buf.reserve(want);
        }
        let mut read = ReadBuf::uninit(self.buf.spare_capacity_mut());
        ready!(Pin::new(&mut self.io).poll_read(cx, read.unfilled()))?;
        let n = read.filled().len();
        // SAFETY: the reader initialised the first `n` spare bytes.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Poll::Ready(Ok(n))
    }

    /// Waits for the next request head under the connection's clocks.
    fn poll_next<F: Future>(
        &mut self,
        cx: &mut Context<'_>,
        settings: &Settings,
        detect_h2: bool,
        idle_since: Instant,
        wake: &mut Timer<'_>,
        drain: &mut Drain<'_, F>,
    ) -> Poll<Next> {
        loop {
            if !self.buf.is_empty() {
                let waits_for_preface = detect_h2 && {
                    let n = self.buf.len().min(PREFACE.len());
                    self.buf[..n] == PREFACE[..n]
                };
                if waits_for_preface {
                    if self.buf.len() >= PREFACE.len() {
                        return Poll::Ready(Next::Http2);
                    }
                } else if let Some(next) = self.parse(settings) {
                    return Poll::Ready(next);
                }
                if self.head_started.is_none() {
                    let now = Instant::now();
                    self.head_started = Some(now);
                    wake.not_after(now + settings.header_read);
                }
            }
            match self.poll_fill(cx, READ_SIZE) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Next::Close),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(error)) => {
                    debug!(%error, "client connection failed");
                    return Poll::Ready(Next::Drop);
                }
                Poll::Pending => {}
            }
            let deadline = match self.head_started {
                Some(at) => at + settings.header_read,
                None => {
                    if drain.poll(cx) {
                        return Poll::Ready(Next::Close);
                    }
                    (idle_since + PARK_AFTER).min(idle_since + settings.keepalive)
                }
            };
            wake.not_after(deadline);
            if !wake.fired(cx) {
                return Poll::Pending;
            }
            let now = Instant::now();
            if now < deadline {
                // Set for an earlier clock; moving it later is cheap.
                wake.set(deadline);
                continue;
            }
            return Poll::Ready(match self.head_started {
                Some(_) => {
                    debug!("request head not received in time; connection dropped");
                    Next::Drop
                }
                None if now >= idle_since + settings.keepalive => Next::Close,
                None => Next::Idle,
            });
        }
    }

    /// Parses the head at the start of the buffer: `None` while it is
    /// incomplete and within the limit.
    fn parse(&mut self, settings: &Settings) -> Option<Next> {
        let parsed = parse_head(&mut self.buf, settings);
        if !matches!(parsed, Ok(None)) {
            self.head_started = None;
        }
        match parsed {
            Ok(Some(head)) => Some(Next::Head(head)),
            Ok(None) if self.buf.len() > settings.max_head => {
                Some(Next::Refuse(ProxyError::HeadTooLarge {
                    limit: settings.max_head,
                }))
            }
            Ok(None) => None,
            Err(error) => Some(Next::Refuse(error)),
        }
    }

    /// Starts a response: its head into the head buffer (the upstream's
    /// `fields` first, when they stayed in its head), framed for the
    /// request it answers. `close` when the connection closes after it.
    fn start_response(
        &mut self,
        response: Response<ProxyBody>,
        fields: Option<RawFields>,
        reply: &Reply,
        close: bool,
    ) -> Writer {
        let (parts, body) = response.into_parts();
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let status = parts.status;
        out.extend_from_slice(if reply.version == Version::HTTP_10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
            Some(reason) => out.extend_from_slice(reason.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
        let mut declared = None;
        let mut wrote_connection = false;
        let mut dated = false;
        let bodiless = reply.head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        if let Some(fields) = &fields {
            fields.write(&mut out);
            dated = fields.has_date;
        }
        for (name, value) in &parts.headers {
            if name == CONTENT_LENGTH && !bodiless {
                declared = declared.or_else(|| h1::parse_length(value.as_bytes()));
                continue;
            }
            if name == TRANSFER_ENCODING {
                continue;
            }
            if name == CONTENT_LENGTH && status == StatusCode::NO_CONTENT {
                continue;
            }
            if name == CONNECTION {
                if close {
                    // Said once, below.
                    continue;
                }
                wrote_connection = true;
            }
            dated |= name == DATE;
            put_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
        if !dated {
            DATE_VALUE.with(|date| put_field(&mut out, b"date", date.borrow_mut().now()));
        }
        let framing = if bodiless {
            Framing::Empty
        } else if body.is_end_stream() {
            out.extend_from_slice(b"content-length: 0\r\n");
            Framing::Empty
        } else {
            match body.size_hint().exact().or(declared) {
                Some(n) => {
                    h1::put_length(&mut out, n);
                    Framing::Length(n)
                }
                None if reply.version == Version::HTTP_11 => {
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Framing::Chunked
                }
                None => Framing::Close,
            }
        };
        if close || framing == Framing::Close {
            if reply.version == Version::HTTP_11 || reply.keep_alive {
                out.extend_from_slice(b"connection: close\r\n");
            }
        } else if reply.version == Version::HTTP_10 && !wrote_connection {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Writer::new(out, body, framing)
    }

    /// Closes the connection: its last bytes flushed and its write side
    /// shut; with `linger`, what the client still sends is read and
    /// dropped for a while first, so that a reset does not destroy the
    /// answer it has not read yet.
    async fn close(&mut self, linger: bool) {
        let shut = std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx));
        if tokio::time::timeout(CLOSE_WRITE, shut).await.is_err() || !linger {
            return;
        }
        let mut dropped = 0;
        let drain = std::future::poll_fn(|cx| {
            loop {
                self.buf.clear();
                match ready!(self.poll_fill(cx, READ_SIZE)) {
                    Ok(n) if n > 0 && dropped < LINGER_BYTES => dropped += n,
                    _ => return Poll::Ready(()),
                }
            }
        });
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    static DATE_VALUE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { second: u64::MAX, text: [0; 29] })
    };
}

/// The `Date` value of the current second (RFC 9110 §6.6.1), for
/// responses that have none: formatted once a second per thread.
struct CachedDate {
    second: u64,
    text: [u8; 29],
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == self.text.len() {
                self.text.copy_from_slice(text.as_bytes());
                self.second = second;
            }
        }
        &self.text
    }
}

/// What a request head asks of its response and its connection.
struct Reply {
    version: Version,
    /// A HEAD request: the response has no body.
    head: bool,
    /// The client wants the connection kept open.
    keep_alive: bool,
    /// `Expect: 100-continue`: the client waits to be asked for its body.
    expect_continue: bool,
    /// The request asks to leave HTTP (`Upgrade`).
    upgrade: bool,
}

impl Reply {
    /// For a head that could not be read.
    fn refusal() -> Self {
        Self {
            version: Version::HTTP_11,
            head: false,
            keep_alive: false,
            expect_continue: false,
            upgrade: false,
        }
    }
}

/// A request head, parsed.
struct Head {
    request: Request<()>,
    /// How its body is framed (`Done`: it has none).
    body: Decoder,
    reply: Reply,
    verdict: Verdict,
}

/// Parses the request head at the start of `buf`, taking it out when it
/// is complete; `None` while it is not.
fn parse_head(buf: &mut BytesMut, settings: &Settings) -> Result<Option<Head>, ProxyError> {
    // Uninitialised: httparse writes the entries it returns, and zeroing
    // a hundred of them costs as much as a parse.
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut heap;
    let fields: &mut [MaybeUninit<httparse::Header<'_>>] = if settings.max_headers <= stack.len() {
        &mut stack[..settings.max_headers]
    } else {
        heap = Vec::with_capacity(settings.max_headers);
        heap.resize_with(settings.max_headers, MaybeUninit::uninit);
        &mut heap
    };
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ProxyError::HeadTooLarge {
                limit: settings.max_head,
            });
        }
        Err(error) => {
            return Err(ProxyError::BadRequest {
                reason: format!("malformed request head: {error}"),
            });
        }
    };
    let bad = |reason: &str| ProxyError::BadRequest {
        reason: reason.to_owned(),
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| bad("invalid method"))?;
    // Where the target and each field sit in the head, so that they can
    // share its bytes once it is frozen.
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let path = parsed.path.unwrap_or_default();
    let target = offset(path.as_bytes())..offset(path.as_bytes()) + path.len();
    let count = parsed.headers.len();
    let mut places = Vec::new();
    let mut stack_places = [const { MaybeUninit::<Place>::uninit() }; 128];
    let places: &mut [MaybeUninit<Place>] = if count <= stack_places.len() {
        &mut stack_places[..count]
    } else {
        places.resize_with(count, MaybeUninit::uninit);
        &mut places
    };
    for (place, field) in places.iter_mut().zip(parsed.headers.iter()) {
        let name = offset(field.name.as_bytes());
        let value = offset(field.value);
        place.write(Place {
            name: name..name + field.name.len(),
            value: value..value + field.value.len(),
        });
    }

    let head = buf.split_to(len).freeze();
    let uri =
        Uri::from_maybe_shared(head.slice(target)).map_err(|_| bad("invalid request target"))?;
    let mut map = HeaderMap::with_capacity(count + ADDED_FIELDS);
    let mut keep_alive = version == Version::HTTP_11;
    let mut close = false;
    let mut expect_continue = false;
    let mut upgrade = false;
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    let mut lengths_differ = false;
    let mut chunked: Option<bool> = None;
    for place in places.iter() {
        // SAFETY: the loop above wrote the first `count` places.
        let place = unsafe { place.assume_init_ref() };
        let name = HeaderName::from_bytes(&head[place.name.clone()])
            .map_err(|_| bad("invalid header name"))?;
        let value = &head[place.value.clone()];
        if name == CONTENT_LENGTH {
            for v in value.split(|&b| b == b',') {
                match (h1::parse_length(v.trim_ascii()), length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    (Some(_), Some(_)) => lengths_differ = true,
                    (None, _) => bad_length = true,
                }
            }
        } else if name == TRANSFER_ENCODING {
            // The last coding of the last field decides.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == CONNECTION {
            if h1::lists(value, "close") {
                close = true;
            } else if h1::lists(value, "keep-alive") {
                keep_alive = true;
            }
        } else if name == EXPECT {
            expect_continue =
                version == Version::HTTP_11 && value.eq_ignore_ascii_case(b"100-continue");
        } else if name == UPGRADE {
            upgrade = version == Version::HTTP_11;
        }
        // SAFETY: httparse let through only the bytes a field value may
        // hold (visible ASCII, spaces, tabs and obs-text), which are the
        // bytes `HeaderValue` allows.
        let value =
            unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(place.value.clone())) };
        map.append(name, value);
    }

    // Framing (RFC 9112 §6.3). A conflict a proxy must not resolve for the
    // next hop is a verdict: the handler refuses it with 400, counted and
    // logged like any request, and the connection closes.
    let verdict = if len > settings.max_head {
        Verdict::HeadTooLarge
    } else if length.is_some() && chunked.is_some() {
        Verdict::Smuggling("Content-Length together with Transfer-Encoding")
    } else if lengths_differ {
        Verdict::Smuggling("Content-Length given twice with different values")
    } else {
        Verdict::Clean
    };
    let body = match (chunked, length) {
        _ if verdict != Verdict::Clean => Decoder::Done,
        (Some(_), _) if version == Version::HTTP_10 => {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        (Some(true), _) => Decoder::Chunked(Chunk::Size),
        (Some(false), _) => return Err(bad("a request's Transfer-Encoding must end with chunked")),
        (None, _) if bad_length => return Err(bad("invalid Content-Length")),
        (None, Some(0) | None) => Decoder::Done,
        (None, Some(n)) => Decoder::Length(n),
    };
    if close {
        keep_alive = false;
    }
    if verdict == Verdict::Clean && method == Method::CONNECT {
        // Not a tunnel the proxy opens: answered, then closed.
        keep_alive = false;
    }
    if verdict != Verdict::Clean {
        keep_alive = false;
        upgrade = false;
    }
    let reply = Reply {
        version,
        head: method == Method::HEAD,
        keep_alive,
        expect_continue: expect_continue && body != Decoder::Done,
        upgrade,
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    Ok(Some(Head {
        request,
        body,
        reply,
        verdict,
    }))
}

/// Where a header field's name and value sit in the head.
struct Place {
    name: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

/// How one request's exchange ended.
enum Finished {
    /// The response is written and the connection carries on.
    KeepAlive,
    /// The response is written (or could not be) and the connection
    /// closes; `linger` while the client may still be sending.
    Close { linger: bool },
    /// The client left, or the stream failed: dropped at once.
    Abort,
    /// A 101 response is written: the stream goes to the tunnel.
    Upgraded,
}

enum Stage {
    /// The handler has not answered yet.
    Handling,
    /// The response is being written.
    Writing(Writer),
}

/// One request on the connection: its handler's future polled, its body
/// read as the handler asks for it, its response written.
struct Exchange {
    stage: Stage,
    reading: Option<Reading>,
    reply: Reply,
    started: Instant,
    /// Reading from the client to notice it leaving.
    watching: bool,
    /// The connection closes after this response.
    close: bool,
    /// The response is a 101 to an upgrade request.
    upgraded: bool,
    /// The request's place in the connection's activity, until its
    /// response is written.
    guard: Option<RequestGuard>,
}

impl Exchange {
    fn poll<I, H, F>(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut Conn<I>,
        mut handling: Pin<&mut H>,
        wake: &mut Timer<'_>,
        drain: &mut Drain<'_, F>,
    ) -> Poll<Finished>
    where
        I: AsyncRead + AsyncWrite + Unpin,
        H: Future<Output = Answer>,
        F: Future,
    {
        loop {
            if drain.poll(cx) {
                self.close = true;
            }
            match &mut self.stage {
                Stage::Handling => {
                    if let Poll::Ready(answer) = handling.as_mut().poll(cx) {
                        let Answer {
                            response,
                            fields,
                            guard,
                        } = answer;
                        // Released when the exchange ends, its response
                        // written (or given up).
                        self.guard = guard;
                        self.upgraded = self.reply.upgrade
                            && response.status() == StatusCode::SWITCHING_PROTOCOLS;
                        let unread =
                            !self.upgraded && self.reading.as_ref().is_some_and(|r| !r.ended());
                        let close = self.close
                            || !self.reply.keep_alive
                            || unread
                            || says_close(response.headers());
                        let writer = conn.start_response(
                            response,
                            fields,
                            &self.reply,
                            close && !self.upgraded,
                        );
                        self.close = close;
                        if self.upgraded {
                            // Whatever the client sends now is the tunnel's.
                            self.reading = None;
                        }
                        self.stage = Stage::Writing(writer);
                        continue;
                    }
                }
                Stage::Writing(writer) => match writer.poll_write(cx, &mut conn.io) {
                    Poll::Ready(Ok(())) => {
                        let Stage::Writing(writer) =
                            std::mem::replace(&mut self.stage, Stage::Handling)
                        else {
                            unreachable!("the stage was just matched")
                        };
                        conn.out = writer.into_buffer();
                        if self.upgraded {
                            return Poll::Ready(Finished::Upgraded);
                        }
                        let unread = self.reading.as_ref().is_some_and(|r| !r.ended());
                        if self.close || unread {
                            return Poll::Ready(Finished::Close { linger: unread });
                        }
                        return Poll::Ready(Finished::KeepAlive);
                    }
                    Poll::Ready(Err(error)) => {
                        debug!(%error, "response not written");
                        return Poll::Ready(Finished::Abort);
                    }
                    Poll::Pending => {}
                },
            }
            // The body, when the handler asked for more of it.
            if let Some(reading) = &mut self.reading {
                match reading.poll(cx, conn) {
                    Poll::Ready(Ok(true)) => continue,
                    Poll::Ready(Ok(false)) | Poll::Pending => {}
                    Poll::Ready(Err(())) => return Poll::Ready(Finished::Abort),
                }
                if !reading.ended() {
                    return Poll::Pending;
                }
            }
            // The request is read: watch for the client leaving once it
            // has taken a while.
            if !self.watching {
                let at = self.started + WATCH_AFTER;
                wake.not_after(at);
                if !wake.fired(cx) {
                    return Poll::Pending;
                }
                if Instant::now() < at {
                    wake.set(at);
                    continue;
                }
                self.watching = true;
            }
            if conn.buf.len() >= READ_AHEAD || self.upgraded {
                return Poll::Pending;
            }
            match conn.poll_fill(cx, READ_SIZE) {
                // What hyper did when it read the end mid-request: the
                // handling is dropped, its upstream exchange with it.
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    debug!("the client closed its connection mid-request");
                    return Poll::Ready(Finished::Abort);
                }
                // The next request, pipelined: kept for later.
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Whether a `Connection` field of `headers` says `close`.
fn says_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| h1::lists(v.as_bytes(), "close"))
}

/// The session's side of a request body: its framing, and the slot it
/// hands frames through.
struct Reading {
    slot: Arc<Slot>,
    decoder: Decoder,
    /// Bytes of `100 Continue` written, while one is owed.
    interim: Option<usize>,
    /// The session's waker is in the slot.
    registered: bool,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Reading {
    /// Whether the body has been read to its end.
    fn ended(&self) -> bool {
        self.decoder == Decoder::Done
    }

    /// Reads and hands over the next frame if the body asked for one:
    /// `Ok(true)` when one was handed to a body polled by this task,
    /// `Err` when the stream failed.
    fn poll<I: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut Conn<I>,
    ) -> Poll<Result<bool, ()>> {
        let mut slot = self.slot.lock();
        if !self.registered {
            slot.session = Some(cx.waker().clone());
            self.registered = true;
        }
        if slot.dropped || !slot.want || slot.frame.is_some() || self.ended() {
            return Poll::Ready(Ok(false));
        }
        if let Some(written) = &mut self.interim {
            while *written < CONTINUE.len() {
                match ready!(Pin::new(&mut conn.io).poll_write(cx, &CONTINUE[*written..])) {
                    Ok(n) if n > 0 => *written += n,
                    _ => return Poll::Ready(Err(())),
                }
            }
            if ready!(Pin::new(&mut conn.io).poll_flush(cx)).is_err() {
                return Poll::Ready(Err(()));
            }
            self.interim = None;
        }
        let frame = loop {
            match h1::decode(&mut self.decoder, &mut conn.buf) {
                Ok(Some(frame)) => break Ok(Some(frame)),
                Ok(None) if self.decoder == Decoder::Done => break Ok(None),
                Ok(None) => {}
                Err(error) => break Err(error),
            }
            let want = h1::read_size(self.decoder);
            match ready!(conn.poll_fill(cx, want)) {
                Ok(0) => {
                    break Err(h1::Error::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection before its body was complete",
                    )));
                }
                Ok(_) => {}
                Err(error) => break Err(h1::Error::Io(error)),
            }
        };
        match frame {
            Ok(Some(frame)) => slot.frame = Some(Ok(frame)),
            Ok(None) => {}
            Err(error) => {
                // Nothing more is read: the connection closes after the
                // response.
                self.decoder = Decoder::Done;
                slot.failed = true;
                slot.frame = Some(Err(Box::new(error)));
            }
        }
        if self.decoder == Decoder::Done && !slot.failed {
            slot.ended = true;
        }
        slot.want = false;
        let same_task = match slot.body.take() {
            Some(waker) if waker.will_wake(cx.waker()) => true,
            Some(waker) => {
                waker.wake();
                false
            }
            None => false,
        };
        Poll::Ready(Ok(same_task))
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        if self.ended() {
            return;
        }
        // The session ends (or the connection upgrades) before the body
        // was read: a body still polled elsewhere fails rather than waits.
        let mut slot = self.slot.lock();
        if slot.dropped || slot.failed {
            return;
        }
        slot.failed = true;
        if slot.frame.is_none() {
            slot.frame = Some(Err(Box::new(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client connection closed before the body was read",
            ))));
        }
        if let Some(waker) = slot.body.take() {
            waker.wake();
        }
    }
}

/// Where a request body and its session meet.
#[derive(Default)]
struct Slot(Mutex<SlotState>);

#[derive(Default)]
struct SlotState {
    /// The next frame, read by the session and not yet taken.
    frame: Option<Result<Frame<Bytes>, BoxError>>,
    /// The body asked for a frame.
    want: bool,
    /// The body has been read to its end.
    ended: bool,
    /// Reading it failed (the error is, or was, in `frame`).
    failed: bool,
    /// The body was dropped before its end.
    dropped: bool,
    body: Option<Waker>,
    session: Option<Waker>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request body on an HTTP/1.1 connection, read by its session as it is
/// asked for.
pub struct RequestBody {
    slot: Arc<Slot>,
    /// Bytes still to come, for a body of known length.
    left: Option<u64>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut slot = self.slot.lock();
        if let Some(frame) = slot.frame.take() {
            drop(slot);
            if let (Ok(frame), Some(left)) = (&frame, &mut self.left) {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                *left = left.saturating_sub(n);
            }
            return Poll::Ready(Some(frame));
        }
        if slot.ended || slot.failed {
            return Poll::Ready(None);
        }
        slot.want = true;
        match &slot.body {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => slot.body = Some(cx.waker().clone()),
        }
        // Polled from another task, the body wakes its session to read.
        if let Some(session) = &slot.session
            && !session.will_wake(cx.waker())
        {
            session.wake_by_ref();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.slot.lock();
        slot.frame.is_none() && (slot.ended || slot.failed)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let mut slot = self.slot.lock();
        slot.dropped = true;
        if let Some(session) = slot.session.take() {
            session.wake();
        }
    }
}

/// A request's body, from either protocol.
pub enum ClientBody {
    Empty,
    H1(RequestBody),
    H2(hyper::body::Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::H1(body) => Pin::new(body).poll_frame(cx),
            Self::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::H1(body) => body.is_end_stream(),
            Self::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::H1(body) => body.size_hint(),
            Self::H2(body) => body.size_hint(),
        }
    }
}

/// A request's way to its connection once a 101 response is written, in
/// its extensions while it may be upgraded (which hold only what can be
/// cloned: a clone shares the one connection).
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    fn new(rx: oneshot::Receiver<Upgraded>) -> Self {
        Self(Arc::new(Mutex::new(Some(rx))))
    }

    pub async fn upgraded(self) -> io::Result<Upgraded> {
        let rx = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        let not = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection was not upgraded",
            )
        };
        rx.ok_or_else(not)?.await.map_err(|_| not())
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// An upgraded client connection: what the session read past the
/// request, then the stream.
pub struct Upgraded(Prefixed<Box<dyn Stream>>);

impl Upgraded {
    fn new<I: AsyncRead + AsyncWrite + Send + Unpin + 'static>(read: Bytes, io: I) -> Self {
        Self(Prefixed::new(read, Box::new(io)))
    }
}

/// A stream whose first bytes were read already: they are read again
/// first.
pub(super) struct Prefixed<I> {
    read: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    pub(super) fn new(read: Bytes, io: I) -> Self {
        Self { read, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let read = self.read.split_to(n);
            buf.put_slice(&read);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::super::h1::tests::streamed;
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use tokio::io::{AsyncReadExt, DuplexStream, duplex};

    fn settings() -> Settings {
        Settings {
            max_head: 8192,
            max_headers: 100,
            header_read: Duration::from_secs(1),
            keepalive: Duration::from_secs(1),
            detect_h2: false,
        }
    }

    fn parse(text: &[u8]) -> Result<Option<Head>, ProxyError> {
        let mut buf = BytesMut::from(text);
        parse_head(&mut buf, &settings())
    }

    fn head(text: &[u8]) -> Head {
        match parse(text) {
            Ok(Some(head)) => head,
            Ok(None) => panic!("incomplete: {}", String::from_utf8_lossy(text)),
            Err(e) => panic!("refused: {e}"),
        }
    }

    fn refused(text: &[u8]) -> String {
        match parse(text) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted: {}", String::from_utf8_lossy(text)),
        }
    }

    #[test]
    fn a_plain_head_becomes_a_request_and_leaves_the_rest() {
        let mut buf = BytesMut::from(
            &b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two: 2\r\n\r\nGET /next HTTP/1.1\r\n"[..],
        );
        let head = parse_head(&mut buf, &settings())
            .ok()
            .flatten()
            .expect("a head");
        assert_eq!(head.request.method(), Method::GET);
        assert_eq!(head.request.uri(), "/a?b=1");
        assert_eq!(head.request.headers()["host"], "x");
        assert_eq!(head.request.headers()["x-two"], "2");
        assert_eq!(head.body, Decoder::Done);
        assert_eq!(head.verdict, Verdict::Clean);
        assert!(head.reply.keep_alive && !head.reply.head && !head.reply.upgrade);
        assert_eq!(&buf[..], b"GET /next HTTP/1.1\r\n", "the pipelined rest");
        assert!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n")
                .ok()
                .is_some_and(|h| h.is_none())
        );
    }

    #[test]
    fn bodies_are_framed_by_length_or_chunks() {
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(h.body, Decoder::Length(12));
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.body, Decoder::Done);
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 7, 7\r\n\r\n");
        assert_eq!(h.body, Decoder::Length(7));
        let h = head(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.body, Decoder::Chunked(Chunk::Size));
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
        assert!(h.reply.expect_continue);
        // Nothing to ask for: no interim response.
        let h = head(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
        assert!(!h.reply.expect_continue);
    }

    #[test]
    fn framing_conflicts_are_verdicts_and_broken_framing_is_refused() {
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(h.verdict, Verdict::Smuggling(_)));
        assert!(!h.reply.keep_alive, "a refused head keeps the connection");
        assert_eq!(h.body, Decoder::Done, "a refused head's body is read");
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n");
        assert!(matches!(h.verdict, Verdict::Smuggling(_)));
        assert!(
            refused(b"POST / HTTP/1.1\r\nContent-Length: 4x\r\n\r\n").contains("Content-Length")
        );
        assert!(refused(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").contains("chunked"));
        assert!(
            refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").contains("HTTP/1.0")
        );
        assert!(refused(b"GET / HTTP/1.1\r\nX-Fold: a\r\n b\r\n\r\n").contains("malformed"));
        assert!(refused(b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n").contains("malformed"));
    }

    #[test]
    fn heads_are_held_to_the_limits() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("X-{i}: {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&many), Err(ProxyError::HeadTooLarge { .. })));
        let mut small = settings();
        small.max_head = 64;
        let long = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(100));
        let mut buf = BytesMut::from(long.as_bytes());
        let h = parse_head(&mut buf, &small).ok().flatten().expect("a head");
        assert_eq!(h.verdict, Verdict::HeadTooLarge);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").reply.keep_alive);
        assert!(
            head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .reply
                .keep_alive
        );
        assert!(
            !head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .reply
                .keep_alive
        );
        assert!(
            head(b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                .reply
                .upgrade
        );
        assert!(head(b"HEAD / HTTP/1.1\r\n\r\n").reply.head);
    }

    /// Mutated and random heads, in every split: refused or accepted,
    /// never a panic, and a head it accepts leaves the buffer consistent.
    #[test]
    fn mangled_heads_are_refused_or_read_never_a_panic() {
        let seeds: [&[u8]; 4] = [
            b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: y\r\n\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
            b"GET http://h:1/ HTTP/1.0\r\nConnection: keep-alive, close\r\nExpect: 100-continue\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\nUpgrade: x\r\nContent-Length: 1, 1\r\n\r\n",
        ];
        let special = [0u8, b'\r', b'\n', b':', b' ', b'\t', 0x7f, 0xff, b',', b'"'];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut small = settings();
        small.max_head = 96;
        small.max_headers = 3;
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..20_000 {
            let seed = seeds[round % seeds.len()];
            let mut bytes = seed.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = special[(next() as usize) % special.len()],
                    1 => bytes[at] = next() as u8,
                    _ => {
                        bytes.insert(at, special[(next() as usize) % special.len()]);
                    }
                }
            }
            if round % 7 == 0 {
                bytes = (0..(next() % 200) as usize).map(|_| next() as u8).collect();
            }
            let limits = if round % 2 == 0 { settings() } else { small };
            let cut = if bytes.is_empty() {
                0
            } else {
                (next() as usize) % bytes.len()
            };
            for part in [&bytes[..cut], &bytes[..]] {
                let mut buf = BytesMut::from(part);
                let before = buf.len();
                match parse_head(&mut buf, &limits) {
                    Ok(Some(head)) => {
                        accepted += 1;
                        assert!(buf.len() < before, "an accepted head took no bytes");
                        // What the session goes on to do with it must not
                        // panic either.
                        let _ = head.request.uri().path();
                        let _ = says_close(head.request.headers());
                    }
                    Ok(None) => {}
                    Err(_) => refused += 1,
                }
            }
        }
        // Both ways were taken, many times.
        assert!(
            accepted > 1_000 && refused > 1_000,
            "{accepted} accepted, {refused} refused"
        );
    }

    fn reply(version: Version, head: bool, keep_alive: bool) -> Reply {
        Reply {
            version,
            head,
            keep_alive,
            expect_continue: false,
            upgrade: false,
        }
    }

    fn full(data: &'static [u8]) -> ProxyBody {
        Full::new(Bytes::from_static(data))
            .map_err(|never| match never {})
            .boxed()
    }

    /// What a response goes out as.
    async fn written(response: Response<ProxyBody>, reply: &Reply, close: bool) -> String {
        let (ours, mut client): (DuplexStream, DuplexStream) = duplex(64 * 1024);
        let mut conn = Conn {
            io: TokioIo::new(ours),
            buf: BytesMut::new(),
            out: Vec::new(),
            head_started: None,
        };
        let mut writer = conn.start_response(response, None, reply, close);
        std::future::poll_fn(|cx| writer.poll_write(cx, &mut conn.io))
            .await
            .expect("written");
        drop(conn);
        let mut text = String::new();
        client.read_to_string(&mut text).await.expect("read back");
        text
    }

    fn response(status: u16, headers: &[(&str, &str)], body: ProxyBody) -> Response<ProxyBody> {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).expect("a status");
        for (k, v) in headers {
            r.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).expect("a name"),
                HeaderValue::from_str(v).expect("a value"),
            );
        }
        r
    }

    #[tokio::test]
    async fn responses_are_framed_for_their_client() {
        let v11 = reply(Version::HTTP_11, false, true);
        let text = written(response(200, &[("x-a", "1")], full(b"hello")), &v11, false).await;
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with("content-length: 5\r\n\r\nhello"), "{text}");

        let text = written(response(200, &[], streamed(&[b"ab", b"cde"])), &v11, false).await;
        assert!(
            text.ends_with("transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{text}"
        );

        // HTTP/1.0 without keep-alive: the close delimits the body.
        let v10 = reply(Version::HTTP_10, false, false);
        let text = written(response(200, &[], streamed(&[b"ab"])), &v10, true).await;
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(
            !text.contains("transfer-encoding") && !text.contains("connection"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\nab"), "{text}");
        // With keep-alive, it is said.
        let v10k = reply(Version::HTTP_10, false, true);
        let text = written(response(200, &[], full(b"ab")), &v10k, false).await;
        assert!(text.contains("connection: keep-alive\r\n"), "{text}");

        // HEAD keeps the length it was given and sends no body.
        let head = reply(Version::HTTP_11, true, true);
        let text = written(
            response(
                200,
                &[("content-length", "42")],
                Empty::new().map_err(|n| match n {}).boxed(),
            ),
            &head,
            false,
        )
        .await;
        assert!(text.contains("content-length: 42\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");

        // 204 has neither length nor body; closing says so, once.
        let text = written(
            response(
                204,
                &[("content-length", "0"), ("connection", "close")],
                full(b""),
            ),
            &v11,
            true,
        )
        .await;
        assert!(!text.contains("content-length"), "{text}");
        assert_eq!(text.matches("connection: close").count(), 1, "{text}");

        // A date the response has is kept.
        let text = written(
            response(200, &[("date", "Tue, 01 Dec 2026 00:00:00 GMT")], full(b"")),
            &v11,
            false,
        )
        .await;
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
        assert!(text.contains("content-length: 0\r\n"), "{text}");
    }
}
