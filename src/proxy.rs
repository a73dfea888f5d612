//! The client's real address behind a load balancer: the PROXY protocol
//! header (v1 text or v2 binary) that a trusted balancer sends before the
//! TLS handshake, and the `X-Forwarded-For` or `Forwarded` header that a
//! trusted TLS-terminating proxy adds to the upgrade request.
//!
//! Nothing is guessed: a listener either requires a PROXY header on every
//! connection or reads none, and only the one forwarding header the
//! operator names is read, and only when the immediate peer is in
//! `server.trusted_proxies`. Otherwise a client could claim any address
//! and slip past its per-address limits.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::{ForwardedHeader, IpNet, canonical_ip};

/// The proxies whose word about the client's address is believed.
#[derive(Debug, Clone, Default)]
pub struct Trusted(Vec<IpNet>);

impl Trusted {
    /// Parses `server.trusted_proxies`.
    ///
    /// # Errors
    /// The first entry that is not an address or CIDR network.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        list.iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(ip))
    }
}

/// The client's address from the forwarding header of a request whose
/// peer is a trusted proxy: walking from the right (the hop nearest to
/// us), the first address that is not a trusted proxy; when every hop is
/// trusted, the leftmost. An entry that does not parse stops the walk: it
/// was written by the hop to its right, whose own address is then the
/// client's as far as anyone can tell, so that address is the answer
/// (never "no address", which would skip the per-address limits). `None`
/// when nothing can be believed at all (no header, or garbage in the
/// nearest entry): the caller counts the request against the proxy's own
/// address.
pub fn forwarded_client(
    headers: &HeaderMap,
    which: ForwardedHeader,
    trusted: &Trusted,
) -> Option<IpAddr> {
    let name = match which {
        ForwardedHeader::None => return None,
        ForwardedHeader::XForwardedFor => "x-forwarded-for",
        ForwardedHeader::Forwarded => "forwarded",
    };
    // Repeated headers form one list, in order (RFC 9110 §5.3); a value
    // that is not text is one entry that does not parse.
    let mut hops: Vec<Option<&str>> = Vec::new();
    for value in headers.get_all(name) {
        match value.to_str() {
            Ok(value) => hops.extend(value.split(',').map(|element| match which {
                ForwardedHeader::Forwarded => forwarded_for(element),
                _ => Some(element.trim()),
            })),
            Err(_) => hops.push(None),
        }
    }
    let mut nearest = None;
    for hop in hops.into_iter().rev() {
        let Some(ip) = hop.and_then(parse_hop) else {
            return nearest;
        };
        if !trusted.contains(ip) {
            return Some(ip);
        }
        nearest = Some(ip);
    }
    nearest
}

/// The `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("for")
            .then(|| v.trim().trim_matches('"'))
    })
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `::1`,
/// `[::1]` or `[::1]:5678`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical_ip(ip));
    }
    if let Ok(sa) = hop.parse::<SocketAddr>() {
        return Some(canonical_ip(sa.ip()));
    }
    let inner = hop.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .parse::<Ipv6Addr>()
        .ok()
        .map(|ip| canonical_ip(IpAddr::V6(ip)))
}

/// Why a PROXY header was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("connection is not from a trusted proxy")]
    Untrusted,
    #[error("malformed PROXY header")]
    Malformed,
    #[error("PROXY header not received in time")]
    Timeout,
}

impl ProxyError {
    pub fn label(self) -> &'static str {
        match self {
            Self::Untrusted => "untrusted",
            Self::Malformed => "malformed",
            Self::Timeout => "timeout",
        }
    }
}

pub(crate) const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the spec's figure).
pub(crate) const V1_MAX: usize = 107;
/// Longest v2 address block and TLVs we read; HAProxy's TLVs (ALPN, SNI,
/// SSL details) fit easily.
pub(crate) const V2_MAX_LEN: usize = 4096;

/// Reads exactly one PROXY header (v1 or v2) from `io`, leaving the bytes
/// after it (the TLS ClientHello) unread. Returns the source address it
/// carries, or `None` for a `LOCAL` / `UNKNOWN` header (the balancer's own
/// health check: the peer's address stands).
///
/// # Errors
/// [`ProxyError::Malformed`] for anything that is not a valid header.
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut first = [0u8; 1];
    read(io, &mut first).await?;
    match first[0] {
        b'P' => read_v1(io).await,
        b'\r' => read_v2(io).await,
        _ => Err(ProxyError::Malformed),
    }
}

async fn read<R: AsyncRead + Unpin>(io: &mut R, buf: &mut [u8]) -> Result<(), ProxyError> {
    io.read_exact(buf)
        .await
        .map(drop)
        .map_err(|_| ProxyError::Malformed)
}

