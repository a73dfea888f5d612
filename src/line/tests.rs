//! The line over an in-memory socket: direct writes, the queue behind a
//! socket that would block, order and wholeness of frames whoever writes
//! them, and the bounds.

use std::future::poll_fn;

use futures_util::StreamExt;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::*;

/// A line over one end of a duplex pipe of `capacity` bytes, and a
/// WebSocket client on the other end.
async fn pair(
    capacity: usize,
    frames: usize,
    bytes: usize,
) -> (Arc<Line>, WebSocketStream<DuplexStream>) {
    let (server, client) = tokio::io::duplex(capacity);
    let line = Line::new(Box::new(server), frames, bytes);
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    (line, client)
}

fn text(s: &str) -> Utf8Bytes {
    Utf8Bytes::from(s.to_owned())
}

/// What the session's task does when woken: take a batch, write it
/// through the socket view and flush (what tungstenite would write is
/// stood in for by the frames' own encoding).
async fn session_writes(line: &Arc<Line>) {
    let mut batch = Vec::new();
    poll_fn(|cx| line.poll_take(cx, &mut batch, 64, 1 << 20))
        .await
        .unwrap();
    let mut socket = Socket(Arc::clone(line));
    for frame in batch {
        let rest = Rest::text(&frame);
        socket
            .write_all(&rest.header[..rest.header_len])
            .await
            .unwrap();
        socket.write_all(frame.as_bytes()).await.unwrap();
    }
    socket.flush().await.unwrap();
    line.written();
}

async fn next_text(client: &mut WebSocketStream<DuplexStream>) -> String {
    match client.next().await {
        Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

#[tokio::test]
async fn nothing_is_written_directly_before_the_session_says_so() {
    let (line, _client) = pair(1 << 16, 8, 1 << 20).await;
    assert_eq!(line.push(&text("early"), true), Pushed::Queued);
    line.written();
    // The queue is not empty, so even now the next frame queues behind it.
    assert_eq!(line.push(&text("next"), true), Pushed::Queued);
}

#[tokio::test]
async fn an_idle_line_writes_straight_to_the_socket_in_order() {
    let (line, mut client) = pair(1 << 16, 8, 1 << 20).await;
    line.written();
    for n in 0..5 {
        assert_eq!(line.push(&text(&format!("m{n}")), true), Pushed::Written);
    }
    // A large frame (16-bit length) and one past the direct limit (queued).
    let big = "x".repeat(1000);
    assert_eq!(line.push(&text(&big), true), Pushed::Written);
    for n in 0..5 {
        assert_eq!(next_text(&mut client).await, format!("m{n}"));
    }
    assert_eq!(next_text(&mut client).await, big);
    let huge = "y".repeat(DIRECT_MAX + 1);
    assert_eq!(line.push(&text(&huge), true), Pushed::Queued);
    assert_eq!(
        line.push(&text("after"), true),
        Pushed::Queued,
        "behind the queue"
    );
    session_writes(&line).await;
    assert_eq!(next_text(&mut client).await, huge);
    assert_eq!(next_text(&mut client).await, "after");
}

#[tokio::test]
async fn a_socket_that_blocks_leaves_the_rest_to_the_session_in_order() {
    // A pipe of 100 bytes: the second frame is cut mid-way.
    let (line, mut client) = pair(100, 64, 1 << 20).await;
    line.written();
    let a = "a".repeat(60);
    let b = "b".repeat(60);
    assert_eq!(line.push(&text(&a), true), Pushed::Written);
    assert_eq!(
        line.push(&text(&b), true),
        Pushed::Written,
        "partly written"
    );
    for n in 0..10 {
        assert_eq!(line.push(&text(&format!("q{n}")), true), Pushed::Queued);
    }
    // The session finishes the cut frame before the queued ones, while
    // the client reads.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..12 {
            got.push(next_text(&mut client).await);
        }
        got
    });
    session_writes(&line).await;
    let got = reader.await.unwrap();
    assert_eq!(got[0], a);
    assert_eq!(got[1], b);
    let queued: Vec<String> = (0..10).map(|n| format!("q{n}")).collect();
    assert_eq!(got[2..], queued[..]);
}

#[tokio::test]
async fn tungstenite_holding_part_of_a_frame_holds_direct_writes_off() {
    let (line, _client) = pair(10, 64, 1 << 20).await;
    line.written();
    let mut socket = Socket(Arc::clone(&line));
    // The socket takes 10 of these 20 bytes: the writer keeps the rest.
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    let n = match Pin::new(&mut socket).poll_write(&mut cx, &[0x81; 20]) {
        Poll::Ready(Ok(n)) => n,
        other => panic!("{other:?}"),
    };
    assert_eq!(n, 10);
    assert_eq!(line.push(&text("m"), true), Pushed::Queued);
}

#[tokio::test]
async fn the_queue_is_bounded_in_frames_and_bytes_and_closes() {
    let line = Line::detached(2, 10);
    assert_eq!(line.push(&text("12345"), true), Pushed::Queued);
    assert_eq!(line.push(&text("123456"), true), Pushed::Full, "11 bytes");
    assert_eq!(line.push(&text("1234"), true), Pushed::Queued);
    assert_eq!(line.push(&text("1"), true), Pushed::Full, "3 frames");
    assert_eq!(line.queued_bytes(), 9);
    assert!(!line.fits(0), "more than half the bound is taken");
    assert_eq!(line.try_pop().unwrap().as_str(), "12345");
    assert_eq!(line.queued_bytes(), 4);
    line.close();
    assert_eq!(line.push(&text("x"), true), Pushed::Closed);
    assert_eq!(line.queued_bytes(), 0);
}

#[tokio::test]
async fn a_failed_socket_ends_the_session() {
    let (line, client) = pair(1 << 10, 8, 1 << 20).await;
    line.written();
    drop(client);
    assert_eq!(line.push(&text("lost"), true), Pushed::Closed);
    let mut batch = Vec::new();
    let taken = poll_fn(|cx| line.poll_take(cx, &mut batch, 64, 1 << 20)).await;
    assert!(taken.is_err());
}
