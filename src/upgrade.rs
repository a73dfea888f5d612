//! The upgrade decision for `/ws`, exactly as `protocol.md` §1 lists it,
//! in [`decide`]: the client's address behind a trusted proxy, RFC 6455
//! §4.2.1 checks, the Origin allow-list, draining, the three token
//! carriers, the failed-authentication gate, JWT verification, and the
//! per-user cap. The checks before verification are pure (no I/O), so
//! each refusal row is a plain function result; only verification may
//! await, when a token names a `kid` that a JWKS URL may have gained. The
//! server turns a [`Refusal`] into the HTTP answer and an [`Accepted`] into
//! the `101` and a session.
//!
//! Token values are never put into a [`Refusal`], an error, or a log line.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};

use crate::admission::{AddressGuard, Admit, Limited};
use crate::auth::{AuthFailure, Verifier};
use crate::config::{Config, ConfigError, ForwardedHeader, Origin};
use crate::gateway::Gateway;
use crate::gateway::slots::{ConnSlot, UserSlot};
use crate::identity::Identity;
use crate::proxy::{self, Trusted};

/// The only subprotocol we speak; echoed when offered.
pub const SUBPROTOCOL: &str = "wsgate.v1";
const BEARER_PREFIX: &str = "bearer.";
const QUERY_PARAM: &str = "access_token";

/// The upgrade rules, compiled once from the config.
#[derive(Debug, Clone)]
pub struct UpgradePolicy {
    allowed_origins: Vec<Origin>,
    allow_same_origin: bool,
    query_token: bool,
    max_token_bytes: usize,
    retry_after_s: u64,
    /// Proxies whose PROXY or forwarding header is believed.
    pub trusted: Trusted,
    /// The forwarding header read from trusted proxies.
    pub forwarded: ForwardedHeader,
}

impl UpgradePolicy {
    /// Compiles the Origin list, the token rules and the trusted proxies;
    /// origins were checked by `Config::validate`, unparseable ones never
    /// match.
    ///
    /// # Errors
    /// A `server.trusted_proxies` entry that is not a network.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Ok(Self {
            allowed_origins: config
                .server
                .allowed_origins
                .iter()
                .filter_map(|o| Origin::parse(o))
                .collect(),
            allow_same_origin: config.server.allow_same_origin,
            query_token: config.auth.query_token,
            max_token_bytes: config.auth.max_token_bytes,
            retry_after_s: config.server.retry_after_s,
            trusted: Trusted::parse(&config.server.trusted_proxies)
                .map_err(ConfigError::Invalid)?,
            forwarded: config.server.forwarded_header,
        })
    }

    /// Whether requests from `ip` name their client in a forwarding header.
    pub fn forwarding_from(&self, ip: IpAddr) -> bool {
        self.forwarded != ForwardedHeader::None && self.trusted.contains(ip)
    }
}

