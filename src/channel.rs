//! Channel names (`protocol.md` §3), parsed once at the edge into a
//! [`ChannelName`] so nothing inward handles raw strings.

use std::fmt;
use std::sync::Arc;

/// Longest channel name, in bytes.
pub const MAX_LEN: usize = 255;

/// A valid channel name: 1–255 bytes of tokens of `[A-Za-z0-9_.@=+-]`
/// separated by `:`. Cheap to clone (shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name must be 1 to 255 bytes")]
    Length,
    #[error("channel name has an empty token")]
    EmptyToken,
    #[error("channel name may only hold A-Z a-z 0-9 _ . @ = + - and : between tokens")]
    Character,
}

/// Whether `b` may appear inside a token.
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'=' | b'+' | b'-')
}

/// Whether `s` is exactly one valid token (what a template value must be).
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LEN && s.bytes().all(is_token_byte)
}

impl ChannelName {
    /// Parses a concrete channel name.
    ///
    /// # Errors
    /// A length outside 1–255, an empty token, or a disallowed byte.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        if name.is_empty() || name.len() > MAX_LEN {
            return Err(ChannelError::Length);
        }
        for token in name.split(':') {
            if token.is_empty() {
                return Err(ChannelError::EmptyToken);
            }
            if !token.bytes().all(is_token_byte) {
                return Err(ChannelError::Character);
            }
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `:`-separated tokens.
    pub fn tokens(&self) -> std::str::Split<'_, char> {
        self.0.split(':')
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_names() {
        for ok in [
            "chat",
            "chat:lobby",
            "user:alice@example.com",
            "a=b+c-d_e.f",
            "x:y:z",
        ] {
            assert!(ChannelName::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(ChannelName::parse(""), Err(ChannelError::Length));
        assert_eq!(
            ChannelName::parse(&"a".repeat(256)),
            Err(ChannelError::Length)
        );
        assert!(ChannelName::parse(&"a".repeat(255)).is_ok());
        for bad in [":a", "a:", "a::b"] {
            assert_eq!(
                ChannelName::parse(bad),
                Err(ChannelError::EmptyToken),
                "{bad}"
            );
        }
        for bad in ["a b", "chat:*", "chat:>", "é", "a/b", "a{b}"] {
            assert_eq!(
                ChannelName::parse(bad),
                Err(ChannelError::Character),
                "{bad}"
            );
        }
    }
}
