//! `wsgate bench`: a load generator for wsgate and for plain broadcast
//! servers (peers measured with the same tool). Modes:
//!
//! - `idle`: open N authenticated connections, hold them (answering
//!   pings), and report the server's RSS growth per connection;
//! - `fanout`: one publisher, N subscribers on one channel, a window of
//!   messages in flight or a fixed rate; deliveries/s and publish-to-receipt
//!   latency from an HDR histogram;
//! - `connect`: authenticated connections per second, TLS and JWT included;
//! - `resume`: a reconnect storm resuming from history (resume.rs);
//! - `api`: HTTP API publishes to WebSocket subscribers (api.rs);
//! - `floor`: the kernel's own cost of a fan-out on this machine, plain
//!   TCP or rustls records with no gateway at all (floor.rs).
//!
//! The same modes drive wsgate, a plain broadcast server (`--plain`, the
//! Node peer) and nats-server's WebSocket listener (`--nats`: the NATS
//! client protocol over the same `wss://` connection, nats.rs).
//!
//! Client sockets are spread over source addresses 127.0.0.1..N when one
//! address's port range is not enough. Progress goes to stderr; the result
//! is one JSON line.

mod api;
pub mod cli;
mod floor;
mod nats;
mod resume;

pub use api::{ApiReport, ApiTarget, api};
pub use floor::{FloorReport, floor, floor_reader};
pub use resume::{ResumeReport, resume};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http};
use tokio_util::sync::CancellationToken;

/// A connected benchmark client.
pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("connect: {0}")]
    Connect(String),
}

/// How clients authenticate.
#[derive(Clone)]
pub enum Auth {
    /// One token for every client.
    Token(String),
    /// Mint an HS256 token per client (`sub` = `bench-<i>`) with this secret.
    Secret(Vec<u8>),
}

/// What the server at a target speaks.
#[derive(Clone)]
enum Peer {
    /// wsgate: a token at the upgrade, a `welcome`, channels, JSON frames.
    Wsgate,
    /// A plain broadcast server: a token at the upgrade, then every text
    /// message goes to every client; no `welcome`, no channels.
    Plain,
    /// nats-server: a plain upgrade, then the NATS protocol, its token in
    /// `CONNECT`.
    Nats(nats::Hello),
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    addr: SocketAddr,
    host: String,
    url: String,
    tls: Arc<ClientConfig>,
    auth: Auth,
    header_carrier: bool,
    peer: Peer,
    sources: Vec<IpAddr>,
}

/// An open client: its WebSocket and, for NATS, what it has read past the
/// handshake.
struct Client {
    ws: Ws,
    nats: nats::Reader,
}

impl Target {
    /// The same target, its TLS sessions resumed from one in-memory cache
    /// (an abbreviated handshake after the first), as a returning client's
    /// would be.
    #[must_use]
    pub fn resuming(mut self) -> Self {
        let mut tls = (*self.tls).clone();
        tls.resumption = rustls::client::Resumption::in_memory_sessions(1024);
        self.tls = Arc::new(tls);
        self
    }

    /// The same target speaking NATS to nats-server's WebSocket listener:
    /// no token at the upgrade; `CONNECT` carries the `--token`, or the
    /// text of the `--secret` file (the server's `authorization.token`).
    ///
    /// # Errors
    /// The secret is not UTF-8 text.
    pub fn nats(mut self) -> Result<Self, BenchError> {
        let token = match &self.auth {
            Auth::Token(token) => token.clone(),
            Auth::Secret(secret) => String::from_utf8(secret.clone()).map_err(|_| {
                BenchError::Setup("the secret is not UTF-8 text, so not a NATS token".into())
            })?,
        };
        self.peer = Peer::Nats(nats::Hello::new(&token)?);
        Ok(self)
    }

