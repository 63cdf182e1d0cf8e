//! Store-and-forward of profile records to a collector over HTTP(S).
//!
//! Contract:
//! - The shipper reads the store's segments in order from its cursor (the
//!   segment number and byte offset of the next record to send), only
//!   complete lines, and POSTs them in batches of at most `batch_size`
//!   records and about `max_batch_bytes` (a single larger record goes
//!   alone). A batch smaller than `batch_size` waits `flush_interval` for
//!   more records first (read once more then, not at each new record).
//! - The body is NDJSON: the records' lines exactly as stored, each ending
//!   in `\n`, with `Content-Type: application/x-ndjson` (unless an extra
//!   header sets another) and the configured extra headers.
//! - Only a 2xx answer acknowledges a batch. The cursor then moves past it
//!   and is saved (`{"segment":N,"offset":M}` in the cursor file, padded
//!   to 64 bytes and written in place, see [`Cursor`]) before the next
//!   batch is read. The save survives the process being killed at once;
//!   it is fsynced at most every [`CURSOR_SYNC_INTERVAL`] and when the
//!   shipper stops, so a power loss can only send again what the last
//!   interval acknowledged (a repeat, never a loss). Anything else (no connection, a timeout, another
//!   status) is retried with the same batch after an exponential backoff
//!   from `backoff_min` to `backoff_max`, with jitter (each wait is drawn
//!   between half the step and the step), for as long as it takes: records
//!   wait in the store, bounded by its retention.
//! - Delivery is in order and, while the cursor file survives, once; a
//!   crash between the collector's answer and the cursor's save, or a
//!   collector that answers after the timeout, can have a batch sent again,
//!   and the records' `record_id` (set by the store) lets the collector
//!   drop repeats.
//! - A segment deleted by retention before it was shipped is skipped (the
//!   store counts its records as dropped); the shipper goes on with the
//!   oldest segment left after it. A line that is not a JSON object (what
//!   a power loss can leave in the middle of a segment) is skipped and
//!   counted as dropped with reason `corrupt`, so one bad line cannot
//!   block the queue behind it.
//! - One shipper per store.

