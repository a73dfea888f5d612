//! One task per upgraded connection: a single `select!` loop over inbound
//! frames, the outbox, the heartbeat, the token's expiry, policy changes,
//! being cut off as a slow reader, and shutdown. The session reads its
//! socket and writes its own frames and what waits in its outbox; messages
//! it is delivered while nothing waits go straight to the socket from the
//! delivering task ([`crate::line`]). Every session ends with exactly one
//! [`CloseReason`], which decides the close code and the log line.

mod close;
mod ops;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::auth::mint::unix_now;
use crate::config::Config;
use crate::gateway::slots::Mailbox;
use crate::gateway::{Control, Gateway, Subscriptions};
use crate::hub::Subscriber;
use crate::identity::Identity;
use crate::line::{Io, Line, Socket};
use crate::policy::PolicySet;
use crate::protocol::ServerFrame;
use crate::rate::{Bucket, Rate};
pub use close::CloseReason;
use close::{close, read_error};
mod deadline;
pub use deadline::{Progress, Timed};

/// Queued frames written per socket flush.
const WRITE_BATCH: usize = 64;
/// Bytes of frames gathered before tungstenite writes to TLS mid-batch.
const WRITE_BUFFER: usize = 16 * 1024;

/// One session's identity and wiring.
#[derive(Debug)]
pub struct SessionContext {
    /// The client's address (for the log rate).
    pub client: std::net::IpAddr,
    /// What the socket has read, for the message deadline (`None`: no
    /// deadline, as in unit tests over in-memory streams).
    pub progress: Option<Arc<Progress>>,
    /// Process-unique number (the hub's key).
    pub number: u64,
    /// Random id shown to the client and in logs.
    pub id: String,
    pub identity: Identity,
    /// What the core asks of this session (the HTTP API's disconnect,
    /// revoke and unsubscribe).
    /// Taken out by [`run`], which polls it beside the socket.
    pub control: Option<Arc<Mailbox>>,
}

/// The tungstenite limits for one connection, from `[websocket]`.
pub fn ws_limits(config: &Config) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let cfg = &config.websocket;
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(cfg.read_buffer_bytes)
        // Frames queue in tungstenite's buffer until the session flushes a
        // batch, so a batch is one TLS write and one syscall, not one per frame.
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + cfg.max_message_bytes.saturating_mul(4))
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_frame_bytes))
        .accept_unmasked_frames(false)
}

/// The mutable state of one session.
struct Session<'a> {
    gateway: &'a Gateway,
    ctx: SessionContext,
    policy: Arc<PolicySet>,
    subscriptions: Subscriptions,
    /// The socket and the outbox, shared with whoever delivers to it.
    line: Arc<Line>,
    /// This session as the hub knows it, made on the first reply or
    /// subscription.
    subscriber: Option<Subscriber>,
    /// Fired by the hub when this session's outbox is full.
    slow: CancellationToken,
    /// The publish rate limit and this session's bucket.
    rate: Rate,
    bucket: Bucket,
    strikes: u32,
    bad_frames: u32,
    /// A heartbeat ping of ours awaits its pong: that pong is free, any
    /// other ping or pong spends the request budget.
    ping_outstanding: bool,
    /// Set by a successful `refresh`: the expiry timer must move.
    new_expiry: Option<Instant>,
}

