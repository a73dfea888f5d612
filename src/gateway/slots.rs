//! What a connection holds while it lives: its [`ConnSlot`] (the
//! connection permit, its place in its address's count and in
//! `wsgate_connections_open`) and, once upgraded, its user's
//! [`UserSlot`]. Both are released on drop, so no path can forget one.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tokio::sync::OwnedSemaphorePermit;

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

/// The line through which the core reaches one session: a few control
/// messages and a wake-up. Every session holds one for its whole life
/// and almost never receives anything, so it is a small queue beside a
/// `Notify` (about 100 bytes), not a channel (whose first block of slots
/// cost 0.9 KiB a session).
#[derive(Debug, Default)]
pub struct Mailbox {
    queue: std::sync::Mutex<std::collections::VecDeque<Control>>,
    ready: tokio::sync::Notify,
}

impl Mailbox {
    /// Queues `control`; false when the session has not taken the last
    /// few yet.
    pub fn post(&self, control: Control) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.len() >= CONTROL_DEPTH {
            return false;
        }
        queue.push_back(control);
        drop(queue);
        // A permit is kept when the session is not waiting: no lost wake-up.
        self.ready.notify_one();
        true
    }

    /// The next control message, waiting for one.
    pub async fn recv(&self) -> Control {
        loop {
            if let Some(control) = self
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front()
            {
                return control;
            }
            self.ready.notified().await;
        }
    }
}

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
    pub fn take(gateway: &Arc<Gateway>, user: &str) -> Option<(Self, Arc<Mailbox>)> {
        let max = gateway.config.limits.max_connections_per_user;
        let mut users = gateway.users.lock().unwrap_or_else(PoisonError::into_inner);
        let sessions = users.entry(user.to_owned()).or_default();
        if sessions.len() >= max {
            return None;
        }
        let session = gateway.next_session();
        let mailbox = Arc::new(Mailbox::default());
        sessions.push((session, Arc::clone(&mailbox)));
        Some((
            Self {
                gateway: Arc::clone(gateway),
                user: user.to_owned(),
                session,
            },
            mailbox,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_mailbox_keeps_a_few_and_wakes_its_session() {
        let mailbox = Arc::new(Mailbox::default());
        // Posted before anyone waits: the wake-up is kept.
        assert!(mailbox.post(Control::Disconnect));
        assert!(matches!(mailbox.recv().await, Control::Disconnect));
        for _ in 0..CONTROL_DEPTH {
            assert!(mailbox.post(Control::Disconnect));
        }
        assert!(!mailbox.post(Control::Disconnect), "full");
        for _ in 0..CONTROL_DEPTH {
            mailbox.recv().await;
        }
        // Waiting first, then posted from another task.
        let waiter = tokio::spawn({
            let mailbox = Arc::clone(&mailbox);
            async move { mailbox.recv().await }
        });
        tokio::task::yield_now().await;
        assert!(mailbox.post(Control::Disconnect));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        assert!(matches!(got, Ok(Ok(Control::Disconnect))));
    }
}