use std::{
    fs::File,
    io::{self, Read as _, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header::CONTENT_TYPE,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    metrics::ProfileMetrics,
    store::{Position, Progress, StoreHandle, list_segments, sync_dir},
};
use crate::proxy::tls::{ClientTls, TlsError, client_config_for};

/// `Content-Type` of a batch.
pub const BATCH_CONTENT_TYPE: &str = "application/x-ndjson";
/// Name of the cursor file in the store's directory, by default.
pub const CURSOR_FILE: &str = "cursor.json";
/// How often, at most, a saved cursor is also fsynced. A busy proxy
/// acknowledges dozens of batches a second; fsyncing the cursor (and its
/// directory) after each cost more than writing the records themselves.
pub const CURSOR_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// The most of a collector's answer that is read (and ignored).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Default)]
pub struct ShipperTls {
    /// CA certificates (PEM) to verify the collector with; default: the
    /// system's roots.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate chain and key (PEM), for mutual TLS; both or
    /// neither.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone)]
pub struct ShipperOptions {
    /// `http://` or `https://` URL the batches are POSTed to.
    pub url: String,
    /// Records per batch, at most.
    pub batch_size: usize,
    /// Bytes per batch, about: a batch stops at the first record that
    /// reaches it.
    pub max_batch_bytes: usize,
    /// How long a batch smaller than `batch_size` waits for more records.
    pub flush_interval: Duration,
    /// For a whole exchange: connection, request and answer.
    pub request_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Sent with every batch, e.g. `Authorization`.
    pub headers: Vec<(String, String)>,
    pub tls: ShipperTls,
    /// Default: [`CURSOR_FILE`] in the store's directory.
    pub cursor_file: Option<PathBuf>,
}

impl ShipperOptions {
    /// Options with the defaults: 500 records or 4 MiB a batch, a 1 s
    /// flush interval, a 10 s timeout, backoff from 100 ms to 30 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            batch_size: 500,
            max_batch_bytes: 4 * 1024 * 1024,
            flush_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            headers: Vec::new(),
            tls: ShipperTls::default(),
            cursor_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    #[error("profile shipper option {option}: {reason}")]
    Option {
        option: &'static str,
        reason: String,
    },
    #[error("profile shipper TLS: {source}")]
    Tls {
        #[source]
        source: TlsError,
    },
    #[error("profile shipper cursor file {path}: {reason}")]
    Cursor { path: PathBuf, reason: String },
}

fn option(option: &'static str, reason: impl Into<String>) -> ShipperError {
    ShipperError::Option {
        option,
        reason: reason.into(),
    }
}

type Collector = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The shipper's constructor.
pub struct Shipper;

impl Shipper {
    /// Checks `options`, builds the HTTP client and reads the cursor (a
    /// missing file means nothing was shipped yet). Spawn the task's
    /// [`ShipperTask::run`] to start sending.
    pub fn start(
        store: &StoreHandle,
        options: ShipperOptions,
    ) -> Result<(ShipperHandle, ShipperTask), ShipperError> {
        let uri: Uri = options
            .url
            .parse()
            .map_err(|e| option("url", format!("{}: {e}", options.url)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(option("url", format!("{}: not http or https", options.url))),
        };
        if uri.authority().is_none() {
            return Err(option("url", format!("{}: no host", options.url)));
        }
        if options.batch_size == 0 {
            return Err(option("batch_size", "must be at least 1"));
        }
        if options.max_batch_bytes == 0 {
            return Err(option("max_batch_bytes", "must be above 0"));
        }
        if options.request_timeout.is_zero() {
            return Err(option("request_timeout", "must be above 0"));
        }
        if options.backoff_min.is_zero() {
            return Err(option("backoff_min", "must be above 0"));
        }
        if options.backoff_max < options.backoff_min {
            return Err(option("backoff_max", "must not be below backoff_min"));
        }
        let tls = &options.tls;
        let tls_set = tls.ca_cert.is_some()
            || tls.client_cert.is_some()
            || tls.client_key.is_some()
            || tls.insecure_skip_verify;
        if tls_set && !https {
            return Err(option("tls", "TLS options need an https url"));
        }
        let client_cert = match (&tls.client_cert, &tls.client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(option("tls", "client_cert and client_key go together"));
            }
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &options.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| option("headers", format!("{name:?}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| option("headers", format!("{name}: {e}")))?;
            headers.append(name, value);
        }
        if !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(BATCH_CONTENT_TYPE));
        }

        let client = if https {
            let config = client_config_for(ClientTls {
                ca_cert: tls.ca_cert.as_deref(),
                client_cert,
                insecure_skip_verify: tls.insecure_skip_verify,
                peer: "profile collector",
            })
            .map_err(|source| ShipperError::Tls { source })?;
            collector_client(config, true, options.request_timeout)
        } else {
            let config = plain_config().map_err(|source| ShipperError::Tls { source })?;
            collector_client(config, false, options.request_timeout)
        };

        let cursor_file = options
            .cursor_file
            .clone()
            .unwrap_or_else(|| store.dir().join(CURSOR_FILE));
        let dir = store.dir().to_owned();
        let position = match load_cursor(&cursor_file)? {
            Some(position) => position,
            None => Position {
                segment: list_segments(&dir)
                    .ok()
                    .and_then(|s| s.first().map(|(n, _)| *n))
                    .unwrap_or(1),
                offset: 0,
            },
        };
        let cursor = Cursor::open(&cursor_file, position).map_err(|e| ShipperError::Cursor {
            path: cursor_file.clone(),
            reason: e.to_string(),
        })?;
        let progress = store.progress();
        progress.set(position);
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        let shared_position = Arc::new(Mutex::new(position));
        info!(
            url = %options.url,
            segment = position.segment,
            offset = position.offset,
            "profile shipper starting"
        );
        let task = ShipperTask {
            client,
            uri,
            headers,
            options,
            dir,
            cursor,
            cursor_file,
            position,
            unsynced_since: None,
            shared_position: shared_position.clone(),
            progress,
            written: store.written(),
            written_from: store.written_from(),
            last_batch_bytes: 0,
            metrics: store.metrics().clone(),
            cancel: cancel.clone(),
            done: done_tx,
        };
        let handle = ShipperHandle {
            cancel,
            done: done_rx,
            position: shared_position,
        };
        Ok((handle, task))
    }
}

fn collector_client(tls: rustls::ClientConfig, https: bool, timeout: Duration) -> Collector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    // Plain HTTP goes through the same connector type, whose TLS
    // configuration is then never used.
    let builder = if https {
        builder.https_only()
    } else {
        builder.https_or_http()
    };
    let connector = builder.enable_http1().wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_max_idle_per_host(1)
        .build(connector)
}

/// A client configuration for a connector that only makes plain
/// connections: no roots to load.
fn plain_config() -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|source| TlsError::Rustls {
        what: "TLS versions",
        source,
    })?;
    Ok(builder
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CursorJson {
    segment: u64,
    offset: u64,
}

fn load_cursor(path: &Path) -> Result<Option<Position>, ShipperError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ShipperError::Cursor {
                path: path.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    let cursor: CursorJson = serde_json::from_slice(&text).map_err(|e| ShipperError::Cursor {
        path: path.to_owned(),
        reason: format!("not a cursor ({e}); delete it to ship every stored record again"),
    })?;
    Ok(Some(Position {
        segment: cursor.segment,
        offset: cursor.offset,
    }))
}

/// Bytes of the cursor file: its JSON padded with spaces, then `\n`. The
/// longest cursor (two 20-digit numbers) is 62 bytes.
const CURSOR_BYTES: usize = 64;

/// The cursor file, open for the shipper's life and rewritten in place:
/// one 64-byte write at offset 0 per acknowledged batch. A process killed
/// at any moment leaves the old cursor or the new one (a write of one
/// page-cache block is never seen in part), and the write lies within one
/// disk sector, which storage writes whole. Renaming a new file over the
/// old one instead would, on ext4 without a journal, write the evicted
/// inode synchronously on every batch.
struct Cursor {
    file: Arc<File>,
}

impl Cursor {
    /// Opens (or creates) the file at `path` and writes `position` into it,
    /// durably: from here on, the name is on disk and the size is fixed.
    fn open(path: &Path, position: Position) -> io::Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let cursor = Self {
            file: Arc::new(file),
        };
        cursor.write(position)?;
        cursor.file.set_len(CURSOR_BYTES as u64)?;
        cursor.file.sync_all()?;
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir)?,
            _ => sync_dir(Path::new("."))?,
        }
        Ok(cursor)
    }

    fn write(&self, position: Position) -> io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let mut text = [b' '; CURSOR_BYTES];
        let mut json = &mut text[..];
        write!(
            json,
            "{{\"segment\":{},\"offset\":{}}}",
            position.segment, position.offset
        )?;
        text[CURSOR_BYTES - 1] = b'\n';
        self.file.write_all_at(&text, 0)
    }
}

