//! Prometheus metrics, kept as plain atomics and rendered in the text
//! exposition format at `/metrics`. Every label value comes from a fixed
//! set in this module (refusal reasons, close reasons, results): never a
//! user id, a channel or a token, so cardinality is bounded by design.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Labels of `wsgate_upgrades_total{result}`: `ok` and every refusal.
pub const UPGRADE_RESULTS: [&str; 16] = [
    "ok",
    "bad_upgrade",
    "plain_get",
    "version",
    "origin",
    "draining",
    "overloaded",
    "user_limit",
    "no_token",
    "carrier",
    "invalid_token",
    "address_limit",
    "address_rate",
    "global_rate",
    "auth_rate",
    "not_found",
];

/// Labels of `wsgate_auth_failures_total{reason}`.
pub const AUTH_FAILURES: [&str; 14] = [
    "no_token",
    "carrier",
    "malformed",
    "algorithm",
    "crit",
    "unknown_kid",
    "signature",
    "expired",
    "not_yet_valid",
    "issuer",
    "audience",
    "missing_claim",
    "bad_claim",
    "revoked",
];

/// Labels of `wsgate_sessions_closed_total{reason}` (see `CloseReason`).
pub const CLOSE_REASONS: [&str; 15] = [
    "client_closed",
    "shutdown",
    "token_expired",
    "heartbeat_timeout",
    "write_timeout",
    "slow_reader",
    "rate_limited",
    "protocol_error",
    "binary",
    "invalid_utf8",
    "bad_frames",
    "too_big",
    "io",
    "disconnected",
    "message_timeout",
];

/// Labels of `wsgate_close_codes_total{code}` (see `CloseCode`).
pub const CLOSE_CODES: [&str; 11] = [
    "1000", "1001", "1002", "1003", "1007", "1008", "1009", "1011", "4001", "4003", "4008",
];

/// Labels of `wsgate_proxy_headers_total{result}`.
pub const PROXY_RESULTS: [&str; 5] = ["ok", "local", "untrusted", "malformed", "timeout"];
/// Labels of `wsgate_jwks_fetches_total{result}`: a fetch that loaded or
/// confirmed a key set, one that failed, and an unknown-kid refresh turned
/// away by `auth.jwks_min_refresh_interval_ms` (no fetch happened).
pub const JWKS_FETCH_RESULTS: [&str; 3] = ["ok", "failed", "throttled"];

/// Labels of `wsgate_resumes_total{outcome}`: a `subscribe` with `since`
/// that replayed what was missed, or why it could not.
pub const RESUME_OUTCOMES: [&str; 5] = [
    "recovered",
    "epoch_changed",
    "trimmed",
    "too_many",
    "no_history",
];

/// Labels of `wsgate_presence_events_total{kind}`: frames queued.
pub const PRESENCE_EVENTS: [&str; 2] = ["join", "leave"];

/// Endpoints of `wsgate_api_requests_total{endpoint, status}`.
pub const API_ENDPOINTS: [&str; 9] = [
    "publish",
    "broadcast",
    "history",
    "presence",
    "disconnect",
    "revoke",
    "unsubscribe",
    "channels",
    "other",
];
/// Statuses of `wsgate_api_requests_total{endpoint, status}`.
pub const API_STATUSES: [u16; 10] = [200, 400, 401, 403, 404, 405, 413, 429, 500, 503];

/// HTTP API requests by endpoint and status, both from fixed sets.
#[derive(Debug)]
pub struct ApiRequests {
    counts: [[AtomicU64; API_STATUSES.len()]; API_ENDPOINTS.len()],
}

impl Default for ApiRequests {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl ApiRequests {
    /// Counts one request; an endpoint or status outside the sets is a
    /// bug, counted nowhere.
    pub fn inc(&self, endpoint: &str, status: u16) {
        let e = API_ENDPOINTS.iter().position(|x| *x == endpoint);
        let s = API_STATUSES.iter().position(|x| *x == status);
        match (e, s) {
            (Some(e), Some(s)) => {
                self.counts[e][s].fetch_add(1, Ordering::Relaxed);
            }
            _ => debug_assert!(false, "unknown api label {endpoint} {status}"),
        }
    }

    fn render(&self, out: &mut String) {
        let name = "wsgate_api_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP API requests by endpoint and status.\n# TYPE {name} counter"
        );
        for (endpoint, row) in API_ENDPOINTS.iter().zip(&self.counts) {
            for (status, v) in API_STATUSES.iter().zip(row) {
                let _ = writeln!(
                    out,
                    "{name}{{endpoint=\"{endpoint}\",status=\"{status}\"}} {}",
                    v.load(Ordering::Relaxed)
                );
            }
        }
    }
}

