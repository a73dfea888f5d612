//! The gateway core: the one room that sessions (and, later, the HTTP API
//! and the Redis worker) enter to subscribe, unsubscribe and publish. It
//! owns what callers share: the configuration, the metrics, the token
//! verifier, the policies, the admission limits, the per-user and
//! per-connection slots ([`slots`]), the [`Hub`] and the broker.
//!
//! A caller never sees which broker is behind the core, and never counts
//! subscribers: the hub says when a channel gains its first local
//! subscriber or loses its last, and only then does the core ask the
//! broker to subscribe or release it, undoing the hub's entry when the
//! broker fails (as centrifuge's `addSubscription` does).
//!
//! Permission checks live here too, so every caller is held to the same
//! rules: the caller names who it acts for and the policy set it holds.

pub mod slots;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::admission::Admission;
use crate::auth::Verifier;
use crate::broker::{AnyBroker, BrokerError, LocalKeys, RedisWorker, Reserved};
use crate::channel::ChannelName;
use crate::config::Config;
use crate::history::{HistoryRules, Position};
pub use crate::hub::Fanout;
use crate::hub::{Hub, Left, Published, Subscriber};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::policy::{Action, PolicySet, PolicyStore};
use crate::presence::{Listing, Presence, PresenceRules};
use crate::protocol::{ErrorCode, ServerFrame};
use crate::rate::{Bucket, Rate};

/// Why the core refused a request. Each has a stable wire code apart
/// from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("not allowed to {}", .0.as_str())]
    Forbidden(Action),
    #[error("subscription limit reached")]
    TooManySubscriptions,
    /// The broker could not take the request; nothing was done.
    #[error("{}", unavailable_text(*.0))]
    Unavailable(Action),
    #[error("this channel keeps no history")]
    NoHistory,
    #[error("this channel keeps no presence")]
    NoPresence,
}

fn unavailable_text(action: Action) -> &'static str {
    match action {
        Action::Publish => "the message broker is unavailable; not published",
        Action::Subscribe => "the message broker is unavailable; try again",
    }
}

impl CoreError {
    /// The `code` of the `error` frame.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::TooManySubscriptions => ErrorCode::TooManySubscriptions,
            Self::Unavailable(_) => ErrorCode::Internal,
            Self::NoHistory => ErrorCode::NoHistory,
            Self::NoPresence => ErrorCode::NoPresence,
        }
    }
}

/// Who a request acts for, and the policy set it is judged by (a session
/// holds its own snapshot, swapped when policies reload).
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub identity: &'a Identity,
    pub policy: &'a PolicySet,
}

impl Caller<'_> {
    fn check(&self, action: Action, channel: &ChannelName) -> Result<(), CoreError> {
        if self.policy.allows(self.identity, action, channel) {
            Ok(())
        } else {
            Err(CoreError::Forbidden(action))
        }
    }
}

/// A session's number and the line the core reaches it by.
type SessionLine = (u64, Arc<slots::Mailbox>);

/// A management request of the HTTP API, done on every replica.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Manage {
    Disconnect {
        user: String,
    },
    /// `at`: the revocation's time (unix s), the same on every replica.
    Revoke {
        user: String,
        at: u64,
    },
    Unsubscribe {
        user: String,
        channel: String,
    },
    Channels {
        prefix: String,
    },
}

/// What a management request did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Managed {
    /// Sessions told.
    Sessions(usize),
    /// Channels with their subscribers.
    Channels(Vec<(String, usize)>),
}

/// What the core asks of a session.
#[derive(Debug, Clone)]
pub enum Control {
    /// Close with 4003 (`disconnect`, `revoke`).
    Disconnect,
    /// End this subscription, telling the client (`forbidden`).
    Unsubscribe(ChannelName),
}

/// What a subscribe asks for besides the channel.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubscribeOptions<'a> {
    /// The request's id: its `ok` is queued only when set.
    pub id: Option<u64>,
    /// Resume: replay what came after this position.
    pub since: Option<&'a Position>,
    /// Also send this session the channel's `join` and `leave` frames.
    pub presence: bool,
}

/// One connection's subscriptions, kept by its caller and changed only
/// through the core, so the hub, the broker, presence and the gauge agree.
#[derive(Debug, Default)]
pub struct Subscriptions {
    /// Each with whether the session watches its presence.
    channels: HashMap<ChannelName, bool>,
    /// Whose they are (set by the first subscribe): the presence member.
    user: Option<Box<str>>,
}

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.channels.len()
    }
}

