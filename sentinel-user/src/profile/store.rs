//! The local store of profile records: JSON Lines in size-rotated segment
//! files, written by one background task fed through a bounded queue.
//!
//! Contract:
//! - [`StoreHandle::push`] never blocks on the writer and never awaits: it
//!   appends the record's line to the queue under a lock held only for
//!   that copy (the writer holds it only to swap the queue's buffer), and
//!   when the queue is full the record is dropped and counted
//!   (`sentinel_profile_records_dropped_total{reason="queue_full"}`).
//! - Each record gets a `seq` (a `u64` that grows by one per queued
//!   record, carried on across restarts from the last line on disk) and,
//!   when the record has no non-empty string `record_id`, a random UUID v4
//!   one. `seq` is given as the line joins the queue, under its lock, and
//!   the writer writes the queue in order, so `seq` follows the order of
//!   the lines in the files whatever the order in which request tasks
//!   pushed. A record that is not a JSON object is refused (`push` returns
//!   `false`, counted as `invalid`) and takes no number. A deferred record
//!   ([`StoreHandle::push_deferred`]) is made into its line by the writer,
//!   in its place in the queue; one that makes no JSON object is left out
//!   as `invalid` and leaves a gap in `seq`.
//! - Each record is one line, `{...}\n`, in `records-NNNNNNNN.jsonl`
//!   (numbered from 1, zero-padded to 8 digits so that names sort; numbers
//!   past 99999999 still sort numerically here). A new segment is started
//!   before a line would take the current one past `max_file_bytes` (a
//!   single larger line gets a segment of its own), and the oldest segments
//!   beyond `max_files` are deleted; their records the shipper had not yet
//!   sent are counted as dropped with reason `retention`.
//! - A record counts as stored (`sentinel_profile_records_stored_total`)
//!   once the write(2) carrying it returned. The page cache keeps it through
//!   a crash of the daemon; against power loss the writer fsyncs every
//!   `fsync_interval` while something is unsynced, at each rotation, and at
//!   shutdown.
//! - Open repairs what a crash can leave: a trailing partial line in the
//!   newest segment is cut off (counted as `partial_line`), so every segment
//!   is valid JSON Lines.
//! - [`StoreHandle::shutdown`] stops the queue, writes what was in it,
//!   fsyncs and returns once that is done.
//! - One store per directory: open takes an exclusive lock on `LOCK_FILE`
//!   in it, held until the writer ends, so a second daemon pointed at the
//!   same directory gets [`StoreError::Locked`] instead of interleaving
//!   its lines.

use std::{
    borrow::Cow,
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::{Map, Value};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::metrics::ProfileMetrics;

/// File names of segments are `records-` + number + `.jsonl`.
pub const SEGMENT_PREFIX: &str = "records-";
pub const SEGMENT_SUFFIX: &str = ".jsonl";

/// Locked by the store that owns the directory.
pub const LOCK_FILE: &str = "store.lock";

/// Field the store sets on every record: its sequence number.
pub const SEQ_FIELD: &str = "seq";
/// Field the store sets when a record has none: a UUID v4.
pub const RECORD_ID_FIELD: &str = "record_id";

/// How long the writer lets records gather after the first of a batch
/// arrives. Without it a busy proxy hands the writer one record at a
/// time, and each costs a wake-up and a trip to the blocking pool and
/// back; with it, a few hundred writes a second at most, each of
/// everything queued (one write(2), unless a rotation falls in it).
/// Records are counted as stored only once written, so this delays the
/// count, never the request.
const WRITE_WINDOW: Duration = Duration::from_millis(5);

/// The file name of segment `n`.
pub fn segment_name(n: u64) -> String {
    format!("{SEGMENT_PREFIX}{n:08}{SEGMENT_SUFFIX}")
}

/// The number of a segment file name, `None` for any other file.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `dir`, oldest (lowest number) first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(parse_segment_name) {
            out.push((n, entry.path()));
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// What can be pushed: a JSON object, or one already serialized (a single
/// JSON object; it is parsed to set `seq` and `record_id`).
pub enum Record {
    Value(Value),
    Line(String),
    /// One JSON object serialized by this process (trusted: it is not
    /// parsed again), without `seq` or `record_id`.
    Object(Vec<u8>),
}

/// Makes a deferred record ([`StoreHandle::push_deferred`]) into one JSON
/// object, without `seq` or `record_id`, from the bytes it was queued
/// with. What it writes is trusted, like [`Record::Object`].
pub trait MakeRecord: Send + Sync {
    fn make(&self, data: &[u8], out: &mut Vec<u8>);
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Value(v) => f.debug_tuple("Value").field(v).finish(),
            Self::Line(l) => f.debug_tuple("Line").field(l).finish(),
            Self::Object(o) => f
                .debug_tuple("Object")
                .field(&String::from_utf8_lossy(o))
                .finish(),
        }
    }
}

