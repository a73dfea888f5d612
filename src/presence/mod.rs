//! Presence (protocol.md §6): who is subscribed to a channel, per user,
//! and the `join` and `leave` frames of the sessions that watch it.
//!
//! [`Presence`] is this process's table, sharded by channel like the hub:
//! per channel, the users subscribed here (with how many of their sessions
//! are, and when a leave in grace falls due) and the sessions watching
//! (`subscribe` with `"presence":true`). A user's first subscription here
//! makes them a member; their last one ending starts the grace, kept in
//! one queue for the whole process ([`Presence::expire`], run by one
//! task), not a timer per connection. Grace is the same for every
//! member, so the queue is in deadline order and expiry costs O(1) each.
//!
//! On a single gateway the table decides: it sends the `join` when a user
//! becomes a member and the `leave` when the grace of their last
//! subscription ends. With a Redis backplane Redis decides, because a
//! user may be subscribed through several replicas: the table says when
//! a user is new here or gone from here, the broker tells Redis, and the
//! frames come back through Redis to every replica's watchers
//! ([`Presence::announce`]).
//!
//! Storm control: a channel with more than `max_listed` members gets no
//! `join` or `leave` at all (the `presence` op still answers its count),
//! so one membership change costs at most `max_listed` users' sessions
//! one frame each, never members².

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::channel::ChannelName;
use crate::config::PresenceConfig;
use crate::hub::Subscriber;
use crate::metrics::Metrics;
use crate::policy::Pattern;
use crate::protocol::ServerFrame;

const SHARDS: usize = 32;

/// Which channels keep presence, and its limits (compiled `[presence]`).
#[derive(Debug, Clone)]
pub struct PresenceRules {
    patterns: Vec<Pattern>,
    /// Above this many members: count only, no `join`/`leave`.
    pub max_listed: usize,
    /// From a user's last subscription ending to their `leave`.
    pub grace: Duration,
    /// Across replicas: how soon a member whose replica died is gone.
    pub ttl: Duration,
}

impl Default for PresenceRules {
    fn default() -> Self {
        Self {
            patterns: Vec::new(),
            max_listed: 100,
            grace: Duration::ZERO,
            ttl: Duration::from_secs(60),
        }
    }
}

impl PresenceRules {
    /// Compiles `[presence]`. Patterns use the policy syntax without
    /// templates: presence belongs to the channel, not to a user.
    ///
    /// # Errors
    /// The first pattern that does not compile, naming it.
    pub fn compile(cfg: &PresenceConfig) -> Result<Self, String> {
        let mut patterns = Vec::with_capacity(cfg.channels.len());
        for source in &cfg.channels {
            let pattern =
                Pattern::parse(source).map_err(|e| format!("presence.channels pattern: {e}"))?;
            if pattern.has_templates() {
                return Err(format!(
                    "presence.channels pattern {source:?}: templates ({{sub}}, {{claim.NAME}}) are for policies, not presence"
                ));
            }
            patterns.push(pattern);
        }
        Ok(Self {
            patterns,
            max_listed: cfg.max_listed,
            grace: Duration::from_millis(cfg.grace_ms),
            ttl: Duration::from_secs(cfg.ttl_s),
        })
    }

    /// Whether `channel` keeps presence.
    pub fn keeps(&self, channel: &ChannelName) -> bool {
        self.patterns.iter().any(|p| p.matches_channel(channel))
    }
}

/// A membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Join,
    Leave,
}

impl Event {
    /// The metric label, and the frame's `op`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Leave => "leave",
        }
    }
}

/// One user in one channel, on this process.
#[derive(Debug)]
struct Member {
    /// Their subscriptions to the channel here.
    sessions: u32,
    /// With no session left: when their grace ends.
    leaving: Option<Instant>,
}

#[derive(Debug, Default)]
struct Room {
    members: HashMap<Box<str>, Member>,
    /// Sessions that asked for `join` and `leave`.
    watchers: Vec<Subscriber>,
}

