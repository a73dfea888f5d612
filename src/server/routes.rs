//! HTTP routes: `/ws` (the upgrade), `/healthz`, `/readyz`, the demo page
//! and its assets, `/dev/token` under `serve --dev` only, and 404 for
//! everything else. An upgraded request hands its stream to a session task.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{Instrument, debug, info, info_span};

use super::{Shared, web};
use crate::gateway::slots::ConnSlot;
use crate::session::{self, SessionContext};
use crate::upgrade::{self, Accepted, Refusal};

type Body = Full<Bytes>;

pub(super) async fn handle(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    conn: Arc<ConnSlot>,
    refusal: Option<Refusal>,
) -> Response<Body> {
    let overloaded = refusal == Some(Refusal::Overloaded);
    let client = conn.client.ip();
    let path = req.uri().path();
    // An upgrade asked of any other route is refused and the connection
    // closed: never answered as a plain GET on a kept-alive connection.
    let elsewhere = path != "/ws" && req.headers().contains_key(header::UPGRADE);
    let mut res = match path {
        _ if elsewhere => refuse(Refusal::NotFound, shared, client),
        "/ws" => match refusal {
            Some(refusal) => refuse(refusal, shared, client),
            None => return upgrade_ws(req, shared, conn).await,
        },
        // Liveness stays up under overload and while draining.
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readiness(shared, overloaded),
        "/metrics" if shared.public_metrics => metrics(shared),
        "/metrics" => refuse(Refusal::NotFound, shared, client),
        "/dev/token" if dev_token_for(shared.dev_endpoints, conn.client.ip()) => {
            web::dev_token(&shared.gateway.config, req.uri().query())
        }
        path => web::asset(path).unwrap_or_else(|| refuse(Refusal::NotFound, shared, client)),
    };
    if refusal.is_some() || elsewhere {
        // An overflow slot or a limited address gets one answer, not a
        // keep-alive session.
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Whether `/dev/token` answers a peer at `ip`.
fn dev_token_for(to: super::DevEndpoints, ip: std::net::IpAddr) -> bool {
    match to {
        super::DevEndpoints::Off => false,
        super::DevEndpoints::Loopback => crate::config::canonical_ip(ip).is_loopback(),
        super::DevEndpoints::Anyone => true,
    }
}

/// Decides the upgrade, answers `101`, and spawns the session, which
/// holds the connection's slot, the user's slot and any forwarded-address
/// slot for as long as it lives.
async fn upgrade_ws(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    conn: Arc<ConnSlot>,
) -> Response<Body> {
    let gateway = &shared.gateway;
    let accepted = match upgrade::decide(&req, gateway, &shared.upgrade, &conn).await {
        Ok(accepted) => accepted,
        Err(refusal) => return refuse(refusal, shared, conn.client.ip()),
    };
    gateway.metrics.upgrades.inc("ok");
    let response = accepted.response();
    let Accepted {
        identity,
        client,
        user_slot,
        control,
        forwarded_slot,
        ..
    } = accepted;
    let progress = session::Progress::new(std::time::Duration::from_millis(
        gateway.config.websocket.message_timeout_ms,
    ));
    let ctx = SessionContext {
        client,
        progress: Some(std::sync::Arc::clone(&progress)),
        number: user_slot.session,
        id: session::new_session_id(),
        identity,
        control: Some(control),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = info_span!("session", session = %ctx.id, user = %ctx.identity.user, %client);
    let stop = shared.shutdown.child_token();
    let hurry = shared.hurry.child_token();
    let gateway = Arc::clone(gateway);
    shared.sessions.spawn(
        async move {
            // All live as long as the session: the caps count sessions too.
            let _slots = (conn, user_slot, forwarded_slot);
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            debug!("session open");
            let io = session::Timed::new(TokioIo::new(upgraded), progress);
            session::run(io, &gateway, ctx, stop, hurry).await;
        }
        .instrument(span),
    );
    response
}

fn refuse(refusal: Refusal, shared: &Shared, client: std::net::IpAddr) -> Response<Body> {
    let gateway = &shared.gateway;
    let metrics = &gateway.metrics;
    if refusal != Refusal::NotFound {
        metrics.upgrades.inc(refusal.label());
    }
    if let Some(reason) = refusal.auth_failure() {
        metrics.auth_failures.inc(reason);
    }
    // Visible at the default level; a flood is held back per address.
    if refusal != Refusal::NotFound
        && let Some(held) = gateway.log_gate.admit_now(client)
    {
        info!(
            status = refusal.status().as_u16(),
            reason = refusal.label(),
            auth = refusal.auth_failure().unwrap_or(""),
            held,
            "request refused"
        );
    }
    refusal.response(&shared.upgrade)
}

/// The admin listener: health and metrics over plain HTTP, nothing else.
pub(super) fn handle_admin(req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readiness(shared, false),
        "/metrics" => metrics(shared),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/readyz`, on either listener: whether new clients should be sent here.
fn readiness(shared: &Shared, overloaded: bool) -> Response<Body> {
    if shared.gateway.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if overloaded {
        text(StatusCode::SERVICE_UNAVAILABLE, "full\n")
    } else if !shared.gateway.broker_ready() {
        text(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n")
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

/// The Prometheus text exposition.
fn metrics(shared: &Shared) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(shared.gateway.metrics.render())));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::DevEndpoints;

    #[test]
    fn the_dev_token_answers_loopback_peers_only_unless_told() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for peer in ["127.0.0.1", "127.0.0.9", "::1", "::ffff:127.0.0.1"] {
            assert!(dev_token_for(DevEndpoints::Loopback, ip(peer)), "{peer}");
            assert!(!dev_token_for(DevEndpoints::Off, ip(peer)), "{peer}");
        }
        for peer in ["203.0.113.7", "10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1"] {
            assert!(!dev_token_for(DevEndpoints::Loopback, ip(peer)), "{peer}");
            assert!(dev_token_for(DevEndpoints::Anyone, ip(peer)), "{peer}");
        }
    }
}