impl From<Value> for Record {
    fn from(value: Value) -> Self {
        Self::Value(value)
    }
}

impl From<String> for Record {
    fn from(line: String) -> Self {
        Self::Line(line)
    }
}

pub struct StoreOptions {
    /// Created if missing. Holds the segments (and, by default, the
    /// shipper's cursor file).
    pub dir: PathBuf,
    /// A segment is closed before a line would take it past this size.
    pub max_file_bytes: u64,
    /// Segments kept; the oldest beyond are deleted.
    pub max_files: usize,
    /// Records waiting for the writer; a push beyond is dropped.
    pub queue_capacity: usize,
    /// Longest time written records stay without an fsync.
    pub fsync_interval: Duration,
    pub metrics: ProfileMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("profile store option {option}: {reason}")]
    Option {
        option: &'static str,
        reason: &'static str,
    },
    #[error("profile store {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("profile store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the shipper is: the next byte it will read. Shared with the
/// store so that retention can tell shipped records from unshipped ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// `None` while no shipper is attached: then deleted records are not
/// counted as dropped, since keeping them was never promised.
#[derive(Default)]
pub(crate) struct Progress(Mutex<Option<Position>>);

impl Progress {
    pub(crate) fn set(&self, position: Position) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(position);
    }

    fn get(&self) -> Option<Position> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Records waiting for the writer, as the lines the writer will write:
/// [`StoreHandle::push`] appends to `lines`, the writer swaps the whole
/// buffer for an empty one. One copy per record and no allocation once the
/// two buffers have grown, and the writer is woken once per batch, not
/// once per record.
struct Queue {
    state: Mutex<QueueState>,
    /// Notified when the queue goes from empty to not, and when it closes.
    wake: Notify,
    capacity: usize,
}

struct QueueState {
    lines: Vec<u8>,
    deferred: Deferreds,
    records: usize,
    next_seq: u64,
    /// Set by the writer as it takes the last batch: pushes fail from then
    /// on, so nothing can be queued that is never written.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Swaps the queued lines into `into` (emptied first); returns how
    /// many records they are and whether the queue is closed. With `close`
    /// it is closed in the same step.
    fn take(&self, into: &mut Batch, close: bool) -> (usize, bool) {
        into.lines.clear();
        into.deferred.clear();
        let mut state = self.lock();
        std::mem::swap(&mut state.lines, &mut into.lines);
        std::mem::swap(&mut state.deferred, &mut into.deferred);
        let records = std::mem::take(&mut state.records);
        state.closed |= close;
        (records, state.closed)
    }
}

/// The records the writer makes, as queued: the bytes of each one after
/// the other in one buffer, and their makers, each kept once for a run of
/// records with the same one (a configuration generation). Queuing one is
/// a copy into a buffer the writer hands back, and no reference count
/// changes hands: nothing on the request's path is shared per record with
/// the writer's thread but the queue's lock.
#[derive(Default)]
struct Deferreds {
    data: Vec<u8>,
    makers: Vec<Arc<dyn MakeRecord>>,
    records: Vec<DeferredAt>,
}