/// What a channel's presence is: its member count, and who they are
/// unless there are more than `max_listed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub count: usize,
    pub users: Option<Vec<String>>,
}

/// Members per channel on this process; see the module documentation.
#[derive(Debug)]
pub struct Presence {
    rules: PresenceRules,
    /// Whether this process decides joins and leaves (no Redis).
    decides: bool,
    shards: Box<[Mutex<HashMap<ChannelName, Room>>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Leaves in grace, in deadline order; a member who came back is
    /// skipped when their entry falls due.
    graces: Mutex<VecDeque<(Instant, ChannelName, Box<str>)>>,
    metrics: Arc<Metrics>,
}

impl Presence {
    /// `decides`: a single gateway, which sends joins and leaves itself.
    pub fn new(rules: PresenceRules, decides: bool, metrics: Arc<Metrics>) -> Self {
        Self {
            rules,
            decides,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            graces: Mutex::default(),
            metrics,
        }
    }

    pub fn rules(&self) -> &PresenceRules {
        &self.rules
    }

    /// Whether `channel` keeps presence.
    pub fn keeps(&self, channel: &ChannelName) -> bool {
        self.rules.keeps(channel)
    }

    fn shard(&self, channel: &ChannelName) -> MutexGuard<'_, HashMap<ChannelName, Room>> {
        let shard = &self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS];
        // A panic under the lock leaves plain data behind; keep serving.
        shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts sending `channel`'s `join` and `leave` frames to
    /// `subscriber` (once per session).
    pub fn watch(&self, channel: &ChannelName, subscriber: &Subscriber) {
        let mut shard = self.shard(channel);
        let room = shard.entry(channel.clone()).or_default();
        if !room
            .watchers
            .iter()
            .any(|w| w.session == subscriber.session)
        {
            room.watchers.push(subscriber.clone());
        }
    }

    /// Stops sending them to `session`.
    pub fn unwatch(&self, channel: &ChannelName, session: u64) {
        let mut shard = self.shard(channel);
        if let Some(room) = shard.get_mut(channel) {
            room.watchers.retain(|w| w.session != session);
            if room.members.is_empty() && room.watchers.is_empty() {
                shard.remove(channel);
            }
        }
    }

    /// One more subscription of `user` to `channel` here. Returns true
    /// when the user was not a member here before (not even in grace):
    /// with Redis, the broker must tell it. A single gateway sends the
    /// `join` itself.
    pub fn enter(&self, channel: &ChannelName, user: &str) -> bool {
        let mut shard = self.shard(channel);
        let room = shard.entry(channel.clone()).or_default();
        if let Some(member) = room.members.get_mut(user) {
            // A second tab, or a return within the grace: no join.
            member.sessions += 1;
            member.leaving = None;
            return false;
        }
        room.members.insert(
            user.into(),
            Member {
                sessions: 1,
                leaving: None,
            },
        );
        self.metrics
            .presence_members
            .fetch_add(1, Ordering::Relaxed);
        if self.decides {
            let count = room.members.len();
            self.tell(channel, room, Event::Join, user, count);
        }
        true
    }

    /// One subscription of `user` to `channel` here ended. When it was
    /// their last, the grace starts; with no grace they leave now, and
    /// the answer is true (with Redis, the broker must tell it).
    pub fn exit(&self, channel: &ChannelName, user: &str, now: Instant) -> bool {
        let mut shard = self.shard(channel);
        let Some(room) = shard.get_mut(channel) else {
            return false;
        };
        let Some(member) = room.members.get_mut(user) else {
            return false;
        };
        member.sessions = member.sessions.saturating_sub(1);
        if member.sessions > 0 {
            return false;
        }
        if self.rules.grace.is_zero() {
            self.remove(channel, &mut shard, user);
            return true;
        }
        let due = now + self.rules.grace;
        member.leaving = Some(due);
        drop(shard);
        self.graces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back((due, channel.clone(), user.into()));
        false
    }

