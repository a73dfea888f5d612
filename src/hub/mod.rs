//! Local fan-out: channel → subscribers, sharded by channel so publishers
//! on different channels never contend. A publication is encoded once and
//! the same bytes are pushed to every subscriber's [`Line`]: written
//! straight to its socket when nothing waits there, else queued in its
//! bounded outbox. The hub never awaits and holds a shard lock only for
//! the push loop, which also keeps each channel's order on every socket;
//! with direct writes that loop costs the publishing task about 5 µs per
//! subscriber (a TLS record and a syscall each), so a publication to
//! 1,000 subscribers holds its shard, and its worker thread, for about
//! 5 ms (a burst queues instead: see [`push`]).
//! A subscriber whose outbox is full is cut off (its `slow` token fires,
//! and its session closes with 4008); nobody else notices.
//!
//! The hub owns the count of local subscribers per channel: [`Hub::join`]
//! says whether a subscriber is the channel's first and [`Hub::leave`]
//! whether it was the last, which is when the gateway core asks the broker
//! to subscribe or release the channel. A joining subscriber is *pending*
//! (counted, but not delivered to) until [`Hub::activate`], so the core
//! can queue the `ok` of its subscribe before any message of the channel.
//!
//! In single-node mode ([`Hub::publish`]) a channel without history
//! exists while it has subscribers: its `seq` starts at 1 with the first
//! subscriber and restarts after the last one leaves. A channel that
//! keeps history ([`crate::history`]) is numbered and stored whether or
//! not anyone is subscribed, and is kept until it has been idle for its
//! age limit; its ring holds the very frames fanned out, and resumes are
//! answered from it under the channel's lock, so nothing published in
//! between can be missed or sent twice. With a cluster broker the `seq`
//! comes from the broker ([`Hub::deliver`]), and the hub only remembers
//! the last one delivered, to tell subscribers about gaps.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::channel::ChannelName;
use crate::history::{CHANNEL_OVERHEAD_BYTES, HistoryRules, Position, Read, Ring, Unrecovered};
use crate::line::{Line, Pushed};
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, MessageTemplate, PositionOk, ServerFrame};

/// The notice subscribers get when their channel may have lost messages.
const GAP_MESSAGE: &str = "messages on this channel may have been missed; resubscribe or resync";

const SHARDS: usize = 32;

/// A publication this soon after the channel's last fan-out ended is part
/// of a burst (see [`push`]). Measured at 1,000 subscribers: a burst's
/// publications follow each other within 1–8 µs, and one message in flight
/// at a time leaves at least 128 µs between them (a client's round trip).
const BURST_GAP: std::time::Duration = std::time::Duration::from_micros(100);

/// Who writes a publication to subscribers whose sockets are idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanout {
    /// The publishing task, straight to each idle socket (see [`push`]),
    /// unless the publication is part of a burst: cheapest per delivery,
    /// and the publisher's `ok` went out before the fan-out began.
    Inline,
    /// Always the subscribers' sessions, from their outboxes: for a
    /// publisher whose answer waits for the fan-out (the HTTP API), which
    /// then waits only for the frames to be queued, and whose concurrent
    /// publications each session writes together.
    Queued,
}

/// One session's end of a subscription.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// Process-unique session number.
    pub session: u64,
    /// The session's socket and queue, bounded in frames and in bytes
    /// (`websocket.outbox_frames`, `websocket.outbox_bytes`).
    pub line: Arc<Line>,
    /// Cancelled when the outbox was found full.
    pub slow: CancellationToken,
}

impl Subscriber {
    /// Delivers one frame; a full outbox (frames or bytes) cuts the
    /// subscriber off (its `slow` token fires). Returns whether the frame
    /// was delivered.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        matches!(self.deliver(&frame, true), Pushed::Written | Pushed::Queued)
    }

    /// Delivers one frame (straight to the socket only if `direct` and
    /// nothing waits there), firing `slow` when the outbox is full.
    fn deliver(&self, frame: &Utf8Bytes, direct: bool) -> Pushed {
        let pushed = self.line.push(frame, direct);
        if pushed == Pushed::Full {
            self.slow.cancel();
        }
        pushed
    }

    /// Whether `frames` fit in this outbox at once beside a reply: what a
    /// resume may replay without cutting its own client off.
    fn fits<'a>(&self, frames: impl IntoIterator<Item = &'a Utf8Bytes>) -> bool {
        self.line.fits(frames.into_iter().map(|f| f.len()).sum())
    }
}

