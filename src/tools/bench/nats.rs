//! The NATS client protocol, as much of it as `wsgate bench --nats` needs
//! to drive nats-server's WebSocket listener the way it drives the other
//! servers: the handshake (`INFO`, then `CONNECT` with a token, `PING`,
//! `PONG`), `SUB`, `PUB`, and `MSG` deliveries.
//!
//! WebSocket message boundaries mean nothing to NATS: the server packs
//! whatever is pending for a client into one frame, so one message may hold
//! several operations and an operation may continue in the next message.
//! [`Reader`] therefore parses a byte stream (no I/O); the `async` helpers
//! at the end move bytes between it and a [`Ws`].

use std::ops::ControlFlow;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::{BenchError, Ws};

/// The longest control line accepted (an `INFO` is the longest the server
/// sends; its own `max_control_line` for clients is 4 KiB).
const MAX_LINE: usize = 64 * 1024;
/// The largest `MSG` payload accepted: nats-server's default `max_payload`.
const MAX_PAYLOAD: usize = 1024 * 1024;
/// How long each handshake or subscribe phase may take: a bound against a
/// server that never answers, not a measurement.
const PHASE_DEADLINE: Duration = Duration::from_secs(30);

/// One operation from the server, borrowing from the bytes it was read from.
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Info,
    Ping,
    Pong,
    Ok,
    /// `-ERR`, with its text (quotes included).
    Err(&'a [u8]),
    Msg {
        sid: &'a [u8],
        payload: &'a [u8],
    },
}

/// A byte stream that is not the NATS protocol a server speaks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("nats: a control line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("nats: a {0}-byte payload, over {MAX_PAYLOAD}")]
    PayloadTooBig(u64),
    #[error("nats: a malformed MSG line")]
    BadMsg,
    #[error("nats: a payload not followed by CRLF")]
    BadPayloadEnd,
    #[error("nats: an unknown operation {0:?}")]
    Unknown(String),
}

impl From<ProtoError> for BenchError {
    fn from(e: ProtoError) -> Self {
        Self::Connect(e.to_string())
    }
}

/// What is left of the stream between WebSocket messages: a partial
/// operation, or whole ones not yet handed out when a caller stopped.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    /// Appends `data` to the stream and hands every complete operation to
    /// `each`, in order, until it answers `Break`; the rest waits for the
    /// next call (`feed(&[], ..)` resumes with no new bytes).
    ///
    /// # Errors
    /// The stream is not the NATS protocol; the reader is then unusable.
    pub fn feed(
        &mut self,
        data: &[u8],
        mut each: impl FnMut(Op<'_>) -> ControlFlow<()>,
    ) -> Result<(), ProtoError> {
        // Most messages hold whole operations: parse them where they lie
        // and copy only a trailing fragment.
        if self.buf.is_empty() {
            let used = parse(data, &mut each)?;
            self.buf.extend_from_slice(&data[used..]);
        } else {
            self.buf.extend_from_slice(data);
            let used = parse(&self.buf, &mut each)?;
            self.buf.drain(..used);
        }
        Ok(())
    }
}

