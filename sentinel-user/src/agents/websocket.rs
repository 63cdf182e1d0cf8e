//! WebSocket frames through the agents subscribed to `websocket_frame`.
//!
//! After a successful upgrade, both directions are read frame by frame
//! (RFC 6455 §5.2). Each frame's unmasked payload goes to every subscribed
//! agent in order before the frame is forwarded; a `block` closes both
//! sides with status 1008 (policy violation), a body mutation replaces the
//! payload. A frame larger than [`MAX_INSPECTED_FRAME`] cannot be sent to
//! an agent: a filter that fails closed then closes the connection, one
//! that fails open lets it through uninspected.

use std::sync::Arc;

use sentinel_agent_protocol::{Event, WebsocketFrameEvent, WebsocketOpcode};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::Mutex,
};
use tracing::{debug, info};

use super::pipeline::Exchange;
use crate::config::{AgentEvent, FailureMode};

/// Largest frame payload sent to an agent.
pub const MAX_INSPECTED_FRAME: u64 = 1024 * 1024;

/// 1008: policy violation.
const CLOSE_POLICY: u16 = 1008;

struct Header {
    fin: bool,
    /// RSV bits and opcode, as received.
    first: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
}

async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Header>> {
    let mut two = [0u8; 2];
    match r.read_exact(&mut two).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = match two[1] & 0x7f {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    let mask = if two[1] & 0x80 != 0 {
        let mut key = [0u8; 4];
        r.read_exact(&mut key).await?;
        Some(key)
    } else {
        None
    };
    Ok(Some(Header {
        fin: two[0] & 0x80 != 0,
        first: two[0],
        opcode: two[0] & 0x0f,
        mask,
        len,
    }))
}

fn encode_header(first: u8, mask: Option<[u8; 4]>, len: u64) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out
}

fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// A close frame with `code`, masked when `masked` (towards a server).
fn close_frame(code: u16, masked: bool) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let key = masked.then_some([0x5e, 0x47, 0x1a, 0x3c]);
    let mut out = encode_header(0x88, key, payload.len() as u64);
    if let Some(k) = key {
        apply_mask(&mut payload, k);
    }
    out.extend_from_slice(&payload);
    out
}

/// What happened to a frame.
enum Fate {
    Forward(Vec<u8>),
    Close,
}

/// Carries one direction until either side ends or an agent blocks.
async fn direction<R, W>(
    exchange: Arc<Exchange>,
    mut from: R,
    to: Arc<Mutex<W>>,
    back: Arc<Mutex<impl AsyncWrite + Unpin>>,
    client_to_server: bool,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut index = 0u64;
    loop {
        let header = match read_header(&mut from).await {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => break,
        };
        if header.len > MAX_INSPECTED_FRAME {
            let closed = exchange
                .agents
                .filters
                .iter()
                .filter(|f| f.wants(AgentEvent::WebsocketFrame))
                .any(|f| f.failure_mode == FailureMode::Closed);
            if closed && exchange.enforce {
                info!(
                    len = header.len,
                    "WebSocket frame too large to inspect; closing (fails closed)"
                );
                let _ = back
                    .lock()
                    .await
                    .write_all(&close_frame(CLOSE_POLICY, !client_to_server))
                    .await;
                let _ = to
                    .lock()
                    .await
                    .write_all(&close_frame(CLOSE_POLICY, client_to_server))
                    .await;
                break;
            }
            // Uninspected: copy it as it comes.
            let head = encode_header(header.first, header.mask, header.len);
            let mut w = to.lock().await;
            if w.write_all(&head).await.is_err() {
                break;
            }
            let mut limited = (&mut from).take(header.len);
            if tokio::io::copy(&mut limited, &mut *w).await.is_err() {
                break;
            }
            continue;
        }
        let mut payload = vec![0u8; header.len as usize];
        if from.read_exact(&mut payload).await.is_err() {
            break;
        }
        let mut plain = payload.clone();
        if let Some(key) = header.mask {
            apply_mask(&mut plain, key);
        }
        let fate = inspect(&exchange, &header, plain, client_to_server, index).await;
        index += 1;
        match fate {
            Fate::Forward(plain) => {
                let mut data = plain;
                if let Some(key) = header.mask {
                    apply_mask(&mut data, key);
                }
                let mut frame = encode_header(header.first, header.mask, data.len() as u64);
                frame.extend_from_slice(&data);
                if to.lock().await.write_all(&frame).await.is_err() {
                    break;
                }
            }
            Fate::Close => {
                let _ = back
                    .lock()
                    .await
                    .write_all(&close_frame(CLOSE_POLICY, !client_to_server))
                    .await;
                let _ = to
                    .lock()
                    .await
                    .write_all(&close_frame(CLOSE_POLICY, client_to_server))
                    .await;
                break;
            }
        }
    }
    let _ = to.lock().await.shutdown().await;
}

