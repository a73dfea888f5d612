//! The listener: connection permits, the accept loop with back-off, the TLS
//! handshake under its deadline, hyper's HTTP/1.1 with its limits, and
//! shutdown. Routes live in `routes`, the TLS config in [`tls`].
//!
//! hyper stops tracking a connection once it is upgraded, so sessions are
//! tracked here, in a `TaskTracker`, and each holds its connection permit.

mod routes;
pub mod tls;
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

use crate::auth::{KeyError, Verifier};
use crate::config::{Config, ConfigError};
use crate::hub::Hub;
use crate::policy::{self, PolicyError, PolicyStore};
use crate::session::Services;
use crate::upgrade::UpgradePolicy;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("policies: {0}")]
    Policy(#[from] PolicyError),
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
    /// Open sessions per user, for `limits.max_connections_per_user`.
    pub users: Mutex<HashMap<String, usize>>,
    /// Source of process-unique session numbers.
    pub next_session: AtomicU64,
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

/// A bound, not yet running gateway.
pub struct Server {
    listener: TcpListener,
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
        let acceptor = TlsAcceptor::from(tls::server_config(&config.tls)?);
        let policies = PolicyStore::load(&config.policy.dir)?;
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            upgrade: UpgradePolicy::from_config(&config),
            services: Arc::new(Services {
                metrics,
                verifier,
                policies,
                hub: Hub::default(),
                config,
            }),
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

    /// Serves until `stop` is cancelled; then drains: `/readyz` and new
    /// upgrades answer 503 for `drain_grace_ms`, after which the listener
    /// closes and sessions are closed with 1001 spread over
    /// `drain_window_ms`, then awaited up to `shutdown_timeout_ms` more.
    /// [`ServerHandle::hurry`] skips the grace and the window.
    pub async fn run(self, stop: CancellationToken) {
        let Self {
            listener,
            acceptor,
            shared,
        } = self;
        let connections = TaskTracker::new();
        tokio::spawn(watch_policies(Arc::clone(&shared), shared.shutdown.clone()));
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
            let accepted = tokio::select! {
                () = closing.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => {
                    backoff.reset();
                    conn
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: wait for resources to free up.
                    let delay = backoff.next();
                    warn!(error = %e, delay_ms = delay.as_millis() as u64, "accept failed; backing off");
                    tokio::select! {
                        () = closing.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            let span = info_span!("conn", %peer);
            connections.spawn(
                serve_connection(
                    tcp,
                    acceptor.clone(),
                    Arc::clone(&shared),
                    Arc::new(ConnSlot::new(permit, Arc::clone(&shared.services))),
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
        info!("stopped");
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
    let (Some(path), interval_ms) = (&auth.jwks_file, auth.jwks_watch_interval_ms) else {
        return;
    };
    if interval_ms == 0 {
        return;
    }
    let mut loaded = file_fingerprint(path);
    // As for policies: act once two polls in a row see the same new state,
    // so a file caught half-written is not loaded.
    let mut settling = None;
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = file_fingerprint(path);
        if now == loaded {
            settling = None;
        } else if settling.as_ref() == Some(&now) {
            loaded = now;
            settling = None;
            let _ = reload_keys(&shared.services, "file change").await;
        } else {
            settling = Some(now);
        }
    }
}

/// Size, modification time and inode of the file `path` leads to,
/// following symlinks: a Kubernetes Secret update swaps a symlink to a new
/// file, which changes the inode even when size and time look alike.
fn file_fingerprint(path: &std::path::Path) -> Option<(u64, Option<std::time::SystemTime>, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.len(), meta.modified().ok(), inode))
}

/// Polls the policy directory and reloads when a file changes.
async fn watch_policies(shared: Arc<Shared>, stop: CancellationToken) {
    let interval_ms = shared.services.config.policy.watch_interval_ms;
    if interval_ms == 0 {
        return;
    }
    let store = &shared.services.policies;
    let mut loaded = policy::fingerprint(store.dir());
    // A change is acted on once two polls in a row see the same new state,
    // so a file caught half-written is not loaded (and cannot drop
    // subscriptions that the finished file allows).
    let mut settling = None;
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = policy::fingerprint(store.dir());
        if now == loaded {
            settling = None;
        } else if settling.as_ref() == Some(&now) {
            loaded = now;
            settling = None;
            let _ = reload_policies(&shared.services, "file change");
        } else {
            settling = Some(now);
        }
    }
}

/// TLS handshake, then HTTP/1.1 until the connection ends or upgrades.
async fn serve_connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    permit: Arc<ConnSlot>,
    overloaded: bool,
) {
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "set_nodelay failed");
    }
    let metrics = &shared.services.metrics;
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
                let response = routes::handle(req, &shared, permit, overloaded).await;
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

/// A held connection: its permit and its place in
/// `wsgate_connections_open`, both released when the connection ends
/// (after the session, for an upgraded one).
pub(crate) struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    services: Arc<Services>,
}

impl ConnSlot {
    fn new(permit: OwnedSemaphorePermit, services: Arc<Services>) -> Self {
        services
            .metrics
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
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
