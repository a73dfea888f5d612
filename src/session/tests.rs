//! The session's behaviour over time — heartbeat, silence, token expiry,
//! drain turn, outbox overflow — on tokio's paused clock: a real
//! [`Gateway`] and a client over `tokio::io::duplex`, so hours of session
//! time pass in milliseconds. Each deadline is checked from both sides: the
//! session still runs a millisecond before it, and ends at it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use super::{CloseReason, SessionContext, drain_turn, run};
use crate::auth::Verifier;
use crate::auth::mint::unix_now;
use crate::channel::ChannelName;
use crate::config::Config;
use crate::gateway::Fanout;
use crate::gateway::{Caller, Gateway};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::policy::PolicyStore;

const MS: Duration = Duration::from_millis(1);
/// A heartbeat long enough to stay out of the way of other deadlines.
const HOUR_MS: u64 = 3_600_000;

/// A gateway on the in-process broker, its HMAC dev secret and default
/// policy written to a temporary directory (both read here, once).
fn gateway(adjust: impl FnOnce(&mut Config)) -> Arc<Gateway> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default();
    config.auth.hmac_secret_file = dir.path().join("hmac.secret");
    crate::tools::certs::ensure_dev_secret(&config.auth.hmac_secret_file).expect("secret");
    config.policy.dir = dir.path().join("policies");
    std::fs::create_dir(&config.policy.dir).expect("policy dir");
    std::fs::write(
        config.policy.dir.join("default.toml"),
        crate::policy::DEFAULT_POLICY,
    )
    .expect("policy");
    adjust(&mut config);
    let metrics = Arc::new(Metrics::default());
    let verifier = Verifier::with_metrics(&config, Arc::clone(&metrics.keys)).expect("verifier");
    let policies = PolicyStore::load(&config.policy.dir).expect("policies");
    let (gateway, worker) =
        Gateway::new(config, metrics, verifier, policies, Default::default()).expect("gateway");
    assert!(worker.is_none(), "the local broker needs no worker");
    Arc::new(gateway)
}

fn identity(user: &str, expires_at: u64) -> Identity {
    Identity {
        issued_at: None,
        user: user.to_owned(),
        roles: Vec::new(),
        expires_at,
        claims: serde_json::Map::new(),
    }
}

/// An `exp` no test reaches.
fn tomorrow() -> u64 {
    unix_now() + 86_400
}

/// Lets every task run until it waits again, without moving the clock.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// Moves the paused clock to `at`, firing the timers due by then.
async fn advance_to(at: Instant) {
    tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
    settle().await;
}

/// One session under test and the client end of its socket.
struct Running {
    client: WebSocketStream<DuplexStream>,
    shutdown: CancellationToken,
    hurry: CancellationToken,
    session: JoinHandle<CloseReason>,
    started: Instant,
}