    /// Resolves `url` (`wss://host:port/path`), trusting the CA file `ca`.
    ///
    /// # Errors
    /// A URL that is not `wss://`, an unresolvable host, or an unusable CA.
    pub async fn new(
        url: &str,
        ca: &std::path::Path,
        auth: Auth,
        header_carrier: bool,
        plain: bool,
        sources: usize,
    ) -> Result<Self, BenchError> {
        let rest = url
            .strip_prefix("wss://")
            .ok_or_else(|| BenchError::Setup(format!("{url}: only wss:// URLs")))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.trim_matches(['[', ']']).to_owned(),
                p.parse::<u16>()
                    .map_err(|_| BenchError::Setup(format!("bad port in {url}")))?,
            ),
            None => (authority.to_owned(), 443),
        };
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| BenchError::Setup(format!("resolve {host}: {e}")))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| BenchError::Setup(format!("{host} has no IPv4 address")))?;
        let tls =
            crate::tls::bench_client_config(ca).map_err(|e| BenchError::Setup(e.to_string()))?;
        // Spread over 127.0.0.1..N only for loopback targets.
        let sources = if addr.ip().is_loopback() {
            (1..=sources.clamp(1, 250))
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            addr,
            host,
            url: url.to_owned(),
            tls,
            auth,
            header_carrier,
            peer: if plain { Peer::Plain } else { Peer::Wsgate },
            sources,
        })
    }

    fn token(&self, i: usize) -> Result<String, BenchError> {
        match &self.auth {
            Auth::Token(t) => Ok(t.clone()),
            Auth::Secret(secret) => hs256(secret, &format!("bench-{i}"), None),
        }
    }

    /// Opens client `i` as `Target::open` does, for callers that only
    /// write to it or read JSON frames.
    ///
    /// # Errors
    /// Any step failing.
    pub async fn connect(&self, i: usize) -> Result<Ws, BenchError> {
        self.open(i).await.map(|client| client.ws)
    }

    /// Opens client `i`: TCP from its source address, TLS, the upgrade
    /// with a token (wsgate, plain) and then wsgate's `welcome`, or NATS's
    /// handshake (`INFO`, `CONNECT` with the token, `PING`, `PONG`).
    ///
    /// # Errors
    /// Any step failing.
    async fn open(&self, i: usize) -> Result<Client, BenchError> {
        let err = |e: &dyn std::fmt::Display| BenchError::Connect(e.to_string());
        let socket = TcpSocket::new_v4().map_err(|e| err(&e))?;
        if let Some(src) = self.sources.get(i % self.sources.len().max(1)) {
            socket.bind(SocketAddr::new(*src, 0)).map_err(|e| err(&e))?;
        }
        let tcp = socket.connect(self.addr).await.map_err(|e| err(&e))?;
        tcp.set_nodelay(true).map_err(|e| err(&e))?;
        let name = ServerName::try_from(self.host.clone()).map_err(|e| err(&e))?;
        let tls = TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| err(&e))?;
        let mut req = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| err(&e))?;
        // nats-server offers no subprotocol (one asked for fails the
        // upgrade) and reads its token from CONNECT.
        if !matches!(self.peer, Peer::Nats(_)) {
            let token = self.token(i)?;
            let (name, value) = if self.header_carrier {
                (http::header::AUTHORIZATION, format!("Bearer {token}"))
            } else {
                (
                    http::header::SEC_WEBSOCKET_PROTOCOL,
                    format!("wsgate.v1, bearer.{token}"),
                )
            };
            req.headers_mut()
                .insert(name, value.parse().map_err(|e| err(&e))?);
        }
        // tungstenite zero-fills its whole read buffer before every read:
        // at the default 128 KiB that was half this generator's CPU.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, tls, Some(config))
            .await
            .map_err(|e| err(&e))?;
        let mut reader = nats::Reader::default();
        match &self.peer {
            Peer::Wsgate => match ws.next().await {
                Some(Ok(Message::Text(t))) if t.starts_with(r#"{"op":"welcome""#) => {}
                other => return Err(BenchError::Connect(format!("no welcome: {other:?}"))),
            },
            Peer::Plain => {}
            Peer::Nats(hello) => nats::handshake(&mut ws, &mut reader, hello).await?,
        }
        Ok(Client { ws, nats: reader })
    }
}

