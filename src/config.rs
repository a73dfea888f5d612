//! The configuration tree: one serde structure, its defaults (the dev
//! defaults), the `WSGATE_*` environment overlay, and `validate()`.
//!
//! Precedence is file < environment < flags. Every key is documented in
//! `docs/configuration.md`; a key that is not known is an error, wherever it
//! came from, so a typo never silently leaves a default in place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::{Deserialize, Serialize};

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
    pub forwarded_header: crate::proxy::ForwardedHeader,
    /// Exact `Origin` values (`scheme://host[:port]`) allowed to open `/ws`.
    pub allowed_origins: Vec<String>,
    /// Also allow an `Origin` equal to `https://` + the request's `Host`.
    pub allow_same_origin: bool,
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
            forwarded_header: crate::proxy::ForwardedHeader::None,
            allowed_origins: Vec::new(),
            allow_same_origin: true,
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
        }
    }
}

/// Per-connection and per-user limits after the upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Channels one connection may subscribe to at once.
    pub max_subscriptions: usize,
    /// Sustained publications per second per connection (token bucket rate).
    pub publish_rate_per_s: u32,
    /// Publications a connection may send in a burst (token bucket size).
    pub publish_burst: u32,
    /// Rate-limited publications in a row before the connection closes with 4008.
    pub rate_limit_strikes: u32,
    /// Open connections per user (`sub`); past it the upgrade gets 429.
    pub max_connections_per_user: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_subscriptions: 64,
            publish_rate_per_s: 50,
            publish_burst: 100,
            rate_limit_strikes: 20,
            max_connections_per_user: 32,
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
    /// Messages kept per channel in its history stream (approximately).
    pub history_max_len: u64,
    /// Age after which history entries are trimmed, in seconds; 0: by length only.
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
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
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
    /// Loads the file (if any) and overlays `env` (pairs of name and value,
    /// normally the process environment). It does not [`validate`](Self::validate).
    ///
    /// # Errors
    /// An unreadable file, unknown keys, or wrongly typed values.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_reporting(file, env).map(|(config, _)| config)
    }

    /// As [`Config::load`], also returning the `WSGATE_*` variables that
    /// were ignored because they name no section (such as the
    /// `WSGATE_SERVICE_HOST` that Kubernetes injects for a Service).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_reporting(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        let ignored = apply_env(&mut table, env)?;
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: file.map_or_else(|| PathBuf::from("<defaults>"), Path::to_owned),
                message: e.message().to_owned(),
            })?;
        Ok((config, ignored))
    }

    /// Checks values that parse but cannot work together.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let s = &self.server;
        if s.handshake_timeout_ms == 0 || s.header_read_timeout_ms == 0 {
            return bad("server timeouts must be above 0 ms".into());
        }
        if s.max_header_bytes < 1024 {
            return bad("server.max_header_bytes must be at least 1024".into());
        }
        if s.max_headers == 0 {
            return bad("server.max_headers must be at least 1".into());
        }
        if s.max_connections == 0 {
            return bad("server.max_connections must be at least 1".into());
        }
        if let Err(e) = crate::proxy::Trusted::parse(&s.trusted_proxies) {
            return bad(format!("server.trusted_proxies: {e}"));
        }
        let forwarding = s.forwarded_header != crate::proxy::ForwardedHeader::None;
        if (s.proxy_protocol || forwarding) && s.trusted_proxies.is_empty() {
            return bad(
                "server.proxy_protocol and server.forwarded_header need server.trusted_proxies"
                    .into(),
            );
        }
        if s.proxy_header_timeout_ms == 0 {
            return bad("server.proxy_header_timeout_ms must be above 0".into());
        }
        for origin in &s.allowed_origins {
            if crate::upgrade::Origin::parse(origin).is_none() {
                return bad(format!(
                    "server.allowed_origins: {origin:?} is not scheme://host[:port]"
                ));
            }
        }
        let a = &self.auth;
        let algs = self.algorithms()?;
        if a.max_token_bytes == 0 {
            return bad("auth.max_token_bytes must be at least 1".into());
        }
        if a.max_token_bytes + 512 > s.max_header_bytes {
            return bad(format!(
                "auth.max_token_bytes ({}) must leave room in server.max_header_bytes ({})",
                a.max_token_bytes, s.max_header_bytes
            ));
        }
        let jwks = a.jwks_file.is_some() || a.jwks_url.is_some();
        if a.jwks_file.is_some() && a.jwks_url.is_some() {
            return bad("auth.jwks_file and auth.jwks_url are mutually exclusive".into());
        }
        if jwks && a.public_key_file.is_some() {
            return bad(
                "auth.public_key_file cannot be combined with auth.jwks_file or auth.jwks_url"
                    .into(),
            );
        }
        if jwks && algs[0].family() == AlgorithmFamily::Hmac {
            return bad("auth.jwks_file and auth.jwks_url need asymmetric algorithms (RS*, PS256, ES*, EdDSA); HMAC keys are not taken from a JWK set".into());
        }
        if algs[0].family() != AlgorithmFamily::Hmac && a.public_key_file.is_none() && !jwks {
            return bad("auth.public_key_file, auth.jwks_file or auth.jwks_url is required for asymmetric algorithms".into());
        }
        if let Some(url) = &a.jwks_url {
            crate::auth::fetch::JwksUrl::parse(url)
                .map_err(|e| ConfigError::Invalid(format!("auth.jwks_url: {e}")))?;
        }
        if a.jwks_ca_file.is_some() && a.jwks_url.is_none() {
            return bad("auth.jwks_ca_file is only used with auth.jwks_url".into());
        }
        if a.jwks_timeout_ms == 0 {
            return bad("auth.jwks_timeout_ms must be above 0".into());
        }
        if a.jwks_min_refresh_interval_ms < 1_000 {
            return bad("auth.jwks_min_refresh_interval_ms must be at least 1000".into());
        }
        if a.jwks_refresh_interval_ms < a.jwks_min_refresh_interval_ms {
            return bad(
                "auth.jwks_refresh_interval_ms must not be below auth.jwks_min_refresh_interval_ms"
                    .into(),
            );
        }
        if a.roles_claim.is_empty()
            || ["sub", "exp", "iat", "nbf", "iss", "aud", "jti"].contains(&a.roles_claim.as_str())
        {
            return bad(format!(
                "auth.roles_claim {:?} must be a non-empty, non-registered claim name",
                a.roles_claim
            ));
        }
        let w = &self.websocket;
        if w.max_frame_bytes == 0 || w.max_message_bytes == 0 || w.read_buffer_bytes == 0 {
            return bad("websocket sizes must be above 0".into());
        }
        if w.max_frame_bytes > w.max_message_bytes {
            return bad("websocket.max_frame_bytes must not exceed max_message_bytes".into());
        }
        if w.heartbeat_ms == 0 || w.write_timeout_ms == 0 {
            return bad("websocket.heartbeat_ms and write_timeout_ms must be above 0".into());
        }
        if w.outbox_frames == 0 {
            return bad("websocket.outbox_frames must be at least 1".into());
        }
        let l = &self.limits;
        if l.max_subscriptions == 0 || l.max_connections_per_user == 0 {
            return bad(
                "limits.max_subscriptions and max_connections_per_user must be at least 1".into(),
            );
        }
        if l.publish_rate_per_s == 0 || l.publish_burst == 0 || l.rate_limit_strikes == 0 {
            return bad("limits.publish_rate_per_s, publish_burst and rate_limit_strikes must be at least 1".into());
        }
        let c = &self.cluster;
        if let Some(url) = &c.redis_url
            && !url.starts_with("redis://")
        {
            return bad(
                "cluster.redis_url must start with redis:// (TLS to Redis is not built in)".into(),
            );
        }
        if c.prefix.is_empty() || c.prefix.contains(['{', '}', ' ']) {
            return bad("cluster.prefix must be non-empty, without braces or spaces".into());
        }
        if c.history_max_len == 0 || c.channel_ttl_s == 0 || c.command_timeout_ms == 0 {
            return bad(
                "cluster.history_max_len, channel_ttl_s and command_timeout_ms must be above 0"
                    .into(),
            );
        }
        if !(32..=128).contains(&self.admission.ipv6_prefix_len) {
            return bad("admission.ipv6_prefix_len must be between 32 and 128".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad(format!(
                "log.level {:?} is not a valid filter",
                self.log.level
            ));
        }
        Ok(())
    }

    /// The configured algorithms, parsed; all of one family.
    ///
    /// # Errors
    /// An unknown name, an empty list, or a mix of families.
    pub fn algorithms(&self) -> Result<Vec<Algorithm>, ConfigError> {
        let mut out = Vec::with_capacity(self.auth.algorithms.len());
        for name in &self.auth.algorithms {
            // The contract's set; PS384/PS512 are left out on purpose.
            let alg = match name.as_str() {
                "HS256" | "HS384" | "HS512" | "RS256" | "RS384" | "RS512" | "PS256" | "ES256"
                | "ES384" | "EdDSA" => name.parse::<Algorithm>().ok(),
                _ => None,
            }
            .ok_or_else(|| {
                ConfigError::Invalid(format!("auth.algorithms: unsupported algorithm {name:?}"))
            })?;
            out.push(alg);
        }
        let Some(first) = out.first() else {
            return Err(ConfigError::Invalid(
                "auth.algorithms must not be empty".into(),
            ));
        };
        if out.iter().any(|a| a.family() != first.family()) {
            // A verifier holds one key; mixing families is how HS/RS confusion starts.
            return Err(ConfigError::Invalid(
                "auth.algorithms must all be of one family".into(),
            ));
        }
        if first.family() == AlgorithmFamily::Ec && out.len() > 1 {
            // One EC key has one curve: ES256 needs P-256, ES384 needs P-384.
            return Err(ConfigError::Invalid(
                "auth.algorithms: an EC key serves one algorithm; list exactly one of ES256, ES384"
                    .into(),
            ));
        }
        Ok(out)
    }

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

