//! One token bucket, for every rate limit in the process: connections per
//! address, failed authentications, a session's publications. The caller
//! passes `now`, so the arithmetic is tested without sleeping and one clock
//! reading serves several buckets. A leaf: no other module of ours.

use std::time::Instant;

/// A refill rate and the most tokens a bucket holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_s: f64,
    burst: f64,
}

impl Rate {
    /// `per_s` tokens per second, up to `burst` (at least 1); `None` when
    /// the limit is off (a rate of 0 or less).
    pub fn new(per_s: f64, burst: u32) -> Option<Self> {
        (per_s > 0.0).then(|| Self {
            per_s,
            burst: f64::from(burst.max(1)),
        })
    }
}

/// Tokens left and when they were last counted.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket holding its whole burst.
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_s).min(rate.burst);
        self.last = now;
    }

    /// Takes one token, or says in how many whole seconds (at least 1)
    /// one will be there.
    ///
    /// # Errors
    /// The wait, when the bucket is empty.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), u32> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_s(rate))
        }
    }

    /// Whether a token is there, without taking it.
    ///
    /// # Errors
    /// The whole seconds until one is, at least 1.
    pub fn peek(&mut self, rate: Rate, now: Instant) -> Result<(), u32> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.wait_s(rate))
        }
    }

    /// Whole seconds until a token is available, at least 1.
    fn wait_s(&self, rate: Rate) -> u32 {
        let secs = ((1.0 - self.tokens) / rate.per_s).ceil();
        // `as` saturates: a very slow rate gives u32::MAX, never a wrap.
        (secs as u32).max(1)
    }

    /// Whether the bucket has refilled to its burst by `now`.
    pub fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        b.tokens >= rate.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let rate = Rate::new(10.0, 3).unwrap();
        let t = Instant::now();
        let mut b = Bucket::full(rate, t);
        assert!(b.take(rate, t).is_ok() && b.take(rate, t).is_ok() && b.take(rate, t).is_ok());
        assert_eq!(b.take(rate, t), Err(1));
        let t = t + Duration::from_millis(100);
        assert!(b.take(rate, t).is_ok());
        assert!(b.take(rate, t).is_err());
        let t = t + Duration::from_secs(10);
        assert!(b.is_full(rate, t));
        for _ in 0..3 {
            assert!(b.take(rate, t).is_ok());
        }
        assert!(b.take(rate, t).is_err(), "never more than the burst");
    }

    #[test]
    fn the_wait_is_whole_seconds_and_peek_takes_nothing() {
        // 2 per minute: an empty bucket has its next token in 30 s.
        let rate = Rate::new(2.0 / 60.0, 2).unwrap();
        let t = Instant::now();
        let mut b = Bucket::full(rate, t);
        assert!(b.peek(rate, t).is_ok());
        assert!(b.take(rate, t).is_ok() && b.take(rate, t).is_ok());
        assert_eq!(b.peek(rate, t), Err(30));
        assert_eq!(b.peek(rate, t + Duration::from_secs(29)), Err(1));
        assert!(b.peek(rate, t + Duration::from_secs(31)).is_ok());
        assert!(Rate::new(0.0, 5).is_none(), "0 turns the limit off");
    }

    #[test]
    fn a_clock_that_goes_back_adds_nothing() {
        let rate = Rate::new(1.0, 1).unwrap();
        let t = Instant::now() + Duration::from_secs(5);
        let mut b = Bucket::full(rate, t);
        assert!(b.take(rate, t).is_ok());
        assert!(b.take(rate, t - Duration::from_secs(3)).is_err());
    }
}
