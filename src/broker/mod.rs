//! The broker seam: how a publication reaches subscribers on every
//! replica. [`AnyBroker::Local`] (the default) hands it straight to this
//! process's [`Hub`]. [`RedisBroker`] (with `[cluster] redis_url`) sends it
//! through Redis ([`redis`]), where one atomic script per publication takes
//! the channel's next `seq`, appends the message to the channel's bounded
//! history stream and publishes it; every replica subscribes in Redis only
//! to the channels its own sessions subscribe to and fans each message out
//! locally. Redis is the one authority for `seq`, so it is consecutive per
//! channel across replicas.
//!
//! The broker keeps no count of subscribers: the gateway core asks it to
//! [`AnyBroker::subscribe`] a channel for every joiner (all wait for the
//! same confirmation) and to [`AnyBroker::release`] it when the [`Hub`]
//! reports the last local subscriber gone.
//!
//! While the subscription connection is down the gateway is not ready,
//! publishes fail with `internal`, and on reconnection every channel that
//! still has local subscribers is subscribed again and its subscribers are
//! told that they may have missed messages (an `error` naming the channel).

pub(crate) mod redis;
mod scripts;

use std::sync::Arc;

use serde_json::value::RawValue;

use self::redis::ReadFor;
pub use self::redis::{RedisBroker, RedisWorker};
use crate::channel::ChannelName;
use crate::config::ClusterConfig;
use crate::history::{HistoryRules, Position, Read};
use crate::hub::{Fanout, Hub, Published};
use crate::metrics::Metrics;
use crate::presence::{Listing, Presence};
use crate::protocol::MessageTemplate;

/// Why the broker could not do what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("the message broker is unavailable")]
    Unavailable,
}

/// What a first look at an idempotency key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// The key is new and now reserved: publish, then record the answer.
    New,
    /// Another request with the key is publishing right now.
    Pending,
    /// A request with the key was answered this: answer it again.
    Done(String),
}

/// How long an idempotency key is remembered (protocol.md §7).
pub const IDEMPOTENCY_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// Idempotency keys kept in process; past it the expired are dropped,
/// and when none is, new keys are not deduplicated (and logged).
const MAX_LOCAL_KEYS: usize = 100_000;

/// The in-process record of idempotency keys.
#[derive(Debug, Default)]
pub struct LocalKeys(
    std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Option<String>)>>,
);

impl LocalKeys {
    fn reserve(&self, key: &str) -> Reserved {
        let now = std::time::Instant::now();
        let mut keys = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, answer)) = keys.get(key)
            && now.duration_since(*at) < IDEMPOTENCY_TTL
        {
            return answer.clone().map_or(Reserved::Pending, Reserved::Done);
        }
        if keys.len() >= MAX_LOCAL_KEYS {
            keys.retain(|_, (at, _)| now.duration_since(*at) < IDEMPOTENCY_TTL);
        }
        if keys.len() >= MAX_LOCAL_KEYS {
            tracing::warn!("idempotency keys are full; this publication is not deduplicated");
            return Reserved::New;
        }
        keys.insert(key.to_owned(), (now, None));
        Reserved::New
    }

    fn complete(&self, key: &str, answer: Option<&str>) {
        let mut keys = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match answer {
            Some(answer) => {
                if let Some(entry) = keys.get_mut(key) {
                    entry.1 = Some(answer.to_owned());
                }
            }
            None => {
                keys.remove(key);
            }
        }
    }
}

/// How publications travel between sessions (and replicas): the broker
/// the server runs with, chosen by `[cluster] redis_url`.
#[derive(Debug)]
pub enum AnyBroker {
    /// In process: one node, nothing to install.
    Local(Arc<Hub>),
    Redis(Box<RedisBroker>),
}

impl AnyBroker {
    /// The broker for `cfg`, and for Redis the worker that must be run
    /// (see [`RedisWorker::run`]).
    ///
    /// # Errors
    /// A `redis_url` that does not parse.
    pub fn new(
        cfg: &ClusterConfig,
        history: HistoryRules,
        hub: Arc<Hub>,
        presence: Arc<Presence>,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Option<RedisWorker>), ::redis::RedisError> {
        match &cfg.redis_url {
            None => Ok((Self::Local(hub), None)),
            Some(url) => {
                let (broker, worker) = RedisBroker::new(url, cfg, history, hub, presence, metrics)?;
                Ok((Self::Redis(Box::new(broker)), Some(worker)))
            }
        }
    }