/// Where one deferred record goes and what it is made from.
struct DeferredAt {
    seq: u64,
    /// The length of the queue's `lines` when it was queued: it goes
    /// after those lines.
    at: usize,
    /// Its bytes in [`Deferreds::data`].
    data: std::ops::Range<usize>,
    /// Its maker in [`Deferreds::makers`].
    maker: usize,
}

impl Deferreds {
    fn push<M: MakeRecord + 'static>(&mut self, seq: u64, at: usize, data: &[u8], make: &Arc<M>) {
        let same = self
            .makers
            .last()
            .is_some_and(|last| std::ptr::addr_eq(Arc::as_ptr(last), Arc::as_ptr(make)));
        if !same {
            self.makers.push(make.clone());
        }
        let start = self.data.len();
        self.data.extend_from_slice(data);
        self.records.push(DeferredAt {
            seq,
            at,
            data: start..self.data.len(),
            maker: self.makers.len() - 1,
        });
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn clear(&mut self) {
        self.data.clear();
        self.makers.clear();
        self.records.clear();
    }
}

/// What the writer took from the queue.
#[derive(Default)]
struct Batch {
    lines: Vec<u8>,
    deferred: Deferreds,
    /// The lines as written, deferred records made.
    out: Vec<u8>,
}

impl Batch {
    /// The lines in order, the deferred records made among them, and how
    /// many of those were not one JSON object (left out).
    fn lines(&mut self) -> (&[u8], u64) {
        if self.deferred.is_empty() {
            return (&self.lines, 0);
        }
        let mut invalid = 0;
        self.out.clear();
        let mut from = 0;
        let deferred = &self.deferred;
        for record in &deferred.records {
            self.out.extend_from_slice(&self.lines[from..record.at]);
            from = record.at;
            let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH + 2];
            let start = self.out.len();
            let id = new_id(&mut id);
            line_head(&mut self.out, record.seq, id);
            let at = self.out.len();
            deferred.makers[record.maker].make(&deferred.data[record.data.clone()], &mut self.out);
            let out = &mut self.out;
            if out.len() < at + 2 || out[at] != b'{' || out.last() != Some(&b'}') {
                out.truncate(start);
                invalid += 1;
                continue;
            }
            if out.len() == at + 2 {
                out.remove(at);
            } else {
                out[at] = b',';
            }
            out.push(b'\n');
        }
        // The makers are let go with the batch's records, not kept until
        // the next batch.
        self.deferred.clear();
        self.out.extend_from_slice(&self.lines[from..]);
        (&self.out, invalid)
    }
}

/// `{"seq":N,"record_id":ID`
fn line_head(out: &mut Vec<u8>, seq: u64, id: &[u8]) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(SEQ_FIELD.as_bytes());
    out.extend_from_slice(b"\":");
    // Writing into a Vec cannot fail; serde_json formats integers without
    // the formatting machinery `write!` goes through.
    let _ = serde_json::to_writer(&mut *out, &seq);
    out.extend_from_slice(b",\"");
    out.extend_from_slice(RECORD_ID_FIELD.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(id);
}

struct Shared {
    queue: Arc<Queue>,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
    metrics: ProfileMetrics,
    dir: PathBuf,
    written: Arc<Notify>,
    progress: Arc<Progress>,
    /// Where this writer began: every line from here on was serialized by
    /// it, so it is a whole JSON object.
    written_from: Position,
}

impl Drop for Shared {
    /// The last handle is gone: the writer stores what is queued and ends.
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_one();
    }
}

/// The producers' side of the store: cheap to clone, safe to share.
#[derive(Clone)]
pub struct StoreHandle {
    shared: Arc<Shared>,
}