/// How often graces are checked: a `leave` comes at most this late.
const PRESENCE_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// How often the revocations kept in Redis are read again.
const REVOCATIONS_RELOAD: std::time::Duration = std::time::Duration::from_secs(30);
/// How soon a read of them that failed is tried again.
const REVOCATIONS_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// The shared core; one per server, behind an `Arc`.
#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub verifier: Verifier,
    pub policies: PolicyStore,
    /// Per-address and global admission limits.
    pub admission: Arc<Admission>,
    /// How often client-caused lines (refusals, closes) are logged.
    pub log_gate: crate::loggate::LogGate,
    hub: Arc<Hub>,
    /// Who is in which channel (per user), and who watches.
    presence: Arc<Presence>,
    broker: AnyBroker,
    /// Which channels keep history (in the hub, or in Redis).
    history: HistoryRules,
    /// Open sessions per user (`limits.max_connections_per_user`), each
    /// with its control channel.
    users: Mutex<HashMap<String, Vec<SessionLine>>>,
    /// Idempotency keys of API publications, on a single gateway.
    keys: LocalKeys,
    /// Each user's publication budget over all their sessions
    /// (`limits.user_publish_rate_per_s`), forgotten once refilled.
    user_budgets: Mutex<HashMap<String, Bucket>>,
    user_rate: Option<Rate>,
    /// Revoked users and when (unix s): their tokens issued before are
    /// refused, for `api.revocation_ttl_s`.
    revoked: Mutex<HashMap<String, u64>>,
    /// Whether the revocations kept in Redis have been read once (always
    /// with no Redis): until then the gateway is not ready.
    revocations_loaded: AtomicBool,
    /// Source of process-unique session numbers.
    next_session: AtomicU64,
    /// Set when shutdown begins: `/readyz` and new upgrades answer 503.
    draining: AtomicBool,
}

