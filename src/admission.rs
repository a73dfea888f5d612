//! Admission limits, decided before any costly work: open connections per
//! source address, new connections per second (globally and per address),
//! and failed authentications per address.
//!
//! The connection checks run when a connection is accepted, before its TLS
//! handshake; the failed-authentication check runs after the cheap token
//! carrier rules and before any signature work. An address is an IPv4
//! address or an IPv6 prefix (a /64 by default: one host usually owns a
//! whole /64, so counting single IPv6 addresses would limit nothing).
//!
//! State is kept only for addresses that have open connections or buckets
//! still refilling; [`Admission::sweep`] forgets the rest, so the table is
//! bounded by recent activity, not by how many addresses ever connected.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::AdmissionConfig;
use crate::rate::{Bucket, Rate};

/// What to do with a newly accepted connection.
#[derive(Debug)]
pub enum Admit {
    /// Serve it; the guard holds its place in the address's count.
    Yes(AddressGuard),
    /// Complete the handshake only to answer `/ws` with this refusal, so
    /// the client learns when to retry; other routes are still served.
    Refuse(AddressGuard, Limited),
    /// Close it at once, before TLS: the address was already told to
    /// back off within the last second. (A limit found on an HTTP request
    /// is answered like [`Admit::Refuse`].)
    Drop(Limited),
}

/// Which admission limit a connection or upgrade ran into, and when to
/// try again (the `Retry-After` value, whole seconds, at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// `admission.max_connections_per_address` open connections: `429`.
    AddressConnections,
    /// `admission.address_new_connections_per_s` exceeded: `429`.
    AddressRate(u32),
    /// `admission.new_connections_per_s` exceeded: `503`.
    GlobalRate(u32),
    /// `admission.address_failed_auths_per_min` exceeded: `429`.
    FailedAuths(u32),
}

/// What is remembered about one address.
#[derive(Debug)]
struct AddressState {
    open: usize,
    connects: Option<Bucket>,
    failed_auths: Option<Bucket>,
    /// When this address was last answered with a refusal at admission.
    last_refusal: Option<Instant>,
}

/// The admission state shared by all connection tasks.
#[derive(Debug)]
pub struct Admission {
    max_per_address: usize,
    v6_prefix: u8,
    global_rate: Option<Rate>,
    address_rate: Option<Rate>,
    auth_rate: Option<Rate>,
    global: Mutex<Option<Bucket>>,
    addresses: Mutex<HashMap<IpAddr, AddressState>>,
}

