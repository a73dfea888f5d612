//! HTTP routes: `/ws` (the upgrade), `/healthz`, `/readyz`, the demo page
//! and its assets, `/dev/token` under `serve --dev` only, and 404 for
//! everything else. An upgraded request hands its stream to a session task.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{Instrument, debug, info_span};

use super::{ConnSlot, Shared, web};
use crate::admission::Admit;
use crate::broker::Broker;
use crate::proxy;
use crate::session::{self, SessionContext};
use crate::upgrade::{self, Refusal};

type Body = Full<Bytes>;

pub(super) async fn handle(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    permit: Arc<ConnSlot>,
    refusal: Option<Refusal>,
) -> Response<Body> {
    let draining = shared.draining.load(Ordering::Relaxed);
    let overloaded = refusal == Some(Refusal::Overloaded);
    let mut res = match req.uri().path() {
        "/ws" => match refusal {
            Some(refusal) => refuse(refusal, shared),
            None => return upgrade_ws(req, shared, permit, draining).await,
        },
        // Liveness stays up under overload and while draining.
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readiness(shared, draining, overloaded),
        "/metrics" if shared.admin_metrics => refuse(Refusal::NotFound, shared),
        "/metrics" => metrics(shared),
        "/dev/token" if shared.dev_endpoints => {
            web::dev_token(&shared.services.config, req.uri().query())
        }
        path => web::asset(path).unwrap_or_else(|| refuse(Refusal::NotFound, shared)),
    };
    if refusal.is_some() {
        // An overflow slot or a limited address gets one answer, not a
        // keep-alive session.
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

async fn upgrade_ws(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    permit: Arc<ConnSlot>,
    draining: bool,
) -> Response<Body> {
    let services = &shared.services;
    let admission = &shared.admission;
    let now = Instant::now();
    // Behind a trusted TLS-terminating proxy, the client is named in the
    // forwarding header; it is counted by that address for as long as its
    // session lasts.
    let mut client = permit.client.ip();
    let mut forwarded_slot = None;
    if shared.forwarding_from(client)
        && let Some(ip) = proxy::forwarded_client(req.headers(), shared.forwarded, &shared.trusted)
    {
        client = ip;
        match admission.admit(ip, now) {
            Admit::Yes(guard) => forwarded_slot = Some(guard),
            Admit::Refuse(_, limited) | Admit::Drop(limited) => {
                return refuse(Refusal::Admission(limited), shared);
            }
        }
    }
    let address = forwarded_slot
        .as_ref()
        .map_or(permit.address.key(), |g| g.key());
    let failed = |refusal: Refusal| {
        if let (Some(address), Some(_)) = (address, refusal.auth_failure()) {
            admission.auth_failed(address, Instant::now());
        }
        refuse(refusal, shared)
    };
    // The cheap checks first, synchronously; then, before any signature
    // work, an address that keeps failing is refused; only the token's
    // verification may wait (for a JWKS refresh on an unknown kid).
    let pending = match upgrade::check(&req, &shared.upgrade, draining) {
        Ok(pending) => pending,
        Err(refusal) => return failed(refusal),
    };
    if let Some(address) = address
        && let Err(limited) = admission.check_auth(address, now)
    {
        return refuse(Refusal::Admission(limited), shared);
    }
    let accepted = match pending.verify(&services.verifier).await {
        Ok(accepted) => accepted,
        Err(refusal) => return failed(refusal),
    };
    let Some(slot) = UserSlot::take(shared, &accepted.identity.user) else {
        return refuse(Refusal::UserLimit, shared);
    };
    services.metrics.upgrades.inc("ok");
    let response = accepted.response();
    let ctx = SessionContext {
        number: shared.next_session.fetch_add(1, Ordering::Relaxed),
        id: session::new_session_id(),
        identity: accepted.identity,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = info_span!("session", session = %ctx.id, user = %ctx.identity.user, %client);
    let limits = session::ws_limits(&services.config);
    let stop = shared.shutdown.child_token();
    let hurry = shared.hurry.child_token();
    let services = Arc::clone(services);
    shared.sessions.spawn(
        async move {
            // Both live as long as the session: the caps count sessions too.
            let _permit = permit;
            let _slot = slot;
            let _forwarded_slot = forwarded_slot;
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            debug!("session open");
            let io = TokioIo::new(upgraded);
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(limits)).await;
            session::run(ws, &services, ctx, stop, hurry).await;
        }
        .instrument(span),
    );
    response
}

/// One of a user's connection slots, released on drop.
struct UserSlot {
    shared: Arc<Shared>,
    user: String,
}

impl UserSlot {
    fn take(shared: &Arc<Shared>, user: &str) -> Option<Self> {
        let max = shared.services.config.limits.max_connections_per_user;
        let mut users = shared
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = users.entry(user.to_owned()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Self {
            shared: Arc::clone(shared),
            user: user.to_owned(),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut users = self
            .shared
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = users.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                users.remove(&self.user);
            }
        }
    }
}

fn refuse(refusal: Refusal, shared: &Shared) -> Response<Body> {
    let metrics = &shared.services.metrics;
    if refusal != Refusal::NotFound {
        metrics.upgrades.inc(refusal.label());
    }
    if let Some(reason) = refusal.auth_failure() {
        metrics.auth_failures.inc(reason);
    }
    debug!(
        status = refusal.status().as_u16(),
        reason = refusal.label(),
        auth = refusal.auth_failure().unwrap_or(""),
        "request refused"
    );
    refusal.response(&shared.upgrade)
}

/// The admin listener: health and metrics over plain HTTP, nothing else.
pub(super) fn handle_admin(req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    let draining = shared.draining.load(Ordering::Relaxed);
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readiness(shared, draining, false),
        "/metrics" => metrics(shared),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/readyz`, on either listener: whether new clients should be sent here.
fn readiness(shared: &Shared, draining: bool, overloaded: bool) -> Response<Body> {
    if draining {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if overloaded {
        text(StatusCode::SERVICE_UNAVAILABLE, "full\n")
    } else if !shared.services.broker.ready() {
        text(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n")
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

/// The Prometheus text exposition.
fn metrics(shared: &Shared) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(shared.services.metrics.render())));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A health answer. Any origin may read it: it says nothing private, and
/// browser clients on other origins probe `/readyz` to tell a refused
/// upgrade from a gateway that is down.
fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