async fn read_v1<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    // Byte by byte, so not one byte of the TLS stream behind it is taken.
    let mut line = vec![b'P'];
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyError::Malformed);
        }
        read(io, &mut byte).await?;
        line.push(byte[0]);
    }
    let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| ProxyError::Malformed)?;
    parse_v1(text)
}

pub(crate) fn parse_v1(text: &str) -> Result<Option<SocketAddr>, ProxyError> {
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyError::Malformed);
    }
    let family = parts.next().ok_or(ProxyError::Malformed)?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err(ProxyError::Malformed);
    };
    let ip: IpAddr = match family {
        "TCP4" => src.parse::<Ipv4Addr>().map(IpAddr::V4),
        "TCP6" => src.parse::<Ipv6Addr>().map(IpAddr::V6),
        _ => return Err(ProxyError::Malformed),
    }
    .map_err(|_| ProxyError::Malformed)?;
    let port: u16 = sport.parse().map_err(|_| ProxyError::Malformed)?;
    Ok(Some(SocketAddr::new(ip, port)))
}

async fn read_v2<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    let mut head = [0u8; 16];
    head[0] = b'\r';
    read(io, &mut head[1..]).await?;
    if head[..12] != V2_SIGNATURE || head[12] >> 4 != 2 {
        return Err(ProxyError::Malformed);
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::Malformed);
    }
    let mut body = vec![0u8; len];
    read(io, &mut body).await?;
    parse_v2(head[12] & 0x0f, head[13], &body)
}

