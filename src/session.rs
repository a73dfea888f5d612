//! One task per upgraded connection: a single `select!` loop over inbound
//! frames, the heartbeat tick, the token's expiry and shutdown. The session
//! is the only writer to its socket, and every session ends with exactly
//! one [`CloseReason`], which decides the close code and the log line.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::CapacityError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::auth::Identity;
use crate::auth::mint::unix_now;
use crate::config::WebSocketConfig;
use crate::protocol::{self, ClientFrame, CloseCode, ErrorCode, ServerFrame};

/// Consecutive frames that are not JSON objects before closing with 1008.
const MAX_BAD_FRAMES: u32 = 8;

/// Why a session ended; exactly one per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or the socket ended.
    ClientClosed,
    /// The gateway is shutting down.
    Shutdown,
    /// The token's `exp` (+ leeway) passed.
    TokenExpired,
    /// No frame from the peer for heartbeat + grace.
    HeartbeatTimeout,
    /// A write did not finish in time.
    WriteTimeout,
    /// The peer broke RFC 6455.
    ProtocolError,
    /// A binary frame (not in protocol v1).
    Binary,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// Too many frames that are not JSON objects.
    BadFrames,
    /// A message over `max_message_bytes`.
    TooBig,
    /// The socket failed.
    Io,
}

impl CloseReason {
    /// The close code sent, or `None` when the socket is gone or the peer
    /// already started the close handshake.
    pub fn close_code(self) -> Option<CloseCode> {
        match self {
            Self::ClientClosed | Self::Io | Self::WriteTimeout | Self::HeartbeatTimeout => None,
            Self::Shutdown => Some(CloseCode::GoingAway),
            Self::TokenExpired => Some(CloseCode::TokenExpired),
            Self::ProtocolError => Some(CloseCode::ProtocolError),
            Self::Binary => Some(CloseCode::Unsupported),
            Self::InvalidUtf8 => Some(CloseCode::InvalidPayload),
            Self::BadFrames => Some(CloseCode::PolicyViolation),
            Self::TooBig => Some(CloseCode::TooBig),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::Shutdown => "shutdown",
            Self::TokenExpired => "token_expired",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::WriteTimeout => "write_timeout",
            Self::ProtocolError => "protocol_error",
            Self::Binary => "binary",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::BadFrames => "bad_frames",
            Self::TooBig => "too_big",
            Self::Io => "io",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Self::Shutdown => "server shutting down",
            Self::TokenExpired => "token expired",
            Self::ProtocolError => "protocol error",
            Self::Binary => "binary frames are not accepted",
            Self::InvalidUtf8 => "invalid UTF-8",
            Self::BadFrames => "too many malformed frames",
            Self::TooBig => "message too big",
            _ => "",
        }
    }
}

/// What a session needs to know besides its socket.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub id: String,
    pub identity: Identity,
    pub leeway: Duration,
    pub ws: WebSocketConfig,
}

/// The tungstenite limits for one connection, from `[websocket]`.
pub fn ws_limits(
    cfg: &WebSocketConfig,
) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(cfg.read_buffer_bytes)
        // Write eagerly; we flush per batch ourselves, so no extra buffering.
        .write_buffer_size(0)
        .max_write_buffer_size(cfg.max_message_bytes.saturating_mul(4))
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_frame_bytes))
        .accept_unmasked_frames(false)
}

/// Runs the session to its end and returns why it ended.
pub async fn run<S>(
    mut ws: WebSocketStream<S>,
    ctx: SessionContext,
    shutdown: CancellationToken,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write_timeout = Duration::from_millis(ctx.ws.write_timeout_ms);
    let heartbeat = Duration::from_millis(ctx.ws.heartbeat_ms);
    let silence_limit = heartbeat + Duration::from_millis(ctx.ws.heartbeat_grace_ms);
    let expiry = expiry_instant(ctx.identity.expires_at, ctx.leeway);

    let welcome = ServerFrame::Welcome {
        session: &ctx.id,
        user: &ctx.identity.user,
        expires_at: ctx.identity.expires_at,
        heartbeat_ms: ctx.ws.heartbeat_ms,
    };
    let reason = match send(&mut ws, welcome.encode(), write_timeout).await {
        Err(reason) => reason,
        Ok(()) => {
            event_loop(
                &mut ws,
                &shutdown,
                expiry,
                heartbeat,
                silence_limit,
                write_timeout,
            )
            .await
        }
    };
    // Best effort: the peer may be gone; the deadline bounds a stalled one.
    if let Some(code) = reason.close_code() {
        let frame = CloseFrame {
            code: WsCloseCode::from(code.code()),
            reason: reason.text().into(),
        };
        let _ = timeout(write_timeout, ws.close(Some(frame))).await;
    } else if reason == CloseReason::ClientClosed {
        // Sends the reply tungstenite queued for the client's close frame,
        // completing the close handshake instead of leaving the client 1006.
        // (`Sink::close`, not the inherent `close`, which would send anew.)
        let _ = timeout(write_timeout, SinkExt::close(&mut ws)).await;
    }
    if !matches!(reason, CloseReason::Io | CloseReason::WriteTimeout) {
        // tungstenite reports the close as done before flushing the stream
        // below it; shutting down sends what is buffered and TLS close_notify.
        let _ = timeout(write_timeout, ws.get_mut().shutdown()).await;
    }
    match reason {
        CloseReason::ClientClosed | CloseReason::Shutdown => {
            debug!(reason = reason.label(), "session ended");
        }
        _ => info!(reason = reason.label(), "session closed"),
    }
    reason
}