/// Runs the session over the upgraded `io` to its end and returns why it
/// ended.
pub async fn run<S>(
    io: S,
    gateway: &Gateway,
    mut ctx: SessionContext,
    shutdown: CancellationToken,
    hurry: CancellationToken,
) -> CloseReason
where
    S: Io + 'static,
{
    let ws_cfg = &gateway.config.websocket;
    let line = Line::new(Box::new(io), ws_cfg.outbox_frames, ws_cfg.outbox_bytes);
    let socket = Socket(Arc::clone(&line));
    let limits = ws_limits(&gateway.config);
    let mut ws = WebSocketStream::from_raw_socket(socket, Role::Server, Some(limits)).await;
    // Polled beside the socket in the loop, so not kept in `Session`
    // (taken, not swapped for a placeholder channel: that was 0.9 KiB a
    // session).
    let control = ctx.control.take();
    let cfg = &gateway.config;
    let write_timeout = Duration::from_millis(cfg.websocket.write_timeout_ms);
    // Subscribe to policy swaps before reading the set, so a swap in
    // between is seen as a change rather than missed.
    let policy_changes = gateway.policies.changes();
    // Validation keeps both at least 1, so the limit is always on.
    let rate = Rate::new(
        f64::from(cfg.limits.publish_rate_per_s),
        cfg.limits.publish_burst,
    )
    .unwrap_or(Rate::new(1.0, 1).expect("1 per second is a rate"));
    let mut session = Session {
        gateway,
        policy: gateway.policies.current(),
        subscriptions: Subscriptions::default(),
        line,
        subscriber: None,
        slow: CancellationToken::new(),
        rate,
        bucket: Bucket::full(rate, Instant::now().into_std()),
        strikes: 0,
        bad_frames: 0,
        ping_outstanding: false,
        new_expiry: None,
        ctx,
    };
    let welcome = ServerFrame::Welcome {
        session: &session.ctx.id,
        user: &session.ctx.identity.user,
        expires_at: session.ctx.identity.expires_at,
        heartbeat_ms: cfg.websocket.heartbeat_ms,
    }
    .encode();
    let first = std::iter::once(Message::text(welcome));
    let slow = session.slow.clone();
    let metrics = &gateway.metrics;
    metrics.sessions_open.fetch_add(1, Ordering::Relaxed);
    let reason = match send_own(&mut ws, &session.line, first, write_timeout, &slow).await {
        Err(reason) => reason,
        Ok(()) => {
            session
                .event_loop(&mut ws, policy_changes, control, &shutdown, &hurry)
                .await
        }
    };
    // Before the close frame, which nothing may follow.
    session.line.close();
    gateway.unsubscribe_all(&mut session.subscriptions, session.ctx.number);
    close(&mut ws, reason, write_timeout, metrics).await;
    metrics.sessions_open.fetch_sub(1, Ordering::Relaxed);
    metrics.sessions_closed.inc(reason.label());
    // Closes the gateway made are visible at the default level (a flood
    // held back per address); a client's own close and the drain's are
    // routine, and counted by the metrics.
    match reason {
        CloseReason::ClientClosed | CloseReason::Shutdown => {
            debug!(reason = reason.label(), "session closed");
        }
        _ => {
            if let Some(held) = gateway.log_gate.admit_now(session.ctx.client) {
                info!(reason = reason.label(), held, "session closed");
            }
        }
    }
    reason
}

/// The next frames the session must write from its line (none when only
/// a direct write's rest is owed); `Err` when the socket failed under a
/// direct write.
async fn next_batch(line: &Line, batch: &mut Vec<Utf8Bytes>) -> Result<(), ()> {
    // Up to WRITE_BATCH frames, but no more bytes than a write buffer's
    // worth past the first: frames taken out of the outbox no longer count
    // against its byte bound, so a batch of large ones must stay small.
    std::future::poll_fn(|cx| line.poll_take(cx, batch, WRITE_BATCH, WRITE_BUFFER)).await
}

/// The next request of the core; pending for ever without a channel.
async fn next_control(control: &Option<Arc<Mailbox>>) -> Option<Control> {
    match control {
        Some(mailbox) => Some(mailbox.recv().await),
        None => std::future::pending().await,
    }
}

/// Completes at the next policy swap, handing the receiver back to re-arm.
async fn policy_change(mut changes: watch::Receiver<u64>) -> watch::Receiver<u64> {
    if changes.changed().await.is_err() {
        // The store outlives every session; were it gone, wait forever.
        std::future::pending::<()>().await;
    }
    changes
}

