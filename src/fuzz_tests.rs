//! Fuzz and property tests for every parser that sees network input,
//! beside the client frame decoder's own (`protocol`,
//! `fuzz_the_client_frame_decoder`):
//!
//! - the `/ws` upgrade decision, `upgrade::check`:
//!   `fuzz_the_upgrade_decision`;
//! - the token carriers, `upgrade::extract_token`:
//!   `fuzz_token_carriers_agree_with_a_model`,
//!   `fuzz_token_extraction_from_hostile_carriers`;
//! - percent-decoding, `upgrade::percent_decode` and `api::percent_decode`:
//!   `fuzz_percent_decoders_round_trip_any_utf8`,
//!   `fuzz_percent_decoders_against_strict_references`,
//!   `fuzz_regression_a_sign_is_not_a_hex_digit`;
//! - channel names, `ChannelName::parse`: `fuzz_channel_names`;
//! - policy patterns, `Pattern::parse` and matching with `{sub}` and
//!   `{claim.*}`: `fuzz_policy_pattern_sources`,
//!   `fuzz_templates_with_hostile_values_never_match_more_than_their_literal`;
//! - the PROXY header, `proxy::read_header`, `parse_v1`, `parse_v2`:
//!   `fuzz_the_proxy_header_reader`,
//!   `fuzz_proxy_v2_refuses_absurd_lengths_quickly`,
//!   `fuzz_proxy_headers_round_trip_and_leave_the_rest_unread`,
//!   `fuzz_proxy_v1_and_v2_parsers_directly`;
//! - the forwarding headers, `proxy::forwarded_client`:
//!   `fuzz_rfc7239_forwarded_matches_a_reference_on_random_lists`,
//!   `fuzz_forwarding_headers`;
//! - JWK sets, `KeySet::from_jwks`: `fuzz_jwk_set_parsing`,
//!   `fuzz_jwk_sets_never_hold_more_keys_than_the_cap`,
//!   `fuzz_jwk_set_amplification_is_bounded_by_the_size_limit`;
//! - Redis, `parse_read`, `parse_message`, `parse_payload` and presence's
//!   `parse_event`: `fuzz_redis_read_replies`,
//!   `fuzz_redis_read_reply_bytes`,
//!   `fuzz_redis_reads_of_large_trees_allocate_in_proportion`,
//!   `fuzz_redis_messages_round_trip_any_user_and_data`,
//!   `fuzz_redis_pubsub_messages`;
//! - the WebSocket frames a client sends, through tungstenite with the
//!   session's limits: `fuzz_websocket_frames_with_our_limits`.
//!
//! Every test draws its inputs from [`crate::testing::Rng`] with a fixed
//! seed, so a failure reproduces (its message shows the input), and runs a
//! fixed budget, well under 2 s each in the debug test profile:
//!
//! ```sh
//! cargo test --lib fuzz                                   # the CI budget
//! WSGATE_FUZZ_SCALE=100 cargo test --release --lib fuzz   # 100 times as many inputs
//! WSGATE_FUZZ_SEED=7 cargo test --lib fuzz                # other inputs (any u64)
//! ```
//!
//! A crash, a panic, or an allocation proportional to a length that the
//! input claims (rather than to the bytes it holds) is a failure. The last
//! is measured by the counting allocator below, the global allocator of
//! the lib test binary only: for the parsers that read a length or a count
//! (PROXY v2, JWK sets, Redis replies and messages) no single allocation
//! may exceed [`alloc_bound`] (4 times the input's size plus 64 KiB). For
//! JWK sets that holds for the fuzzed sets, up to a few KiB; JSON claims no
//! lengths, but a crafted set near the 1 MiB limit costs one allocation of
//! up to 16 MiB in serde_json, which
//! `fuzz_jwk_set_amplification_is_bounded_by_the_size_limit` pins.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures_util::FutureExt as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version, header};
use jsonwebtoken::Algorithm;
use serde_json::json;
use serde_json::value::RawValue;

use crate::auth::AuthFailure;
use crate::auth::keys::{self, KeyError, KeySet, MAX_JWKS_KEYS};
use crate::broker::redis::presence::parse_event;
use crate::broker::redis::{parse_message, parse_payload, parse_read, payload};
use crate::channel::{ChannelError, ChannelName, MAX_LEN, is_token, is_token_byte};
use crate::config::{Config, ForwardedHeader, canonical_ip};
use crate::identity::Identity;
use crate::policy::{Pattern, claim_text};
use crate::presence::Event;
use crate::proxy::{
    self, ProxyError, Trusted, V1_MAX, V2_MAX_LEN, V2_SIGNATURE, forwarded_client, parse_v1,
    parse_v2,
};
use crate::testing::{Rng, iterations};
use crate::upgrade::{self, Refusal, UpgradePolicy};

// ---------------------------------------------------------------------------
// The allocation probe.

/// The system allocator, noting the largest single request made on each
/// thread. One thread-local compare per call: cheap enough to leave on for
/// the whole test binary.
struct Counting;

thread_local! {
    /// Largest allocation (or reallocation target) since the last reset.
    /// `const`-initialised and without `Drop`, so touching it never
    /// allocates (no lazy initialisation, no destructor registration).
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: never panic inside the allocator, even while a thread's
    // locals are being torn down.
    let _ = LARGEST.try_with(|largest| {
        if size > largest.get() {
            largest.set(size);
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to `System`, which
// upholds the `GlobalAlloc` contract; `note` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's guarantees for `alloc` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, which is
        // `System`'s; the caller's guarantees for `realloc` are passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it
/// made on this thread, in bytes. Nests: the outer measurement still sees
/// what the inner one did.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let outer = LARGEST.with(|l| l.replace(0));
    let out = f();
    let inner = LARGEST.with(|l| l.replace(outer));
    LARGEST.with(|l| l.set(outer.max(inner)));
    (out, inner)
}

/// The most a parser may allocate at once for an input of `input_len`
/// bytes: proportional to what was received, never to what was claimed.
fn alloc_bound(input_len: usize) -> usize {
    4 * input_len + 64 * 1024
}

#[track_caller]
fn assert_alloc_bounded(largest: usize, input_len: usize, what: &dyn std::fmt::Debug) {
    assert!(
        largest <= alloc_bound(input_len),
        "one allocation of {largest} bytes for {input_len} bytes of input: {}",
        shorten(what)
    );
}

/// The start of an input's `Debug` form, for failure messages.
fn shorten(what: &dyn std::fmt::Debug) -> String {
    let mut shown = format!("{what:?}");
    if let Some((at, _)) = shown.char_indices().nth(400) {
        shown.truncate(at);
        shown.push('…');
    }
    shown
}

#[test]
fn fuzz_probe_sees_the_largest_single_allocation() {
    let (v, big) = largest_allocation(|| vec![1u8; 100_000]);
    assert!(big >= 100_000, "{big}");
    drop(v);
    let (b, small) = largest_allocation(|| Box::new(std::hint::black_box(7u64)));
    assert!((8..1024).contains(&small), "{small}");
    drop(b);
    // Growth by reallocation counts at its new size.
    let (v, grown) = largest_allocation(|| {
        let mut v = Vec::<u8>::with_capacity(8);
        v.extend(std::iter::repeat_n(1u8, 50_000));
        v
    });
    assert!(grown >= 50_000, "{grown}");
    drop(v);
    // Nested: the outer measurement includes the inner one.
    let ((_, inner), outer) = largest_allocation(|| largest_allocation(|| vec![0u8; 30_000]));
    assert!(inner >= 30_000 && outer >= inner);
    // Nothing allocated: nothing seen.
    let ((), none) = largest_allocation(|| {});
    assert_eq!(none, 0);
}

// ---------------------------------------------------------------------------
// Shared generators.

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len())]
}

/// One of `seeds`, mutated with `words`.
fn mutate_pick<S: AsRef<[u8]>>(rng: &mut Rng, seeds: &[S], words: &[&[u8]]) -> Vec<u8> {
    let seed = seeds[rng.below(seeds.len())].as_ref();
    rng.mutate(seed, words)
}

/// Any character, weighted towards ASCII and the ones parsers split on.
fn any_char(rng: &mut Rng) -> char {
    const SPECIAL: [char; 20] = [
        ':', '*', '>', '{', '}', '%', '+', '&', '=', ' ', '"', ',', ';', '\\', '[', ']', '\0',
        '\t', '\n', '\r',
    ];
    let code = match rng.below(10) {
        0..=4 => 0x20 + rng.below(0x5f) as u32,
        5 => return *pick(rng, &SPECIAL),
        6 => 0x80 + rng.below(0x780) as u32,
        7 => 0x800 + rng.below(0xf800) as u32,
        8 => 0x1_0000 + rng.below(0x10_0000) as u32,
        _ => rng.below(0x20) as u32,
    };
    char::from_u32(code).unwrap_or('\u{fffd}')
}

fn any_string(rng: &mut Rng, max_chars: usize) -> String {
    let n = rng.below(max_chars + 1);
    (0..n).map(|_| any_char(rng)).collect()
}

fn ascii_lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------
// The upgrade decision.