/// Hands out the complete operations at the start of `input`; returns how
/// many bytes they took.
fn parse(
    input: &[u8],
    each: &mut impl FnMut(Op<'_>) -> ControlFlow<()>,
) -> Result<usize, ProtoError> {
    let mut at = 0;
    while at < input.len() {
        let rest = &input[at..];
        let Some(eol) = rest.iter().position(|&b| b == b'\n') else {
            return if rest.len() > MAX_LINE {
                Err(ProtoError::LineTooLong)
            } else {
                Ok(at)
            };
        };
        if eol > MAX_LINE {
            return Err(ProtoError::LineTooLong);
        }
        let line = rest[..eol].strip_suffix(b"\r").unwrap_or(&rest[..eol]);
        let (verb, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
            Some(i) => (&line[..i], line[i + 1..].trim_ascii()),
            None => (line, &[][..]),
        };
        let (op, used) = if verb.eq_ignore_ascii_case(b"MSG") {
            let (sid, len) = msg_args(args)?;
            let start = eol + 1;
            let end = start + len;
            if rest.len() < end + 2 {
                return Ok(at);
            }
            if &rest[end..end + 2] != b"\r\n" {
                return Err(ProtoError::BadPayloadEnd);
            }
            let payload = &rest[start..end];
            (Op::Msg { sid, payload }, end + 2)
        } else {
            let op = if verb.eq_ignore_ascii_case(b"PING") {
                Op::Ping
            } else if verb.eq_ignore_ascii_case(b"PONG") {
                Op::Pong
            } else if verb.eq_ignore_ascii_case(b"INFO") {
                Op::Info
            } else if verb.eq_ignore_ascii_case(b"+OK") {
                Op::Ok
            } else if verb.eq_ignore_ascii_case(b"-ERR") {
                Op::Err(args)
            } else {
                let shown = &verb[..verb.len().min(16)];
                return Err(ProtoError::Unknown(
                    String::from_utf8_lossy(shown).into_owned(),
                ));
            };
            (op, eol + 1)
        };
        at += used;
        if each(op).is_break() {
            break;
        }
    }
    Ok(at)
}

/// `<subject> <sid> [reply-to] <#bytes>`: the sid and the payload length.
fn msg_args(args: &[u8]) -> Result<(&[u8], usize), ProtoError> {
    let mut words = args
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty());
    let (Some(_subject), Some(sid)) = (words.next(), words.next()) else {
        return Err(ProtoError::BadMsg);
    };
    let len = match (words.next(), words.next(), words.next()) {
        (Some(len), None, None) | (Some(_), Some(len), None) => len,
        _ => return Err(ProtoError::BadMsg),
    };
    // Ten digits cannot overflow a u64; the bound below keeps it small.
    if len.is_empty() || len.len() > 10 || !len.iter().all(u8::is_ascii_digit) {
        return Err(ProtoError::BadMsg);
    }
    let len = len.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    let len = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_PAYLOAD)
        .ok_or(ProtoError::PayloadTooBig(len))?;
    Ok((sid, len))
}

/// A subject the bench publishes and subscribes on: no whitespace or
/// control characters, no wildcard token.
#[derive(Debug, Clone)]
pub struct Subject(String);

impl Subject {
    /// # Errors
    /// `name` is empty or not a literal subject.
    pub fn new(name: &str) -> Result<Self, BenchError> {
        let bad = name.is_empty()
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
            || name
                .split('.')
                .any(|t| t.is_empty() || t == "*" || t == ">");
        if bad {
            return Err(BenchError::Setup(format!(
                "{name:?} is not a literal NATS subject"
            )));
        }
        Ok(Self(name.to_owned()))
    }

    /// `SUB <subject> <sid>` then a `PING`, whose `PONG` says the
    /// subscription is registered.
    #[must_use]
    pub fn subscribe(&self, sid: u32) -> Message {
        Message::binary(format!("SUB {} {sid}\r\nPING\r\n", self.0).into_bytes())
    }

    /// `PUB <subject> <#bytes>` and the payload.
    #[must_use]
    pub fn publish(&self, payload: &str) -> Message {
        Message::binary(format!("PUB {} {}\r\n{payload}\r\n", self.0, payload.len()).into_bytes())
    }
}

/// The `CONNECT` (with `auth_token`) and `PING` a client sends after the
/// server's `INFO`. It holds the token, so it has no `Debug`.
#[derive(Clone)]
pub struct Hello(Bytes);

impl Hello {
    /// # Errors
    /// The token cannot be written as JSON (it always can).
    pub fn new(token: &str) -> Result<Self, BenchError> {
        let token = serde_json::to_string(token)
            .map_err(|e| BenchError::Setup(format!("nats token: {e}")))?;
        Ok(Self(Bytes::from(format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"auth_token\":{token},\
             \"protocol\":1,\"headers\":false,\"no_responders\":false}}\r\nPING\r\n"
        ))))
    }
}

/// The bytes of a WebSocket message as NATS sees them (either opcode), or
/// `None` for control frames.
pub fn bytes_of(msg: Message) -> Option<Bytes> {
    match msg {
        Message::Binary(b) => Some(b),
        Message::Text(t) => Some(t.into()),
        _ => None,
    }
}