/// Why an upgrade was refused. Each maps to one status of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid WebSocket upgrade (RFC 6455 §4.2.1): `400`.
    BadUpgrade(&'static str),
    /// A plain GET without `Upgrade`: `426`.
    PlainGet,
    /// `Sec-WebSocket-Version` other than 13: `426`.
    Version,
    /// `Origin` not allowed: `403`.
    Origin,
    /// The gateway is draining: `503`.
    Draining,
    /// Too many connections: `503` with `Retry-After`.
    Overloaded,
    /// Too many connections for this user: `429` with `Retry-After`.
    UserLimit,
    /// No token in any carrier: `401`.
    NoToken,
    /// `bearer.` offered without `wsgate.v1`, or twice: `400`.
    SubprotocolCarrier(&'static str),
    /// Two carriers, an oversized token, or a query token while disabled: `401`.
    Carrier(&'static str),
    /// The token failed verification: `401` with `error="invalid_token"`.
    InvalidToken(AuthFailure),
    /// An admission limit: `429` (per address) or `503` (global), both
    /// with `Retry-After`.
    Admission(Limited),
    /// A path that is neither `/ws` nor a documented route: `404`.
    NotFound,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadUpgrade(_) | Self::SubprotocolCarrier(_) => StatusCode::BAD_REQUEST,
            Self::PlainGet | Self::Version => StatusCode::UPGRADE_REQUIRED,
            Self::Origin => StatusCode::FORBIDDEN,
            Self::Draining | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::UserLimit => StatusCode::TOO_MANY_REQUESTS,
            Self::Admission(Limited::GlobalRate(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Admission(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NoToken | Self::Carrier(_) | Self::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
        }
    }

    /// A stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::BadUpgrade(_) => "bad_upgrade",
            Self::PlainGet => "plain_get",
            Self::Version => "version",
            Self::Origin => "origin",
            Self::Draining => "draining",
            Self::Overloaded => "overloaded",
            Self::UserLimit => "user_limit",
            Self::NoToken => "no_token",
            Self::SubprotocolCarrier(_) | Self::Carrier(_) => "carrier",
            Self::InvalidToken(_) => "invalid_token",
            Self::Admission(Limited::AddressConnections) => "address_limit",
            Self::Admission(Limited::AddressRate(_)) => "address_rate",
            Self::Admission(Limited::GlobalRate(_)) => "global_rate",
            Self::Admission(Limited::FailedAuths(_)) => "auth_rate",
            Self::NotFound => "not_found",
        }
    }

    /// For refusals about the token: why, as an authentication failure.
    pub fn auth_failure(self) -> Option<&'static str> {
        match self {
            Self::NoToken => Some("no_token"),
            Self::SubprotocolCarrier(_) | Self::Carrier(_) => Some("carrier"),
            Self::InvalidToken(f) => Some(f.label()),
            _ => None,
        }
    }

    /// The human reason sent in the body; never contains the token.
    pub fn reason(self) -> Cow<'static, str> {
        match self {
            Self::BadUpgrade(r) | Self::SubprotocolCarrier(r) | Self::Carrier(r) => r.into(),
            Self::PlainGet => "this endpoint speaks WebSocket only".into(),
            Self::Version => "only WebSocket version 13 is supported".into(),
            Self::Origin => "origin not allowed".into(),
            Self::Draining => "server is shutting down".into(),
            Self::Overloaded => "too many connections".into(),
            Self::UserLimit => "too many connections for this user".into(),
            Self::NoToken => "a bearer token is required".into(),
            Self::InvalidToken(f) => f.to_string().into(),
            Self::Admission(Limited::AddressConnections) => {
                "too many connections from this address".into()
            }
            Self::Admission(Limited::AddressRate(_)) => {
                "too many new connections from this address".into()
            }
            Self::Admission(Limited::GlobalRate(_)) => "too many new connections".into(),
            Self::Admission(Limited::FailedAuths(_)) => {
                "too many failed authentications from this address".into()
            }
            Self::NotFound => "not found".into(),
        }
    }

    /// The complete HTTP answer: status, the contract's headers, a short
    /// text body, and `Connection: close` so nothing follows on the socket.
    pub fn response<B: From<String>>(self, policy: &UpgradePolicy) -> Response<B> {
        let mut res = Response::new(B::from(format!("{}\n", self.reason())));
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            Self::NoToken => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Carrier(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_request\""),
                );
            }
            Self::InvalidToken(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Self::Version => {
                h.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            Self::PlainGet => {
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                h.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            Self::Overloaded | Self::Draining | Self::UserLimit => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(policy.retry_after_s));
            }
            Self::Admission(limited) => {
                let secs = match limited {
                    Limited::AddressConnections => policy.retry_after_s,
                    Limited::AddressRate(s) | Limited::GlobalRate(s) | Limited::FailedAuths(s) => {
                        u64::from(s)
                    }
                };
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        res
    }
}

/// A request that may be upgraded: who it is, how to answer, and the
/// slots its session holds for as long as it lives.
#[derive(Debug)]
pub struct Accepted {
    pub identity: Identity,
    accept_key: String,
    subprotocol: bool,
    /// The client's address (from a trusted forwarding header, if any).
    pub client: IpAddr,
    /// One of the user's connection slots (it numbers the session).
    pub user_slot: UserSlot,
    /// The session's end of its control channel.
    pub control: Arc<crate::gateway::slots::Mailbox>,
    /// The client's place in its address's count, when a trusted proxy
    /// named it (the connection's own guard counts the proxy).
    pub forwarded_slot: Option<AddressGuard>,
}

impl Accepted {
    /// The `101 Switching Protocols` answer.
    pub fn response<B: Default>(&self) -> Response<B> {
        let mut res = Response::new(B::default());
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = res.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        // An answer to a request that carried a token: no cache keeps it.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(v) = HeaderValue::from_str(&self.accept_key) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if self.subprotocol {
            h.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        res
    }
}

/// A request that passed every check but the token's verification.
pub struct Pending {
    token: String,
    accept_key: String,
    subprotocol: bool,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Pending")
            .field("subprotocol", &self.subprotocol)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// Verifies the token. An unknown `kid` with a JWKS URL as the key
    /// source waits for one refresh, bounded by `auth.jwks_timeout_ms`.
    ///
    /// # Errors
    /// [`Refusal::InvalidToken`] with the reason.
    pub async fn verify(&self, verifier: &Verifier) -> Result<Identity, Refusal> {
        verifier
            .verify_fresh(&self.token)
            .await
            .map_err(Refusal::InvalidToken)
    }
}