fn upgrade_policies() -> Vec<UpgradePolicy> {
    let mut all = Vec::new();
    for bits in 0..8 {
        let mut config = Config::default();
        config.server.allowed_origins = vec![
            "https://app.example.com".into(),
            "http://localhost:8080".into(),
        ];
        config.server.allow_same_origin = bits & 1 != 0;
        config.auth.query_token = bits & 2 != 0;
        config.auth.max_token_bytes = if bits & 4 != 0 { 24 } else { 8 * 1024 };
        all.push(UpgradePolicy::from_config(&config).expect("the test config is valid"));
    }
    all
}

const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";

const HEAD: [(&str, &str); 9] = [
    ("host", "gw.example.com"),
    ("upgrade", "websocket"),
    ("connection", "keep-alive, Upgrade"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("sec-websocket-version", "13"),
    ("sec-websocket-protocol", "wsgate.v1"),
    ("origin", "https://app.example.com"),
    (
        "authorization",
        "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
    ),
    (
        "sec-websocket-protocol",
        "wsgate.v1, bearer.eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
    ),
];

const HEADER_WORDS: [&[u8]; 26] = [
    b",",
    b", ",
    b" ",
    b"\t",
    b"websocket",
    b"Upgrade",
    b"upgrade",
    b"bearer.",
    b"Bearer ",
    b"wsgate.v1",
    b"==",
    b"13",
    b"8",
    b"\xff",
    b"\x80",
    b"https://",
    b"http://",
    b":443",
    b"[::1]",
    b"null",
    b"%",
    b"+",
    b"&",
    b"access_token=",
    b"dGhlIHNhbXBsZSBub25jZQ==",
    b"eyJ.eyJ.sig",
];

const QUERIES: [&str; 6] = [
    "",
    "access_token=eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
    "a=1&access_token=x%2Ey%2B&b",
    "access_token=&access_token=x",
    "access_token=%e2%82%ac%zz%+a+b%",
    "access_token",
];

/// A request head mutated from a valid upgrade: headers dropped, doubled,
/// renamed or changed, odd methods, versions and query strings.
fn mutated_upgrade(rng: &mut Rng) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = match rng.below(16) {
        0 => Method::POST,
        1 => Method::HEAD,
        2 => Method::from_bytes(b"get").expect("a token"),
        _ => Method::GET,
    };
    *req.version_mut() = match rng.below(16) {
        0 => Version::HTTP_10,
        1 => Version::HTTP_2,
        2 => Version::HTTP_09,
        _ => Version::HTTP_11,
    };
    let query = mutate_pick(rng, &QUERIES, &HEADER_WORDS);
    let mut target = b"/ws".to_vec();
    if !query.is_empty() || rng.one_in(8) {
        target.push(b'?');
        target.extend_from_slice(&query);
    }
    *req.uri_mut() = http::Uri::try_from(target).unwrap_or_else(|_| http::Uri::from_static("/ws"));
    // Which of the two subprotocol seeds: the plain one or the carrier.
    let carrier = rng.below(3);
    for (i, (name, value)) in HEAD.iter().enumerate() {
        if (i == 5 && carrier != 0) || (i == 8 && carrier != 1) || (i == 7 && rng.one_in(2)) {
            continue;
        }
        let (name, value) = match rng.below(20) {
            0..=1 => continue,
            2..=4 => (
                name.as_bytes().to_vec(),
                rng.mutate(value.as_bytes(), &HEADER_WORDS),
            ),
            5 => (
                rng.mutate(name.as_bytes(), &[b"-", b"sec-"]),
                value.as_bytes().to_vec(),
            ),
            _ => (name.as_bytes().to_vec(), value.as_bytes().to_vec()),
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&name),
            HeaderValue::from_bytes(&value),
        ) else {
            continue;
        };
        if rng.one_in(20) {
            req.headers_mut().append(name.clone(), value.clone());
        }
        req.headers_mut().append(name, value);
    }
    for _ in 0..rng.below(3) {
        let (name, _) = pick(rng, &HEAD);
        let value = rng.bytes(24);
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            req.headers_mut().append(*name, value);
        }
    }
    req
}

/// What `check` must hold whatever it is given.
#[test]
fn fuzz_the_upgrade_decision() {
    let policies = upgrade_policies();
    let mut rng = Rng::new(0x0f0_0001);
    let mut accepted = 0;
    let mut labels = std::collections::BTreeSet::new();
    for _ in 0..iterations(25_000) {
        let req = mutated_upgrade(&mut rng);
        let policy = pick(&mut rng, &policies);
        let draining = rng.one_in(16);
        match upgrade::check(&req, policy, draining) {
            Ok(pending) => {
                accepted += 1;
                assert!(!draining, "{req:?}");
                assert_eq!(req.method(), Method::GET);
                assert!(req.version() >= Version::HTTP_11);
                let h = req.headers();
                let keys: Vec<_> = h.get_all(header::SEC_WEBSOCKET_KEY).iter().collect();
                assert_eq!(keys.len(), 1, "{req:?}");
                use base64::Engine as _;
                let key = base64::engine::general_purpose::STANDARD.decode(keys[0].as_bytes());
                assert_eq!(key.ok().map(|k| k.len()), Some(16), "{req:?}");
                let versions: Vec<_> = h.get_all(header::SEC_WEBSOCKET_VERSION).iter().collect();
                assert!(versions.len() == 1 && versions[0].as_bytes() == b"13");
                // The pending decision never shows its token.
                let shown = format!("{pending:?}");
                for v in h.get_all(header::AUTHORIZATION) {
                    let v = ascii_lossy(v.as_bytes());
                    if let Some((_, t)) = v.split_once(' ')
                        && t.trim().len() > 8
                    {
                        assert!(!shown.contains(t.trim()), "{shown}");
                    }
                }
            }
            Err(refusal) => {
                labels.insert(refusal.label());
                assert!(
                    matches!(refusal.status().as_u16(), 400 | 401 | 403 | 426 | 503),
                    "{refusal:?}"
                );
                let res: http::Response<String> = refusal.response(policy);
                assert_eq!(res.status(), refusal.status());
                assert!(res.body().len() < 200 && !res.body().contains(TOKEN));
            }
        }
    }
    // The mutations reach both sides of the decision and most refusals.
    assert!(accepted > 0, "nothing accepted");
    assert!(labels.len() >= 7, "{labels:?}");
}

// ---------------------------------------------------------------------------
// The token carriers.

const JWT_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";

fn jwtish(rng: &mut Rng, max: usize) -> String {
    let n = 1 + rng.below(max);
    (0..n)
        .map(|_| *pick(rng, JWT_ALPHABET) as char)
        .collect::<String>()
}

