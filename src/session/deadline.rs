//! A deadline for every inbound message to arrive whole
//! (`websocket.message_timeout_ms`). tungstenite hands the session only
//! complete messages, so a client that starts a large frame or a
//! fragmented message and trickles it, a few bytes at a time while
//! answering pings, would hold its buffer (up to `max_message_bytes`)
//! for ever. [`Timed`] wraps the session's byte stream and counts what is
//! read; the session tells [`Progress`] what complete messages took. Bytes
//! read that no complete message accounts for are a message in progress,
//! and the first read after it has been in progress past the deadline
//! fails, which ends the session (1008). No timer: the check runs on the
//! reads the trickle itself causes, and a client that sends nothing at all
//! meets the heartbeat timeout instead.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a control frame from a client takes on the wire besides its
/// payload: 2 header bytes and the 4-byte mask (a payload of at most 125
/// bytes needs no extended length).
const CONTROL_OVERHEAD: u64 = 6;

/// Bytes read, and what complete messages took of them.
#[derive(Debug)]
pub struct Progress {
    limit: Duration,
    started: Instant,
    read: AtomicU64,
    /// `read` when the last data message completed.
    settled: AtomicU64,
    /// Control frames read since then, in bytes.
    control: AtomicU64,
    /// Milliseconds after `started`, plus one, when a message was first
    /// seen in progress; 0: none is.
    since: AtomicU64,
    expired: AtomicBool,
}

impl Progress {
    pub fn new(limit: Duration) -> Arc<Self> {
        Arc::new(Self {
            limit,
            started: Instant::now(),
            read: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            control: AtomicU64::new(0),
            since: AtomicU64::new(0),
            expired: AtomicBool::new(false),
        })
    }

    fn now_mark(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// A data message (text, binary) arrived whole.
    pub fn message(&self) {
        self.settled
            .store(self.read.load(Ordering::Relaxed), Ordering::Relaxed);
        self.control.store(0, Ordering::Relaxed);
        self.since.store(0, Ordering::Relaxed);
    }

    /// A control frame with `payload` bytes arrived; when it accounts for
    /// everything read since the last message, nothing is in progress.
    pub fn control(&self, payload: usize) {
        let control = self
            .control
            .fetch_add(CONTROL_OVERHEAD + payload as u64, Ordering::Relaxed)
            + CONTROL_OVERHEAD
            + payload as u64;
        let pending = self.read.load(Ordering::Relaxed)
            - self
                .settled
                .load(Ordering::Relaxed)
                .min(self.read.load(Ordering::Relaxed));
        if pending <= control {
            self.since.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the session ended because a message did not complete in time.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    /// `n` more bytes were read: starts the clock of a message in
    /// progress, or says it ran out.
    fn read(&self, n: usize) -> bool {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        let now = self.now_mark();
        let since = self.since.load(Ordering::Relaxed);
        if since == 0 {
            self.since.store(now, Ordering::Relaxed);
            return true;
        }
        if Duration::from_millis(now - since) > self.limit {
            self.expired.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// The session's byte stream, counted for [`Progress`].
#[derive(Debug)]
pub struct Timed<S> {
    inner: S,
    progress: Arc<Progress>,
}

impl<S> Timed<S> {
    pub fn new(inner: S, progress: Arc<Progress>) -> Self {
        Self { inner, progress }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 && !this.progress.read(n) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "message not completed in time",
            )));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_in_progress_past_the_deadline_fails_the_next_read() {
        let p = Progress::new(Duration::from_millis(50));
        assert!(p.read(40));
        p.message();
        // The start of a large frame, then a pong while it trickles.
        assert!(p.read(100), "its first bytes start the clock");
        std::thread::sleep(Duration::from_millis(30));
        assert!(p.read(6));
        p.control(0);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!p.read(1), "still in progress past the deadline");
        assert!(p.expired());
    }

    #[test]
    fn control_frames_alone_never_count_as_a_message_in_progress() {
        let p = Progress::new(Duration::from_millis(20));
        for _ in 0..5 {
            assert!(p.read(6));
            p.control(0);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!p.expired());
    }
}
