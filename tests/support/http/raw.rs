//! A client for hand-written HTTP/1 bytes: malformed heads, smuggling
//! attempts, stalled and pipelined requests, upgrades.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::connect;

/// A plain TCP connection for hand-written HTTP/1 bytes.
pub struct Raw {
    stream: TcpStream,
    /// Read but not yet consumed.
    buf: Vec<u8>,
}

/// A response read by [`Raw`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The head, status line to the blank line, as text.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// A header value (first occurrence), by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: connect(addr).await,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes`; an error when the peer has closed.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Closes the sending side (a TCP FIN), leaving the connection open to
    /// read.
    pub async fn shut_write(&mut self) {
        self.stream
            .shutdown()
            .await
            .unwrap_or_else(|e| panic!("cannot shut the connection's sending side: {e}"));
    }

    /// Reads more into the buffer; `false` on EOF, reset or timeout.
    async fn fill(&mut self, until: Instant) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next response head, or `None` when the connection closed or
    /// `wait` passed first.
    pub async fn head(&mut self, wait: Duration) -> Option<String> {
        let until = Instant::now() + wait;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Some(String::from_utf8_lossy(&head[..end]).into_owned());
            }
            if !self.fill(until).await {
                return None;
            }
        }
    }

    /// The next whole response (a Content-Length or chunked body, else
    /// everything up to the close), or `None` as for [`Raw::head`].
    pub async fn response(&mut self, wait: Duration) -> Option<RawResponse> {
        let until = Instant::now() + wait;
        let head = self.head(wait).await?;
        let status = status_of(&head);
        let mut response = RawResponse {
            status,
            head,
            body: Vec::new(),
        };
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length = response
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        if status == 101 || status == 304 || status == 204 {
            return Some(response);
        }
        if chunked {
            // Enough for the short bodies these tests read this way.
            while find(&self.buf, b"0\r\n\r\n").is_none() {
                if !self.fill(until).await {
                    return None;
                }
            }
            response.body = std::mem::take(&mut self.buf);
        } else if let Some(n) = length {
            while self.buf.len() < n {
                if !self.fill(until).await {
                    return None;
                }
            }
            response.body = self.buf.drain(..n).collect();
        } else {
            while self.fill(until).await {}
            response.body = std::mem::take(&mut self.buf);
        }
        Some(response)
    }

    /// Reads exactly `n` bytes (after any response), or `None` on close or
    /// timeout.
    pub async fn read_exact(&mut self, n: usize, wait: Duration) -> Option<Vec<u8>> {
        let until = Instant::now() + wait;
        while self.buf.len() < n {
            if !self.fill(until).await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// Waits for the peer to close the connection (EOF or reset),
    /// discarding whatever arrives; how long that took, or `None` if it
    /// is still open after `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = wait.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                Ok(Ok(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// One request's bytes on a new connection; the response, or `None` when
/// the connection closed without one.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<RawResponse> {
    let mut raw = Raw::connect(addr).await;
    // The peer may answer and close before reading everything.
    let _ = raw.send(bytes).await;
    raw.response(Duration::from_secs(10)).await
}

/// The status code of a response head, 0 if it has none.
pub fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
