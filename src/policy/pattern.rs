//! Channel patterns: `:`-separated tokens where `*` is exactly one token,
//! a final `>` is one or more tokens, and `{sub}` / `{claim.NAME}` are
//! filled from the verified token. Compiled once at load; matching does
//! no parsing and no allocation.

use std::fmt;

use crate::channel::{ChannelName, MAX_LEN, is_token};
use crate::identity::Identity;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// `*`: exactly one token.
    One,
    /// `{sub}`: the user id, when it is exactly one valid token.
    Sub,
    /// `{claim.NAME}`: a string or integer claim forming one valid token.
    Claim(Box<str>),
}

/// A compiled channel pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Box<[Segment]>,
    /// A final `>`: one or more further tokens.
    tail: bool,
    source: Box<str>,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.source)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Pattern {
    /// Compiles a pattern.
    ///
    /// # Errors
    /// A description of what is wrong with it.
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.is_empty() || source.len() > MAX_LEN {
            return Err("a pattern must be 1 to 255 bytes".into());
        }
        let tokens: Vec<&str> = source.split(':').collect();
        let last = tokens.len() - 1;
        let mut segments = Vec::with_capacity(tokens.len());
        let mut tail = false;
        for (i, token) in tokens.iter().enumerate() {
            let segment = match *token {
                "" => return Err(format!("pattern {source:?} has an empty token")),
                "*" => Segment::One,
                ">" if i == last => {
                    tail = true;
                    continue;
                }
                ">" => return Err(format!("in {source:?}, `>` may only be the last token")),
                "{sub}" => Segment::Sub,
                t if t.starts_with("{claim.") && t.ends_with('}') => {
                    let name = &t["{claim.".len()..t.len() - 1];
                    let valid = !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
                    if !valid {
                        return Err(format!(
                            "in {source:?}, {t:?} is not a valid claim template"
                        ));
                    }
                    Segment::Claim(name.into())
                }
                t if is_token(t) => Segment::Literal(t.into()),
                t => {
                    return Err(format!(
                        "in {source:?}, {t:?} is neither a token, `*`, `>`, {{sub}} nor {{claim.NAME}}"
                    ));
                }
            };
            segments.push(segment);
        }
        Ok(Self {
            segments: segments.into_boxed_slice(),
            tail,
            source: source.into(),
        })
    }

    /// Whether `channel` matches for this `identity`.
    pub fn matches(&self, channel: &ChannelName, identity: &Identity) -> bool {
        self.matches_for(channel, Some(identity))
    }

    /// Whether `channel` matches for nobody in particular: a template
    /// never does.
    pub fn matches_channel(&self, channel: &ChannelName) -> bool {
        self.matches_for(channel, None)
    }

    /// Whether the pattern holds `{sub}` or `{claim.NAME}`.
    pub fn has_templates(&self) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Sub | Segment::Claim(_)))
    }

    fn matches_for(&self, channel: &ChannelName, identity: Option<&Identity>) -> bool {
        let mut tokens = channel.tokens();
        for segment in &*self.segments {
            let Some(token) = tokens.next() else {
                return false;
            };
            let ok = match segment {
                Segment::Literal(l) => **l == *token,
                Segment::One => true,
                Segment::Sub => identity.is_some_and(|i| template_matches(&i.user, token)),
                Segment::Claim(name) => identity
                    .and_then(|i| i.claims.get(&**name))
                    .and_then(super::claim_text)
                    .is_some_and(|v| template_matches(&v, token)),
            };
            if !ok {
                return false;
            }
        }
        // A final `>` needs at least one more token; otherwise none may remain.
        tokens.next().is_some() == self.tail
    }
}

