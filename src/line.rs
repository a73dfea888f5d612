//! One connection's way out, shared by its session and by everyone who
//! delivers to it: the socket (which the session also reads through, under
//! the same lock) and the queue of frames waiting for it, bounded in
//! frames and in bytes.
//!
//! A deliverer (the hub's push loop, on whichever task publishes) writes a
//! frame straight to the socket when nothing waits before it: no queue and
//! no wake-up of the session's task, one TLS record and one `sendmsg` per
//! subscriber, the pattern of the kernel floor (`wsgate bench floor`).
//! When frames wait, when the session's task is writing, or when the socket
//! would block, the frame joins the queue and the session's task writes it.
//! Either way frames reach the socket whole and in the order they were
//! pushed: every write happens under the one lock, and a direct write is
//! tried only while the queue is empty and nobody's bytes are half-written.
//!
//! The session's WebSocket runs over [`Socket`], this line's view of the
//! socket for tungstenite, which finishes whatever a direct write left
//! before tungstenite's own bytes.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// What a line's socket must be.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The largest frame written directly. rustls takes a whole write while
/// its outgoing buffer is under its limit (64 KiB), so a frame this size
/// is never split between a deliverer and the session; larger ones go
/// through the queue.
const DIRECT_MAX: usize = 16 * 1024;

/// Frames up to this size (header included) are copied into one buffer on
/// the stack for their write.
const SMALL_FRAME: usize = 512;

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Handed to the socket (the TLS layer may still hold some of it,
    /// which the session's task flushes).
    Written,
    /// Queued for the session's task.
    Queued,
    /// The queue is full, in frames or in bytes: the reader is too slow.
    Full,
    /// The session is ending (or its socket failed).
    Closed,
}

/// One connection's socket and queue (see the module docs).
pub struct Line {
    state: Mutex<State>,
    /// The session's task, woken when there is something to write.
    waker: AtomicWaker,
    max_frames: usize,
    max_bytes: usize,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Line")
            .field("max_frames", &self.max_frames)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

struct State {
    /// `None` on a detached line (unit tests): everything queues.
    io: Option<Box<dyn Io>>,
    queue: VecDeque<Utf8Bytes>,
    /// Bytes in `queue`.
    bytes: usize,
    /// Direct writes allowed: from the session's first frame until it
    /// ends (nothing may follow its close frame).
    direct: bool,
    /// The session's task owns the write side: it took frames from the
    /// queue, or writes its own, until its flush completes.
    writing: bool,
    /// tungstenite holds part of a frame the socket has not taken.
    dirty: bool,
    /// The rest of a frame a direct write could not finish.
    rest: Option<Rest>,
    /// A direct write left bytes in the TLS layer for the session's task
    /// to flush.
    owed: bool,
    closed: bool,
    /// The socket failed under a direct write.
    failed: bool,
}

/// A frame being written: its header and payload, and how much of the two
/// the socket took.
struct Rest {
    header: [u8; 10],
    header_len: usize,
    frame: Utf8Bytes,
    done: usize,
}

impl Rest {
    /// An unmasked, unfragmented text frame (server to client).
    fn text(frame: &Utf8Bytes) -> Self {
        let len = frame.len();
        let mut header = [0u8; 10];
        header[0] = 0x81;
        let header_len = if len < 126 {
            header[1] = len as u8;
            2
        } else if let Ok(short) = u16::try_from(len) {
            header[1] = 126;
            header[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Self {
            header,
            header_len,
            frame: frame.clone(),
            done: 0,
        }
    }

    /// Writes what is left; `Ready(Ok)` once the socket took all of it.
    fn poll_write(&mut self, io: &mut dyn Io, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let total = self.header_len + self.frame.len();
        if self.done == 0 && total <= SMALL_FRAME {
            // One contiguous write: rustls seals two slices as one record
            // too, but gathers them into a vector it allocates each time.
            let mut whole = [0u8; SMALL_FRAME];
            whole[..self.header_len].copy_from_slice(&self.header[..self.header_len]);
            whole[self.header_len..total].copy_from_slice(self.frame.as_bytes());
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &whole[..total]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.done = n;
        }
        loop {
            let header = &self.header[self.done.min(self.header_len)..self.header_len];
            let payload = &self.frame.as_bytes()[self.done.saturating_sub(self.header_len)..];
            if header.is_empty() && payload.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let slices = [IoSlice::new(header), IoSlice::new(payload)];
            let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.done += n;
        }
    }
}

/// How far a direct write got.
enum Through {
    /// All of it is on the socket.
    Done,
    /// The TLS layer holds some of it for the session's task to flush.
    Unflushed,
    /// The socket took part of it; the rest is left to the session.
    Partly,
    /// The socket took none of it.
    Refused,
    Failed,
}

/// Writes `rest` to `io` and flushes, polled once with no waker: where the
/// socket would block, the session's task takes over (and registers).
fn write_through(io: &mut dyn Io, rest: &mut Rest) -> Through {
    let mut cx = Context::from_waker(Waker::noop());
    // Outside tokio's cooperative budget: one publication writes to every
    // subscriber from the publishing task, and past its budget (128
    // operations) each socket would report itself not ready, handing the
    // rest of the fan-out to the sessions' tasks after all.
    let mut write = std::pin::pin!(tokio::task::coop::unconstrained(std::future::poll_fn(
        |cx| {
            Poll::Ready(match rest.poll_write(&mut *io, cx) {
                Poll::Ready(Ok(())) => match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => Through::Done,
                    Poll::Pending => Through::Unflushed,
                    Poll::Ready(Err(_)) => Through::Failed,
                },
                Poll::Pending if rest.done == 0 => Through::Refused,
                Poll::Pending => Through::Partly,
                Poll::Ready(Err(_)) => Through::Failed,
            })
        }
    )));
    match write.as_mut().poll(&mut cx) {
        Poll::Ready(through) => through,
        Poll::Pending => Through::Refused,
    }
}

impl State {
    /// Finishes the rest of a direct write before anything else is written.
    fn poll_rest(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (Some(rest), Some(io)) = (&mut self.rest, &mut self.io) else {
            return Poll::Ready(Ok(()));
        };
        ready!(rest.poll_write(&mut **io, cx))?;
        self.rest = None;
        Poll::Ready(Ok(()))
    }