    /// Removes `user` from `channel` (their grace ended, or there is none),
    /// sending the `leave` on a single gateway.
    fn remove(&self, channel: &ChannelName, shard: &mut HashMap<ChannelName, Room>, user: &str) {
        let Some(room) = shard.get_mut(channel) else {
            return;
        };
        if room.members.remove(user).is_none() {
            return;
        }
        self.metrics
            .presence_members
            .fetch_sub(1, Ordering::Relaxed);
        if self.decides {
            let count = room.members.len();
            self.tell(channel, room, Event::Leave, user, count);
        }
        if room.members.is_empty() && room.watchers.is_empty() {
            shard.remove(channel);
        }
    }

    /// Ends the graces due by `now`: those members leave (a single gateway
    /// sends the `leave`). Returns them, for the broker to tell Redis.
    pub fn expire(&self, now: Instant) -> Vec<(ChannelName, Box<str>)> {
        let mut due = Vec::new();
        {
            let mut graces = self.graces.lock().unwrap_or_else(PoisonError::into_inner);
            while graces.front().is_some_and(|(at, _, _)| *at <= now) {
                if let Some(entry) = graces.pop_front() {
                    due.push(entry);
                }
            }
        }
        let mut left = Vec::new();
        for (at, channel, user) in due {
            let mut shard = self.shard(&channel);
            // Skipped when the member came back (and maybe left again:
            // then a later entry is theirs).
            let still = shard
                .get(&channel)
                .and_then(|room| room.members.get(&*user))
                .is_some_and(|m| m.sessions == 0 && m.leaving == Some(at));
            if still {
                self.remove(&channel, &mut shard, &user);
                drop(shard);
                left.push((channel, user));
            }
        }
        left
    }

    /// Sends a membership change decided by Redis to this process's
    /// watchers of `channel` (Redis sends only what is to be sent).
    pub fn announce(&self, channel: &ChannelName, event: Event, user: &str) {
        let mut shard = self.shard(channel);
        if let Some(room) = shard.get_mut(channel) {
            self.send(channel, room, event, user);
        }
    }

    /// Sends `event` unless the channel has, with it, more members than
    /// can be listed.
    fn tell(&self, channel: &ChannelName, room: &mut Room, event: Event, user: &str, count: usize) {
        if count > self.rules.max_listed {
            self.metrics
                .presence_suppressed
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.send(channel, room, event, user);
    }

    fn send(&self, channel: &ChannelName, room: &mut Room, event: Event, user: &str) {
        if room.watchers.is_empty() {
            return;
        }
        let (channel, user) = (channel.as_str(), user);
        let frame = match event {
            Event::Join => ServerFrame::Join { channel, user },
            Event::Leave => ServerFrame::Leave { channel, user },
        };
        let frame = Utf8Bytes::from(frame.encode());
        let mut sent = 0;
        // A watcher whose outbox is full is cut off as any slow reader
        // (its session closes with 4008); a closed one is ending.
        room.watchers.retain(|w| {
            let ok = w.send(frame.clone());
            sent += u64::from(ok);
            ok
        });
        self.metrics.presence_events.add(event.as_str(), sent);
    }

    /// The members of `channel` here: on a single gateway, the answer to
    /// the `presence` op.
    pub fn listing(&self, channel: &ChannelName) -> Listing {
        let shard = self.shard(channel);
        let members = shard.get(channel).map(|room| &room.members);
        let count = members.map_or(0, HashMap::len);
        let users = (count <= self.rules.max_listed).then(|| {
            let mut users: Vec<String> = members
                .into_iter()
                .flat_map(|m| m.keys().map(|u| u.to_string()))
                .collect();
            users.sort_unstable();
            users
        });
        Listing { count, users }
    }

    /// Every channel with members or watchers here, with the members
    /// (in grace too): what a replica refreshes in Redis, and where it
    /// sweeps.
    pub fn local_members(&self) -> Vec<(ChannelName, Vec<String>)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            out.extend(shard.iter().map(|(channel, room)| {
                (
                    channel.clone(),
                    room.members.keys().map(|u| u.to_string()).collect(),
                )
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests;
