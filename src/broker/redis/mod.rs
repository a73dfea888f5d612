//! The Redis broker: publication by script, one pub/sub connection owned
//! by [`RedisWorker`], subscriptions made and dropped as the core asks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio_tungstenite::tungstenite::Utf8Bytes;

mod manage;
pub(crate) mod presence;

use super::BrokerError;
use super::scripts::{NEW_EPOCH, PUBLISH_SCRIPT, READ_SCRIPT};
use crate::channel::ChannelName;
use crate::config::ClusterConfig;
use crate::history::{HistoryRules, Position, Read, Unrecovered};
use crate::hub::{Fanout, Hub, Published};
use crate::metrics::Metrics;
use crate::presence::{Listing, Presence};
use crate::protocol::MessageTemplate;
use manage::{CONTROL_QUEUE, control_topic};
pub use presence::PresenceWorker;
use presence::{PRESENCE_QUEUE, PresenceKeys, PresenceOp};

/// What a read is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum ReadFor {
    /// The position alone (a plain subscribe).
    Position,
    /// A resume from a position.
    Resume(Position),
    /// The last messages, at most this many.
    History(usize),
}

/// One read in flight, shared by every caller that asks the same thing
/// meanwhile: a reconnect storm is one read per channel and position.
type SharedRead = Shared<BoxFuture<'static, Result<Arc<Read>, BrokerError>>>;

/// Channels Redis has confirmed a SUBSCRIBE for on the live connection.
/// Which channels are *wanted* is the hub's to say (it counts the local
/// subscribers); this lock is taken before a hub shard lock, never after.
type Confirmed = HashSet<ChannelName>;