/// Stops the shipper.
#[derive(Clone)]
pub struct ShipperHandle {
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
    position: Arc<Mutex<Position>>,
}

impl ShipperHandle {
    /// Stops waiting and retrying, lets a request in flight finish (within
    /// the request timeout) so that its acknowledgement is saved, and
    /// returns once the task has ended. What is not shipped stays in the
    /// store for the next start.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let mut done = self.done.clone();
        let _ = done.wait_for(|finished| *finished).await;
    }

    /// The cursor: where the next batch starts.
    pub fn position(&self) -> Position {
        *self.position.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sender. Spawn [`ShipperTask::run`].
pub struct ShipperTask {
    client: Collector,
    uri: Uri,
    headers: HeaderMap,
    options: ShipperOptions,
    dir: PathBuf,
    cursor_file: PathBuf,
    cursor: Cursor,
    position: Position,
    /// When the saved cursor was last fsynced; `None`: it is (or nothing
    /// was saved since).
    unsynced_since: Option<std::time::Instant>,
    shared_position: Arc<Mutex<Position>>,
    progress: Arc<Progress>,
    /// Lines from here on were written by the running store.
    written_from: Position,
    /// The size of the last batch read: what the next is read into is
    /// allocated that large at once, not grown by doubling as it fills.
    last_batch_bytes: usize,
    written: Arc<Notify>,
    metrics: ProfileMetrics,
    cancel: CancellationToken,
    done: watch::Sender<bool>,
}

/// What the segments hold at the cursor.
enum Read {
    Batch {
        body: Vec<u8>,
        records: u64,
        /// Lines skipped as not JSON objects (garbage a power loss can
        /// leave); counted as dropped once the cursor passes them.
        corrupt: u64,
        end: Position,
    },
    /// Nothing to send from here: the cursor moves to another segment.
    Moved(Position),
    /// Nothing to send yet.
    Idle,
}

impl ShipperTask {
    pub async fn run(mut self) {
        let mut attempt = 0u32;
        // When a batch smaller than batch_size is sent anyway.
        let mut flush_at: Option<tokio::time::Instant> = None;
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let read = {
                let dir = self.dir.clone();
                let at = self.position;
                let (size, bytes) = (self.options.batch_size, self.options.max_batch_bytes);
                let trusted = self.written_from;
                let hint = self.last_batch_bytes;
                tokio::task::spawn_blocking(move || {
                    read_batch(&dir, at, trusted, size, bytes, hint)
                })
                .await
            };
            let read = match read {
                Ok(Ok(read)) => read,
                Ok(Err(error)) => {
                    warn!(%error, dir = %self.dir.display(), "cannot read profile segments");
                    if !self.backoff(&mut attempt).await {
                        break;
                    }
                    continue;
                }
                Err(error) => {
                    error!(%error, "profile shipper reader failed");
                    break;
                }
            };
            match read {
                Read::Idle => {
                    flush_at = None;
                    // Caught up: a good time to make the cursor durable.
                    if self.unsynced_since.is_some() {
                        self.save(self.position, true).await;
                    }
                    self.wait().await;
                }
                Read::Moved(next) => {
                    debug!(
                        from = self.position.segment,
                        to = next.segment,
                        "next profile segment"
                    );
                    self.advance(next).await;
                }
                Read::Batch {
                    records: 0,
                    corrupt,
                    end,
                    ..
                } => {
                    self.metrics.drop_records("corrupt", corrupt);
                    self.advance(end).await;
                }
                Read::Batch {
                    body,
                    records,
                    corrupt,
                    end,
                } => {
                    self.last_batch_bytes = body.len();
                    let full = records >= self.options.batch_size as u64
                        || body.len() >= self.options.max_batch_bytes;
                    if !full {
                        let deadline = *flush_at.get_or_insert_with(|| {
                            tokio::time::Instant::now() + self.options.flush_interval
                        });
                        if tokio::time::Instant::now() < deadline {
                            // Not woken by each new record: reading the
                            // batch again per record would parse it over
                            // and over. A batch that fills meanwhile goes
                            // at the deadline.
                            tokio::select! {
                                _ = self.cancel.cancelled() => {}
                                _ = tokio::time::sleep_until(deadline) => {}
                            }
                            continue;
                        }
                    }
                    flush_at = None;
                    let body = Bytes::from(body);
                    loop {
                        match self.send(body.clone()).await {
                            Ok(()) => {
                                attempt = 0;
                                self.metrics.shipped.inc_by(records);
                                self.metrics.drop_records("corrupt", corrupt);
                                self.advance(end).await;
                                break;
                            }
                            Err(reason) => {
                                self.metrics.retried.with_label_values(&[reason]).inc();
                                if !self.backoff(&mut attempt).await {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
        if self.unsynced_since.is_some() {
            self.save(self.position, true).await;
        }
        info!(
            segment = self.position.segment,
            offset = self.position.offset,
            "profile shipper stopped"
        );
        let _ = self.done.send(true);
    }

    /// Waits for new records, a poll interval or shutdown.
    async fn wait(&self) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.written.notified() => {}
            _ = tokio::time::sleep(self.options.flush_interval) => {}
        }
    }

    /// Sleeps for the next backoff step; `false` when shut down meanwhile.
    async fn backoff(&self, attempt: &mut u32) -> bool {
        let delay = backoff_delay(
            self.options.backoff_min,
            self.options.backoff_max,
            *attempt,
            random(),
        );
        *attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Moves the cursor and saves it.
    async fn advance(&mut self, to: Position) {
        self.position = to;
        *self
            .shared_position
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = to;
        self.progress.set(to);
        let first = *self
            .unsynced_since
            .get_or_insert_with(std::time::Instant::now);
        let sync = first.elapsed() >= CURSOR_SYNC_INTERVAL;
        self.save(to, sync).await;
    }

    /// Saves the cursor (see [`Cursor`]); with `sync`, fsyncs it on the
    /// blocking pool.
    async fn save(&mut self, to: Position, sync: bool) {
        let saved = match self.cursor.write(to) {
            Ok(()) if sync => {
                let file = self.cursor.file.clone();
                tokio::task::spawn_blocking(move || file.sync_data())
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
            }
            written => written,
        };
        match saved {
            Ok(()) => {
                if sync {
                    self.unsynced_since = None;
                }
            }
            Err(error) => {
                error!(%error, path = %self.cursor_file.display(), "cannot save the profile cursor; a restart will send some records again")
            }
        }
    }

    /// One exchange; the `reason` of a retry when it is not a 2xx.
    async fn send(&self, body: Bytes) -> Result<(), &'static str> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        let exchange = async {
            let answer = self.client.request(request).await?;
            let status = answer.status();
            // Read the answer so that the connection can be reused; its
            // content does not matter.
            let _ = Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await;
            Ok::<StatusCode, hyper_util::client::legacy::Error>(status)
        };
        match tokio::time::timeout(self.options.request_timeout, exchange).await {
            Ok(Ok(status)) if status.is_success() => Ok(()),
            Ok(Ok(status)) => {
                warn!(%status, url = %self.options.url, "profile collector refused a batch");
                Err("status")
            }
            Ok(Err(error)) if error.is_connect() => {
                debug!(%error, url = %self.options.url, "profile collector unreachable");
                Err("connect")
            }
            Ok(Err(error)) => {
                warn!(%error, url = %self.options.url, "profile batch failed");
                Err("error")
            }
            Err(_) => {
                warn!(url = %self.options.url, "profile collector did not answer in time");
                Err("timeout")
            }
        }
    }
}

/// The wait before retry `attempt` (0 for the first): the step doubles
/// from `min` up to `max`, and the wait is drawn from the upper half of the
/// step with `random`, so that shippers do not retry in step.
pub fn backoff_delay(min: Duration, max: Duration, attempt: u32, random: u64) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let step = min.saturating_mul(factor).min(max);
    let half = step / 2;
    let spread = (step - half).as_nanos() as u64;
    let jitter = if spread == 0 {
        0
    } else {
        random % (spread + 1)
    };
    half + Duration::from_nanos(jitter)
}

fn random() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64)
    })
}

