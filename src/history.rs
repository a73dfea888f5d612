//! History on a single gateway (protocol.md §5): which channels keep it
//! ([`HistoryRules`], compiled from `[history]`), positions ([`Position`]:
//! an epoch and a `seq`), and the bounded ring of one channel's recent
//! frames ([`Ring`]). The hub holds a ring per history channel, filled
//! with the very frames it fans out (shared bytes, no second copy), and
//! answers resumes and history reads from it under the channel's lock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::channel::ChannelName;
use crate::config::HistoryConfig;
use crate::policy::Pattern;

/// What one stored channel costs beyond its frames (entry, ring, epoch),
/// counted against `history.max_bytes` so that many empty channels are
/// bounded too.
pub const CHANNEL_OVERHEAD_BYTES: usize = 256;

/// A place in a channel's numbering: `seq` within `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

/// How much of one channel is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most messages kept.
    pub max_messages: usize,
    /// Messages older than this are dropped, and a channel with no
    /// subscriber and no publication for this long is forgotten.
    pub max_age: Duration,
}

/// The channels that keep history and their limits: the first rule whose
/// pattern matches decides.
#[derive(Debug, Clone, Default)]
pub struct HistoryRules {
    rules: Vec<(Pattern, Limits)>,
    /// Most messages one resume replays.
    pub max_replay: usize,
    /// Bytes all channels' stored frames may take together.
    pub max_bytes: usize,
}

impl HistoryRules {
    /// Compiles `[history]`. Patterns use the policy syntax (`*`, `>`) but
    /// no templates: history belongs to the channel, not to a user.
    ///
    /// # Errors
    /// The first pattern that does not compile, naming it.
    /// A resume replays at most `history.max_replay` and never more than
    /// fits in a session's outbox beside its `ok` (`outbox_frames` − 2),
    /// so a replay can never cut its own client off as a slow reader.
    pub fn compile(cfg: &HistoryConfig, outbox_frames: usize) -> Result<Self, String> {
        let mut rules = Vec::with_capacity(cfg.channels.len());
        for rule in &cfg.channels {
            let pattern = Pattern::parse(&rule.pattern)
                .map_err(|e| format!("history.channels pattern: {e}"))?;
            if pattern.has_templates() {
                return Err(format!(
                    "history.channels pattern {:?}: templates ({{sub}}, {{claim.NAME}}) are for policies, not history",
                    rule.pattern
                ));
            }
            rules.push((
                pattern,
                Limits {
                    max_messages: rule.max_messages,
                    max_age: Duration::from_secs(rule.max_age_s),
                },
            ));
        }
        Ok(Self {
            rules,
            max_replay: cfg.max_replay.min(outbox_frames.saturating_sub(2)),
            max_bytes: cfg.max_bytes,
        })
    }

    /// The limits for `channel`, or `None` when it keeps no history.
    pub fn limits(&self, channel: &ChannelName) -> Option<Limits> {
        self.rules
            .iter()
            .find(|(p, _)| p.matches_channel(channel))
            .map(|(_, l)| *l)
    }
}

