//! The configuration tree: one serde structure, its defaults (the dev
//! defaults), the `WSGATE_*` environment overlay, and `validate()`.
//!
//! Precedence is file < environment < flags. Every key is documented in
//! `docs/configuration.md`; a key that is not known is an error, wherever it
//! came from, so a typo never silently leaves a default in place.
//!
//! A leaf: it imports no other module of the crate. The parsed value types
//! that other modules share with it (`Origin`, `JwksUrl`, `IpNet`,
//! `ForwardedHeader`) live in its `values` part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod load;
mod validate;
mod values;

pub use values::{ForwardedHeader, IpNet, JwksUrl, Origin, canonical_ip};

/// Prefix of the environment variables that override file keys.
pub const ENV_PREFIX: &str = "WSGATE_";

/// Smallest HMAC secret accepted, in bytes (RFC 7518 §3.2 for HS256).
pub const MIN_HMAC_SECRET_BYTES: usize = 32;

/// hyper refuses a read buffer smaller than this; header limits below it
/// are still enforced by `max_header_bytes`.
const HYPER_MIN_BUF: usize = 8192;

/// The whole configuration. `Default` is the development setup that
/// `wsgate serve --dev` runs with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub websocket: WebSocketConfig,
    pub limits: LimitsConfig,
    pub admission: AdmissionConfig,
    pub cluster: ClusterConfig,
    pub history: HistoryConfig,
    pub presence: PresenceConfig,
    pub api: ApiConfig,
    pub policy: PolicyConfig,
    pub log: LogConfig,
}

/// The listener and its HTTP limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port of the wss:// listener.
    pub listen: SocketAddr,
    /// A separate plain-HTTP listener for `/metrics`, `/healthz` and
    /// `/readyz` (then `/metrics` is not served on `listen`); unset: none.
    pub admin_listen: Option<SocketAddr>,
    /// Deadline for the whole TLS handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Deadline for a request's headers to arrive, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// Largest request head (request line and headers), in bytes; past it: 431.
    pub max_header_bytes: usize,
    /// Most request headers accepted; past it: 431.
    pub max_headers: usize,
    /// Open TCP connections at once (handshaking, HTTP and WebSocket).
    pub max_connections: usize,
    /// Connections beyond `max_connections` that are still accepted, only to
    /// be answered `503` with `Retry-After` instead of waiting unanswered.
    pub overflow_connections: usize,
    /// `Retry-After` sent with `503` refusals (overload, draining), in seconds.
    pub retry_after_s: u64,
    /// After SIGTERM, how long `/readyz` and new upgrades answer 503 before
    /// the listener closes, in milliseconds.
    pub drain_grace_ms: u64,
    /// After the grace, sessions are closed with 1001 spread evenly over
    /// this window, in milliseconds, so clients do not reconnect at once.
    pub drain_window_ms: u64,
    /// Hard deadline for sessions to close after the window, in milliseconds.
    pub shutdown_timeout_ms: u64,
    /// Every connection must start with a PROXY protocol header (v1 or v2)
    /// from one of `trusted_proxies`; others are closed.
    pub proxy_protocol: bool,
    /// Deadline for the PROXY header, in milliseconds.
    pub proxy_header_timeout_ms: u64,
    /// Addresses or CIDR networks of the load balancers and proxies whose
    /// PROXY header or forwarding header is believed.
    pub trusted_proxies: Vec<String>,
    /// The request header (`x-forwarded-for` or `forwarded`) that names the
    /// client when the peer is a trusted proxy; `none`: read none.
    pub forwarded_header: ForwardedHeader,
    /// Exact `Origin` values (`scheme://host[:port]`) allowed to open `/ws`.
    pub allowed_origins: Vec<String>,
    /// Also allow an `Origin` equal to `https://` + the request's `Host`.
    pub allow_same_origin: bool,
    /// Serve `/metrics` on this (public) listener too. Off: metrics are
    /// read on `admin_listen` only, so the open internet does not learn
    /// the gateway's load and refusal counts. `serve --dev` turns it on.
    pub public_metrics: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            admin_listen: None,
            handshake_timeout_ms: 10_000,
            header_read_timeout_ms: 5_000,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_connections: 10_000,
            overflow_connections: 64,
            retry_after_s: 5,
            drain_grace_ms: 0,
            drain_window_ms: 0,
            shutdown_timeout_ms: 10_000,
            proxy_protocol: false,
            proxy_header_timeout_ms: 3_000,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::None,
            allowed_origins: Vec::new(),
            allow_same_origin: true,
            public_metrics: false,
        }
    }
}

