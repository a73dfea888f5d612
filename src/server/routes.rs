//! HTTP routes: `/ws` (the upgrade), `/healthz`, `/readyz`, and 404 for
//! everything else. An upgraded request hands its stream to a session task.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{Instrument, debug, info_span};

use super::Shared;
use crate::session::{self, SessionContext};
use crate::upgrade::{self, Refusal};

type Body = Full<Bytes>;

pub(super) fn handle(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    permit: Arc<OwnedSemaphorePermit>,
    overloaded: bool,
) -> Response<Body> {
    let draining = shared.draining.load(Ordering::Relaxed);
    match req.uri().path() {
        "/ws" if overloaded => return refuse(Refusal::Overloaded, shared),
        "/ws" => {}
        // Liveness stays up under overload and while draining.
        "/healthz" => return text(StatusCode::OK, "ok\n"),
        "/readyz" if draining => return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" if overloaded => return text(StatusCode::SERVICE_UNAVAILABLE, "full\n"),
        "/readyz" => return text(StatusCode::OK, "ready\n"),
        _ => return refuse(Refusal::NotFound, shared),
    }
    let accepted = match upgrade::authorize(&req, &shared.upgrade, &shared.verifier, draining) {
        Ok(accepted) => accepted,
        Err(refusal) => return refuse(refusal, shared),
    };
    let response = accepted.response();
    let ctx = SessionContext {
        id: session::new_session_id(),
        identity: accepted.identity,
        leeway: Duration::from_secs(shared.config.auth.leeway_s),
        ws: shared.config.websocket.clone(),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = info_span!("session", session = %ctx.id, user = %ctx.identity.user);
    let limits = session::ws_limits(&shared.config.websocket);
    let stop = shared.shutdown.child_token();
    shared.sessions.spawn(
        async move {
            // The permit lives as long as the session: the cap counts sessions too.
            let _permit = permit;
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            debug!("session open");
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(limits),
            )
            .await;
            session::run(ws, ctx, stop).await;
        }
        .instrument(span),
    );
    response
}

fn refuse(refusal: Refusal, shared: &Shared) -> Response<Body> {
    debug!(
        status = refusal.status().as_u16(),
        reason = refusal.label(),
        "request refused"
    );
    refusal.response(&shared.upgrade)
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