impl Gateway {
    /// The core for `config`, and for a Redis backplane the worker that
    /// must run beside it ([`RedisWorker::run`]).
    ///
    /// # Errors
    /// A `cluster.redis_url` that does not parse.
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        verifier: Verifier,
        policies: PolicyStore,
        (history, presence): (HistoryRules, PresenceRules),
    ) -> Result<(Self, Option<RedisWorker>), ::redis::RedisError> {
        // With a Redis backplane, history lives in Redis, not in the hub.
        let local_history = if config.cluster.redis_url.is_none() {
            history.clone()
        } else {
            HistoryRules::default()
        };
        let hub = Arc::new(Hub::new(local_history, Arc::clone(&metrics)));
        let single = config.cluster.redis_url.is_none();
        let presence = Arc::new(Presence::new(presence, single, Arc::clone(&metrics)));
        let (broker, worker) = AnyBroker::new(
            &config.cluster,
            history.clone(),
            Arc::clone(&hub),
            Arc::clone(&presence),
            Arc::clone(&metrics),
        )?;
        let local = broker.is_local();
        let user_rate = Rate::new(
            f64::from(config.limits.user_publish_rate_per_s),
            config.limits.user_publish_burst,
        );
        let gateway = Self {
            admission: Arc::new(Admission::new(&config.admission)),
            log_gate: crate::loggate::LogGate::new(&config.log, Arc::clone(&metrics)),
            config,
            metrics,
            verifier,
            policies,
            hub,
            presence,
            broker,
            history,
            users: Mutex::default(),
            user_budgets: Mutex::default(),
            user_rate,
            revoked: Mutex::default(),
            revocations_loaded: AtomicBool::new(local),
            keys: LocalKeys::default(),
            next_session: AtomicU64::new(1),
            draining: AtomicBool::new(false),
        };
        Ok((gateway, worker))
    }

    /// Sends `control` to every session of `user` here; returns how many.
    fn tell(&self, user: &str, control: &Control) -> usize {
        let users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        users.get(user).map_or(0, |sessions| {
            sessions
                .iter()
                .filter(|(_, mailbox)| mailbox.post(control.clone()))
                .count()
        })
    }

    /// Closes every session of `user` here with 4003; returns how many.
    fn disconnect(&self, user: &str) -> usize {
        self.tell(user, &Control::Disconnect)
    }

    /// Ends `user`'s subscriptions to `channel` here (each session gets
    /// the `forbidden` error naming it); returns how many sessions were told.
    fn unsubscribe_user(&self, user: &str, channel: &ChannelName) -> usize {
        self.tell(user, &Control::Unsubscribe(channel.clone()))
    }

    /// Refuses `user`'s tokens issued at or before `now` (unix s), from
    /// now on, and disconnects their sessions here; returns how many.
    fn revoke(&self, user: &str, now: u64) -> usize {
        let ttl = self.config.api.revocation_ttl_s;
        let mut revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget revocations older than any token the operator allows.
        revoked.retain(|_, at| now.saturating_sub(*at) <= ttl);
        revoked.insert(user.to_owned(), now);
        drop(revoked);
        self.disconnect(user)
    }

    /// Adds the revocations kept in Redis to those in memory; false when
    /// Redis could not be read.
    async fn reload_revocations(&self) -> bool {
        let ttl = self.config.api.revocation_ttl_s;
        let since = crate::auth::mint::unix_now().saturating_sub(ttl);
        let Some(kept) = self.broker.load_revocations(since).await else {
            return false;
        };
        let mut revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        for (user, at) in kept {
            let known = revoked.entry(user).or_insert(at);
            *known = (*known).max(at);
        }
        drop(revoked);
        self.revocations_loaded.store(true, Ordering::Relaxed);
        true
    }

    /// Whether `identity`'s token was issued before a revocation of its
    /// user: in the same second counts as before, and so does a token
    /// without `iat`.
    pub fn is_revoked(&self, identity: &Identity) -> bool {
        let revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        revoked
            .get(&identity.user)
            .is_some_and(|at| identity.issued_at.is_none_or(|iat| iat <= *at))
    }

    /// A new process-unique session number.
    pub fn next_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts the drain: readiness fails and new upgrades are refused.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether publications can flow (the broker is connected) and the
    /// revocations kept in Redis are known.
    pub fn broker_ready(&self) -> bool {
        self.broker.ready() && self.revocations_loaded.load(Ordering::Relaxed)
    }

    /// Subscribes `subscriber` to `channel` for `caller`, checking the
    /// policy and the connection's subscription limit. The `ok` (with the
    /// channel's position on a history channel) and, for a resume, the
    /// missed messages are queued to the subscriber before any live
    /// message of the channel. A channel already subscribed is answered
    /// `ok` again and changes nothing.
    ///
    /// # Errors
    /// Forbidden, over the limit, or the broker could not subscribe.
    pub async fn subscribe(
        &self,
        subs: &mut Subscriptions,
        subscriber: &Subscriber,
        caller: Caller<'_>,
        channel: &ChannelName,
        options: SubscribeOptions<'_>,
    ) -> Result<(), CoreError> {
        let keeps_presence = self.presence.keeps(channel);
        if let Some(watching) = subs.channels.get_mut(channel) {
            if options.presence && !keeps_presence {
                return Err(CoreError::NoPresence);
            }
            if let Some(id) = options.id {
                subscriber.send(Utf8Bytes::from(ServerFrame::Ok { id }.encode()));
            }
            // Asking for presence on a subscription without it starts it.
            if options.presence && !*watching {
                *watching = true;
                self.presence.watch(channel, subscriber);
            }
            return Ok(());
        }
        caller.check(Action::Subscribe, channel)?;
        if options.presence && !keeps_presence {
            return Err(CoreError::NoPresence);
        }
        if subs.len() >= self.config.limits.max_subscriptions {
            return Err(CoreError::TooManySubscriptions);
        }
        // Through Redis, a history channel's position is read once the
        // subscription is confirmed; messages delivered meanwhile wait in
        // the hub and follow the replay, so none is missed or repeated.
        let read_position = self.broker.keeps_history() && self.history.limits(channel).is_some();
        // Counted (pending) before the broker is asked, so a release that
        // races with this join never drops a channel it needs.
        self.hub.join(channel, subscriber.clone(), read_position);
        // Every joiner waits for the confirmation, not only the first.
        let read = match self.broker.subscribe(channel).await {
            Ok(()) if read_position => match self.hub.cached_read(channel, options.since) {
                Some(read) => Ok(Some(read)),
                None => {
                    let read = self.broker.read_position(channel, options.since).await;
                    if let Ok(read) = &read {
                        self.hub.store_read(channel, options.since, read);
                    }
                    read.map(Some)
                }
            },
            Ok(()) => Ok(None),
            Err(e) => Err(e),
        };
        let resumed = match read {
            Err(_) => {
                if self.hub.leave(channel, subscriber.session) == Left::Last {
                    self.broker.release();
                }
                return Err(CoreError::Unavailable(Action::Subscribe));
            }
            Ok(Some(read)) => {
                self.hub
                    .activate_read(channel, subscriber.session, options.id, &read);
                read.outcome
            }
            Ok(None) => self
                .hub
                .activate(channel, subscriber.session, options.id, options.since),
        };
        if let Some(outcome) = resumed {
            let label = outcome.map_or_else(|why| why.as_str(), |()| "recovered");
            self.metrics.resumes.inc(label);
        }
        subs.channels.insert(channel.clone(), options.presence);
        self.metrics.subscriptions.fetch_add(1, Ordering::Relaxed);
        if keeps_presence {
            let user = &caller.identity.user;
            if subs.user.is_none() {
                subs.user = Some(user.as_str().into());
            }
            // Watching first: the subscriber hears its own user's join,
            // after its `ok`, as every other watcher does.
            if options.presence {
                self.presence.watch(channel, subscriber);
            }
            if self.presence.enter(channel, user) {
                // Awaited, so a `presence` right after lists this user;
                // when Redis cannot be told, the next renewal tells it.
                self.broker.presence_enter(channel, user).await;
            }
        }
        Ok(())
    }

    /// Ends `session`'s subscription to `channel`; false when there was
    /// none.
    pub fn unsubscribe(
        &self,
        subs: &mut Subscriptions,
        session: u64,
        channel: &ChannelName,
    ) -> bool {
        let Some(watching) = subs.channels.remove(channel) else {
            return false;
        };
        self.leave(session, channel, subs.user.as_deref(), watching);
        self.metrics.subscriptions.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Ends every subscription of `session` (its connection is closing).
    pub fn unsubscribe_all(&self, subs: &mut Subscriptions, session: u64) {
        let n = subs.len() as i64;
        for (channel, watching) in std::mem::take(&mut subs.channels) {
            self.leave(session, &channel, subs.user.as_deref(), watching);
        }
        self.metrics.subscriptions.fetch_sub(n, Ordering::Relaxed);
    }

    /// Ends the subscriptions that `caller` may no longer hold (after a
    /// policy reload or a token refresh); returns them, so the caller can
    /// tell its client which.
    pub fn drop_forbidden(
        &self,
        subs: &mut Subscriptions,
        session: u64,
        caller: Caller<'_>,
    ) -> Vec<ChannelName> {
        let lost: Vec<ChannelName> = subs
            .channels
            .keys()
            .filter(|c| caller.check(Action::Subscribe, c).is_err())
            .cloned()
            .collect();
        for channel in &lost {
            self.unsubscribe(subs, session, channel);
        }
        lost
    }

    fn leave(&self, session: u64, channel: &ChannelName, user: Option<&str>, watching: bool) {
        // The broker is asked on every join (all wait for its
        // confirmation) and released only when the hub says the last left.
        if self.hub.leave(channel, session) == Left::Last {
            self.broker.release();
        }
        if watching {
            self.presence.unwatch(channel, session);
        }
        if let Some(user) = user
            && self.presence.keeps(channel)
            && self.presence.exit(channel, user, Instant::now())
        {
            self.broker.presence_exit(channel, user);
        }
    }

    /// Who is in `channel` (on every replica), for `caller`, who needs the
    /// `subscribe` permission (subscribed or not).
    ///
    /// # Errors
    /// Forbidden, the channel keeps no presence, or Redis is unreachable.
    pub async fn presence(
        &self,
        caller: Caller<'_>,
        channel: &ChannelName,
    ) -> Result<Listing, CoreError> {
        caller.check(Action::Subscribe, channel)?;
        if !self.presence.keeps(channel) {
            return Err(CoreError::NoPresence);
        }
        match self.broker.presence_read(channel).await {
            Ok(Some(listing)) => Ok(listing),
            Ok(None) => Ok(self.presence.listing(channel)),
            Err(BrokerError::Unavailable) => Err(CoreError::Unavailable(Action::Subscribe)),
        }
    }

    /// Ends the graces of members whose last subscription ended (their
    /// `leave`), a few times a second, until `stop`: one task for every
    /// member of the process.
    pub async fn serve_presence(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(PRESENCE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (channel, user) in self.presence.expire(Instant::now()) {
                self.broker.presence_exit(&channel, &user);
            }
        }
    }

    /// The last `limit` messages of `channel` (oldest first, as stored
    /// `message` frames) and its position, for `caller`, who needs the
    /// `subscribe` permission (subscribed or not).
    ///
    /// # Errors
    /// Forbidden, or the channel keeps no history.
    pub async fn history(
        &self,
        caller: Caller<'_>,
        channel: &ChannelName,
        limit: usize,
    ) -> Result<(Position, Vec<Utf8Bytes>), CoreError> {
        caller.check(Action::Subscribe, channel)?;
        let page = if self.broker.keeps_history() {
            if self.history.limits(channel).is_none() {
                return Err(CoreError::NoHistory);
            }
            let read =
                self.broker.read_history(channel, limit).await.map_err(
                    |BrokerError::Unavailable| CoreError::Unavailable(Action::Subscribe),
                )?;
            let position = Position {
                epoch: read.epoch.clone(),
                seq: read.seq,
            };
            (position, read.frames.clone())
        } else {
            self.hub
                .history(channel, limit)
                .ok_or(CoreError::NoHistory)?
        };
        self.metrics.history_reads.fetch_add(1, Ordering::Relaxed);
        Ok(page)
    }

    /// Looks up an idempotency key and reserves it when new (every
    /// replica sees it through Redis).
    ///
    /// # Errors
    /// The broker is unreachable.
    pub async fn reserve_key(&self, key: &str) -> Result<Reserved, CoreError> {
        self.broker
            .reserve_key(&self.keys, key)
            .await
            .map_err(|BrokerError::Unavailable| CoreError::Unavailable(Action::Publish))
    }

    /// Records the answer of a reserved key, or frees it (`None`).
    pub async fn complete_key(&self, key: &str, answer: Option<&str>) {
        self.broker.complete_key(&self.keys, key, answer).await;
    }

    /// Does `op` on this gateway.
    fn apply(&self, op: &Manage) -> Managed {
        match op {
            Manage::Disconnect { user } => Managed::Sessions(self.disconnect(user)),
            Manage::Revoke { user, at } => Managed::Sessions(self.revoke(user, *at)),
            Manage::Unsubscribe { user, channel } => Managed::Sessions(
                ChannelName::parse(channel).map_or(0, |c| self.unsubscribe_user(user, &c)),
            ),
            Manage::Channels { prefix } => Managed::Channels(
                self.hub
                    .channel_counts(prefix)
                    .into_iter()
                    .map(|(c, n)| (c.as_str().to_owned(), n))
                    .collect(),
            ),
        }
    }

    /// Does `op` on every replica (through Redis; here alone in process)
    /// and adds up what they did: sessions told, or subscribers per
    /// channel. Returns the total and how many replicas answered of how
    /// many were asked.
    ///
    /// # Errors
    /// Redis is unreachable: nothing was asked.
    pub async fn manage(&self, op: Manage) -> Result<(Managed, usize, usize), CoreError> {
        if let Manage::Revoke { user, at } = &op {
            // Kept in Redis first, so a replica that starts later (or
            // misses the request) still refuses the revoked tokens.
            self.broker
                .store_revocation(user, *at, self.config.api.revocation_ttl_s)
                .await
                .map_err(|BrokerError::Unavailable| CoreError::Unavailable(Action::Publish))?;
        }
        let reply = crate::history::new_epoch();
        let payload = serde_json::json!({ "reply": reply, "op": op }).to_string();
        // Replies are waited for a few Redis round trips, not forever.
        let wait =
            std::time::Duration::from_millis(self.config.cluster.command_timeout_ms.max(100) * 2);
        let asked = self
            .broker
            .ask_replicas(&payload, &reply, wait)
            .await
            .map_err(|BrokerError::Unavailable| CoreError::Unavailable(Action::Publish))?;
        let Some((n, answers)) = asked else {
            return Ok((self.apply(&op), 1, 1));
        };
        let answered = answers.len();
        let mut total = match op {
            Manage::Channels { .. } => Managed::Channels(Vec::new()),
            _ => Managed::Sessions(0),
        };
        for answer in answers {
            match (&mut total, serde_json::from_str::<Managed>(&answer)) {
                (Managed::Sessions(sum), Ok(Managed::Sessions(k))) => *sum += k,
                (Managed::Channels(all), Ok(Managed::Channels(some))) => all.extend(some),
                _ => tracing::warn!("ignored a malformed management answer from a replica"),
            }
        }
        if let Managed::Channels(all) = &mut total {
            all.sort();
            // One line per channel, subscribers added over replicas.
            let mut merged: Vec<(String, usize)> = Vec::with_capacity(all.len());
            for (c, k) in all.drain(..) {
                match merged.last_mut() {
                    Some((last, sum)) if *last == c => *sum += k,
                    _ => merged.push((c, k)),
                }
            }
            *all = merged;
        }
        if answered < n {
            tracing::warn!(
                answered,
                asked = n,
                "not every replica answered a management request"
            );
        }
        Ok((total, answered, n))
    }

    /// Answers the management requests of other replicas (and this one's,
    /// which come back through Redis too) until `stop`.
    pub async fn serve_control(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(mut requests) = self.broker.take_control() else {
            return;
        };
        // The revocations kept in Redis: read at start, and again now and
        // then in case a request was missed (an outage, a partition).
        let mut reload = tokio::time::interval(REVOCATIONS_RELOAD);
        loop {
            let payload = tokio::select! {
                () = stop.cancelled() => return,
                _ = reload.tick() => {
                    if !self.reload_revocations().await {
                        // Not connected yet (or an outage): soon again.
                        reload.reset_after(REVOCATIONS_RETRY);
                    }
                    continue;
                }
                p = requests.recv() => match p { Some(p) => p, None => return },
            };
            #[derive(serde::Deserialize)]
            struct Request {
                reply: String,
                op: Manage,
            }
            let Ok(request) = serde_json::from_str::<Request>(&payload) else {
                tracing::warn!("ignored a malformed management request from redis");
                continue;
            };
            let answer = serde_json::to_string(&self.apply(&request.op)).unwrap_or_default();
            self.broker.reply_control(&request.reply, &answer).await;
        }
    }

    /// Drops history past its age and forgets idle history channels.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.hub.sweep(now);
        self.log_gate.sweep(now);
        if let Some(rate) = self.user_rate {
            // A bucket that has refilled holds nothing worth keeping.
            self.user_budgets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, bucket| !bucket.is_full(rate, now));
        }
    }

    /// Takes one publication from `user`'s budget over all their
    /// sessions; false when it is spent.
    pub fn spend_user_publish(&self, user: &str) -> bool {
        let Some(rate) = self.user_rate else {
            return true;
        };
        let now = Instant::now();
        let mut budgets = self
            .user_budgets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = budgets.get_mut(user) {
            return bucket.take(rate, now).is_ok();
        }
        let mut bucket = Bucket::full(rate, now);
        let ok = bucket.take(rate, now).is_ok();
        budgets.insert(user.to_owned(), bucket);
        ok
    }

    /// Publishes `data` on `channel` as `caller`. `accepted` runs once the
    /// publication is certain: before local fan-out on a single node (the
    /// publisher's `ok` precedes its echo), after Redis numbered it in a
    /// cluster. `fanout` says who writes it to idle subscribers here.
    ///
    /// # Errors
    /// Forbidden, or the broker could not take it (nothing was published).
    pub async fn publish(
        &self,
        caller: Caller<'_>,
        channel: &ChannelName,
        data: &RawValue,
        accepted: impl FnOnce() + Send,
        fanout: Fanout,
    ) -> Result<Published, CoreError> {
        caller.check(Action::Publish, channel)?;
        let started = Instant::now();
        let published = self
            .broker
            .publish(channel, &caller.identity.user, data, accepted, fanout)
            .await
            .map_err(|BrokerError::Unavailable| CoreError::Unavailable(Action::Publish))?;
        let metrics = &self.metrics;
        metrics.messages_received.fetch_add(1, Ordering::Relaxed);
        metrics
            .messages_delivered
            .fetch_add(published.delivered as u64, Ordering::Relaxed);
        metrics.publish.observe(started.elapsed());
        Ok(published)
    }
}
