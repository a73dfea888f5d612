//! Hostile frames, byte by byte: each case writes hand-made frame bytes
//! over a real TLS connection right after the `welcome`, parses what the
//! gateway writes back with the small server-frame reader below (no
//! WebSocket library on the client side), and expects exactly one close
//! frame with the RFC's code, then the end of the stream, while a session
//! opened before it still answers a ping.
//! RFC 6455 sections: RSV bits §5.2; reserved opcodes §5.2; control
//! frames over 125 bytes or fragmented §5.5; a stray continuation and a
//! new data frame inside a fragmented message §5.4; unmasked client
//! frames §5.1; close codes §7.4.1–§7.4.2 (1002 for the reserved and the
//! unassigned); a 1-byte close payload §5.5.1; a close reason that is
//! not UTF-8 §5.5.1 and §8.1 (1007); a 64-bit length with its top bit
//! set §5.2; a frame over the size limit §7.4.1 and §10.4 (1009).

use std::time::Instant;

use serde_json::{Value as Json, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::harness::{self, Client, Gateway, WAIT, start};

const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const FIN: u8 = 0x80;

const PROTOCOL_ERROR: u16 = 1002;
const INVALID_PAYLOAD: u16 = 1007;
const TOO_BIG: u16 = 1009;

/// One hostile input: the bytes written after the `welcome`, and the code
/// the gateway must close with.
struct Case {
    name: String,
    bytes: Vec<u8>,
    code: u16,
}

fn case(name: impl Into<String>, bytes: Vec<u8>, code: u16) -> Case {
    Case {
        name: name.into(),
        bytes,
        code,
    }
}

// ---- client frames, written by hand -----------------------------------------

/// A client frame with the first header byte `first` (FIN, RSV bits and
/// opcode as given), masked unless `masked` is false, around `payload`.
fn client_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = vec![first];
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// A masked client frame with FIN set.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(FIN | opcode, payload, true)
}

/// The header alone of a masked FIN text frame that claims `length`
/// payload bytes in the 64-bit length form; no payload follows.
fn header_claiming(length: u64) -> Vec<u8> {
    let mut frame = vec![FIN | TEXT, 0x80 | 127];
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&[0x37, 0xfa, 0x21, 0x3d]);
    frame
}

/// A close frame's payload: `code` then `reason`.
fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

// ---- server frames, read by hand --------------------------------------------

/// One frame as the server wrote it.
#[derive(Debug)]
struct ServerFrame {
    fin: bool,
    /// The three RSV bits, as the high nibble's low three bits.
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
}

impl ServerFrame {
    /// The first whole frame in `buf` and the bytes it took, or `None`
    /// while `buf` holds only part of one.
    fn parse(buf: &[u8]) -> Option<(Self, usize)> {
        let [first, second, ..] = *buf else {
            return None;
        };
        let (length, mut at) = match second & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let masked = second & 0x80 != 0;
        let mask = if masked {
            let mask: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
            at += 4;
            Some(mask)
        } else {
            None
        };
        let length = usize::try_from(length).expect("frame length fits in memory");
        let mut payload = buf.get(at..at.checked_add(length)?)?.to_vec();
        if let Some(mask) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let frame = Self {
            fin: first & 0x80 != 0,
            rsv: (first >> 4) & 0x7,
            opcode: first & 0x0f,
            masked,
            payload,
        };
        Some((frame, at + length))
    }

    /// Every whole frame in `buf`; fails on bytes left after the last one.
    fn parse_all(mut buf: &[u8]) -> Vec<Self> {
        let mut frames = Vec::new();
        while !buf.is_empty() {
            let (frame, used) = Self::parse(buf)
                .unwrap_or_else(|| panic!("a partial frame at the end: {buf:02x?}"));
            frames.push(frame);
            buf = &buf[used..];
        }
        frames
    }

    /// Server frames are never masked and carry no RSV bits (no extension
    /// is ever negotiated).
    fn assert_well_formed(&self) {
        assert!(!self.masked, "a masked frame from the server: {self:?}");
        assert_eq!(self.rsv, 0, "RSV bits from the server: {self:?}");
    }
}

