//! Fetching a JWK set over HTTPS (`auth.jwks_url`) and deciding when a
//! fetch may happen.
//!
//! [`JwksClient`] is one `GET` over hyper's HTTP/1.1 client connection on
//! tokio-rustls, with the whole exchange (DNS, TCP, TLS, headers, body)
//! under one deadline and the body under [`MAX_JWKS_BYTES`]. Redirects are
//! not followed. Trust is the webpki root set plus an optional PEM CA file.
//!
//! [`RefreshGate`] keeps token floods away from the identity provider: one
//! fetch in flight at a time, which concurrent callers join, and at most
//! one fetch per minimum interval caused by tokens with an unknown `kid`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONNECTION, CONTENT_LENGTH, HOST, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::keys::MAX_JWKS_BYTES;
use crate::config::{AuthConfig, ConfigError, JwksUrl};

/// Largest response head accepted from the JWKS server, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Why one fetch failed. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}; only 200 is accepted (redirects are not followed)")]
    Status(StatusCode),
    #[error("body larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("body: {0}")]
    Body(String),
    #[error("no complete answer within {0} ms")]
    Timeout(u128),
}

/// Fetches one JWKS URL.
pub struct JwksClient {
    pub url: JwksUrl,
    tls: TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for JwksClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksClient")
            .field("url", &self.url.text)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl JwksClient {
    /// A client for `auth.jwks_url`, trusting the webpki roots plus
    /// `auth.jwks_ca_file` when set.
    ///
    /// # Errors
    /// No or a bad URL, or an unreadable CA file.
    pub fn from_config(auth: &AuthConfig) -> Result<Self, ConfigError> {
        let text = auth
            .jwks_url
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid("auth.jwks_url is not set".into()))?;
        let url = JwksUrl::parse(text)
            .map_err(|e| ConfigError::Invalid(format!("auth.jwks_url: {e}")))?;
        let tls = TlsConnector::from(crate::tls::jwks_client_config(
            auth.jwks_ca_file.as_deref(),
        )?);
        Ok(Self {
            url,
            tls,
            timeout: Duration::from_millis(auth.jwks_timeout_ms),
        })
    }

    /// The deadline of one whole fetch.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET`s the URL; returns the body of a `200` answer.
    ///
    /// # Errors
    /// Any failure to connect, a status other than 200, a body over
    /// [`MAX_JWKS_BYTES`], or the deadline passing first.
    pub async fn fetch(&self) -> Result<Bytes, FetchError> {
        tokio::time::timeout(self.timeout, self.get())
            .await
            .map_err(|_| FetchError::Timeout(self.timeout.as_millis()))?
    }

    async fn get(&self) -> Result<Bytes, FetchError> {
        let url = &self.url;
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(FetchError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| FetchError::Tls(std::io::Error::other(e)))?;
        let tls = self.tls.connect(name, tcp).await.map_err(FetchError::Tls)?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await?;
        // The connection task ends with this fetch, also when the deadline
        // drops this future half way.
        let _conn = AbortOnDrop(tokio::spawn(conn));
        let request = Request::get(url.target.as_str())
            .header(HOST, url.authority.as_str())
            .header(ACCEPT, "application/jwk-set+json, application/json")
            .header(USER_AGENT, concat!("wsgate/", env!("CARGO_PKG_VERSION")))
            .header(CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| FetchError::Body(e.to_string()))?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(response.status()));
        }
        let declared = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            return Err(FetchError::TooLarge);
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    FetchError::TooLarge
                } else {
                    FetchError::Body(e.to_string())
                }
            })?;
        Ok(body.to_bytes())
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What started a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A token named a `kid` the set lacks: throttled.
    UnknownKid,
    /// The refresh interval, or SIGHUP: not throttled, still shared.
    Scheduled,
}

/// The result of one fetch as every waiter sees it: the number of keys
/// now in force, or the failure's text (logged once, by the fetcher).
pub type Outcome = Result<usize, super::KeyError>;

/// What [`RefreshGate::admit`] decided.
pub enum Admission {
    /// A fetch is already under way: wait for its outcome.
    Join(watch::Receiver<Option<Outcome>>),
    /// Fetch now, then report through the ticket.
    Lead(Ticket),
    /// An unknown-kid fetch happened less than the minimum interval ago.
    Throttled,
}

#[derive(Debug, Default)]
struct GateState {
    in_flight: Option<watch::Receiver<Option<Outcome>>>,
    last_kid_fetch: Option<Instant>,
}

