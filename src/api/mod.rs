//! The HTTP API for backends (protocol.md §7): a caller beside the
//! sessions. Each request is routed, authenticated with an API token
//! (`aud` = `api.audience`, verified like a client token), rate limited
//! per token subject, its body read under the publish size limit, and
//! taken to the gateway core with the token's roles and claims judged by
//! the same policies as a client's. Answers are JSON; failures are real
//! HTTP statuses with `{"error":{"code","message"}}`. Nothing here logs a
//! token.

mod error;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::info;

use crate::channel::ChannelName;
use crate::gateway::{Caller, CoreError, Fanout, Gateway, Manage, Managed};
use crate::identity::Identity;
use crate::protocol::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT, PositionOk};
use crate::rate::{Bucket, Rate};
use error::ApiError;

type Body = Full<Bytes>;

/// Longest `idempotency_key`.
const MAX_KEY_BYTES: usize = 200;

/// Most channels one `broadcast` names.
pub const MAX_BROADCAST_CHANNELS: usize = 100;

/// Most token subjects whose request buckets are remembered; past it the
/// full (idle) ones are forgotten first.
const MAX_BUCKETS: usize = 10_000;

/// The API's state beside the core: request buckets per token subject.
#[derive(Debug)]
pub struct Api {
    gateway: Arc<Gateway>,
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Api {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        let cfg = &gateway.config.api;
        // Validation keeps both at least 1, so the limit is always on.
        let rate = Rate::new(f64::from(cfg.requests_per_s), cfg.requests_burst)
            .unwrap_or(Rate::new(1.0, 1).expect("1 per second is a rate"));
        Self {
            gateway,
            rate,
            buckets: Mutex::default(),
        }
    }

