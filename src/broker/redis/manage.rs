//! Management between replicas (the HTTP API's disconnect, revoke,
//! unsubscribe and channels: a request on a control channel, answers in a
//! reply list) and idempotency keys, in Redis.

use std::sync::PoisonError;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

use super::RedisBroker;
use crate::broker::{BrokerError, IDEMPOTENCY_TTL, Reserved};

/// Management requests queued for the core before new ones are dropped.
pub(super) const CONTROL_QUEUE: usize = 1024;

/// The pub/sub channel of management requests between replicas.
pub(super) fn control_topic(prefix: &str) -> String {
    format!("{prefix}:control")
}

/// The value of an idempotency key while its publication is under way.
const PENDING: &str = "\u{1}pending";

impl RedisBroker {
    /// The management requests of other replicas (once: the core takes it).
    pub(in crate::broker) fn take_control(&self) -> Option<mpsc::Receiver<String>> {
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Sends a management request to every replica (this one included);
    /// returns how many received it.
    pub(in crate::broker) async fn broadcast_control(
        &self,
        payload: &str,
    ) -> Result<usize, BrokerError> {
        let mut conn = self.command_conn()?;
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(control_topic(&self.prefix)).arg(payload);
        match tokio::time::timeout(self.timeout, cmd.query_async::<usize>(&mut conn)).await {
            Ok(Ok(n)) => Ok(n),
            _ => Err(BrokerError::Unavailable),
        }
    }

    /// Answers a management request: appends to its reply list.
    pub(in crate::broker) async fn reply_control(&self, reply: &str, answer: &str) {
        let Ok(mut conn) = self.command_conn() else {
            return;
        };
        let key = format!("{}:reply:{reply}", self.prefix);
        let mut pipe = redis::pipe();
        pipe.rpush(&key, answer).ignore().expire(&key, 60).ignore();
        let _ = tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await;
    }

    /// Up to `n` answers to request `reply`, waiting at most `wait`.
    pub(in crate::broker) async fn collect_replies(
        &self,
        reply: &str,
        n: usize,
        wait: Duration,
    ) -> Vec<String> {
        let key = format!("{}:reply:{reply}", self.prefix);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let got: Vec<String> = match self.command_conn() {
                Ok(mut conn) => {
                    let mut cmd = redis::cmd("LRANGE");
                    cmd.arg(&key).arg(0).arg(-1);
                    tokio::time::timeout(self.timeout, cmd.query_async(&mut conn))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default()
                }
                Err(_) => Vec::new(),
            };
            // Polled rather than BLPOP: the command connection is shared.
            if got.len() >= n || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `SET NX` of an idempotency key (a placeholder until the answer);
    /// an existing key's value is the answer, or the placeholder.
    pub(in crate::broker) async fn reserve_key(&self, key: &str) -> Result<Reserved, BrokerError> {
        let mut conn = self.command_conn()?;
        let name = format!("{}:idem:{key}", self.prefix);
        let ttl = IDEMPOTENCY_TTL.as_secs();
        let set: Option<String> = tokio::time::timeout(
            self.timeout,
            redis::cmd("SET")
                .arg(&name)
                .arg(PENDING)
                .arg("NX")
                .arg("EX")
                .arg(ttl)
                .arg("GET")
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| BrokerError::Unavailable)?
        .map_err(|e| {
            debug!(error = %e, "idempotency key through redis failed");
            BrokerError::Unavailable
        })?;
        Ok(match set {
            None => Reserved::New,
            Some(v) if v == PENDING => Reserved::Pending,
            Some(answer) => Reserved::Done(answer),
        })
    }

    /// Stores the answer for a reserved key, or deletes it (`None`).
    pub(in crate::broker) async fn complete_key(&self, key: &str, answer: Option<&str>) {
        let Ok(mut conn) = self.command_conn() else {
            return;
        };
        let name = format!("{}:idem:{key}", self.prefix);
        let cmd = match answer {
            Some(answer) => {
                let mut c = redis::cmd("SET");
                c.arg(&name)
                    .arg(answer)
                    .arg("XX")
                    .arg("EX")
                    .arg(IDEMPOTENCY_TTL.as_secs());
                c
            }
            None => {
                let mut c = redis::cmd("DEL");
                c.arg(&name);
                c
            }
        };
        let done =
            tokio::time::timeout(self.timeout, cmd.query_async::<redis::Value>(&mut conn)).await;
        if !matches!(done, Ok(Ok(_))) {
            // The placeholder expires with the key's TTL.
            debug!("recording an idempotency answer in redis failed");
        }
    }

    /// `ZADD` of a revocation, scored by its time; older ones than `ttl_s`
    /// are trimmed, and the set expires when no revocation is recent.
    pub(in crate::broker) async fn store_revocation(
        &self,
        user: &str,
        at: u64,
        ttl_s: u64,
    ) -> Result<(), BrokerError> {
        let mut conn = self.command_conn()?;
        let key = format!("{}:revoked", self.prefix);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zadd(&key, user, at)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({}", at.saturating_sub(ttl_s)))
            .ignore()
            .expire(&key, i64::try_from(ttl_s.max(1)).unwrap_or(i64::MAX))
            .ignore();
        match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(BrokerError::Unavailable),
        }
    }

    /// The revocations scored at or after `since`.
    pub(in crate::broker) async fn load_revocations(
        &self,
        since: u64,
    ) -> Option<Vec<(String, u64)>> {
        let mut conn = self.command_conn().ok()?;
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(format!("{}:revoked", self.prefix))
            .arg(since)
            .arg("+inf")
            .arg("WITHSCORES");
        let got: Vec<(String, f64)> =
            tokio::time::timeout(self.timeout, cmd.query_async(&mut conn))
                .await
                .ok()?
                .ok()?;
        Some(
            got.into_iter()
                .map(|(user, at)| (user, at as u64))
                .collect(),
        )
    }
}
