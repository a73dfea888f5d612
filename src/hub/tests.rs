//! The hub's unit tests: fan-out, counting, history rings and the seam
//! between a read position and live messages.

use super::*;
use serde_json::value::RawValue;

fn hub() -> Hub {
    Hub::new(HistoryRules::default(), Arc::new(Metrics::default()))
}

/// What a subscriber was delivered, read back from its (detached) line.
pub(crate) struct Rx(Arc<Line>);

impl Rx {
    pub(crate) fn try_recv(&mut self) -> Result<Utf8Bytes, ()> {
        self.0.try_pop().ok_or(())
    }
}

/// A subscriber whose outbox holds `depth` frames, and its reading end.
pub(crate) fn sub(session: u64, depth: usize) -> (Subscriber, Rx) {
    let line = Line::detached(depth, usize::MAX);
    (
        Subscriber {
            session,
            line: Arc::clone(&line),
            slow: CancellationToken::new(),
        },
        Rx(line),
    )
}

fn msg(channel: &ChannelName, n: u32) -> MessageTemplate {
    let data = RawValue::from_string(n.to_string()).unwrap();
    MessageTemplate::new(channel, "alice", &data)
}

#[test]
fn fan_out_in_order_and_cut_off_only_the_slow_one() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (fast, mut fast_rx) = sub(1, 16);
    let (slow, _slow_rx) = sub(2, 2);
    let slow_token = slow.slow.clone();
    assert_eq!(hub.join(&ch, fast.clone(), false), Joined::First);
    assert_eq!(hub.join(&ch, fast, false), Joined::Already, "idempotent");
    assert_eq!(hub.join(&ch, slow, false), Joined::Again);
    assert_eq!(
        hub.publish(&ch, &msg(&ch, 0), Fanout::Inline).delivered,
        0,
        "pending subscribers get nothing"
    );
    assert!(
        hub.activate(&ch, 1, None, None).is_none() && hub.activate(&ch, 2, None, None).is_none()
    );
    for n in 1..=3 {
        hub.publish(&ch, &msg(&ch, n), Fanout::Inline);
    }
    assert!(slow_token.is_cancelled());
    for n in 2..=4u64 {
        let frame = fast_rx.try_recv().unwrap();
        let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(v["seq"], n);
        assert_eq!(v["data"], n - 1);
    }
    let p = hub.publish(&ch, &msg(&ch, 4), Fanout::Inline);
    assert_eq!(
        (p.seq, p.delivered, p.slow),
        (5, 1, 0),
        "slow one is skipped"
    );
    // It stays counted until its session leaves.
    assert_eq!(hub.leave(&ch, 2), Left::Others);
    assert_eq!(hub.leave(&ch, 1), Left::Last);
}