/// The server certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file: the server certificate followed by its chain.
    pub cert_file: PathBuf,
    /// PEM file: the server's private key (PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
    /// Accept TLS 1.3 only (otherwise TLS 1.2 and 1.3).
    pub tls13_only: bool,
    /// How often the two files are checked for changes, in milliseconds;
    /// 0: only on SIGHUP.
    pub watch_interval_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::from("certs/server.pem"),
            key_file: PathBuf::from("certs/server.key"),
            tls13_only: false,
            watch_interval_ms: 5_000,
        }
    }
}

/// How tokens are carried and verified. Holds paths only, never secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted JWT algorithms, all of one family (HS*, RS*/PS*, ES*, EdDSA).
    pub algorithms: Vec<String>,
    /// File holding the HMAC secret (HS*): its bytes, less a trailing newline.
    pub hmac_secret_file: PathBuf,
    /// PEM public key for RS*/PS*/ES*/EdDSA: one key, serving any `kid`.
    /// Excludes `jwks_file` and `jwks_url`.
    pub public_key_file: Option<PathBuf>,
    /// JWK set file (RFC 7517 `{"keys":[...]}`) holding the verification
    /// keys, chosen by the token's `kid`; re-read on SIGHUP and when it
    /// changes. Asymmetric algorithms only. Excludes `public_key_file` and
    /// `jwks_url`.
    pub jwks_file: Option<PathBuf>,
    /// How often `jwks_file` is checked for changes, in milliseconds
    /// (following symlinks); 0: only on SIGHUP.
    pub jwks_watch_interval_ms: u64,
    /// `https://` URL of the issuer's JWK set: fetched at start (the gateway
    /// does not start without it), every `jwks_refresh_interval_ms`, and on
    /// a token with an unknown `kid`. Excludes `public_key_file` and `jwks_file`.
    pub jwks_url: Option<String>,
    /// PEM CA certificates trusted for `jwks_url` besides the built-in
    /// webpki roots.
    pub jwks_ca_file: Option<PathBuf>,
    /// Deadline for one whole JWKS fetch (connect, TLS, answer), in milliseconds.
    pub jwks_timeout_ms: u64,
    /// Interval between scheduled JWKS fetches, in milliseconds.
    pub jwks_refresh_interval_ms: u64,
    /// Least time between two fetches caused by unknown `kid`s, in
    /// milliseconds; also the retry delay after a failed scheduled fetch.
    pub jwks_min_refresh_interval_ms: u64,
    /// PEM private key that `wsgate token` signs with for asymmetric algorithms.
    pub private_key_file: Option<PathBuf>,
    /// Required `iss` values; empty: `iss` not checked.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; empty: `aud` not checked.
    pub audiences: Vec<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// Largest token accepted, in bytes, checked before any parsing.
    pub max_token_bytes: usize,
    /// Claim holding the user's roles (an array of strings).
    pub roles_claim: String,
    /// Accept `?access_token=` on the upgrade URL (off: URLs end up in logs).
    pub query_token: bool,
    /// Require the JOSE header's `typ` to be `JWT` or `at+jwt` (RFC 9068
    /// access tokens; case-insensitive, with or without `application/`),
    /// so tokens of other kinds signed with the same key (ID tokens with
    /// another `typ`, logout tokens) are refused.
    pub require_typ: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithms: vec!["HS256".to_owned()],
            hmac_secret_file: PathBuf::from("certs/dev-hmac.secret"),
            public_key_file: None,
            jwks_file: None,
            jwks_watch_interval_ms: 2_000,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_timeout_ms: 5_000,
            jwks_refresh_interval_ms: 300_000,
            jwks_min_refresh_interval_ms: 30_000,
            private_key_file: None,
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway_s: 30,
            max_token_bytes: 8 * 1024,
            roles_claim: "roles".to_owned(),
            query_token: false,
            require_typ: false,
        }
    }
}

