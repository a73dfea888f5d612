//! Integration tests over real TLS sockets on 127.0.0.1, in one binary to
//! keep link time down. `harness` starts the gateway in-process.

mod admission;
mod api;
mod bench;
mod certs_token;
mod channels;
mod cluster;
mod deploy;
mod doctor;
mod faults;
mod frames;
mod haproxy;
mod harness;
mod history;
mod jwks;
mod limits;
mod logs;
mod metrics;
mod openapi;
mod presence;
mod process;
mod proxy;
mod reload;
mod storage;
mod upgrade;
