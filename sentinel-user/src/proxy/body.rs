//! Body wrappers on the streaming path: nothing here buffers.
//!
//! - [`Limited`] counts a request body as it streams and fails it at the
//!   configured limit (413), and marks the client's own framing errors (an
//!   invalid chunk, a short body) so they answer 400, not 502.
//! - [`ReadTimeout`] fails a response body whose upstream stalls longer
//!   than the read timeout between frames.
//! - [`Tracked`] holds a guard until the response body has been written
//!   out, so the connection knows when it is idle.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is over the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("malformed request body: {source}")]
    Client {
        #[source]
        source: BoxError,
    },
    #[error("upstream sent nothing for {after:?} while streaming the response body")]
    UpstreamStalled { after: Duration },
}

/// How far a request body has come, for telling a client that stalls its
/// body from an upstream that stalls its answer.
pub struct BodyProgress {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last frame read from the client.
    last_ms: AtomicU64,
    /// Milliseconds since `epoch`, plus one, when the body ended; 0 before.
    done_ms: AtomicU64,
}

impl BodyProgress {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            done_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn frame(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn done(&self) {
        if self.done_ms.load(Ordering::Relaxed) == 0 {
            self.done_ms.store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// Who owes the next bytes, and since when: `(true, t)` while the
    /// client's body is unfinished (its last frame came at `t`), `(false,
    /// t)` once it ended at `t`.
    pub fn owed(&self) -> (bool, Instant) {
        match self.done_ms.load(Ordering::Relaxed) {
            0 => (
                true,
                self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)),
            ),
            done => (false, self.epoch + Duration::from_millis(done - 1)),
        }
    }
}

impl Default for BodyProgress {
    fn default() -> Self {
        Self::new()
    }
}

pin_project! {
    pub struct Limited<B> {
        #[pin]
        inner: B,
        seen: u64,
        // 0: no limit.
        limit: u64,
        progress: Option<Arc<BodyProgress>>,
    }
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        Self {
            inner,
            seen: 0,
            limit,
            progress: None,
        }
    }

    /// Records each frame and the end of the body in `progress`.
    pub fn with_progress(mut self, progress: Arc<BodyProgress>) -> Self {
        self.progress = Some(progress);
        self
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        if let Some(progress) = this.progress.as_deref() {
            match &polled {
                // hyper stops polling a body that says it has ended, so
                // its end is noted with its last frame.
                Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => progress.done(),
                Poll::Ready(Some(Ok(_))) => progress.frame(),
                Poll::Ready(None) => progress.done(),
                _ => {}
            }
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.limit != 0 && *this.seen > *this.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyError::TooLarge {
                            limit: *this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(Box::new(BodyError::Client { source: e.into() }))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let ended = self.inner.is_end_stream();
        if ended && let Some(progress) = &self.progress {
            progress.done();
        }
        ended
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    pub struct ReadTimeout<B> {
        #[pin]
        inner: B,
        // Armed at the first frame that is not ready: most small responses
        // arrive whole and never touch the timer wheel.
        sleep: Option<Pin<Box<Sleep>>>,
        // A frame came since the timer was last set.
        progressed: bool,
        after: Duration,
        // The request's whole deadline (listener `request-timeout-secs`).
        hard: Option<Instant>,
    }
}

impl<B> ReadTimeout<B> {
    pub fn new(inner: B, after: Duration) -> Self {
        Self {
            inner,
            sleep: None,
            progressed: false,
            after,
            hard: None,
        }
    }

    /// Also fails the body at `deadline`, progress or not.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.hard = deadline;
        self
    }
}

impl<B> Body for ReadTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                // Progress: the next wait starts its own clock.
                *this.progressed = true;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let after = *this.after;
                let sleep = match this.sleep {
                    Some(sleep) => {
                        if std::mem::take(this.progressed) {
                            sleep.as_mut().reset(tokio::time::Instant::now() + after);
                        }
                        sleep
                    }
                    None => this.sleep.insert(Box::pin(tokio::time::sleep(after))),
                };
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(Box::new(BodyError::UpstreamStalled { after }))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    pub struct Tracked<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Tracked<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body, G> Body for Tracked<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // Finished: release now rather than when hyper drops the body.
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Finds one of our body errors in an error's chain.
pub fn find_body_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<BodyError>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn limited_fails_past_the_limit_only() {
        let ok = Limited::new(Full::new(Bytes::from_static(b"12345")), 5);
        assert_eq!(
            ok.collect().await.expect("within limit").to_bytes(),
            "12345"
        );
        let over = Limited::new(Full::new(Bytes::from_static(b"123456")), 5);
        let err = over.collect().await.expect_err("over the limit");
        assert!(matches!(
            find_body_error(err.as_ref()),
            Some(BodyError::TooLarge { limit: 5 })
        ));
        let unlimited = Limited::new(Full::new(Bytes::from(vec![0u8; 1 << 20])), 0);
        assert_eq!(
            unlimited
                .collect()
                .await
                .expect("no limit")
                .to_bytes()
                .len(),
            1 << 20
        );
    }

    /// One frame, then silence.
    struct Stall {
        sent: bool,
    }

    impl Body for Stall {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.sent {
                Poll::Pending
            } else {
                self.sent = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn read_timeout_fires_between_frames() {
        let mut body = std::pin::pin!(ReadTimeout::new(
            Stall { sent: false },
            Duration::from_secs(1)
        ));
        assert!(body.frame().await.expect("a frame").is_ok());
        let err = body.frame().await.expect("an error").expect_err("stalled");
        assert!(matches!(
            find_body_error(err.as_ref()),
            Some(BodyError::UpstreamStalled { .. })
        ));
    }
}
