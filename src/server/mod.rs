//! The server: binding the listeners, running them, and the drain. The
//! accept loop and the one HTTP/1.1 builder are in `listen`, one
//! connection's path (PROXY header, admission, TLS, HTTP) in `conn`, the
//! route table and the spawn of sessions in `routes`, reloads and their
//! file watchers in `reload`.
//!
//! hyper stops tracking a connection once it is upgraded, so sessions are
//! tracked here, in a `TaskTracker`, and each holds its connection slot.

mod conn;
mod listen;
mod reload;
mod routes;
mod watch;
mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::auth::{KeyError, Verifier};
use crate::broker::RedisWorker;
use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;
use crate::history::HistoryRules;
use crate::metrics::Metrics;
use crate::policy::{PolicyError, PolicyStore};
use crate::presence::PresenceRules;
use crate::tls;
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
/// Who `/dev/token` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevEndpoints {
    /// Not routed (404).
    Off,
    /// Peers on a loopback address; others get 404.
    Loopback,
    /// Anyone who reaches the port (`--dev-token-for-anyone`).
    Anyone,
}

#[derive(Debug)]
struct Shared {
    /// The core: config, metrics, verifier, policies, hub, broker, slots.
    gateway: Arc<Gateway>,
    /// The `/ws` rules and the trusted proxies.
    upgrade: UpgradePolicy,
    /// The served certificate, replaced by reloads.
    certs: Arc<tls::CertStore>,
    /// `/metrics` is served on the main listener too
    /// (`server.public_metrics`, and no admin listener).
    public_metrics: bool,
    /// `/dev/token` is routed (only under `serve --dev`): to loopback
    /// peers only, or to anyone when the operator said so.
    dev_endpoints: DevEndpoints,
    /// Cancelled when sessions must close (1001), each at its place in
    /// the drain window.
    shutdown: CancellationToken,
    /// Cancelled by a second signal: skip the grace and the window.
    hurry: CancellationToken,
    /// Upgraded sessions, which hyper no longer tracks.
    sessions: TaskTracker,
}

/// A bound, not yet running gateway.
pub struct Server {
    listener: TcpListener,
    admin: Option<TcpListener>,
    /// The HTTP API listener (`[api] listen`).
    api: Option<TcpListener>,
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
        let metrics = Arc::new(Metrics::default());
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
        let api = match config.api.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        let admin = match config.server.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        let upgrade = UpgradePolicy::from_config(&config)?;
        let config_public_metrics = config.server.public_metrics;
        let history = HistoryRules::compile(&config.history, config.websocket.outbox_frames)
            .map_err(ConfigError::Invalid)?;
        let presence = PresenceRules::compile(&config.presence).map_err(ConfigError::Invalid)?;
        // The URL may carry a password: the error names only what is wrong.
        let (gateway, broker_worker) =
            Gateway::new(config, metrics, verifier, policies, (history, presence))
                .map_err(|e| StartError::Redis(e.to_string()))?;
        let shared = Arc::new(Shared {
            gateway: Arc::new(gateway),
            upgrade,
            certs,
            public_metrics: config_public_metrics && admin.is_none(),
            dev_endpoints: DevEndpoints::Off,
            shutdown: CancellationToken::new(),
            hurry: CancellationToken::new(),
            sessions: TaskTracker::new(),
        });
        Ok(Self {
            listener,
            admin,
            api,
            broker_worker,
            acceptor,
            shared,
        })
    }

    /// Routes `GET /dev/token`, which mints tokens with any role for
    /// whoever asks: for `serve --dev` only, never in production. It
    /// answers loopback peers only, unless `to` says anyone.
    #[must_use]
    pub fn with_dev_endpoints(mut self, to: DevEndpoints) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.dev_endpoints = to;
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

    /// The HTTP API listener's address, when one is configured.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|l| l.local_addr().ok())
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
            api,
            broker_worker,
            acceptor,
            shared,
        } = self;
        let broker_stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&shared.gateway).serve_control(broker_stop.clone()));
        tokio::spawn(Arc::clone(&shared.gateway).serve_presence(broker_stop.clone()));
        if let Some(worker) = broker_worker {
            tokio::spawn(worker.run(broker_stop.clone()));
        }
        let connections = TaskTracker::new();
        let admin_stop = CancellationToken::new();
        if let Some(listener) = api {
            let tls = (!shared.gateway.config.api.plain_http).then(|| acceptor.clone());
            tokio::spawn(listen::serve_api(
                listener,
                tls,
                Arc::new(crate::api::Api::new(Arc::clone(&shared.gateway))),
                Arc::clone(&shared),
                admin_stop.clone(),
            ));
        }
        if let Some(admin) = admin {
            tokio::spawn(listen::serve_admin(
                admin,
                Arc::clone(&shared),
                admin_stop.clone(),
            ));
        }
        tokio::spawn(reload::watch_policies(
            Arc::clone(&shared),
            shared.shutdown.clone(),
        ));
        tokio::spawn(conn::sweep(Arc::clone(&shared)));
        tokio::spawn(reload::watch_certs(
            Arc::clone(&shared),
            shared.shutdown.clone(),
        ));
        tokio::spawn(reload::watch_keys(
            Arc::clone(&shared),
            shared.shutdown.clone(),
        ));
        let permits = Arc::new(Semaphore::new(shared.gateway.config.server.max_connections));
        let overflow = Arc::new(Semaphore::new(
            shared.gateway.config.server.overflow_connections,
        ));
        let mut backoff = listen::Backoff::default();
        // Stop accepting only after the drain grace, so a load balancer sees
        // `/readyz` fail and new upgrades get 503 before the port closes.
        let closing = CancellationToken::new();
        tokio::spawn({
            let (shared, closing) = (Arc::clone(&shared), closing.clone());
            async move {
                stop.cancelled().await;
                shared.gateway.start_draining();
                info!(
                    grace_ms = shared.gateway.config.server.drain_grace_ms,
                    "draining"
                );
                let grace = Duration::from_millis(shared.gateway.config.server.drain_grace_ms);
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
            let Some((tcp, peer)) = listen::accept(&listener, &mut backoff, &closing, "wss").await
            else {
                break;
            };
            let span = info_span!("conn", %peer, client = tracing::field::Empty);
            connections.spawn(
                conn::serve_connection(
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
        shared.gateway.start_draining();
        shared.shutdown.cancel();
        connections.close();
        shared.sessions.close();
        let server = &shared.gateway.config.server;
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
        reload::reload_policies(&self.shared.gateway, "signal")
    }

    /// Re-reads the certificate and key files; new handshakes use the new
    /// pair, live connections keep theirs. On error the old pair serves on.
    ///
    /// # Errors
    /// Unreadable or malformed files, or a key that does not match.
    pub fn reload_certs(&self) -> Result<(), tls::TlsError> {
        reload::reload_certs(&self.shared, "signal")
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
        reload::reload_keys(&self.shared.gateway, "signal").await
    }

    /// Skips what is left of the drain grace and window: every session
    /// closes with 1001 now (a second SIGTERM or Ctrl-C).
    pub fn hurry(&self) {
        self.shared.hurry.cancel();
    }
}