    /// Whether a frame of `len` bytes may go straight to the socket.
    fn may_write_now(&self, len: usize) -> bool {
        self.direct
            && self.io.is_some()
            && self.queue.is_empty()
            && !(self.writing || self.dirty || self.owed || self.failed)
            && self.rest.is_none()
            && len <= DIRECT_MAX
    }
}

impl Line {
    /// A line over `io`, its queue bounded by `max_frames` and `max_bytes`.
    pub fn new(io: Box<dyn Io>, max_frames: usize, max_bytes: usize) -> Arc<Self> {
        Self::with_io(Some(io), max_frames, max_bytes)
    }

    /// A line without a socket: every frame queues (for unit tests of
    /// what is delivered).
    #[cfg(test)]
    pub fn detached(max_frames: usize, max_bytes: usize) -> Arc<Self> {
        Self::with_io(None, max_frames, max_bytes)
    }

    fn with_io(io: Option<Box<dyn Io>>, max_frames: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                io,
                queue: VecDeque::new(),
                bytes: 0,
                direct: false,
                writing: false,
                dirty: false,
                rest: None,
                owed: false,
                closed: false,
                failed: false,
            }),
            waker: AtomicWaker::new(),
            max_frames,
            max_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock but a socket's own
        // code; its state is then as good as any other failed socket's.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Bytes waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Delivers one text frame: straight to the socket when `direct` and
    /// nothing waits before it, else into the queue if it fits.
    pub fn push(&self, frame: &Utf8Bytes, direct: bool) -> Pushed {
        let mut st = self.lock();
        if st.closed {
            return Pushed::Closed;
        }
        if direct && st.may_write_now(frame.len()) {
            let mut rest = Rest::text(frame);
            let Some(io) = st.io.as_mut() else {
                return Pushed::Closed;
            };
            let written = write_through(&mut **io, &mut rest);
            match written {
                Through::Done => return Pushed::Written,
                Through::Refused => {
                    // Not a byte taken: it waits in the queue like any
                    // other frame, and the session's task flushes.
                    st.owed = true;
                    self.waker.wake();
                    return self.enqueue(st, frame);
                }
                Through::Partly => st.rest = Some(rest),
                Through::Unflushed => {}
                Through::Failed => st.failed = true,
            }
            st.owed = true;
            let failed = st.failed;
            drop(st);
            self.waker.wake();
            return if failed {
                Pushed::Closed
            } else {
                Pushed::Written
            };
        }
        self.enqueue(st, frame)
    }