impl Session<'_> {
    async fn event_loop(
        &mut self,
        ws: &mut WebSocketStream<Socket>,
        policy_changes: watch::Receiver<u64>,
        control: Option<Arc<Mailbox>>,
        shutdown: &CancellationToken,
        hurry: &CancellationToken,
    ) -> CloseReason {
        let cfg = &self.gateway.config;
        let write_timeout = Duration::from_millis(cfg.websocket.write_timeout_ms);
        let heartbeat = Duration::from_millis(cfg.websocket.heartbeat_ms);
        let silence_limit = heartbeat + Duration::from_millis(cfg.websocket.heartbeat_grace_ms);
        let leeway = Duration::from_secs(cfg.auth.leeway_s);
        let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let slow = self.slow.clone();
        let line = Arc::clone(&self.line);
        // These live across iterations: re-creating them per frame would
        // register and unregister a waiter each time, and the policy one is
        // shared by every session.
        let shutdown_signal = shutdown.cancelled();
        let hurry_signal = hurry.cancelled();
        let slow_signal = slow.cancelled();
        // Set when draining: the `expired` timer then marks this session's
        // turn in the drain window (one timer serves both).
        let mut draining = false;
        let mut policy_changed = Box::pin(policy_change(policy_changes));
        let mut last_seen = Instant::now();
        // Re-armed lazily when it fires, so an inbound frame costs no timer work.
        let silence = tokio::time::sleep(silence_limit);
        // The token's end, kept as an instant of the loop's own clock: the
        // timer below may hold the drain turn instead, and which of the two
        // fired is told by this, never by reading the wall clock again.
        let mut expiry = expiry_instant(self.ctx.identity.expires_at, leeway);
        let expired = sleep_until(expiry);
        tokio::pin!(silence, expired, shutdown_signal, hurry_signal, slow_signal);
        // Grows on first use: an idle connection should not carry it.
        let mut batch = Vec::new();

        loop {
            tokio::select! {
                () = &mut shutdown_signal, if !draining => {
                    draining = true;
                    let turn = drain_turn(self.ctx.number, cfg.server.drain_window_ms);
                    if turn.is_zero() {
                        return CloseReason::Shutdown;
                    }
                    let at = Instant::now() + turn;
                    if at < expired.deadline() {
                        expired.as_mut().reset(at);
                    }
                }
                () = &mut hurry_signal => return CloseReason::Shutdown,
                // The sender lives in the user's slot, as long as the session.
                Some(command) = next_control(&control) => match command {
                    Control::Disconnect => return CloseReason::Disconnected,
                    Control::Unsubscribe(channel) => self.ended_by_server(&channel),
                },
                () = &mut slow_signal => return CloseReason::SlowReader,
                () = &mut expired => {
                    return if draining && Instant::now() < expiry {
                        CloseReason::Shutdown
                    } else {
                        CloseReason::TokenExpired
                    };
                }
                () = &mut silence => {
                    let deadline = last_seen + silence_limit;
                    if Instant::now() >= deadline {
                        return CloseReason::HeartbeatTimeout;
                    }
                    silence.as_mut().reset(deadline);
                }
                _ = tick.tick() => {
                    self.ping_outstanding = true;
                    let ping = std::iter::once(Message::Ping(Default::default()));
                    // Boxed, as the batch's write below: an idle session's
                    // task would otherwise be sized by these rare states.
                    let sent = Box::pin(send_own(ws, &line, ping, write_timeout, &slow)).await;
                    if let Err(reason) = sent {
                        return reason;
                    }
                }
                changes = &mut policy_changed => {
                    self.policy = self.gateway.policies.current();
                    self.recheck_subscriptions("the policy no longer allows this subscription");
                    policy_changed = Box::pin(policy_change(changes));
                }
                taken = next_batch(&line, &mut batch) => {
                    if taken.is_err() {
                        return CloseReason::Io;
                    }
                    // With no frames, this flushes what a direct write left.
                    let frames = batch.drain(..).map(Message::Text);
                    let sent = Box::pin(send_all(ws, frames, write_timeout, &slow)).await;
                    line.written();
                    if let Err(reason) = sent {
                        return reason;
                    }
                }
                inbound = ws.next() => {
                    last_seen = Instant::now();
                    let text = match inbound {
                        None => return CloseReason::ClientClosed,
                        Some(Err(_)) if self.ctx.progress.as_ref().is_some_and(|p| p.expired()) => {
                            return CloseReason::MessageTimeout;
                        }
                        Some(Err(e)) => return read_error(&e),
                        Some(Ok(Message::Text(text))) => {
                            if let Some(p) = &self.ctx.progress {
                                p.message();
                            }
                            text
                        }
                        Some(Ok(Message::Binary(_))) => return CloseReason::Binary,
                        Some(Ok(Message::Close(_))) => return CloseReason::ClientClosed,
                        // Pings are answered by tungstenite; all count as
                        // liveness, and each spends the request budget, so
                        // a ping flood is no free way to make us write.
                        Some(Ok(Message::Ping(payload))) => {
                            if let Err(reason) = self.control_frame(payload.len(), false) {
                                return reason;
                            }
                            continue;
                        }
                        Some(Ok(Message::Pong(payload))) => {
                            // The pong answering our heartbeat is free.
                            let answer = std::mem::take(&mut self.ping_outstanding);
                            if let Err(reason) = self.control_frame(payload.len(), answer) {
                                return reason;
                            }
                            continue;
                        }
                        Some(Ok(Message::Frame(_))) => continue,
                    };
                    // Boxed: a request's future (a subscribe waiting on the
                    // broker, say) would otherwise size the task every idle
                    // session holds; one allocation per request is cheaper.
                    if let Some(reason) = Box::pin(self.handle(&text)).await {
                        return reason;
                    }
                    if let Some(at) = self.new_expiry.take() {
                        expiry = at;
                        // While draining, the timer holds the drain turn.
                        if !draining || at < expired.deadline() {
                            expired.as_mut().reset(at);
                        }
                    }
                }
            }
        }
    }
}