/// A request to the worker, which owns the subscription connection.
#[derive(Debug)]
struct SubscribeRequest {
    channel: ChannelName,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

/// Publishes through Redis; see the module documentation.
pub struct RedisBroker {
    prefix: String,
    /// Which channels keep history, and how much, in Redis.
    rules: HistoryRules,
    ttl_s: u64,
    timeout: Duration,
    script: redis::Script,
    read_script: Arc<redis::Script>,
    reads: Mutex<std::collections::HashMap<(ChannelName, ReadFor), SharedRead>>,
    /// Management requests the worker received, until the core takes them.
    control: Mutex<Option<mpsc::Receiver<String>>>,
    /// The command connection, once the worker has made it.
    commands: Arc<Mutex<Option<redis::aio::ConnectionManager>>>,
    subs: Arc<Mutex<Confirmed>>,
    requests: mpsc::Sender<SubscribeRequest>,
    released: Arc<Notify>,
    ready: Arc<AtomicBool>,
    /// Enters and exits of this replica's members, for [`PresenceWorker`].
    presence_ops: mpsc::Sender<PresenceOp>,
    presence_keys: PresenceKeys,
    /// Where this replica's own publications are delivered at once.
    hub: Arc<Hub>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("RedisBroker")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Keys and the pub/sub channel of a wsgate channel. The `{…}` hash tag
/// keeps a channel's keys in one Redis Cluster slot.
fn epoch_key(prefix: &str, channel: &ChannelName) -> String {
    format!("{prefix}:{{{}}}:epoch", channel.as_str())
}

/// The read script's answer: epoch, seq, outcome, then seq and payload
/// pairs, oldest first, turned into `message` frames.
pub(crate) fn parse_read(channel: &ChannelName, value: &redis::Value) -> Option<Read> {
    let redis::Value::Array(items) = value else {
        return None;
    };
    // By reference: a clone would copy a whole subtree (an array where a
    // string belongs) only to refuse it.
    let text = |v: &redis::Value| -> Option<String> { redis::from_redis_value_ref(v).ok() };
    let number = |v: &redis::Value| -> Option<u64> { redis::from_redis_value_ref(v).ok() };
    let epoch = text(items.first()?)?;
    let seq = number(items.get(1)?)?;
    let outcome = match text(items.get(2)?)?.as_str() {
        "position" | "history" => None,
        "recovered" => Some(Ok(())),
        "epoch_changed" => Some(Err(Unrecovered::EpochChanged)),
        "trimmed" => Some(Err(Unrecovered::Trimmed)),
        "too_many" => Some(Err(Unrecovered::TooMany)),
        _ => return None,
    };
    let mut frames = Vec::with_capacity(items.len().saturating_sub(3) / 2);
    for pair in items.get(3..)?.chunks(2) {
        let [s, payload] = pair else {
            return None;
        };
        let s = number(s)?;
        let payload = text(payload)?;
        let (from, data) = parse_payload(&payload)?;
        let data: &RawValue = serde_json::from_str(data).ok()?;
        frames.push(Utf8Bytes::from(
            MessageTemplate::new(channel, from, data).with_seq(s),
        ));
    }
    Some(Read {
        epoch,
        seq,
        outcome,
        frames,
    })
}

fn seq_key(prefix: &str, channel: &ChannelName) -> String {
    format!("{prefix}:{{{}}}:seq", channel.as_str())
}

fn history_key(prefix: &str, channel: &ChannelName) -> String {
    format!("{prefix}:{{{}}}:history", channel.as_str())
}

fn topic(prefix: &str, channel: &ChannelName) -> String {
    format!("{prefix}:msg:{}", channel.as_str())
}

/// `"<from length> <from><data>"`: the user id may hold any character.
pub(crate) fn payload(from: &str, data: &RawValue) -> String {
    format!("{} {from}{}", from.len(), data.get())
}

/// Splits `"<seq> <from length> <from><data>"`.
pub(crate) fn parse_message(bytes: &[u8]) -> Option<(u64, &str, &str, &str)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (seq, rest) = text.split_once(' ')?;
    let (epoch, rest) = rest.split_once(' ')?;
    let (from, data) = parse_payload(rest)?;
    Some((seq.parse().ok()?, epoch, from, data))
}

/// Splits a stored payload, `"<from length> <from><data>"`.
pub(crate) fn parse_payload(text: &str) -> Option<(&str, &str)> {
    let (len, rest) = text.split_once(' ')?;
    let len: usize = len.parse().ok()?;
    Some((rest.get(..len)?, rest.get(len..)?))
}

impl RedisBroker {
    pub(super) fn new(
        url: &str,
        cfg: &ClusterConfig,
        rules: HistoryRules,
        hub: Arc<Hub>,
        presence: Arc<Presence>,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, RedisWorker), redis::RedisError> {
        let client = redis::Client::open(url)?;
        let (tx, rx) = mpsc::channel(1024);
        let commands = Arc::new(Mutex::new(None));
        let subs = Arc::new(Mutex::new(Confirmed::default()));
        let released = Arc::new(Notify::new());
        let ready = Arc::new(AtomicBool::new(false));
        let timeout = Duration::from_millis(cfg.command_timeout_ms);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (ops_tx, ops_rx) = mpsc::channel(PRESENCE_QUEUE);
        let presence_keys = PresenceKeys::new(&cfg.prefix, presence.rules(), timeout);
        let presence_worker = PresenceWorker {
            keys: presence_keys.clone(),
            ops: ops_rx,
            commands: Arc::clone(&commands),
            presence: Arc::clone(&presence),
            metrics: Arc::clone(&metrics),
        };
        let broker = Self {
            control: Mutex::new(Some(control_rx)),
            prefix: cfg.prefix.clone(),
            rules,
            ttl_s: cfg.channel_ttl_s,
            timeout,
            script: redis::Script::new(&format!("{NEW_EPOCH}{PUBLISH_SCRIPT}")),
            read_script: Arc::new(redis::Script::new(&format!("{NEW_EPOCH}{READ_SCRIPT}"))),
            reads: Mutex::default(),
            commands: Arc::clone(&commands),
            subs: Arc::clone(&subs),
            requests: tx,
            released: Arc::clone(&released),
            ready: Arc::clone(&ready),
            presence_ops: ops_tx,
            presence_keys,
            hub: Arc::clone(&hub),
        };
        let worker = RedisWorker {
            client,
            prefix: cfg.prefix.clone(),
            timeout,
            reconnect_max: Duration::from_millis(cfg.reconnect_max_ms),
            commands,
            subs,
            requests: rx,
            released,
            ready,
            hub,
            presence,
            presence_worker: Some(presence_worker),
            metrics,
            control: control_tx,
        };
        Ok((broker, worker))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Confirmed> {
        self.subs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The command connection, once the worker has made one.
    fn command_conn(&self) -> Result<redis::aio::ConnectionManager, BrokerError> {
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(BrokerError::Unavailable)
    }

    pub(super) async fn publish(
        &self,
        channel: &ChannelName,
        from: &str,
        data: &RawValue,
        accepted: impl FnOnce() + Send,
        fanout: Fanout,
    ) -> Result<Published, BrokerError> {
        let mut conn = self.command_conn()?;
        let (max_len, max_age_ms) = self
            .rules
            .limits(channel)
            .map_or((0, 0), |l| (l.max_messages, l.max_age.as_millis() as u64));
        let mut invocation = self.script.key(seq_key(&self.prefix, channel));
        invocation
            .key(history_key(&self.prefix, channel))
            .key(epoch_key(&self.prefix, channel))
            .arg(topic(&self.prefix, channel))
            .arg(max_len)
            .arg(max_age_ms)
            .arg(self.ttl_s)
            .arg(payload(from, data));
        // A timeout may hide a publication that did happen; it is still
        // reported as failed, never the other way round.
        let answer = invocation.invoke_async::<(u64, String)>(&mut conn);
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok((seq, epoch))) => {
                // The echo of this message may already have been delivered.
                accepted();
                // Not left to the echo alone: Redis may die between its
                // answer here and the echo on the subscription connection.
                let template = MessageTemplate::new(channel, from, data);
                let own = self
                    .hub
                    .deliver_own(channel, &epoch, seq, &template, fanout);
                Ok(Published {
                    seq,
                    // Every channel has an epoch in Redis; it is news only
                    // where history can be resumed.
                    epoch: (max_len > 0).then(|| epoch.into()),
                    ..own
                })
            }
            Ok(Err(e)) => {
                debug!(error = %e, "publish through redis failed");
                Err(BrokerError::Unavailable)
            }
            Err(_) => Err(BrokerError::Unavailable),
        }
    }

