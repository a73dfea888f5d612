//! Typed frames of the wire contract (`protocol.md` §2, §4): what clients
//! send, what the gateway answers, error codes and close codes. No I/O.

use serde::{Deserialize, Serialize};

/// A request from a client, decoded from one text frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ClientFrame {
    Ping {
        #[serde(default)]
        id: Option<u64>,
    },
}

/// A frame the gateway sends.
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
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
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
}

/// Why a text frame could not be decoded into a [`ClientFrame`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// The request's `id`, when one could be read, so the reply carries it.
    pub id: Option<u64>,
    /// Whether the frame was a JSON object at all (repeated non-objects close 1008).
    pub is_object: bool,
    pub message: String,
}

/// Decodes one text frame. Unknown fields are ignored; an unknown `op` is
/// a [`DecodeError`] carrying the request's `id`.
///
/// # Errors
/// Malformed JSON, a non-object, a missing or unknown `op`, bad field types.
pub fn decode(text: &str) -> Result<ClientFrame, DecodeError> {
    serde_json::from_str(text).map_err(|e| {
        // Second, lenient pass only on the error path, to recover `id`.
        #[derive(Deserialize)]
        struct Envelope {
            id: Option<u64>,
        }
        let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
        let is_object = value.as_ref().is_some_and(serde_json::Value::is_object);
        let id = value
            .and_then(|v| serde_json::from_value::<Envelope>(v).ok())
            .and_then(|e| e.id);
        let message = if is_object {
            match e.classify() {
                serde_json::error::Category::Data => describe(&e),
                _ => "malformed JSON".to_owned(),
            }
        } else if value_is_json(text) {
            "a frame must be a JSON object".to_owned()
        } else {
            "malformed JSON".to_owned()
        };
        DecodeError {
            id,
            is_object,
            message,
        }
    })
}

fn value_is_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
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
    Normal = 1000,
    GoingAway = 1001,
    ProtocolError = 1002,
    Unsupported = 1003,
    InvalidPayload = 1007,
    PolicyViolation = 1008,
    TooBig = 1009,
    InternalError = 1011,
    TokenExpired = 4001,
    TooSlow = 4008,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_with_and_without_id() {
        assert_eq!(
            decode(r#"{"op":"ping","id":7,"extra":true}"#),
            Ok(ClientFrame::Ping { id: Some(7) })
        );
        assert_eq!(
            decode(r#"{"op":"ping"}"#),
            Ok(ClientFrame::Ping { id: None })
        );
    }

    #[test]
    fn errors_keep_the_id_and_know_objects() {
        let e = decode(r#"{"op":"dance","id":3}"#).unwrap_err();
        assert_eq!(e.id, Some(3));
        assert!(e.is_object);
        assert!(e.message.contains("dance"), "{}", e.message);
        let e = decode("[1,2]").unwrap_err();
        assert!(!e.is_object);
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
            code: ErrorCode::BadRequest,
            message: "x",
        };
        assert_eq!(
            e.encode(),
            r#"{"op":"error","code":"bad_request","message":"x"}"#
        );
        assert_eq!(
            ServerFrame::Pong { id: Some(1) }.encode(),
            r#"{"op":"pong","id":1}"#
        );
    }
}