#[derive(Debug, Default)]
struct Channel {
    seq: u64,
    subscribers: Vec<Subscriber>,
    /// Joined but not yet delivered to (see [`Hub::activate`]).
    pending: Vec<Pending>,
    /// Sessions cut off (full outbox) or ending (closed outbox): no longer
    /// delivered to, still counted until they leave, so the count of
    /// subscribers changes only through [`Hub::join`] and [`Hub::leave`].
    cut: Vec<u64>,
    /// The channel's recent frames, on a channel that keeps history.
    history: Option<Box<Ring>>,
    /// With a cluster broker: the epoch of the last message delivered
    /// here (`seq` holds its number).
    epoch: Option<Box<str>>,
    /// With a cluster broker: the last position read for a subscribe, and
    /// what it was read from (`since`), shared by the subscribers that
    /// ask the same while nothing newer has been delivered here.
    read: Option<Box<(Option<Position>, Arc<Read>)>>,
    /// When the last fan-out to the channel ended: a publication that
    /// follows it closely is queued, not written directly (see [`push`]).
    last_push: Option<Instant>,
}

/// A subscriber that has joined but is not delivered to yet.
#[derive(Debug)]
struct Pending {
    subscriber: Subscriber,
    /// While its position is read from the cluster broker: the messages
    /// delivered meanwhile (epoch, seq, frame), sent after the replay.
    buffer: Option<Vec<(Box<str>, u64, Utf8Bytes)>>,
    /// Replayed through this position (epoch, seq), which lay above the
    /// last message delivered here when its read answered: it has the `ok`
    /// and the replay, and is delivered to once a message reaches that
    /// position, so a message read from the broker before its own
    /// publication arrived here is not sent twice.
    floor: Option<(Box<str>, u64)>,
    /// Bytes in `buffer`.
    buffered: usize,
}

impl Channel {
    fn len(&self) -> usize {
        self.subscribers.len() + self.pending.len() + self.cut.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn has(&self, session: u64) -> bool {
        self.subscribers.iter().any(|s| s.session == session)
            || self.pending.iter().any(|p| p.subscriber.session == session)
            || self.cut.contains(&session)
    }
}

/// What [`Hub::join`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The channel had no local subscriber before this one.
    First,
    /// Others were there already.
    Again,
    /// This session was there already; nothing changed.
    Already,
}

/// What [`Hub::leave`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// It was the channel's last local subscriber.
    Last,
    /// Others remain.
    Others,
    /// The session was not subscribed (any more).
    NotThere,
}

/// What one publication did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// The `seq` given to it; 0 when the channel had no subscribers.
    pub seq: u64,
    /// Its epoch, on a channel that keeps history.
    pub epoch: Option<Arc<str>>,
    pub delivered: usize,
    /// Subscribers cut off because their outbox was full.
    pub slow: usize,
}

/// What [`Hub::activate`] did about a resume.
pub type Resumed = Option<Result<(), Unrecovered>>;

/// The subscription table, and the single-node history store.
#[derive(Debug)]
pub struct Hub {
    shards: Box<[Mutex<HashMap<ChannelName, Channel>>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Which channels keep history here: none with a cluster broker,
    /// whose history lives in Redis.
    rules: HistoryRules,
    /// `history_bytes` and `history_channels` are kept here, live.
    metrics: Arc<Metrics>,
    /// Set while one caller evicts, so the others do not pile on.
    evicting: AtomicBool,
}

impl Hub {
    pub fn new(rules: HistoryRules, metrics: Arc<Metrics>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            rules,
            metrics,
            evicting: AtomicBool::new(false),
        }
    }

    /// A new entry for `channel`, with a ring when it keeps history.
    fn new_entry(&self, channel: &ChannelName, now: Instant) -> Channel {
        let history = self.rules.limits(channel).map(|limits| {
            self.store_changed(CHANNEL_OVERHEAD_BYTES as isize, 1);
            Box::new(Ring::new(limits, now))
        });
        Channel {
            history,
            ..Channel::default()
        }
    }