/// A fresh random epoch: 12 hex characters (48 bits), so a restarted
/// gateway or an evicted channel never reuses one a client may hold.
pub fn new_epoch() -> String {
    let mut raw = [0u8; 6];
    if aws_lc_rs::rand::fill(&mut raw).is_err() {
        // Only uniqueness matters; the clock is a fallback, not a secret.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        raw.copy_from_slice(&nanos.to_be_bytes()[10..]);
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a resume replays nothing (protocol.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecovered {
    EpochChanged,
    Trimmed,
    TooMany,
    NoHistory,
}

impl Unrecovered {
    /// The `reason` of the `ok`, and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EpochChanged => "epoch_changed",
            Self::Trimmed => "trimmed",
            Self::TooMany => "too_many",
            Self::NoHistory => "no_history",
        }
    }
}

/// A channel's position read from the cluster broker (Redis), with what a resume
/// or a history request asked for.
#[derive(Debug, Clone)]
pub struct Read {
    pub epoch: String,
    pub seq: u64,
    /// For a resume: recovered (`frames` are the missed messages) or why
    /// not; `None` for a position or a history read.
    pub outcome: Option<Result<(), Unrecovered>>,
    /// `message` frames, oldest first.
    pub frames: Vec<Utf8Bytes>,
}

/// One stored frame.
#[derive(Debug)]
struct Stored {
    seq: u64,
    at: Instant,
    frame: Utf8Bytes,
}

/// One channel's history: its epoch, where the epoch's numbering began,
/// and its most recent frames, bounded by count and age.
#[derive(Debug)]
pub struct Ring {
    pub epoch: Arc<str>,
    limits: Limits,
    frames: VecDeque<Stored>,
    bytes: usize,
    /// The last publication, or when the ring was made.
    pub last_activity: Instant,
}

impl Ring {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            epoch: new_epoch().into(),
            limits,
            frames: VecDeque::new(),
            bytes: 0,
            last_activity: now,
        }
    }

    /// Bytes of stored frames.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores the frame of publication `seq`; returns the change in
    /// stored bytes (what was added less what count and age dropped).
    pub fn push(&mut self, seq: u64, frame: &Utf8Bytes, now: Instant) -> isize {
        let before = self.bytes;
        self.frames.push_back(Stored {
            seq,
            at: now,
            frame: frame.clone(),
        });
        self.bytes += frame.len();
        self.last_activity = now;
        while self.frames.len() > self.limits.max_messages {
            self.pop_front();
        }
        self.expire(now);
        self.bytes as isize - before as isize
    }

    /// Drops frames older than the age limit; returns the bytes freed.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.bytes;
        while self
            .frames
            .front()
            .is_some_and(|f| now.saturating_duration_since(f.at) > self.limits.max_age)
        {
            self.pop_front();
        }
        before - self.bytes
    }

    fn pop_front(&mut self) {
        if let Some(f) = self.frames.pop_front() {
            self.bytes -= f.frame.len();
        }
    }

    /// Forgets every frame and starts a new epoch (the channel was
    /// evicted); returns the bytes freed. The `seq` counter goes on.
    pub fn restart(&mut self) -> usize {
        let freed = self.bytes;
        self.frames.clear();
        self.bytes = 0;
        self.epoch = new_epoch().into();
        freed
    }

    /// Whether the ring may be forgotten: idle past its age limit.
    pub fn is_stale(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_activity) > self.limits.max_age
    }

    /// The frames a client that last saw `since` in a channel now at
    /// `current` missed, or why they cannot all be replayed.
    ///
    /// # Errors
    /// The reason nothing is replayed.
    pub fn missed(
        &self,
        since: &Position,
        current: u64,
        max_replay: usize,
    ) -> Result<impl Iterator<Item = &Utf8Bytes>, Unrecovered> {
        if *since.epoch != *self.epoch || since.seq > current {
            return Err(Unrecovered::EpochChanged);
        }
        let missed = current - since.seq;
        if missed > max_replay as u64 {
            return Err(Unrecovered::TooMany);
        }
        if missed > 0 && self.frames.front().is_none_or(|f| f.seq > since.seq + 1) {
            return Err(Unrecovered::Trimmed);
        }
        Ok(self
            .frames
            .iter()
            .filter(move |f| f.seq > since.seq)
            .map(|f| &f.frame))
    }

    /// The last `limit` frames, oldest first.
    pub fn last(&self, limit: usize) -> impl Iterator<Item = &Utf8Bytes> {
        self.frames
            .iter()
            .skip(self.frames.len().saturating_sub(limit))
            .map(|f| &f.frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Utf8Bytes {
        Utf8Bytes::from(format!(r#"{{"op":"message","seq":{seq}}}"#))
    }

    fn ring(max_messages: usize, age_s: u64) -> (Ring, Instant) {
        let now = Instant::now();
        let limits = Limits {
            max_messages,
            max_age: Duration::from_secs(age_s),
        };
        (Ring::new(limits, now), now)
    }

    fn seqs<'a>(frames: impl Iterator<Item = &'a Utf8Bytes>) -> Vec<String> {
        frames.map(|f| f.as_str().to_owned()).collect()
    }

    #[test]
    fn replays_exactly_what_was_missed_or_says_why_not() {
        let (mut r, t) = ring(5, 600);
        for seq in 1..=8 {
            r.push(seq, &frame(seq), t);
        }
        let at = |seq| Position {
            epoch: r.epoch.to_string(),
            seq,
        };
        assert_eq!(
            seqs(r.missed(&at(5), 8, 300).unwrap()),
            seqs([frame(6), frame(7), frame(8)].iter())
        );
        assert_eq!(r.missed(&at(8), 8, 300).unwrap().count(), 0);
        // 4..=8 are kept: from 3 on is complete, from 2 on is not.
        assert_eq!(r.missed(&at(3), 8, 300).unwrap().count(), 5);
        assert_eq!(r.missed(&at(2), 8, 300).err(), Some(Unrecovered::Trimmed));
        assert_eq!(r.missed(&at(3), 8, 4).err(), Some(Unrecovered::TooMany));
        assert_eq!(
            r.missed(&at(9), 8, 300).err(),
            Some(Unrecovered::EpochChanged)
        );
        let other = Position {
            epoch: "elsewhere".into(),
            seq: 8,
        };
        assert_eq!(
            r.missed(&other, 8, 300).err(),
            Some(Unrecovered::EpochChanged)
        );
        assert_eq!(seqs(r.last(2)), seqs([frame(7), frame(8)].iter()));
        assert_eq!(r.last(50).count(), 5);
    }

    #[test]
    fn age_and_count_bound_the_bytes() {
        let (mut r, t) = ring(3, 10);
        let one = frame(1).len() as isize;
        assert_eq!(r.push(1, &frame(1), t), one);
        r.push(2, &frame(2), t + Duration::from_secs(5));
        r.push(3, &frame(3), t + Duration::from_secs(6));
        assert_eq!(
            r.push(4, &frame(4), t + Duration::from_secs(7)),
            0,
            "one in, one out"
        );
        assert_eq!(r.bytes(), 3 * frame(1).len());
        assert_eq!(r.expire(t + Duration::from_secs(16)), frame(1).len());
        assert_eq!(r.expire(t + Duration::from_secs(17)), frame(1).len());
        assert!(!r.is_stale(t + Duration::from_secs(17)));
        assert!(r.is_stale(t + Duration::from_secs(18)));
        let epoch = r.epoch.clone();
        assert_eq!(r.restart(), frame(1).len());
        assert_ne!(*r.epoch, *epoch, "an evicted channel starts a new epoch");
        assert_eq!(r.bytes(), 0);
    }

    #[test]
    fn rules_match_in_order_and_refuse_templates() {
        use crate::config::{HistoryConfig, HistoryRule};
        let rule = |pattern: &str, max_messages| HistoryRule {
            pattern: pattern.into(),
            max_messages,
            max_age_s: 60,
        };
        let cfg = HistoryConfig {
            channels: vec![rule("chat:vip", 1000), rule("chat:*", 100)],
            ..HistoryConfig::default()
        };
        let rules = HistoryRules::compile(&cfg, 1024).unwrap();
        assert_eq!(rules.max_replay, 300);
        assert_eq!(HistoryRules::compile(&cfg, 100).unwrap().max_replay, 98);
        let ch = |s| ChannelName::parse(s).unwrap();
        assert_eq!(rules.limits(&ch("chat:vip")).unwrap().max_messages, 1000);
        assert_eq!(rules.limits(&ch("chat:lobby")).unwrap().max_messages, 100);
        assert!(rules.limits(&ch("news:x")).is_none());
        assert!(rules.limits(&ch("chat:a:b")).is_none());
        let bad = HistoryConfig {
            channels: vec![rule("user:{sub}", 10)],
            ..HistoryConfig::default()
        };
        assert!(
            HistoryRules::compile(&bad, 1024)
                .unwrap_err()
                .contains("templates")
        );
        assert_eq!(new_epoch().len(), 12);
    }
}