/// Writes `WSGATE_SECTION_KEY=value` pairs into `table` as
/// `[section] key = value`. The value's type follows the key's default
/// (integer, boolean, list); lists may be TOML (`["a","b"]`) or
/// comma-separated; an empty value unsets an optional key. Each variable
/// is checked on its own, so an error names it. Returns the variables
/// skipped because they name no section.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let defaults = toml::Table::try_from(Config::default())
        .map_err(|e| ConfigError::Invalid(format!("defaults do not serialize: {e}")))?;
    let mut ignored = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest == "CONFIG" {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        let section_defaults =
            lower
                .split_once('_')
                .and_then(|(section, key)| match defaults.get(section) {
                    Some(toml::Value::Table(t)) => Some((section, key, t)),
                    _ => None,
                });
        let Some((section, key, section_defaults)) = section_defaults else {
            ignored.push(name);
            continue;
        };
        let env_err = |message: String| ConfigError::Env {
            name: name.clone(),
            message,
        };
        let default = section_defaults.get(key);
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            return Err(env_err(format!("[{section}] in the file is not a table")));
        };
        let value = env_value(default, &raw).map_err(env_err)?;
        // Deserialize this one key alone, so an unknown key or a bad value
        // is reported against the variable rather than the file.
        let mut probe = toml::Table::new();
        let mut probe_section = toml::Table::new();
        probe_section.insert(key.to_owned(), value.clone());
        probe.insert(section.to_owned(), toml::Value::Table(probe_section));
        Config::deserialize(probe).map_err(|e| env_err(e.message().to_owned()))?;
        if default.is_none() && raw.is_empty() {
            // An optional key (no default value): empty means unset.
            section_table.remove(key);
        } else {
            section_table.insert(key.to_owned(), value);
        }
    }
    Ok(ignored)
}