async fn event_loop<S>(
    ws: &mut WebSocketStream<S>,
    shutdown: &CancellationToken,
    expiry: Instant,
    heartbeat: Duration,
    silence_limit: Duration,
    write_timeout: Duration,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    // Re-armed lazily when it fires, so an inbound frame costs no timer work.
    let silence = tokio::time::sleep(silence_limit);
    let expired = sleep_until(expiry);
    tokio::pin!(silence, expired);
    let mut bad_frames = 0u32;
    loop {
        let inbound = tokio::select! {
            () = shutdown.cancelled() => return CloseReason::Shutdown,
            () = &mut expired => return CloseReason::TokenExpired,
            () = &mut silence => {
                let deadline = last_seen + silence_limit;
                if Instant::now() >= deadline {
                    return CloseReason::HeartbeatTimeout;
                }
                silence.as_mut().reset(deadline);
                continue;
            }
            _ = tick.tick() => {
                if let Err(reason) = send_message(ws, Message::Ping(Default::default()), write_timeout).await {
                    return reason;
                }
                continue;
            }
            inbound = ws.next() => inbound,
        };
        last_seen = Instant::now();
        let text = match inbound {
            None => return CloseReason::ClientClosed,
            Some(Err(e)) => return read_error(&e),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => return CloseReason::Binary,
            Some(Ok(Message::Close(_))) => return CloseReason::ClientClosed,
            // Pings are answered by tungstenite; both count as liveness.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
        };
        let reply = match protocol::decode(&text) {
            Ok(ClientFrame::Ping { id }) => {
                bad_frames = 0;
                ServerFrame::Pong { id }.encode()
            }
            Err(e) => {
                if e.is_object {
                    bad_frames = 0;
                } else {
                    bad_frames += 1;
                    if bad_frames >= MAX_BAD_FRAMES {
                        return CloseReason::BadFrames;
                    }
                }
                ServerFrame::Error {
                    id: e.id,
                    code: ErrorCode::BadRequest,
                    message: &e.message,
                }
                .encode()
            }
        };
        if let Err(reason) = send(ws, reply, write_timeout).await {
            return reason;
        }
    }
}

fn read_error(e: &WsError) -> CloseReason {
    // Never log the error's text: tungstenite may quote frame bytes in it.
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => CloseReason::ClientClosed,
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::TooBig,
        WsError::Capacity(_) => CloseReason::TooBig,
        WsError::Utf8(_) => CloseReason::InvalidUtf8,
        WsError::Protocol(_) => CloseReason::ProtocolError,
        _ => CloseReason::Io,
    }
}

async fn send<S>(
    ws: &mut WebSocketStream<S>,
    text: String,
    limit: Duration,
) -> Result<(), CloseReason>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_message(ws, Message::text(text), limit).await
}

async fn send_message<S>(
    ws: &mut WebSocketStream<S>,
    message: Message,
    limit: Duration,
) -> Result<(), CloseReason>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match timeout(limit, ws.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(match read_error(&e) {
            CloseReason::ClientClosed => CloseReason::ClientClosed,
            _ => CloseReason::Io,
        }),
        Err(_) => Err(CloseReason::WriteTimeout),
    }
}

/// The instant the session must end: `exp` + leeway, measured from now.
fn expiry_instant(expires_at: u64, leeway: Duration) -> Instant {
    let remaining = Duration::from_secs(expires_at.saturating_sub(unix_now())) + leeway;
    // Cap far-future tokens so the Instant arithmetic cannot overflow.
    Instant::now() + remaining.min(Duration::from_secs(100 * 365 * 86_400))
}

/// A random 64-bit session id in hex.
pub fn new_session_id() -> String {
    let mut raw = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut raw).is_err() {
        // Ids only need to be unique in logs; fall back to the clock.
        raw = (unix_now() ^ u64::from(std::process::id())).to_be_bytes();
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}
