//! Presence through Redis: the members of a channel on every replica, in
//! keys hash-tagged per channel like its history (see
//! [`PRESENCE_SCRIPT`] for what they hold and how joins and leaves are
//! decided). [`PresenceWorker`] owns this replica's side: it sends the
//! core's enters and exits in batches, in the order they happened; every
//! third of `presence.ttl_s` it renews all of this replica's members (and
//! sweeps the channels they are in) in one pipelined batch; and when the
//! server stops it hands its members to the sweep, shortened to the grace,
//! so a user who reconnects to another replica meanwhile never leaves.
//!
//! A replica's entries live two thirds of the time-to-live, renewed every
//! third: a replica that dies stops renewing, its entries expire, and the
//! next sweep (at most a third later) sends their leaves, within the
//! time-to-live of the crash. A failed call is not retried: the next
//! renewal adds what an enter missed, and an exit that was missed expires.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::scripts::PRESENCE_SCRIPT;
use crate::channel::ChannelName;
use crate::metrics::Metrics;
use crate::presence::{Event, Presence};

/// Enters and exits queued for the worker before new ones are dropped
/// (an enter then waits for the next renewal, an exit for the expiry).
pub(super) const PRESENCE_QUEUE: usize = 16 * 1024;

/// Most operations sent to Redis in one batch.
const BATCH: usize = 512;

/// Most users renewed by one script call, so no call blocks Redis long.
const RENEW_CHUNK: usize = 500;

/// One change of this replica's members.
#[derive(Debug)]
pub(super) struct PresenceOp {
    pub channel: ChannelName,
    pub user: Box<str>,
    pub enter: bool,
    /// Answered once Redis has it (an enter the subscribe waits for).
    pub done: Option<oneshot::Sender<()>>,
}

fn members_key(prefix: &str, channel: &ChannelName) -> String {
    format!("{prefix}:{{{}}}:presence", channel.as_str())
}

fn users_key(prefix: &str, channel: &ChannelName) -> String {
    format!("{prefix}:{{{}}}:presence:users", channel.as_str())
}

fn sweep_key(prefix: &str, channel: &ChannelName) -> String {
    format!("{prefix}:{{{}}}:presence:sweep", channel.as_str())
}

/// A join or leave on a channel's topic: `"J <user>"` or `"L <user>"`
/// (a message starts with its `seq`, a number).
pub(crate) fn parse_event(bytes: &[u8]) -> Option<(Event, &str)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (kind, user) = text.split_once(' ')?;
    match kind {
        "J" => Some((Event::Join, user)),
        "L" => Some((Event::Leave, user)),
        _ => None,
    }
}

/// What the script is asked to do.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Enter,
    Exit,
    Refresh,
    Handoff,
    Read,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Enter => "enter",
            Self::Exit => "exit",
            Self::Refresh => "refresh",
            Self::Handoff => "handoff",
            Self::Read => "read",
        }
    }
}

/// What the script needs besides the channel, the mode and the users.
#[derive(Debug, Clone)]
pub(super) struct PresenceKeys {
    pub prefix: String,
    /// This process's name in member entries, new at every start.
    pub replica: String,
    pub max_listed: usize,
    pub grace: Duration,
    pub ttl: Duration,
    pub timeout: Duration,
    pub script: Arc<redis::Script>,
}

impl PresenceKeys {
    pub fn new(prefix: &str, rules: &crate::presence::PresenceRules, timeout: Duration) -> Self {
        Self {
            prefix: prefix.to_owned(),
            replica: crate::history::new_epoch(),
            max_listed: rules.max_listed,
            grace: rules.grace,
            ttl: rules.ttl,
            timeout,
            script: Arc::new(redis::Script::new(PRESENCE_SCRIPT)),
        }
    }

    /// How often channels are swept; members are renewed every other time.
    fn period(&self) -> Duration {
        self.ttl / 6
    }

    /// One script call; its answer, or `None` when Redis failed.
    async fn call(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        channel: &ChannelName,
        mode: Mode,
        users: &[&str],
    ) -> Option<Vec<redis::Value>> {
        let life = match mode {
            Mode::Handoff => self.grace,
            _ => self.ttl / 2,
        };
        // The lock lapses a little before the next sweep is due, so timer
        // jitter never makes a sweeper wait a whole period more.
        let sweep = match mode {
            Mode::Refresh | Mode::Read => self.period().mul_f64(0.8),
            _ => Duration::ZERO,
        };
        let mut invocation = self.script.key(members_key(&self.prefix, channel));
        invocation
            .key(users_key(&self.prefix, channel))
            .key(sweep_key(&self.prefix, channel))
            .arg(mode.as_str())
            .arg(super::topic(&self.prefix, channel))
            .arg(&self.replica)
            .arg(life.as_millis() as u64)
            .arg(self.max_listed)
            .arg((self.ttl * 3).as_millis() as u64)
            .arg(sweep.as_millis() as u64);
        for user in users {
            invocation.arg(*user);
        }
        let answer = invocation.invoke_async::<Vec<redis::Value>>(conn);
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                debug!(error = %e, "presence through redis failed");
                None
            }
            Err(_) => None,
        }
    }

    /// The count of `channel`'s members on every replica, and who they
    /// are when there are at most `max_listed`.
    pub async fn read(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        channel: &ChannelName,
    ) -> Option<crate::presence::Listing> {
        let answer = self.call(conn, channel, Mode::Read, &[]).await?;
        let mut items = answer.into_iter();
        let count: usize = redis::from_redis_value(items.next()?).ok()?;
        let users = (count <= self.max_listed).then(|| {
            let mut users: Vec<String> = items
                .filter_map(|v| redis::from_redis_value(v).ok())
                .collect();
            users.sort_unstable();
            users
        });
        Some(crate::presence::Listing { count, users })
    }
}

