//! Raw WebSocket connections: connect with a token in the query, a header or a subprotocol,
//! read the next frame or the close. No y-websocket or tutor knowledge here.

use std::net::SocketAddr;
use std::time::Duration;

use super::server::TIMEOUT;

use futures_util::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenVia {
    Query,
    Header,
    Subprotocol,
}

pub fn describe_ws_err(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(resp) => format!(
            "HTTP {} body {:?}",
            resp.status(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
        ),
        other => other.to_string(),
    }
}

/// Connects a WebSocket; `path` may already contain a query.
pub async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    via: TokenVia,
    headers: &[(&str, &str)],
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    ws_connect_cfg(addr, path, token, via, headers, None, None).await
}

/// Like `ws_connect`, with an optional client config and an optional SO_RCVBUF size.
pub async fn ws_connect_cfg(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    via: TokenVia,
    headers: &[(&str, &str)],
    config: Option<WebSocketConfig>,
    recv_buffer: Option<u32>,
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut path = path.to_string();
    if let (Some(t), TokenVia::Query) = (token, via) {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str("token=");
        path.push_str(t);
    }
    let url = format!("ws://{addr}{path}");
    let mut req = url.into_client_request()?;
    {
        let h = req.headers_mut();
        match (token, via) {
            (Some(t), TokenVia::Header) => {
                h.insert(
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
                );
            }
            (Some(t), TokenVia::Subprotocol) => {
                h.insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_str(&format!("easel, bearer.{t}")).unwrap(),
                );
            }
            _ => {}
        }
        for (k, v) in headers {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
    }
    let socket = TcpSocket::new_v4()?;
    if let Some(n) = recv_buffer {
        socket.set_recv_buffer_size(n)?;
    }
    let stream = tokio::time::timeout(TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| tungstenite::Error::Io(std::io::Error::other("tcp connect timeout")))??;
    stream.set_nodelay(true)?;
    tokio::time::timeout(
        TIMEOUT,
        tokio_tungstenite::client_async_with_config(req, stream, config),
    )
    .await
    .map_err(|_| tungstenite::Error::Io(std::io::Error::other("websocket handshake timeout")))?
}

/// Result of reading a frame from a websocket.
#[derive(Debug)]
pub enum WsEvent {
    Binary(Vec<u8>),
    Text(String),
    /// A close frame: code (if any) and reason.
    Close(Option<u16>, String),
    /// The stream ended or failed without a close frame.
    End(String),
    /// Nothing arrived within the timeout.
    Timeout,
}

/// Reads the next data/close frame (pings and pongs are skipped).
pub async fn ws_next(ws: &mut Ws, timeout: Duration) -> WsEvent {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return WsEvent::Timeout,
            Ok(None) => return WsEvent::End("stream ended".into()),
            Ok(Some(Err(e))) => return WsEvent::End(format!("error: {e}")),
            Ok(Some(Ok(m))) => match m {
                WsMessage::Binary(b) => return WsEvent::Binary(b.to_vec()),
                WsMessage::Text(t) => return WsEvent::Text(t.to_string()),
                WsMessage::Close(cf) => {
                    return match cf {
                        Some(CloseFrame { code, reason }) => {
                            WsEvent::Close(Some(u16::from(code)), reason.to_string())
                        }
                        None => WsEvent::Close(None, String::new()),
                    }
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
            },
        }
    }
}