/// The whole `/ws` decision for a request on connection `conn`. The cheap
/// checks run first, synchronously; then, before any signature work, an
/// address that keeps failing is refused; only the token's verification
/// may wait (for a JWKS refresh on an unknown kid).
///
/// # Errors
/// The [`Refusal`] whose answer the client gets; a refusal about the
/// token also counts against the address's failed authentications.
pub async fn decide<B>(
    req: &Request<B>,
    gateway: &Arc<Gateway>,
    policy: &UpgradePolicy,
    conn: &ConnSlot,
) -> Result<Accepted, Refusal> {
    let admission = &gateway.admission;
    let now = Instant::now();
    // Behind a trusted TLS-terminating proxy, the client is named in the
    // forwarding header; it is counted by that address for as long as its
    // session lasts.
    let mut client = conn.client.ip();
    let mut forwarded_slot = None;
    if policy.forwarding_from(client) {
        // A header that names no believable client counts the request
        // against the proxy itself: never against no address at all.
        let ip = proxy::forwarded_client(req.headers(), policy.forwarded, &policy.trusted)
            .unwrap_or(client);
        client = ip;
        match admission.admit(ip, now) {
            Admit::Yes(guard) => forwarded_slot = Some(guard),
            Admit::Refuse(_, limited) | Admit::Drop(limited) => {
                return Err(Refusal::Admission(limited));
            }
        }
    }
    let address = forwarded_slot
        .as_ref()
        .map_or(conn.address.key(), AddressGuard::key);
    let failed = |refusal: Refusal| {
        if let (Some(address), Some(_)) = (address, refusal.auth_failure()) {
            admission.auth_failed(address, Instant::now());
        }
        refusal
    };
    let pending = check(req, policy, gateway.is_draining()).map_err(failed)?;
    if let Some(address) = address {
        admission
            .check_auth(address, now)
            .map_err(Refusal::Admission)?;
    }
    let identity = pending.verify(&gateway.verifier).await.map_err(failed)?;
    // An HTTP API token never stands in for a client token.
    if identity.has_audience(&gateway.config.api.audience) {
        return Err(failed(Refusal::InvalidToken(AuthFailure::Audience)));
    }
    if gateway.is_revoked(&identity) {
        return Err(failed(Refusal::InvalidToken(AuthFailure::Revoked)));
    }
    let (user_slot, control) = UserSlot::take(gateway, &identity.user).ok_or(Refusal::UserLimit)?;
    Ok(Accepted {
        identity,
        accept_key: pending.accept_key,
        subprotocol: pending.subprotocol,
        client,
        user_slot,
        control,
        forwarded_slot,
    })
}

/// Checks an upgrade request on `/ws` up to, not including, the token's
/// verification. The order is: the HTTP shape, Origin, draining, then the
/// token's carrier rules, all before any signature work or key fetch.
///
/// # Errors
/// The [`Refusal`] whose answer the client gets.
pub fn check<B>(
    req: &Request<B>,
    policy: &UpgradePolicy,
    draining: bool,
) -> Result<Pending, Refusal> {
    let accept_key = check_handshake(req)?;
    check_origin(req.headers(), policy)?;
    if draining {
        return Err(Refusal::Draining);
    }
    let (token, subprotocol) = extract_token(req, policy)?;
    Ok(Pending {
        token,
        accept_key,
        subprotocol,
    })
}

/// RFC 6455 §4.2.1, items 1–6, in order. Returns `Sec-WebSocket-Accept`.
fn check_handshake<B>(req: &Request<B>) -> Result<String, Refusal> {
    let headers = req.headers();
    // 1. An HTTP/1.1 or higher GET request.
    if req.method() != Method::GET {
        return Err(Refusal::BadUpgrade("the upgrade must be a GET request"));
    }
    if req.version() < Version::HTTP_11 {
        return Err(Refusal::BadUpgrade("the upgrade needs HTTP/1.1"));
    }
    // 2. A Host header field.
    if headers.get_all(header::HOST).iter().count() != 1 {
        return Err(Refusal::BadUpgrade("exactly one Host header is required"));
    }
    // 3. Upgrade including `websocket`; without any Upgrade it is a plain GET.
    if !headers.contains_key(header::UPGRADE) {
        return Err(Refusal::PlainGet);
    }
    if !has_token(headers, &header::UPGRADE, "websocket") {
        return Err(Refusal::BadUpgrade("Upgrade must include websocket"));
    }
    // 4. Connection including `Upgrade`.
    if !has_token(headers, &header::CONNECTION, "upgrade") {
        return Err(Refusal::BadUpgrade("Connection must include Upgrade"));
    }
    // 5. Sec-WebSocket-Key: base64 of 16 bytes.
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.as_bytes(),
        _ => {
            return Err(Refusal::BadUpgrade(
                "exactly one Sec-WebSocket-Key is required",
            ));
        }
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| Refusal::BadUpgrade("Sec-WebSocket-Key is not base64"))?;
    if decoded.len() != 16 {
        return Err(Refusal::BadUpgrade(
            "Sec-WebSocket-Key must decode to 16 bytes",
        ));
    }
    // 6. Sec-WebSocket-Version: 13.
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes() == b"13" => {}
        _ => return Err(Refusal::Version),
    }
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key))
}

