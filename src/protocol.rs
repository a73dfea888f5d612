//! Typed frames of the wire contract (`protocol.md` §2, §4): what clients
//! send, what the gateway answers, error codes and close codes. No I/O.
//!
//! Decoding borrows from the frame's text: `data` stays raw JSON, so a
//! publication is never parsed into a tree nor re-serialized.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::channel::ChannelName;
use crate::history::Position;

/// Messages a `history` request returns when it names no `limit`.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
/// Most messages one `history` request may ask for.
pub const MAX_HISTORY_LIMIT: usize = 1000;

/// A request from a client, decoded from one text frame.
#[derive(Debug, Clone)]
pub enum ClientFrame<'a> {
    Subscribe {
        id: Option<u64>,
        channel: ChannelName,
        /// The last position the client saw: replay what came after it.
        since: Option<Position>,
        /// Also deliver the channel's `join` and `leave` frames.
        presence: bool,
    },
    Unsubscribe {
        id: Option<u64>,
        channel: ChannelName,
    },
    Publish {
        id: Option<u64>,
        channel: ChannelName,
        data: &'a RawValue,
    },
    Refresh {
        id: Option<u64>,
        token: Cow<'a, str>,
    },
    Ping {
        id: Option<u64>,
    },
    History {
        id: Option<u64>,
        channel: ChannelName,
        /// 1 to [`MAX_HISTORY_LIMIT`]; [`DEFAULT_HISTORY_LIMIT`] when absent.
        limit: usize,
    },
    Presence {
        id: Option<u64>,
        channel: ChannelName,
    },
}

impl ClientFrame<'_> {
    /// The request's `id` and the channel it names, for a reply that
    /// refuses it whatever it was.
    pub fn id_and_channel(&self) -> (Option<u64>, Option<&ChannelName>) {
        match self {
            Self::Subscribe { id, channel, .. }
            | Self::Unsubscribe { id, channel }
            | Self::Publish { id, channel, .. }
            | Self::History { id, channel, .. }
            | Self::Presence { id, channel } => (*id, Some(channel)),
            Self::Refresh { id, .. } | Self::Ping { id } => (*id, None),
        }
    }
}

/// The flat shape every request shares; unknown fields are ignored.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(default)]
    limit: Option<serde_json::Value>,
    #[serde(default)]
    presence: Option<serde_json::Value>,
}

/// `since` as the contract has it.
#[derive(Deserialize)]
struct Since<'a> {
    #[serde(borrow)]
    epoch: Cow<'a, str>,
    seq: u64,
}

/// `data: null` is a value to publish, not an absent field.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A frame the gateway sends (all but `message`, see [`MessageTemplate`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        user: &'a str,
        expires_at: u64,
        heartbeat_ms: u64,
    },
    Ok {
        id: u64,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A user's first subscription to the channel began (§6).
    Join {
        channel: &'a str,
        user: &'a str,
    },
    /// A user's last subscription to the channel ended, past the grace.
    Leave {
        channel: &'a str,
        user: &'a str,
    },
}

impl ServerFrame<'_> {
    /// The frame as JSON text. Serializing these types cannot fail (no
    /// maps with non-string keys, no foreign `Serialize` impls).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"op":"error","code":"internal","message":"encoding failed"}"#.to_owned()
        })
    }
}

/// A `message` frame encoded once per publication, up to its `seq`, which
/// the hub fills in under the channel's lock.
#[derive(Debug, Clone)]
pub struct MessageTemplate {
    head: String,
    tail: String,
}

impl MessageTemplate {
    /// Encodes everything but `seq`: `channel`, `from` and the raw `data`.
    pub fn new(channel: &ChannelName, from: &str, data: &RawValue) -> Self {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
        let head = format!(
            r#"{{"op":"message","channel":{},"from":{},"seq":"#,
            quote(channel.as_str()),
            quote(from)
        );
        let mut tail = String::with_capacity(data.get().len() + 10);
        tail.push_str(r#","data":"#);
        tail.push_str(data.get());
        tail.push('}');
        Self { head, tail }
    }

    /// The complete frame for `seq`.
    pub fn with_seq(&self, seq: u64) -> String {
        let mut out = String::with_capacity(self.head.len() + 20 + self.tail.len());
        out.push_str(&self.head);
        out.push_str(itoa::Buffer::new().format(seq));
        out.push_str(&self.tail);
        out
    }
}

/// The `ok` of a `subscribe`, with the channel's position on a history
/// channel and, for a resume, whether the missed messages follow
/// (protocol.md §5). Written as `{"op":"ok",…}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionOk<'a> {
    op: &'static str,
    id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

impl<'a> PositionOk<'a> {
    /// `position` is `None` on a channel without history; `resume` is
    /// `None` for a plain subscribe, else `Ok` (recovered) or the reason.
    pub fn new(
        id: u64,
        position: Option<(&'a str, u64)>,
        resume: Option<Result<(), &'static str>>,
    ) -> Self {
        Self {
            op: "ok",
            id,
            epoch: position.map(|(e, _)| e),
            seq: position.map(|(_, s)| s),
            recovered: resume.map(|r| r.is_ok()),
            reason: resume.and_then(Result::err),
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"op":"error","code":"internal","message":"encoding failed"}"#.to_owned()
        })
    }