/// Answers `n` server `PING`s.
///
/// # Errors
/// The send failed.
pub async fn pong(ws: &mut Ws, n: usize) -> Result<(), BenchError> {
    const PONG: &[u8] = b"PONG\r\n";
    let frame = if n == 1 {
        Bytes::from_static(PONG)
    } else {
        Bytes::from(PONG.repeat(n))
    };
    ws.send(Message::binary(frame))
        .await
        .map_err(|e| BenchError::Connect(format!("nats: PONG: {e}")))
}

/// The handshake after the upgrade: the server's `INFO`, our `CONNECT`
/// and `PING`, its `PONG` (the token was accepted: a refusal is a `-ERR`).
///
/// # Errors
/// A refusal, a close, a protocol error or a phase past its deadline.
pub async fn handshake(ws: &mut Ws, reader: &mut Reader, hello: &Hello) -> Result<(), BenchError> {
    expect(ws, reader, |op| matches!(op, Op::Info), "INFO").await?;
    ws.send(Message::binary(hello.0.clone()))
        .await
        .map_err(|e| BenchError::Connect(format!("nats: CONNECT: {e}")))?;
    expect(
        ws,
        reader,
        |op| matches!(op, Op::Pong),
        "PONG after CONNECT",
    )
    .await
}

/// Subscribes as `sid` and waits until the server has registered it.
///
/// # Errors
/// As [`handshake`].
pub async fn subscribe(
    ws: &mut Ws,
    reader: &mut Reader,
    subject: &Subject,
    sid: u32,
) -> Result<(), BenchError> {
    ws.send(subject.subscribe(sid))
        .await
        .map_err(|e| BenchError::Connect(format!("nats: SUB: {e}")))?;
    expect(ws, reader, |op| matches!(op, Op::Pong), "PONG after SUB").await
}