/// A two-hour HS256 token for `sub` with the role `member`.
fn hs256(secret: &[u8], sub: &str, aud: Option<&str>) -> Result<String, BenchError> {
    let now = crate::auth::mint::unix_now();
    let mut claims = serde_json::json!({
        "sub": sub,
        "roles": ["member"],
        "iat": now,
        "exp": now + 7200,
    });
    if let Some(aud) = aud {
        claims["aud"] = aud.into();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|e| BenchError::Setup(format!("sign: {e}")))
}

/// An API token (`sub` bench-api, audience `aud`) signed with the secret
/// in `path`.
///
/// # Errors
/// The secret file cannot be read, or signing fails.
pub fn api_token(path: &std::path::Path, aud: &str) -> Result<String, BenchError> {
    hs256(&secret_from_file(path)?, "bench-api", Some(aud))
}

/// Latency percentiles.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Reads `"name":<digits>` out of a frame without parsing the JSON.
fn field_u64(text: &str, name: &str) -> Option<u64> {
    let at = text.find(name)? + name.len();
    let digits = text[at..].trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Opens `n` connections `concurrency` at a time, reporting progress.
async fn open_many(
    target: &Target,
    n: usize,
    concurrency: usize,
    what: &str,
) -> (Vec<(usize, Client)>, usize) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let mut open = Vec::with_capacity(n);
    let mut failed = 0;
    let mut last = Instant::now();
    let mut first_error = None;
    let mut take =
        |joined: Result<(usize, Result<Client, BenchError>), _>, open: &mut Vec<_>| match joined {
            Ok((i, Ok(ws))) => open.push((i, ws)),
            Ok((_, Err(e))) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => failed += 1,
        };
    let mut spawned = 0;
    while spawned < n || !set.is_empty() {
        if spawned < n {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let target = target.clone();
            let i = spawned;
            set.spawn(async move {
                let _permit = permit;
                (i, target.open(i).await)
            });
            spawned += 1;
            while let Some(joined) = set.try_join_next() {
                take(joined, &mut open);
            }
        } else if let Some(joined) = set.join_next().await {
            take(joined, &mut open);
        }
        if last.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "{what}: {} open of {n}, {} failed",
                open.len(),
                spawned - open.len() - set.len()
            );
            last = Instant::now();
        }
    }
    if let Some(e) = first_error {
        eprintln!("{what}: first failure: {e}");
    }
    (open, failed)
}

/// The result of `bench idle`.
#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub mode: &'static str,
    pub connections: usize,
    pub opened: usize,
    pub failed: usize,
    /// The channel every connection subscribed to, if any.
    pub channel: Option<String>,
    /// Whether they subscribed with `"presence":true`.
    pub presence: bool,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_conn_kib: Option<f64>,
    /// RSS every 10 s while holding (heartbeat growth check).
    pub rss_samples_kib: Vec<u64>,
    /// With `--redis-url`: what Redis ran while the connections were held
    /// (after they settled), per connection and minute: every command
    /// (those run inside scripts included), and the scripts.
    pub redis_window_s: Option<f64>,
    pub redis_commands_per_conn_per_min: Option<f64>,
    pub redis_scripts_per_conn_per_min: Option<f64>,
    pub elapsed_s: f64,
}

/// The resident set of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What `bench idle` connections do once open.
#[derive(Debug, Clone, Default)]
pub struct IdleOptions {
    /// Subscribe every connection to this channel.
    pub channel: Option<String>,
    /// With `"presence":true`.
    pub presence: bool,
    /// Read Redis' counters here while holding.
    pub redis_url: Option<String>,
}

/// Redis' counters: every command run (scripts' included), and scripts.
async fn redis_counters(
    conn: Option<&mut redis::aio::MultiplexedConnection>,
) -> Option<(Instant, u64, u64)> {
    let conn = conn?;
    let (Some(commands), Some(scripts)) = (
        resume::redis_commands(conn).await,
        resume::redis_script_calls(conn).await,
    ) else {
        eprintln!("idle: could not read redis' counters");
        return None;
    };
    Some((Instant::now(), commands, scripts))
}