async fn inspect(
    exchange: &Exchange,
    header: &Header,
    plain: Vec<u8>,
    client_to_server: bool,
    index: u64,
) -> Fate {
    let Some(opcode) = WebsocketOpcode::from_code(header.opcode) else {
        // Reserved opcodes: the endpoints will fail the connection.
        return Fate::Forward(plain);
    };
    let mut data = plain;
    for filter in exchange
        .agents
        .filters
        .iter()
        .filter(|f| f.wants(AgentEvent::WebsocketFrame))
    {
        let event = Event::WebsocketFrame(WebsocketFrameEvent {
            correlation_id: exchange.metadata.correlation_id.clone(),
            opcode,
            data: data.clone(),
            client_to_server,
            frame_index: index,
            fin: header.fin,
        });
        match filter.agent.call(event, filter.timeout).await {
            Ok(answer) => {
                if exchange.settle(filter, &answer).await.is_some() {
                    debug!(
                        agent = filter.agent.name(),
                        "WebSocket frame blocked; closing"
                    );
                    return Fate::Close;
                }
                if let Some(new) = answer.body_mutation.and_then(|m| m.data) {
                    data = new;
                }
            }
            Err(e) => {
                if exchange.failed(filter, &e).is_some() {
                    return Fate::Close;
                }
            }
        }
    }
    Fate::Forward(data)
}

/// Joins `client` and `upstream`, inspecting every frame both ways.
pub async fn tunnel<C, U>(exchange: Arc<Exchange>, client: C, upstream: U)
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    U: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_r, client_w) = tokio::io::split(client);
    let (up_r, up_w) = tokio::io::split(upstream);
    let client_w = Arc::new(Mutex::new(client_w));
    let up_w = Arc::new(Mutex::new(up_w));
    let to_upstream = direction(
        exchange.clone(),
        client_r,
        up_w.clone(),
        client_w.clone(),
        true,
    );
    let to_client = direction(exchange, up_r, client_w, up_w, false);
    // Either direction ending (a close, a block, an error) ends both.
    tokio::select! {
        _ = to_upstream => {}
        _ = to_client => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_round_trip_at_every_length_form() {
        for len in [0u64, 5, 125, 126, 65_535, 65_536] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let bytes = encode_header(0x81, mask, len);
                let mut r = &bytes[..];
                let h = read_header(&mut r).await.unwrap().unwrap();
                assert_eq!((h.len, h.mask, h.opcode, h.fin), (len, mask, 1, true));
                assert!(r.is_empty());
            }
        }
    }

    #[test]
    fn masking_is_its_own_inverse() {
        let mut data = b"hello websocket".to_vec();
        apply_mask(&mut data, [9, 8, 7, 6]);
        assert_ne!(data, b"hello websocket");
        apply_mask(&mut data, [9, 8, 7, 6]);
        assert_eq!(data, b"hello websocket");
        let close = close_frame(1008, false);
        assert_eq!(close, [0x88, 2, 0x03, 0xf0]);
    }
}
