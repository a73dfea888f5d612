//! One task per upgraded connection: a single `select!` loop over inbound
//! frames, the outbox, the heartbeat, the token's expiry, policy changes,
//! being cut off as a slow reader, and shutdown. The session is the only
//! writer to its socket, and every session ends with exactly one
//! [`CloseReason`], which decides the close code and the log line.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::auth::mint::unix_now;
use crate::auth::{Identity, Verifier};
use crate::broker::{AnyBroker, Broker};
use crate::channel::ChannelName;
use crate::config::Config;
use crate::hub::{Hub, Subscriber};
use crate::metrics::Metrics;
use crate::policy::{Action, PolicySet, PolicyStore};
use crate::protocol::{self, ClientFrame, CloseCode, ErrorCode, ServerFrame};

/// Consecutive frames that are not JSON objects before closing with 1008.
const MAX_BAD_FRAMES: u32 = 8;
/// Queued frames written per socket flush.
const WRITE_BATCH: usize = 64;
/// Bytes of frames gathered before tungstenite writes to TLS mid-batch.
const WRITE_BUFFER: usize = 16 * 1024;

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
}

impl CloseReason {
    /// The close code sent, or `None` when the socket is gone or the peer
    /// already started the close handshake.
    pub fn close_code(self) -> Option<CloseCode> {
        match self {
            Self::ClientClosed | Self::Io | Self::WriteTimeout | Self::HeartbeatTimeout => None,
            Self::Shutdown => Some(CloseCode::GoingAway),
            Self::TokenExpired => Some(CloseCode::TokenExpired),
            Self::SlowReader | Self::RateLimited => Some(CloseCode::TooSlow),
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
            Self::SlowReader => "slow_reader",
            Self::RateLimited => "rate_limited",
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
            Self::SlowReader => "too slow reading messages",
            Self::RateLimited => "publish rate limit exceeded repeatedly",
            Self::ProtocolError => "protocol error",
            Self::Binary => "binary frames are not accepted",
            Self::InvalidUtf8 => "invalid UTF-8",
            Self::BadFrames => "too many malformed frames",
            Self::TooBig => "message too big",
            _ => "",
        }
    }
}

/// What sessions share: the hub, the policies, the verifier, the config.
#[derive(Debug)]
pub struct Services {
    pub config: Config,
    pub metrics: crate::metrics::Metrics,
    pub verifier: Verifier,
    pub policies: PolicyStore,
    pub hub: Arc<Hub>,
    /// How publications reach subscribers here and on other replicas.
    pub broker: AnyBroker,
}

/// One session's identity and wiring.
#[derive(Debug)]
pub struct SessionContext {
    /// Process-unique number (the hub's key).
    pub number: u64,
    /// Random id shown to the client and in logs.
    pub id: String,
    pub identity: Identity,
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

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The mutable state of one session.
struct Session<'a> {
    services: &'a Services,
    ctx: SessionContext,
    policy: Arc<PolicySet>,
    subscriptions: HashSet<ChannelName>,
    /// Created with the outbox on the first reply or subscription, so an
    /// idle connection carries neither.
    subscriber: Option<Subscriber>,
    /// The outbox receiver just created, for the loop to take over.
    new_outbox: Option<mpsc::Receiver<Utf8Bytes>>,
    /// Fired by the hub when this session's outbox is full.
    slow: CancellationToken,
    bucket: Bucket,
    strikes: u32,
    bad_frames: u32,
    /// Set by a successful `refresh`: the expiry timer must move.
    new_expiry: Option<Instant>,
}

