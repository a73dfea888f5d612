//! `validate()`: values that parse but cannot work together.

use jsonwebtoken::{Algorithm, AlgorithmFamily};

use super::{Config, ConfigError, ForwardedHeader, IpNet, JwksUrl, Origin};

impl Config {
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
        if let Some(Err(e)) = s
            .trusted_proxies
            .iter()
            .map(|p| p.parse::<IpNet>())
            .find(Result::is_err)
        {
            return bad(format!("server.trusted_proxies: {e}"));
        }
        let forwarding = s.forwarded_header != ForwardedHeader::None;
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
            if Origin::parse(origin).is_none() {
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
            JwksUrl::parse(url).map_err(|e| ConfigError::Invalid(format!("auth.jwks_url: {e}")))?;
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
        if w.outbox_bytes < w.max_message_bytes {
            return bad("websocket.outbox_bytes must be at least max_message_bytes".into());
        }
        if w.message_timeout_ms == 0 {
            return bad("websocket.message_timeout_ms must be above 0".into());
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
        let api = &self.api;
        if api.audience.is_empty() || api.admin_role.is_empty() {
            return bad("api.audience and api.admin_role must not be empty".into());
        }
        if self.auth.audiences.contains(&api.audience) {
            return bad(format!(
                "auth.audiences must not hold api.audience ({:?}): API tokens would be client tokens too",
                api.audience
            ));
        }
        if api.max_connections == 0 || api.requests_per_s == 0 || api.requests_burst == 0 {
            return bad(
                "api.max_connections, requests_per_s and requests_burst must be at least 1".into(),
            );
        }
        if let Some(addr) = api.listen {
            if api.plain_http && !addr.ip().is_loopback() && !api.plain_http_beyond_loopback {
                return bad(format!(
                    "api.plain_http on {addr} would send API tokens in clear text: use a loopback address, or set api.plain_http_beyond_loopback behind a TLS-terminating proxy"
                ));
            }
            // Port 0 is any free port: distinct by construction.
            if addr.port() != 0 && (addr == s.listen || Some(addr) == s.admin_listen) {
                return bad(
                    "api.listen must differ from server.listen and server.admin_listen".into(),
                );
            }
        }
        let h = &self.history;
        if h.max_replay == 0 {
            return bad("history.max_replay must be at least 1".into());
        }
        for rule in &h.channels {
            if rule.pattern.is_empty() || rule.max_messages == 0 || rule.max_age_s == 0 {
                return bad(format!(
                    "history.channels: pattern {:?} needs a pattern, max_messages and max_age_s above 0",
                    rule.pattern
                ));
            }
            if rule.max_messages > 100_000 {
                return bad(format!(
                    "history.channels: pattern {:?} keeps at most 100000 messages",
                    rule.pattern
                ));
            }
        }
        if !h.channels.is_empty() && h.max_bytes < 1024 * 1024 {
            return bad(
                "history.max_bytes must be at least 1 MiB when channels keep history".into(),
            );
        }
        let p = &self.presence;
        if p.channels.iter().any(String::is_empty) {
            return bad("presence.channels: a pattern must not be empty".into());
        }
        if !(1..=10_000).contains(&p.max_listed) {
            return bad("presence.max_listed must be between 1 and 10000".into());
        }
        if p.grace_ms > 600_000 {
            return bad("presence.grace_ms must be at most 600000 (10 minutes)".into());
        }
        if !(3..=86_400).contains(&p.ttl_s) {
            return bad("presence.ttl_s must be between 3 and 86400".into());
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
}