/// This replica's presence in Redis; see the module documentation.
pub struct PresenceWorker {
    pub(super) keys: PresenceKeys,
    pub(super) ops: mpsc::Receiver<PresenceOp>,
    pub(super) commands: Arc<Mutex<Option<redis::aio::ConnectionManager>>>,
    pub(super) presence: Arc<Presence>,
    pub(super) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for PresenceWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceWorker").finish_non_exhaustive()
    }
}

impl PresenceWorker {
    fn conn(&self) -> Option<redis::aio::ConnectionManager> {
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs until `stop`, then hands this replica's members over.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.keys.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                op = self.ops.recv() => {
                    let Some(op) = op else { break };
                    let mut batch = vec![op];
                    while batch.len() < BATCH {
                        match self.ops.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    self.apply(batch).await;
                }
                _ = tick.tick() => {
                    ticks += 1;
                    // Every tick sweeps; the first and every other one renew.
                    let renew = ticks % 2 == 1;
                    self.renew(Mode::Refresh, renew).await;
                }
            }
        }
        let mut rest = Vec::new();
        while let Ok(op) = self.ops.try_recv() {
            rest.push(op);
        }
        self.apply(rest).await;
        self.renew(Mode::Handoff, true).await;
    }

    /// Sends a batch of enters and exits, pipelined, in their order.
    async fn apply(&self, batch: Vec<PresenceOp>) {
        if batch.is_empty() {
            return;
        }
        let Some(conn) = self.conn() else {
            // Answered by dropping `done`; the next renewal catches up.
            return;
        };
        let calls = batch.iter().map(|op| {
            let mut conn = conn.clone();
            let mode = if op.enter { Mode::Enter } else { Mode::Exit };
            async move {
                self.keys
                    .call(&mut conn, &op.channel, mode, &[&op.user])
                    .await
            }
        });
        let answers = join_all(calls).await;
        for (op, answer) in batch.into_iter().zip(answers) {
            if let Some(answer) = answer {
                self.count(&answer);
                if let Some(done) = op.done {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Sweeps the channels this replica has members or watchers in, and
    /// with `members` renews (or hands over) every member too, in one
    /// pipelined batch.
    async fn renew(&self, mode: Mode, members: bool) {
        let Some(conn) = self.conn() else {
            return;
        };
        let mut rooms = self.presence.local_members();
        if !members {
            for (_, users) in &mut rooms {
                users.clear();
            }
        }
        let mut calls = Vec::new();
        for (channel, users) in &rooms {
            if users.is_empty() {
                if matches!(mode, Mode::Refresh) {
                    // Watchers only, or a sweep-only tick.
                    calls.push((channel, Vec::new()));
                }
                continue;
            }
            for chunk in users.chunks(RENEW_CHUNK) {
                calls.push((channel, chunk.iter().map(String::as_str).collect()));
            }
        }
        let answers = join_all(calls.iter().map(|(channel, users)| {
            let mut conn = conn.clone();
            async move { self.keys.call(&mut conn, channel, mode, users).await }
        }))
        .await;
        let failed = answers.iter().filter(|a| a.is_none()).count();
        for answer in answers.iter().flatten() {
            self.count(answer);
        }
        if failed > 0 {
            warn!(
                failed,
                calls = calls.len(),
                "could not renew some presence members in redis"
            );
        }
    }

    /// Counts what one call did: suppressed events and sweeps.
    fn count(&self, answer: &[redis::Value]) {
        let n = |i: usize| -> u64 {
            answer
                .get(i)
                .and_then(|v| redis::from_redis_value(v.clone()).ok())
                .unwrap_or(0)
        };
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.presence_suppressed.fetch_add(n(1), Relaxed);
        self.metrics.presence_expired.fetch_add(n(2), Relaxed);
        self.metrics.presence_sweeps.fetch_add(n(3), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_told_from_messages() {
        assert_eq!(parse_event(b"J bob"), Some((Event::Join, "bob")));
        assert_eq!(parse_event(b"L a b c"), Some((Event::Leave, "a b c")));
        assert_eq!(parse_event(b"L "), Some((Event::Leave, "")));
        assert_eq!(parse_event(b"42 e 3 bob{}"), None);
        assert_eq!(parse_event(b"J"), None);
        assert_eq!(parse_event(b"\xff bob"), None);
    }

    #[test]
    fn keys_share_the_channel_slot() {
        let ch = ChannelName::parse("chat:lobby").unwrap();
        assert_eq!(members_key("w", &ch), "w:{chat:lobby}:presence");
        assert_eq!(users_key("w", &ch), "w:{chat:lobby}:presence:users");
        assert_eq!(sweep_key("w", &ch), "w:{chat:lobby}:presence:sweep");
    }
}
