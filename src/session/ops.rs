//! What a session does with each client frame: decode it, answer `ping`
//! and `refresh` itself, and take `subscribe`, `unsubscribe` and `publish`
//! to the gateway core. Replies go through the session's own outbox, so
//! they keep their place among the messages it receives.

use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::close::CloseReason;
use super::{Session, expiry_instant};
use crate::channel::ChannelName;
use crate::gateway::{Caller, CoreError, SubscribeOptions};
use crate::hub::Subscriber;
use crate::protocol::{self, ClientFrame, ErrorCode, PositionOk, PresenceOk, ServerFrame};

/// Consecutive frames that are not JSON objects before closing with 1008.
const MAX_BAD_FRAMES: u32 = 8;

impl Session<'_> {
    /// Queues a reply behind the messages already in the outbox, so a
    /// client sees them in the order things happened (nothing from a
    /// channel after its `unsubscribe` ok). A full outbox means the client
    /// is not reading: it is cut off like any slow reader.
    fn reply(&mut self, frame: &ServerFrame<'_>) {
        self.reply_text(frame.encode());
    }

    fn reply_text(&mut self, text: String) {
        self.subscriber().send(Utf8Bytes::from(text));
    }

    /// This session as a hub subscriber, creating the outbox on first use.
    fn subscriber(&mut self) -> &Subscriber {
        let (new_outbox, slow) = (&mut self.new_outbox, &self.slow);
        let (number, depth) = (self.ctx.number, self.gateway.config.websocket.outbox_frames);
        self.subscriber.get_or_insert_with(|| {
            let (outbox, rx) = mpsc::channel(depth);
            *new_outbox = Some(rx);
            Subscriber {
                session: number,
                outbox,
                slow: slow.clone(),
            }
        })
    }

    fn ok(&mut self, id: Option<u64>) {
        if let Some(id) = id {
            self.reply(&ServerFrame::Ok { id });
        }
    }

    fn error(
        &mut self,
        id: Option<u64>,
        code: ErrorCode,
        message: &str,
        channel: Option<&ChannelName>,
    ) {
        self.reply(&ServerFrame::Error {
            id,
            code,
            message,
            channel: channel.map(ChannelName::as_str),
        });
    }

    fn core_error(&mut self, id: Option<u64>, e: CoreError, channel: &ChannelName) {
        self.error(id, e.code(), &e.to_string(), Some(channel));
    }

    /// Handles one text frame, queueing its replies in the outbox; returns
    /// a reason to close when the frame ends the session.
    pub(super) async fn handle(&mut self, text: &str) -> Option<CloseReason> {
        let frame = match protocol::decode(text) {
            Ok(frame) => frame,
            Err(e) => {
                if e.is_object {
                    self.bad_frames = 0;
                } else {
                    self.bad_frames += 1;
                    if self.bad_frames >= MAX_BAD_FRAMES {
                        return Some(CloseReason::BadFrames);
                    }
                }
                self.error(e.id, ErrorCode::BadRequest, &e.message, None);
                return None;
            }
        };
        self.bad_frames = 0;
        match frame {
            ClientFrame::Ping { id } => self.reply(&ServerFrame::Pong { id }),
            ClientFrame::Subscribe {
                id,
                channel,
                since,
                presence,
            } => {
                let options = SubscribeOptions {
                    id,
                    since: since.as_ref(),
                    presence,
                };
                self.subscribe(id, &channel, options).await;
            }
            ClientFrame::History { id, channel, limit } => {
                return self.history(id, &channel, limit).await;
            }
            ClientFrame::Unsubscribe { id, channel } => {
                let gateway = self.gateway;
                if gateway.unsubscribe(&mut self.subscriptions, self.ctx.number, &channel) {
                    self.ok(id);
                } else {
                    self.error(
                        id,
                        ErrorCode::NotSubscribed,
                        "not subscribed",
                        Some(&channel),
                    );
                }
            }
            ClientFrame::Publish { id, channel, data } => {
                return self.publish(id, &channel, data).await;
            }
            ClientFrame::Refresh { id, token } => self.refresh(id, &token),
            ClientFrame::Presence { id, channel } => {
                return self.presence(id, &channel).await;
            }
        }
        None
    }

    async fn subscribe(
        &mut self,
        id: Option<u64>,
        channel: &ChannelName,
        options: SubscribeOptions<'_>,
    ) {
        self.subscriber();
        let Some(subscriber) = &self.subscriber else {
            return;
        };
        let caller = Caller {
            identity: &self.ctx.identity,
            policy: &self.policy,
        };
        let subscribed = self
            .gateway
            .subscribe(
                &mut self.subscriptions,
                subscriber,
                caller,
                channel,
                options,
            )
            .await;
        if let Err(e) = subscribed {
            self.core_error(id, e, channel);
        }
    }

    /// Takes one token of the connection's request budget; a connection
    /// that keeps asking past it is closed (4008).
    fn spend(
        &mut self,
        id: Option<u64>,
        channel: &ChannelName,
        what: &str,
    ) -> Result<bool, CloseReason> {
        let rate = self.rate;
        if self.bucket.take(rate, Instant::now().into_std()).is_ok() {
            self.strikes = 0;
            return Ok(true);
        }
        self.strikes += 1;
        if self.strikes >= self.gateway.config.limits.rate_limit_strikes {
            return Err(CloseReason::RateLimited);
        }
        self.error(id, ErrorCode::RateLimited, what, Some(channel));
        Ok(false)
    }

    /// [`Session::spend`] for a request handler: `Err` holds what the
    /// handler returns when no token was left (a close, or nothing more).
    fn spend_or_end(
        &mut self,
        id: Option<u64>,
        channel: &ChannelName,
        what: &str,
    ) -> Result<(), Option<CloseReason>> {
        match self.spend(id, channel, what) {
            Err(reason) => Err(Some(reason)),
            Ok(false) => Err(None),
            Ok(true) => Ok(()),
        }
    }

    /// Who this session acts for, judged by its policy snapshot.
    fn caller(&self) -> Caller<'_> {
        Caller {
            identity: &self.ctx.identity,
            policy: &self.policy,
        }
    }

    /// `history`: the last messages of a channel in one `ok`. It costs a
    /// token of the same budget as `publish`.
    async fn history(
        &mut self,
        id: Option<u64>,
        channel: &ChannelName,
        limit: usize,
    ) -> Option<CloseReason> {
        if let Err(end) = self.spend_or_end(id, channel, "request rate exceeded") {
            return end;
        }
        match self.gateway.history(self.caller(), channel, limit).await {
            Ok((position, frames)) => {
                if let Some(id) = id {
                    let ok = PositionOk::new(id, Some((&position.epoch, position.seq)), None)
                        .with_messages(channel, frames.iter().map(Utf8Bytes::as_str));
                    self.reply_text(ok);
                }
            }
            Err(e) => self.core_error(id, e, channel),
        }
        None
    }

    /// `presence`: who is in a channel, in one `ok`. It costs a token of
    /// the same budget as `publish`.
    async fn presence(&mut self, id: Option<u64>, channel: &ChannelName) -> Option<CloseReason> {
        if let Err(end) = self.spend_or_end(id, channel, "request rate exceeded") {
            return end;
        }
        match self.gateway.presence(self.caller(), channel).await {
            Ok(listing) => {
                if let Some(id) = id {
                    let ok = PresenceOk::new(id, listing.count, listing.users.as_deref());
                    self.reply_text(ok.encode());
                }
            }
            Err(e) => self.core_error(id, e, channel),
        }
        None
    }

    async fn publish(
        &mut self,
        id: Option<u64>,
        channel: &ChannelName,
        data: &RawValue,
    ) -> Option<CloseReason> {
        if let Err(end) = self.spend_or_end(id, channel, "publish rate exceeded") {
            return end;
        }
        // The ok is encoded up front: the core has it queued the moment
        // the publication is certain, which may be before its own echo.
        // Fire-and-forget publishing (no id) never creates an outbox.
        let ok = id.map(|id| Utf8Bytes::from(ServerFrame::Ok { id }.encode()));
        if ok.is_some() {
            self.subscriber();
        }
        let subscriber = self.subscriber.as_ref();
        let caller = Caller {
            identity: &self.ctx.identity,
            policy: &self.policy,
        };
        let accepted = move || {
            if let (Some(ok), Some(subscriber)) = (ok, subscriber) {
                subscriber.send(ok);
            }
        };
        if let Err(e) = self.gateway.publish(caller, channel, data, accepted).await {
            self.core_error(id, e, channel);
        }
        None
    }

    fn refresh(&mut self, id: Option<u64>, token: &str) {
        if token.len() > self.gateway.config.auth.max_token_bytes {
            return self.error(id, ErrorCode::InvalidToken, "token too large", None);
        }
        // No waiting inside the session loop: an unknown kid starts a JWKS
        // refresh in the background and the client may retry.
        let identity = match self.gateway.verifier.verify_now(token) {
            Ok(identity) if identity.has_audience(&self.gateway.config.api.audience) => {
                return self.error(
                    id,
                    ErrorCode::InvalidToken,
                    &crate::auth::AuthFailure::Audience.to_string(),
                    None,
                );
            }
            Ok(identity) if self.gateway.is_revoked(&identity) => {
                return self.error(
                    id,
                    ErrorCode::InvalidToken,
                    &crate::auth::AuthFailure::Revoked.to_string(),
                    None,
                );
            }
            Ok(identity) => identity,
            Err(failure) => {
                return self.error(id, ErrorCode::InvalidToken, &failure.to_string(), None);
            }
        };
        if identity.user != self.ctx.identity.user {
            return self.error(
                id,
                ErrorCode::TokenMismatch,
                "the new token names another user",
                None,
            );
        }
        let leeway = Duration::from_secs(self.gateway.config.auth.leeway_s);
        self.new_expiry = Some(expiry_instant(identity.expires_at, leeway));
        self.ctx.identity = identity;
        self.recheck_subscriptions("the refreshed token does not allow this subscription");
        self.ok(id);
    }

    /// Ends a subscription the server withdrew (the HTTP API's
    /// `unsubscribe`), telling the client as a lost permission is told.
    pub(super) fn ended_by_server(&mut self, channel: &ChannelName) {
        let gateway = self.gateway;
        if gateway.unsubscribe(&mut self.subscriptions, self.ctx.number, channel) {
            self.error(
                None,
                ErrorCode::Forbidden,
                "the server ended this subscription",
                Some(channel),
            );
        }
    }

    /// Ends every subscription the current policy and identity no longer
    /// allow, telling the client which.
    pub(super) fn recheck_subscriptions(&mut self, message: &str) {
        let caller = Caller {
            identity: &self.ctx.identity,
            policy: &self.policy,
        };
        let lost = self
            .gateway
            .drop_forbidden(&mut self.subscriptions, self.ctx.number, caller);
        for channel in lost {
            self.error(None, ErrorCode::Forbidden, message, Some(&channel));
        }
    }
}