/// Opens and holds idle connections.
pub async fn idle(
    target: &Target,
    connections: usize,
    concurrency: usize,
    hold: Duration,
    server_pid: Option<u32>,
    options: &IdleOptions,
) -> IdleReport {
    let started = Instant::now();
    let before = server_pid.and_then(rss_kib);
    let (open, failed) = open_many(target, connections, concurrency, "idle").await;
    let opened = open.len();
    let subscribe = match (&options.channel, &target.peer) {
        (None, _) => None,
        (Some(channel), Peer::Nats(_)) => match nats::Subject::new(channel) {
            Ok(subject) => Some(subject.subscribe(1)),
            Err(e) => {
                eprintln!("idle: {e}: not subscribing");
                None
            }
        },
        // A broadcast server sends every client everything: its
        // connections are as good as subscribed already.
        (Some(_), Peer::Plain) => None,
        (Some(channel), _) => Some(Message::text(
            serde_json::json!({"op": "subscribe", "id": 1, "channel": channel, "presence": options.presence})
                .to_string(),
        )),
    };
    let speaks_nats = matches!(target.peer, Peer::Nats(_));
    // Each connection reads (answering the server's pings, WebSocket or
    // NATS) until told to stop.
    let stop = Arc::new(Notify::new());
    let mut readers = JoinSet::new();
    for (_, client) in open {
        let Client {
            mut ws,
            nats: mut reader,
        } = client;
        let stop = Arc::clone(&stop);
        let subscribe = subscribe.clone();
        readers.spawn(async move {
            if let Some(frame) = subscribe {
                let _ = ws.send(frame).await;
            }
            tokio::select! {
                () = stop.notified() => {}
                () = async {
                    if speaks_nats {
                        nats::hold(&mut ws, &mut reader).await;
                    } else {
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                } => {}
            }
            let _ = ws.close(None).await;
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server_pid.and_then(rss_kib);
    let mut redis = match &options.redis_url {
        Some(url) => {
            let conn = resume::redis_conn(url).await;
            if conn.is_none() {
                eprintln!("idle: cannot connect to {url}");
            }
            conn
        }
        None => None,
    };
    let redis_start = redis_counters(redis.as_mut()).await;
    let mut samples = Vec::new();
    let hold_until = Instant::now() + hold;
    while Instant::now() < hold_until {
        let step = hold_until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(10));
        tokio::time::sleep(step).await;
        if let Some(rss) = server_pid.and_then(rss_kib) {
            eprintln!("idle: holding {opened}, server RSS {rss} KiB");
            samples.push(rss);
        }
    }
    let redis_end = redis_counters(redis.as_mut()).await;
    stop.notify_waiters();
    readers.shutdown().await;
    let per_conn = match (before, after) {
        (Some(b), Some(a)) if opened > 0 => Some((a.saturating_sub(b)) as f64 / opened as f64),
        _ => None,
    };
    let redis = match (redis_start, redis_end) {
        (Some((t0, c0, k0)), Some((t1, c1, k1))) if opened > 0 => {
            let minutes = t1.duration_since(t0).as_secs_f64() / 60.0;
            let per = |n: u64| n as f64 / opened as f64 / minutes;
            Some((minutes * 60.0, per(c1 - c0), per(k1 - k0)))
        }
        _ => None,
    };
    IdleReport {
        mode: "idle",
        connections,
        opened,
        failed,
        channel: options.channel.clone(),
        presence: options.presence,
        rss_before_kib: before,
        rss_after_kib: after,
        rss_per_conn_kib: per_conn,
        rss_samples_kib: samples,
        redis_window_s: redis.map(|r| r.0),
        redis_commands_per_conn_per_min: redis.map(|r| r.1),
        redis_scripts_per_conn_per_min: redis.map(|r| r.2),
        elapsed_s: started.elapsed().as_secs_f64(),
    }
}

/// How the publisher paces itself.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// At most this many messages not yet received by every subscriber.
    Window(u32),
    /// This many messages per second.
    Rate(u32),
}

/// The result of `bench fanout`.
#[derive(Debug, Serialize)]
pub struct FanoutReport {
    pub mode: &'static str,
    pub subscribers: usize,
    pub size: usize,
    pub window: Option<u32>,
    pub rate: Option<u32>,
    pub published: u64,
    pub delivered: u64,
    pub duration_s: f64,
    pub deliveries_per_s: f64,
    pub latency_us: Percentiles,
    pub errors: u64,
    /// With `--server-pid`: the server's CPU (user + system) over the
    /// measured seconds, per delivery, and as a share of one core.
    pub server_cpu_us_per_delivery: Option<f64>,
    pub server_cpu_share: Option<f64>,
    /// This load generator's CPU share over the measured seconds (near 1.0
    /// it, not the server, sets the pace).
    pub client_cpu_share: Option<f64>,
}

/// Counts receipts per message so the publisher knows what is complete.
struct Acks {
    slots: Vec<AtomicU32>,
    subscribers: u32,
    done: Notify,
}

impl Acks {
    fn slot(&self, k: u64) -> &AtomicU32 {
        &self.slots[(k % self.slots.len() as u64) as usize]
    }
}

/// One publisher (through `publisher`, or `target`), `subscribers`
/// receivers on `channel` (through `target`).
///
/// # Errors
/// The publisher could not connect, or no subscriber did.
#[allow(clippy::too_many_arguments)]
pub async fn fanout(
    target: &Target,
    publisher: Option<&Target>,
    subscribers: usize,
    size: usize,
    pace: Pace,
    duration: Duration,
    warmup: Duration,
    channel: &str,
    server_pid: Option<u32>,
) -> Result<FanoutReport, BenchError> {
    let window = match pace {
        Pace::Window(w) => w.max(1),
        Pace::Rate(_) => 1,
    };
    let Receivers {
        count: receivers,
        acks,
        errors,
        measuring,
        delivered,
        stop,
        mut tasks,
    } = start_receivers(
        target,
        subscribers,
        channel,
        (u64::from(window) * 4).max(64),
        "fanout subscribers",
    )
    .await?;
    eprintln!("fanout: {receivers} subscribers ready");

    let publisher = publisher.unwrap_or(target).connect(usize::MAX / 2).await?;
    let (mut sink, mut stream) = publisher.split();
    let subject = match target.peer {
        Peer::Nats(_) => Some(nats::Subject::new(channel)?),
        _ => None,
    };
    // Drain whatever comes back to the publisher (echoes from plain peers);
    // a NATS server's refusal comes as a -ERR, the only trace of it.
    let speaks_nats = subject.is_some();
    let drain = tokio::spawn(async move {
        let mut reader = nats::Reader::default();
        while let Some(Ok(msg)) = stream.next().await {
            let Some(data) = nats::bytes_of(msg).filter(|_| speaks_nats) else {
                continue;
            };
            let fed = reader.feed(&data, |op| {
                if let nats::Op::Err(text) = op {
                    eprintln!("fanout: publisher: -ERR {}", String::from_utf8_lossy(text));
                }
                ControlFlow::Continue(())
            });
            if let Err(e) = fed {
                eprintln!("fanout: publisher: {e}");
                break;
            }
        }
    });
    let pad = "x".repeat(size.saturating_sub(40));
    let channel_json = serde_json::to_string(channel).unwrap_or_default();
    let frame = |k: u64| -> Message {
        let data = format!(r#"{{"t":{},"k":{k},"p":"{pad}"}}"#, micros_now());
        match (&target.peer, &subject) {
            (_, Some(subject)) => subject.publish(&data),
            (Peer::Plain, None) => Message::text(data),
            _ => Message::text(format!(
                r#"{{"op":"publish","channel":{channel_json},"data":{data}}}"#
            )),
        }
    };
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = measure_from + duration;
    let mut published: u64 = 0;
    let mut completed: u64 = 0;
    let mut measured_published: u64 = 0;
    // The server's and this process's CPU seconds when measuring began.
    let mut cpu_from: (Option<f64>, Option<f64>) = (None, None);
    let mut last_progress = Instant::now();
    let mut rate_tick = match pace {
        Pace::Rate(r) => Some(tokio::time::interval(Duration::from_secs_f64(
            1.0 / f64::from(r.max(1)),
        ))),
        Pace::Window(_) => None,
    };
    while Instant::now() < end {
        if !measuring.load(Ordering::Relaxed) && Instant::now() >= measure_from {
            measuring.store(true, Ordering::Relaxed);
            measured_published = published;
            cpu_from = (server_pid.and_then(resume::cpu_s), own_cpu_s());
        }
        match &mut rate_tick {
            Some(tick) => {
                tick.tick().await;
                if sink.send(frame(published)).await.is_err() {
                    break;
                }
                published += 1;
            }
            None => {
                let mut fed = false;
                while published - completed < u64::from(window) {
                    if sink.feed(frame(published)).await.is_err() {
                        break;
                    }
                    published += 1;
                    fed = true;
                }
                if fed && sink.flush().await.is_err() {
                    break;
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), acks.done.notified()).await;
            }
        }
        while completed < published && acks.slot(completed).load(Ordering::Acquire) >= receivers {
            acks.slot(completed).store(0, Ordering::Release);
            completed += 1;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "fanout: published {published}, delivered {}",
                delivered.load(Ordering::Relaxed)
            );
            last_progress = Instant::now();
        }
    }
    let measured_for = end.saturating_duration_since(measure_from);
    measuring.store(false, Ordering::Relaxed);
    let cpu_to = (server_pid.and_then(resume::cpu_s), own_cpu_s());
    let delivered_so_far = delivered.load(Ordering::Relaxed);
    let secs = measured_for.as_secs_f64().max(1e-9);
    let server_cpu = cpu_from.0.zip(cpu_to.0).map(|(a, b)| b - a);
    let client_cpu = cpu_from.1.zip(cpu_to.1).map(|(a, b)| b - a);
    // Let in-flight messages land before reading the histograms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = sink.close().await;
    drain.abort();
    stop.cancel();
    let mut total = histogram();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(h) = joined {
            let _ = total.add(&h);
        }
    }
    let delivered = delivered.load(Ordering::Relaxed);
    Ok(FanoutReport {
        mode: "fanout",
        subscribers: receivers as usize,
        size,
        window: matches!(pace, Pace::Window(_)).then_some(window),
        rate: match pace {
            Pace::Rate(r) => Some(r),
            Pace::Window(_) => None,
        },
        published: published - measured_published,
        delivered,
        duration_s: measured_for.as_secs_f64(),
        deliveries_per_s: delivered as f64 / measured_for.as_secs_f64().max(1e-9),
        latency_us: Percentiles::of(&total),
        errors: errors.load(Ordering::Relaxed),
        server_cpu_us_per_delivery: server_cpu
            .filter(|_| delivered_so_far > 0)
            .map(|cpu| cpu * 1e6 / delivered_so_far as f64),
        server_cpu_share: server_cpu.map(|cpu| cpu / secs),
        client_cpu_share: client_cpu.map(|cpu| cpu / secs),
    })
}

