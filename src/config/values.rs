//! Parsed configuration values that other modules share: addresses and
//! networks, the forwarding header, browser origins and the JWKS URL. Each
//! parses from the text an operator writes and is checked by `validate()`.

use std::net::IpAddr;
use std::str::FromStr;

use http::Uri;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`; a bare
/// address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has a bad prefix length"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is inside the network (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, everything else unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Which request header carries the client's address, when the immediate
/// peer is a trusted proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// Read none.
    #[default]
    None,
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// A normalised `Origin`: scheme, host and port, compared exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses `scheme://host[:port]` (no path, no user info). The default
    /// port of `http`/`ws` (80) and `https`/`wss` (443) is filled in.
    pub fn parse(text: &str) -> Option<Self> {
        let (scheme, rest) = text.split_once("://")?;
        let valid_scheme = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid_scheme || rest.contains(['/', '?', '#', '@']) {
            return None;
        }
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" | "ws" => 80,
            "https" | "wss" => 443,
            _ => 0,
        };
        let (host, port) = split_host_port(rest, default_port)?;
        Some(Self { scheme, host, port })
    }

    /// Whether this is `https://` + the `Host` header's value (port 443
    /// when the header names none): the page the gateway itself served.
    pub fn is_https_host(&self, host_header: &str) -> bool {
        self.scheme == "https"
            && split_host_port(host_header, 443)
                .is_some_and(|(host, port)| host == self.host && port == self.port)
    }
}

/// Splits `host[:port]`, `[v6]` or `[v6]:port`; lowercases the host.
fn split_host_port(text: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{v6}]"), port)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (text.to_owned(), None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// A checked `https://` JWKS URL, split for connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    /// The URL without its query and fragment, for logs and errors: a
    /// query may carry a credential (`?api_key=`), so it is never shown.
    pub text: String,
    /// Host without IPv6 brackets: what is resolved and named in SNI.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written: the `Host` header.
    pub authority: String,
    /// Path and query: the request target.
    pub target: String,
}

impl JwksUrl {
    /// Parses `https://host[:port]/path[?query]`.
    ///
    /// # Errors
    /// Another scheme (plain `http` included), user info, or no host.
    pub fn parse(configured: &str) -> Result<Self, String> {
        let text = configured.split(['?', '#']).next().unwrap_or(configured);
        let uri: Uri = configured
            .parse()
            .map_err(|e| format!("{text:?} is not a URL ({e})"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{text:?} must be an https:// URL"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?} names no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{text:?} must not carry user info"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() || ServerName::try_from(host.as_str()).is_err() {
            return Err(format!("{text:?} names no valid host"));
        }
        Ok(Self {
            text: text.to_owned(),
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            target: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwks_url_is_shown_without_its_query() {
        let url = JwksUrl::parse("https://id.example.com/certs?api_key=s3cret#x").unwrap();
        assert_eq!(url.text, "https://id.example.com/certs");
        assert_eq!(url.target, "/certs?api_key=s3cret", "still requested");
        let err = JwksUrl::parse("https://u@id.example.com/c?api_key=s3cret").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn origins_normalise() {
        let o = Origin::parse("HTTPS://Example.COM").unwrap();
        assert_eq!(o, Origin::parse("https://example.com:443").unwrap());
        assert_ne!(o, Origin::parse("http://example.com").unwrap());
        assert_ne!(o, Origin::parse("https://example.com:8443").unwrap());
        assert_eq!(Origin::parse("https://[::1]:8443").unwrap().host, "[::1]");
        for bad in [
            "null",
            "example.com",
            "https://",
            "https://a/b",
            "https://u@a",
            "https://a:x",
        ] {
            assert!(Origin::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn urls_must_be_https_with_a_host() {
        let u = JwksUrl::parse("https://id.example.com/realms/x/certs?v=1").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.authority.as_str(),
                u.target.as_str()
            ),
            (
                "id.example.com",
                443,
                "id.example.com",
                "/realms/x/certs?v=1"
            )
        );
        let u = JwksUrl::parse("https://[::1]:8443").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("::1", 8443, "/")
        );
        for bad in [
            "http://id.example.com/jwks",
            "ftp://id.example.com/",
            "https://user:pw@id.example.com/",
            "/just/a/path",
            "https://",
            "not a url",
        ] {
            assert!(JwksUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