/// A record's `record_id` as JSON, and its other members serialized
/// without braces (`"a":1,"b":2`, or nothing).
struct Encoded<'a> {
    id: Cow<'a, [u8]>,
    members: Cow<'a, [u8]>,
}

/// A new UUID v4 as a JSON string.
fn new_id(buf: &mut [u8; uuid::fmt::Hyphenated::LENGTH + 2]) -> &[u8] {
    buf[0] = b'"';
    buf[buf.len() - 1] = b'"';
    let end = buf.len() - 1;
    uuid::Uuid::new_v4()
        .hyphenated()
        .encode_lower(&mut buf[1..end]);
    &buf[..]
}

/// `None` when `record` is not one JSON object.
fn encode<'a>(
    record: &'a Record,
    id: &'a mut [u8; uuid::fmt::Hyphenated::LENGTH + 2],
) -> Option<Encoded<'a>> {
    let mut map: Map<String, Value> = match record {
        Record::Object(object) => {
            if object.len() < 2 || object[0] != b'{' || object[object.len() - 1] != b'}' {
                return None;
            }
            return Some(Encoded {
                id: Cow::Borrowed(new_id(id)),
                members: Cow::Borrowed(&object[1..object.len() - 1]),
            });
        }
        Record::Value(Value::Object(map)) => map.clone(),
        Record::Value(_) => return None,
        Record::Line(line) => serde_json::from_str(line).ok()?,
    };
    map.remove(SEQ_FIELD);
    let id = match map.remove(RECORD_ID_FIELD) {
        Some(Value::String(given)) if !given.is_empty() => {
            let mut json = Vec::with_capacity(given.len() + 2);
            super::json::string(&mut json, &given);
            Cow::Owned(json)
        }
        _ => Cow::Borrowed(new_id(id)),
    };
    let mut members = serde_json::to_vec(&map).ok()?;
    members.pop();
    members.remove(0);
    Some(Encoded {
        id,
        members: Cow::Owned(members),
    })
}

impl StoreHandle {
    /// Queues a record for the writer. Returns at once: `false` when the
    /// queue is full, the store is shut down or the record is not a JSON
    /// object (the record is dropped and counted), `true` when queued.
    pub fn push(&self, record: impl Into<Record>) -> bool {
        let record = record.into();
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH + 2];
        let Some(encoded) = encode(&record, &mut id) else {
            self.shared.metrics.drop_records("invalid", 1);
            return false;
        };
        self.queue(&encoded)
    }

    /// Queues one JSON object this process serialized, without `seq` or
    /// `record_id` (trusted: it is not parsed), copied from `object`.
    pub fn push_object(&self, object: &[u8]) -> bool {
        if object.len() < 2 || object[0] != b'{' || object[object.len() - 1] != b'}' {
            self.shared.metrics.drop_records("invalid", 1);
            return false;
        }
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH + 2];
        self.queue(&Encoded {
            id: Cow::Borrowed(new_id(&mut id)),
            members: Cow::Borrowed(&object[1..object.len() - 1]),
        })
    }

    /// Queues a record that `make` makes on the writer's thread from
    /// `data` (copied), in its place among the others. A cheap push for
    /// the request's task: what takes time is done by the writer.
    pub fn push_deferred<M: MakeRecord + 'static>(&self, data: &[u8], make: &Arc<M>) -> bool {
        self.enqueue(|state, seq| {
            let at = state.lines.len();
            state.deferred.push(seq, at, data, make);
        })
    }

    /// Appends `{"seq":N,"record_id":ID,members}\n` to the queue.
    fn queue(&self, record: &Encoded<'_>) -> bool {
        self.enqueue(|state, seq| {
            let lines = &mut state.lines;
            line_head(lines, seq, &record.id);
            if !record.members.is_empty() {
                lines.push(b',');
                lines.extend_from_slice(&record.members);
            }
            lines.extend_from_slice(b"}\n");
        })
    }

    /// Admits one record to the queue (or counts why not: closed, full),
    /// has `add` put it there under the lock with its sequence number, and
    /// wakes the writer when the queue was empty.
    fn enqueue(&self, add: impl FnOnce(&mut QueueState, u64)) -> bool {
        let shared = &self.shared;
        let queue = &*shared.queue;
        let mut state = queue.lock();
        if state.closed || state.records >= queue.capacity {
            let reason = if state.closed { "closed" } else { "queue_full" };
            drop(state);
            shared.metrics.drop_records(reason, 1);
            return false;
        }
        let seq = state.next_seq;
        add(&mut state, seq);
        state.next_seq += 1;
        state.records += 1;
        // Raised under the lock, before the writer can take the record and
        // lower it: the gauge never goes below zero.
        shared.metrics.queued.inc();
        let first = state.records == 1;
        drop(state);
        if first {
            queue.wake.notify_one();
        }
        true
    }

    /// Stops taking records, has the writer store what is queued and fsync,
    /// and returns once it has (at once if the task is not running any
    /// more). Pushes after this are dropped as `closed`.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        let mut done = self.shared.done.clone();
        // An error means the task is gone: nothing is left to wait for.
        if done.wait_for(|finished| *finished).await.is_err() {
            self.shared.queue.lock().closed = true;
        }
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn metrics(&self) -> &ProfileMetrics {
        &self.shared.metrics
    }

    /// Notified after each write, for the shipper.
    pub(crate) fn written(&self) -> Arc<Notify> {
        self.shared.written.clone()
    }

    pub(crate) fn progress(&self) -> Arc<Progress> {
        self.shared.progress.clone()
    }

    /// Lines at or after this position were written by this store's writer.
    pub(crate) fn written_from(&self) -> Position {
        self.shared.written_from
    }
}

