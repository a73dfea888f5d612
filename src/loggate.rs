//! Which log lines that clients can cause are written: refusals, closes
//! and failed handshakes are logged at the default level (`info`) so an
//! operator sees them, but a flood must not fill the disk. Each address
//! gets a small burst and then one line per second; all addresses
//! together get at most 100 lines a second (`[log] client_lines_*`). A line that is
//! held back is counted, and the next line written for that address says
//! how many were (`held`); `wsgate_log_lines_held_total` counts them all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::LogConfig;
use crate::metrics::Metrics;
use crate::rate::{Bucket, Rate};

/// Addresses remembered at most; past it, new ones share the global cap
/// only after the idle ones are forgotten.
const MAX_ADDRESSES: usize = 65_536;
/// An address silent this long is forgotten.
const IDLE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Entry {
    bucket: Bucket,
    last: Instant,
    held: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct LogGate {
    /// `None`: no limit.
    per_address: Option<Rate>,
    global_rate: Option<Rate>,
    addresses: Mutex<HashMap<IpAddr, Entry>>,
    global: Mutex<Option<Bucket>>,
    metrics: Arc<Metrics>,
}

impl LogGate {
    pub fn new(cfg: &LogConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            per_address: Rate::new(f64::from(cfg.client_lines_per_s), cfg.client_lines_burst),
            global_rate: Rate::new(
                f64::from(cfg.client_lines_max_per_s),
                cfg.client_lines_max_per_s,
            ),
            addresses: Mutex::default(),
            global: Mutex::default(),
            metrics,
        }
    }

    /// Whether a line about `ip` may be written now: `Some(held)` with how
    /// many about it were held back since the last one, or `None` (held
    /// back, and counted).
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let Some(rate) = self.per_address else {
            return self.take_global(now).then_some(0).or_else(|| {
                self.hold();
                None
            });
        };
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !addresses.contains_key(&ip) && addresses.len() >= MAX_ADDRESSES {
            addresses.retain(|_, e| now.saturating_duration_since(e.last) < IDLE);
            if addresses.len() >= MAX_ADDRESSES {
                drop(addresses);
                self.hold();
                return None;
            }
        }
        let entry = addresses.entry(ip).or_insert_with(|| Entry {
            bucket: Bucket::full(rate, now),
            last: now,
            held: 0,
        });
        entry.last = now;
        let allowed = entry.bucket.take(rate, now).is_ok() && self.take_global(now);
        if allowed {
            Some(std::mem::take(&mut entry.held))
        } else {
            entry.held += 1;
            drop(addresses);
            self.hold();
            None
        }
    }

    /// [`LogGate::admit`] at the current time.
    pub fn admit_now(&self, ip: IpAddr) -> Option<u64> {
        self.admit(ip, Instant::now())
    }

    fn take_global(&self, now: Instant) -> bool {
        let Some(rate) = self.global_rate else {
            return true;
        };
        let mut global = self.global.lock().unwrap_or_else(PoisonError::into_inner);
        global
            .get_or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
            .is_ok()
    }

    fn hold(&self) {
        self.metrics.log_lines_held.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets addresses idle past [`IDLE`]. Run now and then.
    pub fn sweep(&self, now: Instant) {
        self.addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, e| now.saturating_duration_since(e.last) < IDLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_a_burst_then_one_a_second_and_hears_what_was_held() {
        let metrics = Arc::new(Metrics::default());
        let gate = LogGate::new(&LogConfig::default(), Arc::clone(&metrics));
        let (a, b) = (
            "203.0.113.7".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
        );
        let t0 = Instant::now();
        for _ in 0..LogConfig::default().client_lines_burst {
            assert_eq!(gate.admit(a, t0), Some(0));
        }
        assert_eq!(gate.admit(a, t0), None);
        assert_eq!(gate.admit(a, t0), None);
        assert_eq!(gate.admit(b, t0), Some(0), "others are not held back");
        assert_eq!(gate.admit(a, t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(metrics.log_lines_held.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_flood_from_many_addresses_meets_the_global_cap() {
        let cfg = LogConfig::default();
        let gate = LogGate::new(&cfg, Arc::new(Metrics::default()));
        let t0 = Instant::now();
        let written = (0..10_000u32)
            .filter(|i| gate.admit(IpAddr::from(i.to_be_bytes()), t0).is_some())
            .count();
        assert_eq!(written, cfg.client_lines_max_per_s as usize);
        let off = LogConfig {
            client_lines_per_s: 0,
            client_lines_max_per_s: 0,
            ..cfg
        };
        let gate = LogGate::new(&off, Arc::new(Metrics::default()));
        let a = "203.0.113.7".parse().unwrap();
        assert!((0..1_000).all(|_| gate.admit(a, t0).is_some()), "no limit");
    }
}
