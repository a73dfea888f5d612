//! `wsgate bench`: the command's arguments and how they become targets
//! and reports (one JSON line on stdout).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{Auth, BenchError, Pace, Target};
use crate::tools::cli::BoxError;

#[derive(Args)]
pub struct BenchTarget {
    /// The server's WebSocket URL.
    #[arg(long, default_value = "wss://localhost:8443/ws")]
    pub url: String,
    /// CA (PEM) to trust for the server's certificate.
    #[arg(long, default_value = "certs/ca.pem")]
    pub ca: PathBuf,
    /// HMAC secret file: mint an HS256 token per client (sub bench-N, role member).
    #[arg(long, conflicts_with = "token")]
    pub secret: Option<PathBuf>,
    /// One token for every client.
    #[arg(long, required_unless_present = "secret")]
    pub token: Option<String>,
    /// Token carrier.
    #[arg(long, default_value = "header", value_parser = ["header", "subprotocol"])]
    pub carrier: String,
    /// The server is a plain broadcast server (no welcome, no channels).
    #[arg(long, conflicts_with = "nats")]
    pub plain: bool,
    /// The server is nats-server's WebSocket listener: the NATS protocol,
    /// `--channel` as the subject, and `--token` (or the text of the
    /// `--secret` file) as CONNECT's `auth_token`.
    #[arg(long)]
    pub nats: bool,
    /// Spread client sockets over 127.0.0.1..N (0: one per 25,000 connections).
    #[arg(long, default_value_t = 0)]
    pub sources: usize,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Open N connections, hold them, report server RSS per connection.
    Idle {
        #[command(flatten)]
        target: BenchTarget,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        /// Seconds to hold the connections after they are open.
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// The server's pid, to read its RSS.
        #[arg(long)]
        server_pid: Option<u32>,
        /// Subscribe every connection to this channel.
        #[arg(long)]
        subscribe: Option<String>,
        /// Subscribe with `"presence":true` (its members' join/leave).
        #[arg(long, requires = "subscribe")]
        presence: bool,
        /// Report what this Redis ran while the connections were held.
        #[arg(long)]
        redis_url: Option<String>,
    },
    /// One publisher to N subscribers: deliveries/s and latency.
    Fanout {
        #[command(flatten)]
        target: BenchTarget,
        #[arg(long)]
        subscribers: usize,
        /// Message payload size, bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Messages in flight (not yet received by every subscriber).
        #[arg(long, conflicts_with = "rate", required_unless_present = "rate")]
        window: Option<u32>,
        /// Fixed publish rate, messages per second.
        #[arg(long)]
        rate: Option<u32>,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Unmeasured seconds first.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value = "chat:bench")]
        channel: String,
        /// Publish through this URL instead of `--url` (another replica of
        /// a cluster, trusting the same CA): measures delivery across replicas.
        #[arg(long)]
        publish_url: Option<String>,
        /// The server's pid: its CPU per delivery over the measured seconds,
        /// to set beside `bench floor`'s CPU per write.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// A reconnect storm: N clients subscribed to a history channel drop
    /// at once, `--missed` messages are published, and all N reconnect and
    /// resume at once (on `--resume-url`, another replica, when given).
    Resume {
        #[command(flatten)]
        target: BenchTarget,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        /// A channel that keeps history.
        #[arg(long, default_value = "chat:resume")]
        channel: String,
        /// Messages published while the clients are away (each replays them).
        #[arg(long, default_value_t = 10)]
        missed: usize,
        /// Resume on this URL instead of `--url` (another replica, same CA).
        #[arg(long)]
        resume_url: Option<String>,
        /// The pid of the gateway clients resume on, for its CPU time.
        #[arg(long)]
        server_pid: Option<u32>,
        /// The Redis the replicas share, for its command count.
        #[arg(long)]
        redis_url: Option<String>,
    },
    /// Publishes through the HTTP API to N WebSocket subscribers:
    /// requests/s, request round trip and delivery latency.
    Api {
        #[command(flatten)]
        target: BenchTarget,
        /// The API listener.
        #[arg(long, default_value = "https://localhost:8444")]
        api_url: String,
        /// An API token allowed to publish on `--channel`; without it one
        /// is minted from `--secret` (sub bench-api, role member).
        #[arg(long)]
        api_token: Option<String>,
        /// The audience of minted API tokens (`api.audience`).
        #[arg(long, default_value = "wsgate-api")]
        api_audience: String,
        #[arg(long)]
        subscribers: usize,
        /// Keep-alive API connections, one request in flight on each.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Fixed publish rate over all connections, requests per second
        /// (default: each connection as fast as its answers come).
        #[arg(long)]
        rate: Option<u32>,
        /// Message payload size, bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Unmeasured seconds first.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value = "chat:bench")]
        channel: String,
    },
    /// Authenticated connections per second (TLS + upgrade + JWT).
    Connect {
        #[command(flatten)]
        target: BenchTarget,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Resume TLS sessions (abbreviated handshakes after the first).
        #[arg(long)]
        resume: bool,
        /// The server's pid, to report its CPU per connection.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// The kernel floor of a fan-out: one small write to each of N loopback
    /// connections in turn (plain TCP, or rustls records with `--tls`), no
    /// gateway; writes/s, CPU per write and round time.
    Floor {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Bytes per write.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Unmeasured seconds first.
        #[arg(long, default_value_t = 1)]
        warmup: u64,
        /// Each write a rustls record (a certificate made on the spot).
        #[arg(long)]
        tls: bool,
        /// Pin the reader process to this CPU (`taskset`), as the load
        /// generator is in bench/run.sh.
        #[arg(long)]
        reader_cpu: Option<usize>,
    },
    /// The reading side of `floor` (started by it).
    #[command(hide = true)]
    FloorReader {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

impl BenchTarget {
    /// The same target at another URL (another replica, same CA and auth).
    fn at(&self, url: String) -> Self {
        Self {
            url,
            ca: self.ca.clone(),
            secret: self.secret.clone(),
            token: self.token.clone(),
            carrier: self.carrier.clone(),
            plain: self.plain,
            nats: self.nats,
            sources: self.sources,
        }
    }
}

pub fn run(command: BenchCommand) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let target = |t: &BenchTarget, n: usize| {
            let auth = match (&t.secret, &t.token) {
                (Some(path), _) => super::secret_from_file(path).map(Auth::Secret),
                (None, Some(token)) => Ok(Auth::Token(token.clone())),
                (None, None) => Err(BenchError::Setup("--secret or --token".into())),
            };
            let sources = if t.sources == 0 {
                n / 25_000 + 1
            } else {
                t.sources
            };
            let (url, ca, header, plain, nats) = (
                t.url.clone(),
                t.ca.clone(),
                t.carrier == "header",
                t.plain,
                t.nats,
            );
            async move {
                let target = Target::new(&url, &ca, auth?, header, plain, sources).await?;
                if nats { target.nats() } else { Ok(target) }
            }
        };
        let line = match command {
            BenchCommand::Idle {
                target: t,
                connections,
                concurrency,
                hold,
                server_pid,
                subscribe,
                presence,
                redis_url,
            } => {
                if let (true, Some(channel)) = (t.nats, &subscribe) {
                    super::nats::Subject::new(channel)?;
                }
                let target = target(&t, connections).await?;
                let options = super::IdleOptions {
                    channel: subscribe,
                    presence,
                    redis_url,
                };
                let report = super::idle(
                    &target,
                    connections,
                    concurrency,
                    Duration::from_secs(hold),
                    server_pid,
                    &options,
                )
                .await;
                serde_json::to_string(&report)?
            }
            BenchCommand::Fanout {
                target: t,
                subscribers,
                size,
                window,
                rate,
                duration,
                warmup,
                channel,
                publish_url,
                server_pid,
            } => {
                let subscribers_at = target(&t, subscribers).await?;
                let publisher = match publish_url {
                    Some(url) => Some(target(&t.at(url), 1).await?),
                    None => None,
                };
                let pace = match (window, rate) {
                    (Some(w), _) => Pace::Window(w),
                    (None, Some(r)) => Pace::Rate(r),
                    (None, None) => Pace::Window(1),
                };
                let report = super::fanout(
                    &subscribers_at,
                    publisher.as_ref(),
                    subscribers,
                    size,
                    pace,
                    Duration::from_secs(duration),
                    Duration::from_secs(warmup),
                    &channel,
                    server_pid,
                )
                .await?;
                serde_json::to_string(&report)?
            }
            BenchCommand::Resume {
                target: t,
                connections,
                concurrency,
                channel,
                missed,
                resume_url,
                server_pid,
                redis_url,
            } => {
                let first = target(&t, connections + 1).await?;
                let then = match resume_url {
                    Some(url) => target(&t.at(url), connections + 1).await?,
                    None => first.clone(),
                };
                let report = super::resume(
                    &first,
                    &then,
                    connections,
                    concurrency,
                    &channel,
                    missed,
                    server_pid,
                    redis_url.as_deref(),
                )
                .await?;
                serde_json::to_string(&report)?
            }
            BenchCommand::Api {
                target: t,
                api_url,
                api_token,
                api_audience,
                subscribers,
                connections,
                rate,
                size,
                duration,
                warmup,
                channel,
            } => {
                let subscribers_at = target(&t, subscribers).await?;
                let token = match (api_token, &t.secret) {
                    (Some(token), _) => token,
                    (None, Some(path)) => super::api_token(path, &api_audience)?,
                    (None, None) => {
                        return Err(BenchError::Setup("--api-token or --secret".into()).into());
                    }
                };
                let api = super::ApiTarget {
                    base: api_url,
                    token,
                };
                let report = super::api(
                    &subscribers_at,
                    &api,
                    subscribers,
                    connections,
                    rate,
                    size,
                    Duration::from_secs(duration),
                    Duration::from_secs(warmup),
                    &channel,
                )
                .await?;
                serde_json::to_string(&report)?
            }
            BenchCommand::Connect {
                target: t,
                connections,
                concurrency,
                resume,
                server_pid,
            } => {
                let mut target = target(&t, connections).await?;
                if resume {
                    target = target.resuming();
                }
                let report = super::connect(&target, connections, concurrency, server_pid).await;
                serde_json::to_string(&report)?
            }
            BenchCommand::Floor {
                connections,
                size,
                duration,
                warmup,
                tls,
                reader_cpu,
            } => {
                let report = super::floor(
                    connections,
                    size,
                    Duration::from_secs(duration),
                    Duration::from_secs(warmup),
                    tls,
                    &std::env::current_exe()?,
                    reader_cpu,
                )
                .await?;
                serde_json::to_string(&report)?
            }
            BenchCommand::FloorReader {
                addr,
                connections,
                ca,
            } => {
                super::floor_reader(addr, connections, ca.as_deref()).await?;
                return Ok(());
            }
        };
        println!("{line}");
        Ok::<(), BoxError>(())
    })
}