impl Admission {
    pub fn new(cfg: &AdmissionConfig) -> Self {
        Self {
            max_per_address: cfg.max_connections_per_address,
            v6_prefix: cfg.ipv6_prefix_len,
            global_rate: Rate::new(
                f64::from(cfg.new_connections_per_s),
                cfg.new_connections_burst.max(cfg.new_connections_per_s),
            ),
            address_rate: Rate::new(
                f64::from(cfg.address_new_connections_per_s),
                cfg.address_new_connections_burst,
            ),
            auth_rate: Rate::new(
                f64::from(cfg.address_failed_auths_per_min) / 60.0,
                cfg.address_failed_auths_per_min,
            ),
            global: Mutex::new(None),
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// The key an address is counted under: IPv4 as is (IPv4-mapped IPv6
    /// included), IPv6 masked to the configured prefix.
    pub fn key(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u128::from(v6);
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(self.v6_prefix))
                        .unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from(bits & mask))
                }
            },
        }
    }

    /// Decides a connection just accepted from `ip`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Admit {
        let key = self.key(ip);
        let global = self.global_rate.and_then(|rate| {
            let mut bucket = self.global.lock().unwrap_or_else(PoisonError::into_inner);
            bucket
                .get_or_insert_with(|| Bucket::full(rate, now))
                .take(rate, now)
                .err()
        });
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = addresses.entry(key).or_insert_with(|| AddressState {
            open: 0,
            connects: None,
            failed_auths: None,
            last_refusal: None,
        });
        let limited = if self.max_per_address > 0 && state.open >= self.max_per_address {
            Some(Limited::AddressConnections)
        } else if let Some(wait) = self.address_rate.and_then(|rate| {
            state
                .connects
                .get_or_insert_with(|| Bucket::full(rate, now))
                .take(rate, now)
                .err()
        }) {
            Some(Limited::AddressRate(wait))
        } else {
            global.map(Limited::GlobalRate)
        };
        if let Some(limited) = limited {
            // One answered refusal per address per second: past that, a
            // flood costs us an accept and a close, not TLS handshakes.
            if state
                .last_refusal
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
            {
                return Admit::Drop(limited);
            }
            state.last_refusal = Some(now);
            state.open += 1;
            return Admit::Refuse(self.guard(Some(key)), limited);
        }
        state.open += 1;
        Admit::Yes(self.guard(Some(key)))
    }

    /// Decides a connection by the global limit only: one from a trusted
    /// proxy, whose clients are told apart later by a forwarding header.
    pub fn admit_global(self: &Arc<Self>, now: Instant) -> Admit {
        let limited = self.global_rate.and_then(|rate| {
            let mut bucket = self.global.lock().unwrap_or_else(PoisonError::into_inner);
            bucket
                .get_or_insert_with(|| Bucket::full(rate, now))
                .take(rate, now)
                .err()
        });
        match limited {
            Some(wait) => Admit::Refuse(self.guard(None), Limited::GlobalRate(wait)),
            None => Admit::Yes(self.guard(None)),
        }
    }

    fn guard(self: &Arc<Self>, key: Option<IpAddr>) -> AddressGuard {
        AddressGuard {
            admission: Arc::clone(self),
            key,
        }
    }

    /// Before verifying a token from `key`: refused when the address has
    /// used up its failed authentications.
    ///
    /// # Errors
    /// [`Limited::FailedAuths`] with the seconds until the next attempt.
    pub fn check_auth(&self, key: IpAddr, now: Instant) -> Result<(), Limited> {
        let Some(rate) = self.auth_rate else {
            return Ok(());
        };
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match addresses
            .get_mut(&key)
            .and_then(|s| s.failed_auths.as_mut())
        {
            Some(bucket) => bucket.peek(rate, now).map_err(Limited::FailedAuths),
            None => Ok(()),
        }
    }

    /// Records a failed authentication from `key`.
    pub fn auth_failed(&self, key: IpAddr, now: Instant) {
        let Some(rate) = self.auth_rate else {
            return;
        };
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = addresses.get_mut(&key) {
            let _ = state
                .failed_auths
                .get_or_insert_with(|| Bucket::full(rate, now))
                .take(rate, now);
        }
    }

    /// Forgets addresses with no open connection whose buckets are full
    /// again; returns how many are still remembered.
    pub fn sweep(&self, now: Instant) -> usize {
        let (address_rate, auth_rate) = (self.address_rate, self.auth_rate);
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        addresses.retain(|_, s| {
            let refilled = |b: &Option<Bucket>, r: Option<Rate>| match (b, r) {
                (Some(b), Some(r)) => b.is_full(r, now),
                _ => true,
            };
            s.open > 0
                || !refilled(&s.connects, address_rate)
                || !refilled(&s.failed_auths, auth_rate)
        });
        addresses.len()
    }

    /// How many connections `ip` has open.
    #[cfg(test)]
    pub fn open(&self, ip: IpAddr) -> usize {
        let key = self.key(ip);
        self.addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .map_or(0, |s| s.open)
    }
}

/// A connection's place in its address's count, released on drop.
#[derive(Debug)]
pub struct AddressGuard {
    admission: Arc<Admission>,
    /// `None`: counted by no address (see [`Admission::admit_global`]).
    key: Option<IpAddr>,
}