    /// Answers one request; never fails (a failure is an answer).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let endpoint = match req.uri().path() {
            "/api/publish" => "publish",
            "/api/broadcast" => "broadcast",
            "/api/history" => "history",
            "/api/presence" => "presence",
            "/api/disconnect" => "disconnect",
            "/api/revoke" => "revoke",
            "/api/unsubscribe" => "unsubscribe",
            "/api/channels" => "channels",
            _ => "other",
        };
        let started = Instant::now();
        let method = req.method().clone();
        // The subject is known only once the token is verified; a request
        // refused before that is logged without one.
        let mut sub = None;
        let (res, code) = match self.route(endpoint, req, &mut sub).await {
            Ok(res) => (res, None),
            Err(e) => (e.response(), Some(e.code)),
        };
        let status = res.status().as_u16();
        self.gateway.metrics.api.inc(endpoint, status);
        // The access log: one line per request, never the token or body.
        info!(
            endpoint,
            method = method.as_str(),
            status,
            code,
            sub = sub.as_deref(),
            duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "api request"
        );
        res
    }

    async fn route(
        &self,
        endpoint: &str,
        req: Request<Incoming>,
        sub: &mut Option<String>,
    ) -> Result<Response<Body>, ApiError> {
        let allowed = match endpoint {
            "publish" | "broadcast" | "disconnect" | "revoke" | "unsubscribe" => Method::POST,
            "history" | "presence" | "channels" => Method::GET,
            _ => return Err(ApiError::not_found()),
        };
        if req.method() != allowed {
            return Err(ApiError::method(&allowed));
        }
        let identity = self.authenticate(&req).await?;
        *sub = Some(identity.user.clone());
        self.spend(&identity.user)?;
        let policy = self.gateway.policies.current();
        let caller = Caller {
            identity: &identity,
            policy: &policy,
        };
        let admin = &self.gateway.config.api.admin_role;
        let is_admin = identity.roles.iter().any(|r| r == admin);
        match endpoint {
            "publish" => self.publish(caller, req).await,
            "broadcast" => self.broadcast(caller, req).await,
            "history" => self.history(caller, req.uri().query()).await,
            "presence" => self.presence(caller, req.uri().query()).await,
            _ if !is_admin => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!("this endpoint needs the role {admin:?}"),
            )),
            "channels" => self.channels(req.uri().query()).await,
            _ => self.manage(endpoint, req).await,
        }
    }

    /// The bearer token, verified as an API token.
    async fn authenticate<B>(&self, req: &Request<B>) -> Result<Identity, ApiError> {
        let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
        let value = match (values.next(), values.next()) {
            (Some(v), None) => v,
            (None, _) => return Err(ApiError::unauthorized("a bearer token is required")),
            _ => {
                return Err(ApiError::unauthorized(
                    "exactly one Authorization header is allowed",
                ));
            }
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
        if token.len() > self.gateway.config.auth.max_token_bytes {
            return Err(ApiError::unauthorized("token too large"));
        }
        self.gateway
            .verifier
            .verify_api(token)
            .await
            .map_err(|failure| {
                self.gateway.metrics.auth_failures.inc(failure.label());
                ApiError::unauthorized(&failure.to_string())
            })
    }

    /// Takes one request of `user`'s budget.
    fn spend(&self, user: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(user) {
            let rate = self.rate;
            buckets.retain(|_, b| !b.is_full(rate, now));
        }
        let bucket = buckets
            .entry(user.to_owned())
            .or_insert_with(|| Bucket::full(self.rate, now));
        bucket.take(self.rate, now).map_err(ApiError::rate_limited)
    }

    /// The JSON object body, read no further than the publish size limit,
    /// as its fields (values kept raw, so `data` is never re-encoded).
    async fn body(&self, req: Request<Incoming>) -> Result<Fields, ApiError> {
        let limit = self.gateway.config.websocket.max_message_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = Limited::new(req.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    ApiError::too_large(limit)
                } else {
                    ApiError::bad_request("the body could not be read")
                }
            })?
            .to_bytes();
        let fields: HashMap<String, Box<RawValue>> =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(&json_error(&e)))?;
        Ok(Fields(fields))
    }

    async fn publish(
        &self,
        caller: Caller<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let body = self.body(req).await?;
        let channel = parse_channel(&body.string("channel")?)?;
        let data = body.raw("data")?;
        let answer = match body.optional::<String>("idempotency_key")? {
            None => self.publish_one(caller, &channel, data).await?,
            Some(key) => self.publish_once(caller, &channel, data, &key).await?,
        };
        Ok(json(StatusCode::OK, answer.to_string()))
    }

    /// A publication under an idempotency key: the first request with
    /// the key (per token subject, for 5 minutes, on every replica)
    /// publishes; a repeat publishes nothing and gets the first answer.
    async fn publish_once(
        &self,
        caller: Caller<'_>,
        channel: &ChannelName,
        data: &RawValue,
        key: &str,
    ) -> Result<serde_json::Value, ApiError> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(ApiError::bad_request(&format!(
                "`idempotency_key` must be 1 to {MAX_KEY_BYTES} bytes"
            )));
        }
        // Scoped by subject, so two services never share a key by chance.
        let user = &caller.identity.user;
        let scoped = format!("{}:{user}:{key}", user.len());
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match self
                .gateway
                .reserve_key(&scoped)
                .await
                .map_err(ApiError::from_core)?
            {
                crate::broker::Reserved::Done(answer) => {
                    return serde_json::from_str(&answer).map_err(|_| ApiError::internal());
                }
                crate::broker::Reserved::New => {
                    let published = self.publish_one(caller, channel, data).await;
                    let answer = published.as_ref().ok().map(ToString::to_string);
                    self.gateway.complete_key(&scoped, answer.as_deref()).await;
                    return published;
                }
                crate::broker::Reserved::Pending if Instant::now() < deadline => {
                    // The first request is publishing: its answer is ours.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                crate::broker::Reserved::Pending => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "a publication with this idempotency_key is still under way; retry",
                    ));
                }
            }
        }
    }

    async fn publish_one(
        &self,
        caller: Caller<'_>,
        channel: &ChannelName,
        data: &RawValue,
    ) -> Result<serde_json::Value, ApiError> {
        let published = self
            .gateway
            // The answer waits for the fan-out: queue it, so the backend
            // waits for no socket writes and concurrent publications are
            // written together.
            .publish(caller, channel, data, || {}, Fanout::Queued)
            .await
            .map_err(ApiError::from_core)?;
        let mut answer = serde_json::json!({ "seq": published.seq });
        if let Some(epoch) = published.epoch {
            answer["epoch"] = serde_json::Value::from(&*epoch);
        }
        Ok(answer)
    }

    async fn broadcast(
        &self,
        caller: Caller<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let body = self.body(req).await?;
        let names: Vec<String> = body.get("channels", "an array of channel names")?;
        let data = body.raw("data")?;
        if names.is_empty() || names.len() > MAX_BROADCAST_CHANNELS {
            return Err(ApiError::bad_request(&format!(
                "`channels` must name 1 to {MAX_BROADCAST_CHANNELS} channels"
            )));
        }
        // Every name is checked before anything is published.
        let channels = names
            .iter()
            .map(|c| parse_channel(c))
            .collect::<Result<Vec<_>, _>>()?;
        let mut results = Vec::with_capacity(channels.len());
        for channel in &channels {
            let mut result = match self.publish_one(caller, channel, data).await {
                Ok(answer) => answer,
                Err(e) => serde_json::json!({ "error": { "code": e.code, "message": e.message } }),
            };
            result["channel"] = serde_json::Value::from(channel.as_str());
            results.push(result);
        }
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "results": results }).to_string(),
        ))
    }

    async fn history(
        &self,
        caller: Caller<'_>,
        query: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let mut channel = None;
        let mut limit = DEFAULT_HISTORY_LIMIT;
        for (name, value) in query_pairs(query)? {
            match name {
                "channel" => channel = Some(parse_channel(&value)?),
                "limit" => {
                    limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_HISTORY_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::bad_request("`limit` must be an integer from 1 to 1000")
                        })?;
                }
                _ => {}
            }
        }
        let channel =
            channel.ok_or_else(|| ApiError::bad_request("missing query parameter `channel`"))?;
        let (position, frames) = self
            .gateway
            .history(caller, &channel, limit)
            .await
            .map_err(ApiError::from_core)?;
        // The fields of the `history` op's `ok`, without `op` and `id`.
        let ok = PositionOk::new(0, Some((&position.epoch, position.seq)), None)
            .with_messages(&channel, frames.iter().map(|f| f.as_str()));
        let mut value: serde_json::Value =
            serde_json::from_str(&ok).map_err(|_| ApiError::internal())?;
        if let Some(fields) = value.as_object_mut() {
            fields.remove("op");
            fields.remove("id");
        }
        Ok(json(StatusCode::OK, value.to_string()))
    }

    /// `GET /api/presence?channel=C`: the fields of the `presence` op's
    /// `ok` (`count`, and `users` unless there are too many).
    async fn presence(
        &self,
        caller: Caller<'_>,
        query: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let mut channel = None;
        for (name, value) in query_pairs(query)? {
            if name == "channel" {
                channel = Some(parse_channel(&value)?);
            }
        }
        let channel =
            channel.ok_or_else(|| ApiError::bad_request("missing query parameter `channel`"))?;
        let listing = self
            .gateway
            .presence(caller, &channel)
            .await
            .map_err(ApiError::from_core)?;
        let mut value = serde_json::json!({ "count": listing.count });
        if let Some(users) = listing.users {
            value["users"] = users.into();
        }
        Ok(json(StatusCode::OK, value.to_string()))
    }
}

