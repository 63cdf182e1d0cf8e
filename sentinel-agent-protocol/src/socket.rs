//! A Unix stream for the agent transport that the reactor wakes only when
//! there is something to read.
//!
//! Linux calls a Unix socket's `sk_write_space` each time the peer consumes
//! one of its messages (`sock_wfree` -> `unix_write_space`), and that wakes
//! every epoll watching the socket for `EPOLLOUT`, edge-triggered or not.
//! tokio registers its `UnixStream` for reading and writing at once, so on
//! a request-answer exchange each side's event loop is woken once per call
//! for nothing: the proxy when the agent reads the request, the agent when
//! the proxy reads the answer. On a small machine that is a context switch
//! and a trip through the reactor per call on each side.
//!
//! Here the stream is registered for `EPOLLIN` only. Writes go straight to
//! the socket; only a write that would block (the peer is not reading and
//! the send buffer is full) registers a second descriptor of the same
//! socket for `EPOLLOUT`, for as long as that write and its flush last.

use std::{
    io::{self, Read as _, Write as _},
    net::Shutdown,
    os::unix::net::UnixStream as StdStream,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use tokio::io::{
    AsyncRead, AsyncWrite, Interest, ReadBuf,
    unix::{AsyncFd, AsyncFdReadyGuard},
};

/// Splits a connected stream into halves registered as above. Must be
/// called within a tokio runtime.
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    // `into_std` leaves the socket non-blocking, which AsyncFd needs.
    let std = stream.into_std()?;
    let fd = Arc::new(register(std, Interest::READABLE)?);
    Ok((
        ReadHalf { fd: fd.clone() },
        WriteHalf { fd, writable: None },
    ))
}

fn register(stream: StdStream, interest: Interest) -> io::Result<AsyncFd<StdStream>> {
    // SAFETY: the AsyncFd owns `stream`, whose descriptor stays open and
    // names the same socket until the AsyncFd drops it; nothing here
    // replaces the stream it holds.
    Ok(unsafe { AsyncFd::register_with_interest(stream, interest) }?)
}

/// The reading half. The socket closes when both halves are dropped.
pub struct ReadHalf {
    fd: Arc<AsyncFd<StdStream>>,
}

/// The writing half. Dropping it shuts the socket's write side down, as
/// tokio's own halves do, so that the peer reads the end of the stream.
pub struct WriteHalf {
    fd: Arc<AsyncFd<StdStream>>,
    /// A duplicate descriptor registered for `EPOLLOUT`, only while a
    /// write waits for room.
    writable: Option<AsyncFd<StdStream>>,
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let wanted = unfilled.len();
            match guard.try_io(|fd| {
                let mut stream: &StdStream = fd.get_ref();
                stream.read(unfilled)
            }) {
                Ok(Ok(n)) => {
                    // A short read drained the socket: the next one would
                    // only say EAGAIN. Readiness that arrived since is
                    // kept (the guard clears only what it saw).
                    if n > 0 && n < wanted {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all; readiness was cleared.
                Err(_would_block) => continue,
            }
        }
    }
}

impl WriteHalf {
    /// Waits until the socket has room, through the `EPOLLOUT`
    /// registration (made on first need).
    fn poll_room(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<AsyncFdReadyGuard<'_, StdStream>>> {
        if self.writable.is_none() {
            // Registered after the write that failed: if room was made in
            // between, epoll reports it at once on registration.
            let dup = self.fd.get_ref().try_clone()?;
            self.writable = Some(register(dup, Interest::WRITABLE)?);
        }
        match &self.writable {
            Some(w) => w.poll_write_ready(cx),
            None => unreachable!("registered just above"),
        }
    }

    fn write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&StdStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.fd.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut guard = ready!(self.poll_room(cx))?;
                    // What the registration saw is used up by the retry.
                    guard.clear_ready();
                }
                done => return Poll::Ready(done),
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(cx, |mut fd| fd.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |mut fd| fd.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here; what a wait for room registered goes,
        // so that the peer's reads stop waking this side.
        self.get_mut().writable = None;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.writable = None;
        Poll::Ready(this.fd.get_ref().shutdown(Shutdown::Write))
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        let _ = self.fd.get_ref().shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn bytes_cross_both_ways_and_dropping_the_writer_ends_the_stream() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut ar, mut aw) = split(a).unwrap();
        let (mut br, mut bw) = split(b).unwrap();
        aw.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        br.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        bw.write_all(b"pong").await.unwrap();
        ar.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop(aw);
        let mut rest = Vec::new();
        br.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_write_larger_than_the_socket_buffer_waits_for_room() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ar, mut aw) = split(a).unwrap();
        let (mut br, _bw) = split(b).unwrap();
        // Far more than a Unix socket buffers: the writer must block and be
        // woken as the reader makes room.
        let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| i as u8).collect();
        let want = big.clone();
        let writer = tokio::spawn(async move {
            aw.write_all(&big).await.unwrap();
            aw.flush().await.unwrap();
            aw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        br.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == want, "the bytes arrived changed or incomplete");
    }
}
