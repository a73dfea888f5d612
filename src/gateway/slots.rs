//! What a connection holds while it lives: its [`ConnSlot`] (the
//! connection permit, its place in its address's count and in
//! `wsgate_connections_open`) and, once upgraded, its user's
//! [`UserSlot`]. Both are released on drop, so no path can forget one.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{Control, Gateway};
use crate::admission::AddressGuard;
use crate::metrics::Metrics;

/// A held connection, released when the connection ends (after the
/// session, for an upgraded one).
#[derive(Debug)]
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    /// The client's address: the TCP peer's, or the one its PROXY header named.
    pub client: SocketAddr,
    pub address: AddressGuard,
    metrics: Arc<Metrics>,
}

impl ConnSlot {
    pub fn new(
        permit: OwnedSemaphorePermit,
        client: SocketAddr,
        address: AddressGuard,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
            client,
            address,
            metrics,
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Control messages a session takes from the core (sent by the HTTP API).
const CONTROL_DEPTH: usize = 4;

/// One of a user's connection slots (`limits.max_connections_per_user`),
/// through which the core reaches the session: to disconnect it, or end
/// one of its subscriptions.
#[derive(Debug)]
pub struct UserSlot {
    gateway: Arc<Gateway>,
    user: String,
    /// The session's process-unique number.
    pub session: u64,
}

impl UserSlot {
    /// Takes a slot for `user` and numbers its session; `None` when they
    /// hold them all. The receiver is the session's end of its control
    /// channel.
    pub fn take(gateway: &Arc<Gateway>, user: &str) -> Option<(Self, mpsc::Receiver<Control>)> {
        let max = gateway.config.limits.max_connections_per_user;
        let mut users = gateway.users.lock().unwrap_or_else(PoisonError::into_inner);
        let sessions = users.entry(user.to_owned()).or_default();
        if sessions.len() >= max {
            return None;
        }
        let session = gateway.next_session();
        let (tx, rx) = mpsc::channel(CONTROL_DEPTH);
        sessions.push((session, tx));
        Some((
            Self {
                gateway: Arc::clone(gateway),
                user: user.to_owned(),
                session,
            },
            rx,
        ))
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut users = self
            .gateway
            .users
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(sessions) = users.get_mut(&self.user) {
            sessions.retain(|(n, _)| *n != self.session);
            if sessions.is_empty() {
                users.remove(&self.user);
            }
        }
    }
}
