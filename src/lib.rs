//! wsgate: a secure, authenticated WebSocket (wss://) gateway.
//!
//! The path of one connection, module by module:
//!
//! 1. [`server`] takes a connection permit, accepts with back-off, reads
//!    the client's address from a trusted balancer's PROXY header
//!    ([`proxy`]), asks [`admission`] whether that address may connect, runs the
//!    TLS handshake under its deadline ([`server::tls`]) and serves HTTP/1.1
//!    with header limits: `/ws`, health, `/metrics`, the demo page.
//! 2. [`upgrade`] decides `/ws`: RFC 6455 checks, the Origin allow-list, the
//!    token carriers, and verification by [`auth`]. A refusal is an HTTP
//!    status, never a WebSocket.
//! 3. [`session`] owns the upgraded socket: one task, one `select!` loop,
//!    typed frames from [`protocol`], exactly one close reason at the end.
//! 4. Each `subscribe`/`publish` names a [`channel::ChannelName`], is
//!    checked against the [`policy`] set, and goes through the [`broker`]
//!    (in process, or Redis for several replicas) to the [`hub`], which
//!    encodes a publication once and fans the bytes out to bounded
//!    outboxes.
//!
//! [`config`] is the one configuration tree; [`metrics`] counts what
//! happens (labels from fixed sets only); [`certs`] makes development
//! certificates; [`auth::mint`] makes development tokens; [`bench`](mod@bench) is the
//! load generator behind `wsgate bench`; [`doctor`] reviews a configuration
//! for `wsgate doctor`.

pub mod admission;
pub mod auth;
pub mod bench;
pub mod broker;
pub mod certs;
pub mod channel;
pub mod config;
pub mod doctor;
pub mod hub;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod session;
pub mod upgrade;

pub use config::Config;
pub use server::Server;