    fn store_changed(&self, bytes: isize, channels: i64) {
        if bytes != 0 {
            self.metrics
                .history_bytes
                .fetch_add(bytes as i64, Ordering::Relaxed);
        }
        if channels != 0 {
            self.metrics
                .history_channels
                .fetch_add(channels, Ordering::Relaxed);
        }
    }

    /// Forgets `entry`'s ring in the accounting (the entry is dropped).
    fn forget(&self, entry: &Channel) {
        if let Some(ring) = &entry.history {
            self.store_changed(-((ring.bytes() + CHANNEL_OVERHEAD_BYTES) as isize), -1);
        }
    }

    fn shard(
        &self,
        channel: &ChannelName,
    ) -> std::sync::MutexGuard<'_, HashMap<ChannelName, Channel>> {
        let shard = &self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS];
        // A panic while holding a shard lock leaves plain data behind; keep serving.
        shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `subscriber` to `channel` as pending: counted, not yet
    /// delivered to. With `buffer`, messages delivered to the channel
    /// meanwhile are kept for it (see [`Hub::activate_read`]).
    pub fn join(&self, channel: &ChannelName, subscriber: Subscriber, buffer: bool) -> Joined {
        let mut shard = self.shard(channel);
        let entry = shard
            .entry(channel.clone())
            .or_insert_with(|| self.new_entry(channel, Instant::now()));
        if entry.has(subscriber.session) {
            return Joined::Already;
        }
        let first = entry.is_empty();
        entry.pending.push(Pending {
            subscriber,
            buffer: buffer.then(Vec::new),
            floor: None,
            buffered: 0,
        });
        if first { Joined::First } else { Joined::Again }
    }

    /// Starts delivering `channel`'s messages to a pending `session`. Under
    /// the channel's lock, first queues the subscribe's `ok` (when `id` is
    /// set: with the channel's position on a history channel, and the
    /// resume's outcome when `since` is set) and the frames a resume
    /// replays, so live messages follow them with no gap and no repeat.
    /// Returns what became of the resume; `None` also when the session is
    /// not pending there (it left meanwhile).
    pub fn activate(
        &self,
        channel: &ChannelName,
        session: u64,
        id: Option<u64>,
        since: Option<&Position>,
    ) -> Resumed {
        let mut shard = self.shard(channel);
        let entry = shard.get_mut(channel)?;
        let at = entry
            .pending
            .iter()
            .position(|p| p.subscriber.session == session)?;
        let subscriber = entry.pending.swap_remove(at).subscriber;
        let ring = entry.history.as_deref();
        let replay = since.map(|since| match ring {
            None => Err(Unrecovered::NoHistory),
            Some(ring) => ring
                .missed(since, entry.seq, self.rules.max_replay)
                // More bytes than its outbox holds would cut it off.
                .and_then(|frames| {
                    let frames: Vec<&Utf8Bytes> = frames.collect();
                    if subscriber.fits(frames.iter().copied()) {
                        Ok(frames)
                    } else {
                        Err(Unrecovered::TooMany)
                    }
                }),
        });
        let resumed = replay
            .as_ref()
            .map(|r| r.as_ref().map(|_| ()).map_err(|e| *e));
        if let Some(id) = id {
            let position = ring.map(|r| (&*r.epoch, entry.seq));
            let outcome = resumed.map(|r| r.map_err(Unrecovered::as_str));
            let ok = PositionOk::new(id, position, outcome).encode();
            subscriber.send(Utf8Bytes::from(ok));
        }
        if let Some(Ok(frames)) = replay {
            for frame in frames {
                subscriber.send(frame.clone());
            }
        }
        entry.subscribers.push(subscriber);
        resumed
    }

    /// Starts delivering to a pending `session` whose position was read
    /// from the cluster broker: queues the `ok` (with `read`'s position and
    /// outcome), the replayed frames, then the messages delivered while it
    /// waited that lie above the replay, so none is missed or repeated.
    /// Returns false when the session is not pending there.
    pub fn activate_read(
        &self,
        channel: &ChannelName,
        session: u64,
        id: Option<u64>,
        read: &Read,
    ) -> bool {
        let mut shard = self.shard(channel);
        let Some(entry) = shard.get_mut(channel) else {
            return false;
        };
        let Some(at) = entry
            .pending
            .iter()
            .position(|p| p.subscriber.session == session)
        else {
            return false;
        };
        if entry.pending[at].floor.is_some() {
            return false;
        }
        let Pending {
            subscriber, buffer, ..
        } = entry.pending.swap_remove(at);
        // A replay of more bytes than its outbox holds would cut it off.
        let fits = subscriber.fits(&read.frames);
        let outcome = match read.outcome {
            Some(Ok(())) if !fits => Some(Err(Unrecovered::TooMany)),
            other => other,
        };
        let replayed: &[Utf8Bytes] = if fits { &read.frames } else { &[] };
        if let Some(id) = id {
            let outcome = outcome.map(|r| r.map_err(Unrecovered::as_str));
            let ok = PositionOk::new(id, Some((&read.epoch, read.seq)), outcome).encode();
            subscriber.send(Utf8Bytes::from(ok));
        }
        for frame in replayed {
            subscriber.send(frame.clone());
        }
        let behind = entry
            .epoch
            .as_deref()
            .is_none_or(|e| e == read.epoch.as_str())
            && entry.seq < read.seq;
        if behind {
            // What it buffered lies at or below the local position, so
            // inside the replay; live delivery waits for the read's top.
            entry.pending.push(Pending {
                subscriber,
                buffer: Some(Vec::new()),
                floor: Some((read.epoch.as_str().into(), read.seq)),
                buffered: 0,
            });
            return true;
        }
        for (epoch, seq, frame) in buffer.unwrap_or_default() {
            // Above the replay in its epoch, or a numbering begun since.
            if *epoch != *read.epoch || seq > read.seq {
                subscriber.send(frame);
            }
        }
        if entry.seq == 0 && entry.epoch.is_none() {
            // The position a gap notice names until a message arrives.
            entry.epoch = Some(read.epoch.as_str().into());
            entry.seq = read.seq;
        }
        entry.subscribers.push(subscriber);
        true
    }

    /// A read of `channel`'s position (from `since`) that is still exact
    /// for a subscriber that joined before this call: nothing delivered
    /// here lies above it, and what arrives from now on is buffered for
    /// the subscriber. A reconnect storm then costs one read per channel
    /// and position, not one per client.
    pub fn cached_read(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
    ) -> Option<Arc<Read>> {
        let shard = self.shard(channel);
        let entry = shard.get(channel)?;
        let (key, read) = entry.read.as_deref()?;
        let current = match entry.epoch.as_deref() {
            None => entry.seq == 0,
            Some(epoch) => *epoch == *read.epoch && entry.seq <= read.seq,
        };
        (key.as_ref() == since && current).then(|| Arc::clone(read))
    }

    /// Keeps `read` (made from `since`) for [`Hub::cached_read`].
    pub fn store_read(&self, channel: &ChannelName, since: Option<&Position>, read: &Arc<Read>) {
        if let Some(entry) = self.shard(channel).get_mut(channel) {
            entry.read = Some(Box::new((since.cloned(), Arc::clone(read))));
        }
    }

    /// The last `limit` stored frames of `channel` and its position, or
    /// `None` when it keeps no history here. A history channel not seen
    /// yet starts its numbering (seq 0), so a client may resume from it.
    pub fn history(
        &self,
        channel: &ChannelName,
        limit: usize,
    ) -> Option<(Position, Vec<Utf8Bytes>)> {
        self.rules.limits(channel)?;
        let now = Instant::now();
        let mut shard = self.shard(channel);
        let entry = shard
            .entry(channel.clone())
            .or_insert_with(|| self.new_entry(channel, now));
        let seq = entry.seq;
        let ring = entry.history.as_deref_mut()?;
        let freed = ring.expire(now);
        self.store_changed(-(freed as isize), 0);
        let position = Position {
            epoch: ring.epoch.to_string(),
            seq,
        };
        Some((position, ring.last(limit).cloned().collect()))
    }

    /// Removes `session` from `channel`, pending or not.
    pub fn leave(&self, channel: &ChannelName, session: u64) -> Left {
        let mut shard = self.shard(channel);
        let Some(entry) = shard.get_mut(channel) else {
            return Left::NotThere;
        };
        let before = entry.len();
        entry.subscribers.retain(|s| s.session != session);
        entry.pending.retain(|p| p.subscriber.session != session);
        entry.cut.retain(|s| *s != session);
        if entry.len() == before {
            return Left::NotThere;
        }
        if !entry.is_empty() {
            return Left::Others;
        }
        // A history channel outlives its subscribers (the sweep forgets it
        // once idle for its age limit); any other goes now.
        if entry.history.is_none() {
            shard.remove(channel);
        }
        Left::Last
    }

    /// Whether `channel` has a local subscriber, pending ones included.
    pub fn has_subscribers(&self, channel: &ChannelName) -> bool {
        self.shard(channel)
            .get(channel)
            .is_some_and(|e| !e.is_empty())
    }

    /// Channels whose name starts with `prefix`, with their local
    /// subscribers (pending ones included), sorted by name.
    pub fn channel_counts(&self, prefix: &str) -> Vec<(ChannelName, usize)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            out.extend(
                shard
                    .iter()
                    .filter(|(c, e)| {
                        c.as_str().starts_with(prefix) && e.subscribers.len() + e.pending.len() > 0
                    })
                    .map(|(c, e)| (c.clone(), e.subscribers.len() + e.pending.len())),
            );
        }
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        out
    }

    /// Every channel with a local subscriber, pending ones included.
    pub fn channel_names(&self) -> Vec<ChannelName> {
        let mut names = Vec::new();
        for shard in &self.shards {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            names.extend(
                shard
                    .iter()
                    .filter(|(_, e)| !e.is_empty())
                    .map(|(c, _)| c.clone()),
            );
        }
        names
    }

    /// Drops history past its age, and forgets history channels with no
    /// subscriber idle past their age limit. Run now and then.
    pub fn sweep(&self, now: Instant) {
        for shard in &self.shards {
            let mut shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            shard.retain(|_, entry| {
                let idle = entry.is_empty();
                let Some(ring) = entry.history.as_deref_mut() else {
                    return true;
                };
                let freed = ring.expire(now);
                self.store_changed(-(freed as isize), 0);
                if idle && ring.is_stale(now) {
                    self.forget(entry);
                    return false;
                }
                true
            });
        }
    }

    /// Evicts whole history channels, least recently active first, until
    /// the store is under 90 % of `history.max_bytes` (so one eviction
    /// makes room for many publications). An evicted channel with
    /// subscribers keeps its `seq` and starts a new epoch; one without is
    /// forgotten. Called outside any shard lock.
    fn evict(&self) {
        if self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        let target = (self.rules.max_bytes / 10 * 9) as i64;
        let mut idle: Vec<(Instant, ChannelName)> = Vec::new();
        for shard in &self.shards {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            idle.extend(
                shard
                    .iter()
                    .filter_map(|(c, e)| e.history.as_ref().map(|r| (r.last_activity, c.clone()))),
            );
        }
        idle.sort_unstable_by_key(|(at, _)| *at);
        for (_, channel) in idle {
            if self.metrics.history_bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            let mut shard = self.shard(&channel);
            let Some(entry) = shard.get_mut(&channel) else {
                continue;
            };
            self.metrics
                .history_evictions
                .fetch_add(1, Ordering::Relaxed);
            if entry.is_empty() {
                self.forget(entry);
                shard.remove(&channel);
            } else if let Some(ring) = entry.history.as_deref_mut() {
                let freed = ring.restart();
                self.store_changed(-(freed as isize), 0);
            }
        }
        self.evicting.store(false, Ordering::Release);
    }

    /// Delivers one publication to every subscriber of `channel`, in `seq`
    /// order per channel.
    pub fn publish(
        &self,
        channel: &ChannelName,
        message: &MessageTemplate,
        fanout: Fanout,
    ) -> Published {
        let mut shard = self.shard(channel);
        let entry = match shard.get_mut(channel) {
            Some(entry) => entry,
            // Numbered and stored with nobody subscribed, on a history channel.
            None if self.rules.limits(channel).is_some() => shard
                .entry(channel.clone())
                .or_insert_with(|| self.new_entry(channel, Instant::now())),
            None => return Published::default(),
        };
        entry.seq += 1;
        let frame = Utf8Bytes::from(message.with_seq(entry.seq));
        let mut out = Published {
            seq: entry.seq,
            ..Published::default()
        };
        push(entry, None, &frame, fanout, &mut out);
        if let Some(ring) = entry.history.as_deref_mut() {
            out.epoch = Some(Arc::clone(&ring.epoch));
            let grown = ring.push(entry.seq, &frame, Instant::now());
            self.store_changed(grown, 0);
            drop(shard);
            if self.metrics.history_bytes.load(Ordering::Relaxed) > self.rules.max_bytes as i64 {
                self.evict();
            }
        }
        out
    }

    /// Delivers a publication numbered elsewhere (by the cluster broker),
    /// `seq` within `epoch`. A `seq` that skips ahead of the last one
    /// delivered here, or a new epoch, first gets every subscriber a gap
    /// notice naming the last position delivered; one at or below it in
    /// the same epoch (a duplicate) is dropped. Subscribers still waiting
    /// for their position keep it for later.
    pub fn deliver(
        &self,
        channel: &ChannelName,
        epoch: &str,
        seq: u64,
        message: &MessageTemplate,
    ) -> Published {
        self.deliver_numbered(channel, epoch, seq, message, Fanout::Inline, false)
    }

    /// Delivers this replica's own publication as soon as the cluster
    /// broker has numbered it, when it is the next one here: the
    /// publisher's `ok` then means its subscribers on this replica have it
    /// even if the broker dies before the echo goes out (the echo is a
    /// duplicate and dropped). Anything else waits for the echo, which
    /// keeps the order: a publication from another replica may still be
    /// on its way with the number before.
    pub fn deliver_own(
        &self,
        channel: &ChannelName,
        epoch: &str,
        seq: u64,
        message: &MessageTemplate,
        fanout: Fanout,
    ) -> Published {
        self.deliver_numbered(channel, epoch, seq, message, fanout, true)
    }

    /// [`Hub::deliver`], or [`Hub::deliver_own`] when `only_next`.
    fn deliver_numbered(
        &self,
        channel: &ChannelName,
        epoch: &str,
        seq: u64,
        message: &MessageTemplate,
        fanout: Fanout,
        only_next: bool,
    ) -> Published {
        let mut shard = self.shard(channel);
        let Some(entry) = shard.get_mut(channel) else {
            return Published::default();
        };
        let next = entry.epoch.as_deref() == Some(epoch) && entry.seq.checked_add(1) == Some(seq);
        if only_next && !next {
            return Published::default();
        }
        let same_epoch = entry.epoch.as_deref().is_none_or(|e| e == epoch);
        if same_epoch && entry.seq != 0 && seq <= entry.seq {
            return Published::default();
        }
        let gap = if same_epoch {
            entry.seq != 0 && seq > entry.seq + 1
        } else {
            true
        };
        let notice = gap.then(|| gap_notice(channel, entry.epoch.as_deref(), entry.seq));
        if !same_epoch || entry.epoch.is_none() {
            entry.epoch = Some(epoch.into());
        }
        entry.seq = seq;
        let frame = Utf8Bytes::from(message.with_seq(seq));
        let mut out = Published {
            seq,
            ..Published::default()
        };
        push(entry, notice.as_ref(), &frame, fanout, &mut out);
        buffer(entry, epoch, seq, &frame);
        release(entry, epoch, seq);
        out
    }

    /// Tells every local subscriber of `channels` that messages may have
    /// been missed, and forgets the last `seq` seen, so the next message
    /// starts afresh. Returns how many subscribers were told.
    pub fn notify_gap(&self, channels: &[ChannelName]) -> usize {
        let mut told = 0;
        for channel in channels {
            let mut shard = self.shard(channel);
            let Some(entry) = shard.get_mut(channel) else {
                continue;
            };
            let notice = gap_notice(channel, entry.epoch.as_deref(), entry.seq);
            entry.seq = 0;
            entry.epoch = None;
            // What was read before the outage may miss what it lost.
            entry.read = None;
            let mut out = Published::default();
            push(entry, None, &notice, Fanout::Queued, &mut out);
            told += out.delivered;
            // Those waiting for their floor have had everything through
            // it; from there on they may miss messages too.
            let mut at = 0;
            while at < entry.pending.len() {
                let Some((epoch, seq)) = entry.pending[at].floor.take() else {
                    at += 1;
                    continue;
                };
                let waiting = entry.pending.swap_remove(at);
                if waiting
                    .subscriber
                    .send(gap_notice(channel, Some(&epoch), seq))
                {
                    told += 1;
                }
                entry.subscribers.push(waiting.subscriber);
            }
        }
        told
    }

    /// Number of channels with at least one subscriber.
    #[cfg(test)]
    pub fn channels(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }
}

