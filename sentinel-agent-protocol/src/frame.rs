//! Unix-socket framing: a 4-byte big-endian length, then that many bytes
//! of JSON. A length over the limit is refused before anything is read or
//! allocated for it.

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
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        let n = reader.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
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
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(Some(body))
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn encode_refuses_messages_over_the_protocol_limit() {
        let big = vec![b' '; MAX_MESSAGE_SIZE + 1];
        assert!(encode(&big).is_err());
        assert_eq!(&encode(b"{}").unwrap()[..4], &[0, 0, 0, 2]);
    }
}
