//! The presence table's unit tests: per-user membership, the grace, the
//! listing limit and storm suppression, on a single gateway and as a
//! replica whose joins and leaves Redis decides.

use super::*;
use crate::line::Line;
use tokio_util::sync::CancellationToken;

fn rules(max_listed: usize, grace_ms: u64) -> PresenceRules {
    PresenceRules::compile(&PresenceConfig {
        channels: vec!["chat:*".into()],
        max_listed,
        grace_ms,
        ttl_s: 60,
    })
    .unwrap()
}

/// A subscriber whose outbox holds `depth` frames.
fn subscriber(session: u64, depth: usize) -> Subscriber {
    Subscriber {
        session,
        line: Line::detached(depth, usize::MAX),
        slow: CancellationToken::new(),
    }
}

fn watcher(session: u64) -> (Subscriber, Arc<Line>) {
    let sub = subscriber(session, 64);
    let line = Arc::clone(&sub.line);
    (sub, line)
}

fn frames(line: &mut Arc<Line>) -> Vec<String> {
    std::iter::from_fn(|| line.try_pop())
        .map(|f| f.as_str().to_owned())
        .collect()
}

fn ch(name: &str) -> ChannelName {
    ChannelName::parse(name).unwrap()
}

#[test]
fn rules_match_patterns_and_refuse_templates() {
    let r = rules(100, 0);
    assert!(r.keeps(&ch("chat:lobby")));
    assert!(!r.keeps(&ch("news:x")));
    let bad = PresenceConfig {
        channels: vec!["u:{sub}".into()],
        ..PresenceConfig::default()
    };
    assert!(
        PresenceRules::compile(&bad)
            .unwrap_err()
            .contains("templates")
    );
}

#[test]
fn a_user_is_one_member_whatever_their_tabs() {
    let p = Presence::new(rules(100, 5_000), true, Arc::new(Metrics::default()));
    let lobby = ch("chat:lobby");
    let (alice, mut rx) = watcher(1);
    p.watch(&lobby, &alice);
    assert!(p.enter(&lobby, "alice"));
    assert!(p.enter(&lobby, "bob"));
    assert!(!p.enter(&lobby, "bob"), "a second tab is no new member");
    assert_eq!(
        frames(&mut rx),
        [
            r#"{"op":"join","channel":"chat:lobby","user":"alice"}"#,
            r#"{"op":"join","channel":"chat:lobby","user":"bob"}"#,
        ]
    );
    let now = Instant::now();
    assert!(!p.exit(&lobby, "bob", now), "one tab closed: still in");
    assert!(!p.exit(&lobby, "bob", now), "the last: grace, not gone yet");
    assert!(p.expire(now + Duration::from_millis(4_999)).is_empty());
    assert!(frames(&mut rx).is_empty());
    assert_eq!(p.listing(&lobby).count, 2, "in grace is still a member");
    let left = p.expire(now + Duration::from_secs(5));
    assert_eq!(left, [(lobby.clone(), "bob".into())]);
    assert_eq!(
        frames(&mut rx),
        [r#"{"op":"leave","channel":"chat:lobby","user":"bob"}"#]
    );
    assert_eq!(
        p.listing(&lobby),
        Listing {
            count: 1,
            users: Some(vec!["alice".into()])
        }
    );
}

#[test]
fn a_return_within_the_grace_is_neither_leave_nor_join() {
    let metrics = Arc::new(Metrics::default());
    let p = Presence::new(rules(100, 5_000), true, Arc::clone(&metrics));
    let lobby = ch("chat:lobby");
    let (alice, mut rx) = watcher(1);
    p.watch(&lobby, &alice);
    p.enter(&lobby, "bob");
    frames(&mut rx);
    let now = Instant::now();
    p.exit(&lobby, "bob", now);
    assert!(!p.enter(&lobby, "bob"), "back within the grace");
    // Out again later: the first grace entry is stale, the second counts.
    let later = now + Duration::from_secs(3);
    p.exit(&lobby, "bob", later);
    assert!(p.expire(now + Duration::from_secs(6)).is_empty());
    assert!(frames(&mut rx).is_empty());
    assert_eq!(p.expire(later + Duration::from_secs(5)).len(), 1);
    assert_eq!(frames(&mut rx).len(), 1);
    assert_eq!(metrics.presence_members.load(Ordering::Relaxed), 0);
}

#[test]
fn above_the_limit_only_the_count_and_no_events() {
    let metrics = Arc::new(Metrics::default());
    let p = Presence::new(rules(2, 0), true, Arc::clone(&metrics));
    let lobby = ch("chat:lobby");
    let (w, mut rx) = watcher(9);
    p.watch(&lobby, &w);
    for user in ["a", "b", "c"] {
        p.enter(&lobby, user);
    }
    assert_eq!(frames(&mut rx).len(), 2, "the third join is suppressed");
    assert_eq!(
        p.listing(&lobby),
        Listing {
            count: 3,
            users: None
        }
    );
    assert!(p.exit(&lobby, "c", Instant::now()), "no grace: gone now");
    assert_eq!(frames(&mut rx).len(), 1, "back at the limit: told");
    assert_eq!(metrics.presence_suppressed.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.presence_events.get("join"), 2);
    assert_eq!(metrics.presence_events.get("leave"), 1);
}

#[test]
fn a_replica_reports_changes_and_sends_only_what_redis_announces() {
    let p = Presence::new(rules(100, 0), false, Arc::new(Metrics::default()));
    let lobby = ch("chat:lobby");
    let (w, mut rx) = watcher(1);
    p.watch(&lobby, &w);
    assert!(p.enter(&lobby, "bob"), "new here: Redis must be told");
    assert!(frames(&mut rx).is_empty(), "Redis decides the join");
    p.announce(&lobby, Event::Join, "bob");
    assert_eq!(frames(&mut rx).len(), 1);
    assert_eq!(p.local_members(), [(lobby.clone(), vec!["bob".into()])]);
    assert!(p.exit(&lobby, "bob", Instant::now()));
    assert!(frames(&mut rx).is_empty());
    p.unwatch(&lobby, 1);
    assert!(p.local_members().is_empty(), "an empty room is dropped");
}

#[test]
fn a_full_watcher_is_cut_off_and_dropped() {
    let p = Presence::new(rules(100, 0), true, Arc::new(Metrics::default()));
    let lobby = ch("chat:lobby");
    let slow = subscriber(1, 1);
    p.watch(&lobby, &slow);
    p.enter(&lobby, "a");
    p.enter(&lobby, "b");
    assert!(slow.slow.is_cancelled());
    p.enter(&lobby, "c");
    assert_eq!(p.shard(&lobby).get(&lobby).unwrap().watchers.len(), 0);
}
