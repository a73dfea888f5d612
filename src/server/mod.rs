//! The listener: connection permits, the accept loop with back-off, the TLS
//! handshake under its deadline, hyper's HTTP/1.1 with its limits, and
//! shutdown. Routes live in `routes`, the TLS config in [`tls`].
//!
//! hyper stops tracking a connection once it is upgraded, so sessions are
//! tracked here, in a `TaskTracker`, and each holds its connection permit.

mod routes;
pub mod tls;
mod watch;
mod web;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admission::{AddressGuard, Admission, Admit};
use crate::auth::{KeyError, Verifier};
use crate::broker::{AnyBroker, RedisWorker};
use crate::config::{Config, ConfigError};
use crate::hub::Hub;
use crate::policy::{self, PolicyError, PolicyStore};
use crate::proxy::{self, ForwardedHeader, ProxyError, Trusted};
use crate::session::Services;
use crate::upgrade::{Refusal, UpgradePolicy};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("policies: {0}")]
    Policy(#[from] PolicyError),
    #[error("cluster.redis_url: {0}")]
    Redis(String),
    #[error("verification keys: {0}")]
    Keys(#[from] KeyError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a connection task shares with the others.
#[derive(Debug)]
pub(crate) struct Shared {
    /// What sessions use: config, verifier, policies, hub.
    pub services: Arc<Services>,
    pub upgrade: UpgradePolicy,
    /// The served certificate, replaced by reloads.
    pub certs: Arc<tls::CertStore>,
    /// Per-address and global admission limits.
    pub admission: Arc<Admission>,
    /// Proxies whose PROXY or forwarding header is believed.
    pub trusted: Trusted,
    /// The forwarding header read from trusted proxies.
    pub forwarded: ForwardedHeader,
    /// Open sessions per user, for `limits.max_connections_per_user`.
    pub users: Mutex<HashMap<String, usize>>,
    /// Source of process-unique session numbers.
    pub next_session: AtomicU64,
    /// `/metrics` is served on the admin listener, not the main one.
    pub admin_metrics: bool,
    /// `/dev/token` is routed (only under `serve --dev`).
    pub dev_endpoints: bool,
    /// Set when shutdown begins: `/readyz` and new upgrades answer 503.
    pub draining: AtomicBool,
    /// Cancelled when sessions must close (1001), each at its place in
    /// the drain window.
    pub shutdown: CancellationToken,
    /// Cancelled by a second signal: skip the grace and the window.
    pub hurry: CancellationToken,
    /// Upgraded sessions, which hyper no longer tracks.
    pub sessions: TaskTracker,
}

impl Shared {
    /// Whether requests from `ip` name their client in a forwarding header.
    pub fn forwarding_from(&self, ip: std::net::IpAddr) -> bool {
        self.forwarded != ForwardedHeader::None && self.trusted.contains(ip)
    }
}

/// A bound, not yet running gateway.
pub struct Server {
    listener: TcpListener,
    admin: Option<TcpListener>,
    broker_worker: Option<RedisWorker>,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
}

impl Server {
    /// Validates the config, loads keys (fetching a JWKS URL, under its
    /// timeout) and certificates, and binds the listener (port 0 picks a
    /// free port; see [`Server::local_addr`]).
    ///
    /// # Errors
    /// An invalid config, unreadable keys or certificates, a JWKS URL that
    /// gives no usable key, or a failed bind.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let metrics = crate::metrics::Metrics::default();
        let verifier = Verifier::with_metrics(&config, Arc::clone(&metrics.keys))?;
        // Fail fast: a gateway without keys could only refuse everyone.
        verifier.prime().await?;
        let certs = tls::CertStore::load(&config.tls)?;
        let acceptor = TlsAcceptor::from(tls::server_config(&config.tls, Arc::clone(&certs))?);
        let policies = PolicyStore::load(&config.policy.dir)?;
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let admin = match config.server.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        let hub = Arc::new(Hub::default());
        // The URL may carry a password: the error names only what is wrong.
        let (broker, broker_worker) = AnyBroker::new(&config.cluster, Arc::clone(&hub))
            .map_err(|e| StartError::Redis(e.to_string()))?;
        let shared = Arc::new(Shared {
            upgrade: UpgradePolicy::from_config(&config),
            admission: Arc::new(Admission::new(&config.admission)),
            trusted: Trusted::parse(&config.server.trusted_proxies)
                .map_err(ConfigError::Invalid)?,
            forwarded: config.server.forwarded_header,
            certs,
            services: Arc::new(Services {
                metrics,
                verifier,
                policies,
                hub,
                broker,
                config,
            }),
            admin_metrics: admin.is_some(),
            users: Mutex::default(),
            next_session: AtomicU64::new(1),
            dev_endpoints: false,
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            hurry: CancellationToken::new(),
            sessions: TaskTracker::new(),
        });
        Ok(Self {
            listener,
            admin,
            broker_worker,
            acceptor,
            shared,
        })
    }

    /// Routes `GET /dev/token`, which mints tokens for anyone who asks:
    /// for `serve --dev` only, never in production.
    #[must_use]
    pub fn with_dev_endpoints(mut self) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.dev_endpoints = true;
        }
        self
    }

    /// A handle for reloading policies while the server runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The address actually bound.
    ///
    /// # Errors
    /// The OS could not report it.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin listener's address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `stop` is cancelled; then drains: `/readyz` and new
    /// upgrades answer 503 for `drain_grace_ms`, after which the listener
    /// closes and sessions are closed with 1001 spread over
    /// `drain_window_ms`, then awaited up to `shutdown_timeout_ms` more.
    /// [`ServerHandle::hurry`] skips the grace and the window.
    pub async fn run(self, stop: CancellationToken) {
        let Self {
            listener,
            admin,
            broker_worker,
            acceptor,
            shared,
        } = self;
        let broker_stop = CancellationToken::new();
        if let Some(worker) = broker_worker {
            tokio::spawn(worker.run(Arc::clone(&shared.services), broker_stop.clone()));
        }
        let connections = TaskTracker::new();
        let admin_stop = CancellationToken::new();
        if let Some(admin) = admin {
            tokio::spawn(serve_admin(admin, Arc::clone(&shared), admin_stop.clone()));
        }
        tokio::spawn(watch_policies(Arc::clone(&shared), shared.shutdown.clone()));
        tokio::spawn(sweep_admission(Arc::clone(&shared)));
        tokio::spawn(watch_certs(Arc::clone(&shared), shared.shutdown.clone()));
        tokio::spawn(watch_keys(Arc::clone(&shared), shared.shutdown.clone()));
        let permits = Arc::new(Semaphore::new(
            shared.services.config.server.max_connections,
        ));
        let overflow = Arc::new(Semaphore::new(
            shared.services.config.server.overflow_connections,
        ));
        let mut backoff = Backoff::default();
        // Stop accepting only after the drain grace, so a load balancer sees
        // `/readyz` fail and new upgrades get 503 before the port closes.
        let closing = CancellationToken::new();
        tokio::spawn({
            let (shared, closing) = (Arc::clone(&shared), closing.clone());
            async move {
                stop.cancelled().await;
                shared.draining.store(true, Ordering::SeqCst);
                info!(
                    grace_ms = shared.services.config.server.drain_grace_ms,
                    "draining"
                );
                let grace = Duration::from_millis(shared.services.config.server.drain_grace_ms);
                tokio::select! {
                    () = tokio::time::sleep(grace) => {}
                    () = shared.hurry.cancelled() => {}
                }
                closing.cancel();
            }
        });

        loop {
            // The permit comes first, so a full gateway stops accepting
            // instead of piling up handshakes. Past the cap, a small overflow
            // pool still answers 503 rather than leaving clients hanging.
            let (permit, overloaded) = match Arc::clone(&permits).try_acquire_owned() {
                Ok(p) => (p, false),
                Err(_) => match Arc::clone(&overflow).try_acquire_owned() {
                    Ok(p) => (p, true),
                    Err(_) => tokio::select! {
                        () = closing.cancelled() => break,
                        p = Arc::clone(&permits).acquire_owned() => match p {
                            Ok(p) => (p, false),
                            Err(_) => break,
                        },
                    },
                },
            };
            let Some((tcp, peer)) = accept(&listener, &mut backoff, &closing, "wss").await else {
                break;
            };
            let span = info_span!("conn", %peer, client = tracing::field::Empty);
            connections.spawn(
                serve_connection(
                    tcp,
                    peer,
                    acceptor.clone(),
                    Arc::clone(&shared),
                    permit,
                    overloaded,
                )
                .instrument(span),
            );
        }

        drop(listener);
        shared.draining.store(true, Ordering::SeqCst);
        shared.shutdown.cancel();
        connections.close();
        shared.sessions.close();
        let server = &shared.services.config.server;
        let deadline = Duration::from_millis(server.drain_window_ms + server.shutdown_timeout_ms);
        let wait = async {
            connections.wait().await;
            shared.sessions.wait().await;
        };
        if tokio::time::timeout(deadline, wait).await.is_err() {
            warn!(
                sessions = shared.sessions.len(),
                connections = connections.len(),
                "shutdown deadline reached; dropping the rest"
            );
        }
        admin_stop.cancel();
        broker_stop.cancel();
        info!("stopped");
    }
}