    /// Publishes `data` on `channel` from `from`. `Ok` means it was
    /// accepted and numbered; nothing is reported as sent that was not.
    /// `accepted` runs once the publication is certain: before local
    /// fan-out in process (so a publisher's `ok` precedes its own echo),
    /// after Redis numbered it otherwise. `fanout` says who writes it to
    /// this process's subscribers.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        from: &str,
        data: &RawValue,
        accepted: impl FnOnce() + Send,
        fanout: Fanout,
    ) -> Result<Published, BrokerError> {
        match self {
            Self::Local(hub) => {
                // The local hub cannot fail: acknowledge before fanning out.
                accepted();
                let message = MessageTemplate::new(channel, from, data);
                Ok(hub.publish(channel, &message, fanout))
            }
            Self::Redis(b) => b.publish(channel, from, data, accepted, fanout).await,
        }
    }

    /// Makes sure messages of `channel` reach this process; returns once
    /// they will. Idempotent: every joiner of a channel may call it, and
    /// all of them wait for the same confirmation.
    pub async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        match self {
            Self::Local(_) => Ok(()),
            Self::Redis(b) => b.subscribe(channel).await,
        }
    }

    /// The channel has no local subscriber any more (the hub said so):
    /// stop receiving it, unless one joins again meanwhile.
    pub fn release(&self) {
        if let Self::Redis(b) = self {
            b.release();
        }
    }

    /// Looks an idempotency key up and reserves it when new: in process,
    /// or in Redis so that every replica sees it.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn reserve_key(&self, local: &LocalKeys, key: &str) -> Result<Reserved, BrokerError> {
        match self {
            Self::Local(_) => Ok(local.reserve(key)),
            Self::Redis(b) => b.reserve_key(key).await,
        }
    }

    /// Records the answer for a reserved key, or frees it (`None`: the
    /// publication failed, so a retry may publish).
    pub async fn complete_key(&self, local: &LocalKeys, key: &str, answer: Option<&str>) {
        match self {
            Self::Local(_) => local.complete(key, answer),
            Self::Redis(b) => b.complete_key(key, answer).await,
        }
    }

    /// Whether this is the in-process broker (no Redis).
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Local(_))
    }

    /// Management requests from other replicas, for the core to answer
    /// (`None` in process, or once taken).
    pub fn take_control(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        match self {
            Self::Local(_) => None,
            Self::Redis(b) => b.take_control(),
        }
    }

    /// Asks every replica `payload` and collects their answers (at most
    /// `wait`); `None` in process.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn ask_replicas(
        &self,
        payload: &str,
        reply: &str,
        wait: std::time::Duration,
    ) -> Result<Option<(usize, Vec<String>)>, BrokerError> {
        match self {
            Self::Local(_) => Ok(None),
            Self::Redis(b) => {
                let n = b.broadcast_control(payload).await?;
                Ok(Some((n, b.collect_replies(reply, n, wait).await)))
            }
        }
    }

    /// Keeps a revocation (`user` at unix second `at`) in Redis for
    /// `ttl_s`, so a replica started later learns it; nothing in process.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn store_revocation(
        &self,
        user: &str,
        at: u64,
        ttl_s: u64,
    ) -> Result<(), BrokerError> {
        match self {
            Self::Local(_) => Ok(()),
            Self::Redis(b) => b.store_revocation(user, at, ttl_s).await,
        }
    }

    /// The revocations kept in Redis at or after unix second `since`
    /// (`None` in process, or when Redis is unreachable).
    pub async fn load_revocations(&self, since: u64) -> Option<Vec<(String, u64)>> {
        match self {
            Self::Local(_) => None,
            Self::Redis(b) => b.load_revocations(since).await,
        }
    }

    /// Answers another replica's management request.
    pub async fn reply_control(&self, reply: &str, answer: &str) {
        if let Self::Redis(b) = self {
            b.reply_control(reply, answer).await;
        }
    }

    /// Whether history lives in this broker rather than in the hub.
    pub fn keeps_history(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    /// A history channel's position, and the missed messages for a
    /// resume from `since`; through Redis, shared by concurrent callers.
    ///
    /// # Errors
    /// The broker is unreachable, or keeps no history (in process).
    pub async fn read_position(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
    ) -> Result<Arc<Read>, BrokerError> {
        let what = since.map_or(ReadFor::Position, |p| ReadFor::Resume(p.clone()));
        match self {
            Self::Local(_) => Err(BrokerError::Unavailable),
            Self::Redis(b) => b.read(channel, what).await,
        }
    }

    /// The last `limit` messages of a history channel and its position.
    ///
    /// # Errors
    /// As [`AnyBroker::read_position`].
    pub async fn read_history(
        &self,
        channel: &ChannelName,
        limit: usize,
    ) -> Result<Arc<Read>, BrokerError> {
        match self {
            Self::Local(_) => Err(BrokerError::Unavailable),
            Self::Redis(b) => b.read(channel, ReadFor::History(limit)).await,
        }
    }

    /// Tells Redis that `user` became a member of `channel` on this
    /// replica (nothing in process, where the presence table decides);
    /// false when Redis could not be told.
    pub async fn presence_enter(&self, channel: &ChannelName, user: &str) -> bool {
        match self {
            Self::Local(_) => true,
            Self::Redis(b) => b.presence_enter(channel, user).await,
        }
    }

    /// Tells Redis that `user` is no member of `channel` on this replica
    /// any more.
    pub fn presence_exit(&self, channel: &ChannelName, user: &str) {
        if let Self::Redis(b) = self {
            b.presence_exit(channel, user);
        }
    }

    /// `channel`'s members on every replica; `None` in process.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn presence_read(
        &self,
        channel: &ChannelName,
    ) -> Result<Option<Listing>, BrokerError> {
        match self {
            Self::Local(_) => Ok(None),
            Self::Redis(b) => b.presence_read(channel).await.map(Some),
        }
    }

    /// Whether publications can flow (for `/readyz`).
    pub fn ready(&self) -> bool {
        match self {
            Self::Local(_) => true,
            Self::Redis(b) => b.ready(),
        }
    }
}
