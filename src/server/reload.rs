//! Reloads while the server runs, by signal or by a watched file change:
//! policies (then live subscriptions are re-checked), the certificate pair
//! (new handshakes only) and the verification keys. Each is read, checked,
//! then swapped; on any error the old value stays and the log says why.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Shared, watch};
use crate::auth::KeyError;
use crate::gateway::Gateway;
use crate::policy::{self, PolicyError};
use crate::tls;

pub(super) fn reload_policies(
    gateway: &Gateway,
    trigger: &'static str,
) -> Result<usize, PolicyError> {
    match gateway.policies.reload() {
        Ok(rules) => {
            gateway.metrics.policy_reloads.inc("ok");
            info!(trigger, rules, "policies reloaded");
            Ok(rules)
        }
        Err(e) => {
            gateway.metrics.policy_reloads.inc("failed");
            warn!(trigger, error = %e, "policy reload refused; keeping the previous policies");
            Err(e)
        }
    }
}

pub(super) async fn reload_keys(
    gateway: &Gateway,
    trigger: &'static str,
) -> Result<Option<usize>, KeyError> {
    let result = gateway.verifier.reload().await;
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
pub(super) async fn watch_keys(shared: Arc<Shared>, stop: CancellationToken) {
    let auth = &shared.gateway.config.auth;
    if auth.jwks_url.is_some() {
        let every = Duration::from_millis(auth.jwks_refresh_interval_ms);
        let retry = Duration::from_millis(auth.jwks_min_refresh_interval_ms);
        shared
            .gateway
            .verifier
            .refresh_periodically(every, retry, stop)
            .await;
        return;
    }
    let Some(path) = &auth.jwks_file else {
        return;
    };
    let services = &shared.gateway;
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
pub(super) async fn watch_policies(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = Duration::from_millis(shared.gateway.config.policy.watch_interval_ms);
    let dir = shared.gateway.policies.dir();
    watch::on_change(
        interval,
        stop,
        || policy::fingerprint(dir),
        || {
            let _ = reload_policies(&shared.gateway, "file change");
            std::future::ready(())
        },
    )
    .await;
}

/// Polls the certificate and key files and reloads when either changes.
pub(super) async fn watch_certs(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = Duration::from_millis(shared.gateway.config.tls.watch_interval_ms);
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

pub(super) fn reload_certs(shared: &Shared, trigger: &'static str) -> Result<(), tls::TlsError> {
    let metrics = &shared.gateway.metrics;
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
