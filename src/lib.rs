//! wsgate: a secure, authenticated WebSocket (wss://) gateway.
//!
//! # The path of one connection
//!
//! Each step names the module and the function that does it; each arrow
//! is a module boundary, and imports only ever point down this list.
//!
//! 1. **Accept** — `server::Server::run` takes a connection permit (the
//!    global cap, with a small overflow pool answering 503), then
//!    `server::listen::accept` accepts with back-off on errors such as
//!    EMFILE, and one task per connection runs `server::conn::serve_connection`.
//! 2. **Client address and admission** — on a listener that requires it,
//!    `server::conn` reads the PROXY header of a trusted balancer
//!    (`proxy::read_header`); `admission::Admission::admit` decides the
//!    address's limits before any costly work, and the connection takes
//!    its `gateway::slots::ConnSlot`.
//! 3. **TLS** — the `TlsAcceptor` built by [`tls::server_config`] from the
//!    current certificate ([`tls::CertStore`], swapped by reloads) runs
//!    the handshake under `server.handshake_timeout_ms`.
//! 4. **HTTP** — hyper's HTTP/1.1 from `server::listen::http1_builder`
//!    (header deadline, size and count limits); `server::routes::handle`
//!    routes `/ws`, `/healthz`, `/readyz`, `/metrics` and the demo page.
//! 5. **Upgrade** — `upgrade::decide` makes the whole `/ws` decision:
//!    the forwarded client address, RFC 6455 checks, Origin, draining,
//!    the token carrier, the failed-authentication gate, verification by
//!    [`auth::Verifier`] into an [`identity::Identity`], and the per-user
//!    cap (`gateway::slots::UserSlot`). A refusal is an HTTP status, never
//!    a WebSocket. `server::routes` answers `101` and spawns the session.
//! 6. **Session** — `session::run`: one task, one `select!` loop over
//!    inbound frames (`protocol::decode`, then `session::ops`), the
//!    outbox, the heartbeat tick, the token's expiry, policy reloads and
//!    shutdown; it ends with exactly one `session::CloseReason`. Its socket
//!    and outbox are a `line::Line`, which a delivering task may write to
//!    directly while nothing waits there.
//! 7. **Core** — `gateway::Gateway` checks each `subscribe` and `publish`
//!    against the caller's [`policy`] set and limits, and owns the
//!    [`channel::ChannelName`] → subscribers table (`hub::Hub`, which
//!    encodes a publication once and pushes the bytes to each subscriber's
//!    line: its socket when idle, else its bounded outbox) and the broker (`broker`, in process or Redis), which it
//!    asks to subscribe or release a channel when the hub reports the
//!    first local subscriber or the last one gone.
//! 8. **Heartbeats** — a WebSocket ping every `websocket.heartbeat_ms`
//!    from the session loop; any inbound frame counts as liveness, and
//!    silence past heartbeat + grace ends the session.
//! 9. **Drain** — on SIGTERM (`tools::serve`), `Server::run` marks the
//!    gateway draining (`/readyz` 503), closes the listener after
//!    `server.drain_grace_ms`, and sessions close with 1001 at their turn
//!    in `server.drain_window_ms`, under a hard deadline.
//! 10. **Reload** — SIGHUP or a watched file change (`server::reload`)
//!     re-reads policies, the certificate and the verification keys; each
//!     is validated and swapped whole, or the old one stays.
//!
//! The leaves import none of the rooms above them: [`config`] (one serde
//! tree, imports nothing of ours), [`channel`], [`identity`], `protocol`,
//! [`policy`], `metrics` (labels from fixed sets only), `rate` (the one
//! token bucket), `proxy`. Operator tools live in [`tools`].

mod admission;
mod api;
pub mod auth;
mod broker;
pub mod channel;
pub mod config;
#[cfg(test)]
mod fuzz_tests;
mod gateway;
mod history;
mod hub;
pub mod identity;
mod line;
mod loggate;
mod metrics;
pub mod policy;
mod presence;
mod protocol;
mod proxy;
mod rate;
pub mod server;
mod session;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod tools;
mod upgrade;

pub use config::Config;
pub use server::{Server, ServerHandle};