    /// Reads `channel`'s position, and what `what` asks for, atomically.
    /// Callers asking the same of the same channel meanwhile share one
    /// read.
    ///
    /// # Errors
    /// Redis is unreachable or did not answer in time.
    pub(super) async fn read(
        &self,
        channel: &ChannelName,
        what: ReadFor,
    ) -> Result<Arc<Read>, BrokerError> {
        let key = (channel.clone(), what);
        let shared = {
            let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
            match reads.get(&key) {
                Some(read) => read.clone(),
                None => {
                    let read = self.start_read(&key.0, key.1.clone())?.shared();
                    reads.insert(key.clone(), read.clone());
                    read
                }
            }
        };
        let result = shared.await;
        // The first to finish forgets it; later callers start a fresh read.
        self.reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        result
    }

    fn start_read(
        &self,
        channel: &ChannelName,
        what: ReadFor,
    ) -> Result<BoxFuture<'static, Result<Arc<Read>, BrokerError>>, BrokerError> {
        let mut conn = self.command_conn()?;
        let (mode, since_epoch, since_seq, limit) = match what {
            ReadFor::Position => ("position", String::new(), 0, 0),
            ReadFor::Resume(p) => ("resume", p.epoch, p.seq, 0),
            ReadFor::History(n) => ("history", String::new(), 0, n),
        };
        let keys = [
            seq_key(&self.prefix, channel),
            history_key(&self.prefix, channel),
            epoch_key(&self.prefix, channel),
        ];
        let (script, timeout, channel) =
            (Arc::clone(&self.read_script), self.timeout, channel.clone());
        let (max_replay, ttl_s) = (self.rules.max_replay, self.ttl_s);
        Ok(async move {
            let mut invocation = script.key(&keys[0]);
            invocation
                .key(&keys[1])
                .key(&keys[2])
                .arg(mode)
                .arg(since_epoch)
                .arg(since_seq)
                .arg(max_replay)
                .arg(limit)
                .arg(ttl_s);
            let answer =
                tokio::time::timeout(timeout, invocation.invoke_async::<redis::Value>(&mut conn))
                    .await;
            match answer {
                Ok(Ok(value)) => parse_read(&channel, &value).map(Arc::new).ok_or_else(|| {
                    warn!("ignored a malformed history read from redis");
                    BrokerError::Unavailable
                }),
                Ok(Err(e)) => {
                    debug!(error = %e, "history read from redis failed");
                    Err(BrokerError::Unavailable)
                }
                Err(_) => Err(BrokerError::Unavailable),
            }
        }
        .boxed())
    }