/// The store's constructor.
pub struct Store;

impl Store {
    /// Opens (or creates) the store in `options.dir`, repairing the newest
    /// segment. The task must be spawned for records to be written.
    pub fn open(options: StoreOptions) -> Result<(StoreHandle, StoreTask), StoreError> {
        let check = |ok: bool, option, reason| {
            if ok {
                Ok(())
            } else {
                Err(StoreError::Option { option, reason })
            }
        };
        check(
            options.max_file_bytes > 0,
            "max_file_bytes",
            "must be above 0",
        )?;
        check(options.max_files > 0, "max_files", "must be at least 1")?;
        check(
            options.queue_capacity > 0,
            "queue_capacity",
            "must be at least 1",
        )?;
        check(
            !options.fsync_interval.is_zero(),
            "fsync_interval",
            "must be above 0",
        )?;
        let dir = options.dir.clone();
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let progress = Arc::new(Progress::default());
        let writer = SegmentWriter::open(&options, progress.clone())?;
        let written_from = writer.position();
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                lines: Vec::new(),
                deferred: Deferreds::default(),
                records: 0,
                next_seq: writer.next_seq,
                closed: false,
            }),
            wake: Notify::new(),
            capacity: options.queue_capacity,
        });
        let (done_tx, done_rx) = watch::channel(false);
        let cancel = CancellationToken::new();
        let written = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            queue: queue.clone(),
            cancel: cancel.clone(),
            done: done_rx,
            metrics: options.metrics.clone(),
            dir,
            written: written.clone(),
            progress,
            written_from,
        });
        let task = StoreTask {
            queue,
            writer,
            cancel,
            done: done_tx,
            fsync_interval: options.fsync_interval,
            metrics: options.metrics,
            written,
        };
        Ok((StoreHandle { shared }, task))
    }
}

/// The writer. Spawn [`StoreTask::run`]; it ends after a shutdown, or when
/// every handle is gone, having stored and fsynced what was queued.
pub struct StoreTask {
    queue: Arc<Queue>,
    writer: SegmentWriter,
    cancel: CancellationToken,
    done: watch::Sender<bool>,
    fsync_interval: Duration,
    metrics: ProfileMetrics,
    written: Arc<Notify>,
}

