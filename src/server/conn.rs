//! One connection's path up to HTTP: the PROXY header from a trusted
//! balancer, admission by address before the costly part, the TLS
//! handshake under its deadline, then hyper's HTTP/1.1 until the
//! connection ends or upgrades.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::listen::http1_builder;
use super::{Shared, routes};
use crate::admission::Admit;
use crate::gateway::slots::ConnSlot;
use crate::proxy::{self, ProxyError};
use crate::upgrade::Refusal;

/// Admission, the TLS handshake, then HTTP/1.1 until the connection ends
/// or upgrades.
pub(super) async fn serve_connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    overloaded: bool,
) {
    let metrics = &shared.gateway.metrics;
    let server = &shared.gateway.config.server;
    let mut client = peer;
    if server.proxy_protocol {
        match read_proxy_header(&mut tcp, peer, &shared).await {
            Ok(Some(addr)) => {
                client = addr;
                tracing::Span::current().record("client", tracing::field::display(client));
            }
            Ok(None) => {}
            Err(e) => {
                metrics.proxy_headers.inc(e.label());
                if let Some(held) = shared.gateway.log_gate.admit_now(peer.ip()) {
                    info!(error = %e, held, "connection refused: PROXY header");
                }
                return;
            }
        }
    }
    // Before the handshake, which is the costly part of a connection. A
    // trusted proxy that names its clients in a forwarding header is
    // counted globally here, and each client by address at its request.
    let now = std::time::Instant::now();
    let admitted = if shared.upgrade.forwarding_from(client.ip()) {
        shared.gateway.admission.admit_global(now)
    } else {
        shared.gateway.admission.admit(client.ip(), now)
    };
    let (address, mut refusal) = match admitted {
        Admit::Yes(guard) => (guard, None),
        Admit::Refuse(guard, limited) => {
            debug!(
                limit = Refusal::Admission(limited).label(),
                "admission limit"
            );
            (guard, Some(Refusal::Admission(limited)))
        }
        Admit::Drop(_) => {
            metrics.admission_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if overloaded {
        refusal = Some(Refusal::Overloaded);
    }
    let permit = Arc::new(ConnSlot::new(
        permit,
        client,
        address,
        Arc::clone(&shared.gateway.metrics),
    ));
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "set_nodelay failed");
    }
    let started = std::time::Instant::now();
    let handshake = tokio::time::timeout(
        shared.gateway.config.handshake_timeout(),
        acceptor.accept(tcp),
    );
    let stream = match handshake.await {
        Ok(Ok(stream)) => {
            metrics.handshake.observe(started.elapsed());
            stream
        }
        Ok(Err(e)) => {
            if let Some(held) = shared.gateway.log_gate.admit_now(client.ip()) {
                info!(error = %e, held, "tls handshake failed");
            }
            return;
        }
        Err(_) => {
            if let Some(held) = shared.gateway.log_gate.admit_now(client.ip()) {
                info!(held, "tls handshake timed out");
            }
            return;
        }
    };
    let mut builder = http1_builder(&shared.gateway.config);
    builder.keep_alive(true);
    let service = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| {
            let (shared, permit) = (Arc::clone(&shared), Arc::clone(&permit));
            async move {
                let response = routes::handle(req, &shared, permit, refusal).await;
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Header timeouts, 431s and resets land here; client faults.
        debug!(error = %e, "http connection ended with an error");
    }
}

/// Reads the PROXY header of a connection from a trusted proxy, under
/// its deadline: the client's address, or `None` for the proxy's own
/// (`LOCAL`) connections.
async fn read_proxy_header(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Result<Option<SocketAddr>, ProxyError> {
    if !shared.upgrade.trusted.contains(peer.ip()) {
        return Err(ProxyError::Untrusted);
    }
    let deadline = Duration::from_millis(shared.gateway.config.server.proxy_header_timeout_ms);
    let header = tokio::time::timeout(deadline, proxy::read_header(tcp))
        .await
        .map_err(|_| ProxyError::Timeout)??;
    let metrics = &shared.gateway.metrics;
    metrics
        .proxy_headers
        .inc(if header.is_some() { "ok" } else { "local" });
    Ok(header)
}

/// Upkeep: forgets idle addresses now and then, so the admission table holds only
/// recent activity, and drops history past its age.
pub(super) async fn sweep(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        shared.gateway.admission.sweep(std::time::Instant::now());
        shared.gateway.sweep();
    }
}