/// The name and percent-decoded value of each pair of a query string.
fn query_pairs(query: Option<&str>) -> Result<Vec<(&str, String)>, ApiError> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            percent_decode(value).map(|v| (name, v)).ok_or_else(|| {
                ApiError::bad_request("the query is not valid percent-encoded UTF-8")
            })
        })
        .collect()
}

impl Api {
    /// `disconnect`, `revoke`, `unsubscribe`: the sessions of one user on
    /// every replica, with the total of sessions told.
    async fn manage(
        &self,
        endpoint: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let body = self.body(req).await?;
        let user = body.string("user")?;
        if user.is_empty() {
            return Err(ApiError::bad_request("`user` must not be empty"));
        }
        let op = match endpoint {
            "disconnect" => Manage::Disconnect { user: user.clone() },
            "revoke" => Manage::Revoke {
                user: user.clone(),
                at: crate::auth::mint::unix_now(),
            },
            _ => Manage::Unsubscribe {
                user: user.clone(),
                channel: parse_channel(&body.string("channel")?)?.as_str().to_owned(),
            },
        };
        let (done, answered, asked) = self.gateway.manage(op).await.map_err(ApiError::from_core)?;
        let sessions = match done {
            Managed::Sessions(n) => n,
            Managed::Channels(_) => 0,
        };
        tracing::info!(endpoint, %user, sessions, answered, asked, "api: sessions of a user told");
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "sessions": sessions }).to_string(),
        ))
    }

    /// `channels`: the channels with subscribers by name prefix, counted
    /// over every replica.
    async fn channels(&self, query: Option<&str>) -> Result<Response<Body>, ApiError> {
        let mut prefix = String::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            if let Some(("prefix", value)) = pair.split_once('=') {
                prefix = percent_decode(value).ok_or_else(|| {
                    ApiError::bad_request("the query is not valid percent-encoded UTF-8")
                })?;
            }
        }
        let (done, _, _) = self
            .gateway
            .manage(Manage::Channels { prefix })
            .await
            .map_err(ApiError::from_core)?;
        let channels: Vec<serde_json::Value> = match done {
            Managed::Channels(all) => all
                .into_iter()
                .map(|(c, n)| serde_json::json!({ "channel": c, "subscribers": n }))
                .collect(),
            Managed::Sessions(_) => Vec::new(),
        };
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "channels": channels }).to_string(),
        ))
    }
}