impl StoreTask {
    pub async fn run(self) {
        let StoreTask {
            queue,
            writer,
            cancel,
            done,
            fsync_interval,
            metrics,
            written,
        } = self;
        let mut writer = Some(writer);
        let mut batch = Batch::default();
        let mut tick = tokio::time::interval(fsync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stop = tokio::select! {
                biased;
                _ = cancel.cancelled() => true,
                _ = queue.wake.notified() => false,
                _ = tick.tick() => {
                    blocking(&mut writer, move |w| w.sync_if_due(fsync_interval)).await;
                    if writer.is_none() {
                        break;
                    }
                    continue;
                }
            };
            if !stop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(WRITE_WINDOW) => {}
                }
            }
            // Once cancelled, the queue closes as its last batch is taken:
            // whatever was pushed before is written, a push after fails.
            let (records, closed) = queue.take(&mut batch, cancel.is_cancelled());
            if records > 0 {
                metrics.queued.sub(records as i64);
                let mut taken = std::mem::take(&mut batch);
                match blocking(&mut writer, move |w| {
                    let (lines, invalid) = taken.lines();
                    w.metrics.drop_records("invalid", invalid);
                    w.write_lines(lines, records as u64 - invalid);
                    w.sync_if_due(fsync_interval);
                    taken
                })
                .await
                {
                    Some(taken) => batch = taken,
                    None => metrics.drop_records("write_error", records as u64),
                }
                written.notify_one();
            }
            if closed || writer.is_none() {
                break;
            }
        }
        // After a failed writer: nothing more is taken.
        let (lost, _) = queue.take(&mut batch, true);
        metrics.queued.sub(lost as i64);
        metrics.drop_records("write_error", lost as u64);
        blocking(&mut writer, |w| w.sync()).await;
        written.notify_one();
        // Closes the files and releases the lock before anyone waiting for
        // the shutdown can open the store again.
        drop(writer);
        info!("profile store closed");
        let _ = done.send(true);
    }
}

/// Runs `f` on the writer on tokio's blocking pool: file writes and fsyncs
/// must not stall the runtime's workers.
async fn blocking<T: Send + 'static>(
    writer: &mut Option<SegmentWriter>,
    f: impl FnOnce(&mut SegmentWriter) -> T + Send + 'static,
) -> Option<T> {
    let mut w = writer.take()?;
    match tokio::task::spawn_blocking(move || {
        let out = f(&mut w);
        (w, out)
    })
    .await
    {
        Ok((w, out)) => {
            *writer = Some(w);
            Some(out)
        }
        Err(error) => {
            error!(%error, "profile store writer failed; records are no longer stored");
            None
        }
    }
}

/// The segment files as the writer sees them.
struct SegmentWriter {
    /// Holds the directory's lock while open.
    _lock: File,
    dir: PathBuf,
    max_file_bytes: u64,
    max_files: usize,
    /// Segment numbers on disk, oldest first; the last is being written.
    segments: VecDeque<u64>,
    file: File,
    /// Bytes of complete lines in the current segment.
    size: u64,
    next_seq: u64,
    /// Written since the last fsync.
    dirty: bool,
    last_sync: Instant,
    /// After a write error could not be undone: start a new segment first.
    needs_rotation: bool,
    metrics: ProfileMetrics,
    progress: Arc<Progress>,
}