    fn enqueue(&self, mut st: MutexGuard<'_, State>, frame: &Utf8Bytes) -> Pushed {
        let bytes = st.bytes.saturating_add(frame.len());
        if st.queue.len() >= self.max_frames || bytes > self.max_bytes {
            return Pushed::Full;
        }
        st.queue.push_back(frame.clone());
        st.bytes = bytes;
        drop(st);
        self.waker.wake();
        Pushed::Queued
    }

    /// Whether frames of `bytes` in all fit beside what is queued, keeping
    /// half the byte bound free: what a resume may replay at once.
    pub fn fits(&self, bytes: usize) -> bool {
        bytes.saturating_add(self.queued_bytes()) <= self.max_bytes / 2
    }

    /// For the session's task: the next frames to write (at most
    /// `max_frames`, and no more bytes than `max_bytes` past the first),
    /// or `Ready` with none when only a direct write's rest is owed. From
    /// then the session owns the write side until [`Line::written`].
    /// `Err` when the socket failed under a direct write.
    pub fn poll_take(
        &self,
        cx: &mut Context<'_>,
        batch: &mut Vec<Utf8Bytes>,
        max_frames: usize,
        max_bytes: usize,
    ) -> Poll<Result<(), ()>> {
        self.waker.register(cx.waker());
        let mut st = self.lock();
        if st.failed {
            return Poll::Ready(Err(()));
        }
        if st.queue.is_empty() && !st.owed && st.rest.is_none() {
            return Poll::Pending;
        }
        let mut taken = 0;
        while let Some(frame) = st.queue.pop_front() {
            taken += frame.len();
            batch.push(frame);
            if batch.len() >= max_frames || taken >= max_bytes {
                break;
            }
        }
        st.bytes -= taken;
        if st.queue.is_empty() && st.queue.capacity() > 64 {
            // A burst's queue is not kept by an idle connection.
            st.queue = VecDeque::new();
        }
        st.writing = true;
        Poll::Ready(Ok(()))
    }

    /// The session's task starts writing frames of its own.
    pub fn writing(&self) {
        self.lock().writing = true;
    }

    /// The session's task has flushed what it wrote: deliverers may write
    /// directly again.
    pub fn written(&self) {
        let mut st = self.lock();
        st.writing = false;
        st.direct = !st.closed;
    }

    /// The session ends: nothing more is delivered or written directly
    /// (its close frame must be the last), and the queue is dropped.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.direct = false;
        st.queue = VecDeque::new();
        st.bytes = 0;
    }

    /// The frames waiting (for unit tests of detached lines).
    #[cfg(test)]
    pub fn try_pop(&self) -> Option<Utf8Bytes> {
        let mut st = self.lock();
        let frame = st.queue.pop_front()?;
        st.bytes -= frame.len();
        Some(frame)
    }
}

/// The session's view of its line's socket, for tungstenite: reads go
/// straight through; writes first finish what a direct write left, and
/// note when tungstenite is left holding part of a frame.
pub struct Socket(pub Arc<Line>);

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.0.lock();
        match st.io.as_mut() {
            Some(io) => Pin::new(&mut **io).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.0.lock();
        // tungstenite hands over its whole buffer each time: when the
        // socket takes less, tungstenite keeps part of a frame, and no
        // direct write may go before it.
        st.dirty = true;
        ready!(st.poll_rest(cx))?;
        let Some(io) = st.io.as_mut() else {
            return Poll::Ready(Ok(buf.len()));
        };
        let written = ready!(Pin::new(&mut **io).poll_write(cx, buf))?;
        st.dirty = written < buf.len();
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.0.lock();
        ready!(st.poll_rest(cx))?;
        let Some(io) = st.io.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        ready!(Pin::new(&mut **io).poll_flush(cx))?;
        st.owed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.0.lock();
        match st.io.as_mut() {
            Some(io) => Pin::new(&mut **io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests;