/// This process's CPU seconds so far (user + system).
fn own_cpu_s() -> Option<f64> {
    resume::cpu_s(std::process::id())
}

/// Subscribers receiving: each records publish-to-receipt latency (the
/// `t` in the data) while `measuring`, and counts receipts of `k` in `acks`.
struct Receivers {
    /// Subscribers connected.
    count: u32,
    acks: Arc<Acks>,
    /// Connections and subscriptions that failed (and, later, publishes,
    /// and NATS `-ERR`s and protocol errors at subscribers).
    errors: Arc<AtomicU64>,
    measuring: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: JoinSet<Histogram<u64>>,
}

/// Opens `subscribers` connections, subscribes each to `channel`
/// (wsgate) and starts its receiving task, with `ring` receipt counters;
/// a connection that fails to open or subscribe counts in `errors`.
///
/// # Errors
/// No subscriber connected.
async fn start_receivers(
    target: &Target,
    subscribers: usize,
    channel: &str,
    ring: u64,
    what: &str,
) -> Result<Receivers, BenchError> {
    let (open, failed) = open_many(target, subscribers, 200, what).await;
    if open.is_empty() {
        return Err(BenchError::Connect("no subscriber connected".into()));
    }
    let count = u32::try_from(open.len()).unwrap_or(u32::MAX);
    let acks = Arc::new(Acks {
        slots: (0..ring).map(|_| AtomicU32::new(0)).collect(),
        subscribers: count,
        done: Notify::new(),
    });
    let errors = Arc::new(AtomicU64::new(failed as u64));
    let measuring = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let stop = CancellationToken::new();
    let subscribe = Message::text(format!(
        r#"{{"op":"subscribe","id":1,"channel":{}}}"#,
        serde_json::to_string(channel).unwrap_or_default()
    ));
    let subject = match target.peer {
        Peer::Nats(_) => Some(nats::Subject::new(channel)?),
        _ => None,
    };
    let speaks_nats = subject.is_some();
    let mut first_error = None;
    for (_, client) in open {
        let Client {
            mut ws,
            nats: mut reader,
        } = client;
        let subscribed = match (&target.peer, &subject) {
            (Peer::Plain, _) => Ok(()),
            (_, Some(subject)) => nats::subscribe(&mut ws, &mut reader, subject, 1).await,
            _ => wsgate_subscribe(&mut ws, subscribe.clone()).await,
        };
        if let Err(e) = subscribed {
            errors.fetch_add(1, Ordering::Relaxed);
            first_error.get_or_insert(e);
            continue;
        }
        let mut receipts = Receipts {
            acks: Arc::clone(&acks),
            measuring: Arc::clone(&measuring),
            delivered: Arc::clone(&delivered),
            hist: histogram(),
        };
        let plain = matches!(target.peer, Peer::Plain);
        let (stop, errors) = (stop.clone(), Arc::clone(&errors));
        tasks.spawn(async move {
            if speaks_nats {
                receive_nats(ws, reader, &mut receipts, &stop, &errors).await;
            } else {
                receive_frames(ws, plain, &mut receipts, &stop).await;
            }
            receipts.hist
        });
    }
    if let Some(e) = first_error {
        eprintln!("{what}: first subscribe failure: {e}");
    }
    Ok(Receivers {
        count,
        acks,
        errors,
        measuring,
        delivered,
        stop,
        tasks,
    })
}