/// Queues `frame`, after `notice` when there is one, to every subscriber,
/// counting them in `out`. A full outbox cuts that subscriber off (its
/// `slow` token fires); a closed one belongs to a session that is ending.
/// Either way it is delivered to no more and moves to `cut`, where it is
/// counted until its session leaves.
///
/// With [`Fanout::Inline`], a publication is written straight to each
/// subscriber's idle socket by the publishing task: one TLS record and one
/// write each, no session woken.
/// In a burst that would cost a record and a write per message per
/// subscriber, so a publication that follows the channel's last fan-out
/// within [`BURST_GAP`] (it was waiting while that one went out) is queued
/// instead, and each session writes what queued up as one record and one
/// write.
fn push(
    entry: &mut Channel,
    notice: Option<&Utf8Bytes>,
    frame: &Utf8Bytes,
    fanout: Fanout,
    out: &mut Published,
) {
    let start = Instant::now();
    let direct = fanout == Fanout::Inline
        && entry
            .last_push
            .is_none_or(|last| start.saturating_duration_since(last) >= BURST_GAP);
    let cut = &mut entry.cut;
    entry.subscribers.retain(|s| {
        let pushed = match notice.map(|n| s.deliver(n, direct)) {
            None | Some(Pushed::Written | Pushed::Queued) => s.deliver(frame, direct),
            Some(failed) => failed,
        };
        match pushed {
            Pushed::Written | Pushed::Queued => {
                out.delivered += 1;
                return true;
            }
            Pushed::Full => out.slow += 1,
            Pushed::Closed => {}
        }
        cut.push(s.session);
        false
    });
    entry.last_push = Some(Instant::now());
}