/// Accepts the next connection on `listener`, backing off on errors such
/// as EMFILE/ENFILE/ENOBUFS until resources free up; `None` once `stop`
/// is cancelled.
async fn accept(
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

/// Most admin connections served at once: scrapers and probes, not users.
const ADMIN_CONNECTIONS: usize = 16;

/// The plain-HTTP admin listener: `/metrics`, `/healthz`, `/readyz`. It
/// keeps answering through the drain, so the drain can be watched.
async fn serve_admin(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let mut backoff = Backoff::default();
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let Some((tcp, peer)) = accept(&listener, &mut backoff, &stop, "admin").await else {
            return;
        };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let cfg = &shared.services.config;
                let mut builder = http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(cfg.header_read_timeout())
                    .max_headers(cfg.server.max_headers)
                    .max_buf_size(cfg.http_buf_size());
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

/// Controls a running server from outside (signals, tests).
#[derive(Debug, Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Re-reads the policy directory; on success live subscriptions are
    /// re-checked. On error the old policies stay in force.
    ///
    /// # Errors
    /// The file, line and reason of the first problem.
    pub fn reload_policies(&self) -> Result<usize, PolicyError> {
        reload_policies(&self.shared.services, "signal")
    }

    /// Re-reads the certificate and key files; new handshakes use the new
    /// pair, live connections keep theirs. On error the old pair serves on.
    ///
    /// # Errors
    /// Unreadable or malformed files, or a key that does not match.
    pub fn reload_certs(&self) -> Result<(), tls::TlsError> {
        reload_certs(&self.shared, "signal")
    }

    /// The leaf certificate new handshakes get (DER).
    pub fn current_cert(&self) -> Option<Vec<u8>> {
        self.shared.certs.leaf().map(|c| c.to_vec())
    }

    /// Reloads the verification keys: re-reads `auth.jwks_file`, or fetches
    /// `auth.jwks_url` now (bounded by `auth.jwks_timeout_ms`). Returns the
    /// number of keys in force, or `None` when the key comes from
    /// `public_key_file` or `hmac_secret_file` (read at start only). On
    /// error the keys in force stay.
    ///
    /// # Errors
    /// Why the new key set was refused.
    pub async fn reload_keys(&self) -> Result<Option<usize>, KeyError> {
        reload_keys(&self.shared.services, "signal").await
    }

    /// Skips what is left of the drain grace and window: every session
    /// closes with 1001 now (a second SIGTERM or Ctrl-C).
    pub fn hurry(&self) {
        self.shared.hurry.cancel();
    }
}

fn reload_policies(services: &Services, trigger: &'static str) -> Result<usize, PolicyError> {
    match services.policies.reload() {
        Ok(rules) => {
            services.metrics.policy_reloads.inc("ok");
            info!(trigger, rules, "policies reloaded");
            Ok(rules)
        }
        Err(e) => {
            services.metrics.policy_reloads.inc("failed");
            warn!(trigger, error = %e, "policy reload refused; keeping the previous policies");
            Err(e)
        }
    }
}

async fn reload_keys(
    services: &Services,
    trigger: &'static str,
) -> Result<Option<usize>, KeyError> {
    let result = services.verifier.reload().await;
    match &result {
        Ok(Some(keys)) => info!(trigger, keys, "verification keys reloaded"),
        Ok(None) => debug!(
            trigger,
            "verification key comes from the config; it is read at start only"
        ),
        // A fetch logs its own failure; a file's is logged here.
        Err(KeyError::Fetch { .. }) => {}
        Err(e) => warn!(trigger, error = %e, "key reload refused; the keys in force stay"),
    }
    result
}

/// Keeps the verification keys current: polls `auth.jwks_file` and reloads
/// it when it changes, or fetches `auth.jwks_url` on its schedule.
async fn watch_keys(shared: Arc<Shared>, stop: CancellationToken) {
    let auth = &shared.services.config.auth;
    if auth.jwks_url.is_some() {
        let every = Duration::from_millis(auth.jwks_refresh_interval_ms);
        let retry = Duration::from_millis(auth.jwks_min_refresh_interval_ms);
        shared
            .services
            .verifier
            .refresh_periodically(every, retry, stop)
            .await;
        return;
    }
    let Some(path) = &auth.jwks_file else {
        return;
    };
    let services = &shared.services;
    watch::on_change(
        Duration::from_millis(auth.jwks_watch_interval_ms),
        stop,
        || watch::files(&[path]),
        || async {
            let _ = reload_keys(services, "file change").await;
        },
    )
    .await;
}

/// Polls the policy directory and reloads when a file changes.
async fn watch_policies(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = Duration::from_millis(shared.services.config.policy.watch_interval_ms);
    let dir = shared.services.policies.dir();
    watch::on_change(
        interval,
        stop,
        || policy::fingerprint(dir),
        || {
            let _ = reload_policies(&shared.services, "file change");
            std::future::ready(())
        },
    )
    .await;
}

/// Polls the certificate and key files and reloads when either changes.
async fn watch_certs(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = Duration::from_millis(shared.services.config.tls.watch_interval_ms);
    let files = shared.certs.files();
    watch::on_change(
        interval,
        stop,
        || watch::files(&files),
        || {
            let _ = reload_certs(&shared, "file change");
            std::future::ready(())
        },
    )
    .await;
}

fn reload_certs(shared: &Shared, trigger: &'static str) -> Result<(), tls::TlsError> {
    let metrics = &shared.services.metrics;
    match shared.certs.reload() {
        Ok(()) => {
            metrics.cert_reloads.inc("ok");
            info!(trigger, "certificate reloaded; new handshakes use it");
            Ok(())
        }
        Err(e) => {
            metrics.cert_reloads.inc("failed");
            warn!(trigger, error = %e, "certificate reload refused; keeping the previous certificate");
            Err(e)
        }
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
    if !shared.trusted.contains(peer.ip()) {
        return Err(ProxyError::Untrusted);
    }
    let deadline = Duration::from_millis(shared.services.config.server.proxy_header_timeout_ms);
    let header = tokio::time::timeout(deadline, proxy::read_header(tcp))
        .await
        .map_err(|_| ProxyError::Timeout)??;
    let metrics = &shared.services.metrics;
    metrics
        .proxy_headers
        .inc(if header.is_some() { "ok" } else { "local" });
    Ok(header)
}

/// Forgets idle addresses now and then, so the admission table holds only
/// recent activity.
async fn sweep_admission(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        shared.admission.sweep(std::time::Instant::now());
    }
}

/// Admission, the TLS handshake, then HTTP/1.1 until the connection ends
/// or upgrades.
async fn serve_connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    overloaded: bool,
) {
    let metrics = &shared.services.metrics;
    let server = &shared.services.config.server;
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
                debug!(error = %e, "connection refused: PROXY header");
                return;
            }
        }
    }
    // Before the handshake, which is the costly part of a connection. A
    // trusted proxy that names its clients in a forwarding header is
    // counted globally here, and each client by address at its request.
    let now = std::time::Instant::now();
    let admitted = if shared.forwarding_from(client.ip()) {
        shared.admission.admit_global(now)
    } else {
        shared.admission.admit(client.ip(), now)
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
        Arc::clone(&shared.services),
    ));
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "set_nodelay failed");
    }
    let started = std::time::Instant::now();
    let handshake = tokio::time::timeout(
        shared.services.config.handshake_timeout(),
        acceptor.accept(tcp),
    );
    let stream = match handshake.await {
        Ok(Ok(stream)) => {
            metrics.handshake.observe(started.elapsed());
            stream
        }
        Ok(Err(e)) => {
            debug!(error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            debug!("tls handshake timed out");
            return;
        }
    };
    let cfg = &shared.services.config;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout())
        .max_headers(cfg.server.max_headers)
        .max_header_size(cfg.server.max_header_bytes)
        .max_buf_size(cfg.http_buf_size())
        .keep_alive(true);
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

/// A held connection: its permit, its place in its address's count and
/// in `wsgate_connections_open`, all released when the connection ends
/// (after the session, for an upgraded one).
pub(crate) struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    /// The client's address: the TCP peer's, or the one its PROXY header named.
    pub client: SocketAddr,
    pub address: AddressGuard,
    services: Arc<Services>,
}

impl ConnSlot {
    fn new(
        permit: OwnedSemaphorePermit,
        client: SocketAddr,
        address: AddressGuard,
        services: Arc<Services>,
    ) -> Self {
        services
            .metrics
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
            client,
            address,
            services,
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.services
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accept-error back-off: 5 ms doubling to 1 s.
#[derive(Debug, Default)]
struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn next(&mut self) -> Duration {
        let next = self.current.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.current = Some(next);
        next
    }

    fn reset(&mut self) {
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
