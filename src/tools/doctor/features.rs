//! Reviews of the version 1.1 features: `[history]` and the HTTP API.

use super::{Findings, Level};
use crate::config::Config;

/// `[api]`: where the HTTP API listens, and whether tokens cross a
/// network in clear text.
pub(super) fn check_api(config: &Config, out: &mut Findings) {
    let api = &config.api;
    let Some(addr) = api.listen else {
        out.push(Level::Ok, "api.listen", "the HTTP API is off");
        return;
    };
    let ip = addr.ip();
    let private = match ip {
        std::net::IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unique_local() || v6.is_unicast_link_local()
        }
    };
    if ip.is_unspecified() || !private {
        out.push(
            Level::Warning,
            "api.listen",
            format!(
                "{addr} is reachable beyond a private network: the API publishes into every \
                 channel its tokens allow and manages sessions; listen on an internal address"
            ),
        );
    }
    if api.plain_http && !ip.is_loopback() {
        out.push(
            Level::Warning,
            "api.plain_http",
            format!("API tokens reach {addr} in clear text: keep TLS, or a TLS-terminating proxy on the same host"),
        );
    } else if api.plain_http {
        out.push(Level::Note, "api.plain_http", "plain HTTP on loopback only");
    } else if !ip.is_unspecified() && private {
        out.push(Level::Ok, "api.listen", format!("TLS on {addr}"));
    }
}

/// `[history]`: patterns that compile, and a replay that fits the outbox.
pub(super) fn check_history(config: &Config, out: &mut Findings) {
    let h = &config.history;
    let outbox = config.websocket.outbox_frames;
    if let Err(e) = crate::history::HistoryRules::compile(h, outbox) {
        out.push(Level::Error, "history.channels", e);
        return;
    }
    if h.channels.is_empty() {
        out.push(Level::Ok, "history.channels", "no channel keeps history");
        return;
    }
    if h.max_replay + 2 > outbox {
        out.push(
            Level::Note,
            "history.max_replay",
            format!(
                "{} is capped at websocket.outbox_frames - 2 = {}, so a replay fits in the outbox",
                h.max_replay,
                outbox.saturating_sub(2)
            ),
        );
    }
    let patterns: Vec<&str> = h.channels.iter().map(|r| r.pattern.as_str()).collect();
    out.push(
        Level::Ok,
        "history.channels",
        format!(
            "{} keep history, {} MiB at most in all",
            patterns.join(", "),
            h.max_bytes / (1024 * 1024)
        ),
    );
}

/// `[presence]`: patterns that compile, and a grace that a reconnect can
/// use (with Redis, a time-to-live the grace fits in).
pub(super) fn check_presence(config: &Config, out: &mut Findings) {
    let p = &config.presence;
    if let Err(e) = crate::presence::PresenceRules::compile(p) {
        out.push(Level::Error, "presence.channels", e);
        return;
    }
    if p.channels.is_empty() {
        out.push(Level::Ok, "presence.channels", "no channel keeps presence");
        return;
    }
    if p.grace_ms == 0 {
        out.push(
            Level::Note,
            "presence.grace_ms",
            "0: every reconnect is a leave and a join for everyone watching",
        );
    }
    let clustered = config.cluster.redis_url.is_some();
    if clustered && p.grace_ms / 1000 >= p.ttl_s {
        out.push(
            Level::Note,
            "presence.ttl_s",
            format!(
                "{} s is not above the grace ({} ms): a crashed replica's members may leave before a drained one's",
                p.ttl_s, p.grace_ms
            ),
        );
    }
    out.push(
        Level::Ok,
        "presence.channels",
        format!(
            "{} keep presence; users listed up to {} members, leave after {} ms{}",
            p.channels.join(", "),
            p.max_listed,
            p.grace_ms,
            if clustered {
                format!(", a crashed replica's members gone within {} s", p.ttl_s)
            } else {
                String::new()
            }
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_findings(listen: &str, plain_http: bool) -> Vec<(Level, String)> {
        let mut config = Config::default();
        config.api.listen = Some(listen.parse().unwrap());
        config.api.plain_http = plain_http;
        let mut out = Findings::default();
        check_api(&config, &mut out);
        out.0
            .into_iter()
            .map(|f| (f.level, format!("{}: {}", f.key, f.message)))
            .collect()
    }

    #[test]
    fn the_api_on_a_public_address_or_in_clear_text_is_a_warning() {
        let warnings =
            |f: &[(Level, String)]| f.iter().filter(|(l, _)| *l == Level::Warning).count();
        assert_eq!(warnings(&api_findings("10.0.0.5:8444", false)), 0);
        assert_eq!(
            warnings(&api_findings("127.0.0.1:8444", true)),
            0,
            "loopback: a note"
        );
        assert_eq!(warnings(&api_findings("0.0.0.0:8444", false)), 1);
        assert_eq!(warnings(&api_findings("203.0.113.7:8444", false)), 1);
        let both = api_findings("203.0.113.7:8444", true);
        assert_eq!(warnings(&both), 2, "{both:?}");
        assert!(both.iter().any(|(_, m)| m.starts_with("api.plain_http: ")));
    }

    #[test]
    fn presence_patterns_are_checked_and_a_zero_grace_is_noted() {
        let findings = |tweak: &dyn Fn(&mut Config)| {
            let mut config = Config::default();
            tweak(&mut config);
            let mut out = Findings::default();
            check_presence(&config, &mut out);
            out.0
                .into_iter()
                .map(|f| (f.level, f.key.to_owned()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            findings(&|_| {}),
            [(Level::Ok, "presence.channels".to_owned())]
        );
        assert_eq!(
            findings(&|c| c.presence.channels = vec!["u:{sub}".into()]),
            [(Level::Error, "presence.channels".to_owned())]
        );
        assert!(
            findings(&|c| c.presence.grace_ms = 0)
                .contains(&(Level::Note, "presence.grace_ms".to_owned()))
        );
    }
}
