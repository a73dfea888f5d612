//! Operator tools, outside the request path: the bodies of the CLI
//! commands ([`cli`], [`serve`]), development certificates and secrets
//! ([`certs`]), the configuration review behind `wsgate doctor`
//! ([`doctor`]) and the load generator behind `wsgate bench` ([`bench`]).
//! Nothing in the gateway itself imports from here.

pub mod bench;
pub mod certs;
pub mod cli;
pub mod doctor;
pub mod serve;