impl SegmentWriter {
    fn open(options: &StoreOptions, progress: Arc<Progress>) -> Result<Self, StoreError> {
        let dir = &options.dir;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: dir.clone() });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StoreError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        let mut segments: VecDeque<u64> = list_segments(dir)
            .map_err(io_error(dir))?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let newest = match segments.back() {
            Some(n) => *n,
            None => {
                create_segment(dir, 1)?;
                segments.push_back(1);
                1
            }
        };
        let path = dir.join(segment_name(newest));
        let size = repair(&path, &options.metrics)?;
        let mut last_seq = None;
        for n in segments.iter().rev() {
            let path = dir.join(segment_name(*n));
            last_seq = last_seq_in(&path).map_err(io_error(&path))?;
            if last_seq.is_some() {
                break;
            }
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        options.metrics.segments.set(segments.len() as i64);
        info!(
            dir = %dir.display(),
            segments = segments.len(),
            next_seq = last_seq.unwrap_or(0) + 1,
            "profile store opened"
        );
        Ok(Self {
            _lock: lock,
            dir: dir.clone(),
            max_file_bytes: options.max_file_bytes,
            max_files: options.max_files,
            segments,
            file,
            size,
            next_seq: last_seq.unwrap_or(0) + 1,
            dirty: false,
            last_sync: Instant::now(),
            needs_rotation: false,
            metrics: options.metrics.clone(),
            progress,
        })
    }

    fn current(&self) -> u64 {
        self.segments.back().copied().unwrap_or(1)
    }

    /// Where the next line goes.
    fn position(&self) -> Position {
        Position {
            segment: self.current(),
            offset: self.size,
        }
    }

    /// Stores `lines` (whole lines, `records` of them), one write(2) per
    /// segment they fall in.
    fn write_lines(&mut self, mut lines: &[u8], mut records: u64) {
        while !lines.is_empty() {
            if self.needs_rotation && !self.rotate() {
                // A segment too large beats records lost.
                self.write(lines, records);
                return;
            }
            let room = self.max_file_bytes.saturating_sub(self.size);
            let (take, n) = if lines.len() as u64 <= room {
                (lines.len(), records)
            } else {
                fitting(lines, room, self.size == 0)
            };
            if take > 0 {
                self.write(&lines[..take], n);
                lines = &lines[take..];
                records -= n;
            }
            if !lines.is_empty() && !self.rotate() {
                self.write(lines, records);
                return;
            }
        }
    }

    /// Writes whole lines to the current segment.
    fn write(&mut self, lines: &[u8], records: u64) {
        match self.file.write_all(lines) {
            Ok(()) => {
                self.size += lines.len() as u64;
                self.dirty = true;
                self.metrics.stored.inc_by(records);
            }
            Err(error) => {
                error!(
                    %error,
                    segment = %segment_name(self.current()),
                    records,
                    "cannot write profile records"
                );
                self.metrics.drop_records("write_error", records);
                // A short write leaves part of a line: cut it, or the next
                // line would be glued to it.
                if let Err(error) = self.file.set_len(self.size) {
                    error!(%error, "cannot cut a partial profile line; starting a new segment");
                    self.needs_rotation = true;
                }
            }
        }
    }

    /// Closes the current segment and starts the next, then applies
    /// retention; `false` when no new segment could be started.
    fn rotate(&mut self) -> bool {
        self.sync();
        let next = self.current() + 1;
        let path = self.dir.join(segment_name(next));
        let file = create_segment(&self.dir, next).and_then(|()| {
            OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_error(&path))
        });
        match file {
            Ok(file) => {
                self.file = file;
                self.size = 0;
                self.needs_rotation = false;
                self.segments.push_back(next);
            }
            Err(error) => {
                // Keep appending to the current segment: a segment too
                // large beats records lost.
                error!(%error, "cannot start a new profile segment");
                return false;
            }
        }
        while self.segments.len() > self.max_files {
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            self.delete(oldest);
        }
        self.metrics.segments.set(self.segments.len() as i64);
        true
    }

    fn delete(&mut self, n: u64) {
        let path = self.dir.join(segment_name(n));
        let unshipped = match self.progress.get() {
            None => 0,
            Some(at) if n < at.segment => 0,
            Some(at) => {
                let from = if n == at.segment { at.offset } else { 0 };
                count_lines_from(&path, from).unwrap_or_else(|error| {
                    warn!(%error, path = %path.display(), "cannot count the records of a segment");
                    0
                })
            }
        };
        match fs::remove_file(&path) {
            Ok(()) => {
                self.metrics.drop_records("retention", unshipped);
                if unshipped > 0 {
                    warn!(
                        segment = %segment_name(n),
                        unshipped,
                        "profile segment deleted by retention before it was shipped"
                    );
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                error!(%error, path = %path.display(), "cannot delete an old profile segment")
            }
        }
    }

    fn sync_if_due(&mut self, interval: Duration) {
        if self.dirty && self.last_sync.elapsed() >= interval {
            self.sync();
        }
    }

    fn sync(&mut self) {
        if !self.dirty {
            return;
        }
        match self.file.sync_data() {
            Ok(()) => {
                self.dirty = false;
                self.last_sync = Instant::now();
            }
            Err(error) => error!(%error, "cannot fsync the profile segment"),
        }
    }
}