    pub(super) async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        if !self.ready() {
            // Fail now rather than wait out the worker's reconnect pause.
            return Err(BrokerError::Unavailable);
        }
        if self.lock().contains(channel) {
            return Ok(());
        }
        let (done, confirmed) = oneshot::channel();
        let request = SubscribeRequest {
            channel: channel.clone(),
            done,
        };
        match self.requests.send(request).await {
            Ok(()) => confirmed.await.unwrap_or(Err(BrokerError::Unavailable)),
            Err(_) => Err(BrokerError::Unavailable),
        }
    }

    /// A channel lost its last local subscriber; the worker asks the hub
    /// which confirmed channels are unwanted now.
    pub(super) fn release(&self) {
        self.released.notify_one();
    }

    pub(super) fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// `user` became a member of `channel` here; returns once Redis has
    /// it (false when it could not be told: the next renewal adds it).
    pub(super) async fn presence_enter(&self, channel: &ChannelName, user: &str) -> bool {
        let (done, told) = oneshot::channel();
        let op = PresenceOp {
            channel: channel.clone(),
            user: user.into(),
            enter: true,
            done: Some(done),
        };
        if self.presence_ops.try_send(op).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(self.timeout, told).await, Ok(Ok(())))
    }

    /// `user` is no member of `channel` here any more (their grace ended).
    pub(super) fn presence_exit(&self, channel: &ChannelName, user: &str) {
        let op = PresenceOp {
            channel: channel.clone(),
            user: user.into(),
            enter: false,
            done: None,
        };
        if self.presence_ops.try_send(op).is_err() {
            // Its entry expires within the time-to-live instead.
            debug!("presence queue full; a leave waits for its entry to expire");
        }
    }

    /// `channel`'s members on every replica.
    pub(super) async fn presence_read(
        &self,
        channel: &ChannelName,
    ) -> Result<Listing, BrokerError> {
        let mut conn = self.command_conn()?;
        self.presence_keys
            .read(&mut conn, channel)
            .await
            .ok_or(BrokerError::Unavailable)
    }
}

/// Owns the Redis connections: (re)connects with jittered back-off,
/// subscribes and unsubscribes as sessions come and go, and fans each
/// message out to the local hub.
pub struct RedisWorker {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    reconnect_max: Duration,
    commands: Arc<Mutex<Option<redis::aio::ConnectionManager>>>,
    subs: Arc<Mutex<Confirmed>>,
    requests: mpsc::Receiver<SubscribeRequest>,
    released: Arc<Notify>,
    ready: Arc<AtomicBool>,
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    /// Run beside this worker, from its start.
    presence_worker: Option<PresenceWorker>,
    metrics: Arc<Metrics>,
    /// Management requests from other replicas, for the gateway core.
    control: mpsc::Sender<String>,
}