/// WebSocket framing limits and liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest inbound message, in bytes; past it the session closes with 1009.
    pub max_message_bytes: usize,
    /// Largest inbound frame, in bytes.
    pub max_frame_bytes: usize,
    /// Read buffer per connection, in bytes (allocated for every session).
    pub read_buffer_bytes: usize,
    /// Interval between WebSocket pings, in milliseconds.
    pub heartbeat_ms: u64,
    /// Extra silence tolerated after a missed heartbeat, in milliseconds.
    pub heartbeat_grace_ms: u64,
    /// Deadline for one write to the socket, in milliseconds.
    pub write_timeout_ms: u64,
    /// Frames queued for one connection before it is closed with 4008.
    pub outbox_frames: usize,
    /// Bytes queued for one connection before it is closed with 4008, so
    /// a slow reader of large messages pins this much at most (not
    /// `outbox_frames` × `max_message_bytes`). At least `max_message_bytes`.
    pub outbox_bytes: usize,
    /// Deadline for one inbound message to arrive whole, from its first
    /// byte, in milliseconds: a client that trickles a large frame or a
    /// fragmented message (answering pings meanwhile) is closed with 1008.
    pub message_timeout_ms: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            read_buffer_bytes: 1024,
            heartbeat_ms: 25_000,
            heartbeat_grace_ms: 10_000,
            write_timeout_ms: 10_000,
            outbox_frames: 1024,
            outbox_bytes: 4 * 1024 * 1024,
            message_timeout_ms: 10_000,
        }
    }
}

/// Per-connection and per-user limits after the upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Channels one connection may subscribe to at once.
    pub max_subscriptions: usize,
    /// Sustained requests per second per connection (token bucket rate):
    /// every request, and client ping/pong frames.
    pub publish_rate_per_s: u32,
    /// Requests a connection may send in a burst (token bucket size).
    pub publish_burst: u32,
    /// Requests over the budget in a row before the connection closes with 4008.
    pub rate_limit_strikes: u32,
    /// Open connections per user (`sub`); past it the upgrade gets 429.
    pub max_connections_per_user: usize,
    /// Publications per second per user over all their connections, so
    /// many connections cannot multiply what one user writes into
    /// history and Redis; 0: no such limit.
    pub user_publish_rate_per_s: u32,
    /// Publications one user may send in a burst.
    pub user_publish_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_subscriptions: 64,
            publish_rate_per_s: 50,
            publish_burst: 100,
            rate_limit_strikes: 20,
            max_connections_per_user: 32,
            user_publish_rate_per_s: 200,
            user_publish_burst: 400,
        }
    }
}

/// Limits decided before costly work: per source address (an IPv4
/// address or an IPv6 prefix) and for the whole gateway. A value of 0
/// turns that limit off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Open connections per address (handshaking, HTTP and WebSocket); past
    /// it the upgrade gets 429 with `Retry-After`.
    pub max_connections_per_address: usize,
    /// New connections per second for the whole gateway (sustained); past
    /// it the upgrade gets 503 with `Retry-After`. 0: unlimited.
    pub new_connections_per_s: u32,
    /// New connections the whole gateway takes in a burst (at least
    /// `new_connections_per_s`).
    pub new_connections_burst: u32,
    /// New connections per second per address (sustained); past it: 429.
    pub address_new_connections_per_s: u32,
    /// New connections per address in a burst.
    pub address_new_connections_burst: u32,
    /// Failed authentications per address per minute (also the burst);
    /// past it upgrades get 429 before their token's signature is checked.
    pub address_failed_auths_per_min: u32,
    /// IPv6 addresses are counted per prefix of this many bits (32–128).
    pub ipv6_prefix_len: u8,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_connections_per_address: 1000,
            new_connections_per_s: 0,
            new_connections_burst: 0,
            address_new_connections_per_s: 20,
            address_new_connections_burst: 100,
            address_failed_auths_per_min: 30,
            ipv6_prefix_len: 64,
        }
    }
}

/// Several replicas sharing publications through Redis. Without
/// `redis_url` the gateway is one node and needs nothing else.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[[user]:password@]host:port[/db]`; unset: single node.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and pub/sub channel the gateway uses.
    pub prefix: String,
    /// No longer used (the `[history]` rules decide what Redis keeps);
    /// still accepted so that existing files load.
    pub history_max_len: u64,
    /// No longer used, as `history_max_len`.
    pub history_max_age_s: u64,
    /// A channel's `seq` and history expire this long after its last
    /// publication, in seconds.
    pub channel_ttl_s: u64,
    /// Deadline for one Redis command or connection attempt, in milliseconds.
    pub command_timeout_ms: u64,
    /// Longest pause between reconnection attempts, in milliseconds.
    pub reconnect_max_ms: u64,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("ClusterConfig")
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            prefix: "wsgate".to_owned(),
            history_max_len: 1000,
            history_max_age_s: 3600,
            channel_ttl_s: 86_400,
            command_timeout_ms: 1_000,
            reconnect_max_ms: 5_000,
        }
    }
}