/// Reads complete lines from `at`: at most `max_records`, stopping at the
/// first line that takes the batch to `max_bytes`.
/// A batch from `at`. Lines before `trusted` (left by an earlier run,
/// perhaps by a power loss) are checked to be JSON objects; the store's
/// writer made those after it, so they are not parsed again.
/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 256 * 1024;

fn read_batch(
    dir: &Path,
    at: Position,
    trusted: Position,
    max_records: usize,
    max_bytes: usize,
    size_hint: usize,
) -> io::Result<Read> {
    // Listed before reading: if a later segment exists now, the writer had
    // finished this one before the read below began.
    let segments = list_segments(dir)?;
    let next = segments
        .iter()
        .map(|(n, _)| *n)
        .find(|n| *n > at.segment)
        .map(|segment| Position { segment, offset: 0 });
    let Some((_, path)) = segments.iter().find(|(n, _)| *n == at.segment) else {
        // Deleted by retention (or never written): go on with what is left.
        return Ok(next.map_or(Read::Idle, Read::Moved));
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(next.map_or(Read::Idle, Read::Moved));
        }
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if at.offset > len {
        warn!(
            path = %path.display(),
            offset = at.offset,
            len,
            "profile cursor is past the end of its segment; going on from the next one"
        );
        return Ok(next.map_or(Read::Idle, Read::Moved));
    }
    let mut file = file;
    file.seek(SeekFrom::Start(at.offset))?;
    // The segment is read in large chunks and cut into lines here: one
    // read(2) per chunk, not one per line or per 8 KiB.
    // Room for a chunk behind the partial line a chunk ends with: the
    // buffer is not grown (and copied) in the middle of the batch.
    let mut buf: Vec<u8> = Vec::with_capacity(2 * READ_CHUNK);
    let mut start = 0;
    let mut eof = false;
    let mut body = Vec::new();
    let mut records = 0u64;
    let mut corrupt = 0u64;
    let mut offset = at.offset;
    while records < max_records as u64 && body.len() < max_bytes {
        let Some(end) = memchr::memchr(b'\n', &buf[start..]).map(|i| start + i + 1) else {
            if eof {
                if start < buf.len() && next.is_some() {
                    warn!(path = %path.display(), "partial line at the end of a closed profile segment skipped");
                    offset += (buf.len() - start) as u64;
                }
                // Otherwise a line being written: it is sent once whole.
                break;
            }
            buf.drain(..start);
            start = 0;
            // Into the spare capacity, not zeroed first: zeroing each
            // 256 KiB chunk cost more than the read.
            buf.reserve(READ_CHUNK);
            let n = (&mut file).take(READ_CHUNK as u64).read_to_end(&mut buf)?;
            eof = n == 0;
            continue;
        };
        let line = &buf[start..end];
        let line_at = Position {
            segment: at.segment,
            offset,
        };
        offset += line.len() as u64;
        start = end;
        if line.first() != Some(&b'{')
            || (line_at < trusted && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_err())
        {
            warn!(
                path = %path.display(),
                offset = line_at.offset,
                "profile segment line is not a JSON object; skipped"
            );
            corrupt += 1;
            continue;
        }
        if body.is_empty() {
            // What the segment held when opened, or, when the writer is
            // adding to it as it is read, what the last batch took (with
            // room for the line that can take a batch past `max_bytes`).
            let unread = len.saturating_sub(line_at.offset) as usize;
            let hint = size_hint.saturating_add(size_hint / 8);
            body.reserve(max_bytes.min(unread.max(hint)));
        }
        body.extend_from_slice(line);
        records += 1;
    }
    if records > 0 || corrupt > 0 {
        return Ok(Read::Batch {
            body,
            records,
            corrupt,
            end: Position {
                segment: at.segment,
                offset,
            },
        });
    }
    Ok(match next {
        Some(next) => Read::Moved(next),
        None => Read::Idle,
    })
}

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn the_cursor_is_rewritten_in_place_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CURSOR_FILE);
        // A longer file than the cursor's (written by hand, or by an older
        // version): what is past 64 bytes must not survive.
        std::fs::write(
            &path,
            format!(
                "{{\n  \"segment\": 7,\n  \"offset\": 99\n}}\n{}",
                " ".repeat(80)
            ),
        )
        .expect("write");
        let start = load_cursor(&path).expect("load").expect("cursor");
        assert_eq!((start.segment, start.offset), (7, 99));
        let cursor = Cursor::open(&path, start).expect("open");
        for (segment, offset) in [(7, 100), (8, 0), (u64::MAX, u64::MAX), (9, 12_345)] {
            cursor.write(Position { segment, offset }).expect("save");
            let text = std::fs::read(&path).expect("read");
            assert_eq!(text.len(), CURSOR_BYTES);
            assert_eq!(text.last(), Some(&b'\n'));
            let read = load_cursor(&path).expect("load").expect("cursor");
            assert_eq!((read.segment, read.offset), (segment, offset));
        }
    }
}