fn env_value(default: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    let parse_toml = |s: &str| -> Result<Value, String> {
        let doc: toml::Table = format!("v = {s}")
            .parse()
            .map_err(|_| format!("{s:?} is not a valid value"))?;
        doc.get("v")
            .cloned()
            .ok_or_else(|| "empty value".to_owned())
    };
    match default {
        Some(Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| "expected an integer".to_owned()),
        Some(Value::Boolean(_)) => match raw.trim() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            _ => Err("expected true or false".to_owned()),
        },
        Some(Value::Array(_)) | None if raw.trim_start().starts_with('[') => parse_toml(raw),
        Some(Value::Array(_)) => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )),
        _ => Ok(Value::String(raw.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_validate() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn env_overrides_file_with_typed_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:9000\"\nmax_connections = 5\n[auth]\nleeway_s = 1\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("WSGATE_SERVER_MAX_CONNECTIONS", "7"),
                ("WSGATE_AUTH_QUERY_TOKEN", "true"),
                ("WSGATE_AUTH_ALGORITHMS", "HS384, HS512"),
                ("WSGATE_AUTH_ISSUERS", "[\"a\", \"b\"]"),
                ("WSGATE_AUTH_PUBLIC_KEY_FILE", "k.pem"),
                ("WSGATE_CONFIG", "ignored"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.server.max_connections, 7);
        assert_eq!(c.auth.leeway_s, 1);
        assert!(c.auth.query_token);
        assert_eq!(c.auth.algorithms, ["HS384", "HS512"]);
        assert_eq!(c.auth.issuers, ["a", "b"]);
        assert_eq!(c.auth.public_key_file.as_deref(), Some(Path::new("k.pem")));
        // An empty value unsets an optional key the file had set.
        std::fs::write(&file, "[auth]\npublic_key_file = \"k.pem\"\n").unwrap();
        let c = Config::load(Some(&file), env(&[("WSGATE_AUTH_PUBLIC_KEY_FILE", "")])).unwrap();
        assert_eq!(c.auth.public_key_file, None);
    }

    #[test]
    fn unknown_keys_are_refused_everywhere() {
        let err = Config::load(None, env(&[("WSGATE_SERVER_LISTN", "x")])).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
        assert!(err.to_string().contains("WSGATE_SERVER_LISTN"), "{err}");
        let err = Config::load(None, env(&[("WSGATE_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().contains("WSGATE_LOG_FORMAT"), "{err}");
        let err = Config::load(None, env(&[("WSGATE_SERVER_LISTEN", "nope")])).unwrap_err();
        assert!(err.to_string().contains("WSGATE_SERVER_LISTEN"), "{err}");
        // Variables naming no section (Kubernetes service links) are skipped.
        let (_, ignored) = Config::load_reporting(
            None,
            env(&[
                ("WSGATE_PORT", "tcp://10.0.0.1:8443"),
                ("WSGATE_SERVICE_HOST", "10.0.0.1"),
            ]),
        )
        .unwrap();
        assert_eq!(ignored, ["WSGATE_PORT", "WSGATE_SERVICE_HOST"]);
        let err = Config::load(None, env(&[("WSGATE_SERVER_MAX_HEADERS", "many")])).unwrap_err();
        assert!(err.to_string().contains("integer"), "{err}");
    }

    #[test]
    fn validate_refuses_mixed_families_and_tight_limits() {
        let mut c = Config::default();
        c.auth.algorithms = vec!["HS256".into(), "RS256".into()];
        assert!(c.validate().is_err());
        c.auth.algorithms = vec!["none".into()];
        assert!(c.validate().is_err());
        c = Config::default();
        c.auth.algorithms = vec!["ES256".into()];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("public_key_file")
        );
        c = Config::default();
        c.auth.max_token_bytes = c.server.max_header_bytes;
        assert!(c.validate().is_err());
        c = Config::default();
        c.server.allowed_origins = vec!["example.com".into()];
        assert!(c.validate().is_err());
        c = Config::default();
        c.auth.algorithms = vec!["PS512".into()];
        assert!(c.validate().is_err());
        c.auth.public_key_file = Some("k.pem".into());
        c.auth.algorithms = vec!["ES256".into(), "ES384".into()];
        assert!(c.validate().is_err());
        c = Config::default();
        c.auth.roles_claim = "sub".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn jwks_sources_are_checked() {
        let err = |c: &Config| c.validate().unwrap_err().to_string();
        let mut c = Config::default();
        c.auth.algorithms = vec!["ES256".into()];
        c.auth.jwks_url = Some("https://id.example.com/jwks".into());
        c.validate().unwrap();
        c.auth.jwks_file = Some("jwks.json".into());
        assert!(err(&c).contains("mutually exclusive"));
        c.auth.jwks_url = None;
        c.validate().unwrap();
        c.auth.public_key_file = Some("k.pem".into());
        assert!(err(&c).contains("cannot be combined"));
        c.auth.public_key_file = None;
        c.auth.algorithms = vec!["HS256".into()];
        assert!(err(&c).contains("asymmetric"));

        c = Config::default();
        c.auth.algorithms = vec!["RS256".into()];
        for bad in [
            "http://id.example.com/jwks",
            "https://u@id.example.com/",
            "jwks.json",
        ] {
            c.auth.jwks_url = Some(bad.into());
            assert!(err(&c).contains("auth.jwks_url"), "{bad}");
        }
        c.auth.jwks_url = None;
        c.auth.public_key_file = Some("k.pem".into());
        c.auth.jwks_ca_file = Some("ca.pem".into());
        assert!(err(&c).contains("jwks_ca_file"));
        c.auth.public_key_file = None;
        c.auth.jwks_url = Some("https://127.0.0.1:9/jwks".into());
        c.validate().unwrap();
        c.auth.jwks_timeout_ms = 0;
        assert!(err(&c).contains("jwks_timeout_ms"));
        c.auth.jwks_timeout_ms = 1;
        c.auth.jwks_min_refresh_interval_ms = 999;
        assert!(err(&c).contains("jwks_min_refresh_interval_ms"));
        c.auth.jwks_min_refresh_interval_ms = 60_000;
        c.auth.jwks_refresh_interval_ms = 59_999;
        assert!(err(&c).contains("jwks_refresh_interval_ms"));

        // The environment reaches the new keys like any other.
        let c = Config::load(
            None,
            env(&[
                ("WSGATE_AUTH_JWKS_URL", "https://id.example.com/jwks"),
                ("WSGATE_AUTH_JWKS_TIMEOUT_MS", "1500"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.auth.jwks_url.as_deref(),
            Some("https://id.example.com/jwks")
        );
        assert_eq!(c.auth.jwks_timeout_ms, 1500);
    }
}