    /// The `ok` of a `history` request: this position and `messages`, each
    /// cut from a stored `message` frame of `channel` (no re-encoding).
    pub fn with_messages<'f>(
        &self,
        channel: &ChannelName,
        frames: impl Iterator<Item = &'f str>,
    ) -> String {
        let mut out = self.encode();
        out.pop(); // the closing brace
        out.push_str(r#","messages":["#);
        let prefix = message_prefix(channel);
        let mut first = true;
        for frame in frames {
            // Every stored frame was made by `MessageTemplate` for this
            // channel; one that was not is left out rather than garbled.
            let Some(rest) = frame.strip_prefix(&prefix) else {
                continue;
            };
            if !first {
                out.push(',');
            }
            first = false;
            out.push('{');
            out.push_str(rest);
        }
        out.push_str("]}");
        out
    }
}

/// The `ok` of a `presence` request (protocol.md §6): the member count,
/// and their user ids (sorted) unless there are too many to list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresenceOk<'a> {
    op: &'static str,
    id: u64,
    count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    users: Option<&'a [String]>,
}

impl<'a> PresenceOk<'a> {
    pub fn new(id: u64, count: usize, users: Option<&'a [String]>) -> Self {
        Self {
            op: "ok",
            id,
            count,
            users,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"op":"error","code":"internal","message":"encoding failed"}"#.to_owned()
        })
    }
}

/// What every `message` frame of `channel` starts with, up to `from`.
fn message_prefix(channel: &ChannelName) -> String {
    format!(
        r#"{{"op":"message","channel":{},"#,
        serde_json::to_string(channel.as_str()).unwrap_or_default()
    )
}

/// Stable error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    NotSubscribed,
    RateLimited,
    TooManySubscriptions,
    TokenMismatch,
    InvalidToken,
    Internal,
    NoHistory,
    NoPresence,
}

/// Why a text frame could not be decoded into a [`ClientFrame`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// The request's `id`, when one could be read, so the reply carries it.
    pub id: Option<u64>,
    /// Whether the frame was a JSON object at all (repeated non-objects close 1008).
    pub is_object: bool,
    pub message: Cow<'static, str>,
}

/// Decodes one text frame. Unknown fields are ignored.
///
/// # Errors
/// Malformed JSON, a non-object, a missing or unknown `op`, a missing
/// field, a bad channel name, or a field of the wrong type.
pub fn decode(text: &str) -> Result<ClientFrame<'_>, DecodeError> {
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| shape_error(text, &e))?;
    let id = wire.id;
    let bad = |message: Cow<'static, str>| DecodeError {
        id,
        is_object: true,
        message,
    };
    let channel = || -> Result<ChannelName, DecodeError> {
        let raw = wire
            .channel
            .as_deref()
            .ok_or_else(|| bad("missing field `channel`".into()))?;
        ChannelName::parse(raw).map_err(|e| bad(e.to_string().into()))
    };
    let op = wire
        .op
        .as_deref()
        .ok_or_else(|| bad("missing field `op`".into()))?;
    Ok(match op {
        "subscribe" => ClientFrame::Subscribe {
            id,
            channel: channel()?,
            since: match wire.since {
                None => None,
                Some(raw) => Some(
                    serde_json::from_str::<Since<'_>>(raw.get())
                        .map(|s| Position {
                            epoch: s.epoch.into_owned(),
                            seq: s.seq,
                        })
                        .map_err(|_| {
                            bad("`since` must be an object with a string `epoch` and an unsigned integer `seq`".into())
                        })?,
                ),
            },
            presence: match &wire.presence {
                None => false,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad("`presence` must be true or false".into()))?,
            },
        },
        "presence" => ClientFrame::Presence {
            id,
            channel: channel()?,
        },
        "unsubscribe" => ClientFrame::Unsubscribe {
            id,
            channel: channel()?,
        },
        "publish" => ClientFrame::Publish {
            id,
            channel: channel()?,
            data: wire
                .data
                .ok_or_else(|| bad("missing field `data`".into()))?,
        },
        "refresh" => ClientFrame::Refresh {
            id,
            token: wire
                .token
                .clone()
                .ok_or_else(|| bad("missing field `token`".into()))?,
        },
        "ping" => ClientFrame::Ping { id },
        "history" => ClientFrame::History {
            id,
            channel: channel()?,
            limit: match &wire.limit {
                None => DEFAULT_HISTORY_LIMIT,
                Some(v) => v
                    .as_u64()
                    .filter(|n| (1..=MAX_HISTORY_LIMIT as u64).contains(n))
                    .map(|n| n as usize)
                    .ok_or_else(|| bad("`limit` must be an integer from 1 to 1000".into()))?,
            },
        },
        _ => return Err(bad("unknown op".into())),
    })
}

