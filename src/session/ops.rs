//! What a session does with each client frame: decode it, answer `ping`
//! and `refresh` itself, and take `subscribe`, `unsubscribe` and `publish`
//! to the gateway core. Replies go through the session's own outbox, so
//! they keep their place among the messages it receives.

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::close::CloseReason;
use super::{Session, expiry_instant};
use crate::channel::ChannelName;
use crate::gateway::{Caller, CoreError, Fanout, SubscribeOptions};
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

    /// This session as a hub subscriber.
    fn subscriber(&mut self) -> &Subscriber {
        let (line, slow, number) = (&self.line, &self.slow, self.ctx.number);
        self.subscriber.get_or_insert_with(|| Subscriber {
            session: number,
            line: Arc::clone(line),
            slow: slow.clone(),
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
        // Every request takes a token of the connection's budget, so no op
        // is a free way to make the gateway work.
        let (id, channel) = frame.id_and_channel();
        if let Err(end) = self.spend_or_end(id, channel, "request rate exceeded") {
            return end;
        }
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
            ClientFrame::History { id, channel, limit } => self.history(id, &channel, limit).await,
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
            ClientFrame::Publish { id, channel, data } => self.publish(id, &channel, data).await,
            ClientFrame::Refresh { id, token } => self.refresh(id, &token),
            ClientFrame::Presence { id, channel } => self.presence(id, &channel).await,
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

    /// Takes one token of the connection's request budget (every request,
    /// and every ping or pong frame the client sends); a connection that
    /// keeps asking past it is closed (4008). A request over the budget is
    /// answered `rate_limited`.
    pub(super) fn spend(
        &mut self,
        request: Option<(Option<u64>, Option<&ChannelName>, &str)>,
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
        if let Some((id, channel, what)) = request {
            self.error(id, ErrorCode::RateLimited, what, channel);
        }
        Ok(false)
    }

    /// [`Session::spend`] for a request: `Err` holds what the handler
    /// returns when no token was left (a close, or nothing more).
    fn spend_or_end(
        &mut self,
        id: Option<u64>,
        channel: Option<&ChannelName>,
        what: &str,
    ) -> Result<(), Option<CloseReason>> {
        match self.spend(Some((id, channel, what))) {
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

    /// `history`: the last messages of a channel in one `ok`.
    async fn history(&mut self, id: Option<u64>, channel: &ChannelName, limit: usize) {
        match self.gateway.history(self.caller(), channel, limit).await {
            Ok((position, frames)) => {
                if let Some(id) = id {
                    // The newest messages that fit in half the outbox: one
                    // reply must not cut its own client off.
                    let room = self.gateway.config.websocket.outbox_bytes / 2;
                    let mut used = 0;
                    let keep = frames
                        .iter()
                        .rev()
                        .take_while(|f| {
                            used += f.len();
                            used <= room
                        })
                        .count();
                    let shown = &frames[frames.len() - keep..];
                    let ok = PositionOk::new(id, Some((&position.epoch, position.seq)), None)
                        .with_messages(channel, shown.iter().map(Utf8Bytes::as_str));
                    self.reply_text(ok);
                }
            }
            Err(e) => self.core_error(id, e, channel),
        }
    }

    /// `presence`: who is in a channel, in one `ok`.
    async fn presence(&mut self, id: Option<u64>, channel: &ChannelName) {
        match self.gateway.presence(self.caller(), channel).await {
            Ok(listing) => {
                if let Some(id) = id {
                    let ok = PresenceOk::new(id, listing.count, listing.users.as_deref());
                    self.reply_text(ok.encode());
                }
            }
            Err(e) => self.core_error(id, e, channel),
        }
    }

    async fn publish(&mut self, id: Option<u64>, channel: &ChannelName, data: &RawValue) {
        // Over all of the user's sessions, so many connections do not
        // multiply what one user writes into history and Redis.
        if !self.gateway.spend_user_publish(&self.ctx.identity.user) {
            return self.error(
                id,
                ErrorCode::RateLimited,
                "user publish rate exceeded",
                Some(channel),
            );
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
        if let Err(e) = self
            .gateway
            .publish(caller, channel, data, accepted, Fanout::Inline)
            .await
        {
            self.core_error(id, e, channel);
        }
    }

    fn refresh(&mut self, id: Option<u64>, token: &str) {
        if token.len() > self.gateway.config.auth.max_token_bytes {
            return self.refresh_refused(id, ErrorCode::InvalidToken, "token too large");
        }
        // No waiting inside the session loop: an unknown kid starts a JWKS
        // refresh in the background and the client may retry.
        let refused = match self.gateway.verifier.verify_now(token) {
            Ok(identity) if identity.has_audience(&self.gateway.config.api.audience) => {
                Err(crate::auth::AuthFailure::Audience)
            }
            Ok(identity) if self.gateway.is_revoked(&identity) => {
                Err(crate::auth::AuthFailure::Revoked)
            }
            verified => verified,
        };
        let identity = match refused {
            Ok(identity) => identity,
            Err(failure) => {
                return self.refresh_refused(id, ErrorCode::InvalidToken, &failure.to_string());
            }
        };
        if identity.user != self.ctx.identity.user {
            return self.refresh_refused(
                id,
                ErrorCode::TokenMismatch,
                "the new token names another user",
            );
        }
        let leeway = Duration::from_secs(self.gateway.config.auth.leeway_s);
        self.new_expiry = Some(expiry_instant(identity.expires_at, leeway));
        self.ctx.identity = identity;
        self.recheck_subscriptions("the refreshed token does not allow this subscription");
        self.ok(id);
    }

    /// A refused `refresh`: answered, and counted as a failed
    /// authentication of the client's address, as a refused upgrade is, so
    /// an open connection is no way around that limit.
    fn refresh_refused(&mut self, id: Option<u64>, code: ErrorCode, message: &str) {
        let admission = &self.gateway.admission;
        let key = admission.key(self.ctx.client);
        admission.auth_failed(key, std::time::Instant::now());
        self.error(id, code, message, None);
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