pub(crate) fn parse_v2(
    command: u8,
    family: u8,
    body: &[u8],
) -> Result<Option<SocketAddr>, ProxyError> {
    match command {
        0 => return Ok(None), // LOCAL: the proxy's own connection
        1 => {}
        _ => return Err(ProxyError::Malformed),
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match family >> 4 {
        // AF_INET: src 4, dst 4, src port 2, dst port 2.
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(8))))
        }
        // AF_INET6: src 16, dst 16, src port 2, dst port 2.
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port(32),
            )))
        }
        // UNSPEC (or AF_UNIX): no usable address; the peer's stands.
        0 | 3 => Ok(None),
        _ => Err(ProxyError::Malformed),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")));
        let host: IpNet = "::1".parse().unwrap();
        assert!(host.contains(ip("::1")) && !host.contains(ip("::2")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")) && !all.contains(ip("::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("example.com".parse::<IpNet>().is_err());
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarded_for_takes_the_rightmost_untrusted_hop() {
        let trusted = Trusted::parse(&["10.0.0.0/8".into()]).unwrap();
        let xff = ForwardedHeader::XForwardedFor;
        // A client-supplied spoof on the left is ignored.
        let h = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.7, 10.0.0.2"]);
        assert_eq!(forwarded_client(&h, xff, &trusted), Some(ip("203.0.113.7")));
        // Repeated headers are one list.
        let h = headers("x-forwarded-for", &["6.6.6.6", "203.0.113.7:4711"]);
        assert_eq!(forwarded_client(&h, xff, &trusted), Some(ip("203.0.113.7")));
        // Only trusted hops: the leftmost one.
        let h = headers("x-forwarded-for", &["10.0.0.5, 10.0.0.2"]);
        assert_eq!(forwarded_client(&h, xff, &trusted), Some(ip("10.0.0.5")));
        // Garbage left of the client's own entry is never reached.
        let h = headers("x-forwarded-for", &["nonsense, 203.0.113.7"]);
        assert_eq!(forwarded_client(&h, xff, &trusted), Some(ip("203.0.113.7")));
        // Garbage nearest to us: nothing to believe (the proxy's address
        // stands); garbage behind a trusted hop: that hop's address.
        let h = headers("x-forwarded-for", &["203.0.113.7, x"]);
        assert_eq!(forwarded_client(&h, xff, &trusted), None);
        let h = headers("x-forwarded-for", &["203.0.113.7, x, 10.0.0.9"]);
        assert_eq!(forwarded_client(&h, xff, &trusted), Some(ip("10.0.0.9")));
        // The other header is not read.
        let h = headers("forwarded", &["for=203.0.113.7"]);
        assert_eq!(forwarded_client(&h, xff, &trusted), None);
        assert_eq!(forwarded_client(&h, ForwardedHeader::None, &trusted), None);
    }

    /// The right-most untrusted hop, written another way: strip the
    /// longest run of parsable trusted hops from the right; the entry
    /// before it is the client if it parses, else the first stripped hop
    /// (or nothing), else, with all stripped, the leftmost.
    pub(crate) fn reference(hops: &[Option<IpAddr>], trusted: &Trusted) -> Option<IpAddr> {
        let stripped = hops
            .iter()
            .rev()
            .take_while(|h| h.is_some_and(|ip| trusted.contains(ip)))
            .count();
        if stripped == hops.len() {
            return hops.first().copied().flatten();
        }
        let before = hops[hops.len() - 1 - stripped];
        before.or_else(|| {
            (stripped > 0)
                .then(|| hops[hops.len() - stripped])
                .flatten()
        })
    }

    #[test]
    fn the_rightmost_untrusted_hop_matches_a_reference_on_random_lists() {
        let trusted = Trusted::parse(&["10.0.0.0/8".into(), "2001:db8::/32".into()]).unwrap();
        let pool: [(&str, Option<IpAddr>); 9] = [
            ("10.0.0.2", Some(ip("10.0.0.2"))),
            ("10.9.9.9:80", Some(ip("10.9.9.9"))),
            ("[2001:db8::1]", Some(ip("2001:db8::1"))),
            ("203.0.113.7", Some(ip("203.0.113.7"))),
            ("[2001:dead::5]:443", Some(ip("2001:dead::5"))),
            ("::ffff:198.51.100.1", Some(ip("198.51.100.1"))),
            ("x", None),
            ("", None),
            ("unknown", None),
        ];
        let mut rng = crate::testing::Rng::new(0x5eed_f0e0);
        for _ in 0..crate::testing::iterations(5_000) {
            let n = rng.below(7);
            let picks: Vec<usize> = (0..n).map(|_| rng.below(pool.len())).collect();
            let text = picks
                .iter()
                .map(|&i| pool[i].0)
                .collect::<Vec<_>>()
                .join(", ");
            let hops: Vec<Option<IpAddr>> = picks.iter().map(|&i| pool[i].1).collect();
            let h = if n == 0 {
                HeaderMap::new()
            } else {
                headers("x-forwarded-for", &[&text])
            };
            assert_eq!(
                forwarded_client(&h, ForwardedHeader::XForwardedFor, &trusted),
                reference(&hops, &trusted),
                "X-Forwarded-For: {text}"
            );
        }
    }

    #[test]
    fn rfc7239_forwarded_is_parsed() {
        let trusted = Trusted::parse(&["10.0.0.0/8".into()]).unwrap();
        let h = headers(
            "forwarded",
            &[r#"for=6.6.6.6, for="[2001:db8::7]:4711";proto=https, for=10.0.0.3"#],
        );
        assert_eq!(
            forwarded_client(&h, ForwardedHeader::Forwarded, &trusted),
            Some(ip("2001:db8::7"))
        );
    }

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut io = bytes;
        let res = read_header(&mut io).await;
        (res, io.to_vec())
    }

    #[tokio::test]
    async fn v1_headers() {
        let (res, rest) = parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 4711 443\r\n\x16\x03").await;
        assert_eq!(res, Ok(Some("203.0.113.7:4711".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03", "the TLS bytes behind it stay unread");
        let (res, _) = parse(b"PROXY TCP6 2001:db8::7 ::1 4711 443\r\n").await;
        assert_eq!(res, Ok(Some("[2001:db8::7]:4711".parse().unwrap())));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").await.0, Ok(None));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01",
        ] {
            assert_eq!(parse(bad).await.0, Err(ProxyError::Malformed), "{bad:?}");
        }
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert_eq!(parse(long.as_bytes()).await.0, Err(ProxyError::Malformed));
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn v2_headers() {
        let mut body = vec![203, 0, 113, 7, 10, 0, 0, 1];
        body.extend_from_slice(&4711u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // an ALPN TLV
        let mut bytes = v2(1, 0x11, &body);
        bytes.extend_from_slice(b"\x16\x03");
        let (res, rest) = parse(&bytes).await;
        assert_eq!(res, Ok(Some("203.0.113.7:4711".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03");

        let mut body6 = vec![0x20, 0x01, 0x0d, 0xb8];
        body6.extend_from_slice(&[0; 11]);
        body6.push(7);
        body6.extend_from_slice(&[0; 16]);
        body6.extend_from_slice(&[0x12, 0x67, 0x01, 0xbb]);
        assert_eq!(
            parse(&v2(1, 0x21, &body6)).await.0,
            Ok(Some("[2001:db8::7]:4711".parse().unwrap()))
        );
        assert_eq!(parse(&v2(0, 0x00, &[])).await.0, Ok(None), "LOCAL");
        assert_eq!(
            parse(&v2(1, 0x11, &[1, 2, 3])).await.0,
            Err(ProxyError::Malformed)
        );
        assert_eq!(
            parse(&v2(5, 0x11, &body)).await.0,
            Err(ProxyError::Malformed)
        );
        let mut bad_sig = v2(1, 0x11, &body);
        bad_sig[5] = b'X';
        assert_eq!(parse(&bad_sig).await.0, Err(ProxyError::Malformed));
        // A length beyond what we read is refused without reading it.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge).await.0, Err(ProxyError::Malformed));
    }
}