/// A template value matches only when it is exactly one valid token, so a
/// `sub` such as `a:b`, `*` or `>` can never widen a pattern.
fn template_matches(value: &str, token: &str) -> bool {
    is_token(value) && value == token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(user: &str, claims: serde_json::Value) -> Identity {
        Identity {
            issued_at: None,
            user: user.into(),
            roles: vec![],
            expires_at: 0,
            claims: claims.as_object().cloned().unwrap_or_default(),
        }
    }

    fn m(pattern: &str, channel: &str, who: &Identity) -> bool {
        Pattern::parse(pattern)
            .unwrap()
            .matches(&ChannelName::parse(channel).unwrap(), who)
    }

    #[test]
    fn wildcards() {
        let a = id("alice", serde_json::json!({}));
        assert!(m("chat:*", "chat:lobby", &a));
        assert!(!m("chat:*", "chat", &a));
        assert!(!m("chat:*", "chat:a:b", &a));
        assert!(m("chat:>", "chat:a", &a));
        assert!(m("chat:>", "chat:a:b:c", &a));
        assert!(!m("chat:>", "chat", &a));
        assert!(m(">", "anything:at:all", &a));
        assert!(m("*:x:*", "a:x:b", &a));
        assert!(!m("chat", "chat:x", &a));
        assert!(m("chat", "chat", &a));
    }

    #[test]
    fn templates_fill_only_single_tokens() {
        let a = id(
            "alice",
            serde_json::json!({"tenant": "acme", "n": 7, "bad": "x:y"}),
        );
        assert!(m("user:{sub}", "user:alice", &a));
        assert!(!m("user:{sub}", "user:bob", &a));
        assert!(m("t:{claim.tenant}:>", "t:acme:chat:1", &a));
        assert!(m("n:{claim.n}", "n:7", &a));
        assert!(!m("b:{claim.bad}", "b:x", &a));
        assert!(!m("m:{claim.missing}", "m:x", &a));
        for evil in ["a:b", "*", ">", "a b", ""] {
            let e = id(evil, serde_json::json!({}));
            for channel in ["user:a", "user:a:b", "user:x", "user:*"] {
                if let Ok(c) = ChannelName::parse(channel) {
                    assert!(
                        !Pattern::parse("user:{sub}").unwrap().matches(&c, &e),
                        "{evil} {channel}"
                    );
                    assert!(
                        !Pattern::parse("user:{sub}:>").unwrap().matches(&c, &e),
                        "{evil} {channel}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "a::b",
            "a:>:b",
            "a*",
            "{subx}",
            "{claim.}",
            "{claim.a b}",
            "a:{sub",
            "é",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    /// The obvious recursive matcher over token lists, to hold the
    /// compiled one to.
    fn reference(pattern: &[&str], channel: &[&str], sub: &str) -> bool {
        match (pattern.first(), channel.first()) {
            (Some(&">"), _) => pattern.len() == 1 && !channel.is_empty(),
            (None, None) => true,
            (Some(p), Some(c)) => {
                let token_ok = match *p {
                    "*" => true,
                    "{sub}" => is_token(sub) && sub == *c,
                    literal => literal == *c,
                };
                token_ok && reference(&pattern[1..], &channel[1..], sub)
            }
            _ => false,
        }
    }

    proptest::proptest! {
        #[test]
        fn compiled_matcher_agrees_with_reference(
            pattern in proptest::collection::vec(
                proptest::sample::select(vec!["a", "b", "ab", "*", ">", "{sub}"]), 1..5),
            channel in proptest::collection::vec(
                proptest::sample::select(vec!["a", "b", "ab", "x"]), 1..5),
            sub in proptest::sample::select(vec!["a", "b", "ab", "a:b", "*", ">", "a b", ""]),
        ) {
            let source = pattern.join(":");
            let valid = !pattern[..pattern.len() - 1].contains(&">");
            let compiled = Pattern::parse(&source);
            proptest::prop_assert_eq!(compiled.is_ok(), valid, "{}", source);
            if let Ok(compiled) = compiled {
                let name = ChannelName::parse(&channel.join(":")).unwrap();
                let who = id(sub, serde_json::json!({}));
                proptest::prop_assert_eq!(
                    compiled.matches(&name, &who),
                    reference(&pattern, &channel, sub),
                    "{} vs {} as {:?}", source, name, sub
                );
            }
        }
    }
}