impl AddressGuard {
    /// The address key this connection is counted under, if any.
    pub fn key(&self) -> Option<IpAddr> {
        self.key
    }
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let mut addresses = self
            .admission
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = addresses.get_mut(&key) {
            state.open = state.open.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdmissionConfig {
        AdmissionConfig {
            max_connections_per_address: 3,
            new_connections_per_s: 0,
            new_connections_burst: 0,
            address_new_connections_per_s: 1,
            address_new_connections_burst: 5,
            address_failed_auths_per_min: 2,
            ipv6_prefix_len: 64,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn open_connections_per_address_are_capped_and_released() {
        let a = Arc::new(Admission::new(&cfg()));
        let t = Instant::now();
        let held: Vec<_> = (0..3)
            .map(|_| match a.admit(ip("10.0.0.1"), t) {
                Admit::Yes(g) => g,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(matches!(
            a.admit(ip("10.0.0.1"), t),
            Admit::Refuse(_, Limited::AddressConnections)
        ));
        // Told once this second; the next is closed before TLS.
        assert!(matches!(
            a.admit(ip("10.0.0.1"), t),
            Admit::Drop(Limited::AddressConnections)
        ));
        // Another address is unaffected.
        assert!(matches!(a.admit(ip("10.0.0.2"), t), Admit::Yes(_)));
        drop(held);
        assert_eq!(a.open(ip("10.0.0.1")), 0);
        let later = t + Duration::from_secs(2);
        assert!(matches!(a.admit(ip("10.0.0.1"), later), Admit::Yes(_)));
    }

    #[test]
    fn new_connection_rate_per_address_tells_when_to_retry() {
        let mut c = cfg();
        c.max_connections_per_address = 0;
        let a = Arc::new(Admission::new(&c));
        let t = Instant::now();
        for _ in 0..5 {
            assert!(matches!(a.admit(ip("10.0.0.1"), t), Admit::Yes(_)));
        }
        assert!(matches!(
            a.admit(ip("10.0.0.1"), t),
            Admit::Refuse(_, Limited::AddressRate(1))
        ));
        assert!(matches!(
            a.admit(ip("10.0.0.1"), t + Duration::from_millis(1500)),
            Admit::Yes(_)
        ));
    }

    #[test]
    fn global_rate_limits_every_address() {
        let mut c = cfg();
        c.new_connections_per_s = 2;
        c.address_new_connections_per_s = 0;
        let a = Arc::new(Admission::new(&c));
        let t = Instant::now();
        assert!(matches!(a.admit(ip("10.0.0.1"), t), Admit::Yes(_)));
        assert!(matches!(a.admit(ip("10.0.0.2"), t), Admit::Yes(_)));
        assert!(matches!(
            a.admit(ip("10.0.0.3"), t),
            Admit::Refuse(_, Limited::GlobalRate(1))
        ));
    }

    #[test]
    fn failed_auths_block_the_address_until_refilled() {
        let a = Arc::new(Admission::new(&cfg()));
        let t = Instant::now();
        let Admit::Yes(g) = a.admit(ip("10.0.0.1"), t) else {
            panic!()
        };
        let key = g.key().unwrap();
        assert!(a.check_auth(key, t).is_ok());
        a.auth_failed(key, t);
        a.auth_failed(key, t);
        // 2 per minute: the next token is 30 s away.
        assert_eq!(a.check_auth(key, t), Err(Limited::FailedAuths(30)));
        assert!(a.check_auth(key, t + Duration::from_secs(31)).is_ok());
    }

    #[test]
    fn ipv6_is_counted_per_prefix_and_mapped_v4_as_v4() {
        let a = Admission::new(&cfg());
        assert_eq!(a.key(ip("2001:db8::1")), a.key(ip("2001:db8::ffff:2")));
        assert_ne!(a.key(ip("2001:db8::1")), a.key(ip("2001:db8:0:1::1")));
        assert_eq!(a.key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn sweep_forgets_idle_refilled_addresses_only() {
        let a = Arc::new(Admission::new(&cfg()));
        let t = Instant::now();
        let held = a.admit(ip("10.0.0.1"), t);
        drop(a.admit(ip("10.0.0.2"), t));
        assert_eq!(a.sweep(t), 2, "10.0.0.2's bucket is still refilling");
        assert_eq!(a.sweep(t + Duration::from_secs(10)), 1);
        drop(held);
        assert_eq!(a.sweep(t + Duration::from_secs(10)), 0);
    }
}