/// The HTTP API for backends (protocol.md §7): its own listener, off by
/// default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address of the API listener (`https://…/api`); unset: no API.
    pub listen: Option<SocketAddr>,
    /// Serve plain HTTP instead of TLS: only on a loopback address, unless
    /// `plain_http_beyond_loopback` says a TLS-terminating proxy is in front.
    pub plain_http: bool,
    /// Allow `plain_http` on a non-loopback address (behind a proxy).
    pub plain_http_beyond_loopback: bool,
    /// The `aud` an API token must carry; a client token carrying it is
    /// refused at `/ws`.
    pub audience: String,
    /// The role the management endpoints require.
    pub admin_role: String,
    /// API connections served at once; past it new ones wait unaccepted.
    pub max_connections: usize,
    /// Requests per second per token subject (sustained); past it: 429.
    pub requests_per_s: u32,
    /// Requests one token subject may send in a burst.
    pub requests_burst: u32,
    /// How long a revocation is remembered, in seconds: at least the
    /// longest lifetime of the tokens your issuer mints.
    pub revocation_ttl_s: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            plain_http: false,
            plain_http_beyond_loopback: false,
            audience: "wsgate-api".to_owned(),
            admin_role: "admin".to_owned(),
            max_connections: 256,
            requests_per_s: 1_000,
            requests_burst: 2_000,
            revocation_ttl_s: 86_400,
        }
    }
}

/// Which channels keep history for resume and the `history` op
/// (protocol.md §5), and how much.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// The channels that keep history, by pattern (policy syntax: `*` one
    /// token, a final `>` one or more; no templates); the first match
    /// decides. Empty: no channel keeps history.
    pub channels: Vec<HistoryRule>,
    /// Most messages one resume (`subscribe` with `since`) replays; more
    /// missed than this answers `too_many`. Capped at
    /// `websocket.outbox_frames` − 2, so a replay fits in the outbox.
    pub max_replay: usize,
    /// Bytes the stored messages of all channels may take together on a
    /// single gateway (each channel also counts 256 bytes); past it the
    /// channels published to least recently are evicted whole (their
    /// epoch changes).
    pub max_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            channels: vec![HistoryRule::default()],
            max_replay: 300,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One history rule: a channel pattern and what its channels keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryRule {
    /// Channel pattern, e.g. `chat:*`.
    pub pattern: String,
    /// Most messages kept per channel.
    pub max_messages: usize,
    /// Messages older than this are dropped, in seconds; a channel with no
    /// subscriber and no publication for this long is forgotten (and gets
    /// a new epoch when it is used again).
    pub max_age_s: u64,
}

impl Default for HistoryRule {
    fn default() -> Self {
        Self {
            pattern: "chat:*".to_owned(),
            max_messages: 100,
            max_age_s: 600,
        }
    }
}

/// Which channels keep presence (protocol.md §6): who is subscribed, per
/// user, with `join` and `leave` frames for those who ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// The channels that keep presence, by pattern (the history syntax:
    /// `*` one token, a final `>` one or more; no templates). Empty: none.
    pub channels: Vec<String>,
    /// Above this many members the `presence` op answers `count` only,
    /// and `join` and `leave` are not sent (see docs/protocol.md §6).
    pub max_listed: usize,
    /// How long after a user's last subscription to a channel ends their
    /// `leave` waits, in milliseconds; a new subscription meanwhile
    /// cancels it (a reconnect is no leave and join).
    pub grace_ms: u64,
    /// With a Redis backplane: a member whose replica stops refreshing
    /// it (a crash) is gone, with a `leave`, within this many seconds.
    pub ttl_s: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            channels: vec!["chat:*".to_owned()],
            max_listed: 100,
            grace_ms: 5_000,
            ttl_s: 60,
        }
    }
}

/// Where policies come from and how often to look for edits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Directory whose `*.toml` files make up the policy set.
    pub dir: PathBuf,
    /// How often the directory is checked for changes, in milliseconds; 0: only on SIGHUP.
    pub watch_interval_ms: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("policies"),
            watch_interval_ms: 2_000,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `wsgate=debug`.
    pub level: String,
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// Lines one client address may cause (refusals, closes, failed
    /// handshakes: logged at `info`) per second, after a burst of
    /// `client_lines_burst`; 0: no limit.
    pub client_lines_per_s: u32,
    pub client_lines_burst: u32,
    /// Such lines from all addresses together per second; 0: no limit.
    pub client_lines_max_per_s: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
            client_lines_per_s: 1,
            client_lines_burst: 5,
            client_lines_max_per_s: 100,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}
impl Config {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.server.handshake_timeout_ms)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.server.header_read_timeout_ms)
    }

    /// hyper's read buffer: the header limit, but never below hyper's floor.
    pub fn http_buf_size(&self) -> usize {
        self.server.max_header_bytes.max(HYPER_MIN_BUF)
    }
}