impl Session<'_> {
    /// A ping or pong from the client (`payload` bytes): accounted for the
    /// message deadline, and, unless `free`, paid from the request budget.
    fn control_frame(&mut self, payload: usize, free: bool) -> Result<(), CloseReason> {
        if let Some(p) = &self.ctx.progress {
            p.control(payload);
        }
        if free {
            return Ok(());
        }
        self.spend(None).map(|_| ())
    }
}

/// Writes frames of the session's own (not from its outbox) with
/// [`send_all`], holding direct writes off until they are out.
async fn send_own(
    ws: &mut WebSocketStream<Socket>,
    line: &Line,
    frames: impl Iterator<Item = Message>,
    limit: Duration,
    slow: &CancellationToken,
) -> Result<(), CloseReason> {
    line.writing();
    let sent = send_all(ws, frames, limit, slow).await;
    line.written();
    sent
}

/// Feeds every frame, then flushes once: one TLS write for the batch. A
/// write blocked by a client that does not read ends early when the hub
/// cuts that client off (`slow`), or at the write deadline.
async fn send_all<S>(
    ws: &mut WebSocketStream<S>,
    frames: impl Iterator<Item = Message>,
    limit: Duration,
    slow: &CancellationToken,
) -> Result<(), CloseReason>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write = async {
        for frame in frames {
            ws.feed(frame).await?;
        }
        ws.flush().await
    };
    tokio::select! {
        written = timeout(limit, write) => match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match read_error(&e) {
                CloseReason::ClientClosed => CloseReason::ClientClosed,
                _ => CloseReason::Io,
            }),
            Err(_) => Err(CloseReason::WriteTimeout),
        },
        () = slow.cancelled() => Err(CloseReason::SlowReader),
    }
}

/// This session's place in the drain window: sessions spread evenly over
/// it (a golden-ratio sequence over session numbers), so clients told to
/// reconnect (1001) do not all come back at once.
fn drain_turn(number: u64, window_ms: u64) -> Duration {
    const PHI_FRACTION: f64 = 0.618_033_988_749_894_9;
    let place = (number as f64 * PHI_FRACTION).fract();
    Duration::from_millis((place * window_ms as f64) as u64)
}

/// The instant the session must end: `exp` + leeway, measured from now
/// to the sub-second (whole seconds would end sessions up to 1 s late).
fn expiry_instant(expires_at: u64, leeway: Duration) -> Instant {
    // Verification refuses an `exp` past year 9999; checked anyway, so no
    // claim can overflow the arithmetic here.
    let remaining = std::time::UNIX_EPOCH
        .checked_add(Duration::from_secs(expires_at))
        .and_then(|t| t.checked_add(leeway))
        .and_then(|end| end.duration_since(std::time::SystemTime::now()).ok())
        .unwrap_or(Duration::ZERO);
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

#[cfg(test)]
mod tests;
