//! Accepting connections: the accept loop with back-off on errors such as
//! EMFILE, the one HTTP/1.1 builder (timer, header limits) that both
//! listeners use, and the plain-HTTP admin listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::{Shared, routes};
use crate::api::Api;
use crate::config::Config;
use tokio_rustls::TlsAcceptor;

/// hyper's HTTP/1.1 server with every limit from the config: the header
/// read deadline, the header count and size, and the read buffer.
pub(super) fn http1_builder(cfg: &Config) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout())
        .max_headers(cfg.server.max_headers)
        .max_header_size(cfg.server.max_header_bytes)
        .max_buf_size(cfg.http_buf_size());
    builder
}

/// Accepts the next connection on `listener`, backing off on errors such
/// as EMFILE/ENFILE/ENOBUFS until resources free up; `None` once `stop`
/// is cancelled.
pub(super) async fn accept(
    listener: &TcpListener,
    backoff: &mut Backoff,
    stop: &CancellationToken,
    which: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(conn) => {
                backoff.reset();
                return Some(conn);
            }
            Err(e) => {
                let delay = backoff.next();
                warn!(listener = which, error = %e, delay_ms = delay.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// `accept` once a connection slot of `permits` is free: past the cap,
/// new connections wait in the kernel's backlog.
async fn accept_within(
    permits: &Arc<Semaphore>,
    listener: &TcpListener,
    backoff: &mut Backoff,
    stop: &CancellationToken,
    which: &'static str,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        () = stop.cancelled() => return None,
        p = Arc::clone(permits).acquire_owned() => p.ok()?,
    };
    let (tcp, peer) = accept(listener, backoff, stop, which).await?;
    Some((permit, tcp, peer))
}

/// Most admin connections served at once: scrapers and probes, not users.
const ADMIN_CONNECTIONS: usize = 16;

/// The plain-HTTP admin listener: `/metrics`, `/healthz`, `/readyz`. It
/// keeps answering through the drain, so the drain can be watched.
pub(super) async fn serve_admin(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let mut backoff = Backoff::default();
    while let Some((permit, tcp, peer)) =
        accept_within(&permits, &listener, &mut backoff, &stop, "admin").await
    {
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let builder = http1_builder(&shared.gateway.config);
                let service = {
                    let shared = Arc::clone(&shared);
                    service_fn(move |req| {
                        let response = routes::handle_admin(&req, &shared);
                        std::future::ready(Ok::<_, std::convert::Infallible>(response))
                    })
                };
                let conn = builder.serve_connection(TokioIo::new(tcp), service);
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    debug!(error = %e, "admin connection ended with an error");
                }
            }
            .instrument(info_span!("admin", %peer)),
        );
    }
}

/// The HTTP API listener (`[api]`): TLS with the gateway's certificate
/// (or plain HTTP where the operator asked), at most `api.max_connections`
/// at once, each under the handshake deadline and the HTTP limits.
pub(super) async fn serve_api(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    api: Arc<Api>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(shared.gateway.config.api.max_connections));
    let mut backoff = Backoff::default();
    while let Some((permit, tcp, peer)) =
        accept_within(&permits, &listener, &mut backoff, &stop, "api").await
    {
        let (api, shared, stop, acceptor) = (
            Arc::clone(&api),
            Arc::clone(&shared),
            stop.clone(),
            acceptor.clone(),
        );
        tokio::spawn(
            async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                let builder = http1_builder(&shared.gateway.config);
                let service = service_fn(move |req| {
                    let api = Arc::clone(&api);
                    async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
                });
                let result = match acceptor {
                    Some(acceptor) => {
                        let deadline = shared.gateway.config.handshake_timeout();
                        match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                serve_until(
                                    builder.serve_connection(TokioIo::new(tls), service),
                                    &stop,
                                )
                                .await
                            }
                            Ok(Err(e)) => {
                                debug!(error = %e, "api tls handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!("api tls handshake timed out");
                                return;
                            }
                        }
                    }
                    None => {
                        serve_until(builder.serve_connection(TokioIo::new(tcp), service), &stop)
                            .await
                    }
                };
                if let Err(e) = result {
                    debug!(error = %e, "api connection ended with an error");
                }
            }
            .instrument(info_span!("api", %peer)),
        );
    }
}

/// Serves one HTTP/1.1 connection until it ends or `stop`, then lets the
/// request in flight finish.
async fn serve_until<C>(conn: C, stop: &CancellationToken) -> hyper::Result<()>
where
    C: std::future::Future<Output = hyper::Result<()>> + GracefulConnection,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// A hyper connection that can be asked to finish gracefully.
trait GracefulConnection {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        http1::Connection::graceful_shutdown(self);
    }
}

/// Accept-error back-off: 5 ms doubling to 1 s.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub(super) fn next(&mut self) -> Duration {
        let next = self.current.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.current = Some(next);
        next
    }

    pub(super) fn reset(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        assert_eq!(b.next(), Duration::from_millis(5));
        assert_eq!(b.next(), Duration::from_millis(10));
        for _ in 0..20 {
            b.next();
        }
        assert_eq!(b.next(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(5));
    }
}
