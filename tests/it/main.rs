//! Integration tests over real TLS sockets on 127.0.0.1, in one binary to
//! keep link time down. `harness` starts the gateway in-process.

mod bench;
mod certs_token;
mod channels;
mod deploy;
mod doctor;
mod haproxy;
mod harness;
mod limits;
mod logs;
mod metrics;
mod upgrade;