/// A request body's fields, each checked by name so that an answer says
/// which one is missing or of the wrong type.
struct Fields(HashMap<String, Box<RawValue>>);

impl Fields {
    fn raw(&self, name: &str) -> Result<&RawValue, ApiError> {
        self.0
            .get(name)
            .map(AsRef::as_ref)
            .ok_or_else(|| ApiError::bad_request(&format!("missing field `{name}`")))
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, name: &str, what: &str) -> Result<T, ApiError> {
        serde_json::from_str(self.raw(name)?.get())
            .map_err(|_| ApiError::bad_request(&format!("`{name}` must be {what}")))
    }

    fn string(&self, name: &str) -> Result<String, ApiError> {
        self.get(name, "a string")
    }

    fn optional<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(_) => self.get(name, "a string").map(Some),
        }
    }
}

fn parse_channel(name: &str) -> Result<ChannelName, ApiError> {
    ChannelName::parse(name).map_err(|e| ApiError::bad_request(&format!("channel {name:?}: {e}")))
}

/// serde's message, which names the field and the line and column but
/// never quotes the body.
fn json_error(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Data => format!("the body must be a JSON object: {e}"),
        _ => format!("the body is not JSON: {e}"),
    }
}

/// `%XX` decoding (no `+` for space: channel names may hold `+`); `None`
/// when the result is not UTF-8 or an escape is broken.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits: `from_str_radix` alone would take `+a`.
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A JSON answer that no cache keeps (the dev token page uses it too).
pub(crate) fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

impl ApiError {
    fn from_core(e: CoreError) -> Self {
        match e {
            CoreError::Forbidden(_) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", &e.to_string())
            }
            CoreError::NoHistory | CoreError::NoPresence => {
                Self::new(StatusCode::NOT_FOUND, "not_found", &e.to_string())
            }
            CoreError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            ),
            CoreError::TooManySubscriptions => Self::internal(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_decode_without_plus_as_space() {
        assert_eq!(
            percent_decode("chat%3Alobby").as_deref(),
            Some("chat:lobby")
        );
        assert_eq!(percent_decode("a+b").as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
        assert_eq!(percent_decode("%+a"), None, "a sign is not a hex digit");
    }
}