/// The whole lines at the start of `lines` that fit in `room` bytes, and
/// how many they are; the first line even if it does not fit when `empty`
/// (a line larger than a segment gets one of its own).
fn fitting(lines: &[u8], room: u64, empty: bool) -> (usize, u64) {
    let mut end = 0;
    let mut n = 0;
    for at in memchr::memchr_iter(b'\n', lines) {
        if (at + 1) as u64 > room && !(empty && n == 0) {
            break;
        }
        end = at + 1;
        n += 1;
        if end as u64 >= room {
            break;
        }
    }
    (end, n)
}

/// Creates segment `n`, empty, and makes its name durable.
fn create_segment(dir: &Path, n: u64) -> Result<(), StoreError> {
    let path = dir.join(segment_name(n));
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|f| f.sync_all())
        .map_err(io_error(&path))?;
    sync_dir(dir).map_err(io_error(dir))
}

/// fsync of a directory, so that a file created or renamed in it survives
/// power loss.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Cuts a trailing partial line off `path`; returns the size left.
fn repair(path: &Path, metrics: &ProfileMetrics) -> Result<u64, StoreError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    let end = match last_newline(&mut file, len).map_err(io_error(path))? {
        Some(at) => at + 1,
        None => 0,
    };
    if end < len {
        file.set_len(end)
            .and_then(|()| file.sync_all())
            .map_err(io_error(path))?;
        metrics.drop_records("partial_line", 1);
        warn!(
            path = %path.display(),
            bytes = len - end,
            "cut a partial profile record left by a crash"
        );
    }
    Ok(end)
}

/// The offset of the last `\n` before `end`.
fn last_newline(file: &mut File, end: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(buf.len() as u64);
        let n = (hi - lo) as usize;
        file.seek(SeekFrom::Start(lo))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = memchr::memrchr(b'\n', &buf[..n]) {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

/// `seq` of the last line that has one, in a segment of complete lines
/// (lines without one, garbage a power loss can leave, are passed over).
fn last_seq_in(path: &Path) -> io::Result<Option<u64>> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    // `end`: the offset of the newline that ends the line looked at.
    let Some(mut end) = last_newline(&mut file, len)? else {
        return Ok(None);
    };
    let mut skipped = 0u64;
    loop {
        let start = last_newline(&mut file, end)?.map_or(0, |i| i + 1);
        let mut line = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut line)?;
        if let Ok(s) = serde_json::from_slice::<Seq>(&line) {
            if skipped > 0 {
                warn!(path = %path.display(), lines = skipped, "profile lines without a seq at the end of a segment");
            }
            return Ok(Some(s.seq));
        }
        skipped += 1;
        if start == 0 {
            return Ok(None);
        }
        end = start - 1;
    }
}

/// Complete lines in `path` from byte `from` on.
fn count_lines_from(path: &Path, from: u64) -> io::Result<u64> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
    }
}