/// Classifies a frame that did not fit [`Wire`], recovering `id` where it can.
fn shape_error(text: &str, e: &serde_json::Error) -> DecodeError {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<u64>,
    }
    let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let is_object = value.as_ref().is_some_and(serde_json::Value::is_object);
    // Only an object has an `id` (serde would read `[1]` as a struct too).
    let id = value
        .filter(serde_json::Value::is_object)
        .and_then(|v| serde_json::from_value::<IdOnly>(v).ok())
        .and_then(|e| e.id);
    let message: Cow<'static, str> = if is_object {
        // A field of the wrong type; serde names it without echoing values.
        describe(e).into()
    } else if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        "a frame must be a JSON object".into()
    } else {
        "malformed JSON".into()
    };
    DecodeError {
        id,
        is_object,
        message,
    }
}

/// serde's message without its line/column suffix, which means nothing to
/// a client sending single-line frames.
fn describe(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// Close codes of the contract (§4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    // 1000 and 1011 are in the contract's table; no close reason sends
    // them yet (a client's own close is answered by tungstenite).
    #[allow(dead_code)]
    Normal = 1000,
    GoingAway = 1001,
    ProtocolError = 1002,
    Unsupported = 1003,
    InvalidPayload = 1007,
    PolicyViolation = 1008,
    TooBig = 1009,
    #[allow(dead_code)]
    InternalError = 1011,
    TokenExpired = 4001,
    Disconnected = 4003,
    TooSlow = 4008,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "1000",
            Self::GoingAway => "1001",
            Self::ProtocolError => "1002",
            Self::Unsupported => "1003",
            Self::InvalidPayload => "1007",
            Self::PolicyViolation => "1008",
            Self::TooBig => "1009",
            Self::InternalError => "1011",
            Self::TokenExpired => "4001",
            Self::Disconnected => "4003",
            Self::TooSlow => "4008",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> ChannelName {
        ChannelName::parse(s).unwrap()
    }

    #[test]
    fn every_op_decodes() {
        let ok = |text: &str| {
            decode(text)
                .map_err(|e| e.message.to_string())
                .map(|f| format!("{f:?}"))
        };
        assert_eq!(
            ok(r#"{"op":"ping","id":7,"extra":true}"#).unwrap(),
            "Ping { id: Some(7) }"
        );
        assert_eq!(ok(r#"{"op":"ping"}"#).unwrap(), "Ping { id: None }");
        assert!(matches!(
            decode(r#"{"op":"subscribe","id":1,"channel":"chat:lobby"}"#),
            Ok(ClientFrame::Subscribe { id: Some(1), channel, since: None, presence: false }) if channel == ch("chat:lobby")
        ));
        let resume =
            r#"{"op":"subscribe","id":2,"channel":"a","since":{"epoch":"q7f3k2","seq":41}}"#;
        assert!(matches!(
            decode(resume),
            Ok(ClientFrame::Subscribe { since: Some(Position { epoch, seq: 41 }), .. }) if epoch == "q7f3k2"
        ));
        // `since: null` is no resume, like an absent field.
        assert!(matches!(
            decode(r#"{"op":"subscribe","channel":"a","since":null}"#),
            Ok(ClientFrame::Subscribe { since: None, .. })
        ));
        for bad in [
            r#"{"op":"subscribe","id":3,"channel":"a","since":5}"#,
            r#"{"op":"subscribe","id":3,"channel":"a","since":{"epoch":1,"seq":2}}"#,
            r#"{"op":"subscribe","id":3,"channel":"a","since":{"epoch":"e","seq":-1}}"#,
            r#"{"op":"subscribe","id":3,"channel":"a","since":{"epoch":"e"}}"#,
        ] {
            let e = decode(bad).unwrap_err();
            assert_eq!(e.id, Some(3), "{bad}");
            assert!(e.message.contains("since"), "{bad}: {}", e.message);
        }
        assert!(matches!(
            decode(r#"{"op":"history","id":7,"channel":"a"}"#),
            Ok(ClientFrame::History {
                limit: DEFAULT_HISTORY_LIMIT,
                ..
            })
        ));
        assert!(matches!(
            decode(r#"{"op":"history","id":7,"channel":"a","limit":1000}"#),
            Ok(ClientFrame::History { limit: 1000, .. })
        ));
        for bad in ["0", "1001", "\"5\"", "2.5", "-1"] {
            let text = format!(r#"{{"op":"history","id":8,"channel":"a","limit":{bad}}}"#);
            assert!(
                decode(&text).unwrap_err().message.contains("limit"),
                "{bad}"
            );
        }
        assert!(matches!(
            decode(r#"{"op":"unsubscribe","channel":"a"}"#),
            Ok(ClientFrame::Unsubscribe { id: None, channel }) if channel == ch("a")
        ));
        let text = r#"{"op":"publish","id":2,"channel":"a","data":{"x":[1,2]},"from":"forged"}"#;
        match decode(text).unwrap() {
            ClientFrame::Publish { id, channel, data } => {
                assert_eq!(id, Some(2));
                assert_eq!(channel, ch("a"));
                assert_eq!(data.get(), r#"{"x":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        match decode(r#"{"op":"publish","channel":"a","data":null}"#).unwrap() {
            ClientFrame::Publish { data, .. } => assert_eq!(data.get(), "null"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(r#"{"op":"refresh","id":3,"token":"t.t.t"}"#),
            Ok(ClientFrame::Refresh { id: Some(3), token }) if token == "t.t.t"
        ));
    }

    #[test]
    fn errors_keep_the_id_and_know_objects() {
        let e = decode(r#"{"op":"dance","id":3}"#).unwrap_err();
        assert_eq!(
            (e.id, e.is_object, &*e.message),
            (Some(3), true, "unknown op")
        );
        let e = decode(r#"{"op":"publish","id":4,"channel":"a"}"#).unwrap_err();
        assert_eq!((e.id, &*e.message), (Some(4), "missing field `data`"));
        let e = decode(r#"{"op":"subscribe","id":5,"channel":"a b"}"#).unwrap_err();
        assert_eq!(e.id, Some(5));
        assert!(e.message.contains("A-Z"), "{}", e.message);
        let e = decode(r#"{"op":"subscribe","id":6}"#).unwrap_err();
        assert_eq!(&*e.message, "missing field `channel`");
        let e = decode(r#"{"id":8}"#).unwrap_err();
        assert_eq!((e.id, &*e.message), (Some(8), "missing field `op`"));
        let e = decode(r#"{"op":"subscribe","id":9,"channel":5}"#).unwrap_err();
        assert_eq!(e.id, Some(9));
        assert!(e.is_object);
        let e = decode("[1,2]").unwrap_err();
        assert!(!e.is_object);
        assert_eq!(e.id, None, "an array is not a request with an id");
        assert_eq!(e.message, "a frame must be a JSON object");
        let e = decode("{nope").unwrap_err();
        assert_eq!(e.message, "malformed JSON");
        let e = decode(r#"{"id":-1,"op":"ping"}"#).unwrap_err();
        assert_eq!(e.id, None);
    }

    #[test]
    fn server_frames_encode_as_the_contract_says() {
        let w = ServerFrame::Welcome {
            session: "s1",
            user: "alice",
            expires_at: 10,
            heartbeat_ms: 25_000,
        };
        assert_eq!(
            w.encode(),
            r#"{"op":"welcome","session":"s1","user":"alice","expires_at":10,"heartbeat_ms":25000}"#
        );
        let e = ServerFrame::Error {
            id: None,
            code: ErrorCode::TooManySubscriptions,
            message: "x",
            channel: Some("c"),
        };
        assert_eq!(
            e.encode(),
            r#"{"op":"error","code":"too_many_subscriptions","message":"x","channel":"c"}"#
        );
        assert_eq!(
            ServerFrame::Pong { id: Some(1) }.encode(),
            r#"{"op":"pong","id":1}"#
        );
        assert_eq!(ServerFrame::Ok { id: 2 }.encode(), r#"{"op":"ok","id":2}"#);
    }

    #[test]
    fn message_template_is_valid_json_with_escaped_sender() {
        let data = RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap();
        let t = MessageTemplate::new(&ch("chat:x"), "a\"b", &data);
        let v: serde_json::Value = serde_json::from_str(&t.with_seq(42)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"message","channel":"chat:x","from":"a\"b","seq":42,"data":{"text":"hi"}})
        );
    }

    #[test]
    fn position_oks_and_history_items() {
        assert_eq!(
            PositionOk::new(2, Some(("q7", 41)), None).encode(),
            r#"{"op":"ok","id":2,"epoch":"q7","seq":41}"#
        );
        assert_eq!(
            PositionOk::new(2, Some(("q7", 44)), Some(Ok(()))).encode(),
            r#"{"op":"ok","id":2,"epoch":"q7","seq":44,"recovered":true}"#
        );
        assert_eq!(
            PositionOk::new(2, None, Some(Err("no_history"))).encode(),
            r#"{"op":"ok","id":2,"recovered":false,"reason":"no_history"}"#
        );
        let c = ch("chat:lobby");
        let data = RawValue::from_string(r#"{"t":"hi"}"#.into()).unwrap();
        let frames = [
            MessageTemplate::new(&c, "bob", &data).with_seq(42),
            MessageTemplate::new(&c, "carol", &data).with_seq(43),
        ];
        let text = PositionOk::new(7, Some(("q7", 43)), None)
            .with_messages(&c, frames.iter().map(String::as_str));
        assert_eq!(
            text,
            r#"{"op":"ok","id":7,"epoch":"q7","seq":43,"messages":[{"from":"bob","seq":42,"data":{"t":"hi"}},{"from":"carol","seq":43,"data":{"t":"hi"}}]}"#
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["messages"][1]["from"], "carol");
        let empty = PositionOk::new(7, Some(("q7", 0)), None).with_messages(&c, std::iter::empty());
        assert_eq!(
            empty,
            r#"{"op":"ok","id":7,"epoch":"q7","seq":0,"messages":[]}"#
        );
    }

    /// Fuzz: every client frame the decoder can be handed, mutated from
    /// valid ones with the tokens JSON and the protocol care about, or
    /// random bytes made text. A panic fails; every answer is a frame or a
    /// `DecodeError` whose message is short and never echoes the input.
    #[test]
    fn fuzz_the_client_frame_decoder() {
        let seeds: [&[u8]; 8] = [
            br#"{"op":"subscribe","id":1,"channel":"chat:lobby","since":{"epoch":"q7","seq":41},"presence":true}"#,
            br#"{"op":"publish","id":2,"channel":"chat:a","data":{"x":[1,2,{"y":null}]}}"#,
            br#"{"op":"refresh","id":3,"token":"a.b.c"}"#,
            br#"{"op":"history","id":4,"channel":"c","limit":1000}"#,
            br#"{"op":"presence","id":5,"channel":"c"}"#,
            br#"{"op":"unsubscribe","channel":"c"}"#,
            br#"{"op":"ping"}"#,
            br#"[1,"x",{"op":"ping"}]"#,
        ];
        let dictionary: [&[u8]; 16] = [
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b"\\u0000",
            b"\\ud800",
            b":",
            b",",
            b"null",
            b"1e999",
            b"-0",
            b"18446744073709551616",
            b"\"op\"",
            b"\"channel\":",
            b"\xf0\x9f\x92",
        ];
        let mut rng = crate::testing::Rng::new(0xdec0de);
        for _ in 0..crate::testing::iterations(20_000) {
            let bytes = if rng.one_in(10) {
                rng.bytes(64)
            } else {
                let seed: &[u8] = seeds[rng.below(seeds.len())];
                rng.mutate(seed, &dictionary)
            };
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = decode(&text) {
                assert!(e.message.len() < 200, "{}", e.message);
                if text.len() > 24 {
                    assert!(!e.message.contains(text.as_ref()), "echoed input");
                }
            }
        }
    }
}
