//! The demo chat page and its assets (embedded from `web/`), and the
//! development-only token endpoint that exists solely under `serve --dev`.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::api::json;
use crate::auth::mint::{self, TokenRequest};
use crate::channel::is_token;
use crate::config::Config;

type Body = Full<Bytes>;

/// The page may load only its own scripts and styles and talk only to its
/// own origin (`wss:` to the same host).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The embedded asset for `path`, if there is one.
pub(super) fn asset(path: &str) -> Option<Response<Body>> {
    let (body, content_type): (&'static str, &'static str) = match path {
        "/" | "/index.html" => (
            include_str!("../../web/index.html"),
            "text/html; charset=utf-8",
        ),
        "/app.js" => (
            include_str!("../../web/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "/wsgate.js" => (
            include_str!("../../web/wsgate.js"),
            "text/javascript; charset=utf-8",
        ),
        "/style.css" => (
            include_str!("../../web/style.css"),
            "text/css; charset=utf-8",
        ),
        _ => return None,
    };
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(res)
}

/// `GET /dev/token?sub=alice&role=member`: a one-hour token, as JSON.
/// Only routed when the server runs with development endpoints.
pub(super) fn dev_token(config: &Config, query: Option<&str>) -> Response<Body> {
    let mut sub = None;
    let mut roles = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("sub", v)) => sub = Some(v.to_owned()),
            Some(("role", v)) if !v.is_empty() => roles.push(v.to_owned()),
            _ => {}
        }
    }
    // Ids and roles are restricted to channel-token characters, so they
    // need no escaping anywhere and work with `user:{sub}` patterns.
    let valid = |s: &str| s.len() <= 64 && is_token(s);
    let Some(sub) = sub.filter(|s| valid(s)) else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"sub must be 1-64 of A-Z a-z 0-9 _ . @ = + -"}"#.into(),
        );
    };
    if !roles.iter().all(|r| valid(r)) || roles.len() > 8 {
        return json(StatusCode::BAD_REQUEST, r#"{"error":"bad role"}"#.into());
    }
    let request = TokenRequest {
        sub,
        roles,
        ttl: std::time::Duration::from_secs(3600),
        claims: serde_json::Map::new(),
        kid: None,
    };
    match mint::mint(config, &request, None) {
        Ok(token) => json(
            StatusCode::OK,
            serde_json::json!({ "token": token }).to_string(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "dev token minting failed");
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":"cannot mint"}"#.into(),
            )
        }
    }
}