/// Runs the session to its end and returns why it ended.
pub async fn run<S>(
    mut ws: WebSocketStream<S>,
    services: &Services,
    ctx: SessionContext,
    shutdown: CancellationToken,
    hurry: CancellationToken,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &services.config;
    let write_timeout = Duration::from_millis(cfg.websocket.write_timeout_ms);
    // Subscribe to policy swaps before reading the set, so a swap in
    // between is seen as a change rather than missed.
    let policy_changes = services.policies.changes();
    let mut session = Session {
        services,
        policy: services.policies.current(),
        subscriptions: HashSet::new(),
        subscriber: None,
        new_outbox: None,
        slow: CancellationToken::new(),
        bucket: Bucket::new(cfg.limits.publish_rate_per_s, cfg.limits.publish_burst),
        strikes: 0,
        bad_frames: 0,
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
    let metrics = &services.metrics;
    metrics.sessions_open.fetch_add(1, Ordering::Relaxed);
    let reason = match send_all(&mut ws, first, write_timeout, &slow).await {
        Err(reason) => reason,
        Ok(()) => {
            session
                .event_loop(&mut ws, policy_changes, &shutdown, &hurry)
                .await
        }
    };
    session.leave_all();
    close(&mut ws, reason, write_timeout, metrics).await;
    metrics.sessions_open.fetch_sub(1, Ordering::Relaxed);
    metrics.sessions_closed.inc(reason.label());
    // Every reason so far is the client's doing or a normal end: nothing
    // for an operator to act on, so debug (metrics count them).
    debug!(reason = reason.label(), "session closed");
    reason
}

/// The next batch from the outbox; pending until the outbox exists.
async fn recv_batch(
    outbox: Option<&mut mpsc::Receiver<Utf8Bytes>>,
    batch: &mut Vec<Utf8Bytes>,
) -> usize {
    match outbox {
        Some(rx) => rx.recv_many(batch, WRITE_BATCH).await,
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

/// Sends the close frame for `reason` (or completes the client's close
/// handshake), then shuts the stream down, all under the write deadline.
async fn close<S>(
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

impl Session<'_> {
    async fn event_loop<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        policy_changes: watch::Receiver<u64>,
        shutdown: &CancellationToken,
        hurry: &CancellationToken,
    ) -> CloseReason
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let cfg = &self.services.config;
        let write_timeout = Duration::from_millis(cfg.websocket.write_timeout_ms);
        let heartbeat = Duration::from_millis(cfg.websocket.heartbeat_ms);
        let silence_limit = heartbeat + Duration::from_millis(cfg.websocket.heartbeat_grace_ms);
        let leeway = Duration::from_secs(cfg.auth.leeway_s);
        let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let slow = self.slow.clone();
        let mut outbox: Option<mpsc::Receiver<Utf8Bytes>> = None;
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
        let expired = sleep_until(expiry_instant(self.ctx.identity.expires_at, leeway));
        tokio::pin!(silence, expired, shutdown_signal, hurry_signal, slow_signal);
        // Grows on first use: an idle connection should not carry it.
        let mut batch = Vec::new();

        loop {
            if let Some(rx) = self.new_outbox.take() {
                outbox = Some(rx);
            }
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
                () = &mut slow_signal => return CloseReason::SlowReader,
                () = &mut expired => {
                    let expiry = expiry_instant(self.ctx.identity.expires_at, leeway);
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
                    let ping = std::iter::once(Message::Ping(Default::default()));
                    if let Err(reason) = send_all(ws, ping, write_timeout, &slow).await {
                        return reason;
                    }
                }
                changes = &mut policy_changed => {
                    self.policy = self.services.policies.current();
                    self.recheck_subscriptions("the policy no longer allows this subscription");
                    policy_changed = Box::pin(policy_change(changes));
                }
                n = recv_batch(outbox.as_mut(), &mut batch) => {
                    // The sender lives in `self`, so the outbox never closes here.
                    if n > 0 {
                        let frames = batch.drain(..).map(Message::Text);
                        if let Err(reason) = send_all(ws, frames, write_timeout, &slow).await {
                            return reason;
                        }
                    }
                }
                inbound = ws.next() => {
                    last_seen = Instant::now();
                    let text = match inbound {
                        None => return CloseReason::ClientClosed,
                        Some(Err(e)) => return read_error(&e),
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Binary(_))) => return CloseReason::Binary,
                        Some(Ok(Message::Close(_))) => return CloseReason::ClientClosed,
                        // Pings are answered by tungstenite; all count as liveness.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    };
                    if let Some(reason) = self.handle(&text).await {
                        return reason;
                    }
                    if let Some(at) = self.new_expiry.take() {
                        // While draining, the timer holds the drain turn.
                        if !draining || at < expired.deadline() {
                            expired.as_mut().reset(at);
                        }
                    }
                }
            }
        }
    }

    /// Queues a reply behind the messages already in the outbox, so a
    /// client sees them in the order things happened (nothing from a
    /// channel after its `unsubscribe` ok). A full outbox means the client
    /// is not reading: it is cut off like any slow reader.
    fn reply(&mut self, frame: &ServerFrame<'_>) {
        let text = Utf8Bytes::from(frame.encode());
        if self.subscriber().outbox.try_send(text).is_err() {
            self.slow.cancel();
        }
    }

    /// This session as a hub subscriber, creating the outbox on first use.
    fn subscriber(&mut self) -> &Subscriber {
        let (new_outbox, slow) = (&mut self.new_outbox, &self.slow);
        let (number, depth) = (
            self.ctx.number,
            self.services.config.websocket.outbox_frames,
        );
        self.subscriber.get_or_insert_with(|| {
            let (outbox, rx) = mpsc::channel(depth);
            *new_outbox = Some(rx);
            Subscriber {
                session: number,
                outbox,
                slow: slow.clone(),
            }
        })
    }

    fn ok(&mut self, id: Option<u64>) {
        if let Some(id) = id {
            self.reply(&ServerFrame::Ok { id });
        }
    }

    fn error(
        &mut self,
        id: Option<u64>,
        code: ErrorCode,
        message: &str,
        channel: Option<&ChannelName>,
    ) {
        self.reply(&ServerFrame::Error {
            id,
            code,
            message,
            channel: channel.map(ChannelName::as_str),
        });
    }

    /// Handles one text frame, queueing its replies in the outbox; returns a reason to
    /// close when the frame ends the session.
    async fn handle(&mut self, text: &str) -> Option<CloseReason> {
        let frame = match protocol::decode(text) {
            Ok(frame) => frame,
            Err(e) => {
                if e.is_object {
                    self.bad_frames = 0;
                } else {
                    self.bad_frames += 1;
                    if self.bad_frames >= MAX_BAD_FRAMES {
                        return Some(CloseReason::BadFrames);
                    }
                }
                self.error(e.id, ErrorCode::BadRequest, &e.message, None);
                return None;
            }
        };
        self.bad_frames = 0;
        match frame {
            ClientFrame::Ping { id } => self.reply(&ServerFrame::Pong { id }),
            ClientFrame::Subscribe { id, channel } => self.subscribe(id, channel).await,
            ClientFrame::Unsubscribe { id, channel } => {
                if self.subscriptions.remove(&channel) {
                    self.leave(&channel);
                    self.services
                        .metrics
                        .subscriptions
                        .fetch_sub(1, Ordering::Relaxed);
                    self.ok(id);
                } else {
                    self.error(
                        id,
                        ErrorCode::NotSubscribed,
                        "not subscribed",
                        Some(&channel),
                    );
                }
            }
            ClientFrame::Publish { id, channel, data } => {
                return self.publish(id, &channel, data).await;
            }
            ClientFrame::Refresh { id, token } => self.refresh(id, &token),
        }
        None
    }

    async fn subscribe(&mut self, id: Option<u64>, channel: ChannelName) {
        if self.subscriptions.contains(&channel) {
            return self.ok(id);
        }
        if !self
            .policy
            .allows(&self.ctx.identity, Action::Subscribe, &channel)
        {
            return self.error(
                id,
                ErrorCode::Forbidden,
                "not allowed to subscribe",
                Some(&channel),
            );
        }
        if self.subscriptions.len() >= self.services.config.limits.max_subscriptions {
            return self.error(
                id,
                ErrorCode::TooManySubscriptions,
                "subscription limit reached",
                Some(&channel),
            );
        }
        // Messages of the channel reach this process from here on.
        if self.services.broker.subscribe(&channel).await.is_err() {
            return self.error(
                id,
                ErrorCode::Internal,
                "the message broker is unavailable; try again",
                Some(&channel),
            );
        }
        // The ok goes into the outbox first, so no message can overtake it.
        self.ok(id);
        let subscriber = self.subscriber().clone();
        self.services.hub.subscribe(&channel, subscriber);
        self.subscriptions.insert(channel);
        self.services
            .metrics
            .subscriptions
            .fetch_add(1, Ordering::Relaxed);
    }

    async fn publish(
        &mut self,
        id: Option<u64>,
        channel: &ChannelName,
        data: &serde_json::value::RawValue,
    ) -> Option<CloseReason> {
        if !self.bucket.take() {
            self.strikes += 1;
            if self.strikes >= self.services.config.limits.rate_limit_strikes {
                return Some(CloseReason::RateLimited);
            }
            self.error(
                id,
                ErrorCode::RateLimited,
                "publish rate exceeded",
                Some(channel),
            );
            return None;
        }
        self.strikes = 0;
        if !self
            .policy
            .allows(&self.ctx.identity, Action::Publish, channel)
        {
            self.error(
                id,
                ErrorCode::Forbidden,
                "not allowed to publish",
                Some(channel),
            );
            return None;
        }
        let started = Instant::now();
        let published = match &self.services.broker {
            AnyBroker::Local(local) => {
                // The local hub cannot fail, so the ok may go first: the
                // publisher then sees its ok before the echo of its message.
                self.ok(id);
                local.publish(channel, &self.ctx.identity.user, data).await
            }
            broker => {
                // Through Redis the ok waits for the publication to be
                // numbered, and may follow the publisher's own echo.
                let published = broker.publish(channel, &self.ctx.identity.user, data).await;
                match &published {
                    Ok(_) => self.ok(id),
                    Err(_) => self.error(
                        id,
                        ErrorCode::Internal,
                        "the message broker is unavailable; not published",
                        Some(channel),
                    ),
                }
                published
            }
        };
        let Ok(published) = published else {
            return None;
        };
        let metrics = &self.services.metrics;
        metrics.messages_received.fetch_add(1, Ordering::Relaxed);
        metrics
            .messages_delivered
            .fetch_add(published.delivered as u64, Ordering::Relaxed);
        metrics.publish.observe(started.elapsed());
        None
    }

    fn refresh(&mut self, id: Option<u64>, token: &str) {
        if token.len() > self.services.config.auth.max_token_bytes {
            return self.error(id, ErrorCode::InvalidToken, "token too large", None);
        }
        // No waiting inside the session loop: an unknown kid starts a JWKS
        // refresh in the background and the client may retry.
        let identity = match self.services.verifier.verify_now(token) {
            Ok(identity) => identity,
            Err(failure) => {
                return self.error(id, ErrorCode::InvalidToken, &failure.to_string(), None);
            }
        };
        if identity.user != self.ctx.identity.user {
            return self.error(
                id,
                ErrorCode::TokenMismatch,
                "the new token names another user",
                None,
            );
        }
        let leeway = Duration::from_secs(self.services.config.auth.leeway_s);
        self.new_expiry = Some(expiry_instant(identity.expires_at, leeway));
        self.ctx.identity = identity;
        self.recheck_subscriptions("the refreshed token does not allow this subscription");
        self.ok(id);
    }

    /// Ends every subscription the current policy and identity no longer
    /// allow, telling the client which.
    fn recheck_subscriptions(&mut self, message: &str) {
        let lost: Vec<ChannelName> = self
            .subscriptions
            .iter()
            .filter(|c| !self.policy.allows(&self.ctx.identity, Action::Subscribe, c))
            .cloned()
            .collect();
        for channel in lost {
            self.subscriptions.remove(&channel);
            self.leave(&channel);
            self.services
                .metrics
                .subscriptions
                .fetch_sub(1, Ordering::Relaxed);
            self.error(None, ErrorCode::Forbidden, message, Some(&channel));
        }
    }

    /// Leaves one channel's fan-out, here and in the broker.
    fn leave(&self, channel: &ChannelName) {
        self.services.hub.unsubscribe(channel, self.ctx.number);
        self.services.broker.release(channel);
    }

    fn leave_all(&mut self) {
        let n = self.subscriptions.len() as i64;
        for channel in std::mem::take(&mut self.subscriptions) {
            self.leave(&channel);
        }
        self.services
            .metrics
            .subscriptions
            .fetch_sub(n, Ordering::Relaxed);
    }
}

fn read_error(e: &WsError) -> CloseReason {
    // Never log the error's text: tungstenite may quote frame bytes in it.
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => CloseReason::ClientClosed,
        WsError::Capacity(_) => CloseReason::TooBig,
        WsError::Utf8(_) => CloseReason::InvalidUtf8,
        WsError::Protocol(_) => CloseReason::ProtocolError,
        _ => CloseReason::Io,
    }
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
    let end = std::time::UNIX_EPOCH + Duration::from_secs(expires_at) + leeway;
    let remaining = end
        .duration_since(std::time::SystemTime::now())
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
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_a_burst_then_the_rate() {
        let mut b = Bucket::new(10, 3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.take());
        assert!(!b.take());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take(), "never more than the burst");
    }
}