impl Running {
    /// Starts session `number` for `identity` and reads its welcome.
    async fn start(gateway: &Arc<Gateway>, number: u64, identity: Identity) -> Self {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        // Nothing sends control messages in these tests.
        let control = Arc::new(crate::gateway::slots::Mailbox::default());
        let ctx = SessionContext {
            client: std::net::IpAddr::from([127, 0, 0, 1]),
            progress: None,
            number,
            id: format!("test-{number}"),
            identity,
            control: Some(control),
        };
        let (shutdown, hurry) = (CancellationToken::new(), CancellationToken::new());
        let started = Instant::now();
        let session = tokio::spawn({
            let (gateway, shutdown, hurry) = (Arc::clone(gateway), shutdown.clone(), hurry.clone());
            async move { run(server_io, &gateway, ctx, shutdown, hurry).await }
        });
        match client.next().await {
            Some(Ok(Message::Text(text))) if text.starts_with(r#"{"op":"welcome""#) => {}
            other => panic!("expected the welcome, got {other:?}"),
        }
        settle().await;
        // Every deadline below is measured from `started`.
        assert_eq!(started.elapsed(), Duration::ZERO, "the clock moved");
        Self {
            client,
            shutdown,
            hurry,
            session,
            started,
        }
    }

    #[track_caller]
    fn assert_running(&self) {
        assert!(
            !self.session.is_finished(),
            "the session ended early, {:?} after its start",
            self.started.elapsed()
        );
    }

    /// Waits (the clock jumps to the next timer) for the session's end.
    async fn end(&mut self) -> CloseReason {
        (&mut self.session).await.expect("the session task")
    }

    /// The code of the close frame the client reads next, skipping other
    /// frames; `None` when the stream ends without one.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.client.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }
}

#[test]
fn drain_turns_spread_over_the_window() {
    let mut tenths = [0u32; 10];
    for n in 1..=1000 {
        let turn = drain_turn(n, 10_000);
        assert!(turn < Duration::from_secs(10));
        tenths[(turn.as_millis() / 1000) as usize] += 1;
    }
    assert!(
        tenths.iter().all(|&t| (90..=110).contains(&t)),
        "{tenths:?}"
    );
    assert_eq!(drain_turn(7, 0), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn pings_every_heartbeat_and_a_client_that_answers_stays_open() {
    let gateway = gateway(|_| {});
    let ws = &gateway.config.websocket;
    let heartbeat = Duration::from_millis(ws.heartbeat_ms);
    let silence_limit = heartbeat + Duration::from_millis(ws.heartbeat_grace_ms);
    let mut s = Running::start(&gateway, 1, identity("alice", tomorrow())).await;

    advance_to(s.started + heartbeat - MS).await;
    let early = s.client.next().now_or_never();
    assert!(early.is_none(), "a frame before the heartbeat: {early:?}");
    // Reading answers each ping (tungstenite's pong goes out on the next
    // read), which keeps the session alive well past its silence limit.
    const BEATS: u32 = 6;
    assert!(heartbeat * BEATS > silence_limit * 3);
    for beat in 1..=BEATS {
        match s.client.next().await {
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("heartbeat {beat}: expected a ping, got {other:?}"),
        }
        assert_eq!(s.started.elapsed(), heartbeat * beat, "heartbeat {beat}");
    }
    s.assert_running();

    s.client.close(None).await.expect("client close");
    assert_eq!(s.end().await, CloseReason::ClientClosed);
    assert_eq!(s.started.elapsed(), heartbeat * BEATS);
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dropped_after_heartbeat_and_grace() {
    let gateway = gateway(|_| {});
    let ws = &gateway.config.websocket;
    let silence_limit = Duration::from_millis(ws.heartbeat_ms + ws.heartbeat_grace_ms);
    // The client is never polled, so the ping it is sent goes unanswered.
    let mut s = Running::start(&gateway, 1, identity("alice", tomorrow())).await;

    advance_to(s.started + silence_limit - MS).await;
    s.assert_running();
    assert_eq!(s.end().await, CloseReason::HeartbeatTimeout);
    assert_eq!(s.started.elapsed(), silence_limit);

    // The peer is presumed gone: it got its ping, then no close frame.
    assert!(matches!(s.client.next().await, Some(Ok(Message::Ping(_)))));
    assert_eq!(s.close_code().await, None);
    let closed = &gateway.metrics.sessions_closed;
    assert_eq!(closed.get("heartbeat_timeout"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_closes_with_4001_at_exp_plus_leeway() {
    let gateway = gateway(|c| {
        c.auth.leeway_s = 5;
        c.websocket.heartbeat_ms = HOUR_MS;
    });
    let exp = unix_now() + 10;
    let end = UNIX_EPOCH + Duration::from_secs(exp + 5);
    // The session reads the wall clock once, while it starts: its
    // deadline lies between these two readings.
    let latest = end.duration_since(SystemTime::now()).expect("future");
    let mut s = Running::start(&gateway, 1, identity("alice", exp)).await;
    let earliest = end.duration_since(SystemTime::now()).expect("future");
    // Room for a loaded machine between the two readings.
    assert!(earliest > Duration::from_secs(10), "{earliest:?}");

    advance_to(s.started + earliest - MS).await;
    s.assert_running();
    assert_eq!(s.end().await, CloseReason::TokenExpired);
    let at = s.started.elapsed();
    // Timers fire on whole milliseconds, and the paused clock may have
    // auto-advanced a little while the session was starting (a loaded
    // machine leaves the runtime idle at different moments).
    assert!(
        earliest <= at && at <= latest + 20 * MS,
        "{earliest:?} <= {at:?} <= {latest:?}"
    );
    assert_eq!(s.close_code().await, Some(4001));
    assert_eq!(gateway.metrics.close_codes.get("4001"), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_with_1001_at_the_sessions_drain_turn() {
    const WINDOW_MS: u64 = 10_000;
    let gateway = gateway(|c| {
        c.server.drain_window_ms = WINDOW_MS;
        c.websocket.heartbeat_ms = HOUR_MS;
    });
    let number = 1;
    let turn = drain_turn(number, WINDOW_MS);
    assert!(turn > Duration::from_secs(1) && turn < Duration::from_millis(WINDOW_MS));
    let mut s = Running::start(&gateway, number, identity("alice", tomorrow())).await;

    // The turn counts from the start of the drain, not of the session.
    advance_to(s.started + Duration::from_secs(60)).await;
    let drain = Instant::now();
    s.shutdown.cancel();
    settle().await;
    s.assert_running();
    advance_to(drain + turn - MS).await;
    s.assert_running();
    assert_eq!(s.end().await, CloseReason::Shutdown);
    assert_eq!(drain.elapsed(), turn);
    assert_eq!(s.close_code().await, Some(1001));
}

#[tokio::test(start_paused = true)]
async fn a_token_that_expires_before_the_drain_turn_closes_with_4001() {
    const WINDOW_MS: u64 = 600_000;
    let gateway = gateway(|c| {
        c.auth.leeway_s = 0;
        c.server.drain_window_ms = WINDOW_MS;
        c.websocket.heartbeat_ms = HOUR_MS;
    });
    // Session 1's turn is about 371 s into the window; its token ends in
    // about 20 s, well before that.
    let turn = drain_turn(1, WINDOW_MS);
    assert!(turn > Duration::from_secs(60), "{turn:?}");
    let mut s = Running::start(&gateway, 1, identity("alice", unix_now() + 20)).await;
    s.shutdown.cancel();
    settle().await;
    s.assert_running();
    // Which deadline fired is told by the session's own clock: the wall
    // clock stands still here, so reading it again would say "not yet".
    assert_eq!(s.end().await, CloseReason::TokenExpired);
    assert!(s.started.elapsed() < Duration::from_secs(21));
    assert_eq!(s.close_code().await, Some(4001));
}

#[tokio::test(start_paused = true)]
async fn hurry_ends_a_draining_session_at_once() {
    const WINDOW_MS: u64 = 10_000;
    let gateway = gateway(|c| {
        c.server.drain_window_ms = WINDOW_MS;
        c.websocket.heartbeat_ms = HOUR_MS;
    });
    let turn = drain_turn(1, WINDOW_MS);
    let mut s = Running::start(&gateway, 1, identity("alice", tomorrow())).await;

    s.shutdown.cancel();
    advance_to(s.started + turn / 2).await;
    s.assert_running();
    let hurried = Instant::now();
    s.hurry.cancel();
    assert_eq!(s.end().await, CloseReason::Shutdown);
    assert_eq!(hurried.elapsed(), Duration::ZERO);
    assert_eq!(s.close_code().await, Some(1001));
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_that_stops_reading_is_cut_off_as_a_slow_reader() {
    const OUTBOX: usize = 4;
    let gateway = gateway(|c| c.websocket.outbox_frames = OUTBOX);
    let alice = identity("alice", tomorrow());
    let mut s = Running::start(&gateway, 1, alice.clone()).await;
    let subscribe = r#"{"op":"subscribe","id":1,"channel":"user:alice"}"#;
    s.client.send(Message::text(subscribe)).await.expect("send");
    match s.client.next().await {
        Some(Ok(Message::Text(text))) if text == r#"{"op":"ok","id":1}"# => {}
        other => panic!("expected the subscribe's ok, got {other:?}"),
    }

    // The policy lets alice publish to her own channel.
    let channel = ChannelName::parse("user:alice").expect("channel");
    let policy = gateway.policies.current();
    let caller = Caller {
        identity: &alice,
        policy: &policy,
    };
    let data = RawValue::from_string(format!("\"{}\"", "x".repeat(1024))).expect("json");

    // While the client reads, many outboxes' worth flow through.
    for n in 0..OUTBOX * 10 {
        let published = gateway
            .publish(caller, &channel, &data, || {}, Fanout::Inline)
            .await;
        assert_eq!(published.map(|p| (p.delivered, p.slow)), Ok((1, 0)), "#{n}");
        match s.client.next().await {
            Some(Ok(Message::Text(text))) if text.starts_with(r#"{"op":"message""#) => {}
            other => panic!("#{n}: expected a message, got {other:?}"),
        }
    }
    s.assert_running();

    // Now it reads nothing: the socket's buffers fill, the session's write
    // waits, then the outbox fills and the hub cuts the session off.
    let mut published = 0;
    loop {
        s.assert_running();
        let result = gateway
            .publish(caller, &channel, &data, || {}, Fanout::Inline)
            .await;
        let result = result.expect("published");
        published += 1;
        if result.slow == 1 {
            break;
        }
        assert_eq!(result.delivered, 1);
        assert!(published < 10_000, "never cut off");
        settle().await;
    }
    // The socket took far more than the outbox holds before it filled.
    assert!(published > OUTBOX * 10, "cut off after {published}");

    let cut_off = Instant::now();
    assert_eq!(s.end().await, CloseReason::SlowReader);
    // The close frame may not fit in the full socket: the session ends
    // within the write deadline all the same.
    let write_timeout = Duration::from_millis(gateway.config.websocket.write_timeout_ms);
    assert!(
        cut_off.elapsed() <= write_timeout,
        "{:?}",
        cut_off.elapsed()
    );
    let metrics = &gateway.metrics;
    assert_eq!(metrics.sessions_closed.get("slow_reader"), 1);
    assert_eq!(metrics.subscriptions.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.sessions_open.load(Ordering::Relaxed), 0);
}

#[test]
fn an_expiry_past_any_clock_is_capped_not_overflowed() {
    // Verification refuses such a token; this arithmetic holds regardless.
    let now = tokio::time::Instant::now();
    for exp in [u64::MAX, 1 << 63, 253_402_300_799] {
        assert!(super::expiry_instant(exp, Duration::from_secs(30)) > now);
    }
    assert!(super::expiry_instant(0, Duration::ZERO) <= tokio::time::Instant::now());
}