#[test]
fn delivered_seq_gaps_are_announced_and_duplicates_dropped() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (a, mut rx) = sub(1, 16);
    hub.join(&ch, a, false);
    hub.activate(&ch, 1, None, None);
    assert_eq!(hub.deliver(&ch, "e1", 7, &msg(&ch, 7)).delivered, 1);
    assert_eq!(
        hub.deliver(&ch, "e1", 7, &msg(&ch, 7)).delivered,
        0,
        "duplicate"
    );
    hub.deliver(&ch, "e1", 8, &msg(&ch, 8));
    hub.deliver(&ch, "e1", 11, &msg(&ch, 11));
    let frames: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|f| f.as_str().to_owned())
        .collect();
    assert_eq!(frames.len(), 4, "{frames:?}");
    assert!(frames[0].contains(r#""seq":7"#) && frames[1].contains(r#""seq":8"#));
    assert!(frames[2].contains(r#""op":"error""#) && frames[2].contains(r#""channel":"chat:a""#));
    assert!(frames[3].contains(r#""seq":11"#));
    assert_eq!(hub.notify_gap(std::slice::from_ref(&ch)), 1);
    assert!(
        rx.try_recv()
            .unwrap()
            .as_str()
            .contains("may have been missed")
    );
    // After a notice, the next seq starts afresh: no second notice.
    hub.deliver(&ch, "e1", 20, &msg(&ch, 20));
    assert!(rx.try_recv().unwrap().as_str().contains(r#""seq":20"#));
}

#[test]
fn an_own_publication_is_delivered_at_once_only_when_it_is_next() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (a, mut rx) = sub(1, 16);
    hub.join(&ch, a, false);
    hub.activate(&ch, 1, None, None);
    assert_eq!(
        hub.deliver_own(&ch, "e1", 1, &msg(&ch, 1), Fanout::Inline)
            .delivered,
        0,
        "no position known yet: left to the echo"
    );
    hub.deliver(&ch, "e1", 7, &msg(&ch, 7));
    assert_eq!(
        hub.deliver_own(&ch, "e1", 8, &msg(&ch, 8), Fanout::Inline)
            .delivered,
        1
    );
    assert_eq!(
        hub.deliver(&ch, "e1", 8, &msg(&ch, 8)).delivered,
        0,
        "its echo is a duplicate"
    );
    assert_eq!(
        hub.deliver_own(&ch, "e1", 10, &msg(&ch, 10), Fanout::Inline)
            .delivered,
        0,
        "9 may still be on its way from another replica"
    );
    assert_eq!(
        hub.deliver_own(&ch, "e2", 9, &msg(&ch, 9), Fanout::Inline)
            .delivered,
        0
    );
    hub.deliver(&ch, "e1", 9, &msg(&ch, 9));
    hub.deliver(&ch, "e1", 10, &msg(&ch, 10));
    let seqs: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|f| f.as_str().to_owned())
        .collect();
    assert_eq!(seqs.len(), 4, "{seqs:?}");
    for (frame, seq) in seqs.iter().zip(7..) {
        assert!(frame.contains(&format!(r#""seq":{seq}"#)), "{frame}");
    }
}

#[test]
fn empty_channels_are_forgotten() {
    let hub = hub();
    let ch = ChannelName::parse("x").unwrap();
    let (a, _rx) = sub(1, 4);
    hub.join(&ch, a, false);
    assert_eq!(hub.channels(), 1);
    assert!(hub.has_subscribers(&ch), "pending ones count");
    assert_eq!(hub.leave(&ch, 1), Left::Last);
    assert_eq!(hub.leave(&ch, 1), Left::NotThere);
    hub.activate(&ch, 1, None, None);
    assert!(!hub.has_subscribers(&ch), "left meanwhile: not added back");
    assert_eq!(hub.channels(), 0);
    assert_eq!(
        hub.publish(&ch, &msg(&ch, 1), Fanout::Inline),
        Published::default()
    );
}

#[test]
fn a_read_position_is_followed_by_the_buffered_messages_above_it() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (live, mut live_rx) = sub(1, 64);
    hub.join(&ch, live, false);
    hub.activate(&ch, 1, None, None);
    let (resumer, mut rx) = sub(2, 64);
    hub.join(&ch, resumer, true);
    // Delivered while the resumer's read is in flight: 6 and 7.
    hub.deliver(&ch, "e1", 6, &msg(&ch, 6));
    hub.deliver(&ch, "e1", 7, &msg(&ch, 7));
    assert!(rx.try_recv().is_err(), "nothing before the ok");
    // The read saw the channel at 6: it replays 5..=6.
    let read = Read {
        epoch: "e1".into(),
        seq: 6,
        outcome: Some(Ok(())),
        frames: [5, 6]
            .map(|n| Utf8Bytes::from(msg(&ch, n).with_seq(u64::from(n))))
            .to_vec(),
    };
    assert!(hub.activate_read(&ch, 2, Some(9), &read));
    hub.deliver(&ch, "e1", 8, &msg(&ch, 8));
    let frames: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|f| f.as_str().to_owned())
        .collect();
    assert_eq!(
        frames[0],
        r#"{"op":"ok","id":9,"epoch":"e1","seq":6,"recovered":true}"#
    );
    let seqs: Vec<u64> = frames[1..]
        .iter()
        .map(|f| {
            serde_json::from_str::<serde_json::Value>(f).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        seqs,
        [5, 6, 7, 8],
        "replay, then the buffered 7 (not 6), then live"
    );
    assert_eq!(std::iter::from_fn(|| live_rx.try_recv().ok()).count(), 3);

    // A buffer that outgrows the outbox cuts its subscriber off.
    let (small, _small_rx) = sub(3, 2);
    let token = small.slow.clone();
    hub.join(&ch, small, true);
    for n in 9..=11 {
        hub.deliver(&ch, "e1", n, &msg(&ch, n as u32));
    }
    assert!(token.is_cancelled());
    assert!(
        !hub.activate_read(&ch, 3, None, &read),
        "cut off, not pending"
    );
    assert_eq!(hub.leave(&ch, 3), Left::Others);
}

#[test]
fn a_new_epoch_is_a_gap_not_a_duplicate() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (a, mut rx) = sub(1, 16);
    hub.join(&ch, a, false);
    hub.activate(&ch, 1, None, None);
    hub.deliver(&ch, "e1", 40, &msg(&ch, 40));
    // Redis lost the counter: numbering starts again in a new epoch.
    assert_eq!(hub.deliver(&ch, "e2", 1, &msg(&ch, 1)).delivered, 1);
    let frames: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|f| f.as_str().to_owned())
        .collect();
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert!(
        frames[1].contains(r#""code":"internal""#)
            && frames[1].ends_with(r#","epoch":"e1","seq":40}"#),
        "the notice names the last position delivered: {}",
        frames[1]
    );
    assert!(frames[2].contains(r#""seq":1"#));
}

#[test]
fn a_cached_read_serves_while_nothing_newer_was_delivered() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (a, _rx) = sub(1, 16);
    hub.join(&ch, a, true);
    let since = Position {
        epoch: "e1".into(),
        seq: 3,
    };
    let read = Arc::new(Read {
        epoch: "e1".into(),
        seq: 5,
        outcome: Some(Ok(())),
        frames: Vec::new(),
    });
    assert!(
        hub.cached_read(&ch, Some(&since)).is_none(),
        "nothing stored yet"
    );
    hub.store_read(&ch, Some(&since), &read);
    assert!(hub.cached_read(&ch, Some(&since)).is_some());
    assert!(hub.cached_read(&ch, None).is_none(), "another question");
    hub.deliver(&ch, "e1", 5, &msg(&ch, 5));
    assert!(
        hub.cached_read(&ch, Some(&since)).is_some(),
        "5 is in the read"
    );
    hub.deliver(&ch, "e1", 6, &msg(&ch, 6));
    assert!(
        hub.cached_read(&ch, Some(&since)).is_none(),
        "6 was delivered after it"
    );
    hub.store_read(&ch, Some(&since), &read);
    hub.notify_gap(std::slice::from_ref(&ch));
    assert!(
        hub.cached_read(&ch, Some(&since)).is_none(),
        "an outage voids it"
    );
}

#[test]
fn a_read_ahead_of_local_delivery_is_not_repeated_when_the_message_arrives() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (live, mut live_rx) = sub(1, 64);
    hub.join(&ch, live, false);
    hub.activate(&ch, 1, None, None);
    hub.deliver(&ch, "e1", 5, &msg(&ch, 5));
    let (resumer, mut rx) = sub(2, 64);
    hub.join(&ch, resumer, true);
    // The broker stored 6 and 7 before their publications reach this
    // replica: the read answers 7 while 5 is the last delivered here.
    let read = Read {
        epoch: "e1".into(),
        seq: 7,
        outcome: Some(Ok(())),
        frames: [6, 7]
            .map(|n| Utf8Bytes::from(msg(&ch, n).with_seq(u64::from(n))))
            .to_vec(),
    };
    assert!(hub.activate_read(&ch, 2, Some(9), &read));
    assert!(!hub.activate_read(&ch, 2, Some(9), &read), "activated once");
    for n in 6..=8 {
        hub.deliver(&ch, "e1", n, &msg(&ch, n as u32));
    }
    let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
        .skip(1)
        .map(|f| {
            serde_json::from_str::<serde_json::Value>(f.as_str()).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        seqs,
        [6, 7, 8],
        "the replay, then 8 once: 6 and 7 not again"
    );
    assert_eq!(std::iter::from_fn(|| live_rx.try_recv().ok()).count(), 4);
    assert_eq!(hub.leave(&ch, 2), Left::Others);
}

#[test]
fn one_waiting_for_its_floor_hears_of_a_gap_from_its_own_position() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (resumer, mut rx) = sub(2, 64);
    hub.join(&ch, resumer, true);
    // Nothing delivered here yet; the broker's history ends at 3.
    let read = Read {
        epoch: "e1".into(),
        seq: 3,
        outcome: None,
        frames: Vec::new(),
    };
    assert!(hub.activate_read(&ch, 2, Some(1), &read));
    assert_eq!(hub.notify_gap(std::slice::from_ref(&ch)), 1);
    // After the outage a new numbering: delivered at once.
    hub.deliver(&ch, "e2", 1, &msg(&ch, 1));
    let frames: Vec<serde_json::Value> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|f| serde_json::from_str(f.as_str()).unwrap())
        .collect();
    assert_eq!(frames[0]["op"], "ok");
    assert_eq!(
        (&frames[1]["op"], &frames[1]["epoch"], &frames[1]["seq"]),
        (&"error".into(), &"e1".into(), &3.into()),
        "{frames:?}"
    );
    assert_eq!(
        (&frames[2]["op"], &frames[2]["seq"]),
        (&"message".into(), &1.into())
    );
    assert_eq!(frames.len(), 3);
}

#[tokio::test]
async fn a_publication_is_written_directly_and_a_burst_queues() {
    let hub = hub();
    let ch = ChannelName::parse("chat:a").unwrap();
    let (server, client) = tokio::io::duplex(1 << 16);
    let line = Line::new(Box::new(server), 64, 1 << 20);
    // As the session does once its welcome is out.
    line.written();
    let s = Subscriber {
        session: 1,
        line: Arc::clone(&line),
        slow: CancellationToken::new(),
    };
    hub.join(&ch, s, false);
    hub.activate(&ch, 1, None, None);
    assert_eq!(hub.publish(&ch, &msg(&ch, 1), Fanout::Inline).delivered, 1);
    assert_eq!(line.queued_bytes(), 0, "written straight to the socket");
    // A burst: published again right after the last fan-out ended.
    hub.shard(&ch).get_mut(&ch).unwrap().last_push =
        Some(Instant::now() + std::time::Duration::from_secs(3600));
    assert_eq!(hub.publish(&ch, &msg(&ch, 2), Fanout::Inline).delivered, 1);
    assert!(line.queued_bytes() > 0, "queued for the session to batch");
    // The session takes the queue and writes it; the socket is idle again.
    while line.try_pop().is_some() {}
    line.written();
    hub.shard(&ch).get_mut(&ch).unwrap().last_push = None;
    assert_eq!(hub.publish(&ch, &msg(&ch, 3), Fanout::Queued).delivered, 1);
    assert!(line.queued_bytes() > 0, "a queued fan-out never writes");
    drop(client);
}
