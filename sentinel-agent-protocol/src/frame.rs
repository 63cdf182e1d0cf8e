//! Unix-socket framing: a 4-byte big-endian length, then that many bytes
//! of JSON. A length over the limit is refused before anything is read or
//! allocated for it.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::MAX_MESSAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut body = Vec::new();
    Ok(read_frame_into(reader, max, &mut body)
        .await?
        .then_some(body))
}

/// [`read_frame`] into `body`, whose allocation is kept from one frame to
/// the next. `Ok(false)` is a clean end of stream between frames.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
    body: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        let n = reader.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    body.clear();
    body.resize(len, 0);
    reader.read_exact(body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(true)
}

/// Frames read from a stream in whatever pieces it delivers them, for a
/// reader that may stop between any two polls and resume later, or in
/// another task: what has arrived stays here, never in a future. Frame
/// lengths over the limit are refused before room is made for them.
pub struct FrameBuffer {
    /// Initialized bytes; `start..end` are read and not yet taken.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
}

/// Room a read asks for at least.
const READ_ROOM: usize = 8 * 1024;

impl FrameBuffer {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max,
        }
    }

    /// The length the next frame announces, when its prefix has arrived.
    fn announced(&self) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = self.buf.get(self.start..self.start + 4) else {
            return Ok(None);
        };
        if self.end - self.start < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }

    /// The next whole frame's bytes, if it has arrived; taken from the
    /// buffer.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let Some(len) = self.announced()? else {
            return Ok(None);
        };
        let at = self.start + 4;
        if self.end - at < len {
            return Ok(None);
        }
        self.start = at + len;
        Ok(Some(&self.buf[at..at + len]))
    }

    /// Reads what the stream has into the buffer: `Ready(Ok(n))` with the
    /// bytes read, `Ready(Ok(0))` at the end of the stream between frames,
    /// [`FrameError::Truncated`] at its end inside one.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<usize, FrameError>> {
        use std::task::Poll;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        // A frame whose length is known gets room for all of it at once.
        let want = match self.announced()? {
            Some(len) => (4 + len).saturating_sub(self.end - self.start),
            None => 4,
        }
        .max(READ_ROOM);
        if self.buf.len() - self.end < want {
            // Moved to the front first, so the buffer grows only for a
            // frame larger than it.
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() - self.end < want {
                self.buf.resize(self.end + want, 0);
            }
        }
        let mut room = tokio::io::ReadBuf::new(&mut self.buf[self.end..]);
        match std::pin::Pin::new(reader).poll_read(cx, &mut room) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(FrameError::Io(e))),
            Poll::Ready(Ok(())) => {
                let n = room.filled().len();
                self.end += n;
                if n == 0 && self.start != self.end {
                    return Poll::Ready(Err(FrameError::Truncated));
                }
                Poll::Ready(Ok(n))
            }
        }
    }
}

/// The frame of `json`: its length prefix and the bytes, in one buffer so
/// that one write puts it on the socket.
pub fn encode(json: &[u8]) -> Result<Vec<u8>, FrameError> {
    if json.len() > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge {
            len: json.len(),
            max: MAX_MESSAGE_SIZE,
        });
    }
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
    Ok(out)
}

/// The frame of `value` as JSON, serialized straight into the buffer that
/// goes on the socket, behind a length prefix filled in afterwards.
pub fn encode_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(1024);
    encode_json_into(&mut out, value)?;
    Ok(out)
}