/// A counter per label value of a fixed set.
#[derive(Debug)]
pub struct LabeledCounter<const N: usize> {
    labels: &'static [&'static str; N],
    values: [AtomicU64; N],
}

impl<const N: usize> LabeledCounter<N> {
    const fn new(labels: &'static [&'static str; N]) -> Self {
        Self {
            labels,
            values: [const { AtomicU64::new(0) }; N],
        }
    }

    /// Counts one for `label`; a label outside the set is a bug, counted nowhere.
    pub fn inc(&self, label: &str) {
        if let Some(i) = self.labels.iter().position(|l| *l == label) {
            self.values[i].fetch_add(1, Ordering::Relaxed);
        } else {
            debug_assert!(false, "unknown metric label {label}");
        }
    }

    /// Counts `n` for `label`, as [`LabeledCounter::inc`].
    pub fn add(&self, label: &str, n: u64) {
        if let Some(i) = self.labels.iter().position(|l| *l == label) {
            self.values[i].fetch_add(n, Ordering::Relaxed);
        } else {
            debug_assert!(false, "unknown metric label {label}");
        }
    }

    pub fn get(&self, label: &str) -> u64 {
        self.labels
            .iter()
            .position(|l| *l == label)
            .map_or(0, |i| self.values[i].load(Ordering::Relaxed))
    }

    fn render(&self, out: &mut String, name: &str, label: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (l, v) in self.labels.iter().zip(&self.values) {
            let _ = writeln!(
                out,
                "{name}{{{label}=\"{l}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    /// TCP connections held (handshaking, HTTP or WebSocket).
    pub connections_open: AtomicI64,
    /// Upgraded WebSocket sessions.
    pub sessions_open: AtomicI64,
    pub upgrades: LabeledCounter<16>,
    pub auth_failures: LabeledCounter<14>,
    pub sessions_closed: LabeledCounter<15>,
    /// Close frames the gateway sent, by code.
    pub close_codes: LabeledCounter<11>,
    /// Live subscriptions over all sessions.
    pub subscriptions: AtomicI64,
    /// Publications accepted from clients.
    pub messages_received: AtomicU64,
    /// `message` frames queued to subscribers.
    pub messages_delivered: AtomicU64,
    pub policy_reloads: LabeledCounter<2>,
    pub cert_reloads: LabeledCounter<2>,
    /// PROXY protocol headers by result (only with `server.proxy_protocol`).
    pub proxy_headers: LabeledCounter<5>,
    /// Connections closed before TLS by an admission limit (their address
    /// had already been answered with a refusal within the second).
    pub admission_dropped: AtomicU64,
    /// Verification keys; shared with the [`crate::auth::Verifier`].
    pub keys: Arc<KeyMetrics>,
    /// TLS handshake durations.
    pub handshake: Histogram,
    /// From a decoded `publish` to its frames being in every outbox.
    pub publish: Histogram,
    /// Resumes by outcome.
    pub resumes: LabeledCounter<5>,
    /// `history` requests answered.
    pub history_reads: AtomicU64,
    /// Bytes of stored history (frames plus a fixed cost per channel).
    pub history_bytes: AtomicI64,
    /// Channels whose history is kept.
    pub history_channels: AtomicI64,
    /// Channels evicted whole to stay under `history.max_bytes`.
    pub history_evictions: AtomicU64,
    /// HTTP API requests by endpoint and status.
    pub api: ApiRequests,
    /// Members (a user in a channel) this gateway tracks, in grace or not.
    pub presence_members: AtomicI64,
    /// `join` and `leave` frames queued to watching sessions.
    pub presence_events: LabeledCounter<2>,
    /// Joins and leaves not sent because the channel had more members
    /// than `presence.max_listed`.
    pub presence_suppressed: AtomicU64,
    /// Sweeps of a channel's expired members in Redis run by this replica.
    pub presence_sweeps: AtomicU64,
    /// Members removed by those sweeps (their replica stopped refreshing).
    pub presence_expired: AtomicU64,
    /// Log lines about clients held back by the per-address and global
    /// log rate (see `loggate`).
    pub log_lines_held: AtomicU64,
}

const RESULTS: [&str; 2] = ["ok", "failed"];

/// What the verifier counts about its keys: it holds these itself, since
/// a fetch finishes in its own task.
#[derive(Debug)]
pub struct KeyMetrics {
    /// Keys in force.
    pub keys: AtomicI64,
    /// JWKS file reloads (SIGHUP or file change).
    pub reloads: LabeledCounter<2>,
    /// JWKS URL fetches, and throttled refreshes.
    pub fetches: LabeledCounter<3>,
}

impl Default for KeyMetrics {
    fn default() -> Self {
        Self {
            keys: AtomicI64::new(0),
            reloads: LabeledCounter::new(&RESULTS),
            fetches: LabeledCounter::new(&JWKS_FETCH_RESULTS),
        }
    }
}

impl KeyMetrics {
    pub fn set_keys(&self, n: usize) {
        self.keys
            .store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections_open: AtomicI64::new(0),
            sessions_open: AtomicI64::new(0),
            upgrades: LabeledCounter::new(&UPGRADE_RESULTS),
            auth_failures: LabeledCounter::new(&AUTH_FAILURES),
            sessions_closed: LabeledCounter::new(&CLOSE_REASONS),
            close_codes: LabeledCounter::new(&CLOSE_CODES),
            subscriptions: AtomicI64::new(0),
            messages_received: AtomicU64::new(0),
            messages_delivered: AtomicU64::new(0),
            policy_reloads: LabeledCounter::new(&RESULTS),
            cert_reloads: LabeledCounter::new(&RESULTS),
            proxy_headers: LabeledCounter::new(&PROXY_RESULTS),
            admission_dropped: AtomicU64::new(0),
            keys: Arc::default(),
            handshake: Histogram::new(),
            publish: Histogram::new(),
            resumes: LabeledCounter::new(&RESUME_OUTCOMES),
            history_reads: AtomicU64::new(0),
            history_bytes: AtomicI64::new(0),
            history_channels: AtomicI64::new(0),
            history_evictions: AtomicU64::new(0),
            api: ApiRequests::default(),
            presence_members: AtomicI64::new(0),
            presence_events: LabeledCounter::new(&PRESENCE_EVENTS),
            presence_suppressed: AtomicU64::new(0),
            presence_sweeps: AtomicU64::new(0),
            presence_expired: AtomicU64::new(0),
            log_lines_held: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let load = |a: &AtomicI64| a.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "wsgate_connections_open",
            "TCP connections held, in any phase.",
            load(&self.connections_open),
        );
        gauge(
            &mut out,
            "wsgate_sessions_open",
            "Upgraded WebSocket sessions.",
            load(&self.sessions_open),
        );
        gauge(
            &mut out,
            "wsgate_subscriptions",
            "Live channel subscriptions.",
            load(&self.subscriptions),
        );
        self.upgrades.render(
            &mut out,
            "wsgate_upgrades_total",
            "result",
            "Requests on /ws by result.",
        );
        self.auth_failures.render(
            &mut out,
            "wsgate_auth_failures_total",
            "reason",
            "Upgrades refused for their token, by reason.",
        );
        self.sessions_closed.render(
            &mut out,
            "wsgate_sessions_closed_total",
            "reason",
            "Ended sessions by close reason.",
        );
        self.close_codes.render(
            &mut out,
            "wsgate_close_codes_total",
            "code",
            "Close frames sent by the gateway, by close code.",
        );
        counter(
            &mut out,
            "wsgate_messages_received_total",
            "Publications accepted from clients.",
            self.messages_received.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "wsgate_messages_delivered_total",
            "Message frames queued to subscribers.",
            self.messages_delivered.load(Ordering::Relaxed),
        );
        self.policy_reloads.render(
            &mut out,
            "wsgate_policy_reloads_total",
            "result",
            "Policy reloads by result.",
        );
        self.cert_reloads.render(
            &mut out,
            "wsgate_cert_reloads_total",
            "result",
            "Certificate reloads by result.",
        );
        self.proxy_headers.render(
            &mut out,
            "wsgate_proxy_headers_total",
            "result",
            "PROXY protocol headers by result.",
        );
        counter(
            &mut out,
            "wsgate_admission_dropped_total",
            "Connections closed before TLS by an admission limit.",
            self.admission_dropped.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "wsgate_verification_keys",
            "JWT verification keys in force.",
            load(&self.keys.keys),
        );
        self.keys.reloads.render(
            &mut out,
            "wsgate_key_reloads_total",
            "result",
            "JWKS file reloads by result.",
        );
        self.keys.fetches.render(
            &mut out,
            "wsgate_jwks_fetches_total",
            "result",
            "JWKS URL fetches by result; throttled: an unknown-kid refresh refused without a fetch.",
        );
        self.resumes.render(
            &mut out,
            "wsgate_resumes_total",
            "outcome",
            "Subscribes with since, by outcome.",
        );
        counter(
            &mut out,
            "wsgate_history_reads_total",
            "History requests answered.",
            self.history_reads.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "wsgate_history_bytes",
            "Bytes of stored history on this gateway (frames plus 256 per channel).",
            load(&self.history_bytes),
        );
        gauge(
            &mut out,
            "wsgate_history_channels",
            "Channels whose history this gateway keeps.",
            load(&self.history_channels),
        );
        counter(
            &mut out,
            "wsgate_history_evictions_total",
            "Channels evicted whole to stay under history.max_bytes.",
            self.history_evictions.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "wsgate_presence_members",
            "Channel members (users) this gateway tracks for presence.",
            load(&self.presence_members),
        );
        self.presence_events.render(
            &mut out,
            "wsgate_presence_events_total",
            "kind",
            "Presence join and leave frames queued to sessions.",
        );
        counter(
            &mut out,
            "wsgate_presence_suppressed_total",
            "Joins and leaves not sent because the channel had more than presence.max_listed members.",
            self.presence_suppressed.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "wsgate_presence_sweeps_total",
            "Sweeps of expired presence members in Redis run by this replica.",
            self.presence_sweeps.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "wsgate_presence_expired_total",
            "Presence members removed by sweeps because their replica stopped refreshing them.",
            self.presence_expired.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "wsgate_log_lines_held_total",
            "Log lines about clients (refusals, closes) held back by the log rate limits.",
            self.log_lines_held.load(Ordering::Relaxed),
        );
        self.api.render(&mut out);
        self.handshake.render(
            &mut out,
            "wsgate_tls_handshake_seconds",
            "TLS handshake duration.",
        );
        self.publish.render(
            &mut out,
            "wsgate_publish_seconds",
            "From a decoded publish to its frames in every outbox.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_match_the_enums_they_mirror() {
        for e in [
            crate::proxy::ProxyError::Untrusted,
            crate::proxy::ProxyError::Malformed,
            crate::proxy::ProxyError::Timeout,
        ] {
            assert!(PROXY_RESULTS.contains(&e.label()));
        }
        for code in [
            crate::protocol::CloseCode::Normal,
            crate::protocol::CloseCode::GoingAway,
            crate::protocol::CloseCode::ProtocolError,
            crate::protocol::CloseCode::Unsupported,
            crate::protocol::CloseCode::InvalidPayload,
            crate::protocol::CloseCode::PolicyViolation,
            crate::protocol::CloseCode::TooBig,
            crate::protocol::CloseCode::InternalError,
            crate::protocol::CloseCode::TokenExpired,
            crate::protocol::CloseCode::Disconnected,
            crate::protocol::CloseCode::TooSlow,
        ] {
            assert!(CLOSE_CODES.contains(&code.label()), "{}", code.label());
            assert_eq!(code.label(), code.code().to_string());
        }
        use crate::auth::AuthFailure::*;
        use crate::session::CloseReason as C;
        use crate::upgrade::Refusal as R;
        for f in [
            Malformed,
            Algorithm,
            Crit,
            UnknownKid,
            Signature,
            Expired,
            NotYetValid,
            Issuer,
            Audience,
            MissingClaim,
            BadClaim,
            Revoked,
        ] {
            assert!(AUTH_FAILURES.contains(&f.label()), "{}", f.label());
        }
        let refusals = [
            R::BadUpgrade(""),
            R::PlainGet,
            R::Version,
            R::Origin,
            R::Draining,
            R::Overloaded,
            R::UserLimit,
            R::NoToken,
            R::SubprotocolCarrier(""),
            R::Carrier(""),
            R::InvalidToken(Expired),
            R::Admission(crate::admission::Limited::AddressConnections),
            R::Admission(crate::admission::Limited::AddressRate(1)),
            R::Admission(crate::admission::Limited::GlobalRate(1)),
            R::Admission(crate::admission::Limited::FailedAuths(1)),
            R::NotFound,
        ];
        for r in refusals {
            assert!(UPGRADE_RESULTS.contains(&r.label()), "{}", r.label());
            if let Some(reason) = r.auth_failure() {
                assert!(AUTH_FAILURES.contains(&reason), "{reason}");
            }
        }
        for c in [
            C::ClientClosed,
            C::Shutdown,
            C::TokenExpired,
            C::HeartbeatTimeout,
            C::WriteTimeout,
            C::SlowReader,
            C::RateLimited,
            C::ProtocolError,
            C::Binary,
            C::InvalidUtf8,
            C::BadFrames,
            C::TooBig,
            C::Io,
            C::Disconnected,
        ] {
            assert!(CLOSE_REASONS.contains(&c.label()), "{}", c.label());
        }
    }

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.upgrades.inc("ok");
        m.upgrades.inc("origin");
        m.handshake.observe(Duration::from_micros(300));
        m.handshake.observe(Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains("wsgate_upgrades_total{result=\"ok\"} 1"));
        assert!(text.contains("wsgate_upgrades_total{result=\"origin\"} 1"));
        assert!(text.contains("wsgate_tls_handshake_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("wsgate_tls_handshake_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("wsgate_tls_handshake_seconds_count 2"));
    }
}