/// Reads until `wanted` matches an operation, answering `PING`s; a `-ERR`
/// first is a refusal. Operations after the wanted one stay in `reader`.
async fn expect(
    ws: &mut Ws,
    reader: &mut Reader,
    wanted: impl Fn(&Op<'_>) -> bool,
    phase: &str,
) -> Result<(), BenchError> {
    let fail = |what: String| BenchError::Connect(format!("nats: waiting for {phase}: {what}"));
    let read = async {
        let mut data = Bytes::new();
        loop {
            let (mut seen, mut pings, mut refused) = (false, 0, None);
            reader.feed(&data, |op| {
                if wanted(&op) {
                    seen = true;
                    return ControlFlow::Break(());
                }
                match op {
                    Op::Ping => pings += 1,
                    Op::Err(text) => {
                        refused = Some(String::from_utf8_lossy(text).into_owned());
                        return ControlFlow::Break(());
                    }
                    _ => {}
                }
                ControlFlow::Continue(())
            })?;
            if pings > 0 {
                pong(ws, pings).await?;
            }
            if let Some(text) = refused {
                return Err(fail(format!("-ERR {text}")));
            }
            if seen {
                return Ok(());
            }
            data = loop {
                match ws.next().await {
                    Some(Ok(msg)) => {
                        if let Message::Close(frame) = &msg {
                            return Err(fail(format!("closed: {frame:?}")));
                        }
                        if let Some(bytes) = bytes_of(msg) {
                            break bytes;
                        }
                    }
                    Some(Err(e)) => return Err(fail(e.to_string())),
                    None => return Err(fail("closed".into())),
                }
            };
        }
    };
    tokio::time::timeout(PHASE_DEADLINE, read)
        .await
        .map_err(|_| fail(format!("no answer in {} s", PHASE_DEADLINE.as_secs())))?
}

/// Reads until the connection ends, answering `PING`s: a held idle client.
pub async fn hold(ws: &mut Ws, reader: &mut Reader) {
    while let Some(Ok(msg)) = ws.next().await {
        let Some(data) = bytes_of(msg) else { continue };
        let mut pings = 0;
        let fed = reader.feed(&data, |op| {
            if op == Op::Ping {
                pings += 1;
            }
            ControlFlow::Continue(())
        });
        if fed.is_err() || (pings > 0 && pong(ws, pings).await.is_err()) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation `chunks` hold, fed one chunk at a time, as owned
    /// (kind, payload) pairs.
    fn ops_of(chunks: &[&[u8]]) -> Result<Vec<(String, Vec<u8>)>, ProtoError> {
        let mut reader = Reader::default();
        let mut out = Vec::new();
        for chunk in chunks {
            reader.feed(chunk, |op| {
                out.push(match op {
                    Op::Msg { sid, payload } => (
                        format!("MSG {}", String::from_utf8_lossy(sid)),
                        payload.to_vec(),
                    ),
                    Op::Err(text) => ("-ERR".into(), text.to_vec()),
                    other => (format!("{other:?}"), Vec::new()),
                });
                ControlFlow::Continue(())
            })?;
        }
        Ok(out)
    }

    const STREAM: &[u8] = b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n\
PING\r\nMSG chat:bench 1 23\r\n{\"t\":17,\"k\":3,\"p\":\"xx\"}\r\n\
MSG chat:bench 1 _INBOX.r 4\r\nab\r\n\r\n+OK\r\nMSG s 9 0\r\n\r\n-ERR 'Slow Consumer'\r\n";

    fn expected() -> Vec<(String, Vec<u8>)> {
        vec![
            ("Info".into(), vec![]),
            ("Ping".into(), vec![]),
            ("MSG 1".into(), br#"{"t":17,"k":3,"p":"xx"}"#.to_vec()),
            ("MSG 1".into(), b"ab\r\n".to_vec()),
            ("Ok".into(), vec![]),
            ("MSG 9".into(), vec![]),
            ("-ERR".into(), b"'Slow Consumer'".to_vec()),
        ]
    }

    #[test]
    fn several_operations_in_one_message() {
        assert_eq!(ops_of(&[STREAM]), Ok(expected()));
    }

    #[test]
    fn operations_split_across_messages_anywhere() {
        // Every split point, and one byte per message.
        for cut in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(cut);
            assert_eq!(ops_of(&[a, b]), Ok(expected()), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(ops_of(&bytes), Ok(expected()));
    }

    #[test]
    fn a_stop_leaves_the_rest_for_the_next_call() {
        let mut reader = Reader::default();
        let mut seen = Vec::new();
        let stop_at_pong = |seen: &mut Vec<String>, op: Op<'_>| {
            let pong = op == Op::Pong;
            seen.push(format!("{op:?}"));
            if pong {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        reader
            .feed(b"INFO {}\r\nPONG\r\nMSG a 1 2\r\nhi\r\nPI", |op| {
                stop_at_pong(&mut seen, op)
            })
            .unwrap();
        assert_eq!(seen, ["Info", "Pong"]);
        reader
            .feed(b"NG\r\n", |op| stop_at_pong(&mut seen, op))
            .unwrap();
        assert_eq!(
            seen,
            [
                "Info",
                "Pong",
                r#"Msg { sid: [49], payload: [104, 105] }"#,
                "Ping"
            ]
        );
    }

    #[test]
    fn what_is_not_the_protocol_is_refused() {
        assert_eq!(
            ops_of(&[b"MSG a 1 2\r\nhiX\r\n"]),
            Err(ProtoError::BadPayloadEnd)
        );
        assert_eq!(ops_of(&[b"MSG a 2\r\n"]), Err(ProtoError::BadMsg));
        assert_eq!(ops_of(&[b"MSG a 1 -2\r\n"]), Err(ProtoError::BadMsg));
        assert_eq!(
            ops_of(&[b"MSG a 1 99999999\r\n"]),
            Err(ProtoError::PayloadTooBig(99_999_999))
        );
        assert_eq!(
            ops_of(&[b"HELLO\r\n"]),
            Err(ProtoError::Unknown("HELLO".into()))
        );
        let long = vec![b'I'; MAX_LINE + 1];
        assert_eq!(ops_of(&[&long]), Err(ProtoError::LineTooLong));
    }

    #[test]
    fn subjects_are_literal() {
        assert!(Subject::new("chat:bench").is_ok());
        for bad in ["", "a b", "a.*", "a.>", "a..b", "a\r\n"] {
            assert!(Subject::new(bad).is_err(), "{bad:?}");
        }
        let Message::Binary(publish) = Subject::new("s").unwrap().publish("hello") else {
            panic!("binary");
        };
        assert_eq!(&publish[..], b"PUB s 5\r\nhello\r\n");
    }
}