impl std::fmt::Debug for RedisWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWorker").finish_non_exhaustive()
    }
}

/// Why one connected period ended.
enum Ended {
    Stopped,
    Lost,
}

impl RedisWorker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Confirmed> {
        self.subs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        if let Some(worker) = self.presence_worker.take() {
            tokio::spawn(worker.run(stop.clone()));
        }
        let metrics = Arc::clone(&self.metrics);
        let metrics = &*metrics;
        let mut delay = Duration::from_millis(50);
        let mut first = true;
        loop {
            match self.connect().await {
                Ok((sink, stream)) => {
                    delay = Duration::from_millis(50);
                    let resumed = !first;
                    first = false;
                    match self.connected(sink, stream, resumed, metrics, &stop).await {
                        Ended::Stopped => return,
                        Ended::Lost => warn!("lost the connection to redis; reconnecting"),
                    }
                }
                Err(e) => debug!(error = %e, "cannot connect to redis"),
            }
            self.ready.store(false, Ordering::Relaxed);
            // Requests that arrive while down fail at once rather than wait.
            while let Ok(request) = self.requests.try_recv() {
                let _ = request.done.send(Err(BrokerError::Unavailable));
            }
            // Jitter keeps replicas from reconnecting in lockstep.
            let jitter =
                Duration::from_millis(u64::from(rand_u16()) % (delay.as_millis() as u64 + 1));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay / 2 + jitter / 2) => {}
            }
            delay = (delay * 2).min(self.reconnect_max);
        }
    }

    async fn connect(
        &self,
    ) -> redis::RedisResult<(redis::aio::PubSubSink, redis::aio::PubSubStream)> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(self.reconnect_max);
        let manager = tokio::time::timeout(
            self.timeout,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
        })??;
        let pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })??;
        *self.commands.lock().unwrap_or_else(PoisonError::into_inner) = Some(manager);
        Ok(pubsub.split())
    }

    /// One connected period: subscribe what is wanted, then serve requests
    /// and messages until the connection or the server ends.
    async fn connected(
        &mut self,
        mut sink: redis::aio::PubSubSink,
        mut stream: redis::aio::PubSubStream,
        resumed: bool,
        metrics: &Metrics,
        stop: &CancellationToken,
    ) -> Ended {
        if sink.subscribe(control_topic(&self.prefix)).await.is_err() {
            return Ended::Lost;
        }
        let wanted = self.hub.channel_names();
        for channel in &wanted {
            if sink.subscribe(topic(&self.prefix, channel)).await.is_err() {
                return Ended::Lost;
            }
        }
        self.lock().extend(wanted.iter().cloned());
        if resumed {
            // Whatever was published while we were away never reached us.
            let notified = self.hub.notify_gap(&wanted);
            info!(
                channels = wanted.len(),
                subscribers = notified,
                "resubscribed after reconnecting to redis; subscribers told they may have missed messages"
            );
        } else {
            info!("connected to redis");
        }
        self.ready.store(true, Ordering::Relaxed);
        let released = Arc::clone(&self.released);
        let ended = loop {
            tokio::select! {
                () = stop.cancelled() => break Ended::Stopped,
                request = self.requests.recv() => {
                    let Some(request) = request else { break Ended::Stopped };
                    let result = sink.subscribe(topic(&self.prefix, &request.channel)).await;
                    let ok = result.is_ok();
                    if ok {
                        self.lock().insert(request.channel.clone());
                        // Its session may have given up meanwhile.
                        if !self.hub.has_subscribers(&request.channel) {
                            released.notify_one();
                        }
                    }
                    let _ = request.done.send(result.map_err(|_| BrokerError::Unavailable));
                    if !ok {
                        break Ended::Lost;
                    }
                }
                () = released.notified() => {
                    if self.unsubscribe_unwanted(&mut sink).await.is_err() {
                        break Ended::Lost;
                    }
                }
                message = stream.next() => {
                    let Some(message) = message else { break Ended::Lost };
                    if message.get_channel_name() == control_topic(&self.prefix) {
                        // A full queue drops it: the asking replica counts
                        // the replies it gets, and says so.
                        if let Ok(text) = message.get_payload::<String>() {
                            let _ = self.control.try_send(text);
                        }
                    } else {
                        self.deliver(&message, metrics);
                    }
                }
            }
        };
        self.lock().clear();
        *self.commands.lock().unwrap_or_else(PoisonError::into_inner) = None;
        ended
    }

    /// Unsubscribes confirmed channels that no local session wants now.
    async fn unsubscribe_unwanted(
        &self,
        sink: &mut redis::aio::PubSubSink,
    ) -> redis::RedisResult<()> {
        // Decided and forgotten under the lock: a session joining after
        // this finds the channel unconfirmed and asks for a new SUBSCRIBE,
        // which this task sends after the UNSUBSCRIBE below.
        let unwanted: Vec<ChannelName> = {
            let mut confirmed = self.lock();
            let gone: Vec<ChannelName> = confirmed
                .iter()
                .filter(|c| !self.hub.has_subscribers(c))
                .cloned()
                .collect();
            for c in &gone {
                confirmed.remove(c);
            }
            gone
        };
        for channel in unwanted {
            sink.unsubscribe(topic(&self.prefix, &channel)).await?;
        }
        Ok(())
    }

    fn deliver(&self, message: &redis::Msg, metrics: &Metrics) {
        let name = message.get_channel_name();
        let channel = name
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix(":msg:"))
            .and_then(|c| ChannelName::parse(c).ok());
        if let (Some(channel), Some((event, user))) =
            (&channel, presence::parse_event(message.get_payload_bytes()))
        {
            self.presence.announce(channel, event, user);
            return;
        }
        let parsed =
            parse_message(message.get_payload_bytes()).and_then(|(seq, epoch, from, data)| {
                let data: &RawValue = serde_json::from_str(data).ok()?;
                Some((seq, epoch, from, data))
            });
        let (Some(channel), Some((seq, epoch, from, data))) = (channel, parsed) else {
            warn!("ignored a malformed message from redis");
            return;
        };
        let template = MessageTemplate::new(&channel, from, data);
        let published = self.hub.deliver(&channel, epoch, seq, &template);
        metrics
            .messages_delivered
            .fetch_add(published.delivered as u64, Ordering::Relaxed);
    }
}

