//! How a session ends: exactly one [`CloseReason`] per session, which
//! decides the close code sent, the log line and the metric label, and
//! the close handshake under the write deadline.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

use crate::metrics::Metrics;
use crate::protocol::CloseCode;

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
    /// The outbox filled: the client reads too slowly.
    SlowReader,
    /// Too many rate-limited publications in a row.
    RateLimited,
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
    /// Ended by the HTTP API (`disconnect` or `revoke`).
    Disconnected,
    /// A message did not arrive whole within `message_timeout_ms`.
    MessageTimeout,
}

impl CloseReason {
    /// The close code sent, or `None` when the socket is gone or the peer
    /// already started the close handshake.
    pub fn close_code(self) -> Option<CloseCode> {
        match self {
            Self::ClientClosed | Self::Io | Self::WriteTimeout | Self::HeartbeatTimeout => None,
            Self::Shutdown => Some(CloseCode::GoingAway),
            Self::TokenExpired => Some(CloseCode::TokenExpired),
            Self::Disconnected => Some(CloseCode::Disconnected),
            Self::SlowReader | Self::RateLimited => Some(CloseCode::TooSlow),
            Self::ProtocolError => Some(CloseCode::ProtocolError),
            Self::Binary => Some(CloseCode::Unsupported),
            Self::InvalidUtf8 => Some(CloseCode::InvalidPayload),
            Self::BadFrames | Self::MessageTimeout => Some(CloseCode::PolicyViolation),
            Self::TooBig => Some(CloseCode::TooBig),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::MessageTimeout => "message_timeout",
            Self::Shutdown => "shutdown",
            Self::TokenExpired => "token_expired",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::WriteTimeout => "write_timeout",
            Self::SlowReader => "slow_reader",
            Self::RateLimited => "rate_limited",
            Self::ProtocolError => "protocol_error",
            Self::Binary => "binary",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::BadFrames => "bad_frames",
            Self::TooBig => "too_big",
            Self::Io => "io",
            Self::Disconnected => "disconnected",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Self::Shutdown => "server shutting down",
            Self::TokenExpired => "token expired",
            Self::SlowReader => "too slow reading messages",
            Self::RateLimited => "request rate limit exceeded repeatedly",
            Self::ProtocolError => "protocol error",
            Self::Binary => "binary frames are not accepted",
            Self::InvalidUtf8 => "invalid UTF-8",
            Self::BadFrames => "too many malformed frames",
            Self::TooBig => "message too big",
            Self::Disconnected => "disconnected by the server",
            Self::MessageTimeout => "message not completed in time",
            _ => "",
        }
    }
}

/// Sends the close frame for `reason` (or completes the client's close
/// handshake), then shuts the stream down, all under the write deadline.
pub(super) async fn close<S>(
    ws: &mut WebSocketStream<S>,
    reason: CloseReason,
    limit: Duration,
    metrics: &Metrics,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(code) = reason.close_code() {
        let frame = CloseFrame {
            code: WsCloseCode::from(code.code()),
            reason: reason.text().into(),
        };
        if let Ok(Ok(())) = timeout(limit, ws.close(Some(frame))).await {
            metrics.close_codes.inc(code.label());
        }
    } else if reason == CloseReason::ClientClosed {
        // Sends the reply tungstenite queued for the client's close frame.
        // (`Sink::close`, not the inherent `close`, which would send anew.)
        let _ = timeout(limit, SinkExt::close(ws)).await;
    }
    if !matches!(reason, CloseReason::Io | CloseReason::WriteTimeout) {
        // tungstenite reports the close as done before flushing the stream
        // below it; shutting down sends what is buffered and TLS close_notify.
        let _ = timeout(limit, ws.get_mut().shutdown()).await;
    }
}

/// The close reason for a failed read.
pub(super) fn read_error(e: &WsError) -> CloseReason {
    // Never log the error's text: tungstenite may quote frame bytes in it.
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => CloseReason::ClientClosed,
        // A 64-bit length with its most significant bit set breaks RFC 6455
        // §5.2 (1002), but tungstenite compares the declared length with
        // `max_frame_size` before anything else and reports it as too long
        // (1009). The declared length is in `size` (whole on 64-bit targets;
        // cut to 32 bits elsewhere, where such a frame still gets 1009), and
        // no real message comes near 2^63 bytes, so that bit means the header.
        WsError::Capacity(CapacityError::MessageTooLong { size, .. })
            if (*size as u64) & (1 << 63) != 0 =>
        {
            CloseReason::ProtocolError
        }
        WsError::Capacity(_) => CloseReason::TooBig,
        WsError::Utf8(_) => CloseReason::InvalidUtf8,
        WsError::Protocol(_) => CloseReason::ProtocolError,
        _ => CloseReason::Io,
    }
}