/// Keeps `frame` for every pending subscriber that waits for its
/// position; one whose wait outgrows its outbox is cut off, as a slow
/// reader would be.
fn buffer(entry: &mut Channel, epoch: &str, seq: u64, frame: &Utf8Bytes) {
    let cut = &mut entry.cut;
    entry.pending.retain_mut(|p| {
        let Some(buffer) = &mut p.buffer else {
            return true;
        };
        // Bounded as its outbox is, in frames and in bytes.
        let bytes = p.buffered + frame.len();
        if buffer.len() >= p.subscriber.line.max_frames() || bytes > p.subscriber.line.max_bytes() {
            p.subscriber.slow.cancel();
            cut.push(p.subscriber.session);
            return false;
        }
        buffer.push((epoch.into(), seq, frame.clone()));
        p.buffered = bytes;
        true
    });
}

/// Starts delivering to the pending subscribers whose floor the message
/// at (`epoch`, `seq`) reaches (or passes, in a numbering begun since),
/// with what they buffered above it.
fn release(entry: &mut Channel, epoch: &str, seq: u64) {
    let mut at = 0;
    while at < entry.pending.len() {
        let reached = entry.pending[at]
            .floor
            .as_ref()
            .is_some_and(|(e, s)| **e != *epoch || seq >= *s);
        if !reached {
            at += 1;
            continue;
        }
        let Pending {
            subscriber,
            buffer,
            floor,
            ..
        } = entry.pending.swap_remove(at);
        if let Some((floor_epoch, floor_seq)) = floor {
            for (e, s, frame) in buffer.unwrap_or_default() {
                if e != floor_epoch || s > floor_seq {
                    subscriber.send(frame);
                }
            }
        }
        entry.subscribers.push(subscriber);
    }
}

/// The notice that messages of `channel` may have been missed, naming the
/// last position delivered here when there is one.
fn gap_notice(channel: &ChannelName, epoch: Option<&str>, seq: u64) -> Utf8Bytes {
    let mut text = ServerFrame::Error {
        id: None,
        code: ErrorCode::Internal,
        message: GAP_MESSAGE,
        channel: Some(channel.as_str()),
    }
    .encode();
    if let Some(epoch) = epoch {
        text.pop();
        text.push_str(r#","epoch":"#);
        text.push_str(&serde_json::to_string(epoch).unwrap_or_default());
        text.push_str(r#","seq":"#);
        text.push_str(itoa::Buffer::new().format(seq));
        text.push('}');
    }
    Utf8Bytes::from(text)
}

#[cfg(test)]
mod tests;