/// `text` with any of its bytes (and every byte outside the unreserved
/// set) as `%XX` in either case; a space may be written `+` when
/// `plus_is_space`, and `+` itself is then always escaped.
fn percent_encode(rng: &mut Rng, text: &str, plus_is_space: bool) -> String {
    let mut out = String::new();
    for &b in text.as_bytes() {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if b == b' ' && plus_is_space && rng.one_in(2) {
            out.push('+');
        } else if (unreserved || (b == b'+' && !plus_is_space)) && !rng.one_in(6) {
            out.push(b as char);
        } else if rng.one_in(2) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

/// A request carrying chosen tokens in each carrier, with noise that no
/// carrier may pick up, checked against the rules of protocol.md §1
/// written as a model of counts.
#[test]
fn fuzz_token_carriers_agree_with_a_model() {
    let policies = upgrade_policies();
    let mut rng = Rng::new(0x0f0_0002);
    for _ in 0..iterations(20_000) {
        let policy_bits = rng.below(8);
        let policy = &policies[policy_bits];
        let query_enabled = policy_bits & 2 != 0;
        let max = if policy_bits & 4 != 0 { 24 } else { 8 * 1024 };
        let count = |rng: &mut Rng| [0, 0, 1, 1, 1, 2][rng.below(6)];
        let (n_auth, n_sub, n_query) = (count(&mut rng), count(&mut rng), count(&mut rng));
        let offer_v1 = !rng.one_in(4);
        let tokens: Vec<String> = (0..n_auth + n_sub + n_query)
            .map(|_| jwtish(&mut rng, 40))
            .collect();
        let mut req = Request::new(());
        let h = req.headers_mut();
        for t in &tokens[..n_auth] {
            let scheme = *pick(&mut rng, &["Bearer", "bearer", "BEARER", "bEaReR"]);
            let pad = " ".repeat(1 + rng.below(3));
            let trail = " ".repeat(rng.below(2));
            let v = format!("{scheme}{pad}{t}{trail}");
            h.append(header::AUTHORIZATION, v.parse().expect("ASCII"));
        }
        if rng.one_in(4) {
            // Other schemes are not a carrier.
            let v = *pick(&mut rng, &["Basic YWxpY2U6cHc=", "Token abc", "Bearer"]);
            if v != "Bearer" {
                h.append(header::AUTHORIZATION, HeaderValue::from_static(v));
            }
        }
        let mut entries: Vec<String> = tokens[n_auth..n_auth + n_sub]
            .iter()
            .map(|t| format!("bearer.{t}"))
            .collect();
        if offer_v1 {
            entries.push(upgrade::SUBPROTOCOL.into());
        }
        for _ in 0..rng.below(3) {
            let noise = *pick(
                &mut rng,
                &["chat", "wsgate.v2", "bearer", "Bearer.x", "x.bearer.y"],
            );
            entries.push(noise.into());
        }
        for i in (1..entries.len()).rev() {
            entries.swap(i, rng.below(i + 1));
        }
        if !entries.is_empty() {
            // One header or two, split anywhere.
            let at = rng.below(entries.len() + 1);
            for part in [&entries[..at], &entries[at..]] {
                if !part.is_empty() {
                    let sep = *pick(&mut rng, &[",", ", ", " ,  "]);
                    let v = part.join(sep);
                    h.append(header::SEC_WEBSOCKET_PROTOCOL, v.parse().expect("ASCII"));
                }
            }
        }
        let mut pairs: Vec<String> = tokens[n_auth + n_sub..]
            .iter()
            .map(|t| format!("access_token={}", percent_encode(&mut rng, t, true)))
            .collect();
        for _ in 0..rng.below(3) {
            let noise = *pick(
                &mut rng,
                &["a=1", "access_tokens=2", "x=access_token", "", "b"],
            );
            pairs.push(noise.into());
        }
        for i in (1..pairs.len()).rev() {
            pairs.swap(i, rng.below(i + 1));
        }
        let uri = format!("/ws?{}", pairs.join("&"));
        *req.uri_mut() = uri.parse().expect("a valid target");

        let expected = if n_sub > 1 {
            Err(Refusal::SubprotocolCarrier(
                "more than one bearer. subprotocol entry",
            ))
        } else if n_sub == 1 && !offer_v1 {
            Err(Refusal::SubprotocolCarrier(
                "a bearer. subprotocol requires wsgate.v1 to be offered too",
            ))
        } else if n_query > 0 && !query_enabled {
            Err(Refusal::Carrier(
                "query tokens are disabled on this gateway",
            ))
        } else {
            match tokens.as_slice() {
                [] => Err(Refusal::NoToken),
                [t] if t.len() > max => Err(Refusal::Carrier("token too large")),
                [t] => Ok((t.clone(), offer_v1)),
                _ => Err(Refusal::Carrier(
                    "a token must be sent in exactly one carrier",
                )),
            }
        };
        assert_eq!(
            upgrade::extract_token(&req, policy),
            expected,
            "{:?} {:?}",
            req.uri(),
            req.headers()
        );
    }
}

/// Hostile bytes in every carrier: never a panic, and a token that comes
/// out is never empty nor over the limit.
#[test]
fn fuzz_token_extraction_from_hostile_carriers() {
    let policies = upgrade_policies();
    let mut rng = Rng::new(0x0f0_0003);
    for _ in 0..iterations(30_000) {
        let policy_bits = rng.below(8);
        let max = if policy_bits & 4 != 0 { 24 } else { 8 * 1024 };
        let mut req = Request::new(());
        for (name, seed) in [
            (header::AUTHORIZATION, &b"Bearer a.b.c"[..]),
            (header::SEC_WEBSOCKET_PROTOCOL, b"wsgate.v1, bearer.a.b.c"),
        ] {
            for _ in 0..rng.below(3) {
                let bytes = if rng.one_in(4) {
                    rng.bytes(40)
                } else {
                    rng.mutate(seed, &HEADER_WORDS)
                };
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    req.headers_mut().append(name.clone(), v);
                }
            }
        }
        let query = mutate_pick(&mut rng, &QUERIES, &HEADER_WORDS);
        let mut target = b"/ws?".to_vec();
        target.extend_from_slice(&query);
        if let Ok(uri) = http::Uri::try_from(target) {
            *req.uri_mut() = uri;
        }
        match upgrade::extract_token(&req, &policies[policy_bits]) {
            Ok((token, _)) => assert!(!token.is_empty() && token.len() <= max, "{req:?}"),
            Err(refusal) => assert!(
                matches!(
                    refusal,
                    Refusal::NoToken
                        | Refusal::Carrier(_)
                        | Refusal::SubprotocolCarrier(_)
                        | Refusal::InvalidToken(AuthFailure::Malformed)
                ),
                "{refusal:?}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Percent-decoding.

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A `%XX` escape at `i` in the strict sense of RFC 3986: two hex digits.
fn strict_escape(bytes: &[u8], i: usize) -> Option<u8> {
    if bytes[i] != b'%' {
        return None;
    }
    let hi = hex_value(*bytes.get(i + 1)?)?;
    let lo = hex_value(*bytes.get(i + 2)?)?;
    Some(hi << 4 | lo)
}

/// The query-token decoder's contract: escapes decoded, `+` a space, any
/// other byte (a broken escape's `%` included) kept, invalid UTF-8 as U+FFFD.
fn reference_token_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < bytes.len() {
        if let Some(b) = strict_escape(bytes, i) {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The API query decoder's contract: escapes decoded, `+` kept, a broken
/// escape or invalid UTF-8 refused.
fn reference_api_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(strict_escape(bytes, i)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[test]
fn fuzz_percent_decoders_round_trip_any_utf8() {
    let mut rng = Rng::new(0x0f0_0004);
    for _ in 0..iterations(15_000) {
        let text = any_string(&mut rng, 24);
        let for_token = percent_encode(&mut rng, &text, true);
        assert_eq!(upgrade::percent_decode(&for_token), text, "{for_token}");
        let for_api = percent_encode(&mut rng, &text, false);
        assert_eq!(
            crate::api::percent_decode(&for_api).as_deref(),
            Some(text.as_str()),
            "{for_api}"
        );
    }
}

#[test]
fn fuzz_percent_decoders_against_strict_references() {
    const WORDS: [&[u8]; 14] = [
        b"%",
        b"%%",
        b"%+a",
        b"%-1",
        b"%+",
        b"%2",
        b"%zz",
        b"%e2%82%ac",
        b"%ff",
        b"%c3",
        b"+",
        b"%0",
        b"%2B",
        b"\xc3\xa9",
    ];
    const SEEDS: [&[u8]; 4] = [b"a.b_c-d", b"chat%3Alobby", b"a+b%20c", b"%e2%82%ac"];
    let mut rng = Rng::new(0x0f0_0005);
    for _ in 0..iterations(50_000) {
        let text = if rng.one_in(3) {
            (0..rng.below(12))
                .map(|_| {
                    *pick(
                        &mut rng,
                        &['%', '+', '0', '7', 'a', 'F', 'g', '-', ' ', 'é'],
                    )
                })
                .collect()
        } else {
            ascii_lossy(&mutate_pick(&mut rng, &SEEDS, &WORDS))
        };
        assert_eq!(
            upgrade::percent_decode(&text),
            reference_token_decode(&text),
            "{text:?}"
        );
        assert_eq!(
            crate::api::percent_decode(&text),
            reference_api_decode(&text),
            "{text:?}"
        );
    }
}

/// Regression: `u8::from_str_radix` takes a leading `+`, so `%+a` used to
/// decode to a newline in both decoders.
#[test]
fn fuzz_regression_a_sign_is_not_a_hex_digit() {
    assert_eq!(upgrade::percent_decode("%+a"), "% a");
    assert_eq!(upgrade::percent_decode("x%+0a"), "x% 0a");
    assert_eq!(crate::api::percent_decode("%+a"), None);
    assert_eq!(crate::api::percent_decode("%+0"), None);
    assert_eq!(crate::api::percent_decode("%0a").as_deref(), Some("\n"));
}

// ---------------------------------------------------------------------------
// Channel names.

/// protocol.md §3, as a scan over bytes rather than over tokens: the
/// first fault from the left decides, a `:` at the start, after another
/// or at the end being an empty token.
fn reference_channel(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() || name.len() > MAX_LEN {
        return Err(ChannelError::Length);
    }
    let mut previous = b':';
    for &b in name.as_bytes() {
        match b {
            b':' if previous == b':' => return Err(ChannelError::EmptyToken),
            b':' => {}
            _ if !is_token_byte(b) => return Err(ChannelError::Character),
            _ => {}
        }
        previous = b;
    }
    if previous == b':' {
        return Err(ChannelError::EmptyToken);
    }
    Ok(())
}

#[test]
fn fuzz_channel_names() {
    const SEEDS: [&str; 5] = [
        "chat:lobby",
        "user:alice@example.com",
        "a=b+c-d_e.f",
        "x:y:z",
        "t",
    ];
    const WORDS: [&[u8]; 12] = [
        b":",
        b"::",
        b"*",
        b">",
        b"{sub}",
        b" ",
        b"\0",
        b"\xc3\xa9",
        b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        b"@",
        b"/",
        b"%3A",
    ];
    let mut rng = Rng::new(0x0f0_0006);
    let mut accepted = 0;
    for _ in 0..iterations(20_000) {
        let name = match rng.below(4) {
            0 => any_string(&mut rng, 20),
            // Near the length limit.
            1 => {
                let n = MAX_LEN - 2 + rng.below(5);
                (0..n).map(|i| if i % 7 == 3 { ':' } else { 'a' }).collect()
            }
            _ => ascii_lossy(&mutate_pick(&mut rng, &SEEDS, &WORDS)),
        };
        let parsed = ChannelName::parse(&name);
        assert_eq!(
            parsed.clone().map(drop),
            reference_channel(&name),
            "{name:?}"
        );
        if let Ok(channel) = parsed {
            accepted += 1;
            assert_eq!(channel.as_str(), name);
            assert_eq!(channel.to_string(), name);
            assert!((1..=MAX_LEN).contains(&channel.as_str().len()));
            assert!(channel.tokens().all(is_token));
            assert_eq!(channel.tokens().collect::<Vec<_>>().join(":"), name);
            assert_eq!(ChannelName::parse(channel.as_str()), Ok(channel));
        }
    }
    assert!(accepted > 100, "{accepted}");
}

// ---------------------------------------------------------------------------
// Policy patterns and their templates.

#[test]
fn fuzz_policy_pattern_sources() {
    const SEEDS: [&str; 6] = [
        "chat:*",
        "user:{sub}:>",
        "t:{claim.tenant}:chat:*",
        ">",
        "a:b:c",
        "{claim.team-1}:{sub}",
    ];
    const WORDS: [&[u8]; 14] = [
        b":",
        b"*",
        b">",
        b"{",
        b"}",
        b"{sub}",
        b"{claim.",
        b"{claim.x}",
        b"{claim.}",
        b"\xc3\xa9",
        b" ",
        b"::",
        b"{claim.a:b}",
        b"{{sub}}",
    ];
    let mut rng = Rng::new(0x0f0_0007);
    for _ in 0..iterations(50_000) {
        let source = if rng.one_in(5) {
            any_string(&mut rng, 16)
        } else {
            ascii_lossy(&mutate_pick(&mut rng, &SEEDS, &WORDS))
        };
        match Pattern::parse(&source) {
            Ok(pattern) => {
                assert_eq!(pattern.to_string(), source);
                assert!((1..=MAX_LEN).contains(&source.len()));
                assert_eq!(Pattern::parse(&pattern.to_string()), Ok(pattern.clone()));
                // Nobody in particular never fills a template.
                if pattern.has_templates() {
                    for c in ["a", "a:b", "user:alice"] {
                        let c = ChannelName::parse(c).expect("valid");
                        let literal_only = !pattern.matches_channel(&c);
                        assert!(literal_only, "{source} matched {c} with no identity");
                    }
                }
            }
            Err(message) => assert!(message.len() < 3 * MAX_LEN + 200),
        }
    }
}

/// Values a token's `sub` or claims could carry to widen a pattern.
fn hostile_value(rng: &mut Rng) -> String {
    match rng.below(24) {
        0 => String::new(),
        1 => "a:b".into(),
        2 => "*".into(),
        3 => ">".into(),
        4 => "{sub}".into(),
        5 => "{claim.tenant}".into(),
        6 => "a b".into(),
        7 => "é".into(),
        8 => "a\0".into(),
        9 => "x".repeat(300),
        10 => "a".repeat(MAX_LEN),
        11 => "a".repeat(MAX_LEN + 1),
        12 => ":".into(),
        13 => "acme:".into(),
        14 => "user:alice".into(),
        15 => "\u{1F600}".into(),
        16 => "-".into(),
        17 => "7".into(),
        18 => "acme:>".into(),
        19 => any_string(rng, 6),
        _ => pick(rng, &["alice", "acme", "a", "x"]).to_string(),
    }
}

fn hostile_claim(rng: &mut Rng) -> serde_json::Value {
    match rng.below(10) {
        0 => json!(7),
        1 => json!(-7),
        2 => json!(true),
        3 => json!(1.5),
        4 => json!(null),
        5 => json!(["acme"]),
        6 => json!({"acme": 1}),
        _ => json!(hostile_value(rng)),
    }
}

/// What a template stands for, or `None` when it can match nothing.
fn template_value(segment: &str, who: &Identity) -> Option<String> {
    let value = match segment {
        "{sub}" => who.user.clone(),
        _ => {
            let name = segment.strip_prefix("{claim.")?.strip_suffix('}')?;
            claim_text(who.claims.get(name)?)?.into_owned()
        }
    };
    is_token(&value).then_some(value)
}

/// Matching over token lists with every template replaced by its value
/// first: what the pattern means for `who`.
fn reference_match(pattern: &[&str], channel: &[&str]) -> bool {
    match (pattern.first(), channel.first()) {
        (Some(&">"), _) => pattern.len() == 1 && !channel.is_empty(),
        (None, None) => true,
        (Some(p), Some(c)) => {
            (*p == "*" || p == c) && reference_match(&pattern[1..], &channel[1..])
        }
        _ => false,
    }
}

#[test]
fn fuzz_templates_with_hostile_values_never_match_more_than_their_literal() {
    const SEGMENTS: [&str; 10] = [
        "a",
        "acme",
        "user",
        "*",
        ">",
        "{sub}",
        "{claim.tenant}",
        "{claim.n}",
        "{claim.missing}",
        "alice",
    ];
    const TOKENS: [&str; 8] = ["a", "acme", "user", "alice", "x", "7", "-7", "true"];
    let mut rng = Rng::new(0x0f0_0008);
    let mut matched = 0;
    for _ in 0..iterations(40_000) {
        let segments: Vec<&str> = (0..1 + rng.below(4))
            .map(|_| *pick(&mut rng, &SEGMENTS))
            .collect();
        let Ok(pattern) = Pattern::parse(&segments.join(":")) else {
            continue;
        };
        let mut claims = serde_json::Map::new();
        claims.insert("tenant".into(), hostile_claim(&mut rng));
        claims.insert("n".into(), hostile_claim(&mut rng));
        let who = Identity {
            user: hostile_value(&mut rng),
            roles: vec![],
            expires_at: 0,
            issued_at: None,
            claims,
        };
        // Channels built from ordinary tokens and from the hostile values
        // themselves, so a value that could widen a pattern gets the chance.
        let mut parts: Vec<String> = Vec::new();
        for _ in 0..1 + rng.below(5) {
            parts.push(match rng.below(4) {
                0 => who.user.clone(),
                1 => who
                    .claims
                    .get("tenant")
                    .and_then(claim_text)
                    .map_or_else(|| "x".into(), |v| v.into_owned()),
                _ => pick(&mut rng, &TOKENS).to_string(),
            });
        }
        let Ok(channel) = ChannelName::parse(&parts.join(":")) else {
            continue;
        };
        let filled: Option<Vec<String>> = segments
            .iter()
            .map(|s| {
                if s.starts_with('{') {
                    template_value(s, &who)
                } else {
                    Some(s.to_string())
                }
            })
            .collect();
        let tokens: Vec<&str> = channel.tokens().collect();
        let expected = filled.as_ref().is_some_and(|f| {
            let f: Vec<&str> = f.iter().map(String::as_str).collect();
            reference_match(&f, &tokens)
        });
        let got = pattern.matches(&channel, &who);
        assert_eq!(got, expected, "{pattern} on {channel} for {who:?}");
        if got {
            matched += 1;
            // The same pattern written out with the values matches too.
            let literal = filled.expect("matched").join(":");
            if let Ok(literal) = Pattern::parse(&literal) {
                assert!(literal.matches_channel(&channel), "{literal} vs {channel}");
            }
        }
        if pattern.has_templates() {
            assert!(!pattern.matches_channel(&channel), "{pattern} {channel}");
        }
    }
    assert!(matched > 100, "{matched}");
}

// ---------------------------------------------------------------------------
// The PROXY protocol header.

fn v2_header(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x20 | command);
    out.push(family);
    out.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads one header from `bytes` in memory: the result and how many bytes
/// were taken.
fn read_proxy_header(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, usize) {
    let mut io = bytes;
    let res = proxy::read_header(&mut io)
        .now_or_never()
        .expect("a header in memory never waits");
    (res, bytes.len() - io.len())
}

fn proxy_seeds() -> Vec<Vec<u8>> {
    let mut v4 = vec![203, 0, 113, 7, 10, 0, 0, 1];
    v4.extend_from_slice(&4711u16.to_be_bytes());
    v4.extend_from_slice(&443u16.to_be_bytes());
    let mut v4_tlv = v4.clone();
    v4_tlv.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
    let mut v6 = vec![0x20, 0x01, 0x0d, 0xb8];
    v6.extend_from_slice(&[0; 11]);
    v6.push(7);
    v6.extend_from_slice(&[0; 16]);
    v6.extend_from_slice(&[0x12, 0x67, 0x01, 0xbb]);
    let tls = b"\x16\x03\x01\x02\x00\x01";
    let mut seeds = vec![
        b"PROXY TCP4 203.0.113.7 10.0.0.1 4711 443\r\n".to_vec(),
        b"PROXY TCP6 2001:db8::7 ::1 4711 443\r\n".to_vec(),
        b"PROXY UNKNOWN\r\n".to_vec(),
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".to_vec(),
        v2_header(1, 0x11, &v4),
        v2_header(1, 0x11, &v4_tlv),
        v2_header(1, 0x21, &v6),
        v2_header(0, 0x00, &[]),
        v2_header(1, 0x00, &[]),
        v2_header(1, 0x31, &[0; 216]),
    ];
    for s in &mut seeds {
        s.extend_from_slice(tls);
    }
    seeds
}

const PROXY_WORDS: [&[u8]; 20] = [
    b"PROXY",
    b" ",
    b"TCP4",
    b"TCP6",
    b"UNKNOWN",
    b"\r\n",
    b"\r",
    b"\n",
    b"65535",
    b"99999",
    b"::",
    b"255.255.255.255",
    b"\r\n\r\n\0\r\nQUIT\n",
    b"\x21",
    b"\x11",
    b"\x20",
    b"\xff\xff",
    b"\x10\x00",
    b"\x10\x01",
    b"\x00",
];

#[test]
fn fuzz_the_proxy_header_reader() {
    let seeds = proxy_seeds();
    let mut rng = Rng::new(0x0f0_0009);
    for _ in 0..iterations(40_000) {
        let mut bytes = match rng.below(10) {
            0 => rng.bytes(64),
            1 => {
                let mut b = vec![*pick(&mut rng, b"P\r")];
                b.extend(rng.bytes(120));
                b
            }
            _ => mutate_pick(&mut rng, &seeds, &PROXY_WORDS),
        };
        // Claimed v2 lengths of every size, short bodies behind them.
        if bytes.len() >= 16 && bytes[0] == b'\r' && rng.one_in(3) {
            let claim = match rng.below(3) {
                0 => V2_MAX_LEN + rng.below(usize::from(u16::MAX) - V2_MAX_LEN + 1),
                1 => V2_MAX_LEN - 2 + rng.below(5),
                _ => rng.below(64),
            };
            let claim = u16::try_from(claim).expect("in range");
            bytes[14..16].copy_from_slice(&claim.to_be_bytes());
        }
        let ((res, taken), largest) = largest_allocation(|| read_proxy_header(&bytes));
        assert_alloc_bounded(largest, bytes.len(), &bytes);
        // Never more than the longest header, whatever the claim.
        assert!(largest <= V2_MAX_LEN + 512, "{largest} for {bytes:?}");
        assert!(taken <= bytes.len());
        match bytes.first() {
            Some(b'P') => assert!(taken <= V1_MAX, "{taken} {bytes:?}"),
            Some(b'\r') => {
                assert!(taken <= 16 + V2_MAX_LEN);
                if bytes.len() >= 16 && bytes[..12] == V2_SIGNATURE && bytes[12] >> 4 == 2 {
                    let claim = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
                    if claim > V2_MAX_LEN {
                        assert_eq!((res, taken), (Err(ProxyError::Malformed), 16));
                    } else if bytes.len() >= 16 + claim {
                        assert_eq!(taken, 16 + claim, "{bytes:?}");
                    } else {
                        assert_eq!(res, Err(ProxyError::Malformed));
                    }
                } else {
                    assert_eq!(res, Err(ProxyError::Malformed));
                }
            }
            _ => assert_eq!(
                (res, taken),
                (Err(ProxyError::Malformed), bytes.len().min(1))
            ),
        }
    }
}

/// A claimed length far beyond the cap is refused on the 16 bytes of the
/// fixed part, before any body is asked for or allocated.
#[test]
fn fuzz_proxy_v2_refuses_absurd_lengths_quickly() {
    for claim in [V2_MAX_LEN + 1, 8192, usize::from(u16::MAX)] {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11]);
        bytes.extend_from_slice(&u16::try_from(claim).expect("u16").to_be_bytes());
        bytes.extend_from_slice(&[0; 64]);
        let ((res, taken), largest) = largest_allocation(|| read_proxy_header(&bytes));
        assert_eq!((res, taken), (Err(ProxyError::Malformed), 16));
        assert!(largest < 256, "{largest}");
    }
}

fn random_v6(rng: &mut Rng) -> Ipv6Addr {
    let mut bits = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
    if rng.one_in(4) {
        bits &= 0xffff_ffff; // compressed forms and ::a.b.c.d
    }
    if rng.one_in(4) {
        bits = 0xffff_0000_0000 | (bits & 0xffff_ffff); // IPv4-mapped
    }
    Ipv6Addr::from(bits)
}

#[test]
fn fuzz_proxy_headers_round_trip_and_leave_the_rest_unread() {
    let mut rng = Rng::new(0x0f0_000a);
    for _ in 0..iterations(25_000) {
        let port = rng.next_u64() as u16;
        let v6 = rng.one_in(2);
        let src = if v6 {
            IpAddr::V6(random_v6(&mut rng))
        } else {
            IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
        };
        let dst = if v6 {
            IpAddr::V6(random_v6(&mut rng))
        } else {
            IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
        };
        let (mut bytes, expected) = if rng.one_in(2) {
            let family = if v6 { "TCP6" } else { "TCP4" };
            let dport = rng.next_u64() as u16;
            let line = format!("PROXY {family} {src} {dst} {port} {dport}\r\n");
            (line.into_bytes(), Some(SocketAddr::new(src, port)))
        } else {
            let mut body = Vec::new();
            for ip in [src, dst] {
                match ip {
                    IpAddr::V4(ip) => body.extend_from_slice(&ip.octets()),
                    IpAddr::V6(ip) => body.extend_from_slice(&ip.octets()),
                }
            }
            body.extend_from_slice(&port.to_be_bytes());
            body.extend_from_slice(&(rng.next_u64() as u16).to_be_bytes());
            body.extend(rng.bytes(200)); // TLVs are skipped unread
            let local = rng.one_in(8);
            let family = (if v6 { 0x20 } else { 0x10 }) | (if rng.one_in(2) { 1 } else { 2 });
            let expected = (!local).then_some(SocketAddr::new(src, port));
            (v2_header(u8::from(!local), family, &body), expected)
        };
        let header_len = bytes.len();
        let rest = rng.bytes(32);
        bytes.extend_from_slice(&rest);
        let (res, taken) = read_proxy_header(&bytes);
        assert_eq!(res, Ok(expected), "{bytes:?}");
        assert_eq!(taken, header_len, "the bytes behind the header stay unread");
    }
}

#[test]
fn fuzz_proxy_v1_and_v2_parsers_directly() {
    const SEEDS: [&str; 3] = [
        "PROXY TCP4 203.0.113.7 10.0.0.1 4711 443",
        "PROXY TCP6 2001:db8::7 ::1 4711 443",
        "PROXY UNKNOWN",
    ];
    let mut rng = Rng::new(0x0f0_000b);
    for _ in 0..iterations(50_000) {
        let text = if rng.one_in(4) {
            any_string(&mut rng, 40)
        } else {
            ascii_lossy(&mutate_pick(&mut rng, &SEEDS, &PROXY_WORDS))
        };
        if let Ok(Some(_)) = parse_v1(&text) {
            assert!(text.starts_with("PROXY TCP"), "{text:?}");
        }
        let command = if rng.one_in(2) {
            1
        } else {
            rng.next_u64() as u8
        };
        let family = rng.next_u64() as u8;
        let body = rng.bytes(48);
        if let Ok(Some(addr)) = parse_v2(command, family, &body) {
            assert_eq!(command, 1);
            let need = if addr.is_ipv4() { 12 } else { 36 };
            assert!(body.len() >= need && matches!(family >> 4, 1 | 2));
        }
    }
}

// ---------------------------------------------------------------------------
// The forwarding headers.

use crate::proxy::tests::reference as reference_hop;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

#[test]
fn fuzz_rfc7239_forwarded_matches_a_reference_on_random_lists() {
    let trusted = Trusted::parse(&["10.0.0.0/8".into(), "2001:db8::/32".into()]).expect("nets");
    let pool: [(&str, Option<IpAddr>); 12] = [
        ("10.0.0.2", Some(ip("10.0.0.2"))),
        ("\"10.9.9.9:80\"", Some(ip("10.9.9.9"))),
        ("\"[2001:db8::1]\"", Some(ip("2001:db8::1"))),
        ("\"[2001:db8::2]:4711\"", Some(ip("2001:db8::2"))),
        ("203.0.113.7", Some(ip("203.0.113.7"))),
        ("\"203.0.113.8\"", Some(ip("203.0.113.8"))),
        ("\"[2001:dead::5]:443\"", Some(ip("2001:dead::5"))),
        ("\"[::ffff:198.51.100.1]\"", Some(ip("198.51.100.1"))),
        ("unknown", None),
        ("_hidden", None),
        ("\"\"", None),
        ("\"[2001:db8::1\"", None),
    ];
    let mut rng = Rng::new(0x0f0_000c);
    for _ in 0..iterations(20_000) {
        let n = rng.below(6);
        let mut hops = Vec::new();
        let mut elements = Vec::new();
        for _ in 0..n {
            let (text, hop) = pool[rng.below(pool.len())];
            let mut params = Vec::new();
            let has_for = !rng.one_in(10);
            if has_for {
                let key = *pick(&mut rng, &["for", "For", "FOR", " for "]);
                params.push(format!("{key}={text}"));
            }
            for _ in 0..rng.below(3) {
                let other = *pick(
                    &mut rng,
                    &[
                        "proto=https",
                        "by=10.0.0.1",
                        "host=\"gw.example.com\"",
                        "by=_lb",
                    ],
                );
                params.insert(rng.below(params.len() + 1), other.into());
            }
            elements.push(params.join(*pick(&mut rng, &[";", "; "])));
            hops.push(if has_for { hop } else { None });
        }
        let mut h = HeaderMap::new();
        // One header line or several (one list, in order).
        let mut at = 0;
        while at < elements.len() {
            let end = (at + 1 + rng.below(3)).min(elements.len());
            let line = elements[at..end].join(*pick(&mut rng, &[", ", ",", " , "]));
            h.append("forwarded", line.parse().expect("ASCII"));
            at = end;
        }
        assert_eq!(
            forwarded_client(&h, ForwardedHeader::Forwarded, &trusted),
            reference_hop(&hops, &trusted),
            "{h:?}"
        );
        // The other header is never read.
        assert_eq!(
            forwarded_client(&h, ForwardedHeader::XForwardedFor, &trusted),
            None
        );
    }
}

#[test]
fn fuzz_forwarding_headers() {
    const SEEDS: [&str; 4] = [
        r#"for=6.6.6.6, for="[2001:db8::7]:4711";proto=https, for=10.0.0.3"#,
        "for=192.0.2.60;proto=http;by=203.0.113.43",
        "6.6.6.6, 203.0.113.7, 10.0.0.2",
        "[2001:db8::1]:80, ::ffff:10.0.0.1",
    ];
    const WORDS: [&[u8]; 16] = [
        b"for=",
        b"For=",
        b";",
        b",",
        b"\"",
        b"[",
        b"]",
        b":",
        b"::",
        b"=",
        b"\xff",
        b"unknown",
        b"10.0.0.1",
        b"2001:db8::",
        b"%eth0",
        b"\"[::1]:80\"",
    ];
    let trusted = Trusted::parse(&["10.0.0.0/8".into(), "2001:db8::/32".into()]).expect("nets");
    let mut rng = Rng::new(0x0f0_000d);
    for _ in 0..iterations(40_000) {
        let mut h = HeaderMap::new();
        for _ in 0..1 + rng.below(3) {
            let bytes = if rng.one_in(4) {
                rng.bytes(48)
            } else {
                mutate_pick(&mut rng, &SEEDS, &WORDS)
            };
            let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                continue;
            };
            let name = *pick(&mut rng, &["forwarded", "x-forwarded-for"]);
            h.append(name, value);
        }
        for which in [
            ForwardedHeader::Forwarded,
            ForwardedHeader::XForwardedFor,
            ForwardedHeader::None,
        ] {
            let got = forwarded_client(&h, which, &trusted);
            if let Some(ip) = got {
                assert_eq!(canonical_ip(ip), ip, "{h:?}");
            }
            if which == ForwardedHeader::None {
                assert_eq!(got, None);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// JWK sets.

const PINNED: [&[Algorithm]; 6] = [
    &[Algorithm::ES256],
    &[Algorithm::ES384],
    &[Algorithm::ES256, Algorithm::ES384],
    &[Algorithm::RS256, Algorithm::PS256],
    &[Algorithm::EdDSA],
    &[Algorithm::HS256],
];

struct JwkPool {
    keys: Vec<serde_json::Value>,
    documents: Vec<Vec<u8>>,
}

fn jwk_pool() -> JwkPool {
    let (p256, _) = keys::tests::ec_jwk("ec1", false);
    let (p384, _) = keys::tests::ec_jwk("ec2", true);
    let ed = keys::tests::ed_jwk("ed1");
    let rsa = keys::tests::rsa_jwk("rsa1", 2048);
    let mut anon = p256.clone();
    anon.as_object_mut().expect("object").remove("kid");
    let mut narrowed = p256.clone();
    narrowed["alg"] = json!("ES256");
    narrowed["use"] = json!("sig");
    narrowed["key_ops"] = json!(["verify"]);
    narrowed["kid"] = json!("ec3");
    let keys = vec![p256, p384, ed, rsa, anon, narrowed];
    let documents = [
        vec![0],
        vec![0, 2, 3],
        vec![3],
        vec![1, 2],
        vec![4],
        vec![5, 0, 0],
        vec![],
    ]
    .iter()
    .map(|picks: &Vec<usize>| {
        let chosen: Vec<_> = picks.iter().map(|&i| keys[i].clone()).collect();
        json!({ "keys": chosen }).to_string().into_bytes()
    })
    .collect();
    JwkPool { keys, documents }
}

const JSON_WORDS: [&[u8]; 28] = [
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b"\"",
    b":",
    b"null",
    b"\"kty\":\"EC\",",
    b"\"kty\":\"RSA\",",
    b"\"kty\":\"OKP\",",
    b"\"kty\":\"oct\",",
    b"\"crv\":\"P-384\",",
    b"\"crv\":\"Ed25519\",",
    b"\"alg\":\"ES256\",",
    b"\"alg\":\"none\",",
    b"\"alg\":\"HS256\",",
    b"\"use\":\"enc\",",
    b"\"key_ops\":[\"sign\"],",
    b"\"kid\":",
    b"\"x\":\"AA\",",
    b"\"n\":\"AQAB\",",
    b"\\u0000",
    b"1e999",
    b"-0",
    b"==",
    b"\"keys\":",
    b"\xf0\x9f\x92",
];

/// How many elements the document's `keys` array holds, if it is one.
fn keys_in(bytes: &[u8]) -> Option<usize> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some(doc.get("keys")?.as_array()?.len())
}

/// Parses a JWK set and checks what any answer must hold; returns how
/// many keys it took, or why it refused.
fn check_key_set(bytes: &[u8], pinned: &[Algorithm]) -> Result<usize, KeyError> {
    let (res, largest) = largest_allocation(|| KeySet::from_jwks(bytes, pinned, "fuzz"));
    assert_alloc_bounded(largest, bytes.len(), &ascii_lossy(bytes));
    match &res {
        Ok(set) => {
            let listed = keys_in(bytes).expect("an accepted set is {\"keys\":[...]}");
            assert!((1..=MAX_JWKS_KEYS.min(listed)).contains(&set.len()));
            if set.len() == 1 {
                assert!(set.select(None).is_some());
            } else {
                assert!(set.select(None).is_none());
            }
            for kid in ["ec1", "ec2", "ec3", "ed1", "rsa1", "x"] {
                if let Some(key) = set.select(Some(kid)) {
                    assert!(!key.algorithms.is_empty());
                    assert!(key.algorithms.iter().all(|a| pinned.contains(a)));
                }
            }
        }
        Err(e) => assert!(
            matches!(
                e,
                KeyError::Parse { .. }
                    | KeyError::TooManyKeys { .. }
                    | KeyError::NoUsableKey { .. }
            ),
            "{e}"
        ),
    }
    res.map(|set| set.len())
}

#[test]
fn fuzz_jwk_set_parsing() {
    let pool = jwk_pool();
    let mut rng = Rng::new(0x0f0_000e);
    for _ in 0..iterations(10_000) {
        let bytes = match rng.below(12) {
            0 => rng.bytes(96),
            1 => {
                // Structural: a valid key with one field replaced.
                let mut key = pick(&mut rng, &pool.keys).clone();
                let field = *pick(
                    &mut rng,
                    &["kty", "crv", "x", "y", "n", "e", "alg", "use", "kid"],
                );
                let value = match rng.below(6) {
                    0 => json!(null),
                    1 => json!(5),
                    2 => json!(""),
                    3 => json!(["sig"]),
                    4 => json!("A".repeat(rng.below(700))),
                    _ => json!(any_string(&mut rng, 12)),
                };
                key[field] = value;
                json!({ "keys": [key] }).to_string().into_bytes()
            }
            _ => mutate_pick(&mut rng, &pool.documents, &JSON_WORDS),
        };
        let _ = check_key_set(&bytes, PINNED[rng.below(PINNED.len())]);
    }
}

#[test]
fn fuzz_jwk_sets_never_hold_more_keys_than_the_cap() {
    let (key, _) = keys::tests::ec_jwk("k", false);
    let mut rng = Rng::new(0x0f0_000f);
    let mut sizes = vec![MAX_JWKS_KEYS, MAX_JWKS_KEYS + 1];
    sizes.extend((0..iterations(6)).map(|_| MAX_JWKS_KEYS - 3 + rng.below(8)));
    for n in sizes {
        let all: Vec<_> = (0..n)
            .map(|i| {
                let mut k = key.clone();
                // Some repeated kids, some keys without one.
                match rng.below(10) {
                    0 => k["kid"] = json!("dup"),
                    1 => drop(k.as_object_mut().expect("object").remove("kid")),
                    _ => k["kid"] = json!(format!("k{i}")),
                }
                k
            })
            .collect();
        let bytes = json!({ "keys": all }).to_string().into_bytes();
        let res = check_key_set(&bytes, &[Algorithm::ES256]);
        if n > MAX_JWKS_KEYS {
            assert!(matches!(res, Err(KeyError::TooManyKeys { .. })), "{n}");
        } else {
            assert!(res.expect("usable") <= n);
        }
    }
}

// ---------------------------------------------------------------------------
// Redis replies and messages.

/// The bytes Redis sends for `value` (RESP2 where it has the type, RESP3
/// otherwise): the input size that allocations are held to.
fn resp(value: &redis::Value, out: &mut Vec<u8>) {
    use redis::Value as V;
    let line = |out: &mut Vec<u8>, kind: u8, text: &str| {
        out.push(kind);
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    match value {
        V::Nil => out.extend_from_slice(b"$-1\r\n"),
        V::Int(n) => line(out, b':', &n.to_string()),
        V::BulkString(b) => {
            line(out, b'$', &b.len().to_string());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        V::Array(items) | V::Set(items) => {
            line(
                out,
                if matches!(value, V::Set(_)) {
                    b'~'
                } else {
                    b'*'
                },
                &items.len().to_string(),
            );
            items.iter().for_each(|v| resp(v, out));
        }
        V::SimpleString(s) => line(out, b'+', s),
        V::Okay => line(out, b'+', "OK"),
        V::Map(pairs) => {
            line(out, b'%', &pairs.len().to_string());
            for (k, v) in pairs {
                resp(k, out);
                resp(v, out);
            }
        }
        V::Attribute { data, attributes } => {
            line(out, b'|', &attributes.len().to_string());
            for (k, v) in attributes {
                resp(k, out);
                resp(v, out);
            }
            resp(data, out);
        }
        V::Double(d) => line(out, b',', &d.to_string()),
        V::Boolean(b) => line(out, b'#', if *b { "t" } else { "f" }),
        V::VerbatimString { text, .. } => {
            line(out, b'=', &(text.len() + 4).to_string());
            out.extend_from_slice(b"txt:");
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        V::Push { data, .. } => {
            line(out, b'>', &(data.len() + 1).to_string());
            resp(&V::BulkString(b"message".to_vec()), out);
            data.iter().for_each(|v| resp(v, out));
        }
        _ => line(out, b'-', "ERR other"),
    }
}

fn resp_len(value: &redis::Value) -> usize {
    let mut out = Vec::new();
    resp(value, &mut out);
    out.len()
}

const DATA: [&str; 7] = [
    r#"{"t":"a b"}"#,
    "[1,2,3]",
    r#""x""#,
    "null",
    r#"{"a":{"b":[true,false,{"c":"\u00e9"}]}}"#,
    "-0.5e10",
    "{}",
];

const OUTCOMES: [&str; 7] = [
    "position",
    "history",
    "recovered",
    "epoch_changed",
    "trimmed",
    "too_many",
    "other",
];

fn bulk(text: &str) -> redis::Value {
    redis::Value::BulkString(text.as_bytes().to_vec())
}

/// A read script answer: epoch, seq, outcome, then seq and payload pairs.
fn valid_read(rng: &mut Rng) -> redis::Value {
    let seq = rng.next_u64() >> rng.below(64);
    let mut items = vec![
        bulk(&format!("{:013x}", rng.next_u64() >> 12)),
        if rng.one_in(4) {
            bulk(&seq.to_string())
        } else {
            redis::Value::Int(i64::try_from(seq >> 1).expect("63 bits"))
        },
        bulk(OUTCOMES[rng.below(OUTCOMES.len())]),
    ];
    for _ in 0..rng.below(5) {
        items.push(redis::Value::Int(rng.below(1 << 20) as i64));
        let data = RawValue::from_string(pick(rng, &DATA).to_string()).expect("JSON");
        items.push(bulk(&payload(&any_string(rng, 10), &data)));
    }
    redis::Value::Array(items)
}

fn random_value(rng: &mut Rng, depth: usize) -> redis::Value {
    use redis::Value as V;
    let children = |rng: &mut Rng| -> Vec<V> {
        (0..rng.below(5))
            .map(|_| random_value(rng, depth.saturating_sub(1)))
            .collect()
    };
    match rng.below(if depth == 0 { 8 } else { 14 }) {
        0 => V::Nil,
        1 => V::Int(*pick(rng, &[0, 1, -1, 42, i64::MAX, i64::MIN])),
        2 => V::BulkString(rng.bytes(24)),
        3 => bulk(OUTCOMES[rng.below(OUTCOMES.len())]),
        4 => V::SimpleString(any_string(rng, 8)),
        5 => V::Okay,
        6 => V::Double(*pick(rng, &[0.5, -1.0, f64::NAN, f64::INFINITY, 1e300])),
        7 => V::Boolean(rng.one_in(2)),
        8 | 9 => V::Array(children(rng)),
        10 => V::Map(
            children(rng)
                .into_iter()
                .map(|v| (V::SimpleString("k".into()), v))
                .collect(),
        ),
        11 => V::Set(children(rng)),
        12 => V::VerbatimString {
            format: redis::VerbatimFormat::Text,
            text: any_string(rng, 8),
        },
        _ => V::Attribute {
            data: Box::new(random_value(rng, depth - 1)),
            attributes: vec![(V::SimpleString("ttl".into()), V::Int(3))],
        },
    }
}

const REDIS_WORDS: [&[u8]; 16] = [
    b" ",
    b"  ",
    b"9",
    b"0",
    b"18446744073709551616",
    b"-1",
    b"+1",
    b"{",
    b"}",
    b"\"",
    b"\xff",
    b"\xc3",
    b"99999999999999999999 ",
    b"J ",
    b"L ",
    b"\r\n",
];

/// A tree changed at one node: dropped, doubled, inserted or reordered
/// items, or a leaf changed in kind or content.
fn mutate_tree(rng: &mut Rng, value: &mut redis::Value) {
    use redis::Value as V;
    if let V::Array(items) = value
        && !items.is_empty()
        && !rng.one_in(5)
    {
        let i = rng.below(items.len());
        match rng.below(7) {
            0 | 1 => mutate_tree(rng, &mut items[i]),
            2 => drop(items.remove(i)),
            3 => items.insert(i, items[i].clone()),
            4 => items.insert(i, random_value(rng, 2)),
            5 => {
                let j = rng.below(items.len());
                items.swap(i, j);
            }
            _ => items.truncate(i),
        }
        return;
    }
    *value = match std::mem::take(value) {
        V::BulkString(b) => match rng.below(4) {
            0 => V::SimpleString(ascii_lossy(&b)),
            1 => V::Int(ascii_lossy(&b).parse().unwrap_or(-1)),
            _ => V::BulkString(rng.mutate(&b, &REDIS_WORDS)),
        },
        V::Int(n) => match rng.below(4) {
            0 => bulk(&n.to_string()),
            1 => V::Double(n as f64),
            2 => V::Int(-n.saturating_abs()),
            _ => V::Int(n ^ (1 << rng.below(63))),
        },
        _ => random_value(rng, 2),
    };
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    op: &'a str,
    channel: String,
    from: String,
    seq: u64,
    #[serde(borrow)]
    data: &'a RawValue,
}

fn check_read(channel: &ChannelName, tree: &redis::Value, input_len: usize) -> bool {
    let (read, largest) = largest_allocation(|| parse_read(channel, tree));
    assert_alloc_bounded(largest, input_len, tree);
    let Some(read) = read else {
        return false;
    };
    let redis::Value::Array(items) = tree else {
        panic!("a read from {tree:?}");
    };
    assert!(items.len() >= 3 && (items.len() - 3) % 2 == 0, "{tree:?}");
    assert_eq!(read.frames.len(), (items.len() - 3) / 2);
    assert_eq!(
        redis::from_redis_value::<u64>(items[1].clone()).ok(),
        Some(read.seq)
    );
    for (frame, pair) in read.frames.iter().zip(items[3..].chunks(2)) {
        let f: Frame<'_> = serde_json::from_str(frame.as_str())
            .unwrap_or_else(|e| panic!("not a message frame ({e}): {frame}"));
        let stored: String = redis::from_redis_value(pair[1].clone()).expect("a payload");
        let (from, data) = parse_payload(&stored).expect("a payload");
        assert_eq!(
            (f.op, f.channel.as_str(), f.from.as_str()),
            ("message", channel.as_str(), from)
        );
        assert_eq!(
            Some(f.seq),
            redis::from_redis_value::<u64>(pair[0].clone()).ok()
        );
        assert_eq!(f.data.get(), data.trim_matches([' ', '\t', '\n', '\r']));
    }
    true
}

#[test]
fn fuzz_redis_read_replies() {
    let channel = ChannelName::parse("chat:lobby").expect("valid");
    let mut rng = Rng::new(0x0f0_0010);
    let mut parsed = 0;
    for _ in 0..iterations(20_000) {
        let mut tree = if rng.one_in(6) {
            random_value(&mut rng, 3)
        } else {
            valid_read(&mut rng)
        };
        for _ in 0..rng.below(3) {
            mutate_tree(&mut rng, &mut tree);
        }
        let len = resp_len(&tree);
        parsed += usize::from(check_read(&channel, &tree, len));
    }
    assert!(parsed > 100, "{parsed}");
}

/// The reply as bytes on the wire, mutated there and parsed by the Redis
/// client, as the gateway receives it.
#[test]
fn fuzz_redis_read_reply_bytes() {
    const WORDS: [&[u8]; 12] = [
        b"\r\n",
        b"*",
        b"$",
        b":",
        b"-1",
        b"999999999",
        b"_\r\n",
        b"%1\r\n",
        b"~",
        b"|",
        b">",
        b"*2147483647\r\n",
    ];
    let channel = ChannelName::parse("chat:lobby").expect("valid");
    let mut rng = Rng::new(0x0f0_0011);
    let mut parsed = 0;
    for _ in 0..iterations(15_000) {
        let mut bytes = Vec::new();
        resp(&valid_read(&mut rng), &mut bytes);
        if !rng.one_in(3) {
            bytes = rng.mutate(&bytes, &WORDS);
        }
        if let Ok(tree) = redis::parse_redis_value(&bytes) {
            parsed += usize::from(check_read(&channel, &tree, bytes.len()));
        }
    }
    assert!(parsed > 100, "{parsed}");
}

#[test]
fn fuzz_redis_messages_round_trip_any_user_and_data() {
    let mut rng = Rng::new(0x0f0_0012);
    for _ in 0..iterations(25_000) {
        let seq = rng.next_u64() >> rng.below(64);
        let epoch = format!("{:x}", rng.next_u64());
        let from = any_string(&mut rng, 12);
        let data = RawValue::from_string(pick(&mut rng, &DATA).to_string()).expect("JSON");
        let stored = payload(&from, &data);
        assert_eq!(parse_payload(&stored), Some((from.as_str(), data.get())));
        let wire = format!("{seq} {epoch} {stored}");
        assert_eq!(
            parse_message(wire.as_bytes()),
            Some((seq, epoch.as_str(), from.as_str(), data.get()))
        );
        // A presence event is never read as a message, nor the reverse.
        assert_eq!(parse_event(wire.as_bytes()), None);
        let event = format!("{} {from}", pick(&mut rng, &["J", "L"]));
        assert_eq!(parse_message(event.as_bytes()), None);
    }
}

#[test]
fn fuzz_redis_pubsub_messages() {
    const SEEDS: [&[u8]; 5] = [
        b"42 18c3f2a0b1c2d 5 alice{\"t\":1}",
        b"0 e 0 []",
        b"7 e 3 a b\"x\"",
        b"J bob",
        b"L a b c",
    ];
    let mut rng = Rng::new(0x0f0_0013);
    for _ in 0..iterations(50_000) {
        let bytes = if rng.one_in(4) {
            rng.bytes(40)
        } else {
            mutate_pick(&mut rng, &SEEDS, &REDIS_WORDS)
        };
        let (message, largest) = largest_allocation(|| parse_message(&bytes));
        assert_alloc_bounded(largest, bytes.len(), &bytes);
        if let Some((_, epoch, from, data)) = message {
            let text = std::str::from_utf8(&bytes).expect("parsed as text");
            assert!(!epoch.contains(' '));
            assert!(text.ends_with(&format!("{from}{data}")), "{text:?}");
        }
        let (event, largest) = largest_allocation(|| parse_event(&bytes));
        assert_eq!(largest, 0, "an event is parsed in place");
        if let Some((event, user)) = event {
            let kind = if event == Event::Join { "J" } else { "L" };
            assert_eq!(bytes, format!("{kind} {user}").as_bytes());
        }
    }
}

/// Regression: `parse_read` cloned every item it read as text or a number,
/// so an array where the epoch, the seq or the outcome belongs was copied
/// whole (5.6 times its RESP bytes for 100,000 nils) only to be refused.
#[test]
fn fuzz_redis_reads_of_large_trees_allocate_in_proportion() {
    use redis::Value as V;
    let channel = ChannelName::parse("chat:lobby").expect("valid");
    let n = 100_000;
    let data = RawValue::from_string("{}".into()).expect("JSON");
    let mut not_frames = vec![bulk("e"), V::Int(1), bulk("history")];
    not_frames.extend(std::iter::repeat_n(V::Nil, n));
    let mut frames = vec![bulk("e"), V::Int(1), bulk("history")];
    for i in 0..n / 10 {
        frames.push(V::Int(i as i64));
        frames.push(bulk(&payload("alice", &data)));
    }
    for tree in [
        V::Array(vec![V::Array(vec![V::Nil; n]), V::Int(1), bulk("history")]),
        V::Array(vec![
            bulk("e"),
            V::Array(vec![V::Int(0); n]),
            bulk("history"),
        ]),
        V::Array(vec![bulk("e"), V::Int(1), V::Set(vec![V::Okay; n])]),
        V::Array(not_frames),
        V::Array(frames),
    ] {
        check_read(&channel, &tree, resp_len(&tree));
    }
}

/// JSON claims no lengths to believe, but serde_json builds the `keys`
/// array as a `Vec<Value>` of 32-byte values grown by doubling, and the key
/// cap is checked once it is built: a crafted document costs one
/// allocation of up to 32 times its size. The size limit bounds that at
/// 16 times [`keys::MAX_JWKS_BYTES`]; pinned here so that it cannot grow.
/// (The 4× bound of `fuzz_jwk_set_parsing` holds for ordinary key sets.)
#[test]
fn fuzz_jwk_set_amplification_is_bounded_by_the_size_limit() {
    let limit = keys::MAX_JWKS_BYTES;
    let shapes = [
        ("{\"keys\":[", "0", "]}"),
        ("{\"keys\":[[", "0", "]]}"),
        (
            "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x5c\":[",
            "\"\"",
            "]}]}",
        ),
        ("{\"keys\":[", "{}", "]}"),
    ];
    for (head, item, tail) in shapes {
        let most = (limit - head.len() - tail.len() + 1) / (item.len() + 1);
        for n in [(1 << 18) + 1, most] {
            let mut doc = String::with_capacity(limit);
            doc.push_str(head);
            for i in 0..n {
                if i > 0 {
                    doc.push(',');
                }
                doc.push_str(item);
            }
            doc.push_str(tail);
            assert!(doc.len() <= limit);
            let (res, largest) =
                largest_allocation(|| KeySet::from_jwks(doc.as_bytes(), &[Algorithm::ES256], "x"));
            assert!(res.is_err(), "{head}{item}…");
            assert!(
                largest <= 16 * limit,
                "{largest} bytes for {} bytes of {head}{item}…",
                doc.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// WebSocket frames.

/// A client frame, masked with a zero key (the payload as written).
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// The bytes a client sends after the upgrade, read by tungstenite with
/// the session's own limits (`session::ws_limits`): mutated valid frames
/// (text, fragments, pings, closes, long lengths) and random bytes never
/// panic, and no allocation follows a claimed length past the frame limit.
#[test]
fn fuzz_websocket_frames_with_our_limits() {
    use futures_util::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let config = Config::default();
    let limits = crate::session::ws_limits(&config);
    let seeds: Vec<Vec<u8>> = vec![
        masked(0x81, br#"{"op":"ping","id":1}"#),
        [masked(0x01, b"{\"op\":"), masked(0x80, b"\"ping\"}")].concat(),
        masked(0x89, b"hi"),
        masked(0x88, &[0x03, 0xe8, b'b', b'y', b'e']),
        masked(0x81, &[b'x'; 300]),
        vec![0x82, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ];
    let dictionary: [&[u8]; 12] = [
        &[0x81],
        &[0x01],
        &[0x80],
        &[0x88],
        &[0x89],
        &[0x8a],
        &[0x7e, 0xff, 0xff],
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        &[0x80, 0, 0, 0, 0],
        &[0xc3, 0x28],
        &[0x03, 0xed],
        &[0xfe],
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // What the stream allocates whatever it reads: its read and write
    // buffers, and at most one frame up to the frame limit.
    let fixed = config.websocket.max_frame_bytes + 64 * 1024;
    let mut rng = Rng::new(0xf7a3e5);
    let mut decoded = 0;
    for _ in 0..iterations(2_000) {
        let bytes = if rng.one_in(8) {
            rng.bytes(256)
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            rng.mutate(seed, &dictionary)
        };
        let (messages, largest) = largest_allocation(|| {
            runtime.block_on(async {
                let (mut client, server) = tokio::io::duplex(4 * 1024);
                let mut ws =
                    WebSocketStream::from_raw_socket(server, Role::Server, Some(limits)).await;
                let feed = async {
                    let _ = client.write_all(&bytes).await;
                    let _ = client.shutdown().await;
                    client
                };
                let read = async {
                    let mut n = 0;
                    while let Some(Ok(_)) = ws.next().await {
                        n += 1;
                    }
                    n
                };
                let (client, n) = tokio::join!(feed, read);
                drop(client);
                n
            })
        });
        assert!(
            largest <= fixed + 4 * bytes.len(),
            "one allocation of {largest} bytes for {} bytes ({messages} messages): {bytes:?}",
            bytes.len()
        );
        decoded += messages;
    }
    // The mutations leave many frames whole: the reader was exercised.
    assert!(
        decoded > iterations(2_000) / 10,
        "only {decoded} messages decoded"
    );
}