/// A few bits of randomness for jitter, without a dependency.
fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish() as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_any_user_id() {
        let data = RawValue::from_string(r#"{"t":"a b"}"#.into()).unwrap();
        for from in ["alice", "a b", "x 3 y", "ünï", ""] {
            let wire = format!("42 18c3f2a0b1c2d {}", payload(from, &data));
            assert_eq!(
                parse_message(wire.as_bytes()),
                Some((42, "18c3f2a0b1c2d", from, r#"{"t":"a b"}"#))
            );
        }
        assert_eq!(parse_message(b"x e 1 a{}"), None);
        assert_eq!(parse_message(b"1 e 9 a{}"), None);
        assert_eq!(parse_message(b"1 1 a{}"), None, "no epoch");
    }

    #[test]
    fn keys_share_a_cluster_slot() {
        let ch = ChannelName::parse("chat:lobby").unwrap();
        assert_eq!(seq_key("wsgate", &ch), "wsgate:{chat:lobby}:seq");
        assert_eq!(history_key("wsgate", &ch), "wsgate:{chat:lobby}:history");
        assert_eq!(epoch_key("wsgate", &ch), "wsgate:{chat:lobby}:epoch");
        assert_eq!(topic("wsgate", &ch), "wsgate:msg:chat:lobby");
    }
}