/// One fetch in flight at a time; unknown-kid fetches at most once per
/// `min_interval`. The lock is held only to decide, never across a fetch.
#[derive(Debug)]
pub struct RefreshGate {
    min_interval: Duration,
    state: Arc<Mutex<GateState>>,
}

impl RefreshGate {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            state: Arc::default(),
        }
    }

    /// Decides whether a refresh for `cause` fetches, joins the fetch in
    /// flight, or is refused.
    pub fn admit(&self, cause: Cause) -> Admission {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = &state.in_flight {
            return Admission::Join(rx.clone());
        }
        if cause == Cause::UnknownKid {
            let now = Instant::now();
            if state
                .last_kid_fetch
                .is_some_and(|last| now.duration_since(last) < self.min_interval)
            {
                return Admission::Throttled;
            }
            state.last_kid_fetch = Some(now);
        }
        let (tx, rx) = watch::channel(None);
        state.in_flight = Some(rx);
        Admission::Lead(Ticket {
            tx: Some(tx),
            state: Arc::clone(&self.state),
        })
    }
}

/// The right and duty to report one fetch's outcome. Dropped without
/// [`Ticket::finish`] (the fetch task panicked or was cancelled), it
/// reports a failure, so no waiter and no later refresh is stuck.
pub struct Ticket {
    tx: Option<watch::Sender<Option<Outcome>>>,
    state: Arc<Mutex<GateState>>,
}

impl Ticket {
    /// A receiver for the outcome, for the leader to wait on like the others.
    pub fn subscribe(&self) -> Option<watch::Receiver<Option<Outcome>>> {
        self.tx.as_ref().map(watch::Sender::subscribe)
    }

    /// Ends the fetch: later refreshes may start one anew, and every
    /// waiter gets `outcome`.
    pub fn finish(mut self, outcome: Outcome) {
        self.report(outcome);
    }

    fn report(&mut self, outcome: Outcome) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .in_flight = None;
        // The lock is released before waking anyone.
        tx.send_replace(Some(outcome));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.report(Err(super::KeyError::Fetch {
            url: String::new(),
            message: "the fetch was abandoned".into(),
        }));
    }
}

/// Waits for a fetch's outcome, at most `limit`.
pub async fn wait(mut rx: watch::Receiver<Option<Outcome>>, limit: Duration) -> Option<Outcome> {
    let waited = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
    match waited {
        Ok(Ok(outcome)) => outcome.clone(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_fetch_in_flight_and_unknown_kids_throttled() {
        let gate = RefreshGate::new(Duration::from_secs(30));
        let Admission::Lead(ticket) = gate.admit(Cause::UnknownKid) else {
            panic!("the first refresh leads");
        };
        // While it runs, everyone joins it, whatever the cause.
        let joined: Vec<_> = (0..3)
            .map(|i| {
                let cause = if i == 0 {
                    Cause::Scheduled
                } else {
                    Cause::UnknownKid
                };
                match gate.admit(cause) {
                    Admission::Join(rx) => rx,
                    _ => panic!("must join the fetch in flight"),
                }
            })
            .collect();
        ticket.finish(Ok(2));
        for rx in joined {
            assert_eq!(wait(rx, Duration::from_secs(1)).await, Some(Ok(2)));
        }
        assert!(matches!(
            gate.admit(Cause::UnknownKid),
            Admission::Throttled
        ));
        // Scheduled refreshes are not throttled, and do not reset the clock.
        let Admission::Lead(ticket) = gate.admit(Cause::Scheduled) else {
            panic!("scheduled refreshes lead");
        };
        drop(ticket);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(matches!(
            gate.admit(Cause::UnknownKid),
            Admission::Throttled
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(gate.admit(Cause::UnknownKid), Admission::Lead(_)));
    }

    #[tokio::test]
    async fn an_abandoned_fetch_reports_failure_and_frees_the_gate() {
        let gate = RefreshGate::new(Duration::from_secs(30));
        let Admission::Lead(ticket) = gate.admit(Cause::Scheduled) else {
            panic!("leads");
        };
        let Admission::Join(rx) = gate.admit(Cause::Scheduled) else {
            panic!("joins");
        };
        drop(ticket);
        assert!(matches!(
            wait(rx, Duration::from_secs(1)).await,
            Some(Err(_))
        ));
        assert!(matches!(gate.admit(Cause::Scheduled), Admission::Lead(_)));
    }
}