/// Reads until one whole frame is in `buf`, and takes it out.
async fn next_frame<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> ServerFrame {
    let read = async {
        loop {
            if let Some((frame, used)) = ServerFrame::parse(buf) {
                buf.drain(..used);
                return frame;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read a frame");
            assert!(n > 0, "the stream ended inside a frame: {buf:02x?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("no frame from the gateway in time")
}

/// The process's peak virtual memory, in bytes (Linux only): an attempt to
/// reserve a 2^40-byte buffer would raise it by a terabyte, if it did not
/// abort the test binary first.
fn vm_peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmPeak:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// ---- running a case ------------------------------------------------------------

/// A gateway whose heartbeat ping cannot come between the `welcome` and a
/// case's close.
async fn gateway() -> Gateway {
    start(|c, _| c.websocket.heartbeat_ms = 600_000).await
}

/// Runs `case` on a fresh connection: after the `welcome`, the gateway's
/// whole answer is one close frame with `case.code`, then the stream ends;
/// a session opened before it answers a ping afterwards.
async fn run(gw: &Gateway, case: &Case) {
    let name = &case.name;
    let mut bystander = Client::join(gw, "bob", &["member"]).await;
    let token = gw.token("alice", &["member"]);
    let mut tls = gw.upgrade_by_hand(&[&harness::bearer(&token)]).await;
    let mut buf = Vec::new();
    let welcome = next_frame(&mut tls, &mut buf).await;
    welcome.assert_well_formed();
    assert!(welcome.fin && welcome.opcode == TEXT, "{name}: {welcome:?}");
    let welcome: Json = serde_json::from_slice(&welcome.payload).expect("welcome is JSON");
    assert_eq!(welcome["op"], "welcome", "{name}: {welcome}");
    assert_eq!(welcome["user"], "alice", "{name}: {welcome}");

    let peak_before = vm_peak();
    let started = Instant::now();
    tls.write_all(&case.bytes).await.expect("write the case");
    tls.flush().await.expect("flush the case");
    // Everything up to the end of the stream. `WAIT` is far below the
    // heartbeat and its grace, so an ending within it is the gateway's
    // answer to the case, not a timeout of its own.
    let end = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{name}: the stream did not end; read so far {buf:02x?}"));
    match end {
        // A TLS close_notify, then EOF.
        Ok(_) => {}
        // EOF without close_notify still ends the stream.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("{name}: the stream failed instead of ending ({e}); read {buf:02x?}"),
    }
    let took = started.elapsed();

    let frames = ServerFrame::parse_all(&buf);
    let [close] = frames.as_slice() else {
        panic!("{name}: expected exactly one close frame after the welcome, got {frames:?}");
    };
    close.assert_well_formed();
    assert!(
        close.fin && close.opcode == CLOSE,
        "{name}: expected a close frame, got {close:?}"
    );
    assert!(
        close.payload.len() >= 2,
        "{name}: a close frame without a code: {close:?}"
    );
    let code = u16::from_be_bytes([close.payload[0], close.payload[1]]);
    let reason = std::str::from_utf8(&close.payload[2..]);
    assert_eq!(code, case.code, "{name}: close reason {reason:?}");
    assert!(reason.is_ok(), "{name}: close reason not UTF-8: {close:?}");

    if case.code == TOO_BIG {
        // Refused at the header: nothing waits for, or makes room for, the
        // claimed payload.
        assert!(took < WAIT / 2, "{name}: closed only after {took:?}");
        if let (Some(before), Some(after)) = (peak_before, vm_peak()) {
            assert!(
                after.saturating_sub(before) < 1 << 30,
                "{name}: peak virtual memory grew from {before} to {after} bytes"
            );
        }
    }

    // Other sessions are untouched.
    bystander.send(&json!({"op": "ping", "id": 1})).await;
    assert_eq!(
        bystander.reply(1).await,
        json!({"op": "pong", "id": 1}),
        "{name}: the other session after the case"
    );
}

async fn run_all(cases: &[Case]) {
    let gw = gateway().await;
    for case in cases {
        run(&gw, case).await;
    }
}

// ---- the cases ----------------------------------------------------------------

#[tokio::test]
async fn reserved_bits_without_an_extension_fail_with_1002() {
    let cases: Vec<Case> = [(0x40, "RSV1"), (0x20, "RSV2"), (0x10, "RSV3")]
        .into_iter()
        .map(|(bit, name)| {
            let frame = client_frame(FIN | bit | TEXT, br#"{"op":"ping","id":7}"#, true);
            case(format!("{name} on a text frame"), frame, PROTOCOL_ERROR)
        })
        .collect();
    run_all(&cases).await;
}

#[tokio::test]
async fn reserved_opcodes_fail_with_1002() {
    let cases: Vec<Case> = (0x3..=0x7)
        .chain(0xb..=0xf)
        .map(|opcode| {
            let kind = if opcode < 0x8 { "data" } else { "control" };
            let frame = masked(opcode, b"x");
            case(
                format!("reserved {kind} opcode {opcode:#x}"),
                frame,
                PROTOCOL_ERROR,
            )
        })
        .collect();
    run_all(&cases).await;
}

#[tokio::test]
async fn control_frames_over_125_bytes_or_fragmented_fail_with_1002() {
    run_all(&[
        case(
            "ping with a 126-byte payload",
            masked(PING, &[b'p'; 126]),
            PROTOCOL_ERROR,
        ),
        case(
            "ping without FIN",
            client_frame(PING, b"part", true),
            PROTOCOL_ERROR,
        ),
    ])
    .await;
}

#[tokio::test]
async fn broken_fragmentation_fails_with_1002() {
    let mut interleaved = client_frame(TEXT, br#"{"op":"ping","#, true);
    interleaved.extend(masked(TEXT, br#"{"op":"ping","id":2}"#));
    run_all(&[
        case(
            "a continuation with nothing to continue",
            masked(CONTINUATION, br#"{"op":"ping","id":1}"#),
            PROTOCOL_ERROR,
        ),
        case(
            "a new text frame inside a fragmented message",
            interleaved,
            PROTOCOL_ERROR,
        ),
    ])
    .await;
}

#[tokio::test]
async fn an_unmasked_client_frame_fails_with_1002() {
    run_all(&[case(
        "unmasked text frame",
        client_frame(FIN | TEXT, br#"{"op":"ping","id":1}"#, false),
        PROTOCOL_ERROR,
    )])
    .await;
}

#[tokio::test]
async fn malformed_close_frames_fail_with_1002_or_1007() {
    let mut cases: Vec<Case> = [1005u16, 1006, 1015, 0, 999, 5000, 1004, 1016]
        .into_iter()
        .map(|code| {
            case(
                format!("close with code {code}"),
                masked(CLOSE, &close_payload(code, b"bye")),
                PROTOCOL_ERROR,
            )
        })
        .collect();
    cases.push(case(
        "close with a 1-byte payload",
        masked(CLOSE, &[0x03]),
        PROTOCOL_ERROR,
    ));
    cases.push(case(
        "close 1000 with a reason that is not UTF-8",
        masked(CLOSE, &close_payload(1000, b"bye \xff\xfe")),
        INVALID_PAYLOAD,
    ));
    run_all(&cases).await;
}

#[tokio::test]
async fn a_64_bit_length_with_the_top_bit_set_fails_with_1002() {
    run_all(&[
        case("length 2^63", header_claiming(1 << 63), PROTOCOL_ERROR),
        case("length 2^64 - 1", header_claiming(u64::MAX), PROTOCOL_ERROR),
    ])
    .await;
}

#[tokio::test]
async fn a_frame_claiming_2_pow_40_bytes_fails_with_1009_at_once() {
    run_all(&[case(
        "a header claiming 2^40 bytes",
        header_claiming(1 << 40),
        TOO_BIG,
    )])
    .await;
}