/// Appends the frame of `value` to `out`; on an error `out` is left as it
/// was.
pub fn encode_json_into<T: serde::Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        out.truncate(start);
        return Err(FrameError::Io(e.into()));
    }
    let len = out.len() - start - 4;
    if len > MAX_MESSAGE_SIZE {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: MAX_MESSAGE_SIZE,
        });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    json: &[u8],
) -> Result<(), FrameError> {
    let frame = encode(json)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

/// Frames from many tasks onto one stream, without a task of its own.
///
/// A caller queues its frame and, when no other caller is writing, writes
/// everything queued in one go, from its own task: alone, a frame leaves at
/// once, with no hand-over to a writer task; under contention frames leave
/// in batches, one system call for many. A write that fails, or a caller
/// dropped in the middle of one (which would leave half a frame on the
/// stream), breaks the writer for good: every later [`send`] fails, and
/// the connection is to be closed.
///
/// [`send`]: SharedWriter::send
pub struct SharedWriter<W> {
    queued: Mutex<Vec<u8>>,
    /// The stream, and the buffer the writing caller swaps with the queue
    /// (so that neither is allocated again per batch).
    out: tokio::sync::Mutex<(W, Vec<u8>)>,
    broken: AtomicBool,
}

/// Breaks the writer unless disarmed: a write cut short by cancellation.
struct Armed<'a>(&'a AtomicBool);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl<W: AsyncWrite + Unpin> SharedWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            queued: Mutex::new(Vec::new()),
            out: tokio::sync::Mutex::new((out, Vec::new())),
            broken: AtomicBool::new(false),
        }
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a write failed or was cut short.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    fn broken_error() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "an earlier write on this connection failed",
        )
    }

    /// Queues `frame` (already framed) and writes what is queued unless
    /// another caller is writing, in which case that caller writes it.
    pub async fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        if self.is_broken() {
            return Err(Self::broken_error());
        }
        self.queued().extend_from_slice(frame);
        self.write_queued().await
    }

    /// Serializes `value`'s frame straight into the queue, to be written
    /// by the next [`write_queued`](SharedWriter::write_queued) (this
    /// caller's or another's). On an error nothing is queued.
    pub fn queue_json<T: serde::Serialize + ?Sized>(&self, value: &T) -> Result<(), FrameError> {
        encode_json_into(&mut self.queued(), value)
    }

    /// [`queue_json`](SharedWriter::queue_json) for an answer, written
    /// directly when it is a common one ([`crate::json::write_response`]).
    pub fn queue_response(&self, response: &crate::AgentResponse) -> Result<(), FrameError> {
        let mut queued = self.queued();
        let start = queued.len();
        queued.extend_from_slice(&[0; 4]);
        if let Err(e) = crate::json::write_response(&mut queued, response) {
            queued.truncate(start);
            return Err(FrameError::Io(e.into()));
        }
        let len = queued.len() - start - 4;
        if len > MAX_MESSAGE_SIZE {
            queued.truncate(start);
            return Err(FrameError::TooLarge {
                len,
                max: MAX_MESSAGE_SIZE,
            });
        }
        queued[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    /// Writes what is queued unless another caller is writing, in which
    /// case that caller writes it.
    pub async fn write_queued(&self) -> std::io::Result<()> {
        if self.is_broken() {
            return Err(Self::broken_error());
        }
        loop {
            let Ok(mut out) = self.out.try_lock() else {
                // The writer holding it looks at the queue again after it
                // lets go, so this frame is not left behind.
                return Ok(());
            };
            let (stream, batch) = &mut *out;
            loop {
                batch.clear();
                std::mem::swap(&mut *self.queued(), batch);
                if batch.is_empty() {
                    break;
                }
                let armed = Armed(&self.broken);
                let written = async {
                    stream.write_all(batch).await?;
                    stream.flush().await
                }
                .await;
                std::mem::forget(armed);
                if let Err(e) = written {
                    self.broken.store(true, Ordering::Release);
                    return Err(e);
                }
            }
            drop(out);
            if self.queued().is_empty() || self.is_broken() {
                return if self.is_broken() {
                    Err(Self::broken_error())
                } else {
                    Ok(())
                };
            }
        }
    }

    /// Shuts the stream's write side down, after what is queued.
    pub async fn shutdown(&self) -> std::io::Result<()> {
        let mut out = self.out.lock().await;
        let rest = std::mem::take(&mut *self.queued());
        if !rest.is_empty() && !self.is_broken() {
            out.0.write_all(&rest).await?;
        }
        out.0.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame of `wire`, read through a [`FrameBuffer`] from a stream
    /// that delivers `piece` bytes at a time, and how the stream ended.
    async fn frames_of(wire: &[u8], piece: usize, max: usize) -> (Vec<Vec<u8>>, FrameError) {
        let (mut tx, mut rx) = tokio::io::duplex(piece);
        let wire = wire.to_vec();
        let writer = tokio::spawn(async move {
            for chunk in wire.chunks(piece) {
                tx.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut buffer = FrameBuffer::new(max);
        let mut frames = Vec::new();
        let end = loop {
            match buffer.next_frame() {
                Ok(Some(frame)) => {
                    frames.push(frame.to_vec());
                    continue;
                }
                Ok(None) => {}
                Err(e) => break e,
            }
            match std::future::poll_fn(|cx| buffer.poll_fill(&mut rx, cx)).await {
                Ok(0) => break FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        writer.await.unwrap();
        (frames, end)
    }

    #[tokio::test]
    async fn a_frame_buffer_reads_frames_in_any_pieces() {
        let payloads: Vec<Vec<u8>> = vec![
            b"{}".to_vec(),
            Vec::new(),
            vec![b'x'; 20_000],
            b"[1,2,3]".to_vec(),
        ];
        let mut wire = Vec::new();
        for p in &payloads {
            wire.extend_from_slice(&(p.len() as u32).to_be_bytes());
            wire.extend_from_slice(p);
        }
        for piece in [1, 3, 4, 5, 4096, 100_000] {
            let (frames, end) = frames_of(&wire, piece, MAX_MESSAGE_SIZE).await;
            assert_eq!(frames, payloads, "pieces of {piece}");
            assert!(
                matches!(&end, FrameError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
                "a clean end between frames, pieces of {piece}: {end:?}"
            );
        }
        // Cut inside a prefix and inside a payload.
        for cut in [wire.len() - 3, wire.len() - 9] {
            let (_, end) = frames_of(&wire[..cut], 7, MAX_MESSAGE_SIZE).await;
            assert!(matches!(end, FrameError::Truncated), "{end:?}");
        }
        // A length over the limit is refused once its prefix is in.
        let mut big = wire.clone();
        big.extend_from_slice(&(1_000_000u32).to_be_bytes());
        let (frames, end) = frames_of(&big, 2, 50_000).await;
        assert_eq!(frames, payloads);
        assert!(
            matches!(
                end,
                FrameError::TooLarge {
                    len: 1_000_000,
                    max: 50_000
                }
            ),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, br#"{"version":1}"#).await.unwrap();
        write_frame(&mut a, b"").await.unwrap();
        drop(a);
        assert_eq!(
            read_frame(&mut b, 100).await.unwrap().unwrap(),
            br#"{"version":1}"#
        );
        assert_eq!(read_frame(&mut b, 100).await.unwrap().unwrap(), b"");
        assert!(read_frame(&mut b, 100).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&1000u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame(&mut b, 999).await,
            Err(FrameError::TooLarge {
                len: 1000,
                max: 999
            })
        ));

        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"abc").await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b, 100).await,
            Err(FrameError::Truncated)
        ));

        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b, 100).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_writer_loses_and_mixes_no_frame() {
        let (a, mut b) = tokio::io::duplex(64);
        let writer = std::sync::Arc::new(SharedWriter::new(a));
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                let payload = format!("{{\"n\":{i}}}");
                w.send(&encode(payload.as_bytes()).unwrap()).await.unwrap();
            }));
        }
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(Some(frame)) = read_frame(&mut b, 100).await {
                seen.push(String::from_utf8(frame).unwrap());
            }
            seen
        });
        for t in tasks {
            t.await.unwrap();
        }
        writer.shutdown().await.unwrap();
        let mut seen = reader.await.unwrap();
        seen.sort();
        let mut want: Vec<String> = (0..200).map(|i| format!("{{\"n\":{i}}}")).collect();
        want.sort();
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn a_write_cut_short_breaks_the_writer() {
        // A peer that never reads: the first big write cannot finish.
        let (a, _b) = tokio::io::duplex(16);
        let writer = SharedWriter::new(a);
        let big = encode(&[b'x'; 1000]).unwrap();
        let cut =
            tokio::time::timeout(std::time::Duration::from_millis(50), writer.send(&big)).await;
        assert!(cut.is_err(), "the write could not finish");
        assert!(writer.is_broken());
        assert!(writer.send(b"\0\0\0\0").await.is_err());
    }

    #[test]
    fn encode_json_frames_what_to_json_writes() {
        let request =
            crate::AgentRequest::new(crate::Event::RequestHeaders(crate::RequestHeadersEvent {
                uri: "/a?b=\"c\"".into(),
                ..Default::default()
            }));
        assert_eq!(
            encode_json(&request).unwrap(),
            encode(&request.to_json()).unwrap()
        );
    }

    #[test]
    fn encode_refuses_messages_over_the_protocol_limit() {
        let big = vec![b' '; MAX_MESSAGE_SIZE + 1];
        assert!(encode(&big).is_err());
        assert_eq!(&encode(b"{}").unwrap()[..4], &[0, 0, 0, 2]);
    }
}
