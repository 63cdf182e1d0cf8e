//! The CLI side of the admin API: blocking, one request at a time.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;

use super::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the sentinel daemon at {path}: {source} (is `sentinel run` running?)", path = .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to the sentinel daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent a malformed response: {0}")]
    Malformed(String),
    /// The daemon refused the request; its reason.
    #[error("{0}")]
    Refused(String),
}

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        // Generous: a million-entry import takes seconds, not minutes.
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        stream.set_write_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends `request` and decodes the result as `T`.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| ClientError::Malformed(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        self.answer()
    }

    /// Sends the body an `import_packed` request asked for and decodes the
    /// result as `T`.
    pub fn send_body<T: DeserializeOwned>(&mut self, body: &[u8]) -> Result<T, ClientError> {
        self.writer.write_all(body)?;
        self.answer()
    }

    fn answer<T: DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(ClientError::Malformed(
                "connection closed without a response".into(),
            ));
        }
        let response: Response =
            serde_json::from_str(&answer).map_err(|e| ClientError::Malformed(e.to_string()))?;
        if !response.ok {
            return Err(ClientError::Refused(
                response.error.unwrap_or_else(|| "request refused".into()),
            ));
        }
        let result = response.result.as_deref().map_or("null", |raw| raw.get());
        serde_json::from_str(result).map_err(|e| ClientError::Malformed(e.to_string()))
    }
}