/// Whether a comma-separated header (possibly repeated) holds `token`,
/// compared case-insensitively.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn check_origin(headers: &HeaderMap, policy: &UpgradePolicy) -> Result<(), Refusal> {
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let origin = match (origins.next(), origins.next()) {
        (None, _) => return Ok(()), // not a browser: nothing to protect against
        (Some(o), None) => o,
        _ => return Err(Refusal::Origin),
    };
    let Some(origin) = origin.to_str().ok().and_then(Origin::parse) else {
        return Err(Refusal::Origin); // includes the opaque `null` origin
    };
    if policy.allowed_origins.contains(&origin) {
        return Ok(());
    }
    // Same origin as the page that the gateway itself serves: the browser
    // sets Host to where it connects, so this only admits our own pages.
    let same = policy.allow_same_origin
        && headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| origin.is_https_host(h));
    if same { Ok(()) } else { Err(Refusal::Origin) }
}

/// Finds the token in exactly one carrier. Returns it and whether
/// `wsgate.v1` was offered (to echo it).
pub(crate) fn extract_token<B>(
    req: &Request<B>,
    policy: &UpgradePolicy,
) -> Result<(String, bool), Refusal> {
    let headers = req.headers();
    let mut found: Vec<Cow<'_, str>> = Vec::with_capacity(1);

    for value in headers.get_all(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| Refusal::InvalidToken(AuthFailure::Malformed))?;
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            found.push(Cow::Borrowed(rest.trim()));
        }
    }

    let mut offered_v1 = false;
    let mut bearer_entries = 0;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| Refusal::SubprotocolCarrier("Sec-WebSocket-Protocol is not ASCII"))?;
        for entry in value.split(',').map(str::trim) {
            if entry == SUBPROTOCOL {
                offered_v1 = true;
            } else if let Some(token) = entry.strip_prefix(BEARER_PREFIX) {
                bearer_entries += 1;
                found.push(Cow::Borrowed(token));
            }
        }
    }
    if bearer_entries > 1 {
        return Err(Refusal::SubprotocolCarrier(
            "more than one bearer. subprotocol entry",
        ));
    }
    if bearer_entries == 1 && !offered_v1 {
        return Err(Refusal::SubprotocolCarrier(
            "a bearer. subprotocol requires wsgate.v1 to be offered too",
        ));
    }

    let mut query_seen = false;
    for pair in req.uri().query().unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == QUERY_PARAM {
            query_seen = true;
            found.push(percent_decode(value));
        }
    }
    if query_seen && !policy.query_token {
        return Err(Refusal::Carrier(
            "query tokens are disabled on this gateway",
        ));
    }

    match found.len() {
        0 => Err(Refusal::NoToken),
        1 => {
            let token = found.swap_remove(0);
            if token.len() > policy.max_token_bytes {
                return Err(Refusal::Carrier("token too large"));
            }
            if token.is_empty() {
                return Err(Refusal::InvalidToken(AuthFailure::Malformed));
            }
            Ok((token.into_owned(), offered_v1))
        }
        _ => Err(Refusal::Carrier(
            "a token must be sent in exactly one carrier",
        )),
    }
}

/// Decodes `%XX` escapes (and `+` as space, as forms do). Bytes that are
/// not valid UTF-8 afterwards become U+FFFD, which no JWT contains.
pub(crate) fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes[i] {
            b'%' => bytes
                .get(i + 1..i + 3)
                // Two hex digits: `from_str_radix` alone would take `+a`.
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok()),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a.b_c-d"), "a.b_c-d");
        assert_eq!(percent_decode("a%2Eb"), "a.b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("%+a"), "% a", "a sign is not a hex digit");
    }
}