/// Subscribes a wsgate client and waits for its `ok`.
async fn wsgate_subscribe(ws: &mut Ws, frame: Message) -> Result<(), BenchError> {
    ws.send(frame)
        .await
        .map_err(|e| BenchError::Connect(format!("subscribe: {e}")))?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.starts_with(r#"{"op":"ok""#) => Ok(()),
        other => Err(BenchError::Connect(format!("subscribe: no ok: {other:?}"))),
    }
}

/// What one subscriber counts and measures of its deliveries.
struct Receipts {
    acks: Arc<Acks>,
    measuring: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
    hist: Histogram<u64>,
}

impl Receipts {
    /// One delivery of the publisher's `{"t":…,"k":…}` (alone or inside
    /// wsgate's envelope).
    fn take(&mut self, data: &str) {
        let (Some(t), Some(k)) = (field_u64(data, r#""t":"#), field_u64(data, r#""k":"#)) else {
            return;
        };
        if self.acks.slot(k).fetch_add(1, Ordering::AcqRel) + 1 == self.acks.subscribers {
            self.acks.done.notify_one();
        }
        if self.measuring.load(Ordering::Relaxed) {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            let _ = self.hist.record(micros_now().saturating_sub(t).max(1));
        }
    }
}

/// Reads wsgate's `message` frames (or, `plain`, every text message)
/// until `stop` or the connection ends.
async fn receive_frames(
    mut ws: Ws,
    plain: bool,
    receipts: &mut Receipts,
    stop: &CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return,
            msg = ws.next() => msg,
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                if plain || text.starts_with(r#"{"op":"message""#) {
                    receipts.take(&text);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

/// Reads NATS `MSG`s until `stop` or the connection ends, answering the
/// server's `PING`s; a `-ERR` or a protocol error counts in `errors`.
async fn receive_nats(
    mut ws: Ws,
    mut reader: nats::Reader,
    receipts: &mut Receipts,
    stop: &CancellationToken,
    errors: &AtomicU64,
) {
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return,
            msg = ws.next() => msg,
        };
        let data = match msg {
            Some(Ok(msg)) => match nats::bytes_of(msg) {
                Some(data) => data,
                None => continue,
            },
            Some(Err(_)) | None => return,
        };
        let (mut pings, mut refusals) = (0, 0);
        let fed = reader.feed(&data, |op| {
            match op {
                nats::Op::Msg { payload, .. } => {
                    if let Ok(text) = std::str::from_utf8(payload) {
                        receipts.take(text);
                    }
                }
                nats::Op::Ping => pings += 1,
                nats::Op::Err(_) => refusals += 1,
                _ => {}
            }
            ControlFlow::Continue(())
        });
        if refusals > 0 {
            errors.fetch_add(refusals, Ordering::Relaxed);
        }
        if fed.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if pings > 0 && nats::pong(&mut ws, pings).await.is_err() {
            return;
        }
    }
}

/// The result of `bench connect`.
#[derive(Debug, Serialize)]
pub struct ConnectReport {
    pub mode: &'static str,
    pub connections: usize,
    pub ok: usize,
    pub failed: usize,
    pub elapsed_s: f64,
    pub connects_per_s: f64,
    pub latency_ms: Percentiles,
    /// With `--server-pid`: the server's CPU (user + system) per
    /// successful connection: TLS handshake, upgrade, JWT and welcome.
    pub server_cpu_us_per_connect: Option<f64>,
}

/// Opens and closes `connections` authenticated connections; with
/// `server_pid`, also the server's CPU per connection.
pub async fn connect(
    target: &Target,
    connections: usize,
    concurrency: usize,
    server_pid: Option<u32>,
) -> ConnectReport {
    let cpu_before = server_pid.and_then(resume::cpu_s);
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in 0..connections {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let target = target.clone();
        set.spawn(async move {
            let _permit = permit;
            let t0 = Instant::now();
            let client = target.open(i).await;
            let took = t0.elapsed();
            match client {
                Ok(mut client) => {
                    let _ = client.ws.close(None).await;
                    Ok(took)
                }
                Err(e) => Err(e.to_string()),
            }
        });
    }
    let mut hist = histogram();
    let (mut ok, mut failed) = (0, 0);
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(took)) => {
                ok += 1;
                let _ = hist.record((took.as_micros() as u64).max(1));
            }
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(_) => failed += 1,
        }
    }
    if let Some(e) = first_error {
        eprintln!("connect: first failure: {e}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let us = Percentiles::of(&hist);
    let cpu = match (cpu_before, server_pid.and_then(resume::cpu_s)) {
        (Some(a), Some(b)) if ok > 0 => Some((b - a) * 1e6 / ok as f64),
        _ => None,
    };
    ConnectReport {
        server_cpu_us_per_connect: cpu,
        mode: "connect",
        connections,
        ok,
        failed,
        elapsed_s: elapsed,
        connects_per_s: ok as f64 / elapsed.max(1e-9),
        latency_ms: Percentiles {
            p50: us.p50 / 1000,
            p90: us.p90 / 1000,
            p99: us.p99 / 1000,
            max: us.max / 1000,
        },
    }
}

/// Reads an HMAC secret file for `--secret`.
///
/// # Errors
/// The file cannot be read or is too short.
pub fn secret_from_file(path: &std::path::Path) -> Result<Vec<u8>, BenchError> {
    crate::auth::read_hmac_secret(path).map_err(|e| BenchError::Setup(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_without_parsing() {
        let text = r#"{"op":"message","seq":9,"data":{"t":1700000000123456,"k":42,"p":"xx"}}"#;
        assert_eq!(field_u64(text, r#""t":"#), Some(1_700_000_000_123_456));
        assert_eq!(field_u64(text, r#""k":"#), Some(42));
        assert_eq!(field_u64(text, r#""z":"#), None);
    }
}
