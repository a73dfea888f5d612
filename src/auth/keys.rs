//! Verification keys by `kid`: the [`KeySet`] a [`super::Verifier`] swaps
//! whole on reload, built either from the one PEM or HMAC key of the config
//! or from an RFC 7517 JWK set (a file or a URL's body).
//!
//! The algorithm family is pinned by `auth.algorithms`; a JWK that does not
//! fit it (another `kty`, an `alg` outside the pinned list, an EC curve
//! that is not the pinned one, `use` other than `sig`, a short RSA modulus)
//! is skipped with a warning, never trusted for another algorithm.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use tracing::warn;

/// Largest JWK set accepted, file or URL body, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Most keys one JWK set may hold; identity providers publish a handful.
pub const MAX_JWKS_KEYS: usize = 256;

/// Smallest RSA modulus accepted from a JWK, in bits (aws-lc-rs refuses
/// smaller ones at every verification anyway).
const MIN_RSA_BITS: usize = 2048;

/// Why a key set was refused. Cloned to every request waiting on the
/// same refresh, so it holds text rather than the source errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {origin}: {message}")]
    Read { origin: String, message: String },
    #[error("{origin}: larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge { origin: String },
    #[error("{origin}: not a JWK set: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: more than {MAX_JWKS_KEYS} keys")]
    TooManyKeys { origin: String },
    #[error("{origin}: no usable key for {algorithms}")]
    NoUsableKey { origin: String, algorithms: String },
    #[error("JWKS fetch from {url}: {message}")]
    Fetch { url: String, message: String },
}

/// One verification key and the pinned algorithms it may verify.
#[derive(Clone)]
pub(crate) struct VerifyKey {
    pub key: DecodingKey,
    /// The pinned algorithms, narrowed by the JWK's `alg` or EC curve.
    pub algorithms: Vec<Algorithm>,
}

/// The keys in force, by `kid`.
#[derive(Clone, Default)]
pub(crate) struct KeySet {
    by_kid: HashMap<String, VerifyKey>,
    /// The one key of a set that gives it no `kid`.
    unnamed: Option<VerifyKey>,
    /// The single PEM or HMAC key of the config: it has no id, so it serves
    /// whatever `kid` a token names, as it always did.
    any_kid: bool,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key ids only: key material never reaches Debug output.
        let mut kids: Vec<&str> = self.by_kid.keys().map(String::as_str).collect();
        kids.sort_unstable();
        f.debug_struct("KeySet")
            .field("kids", &kids)
            .field("unnamed", &self.unnamed.is_some())
            .finish()
    }
}

/// The parse error that stops a JWK set past [`MAX_JWKS_KEYS`] keys.
const TOO_MANY_KEYS: &str = "more than MAX_JWKS_KEYS keys";

/// The `keys` array, refused as soon as it holds one key too many, and
/// kept as slices of the document: a set of many tiny entries near the
/// size limit never becomes a large tree in memory.
fn at_most_max_keys<'de, D>(d: D) -> Result<Vec<&'de serde_json::value::RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<&'de serde_json::value::RawValue>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of JWKs")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = seq.next_element()? {
                if keys.len() == MAX_JWKS_KEYS {
                    return Err(serde::de::Error::custom(TOO_MANY_KEYS));
                }
                keys.push(key);
            }
            Ok(keys)
        }
    }
    d.deserialize_seq(Keys)
}

impl KeySet {
    /// The one key of a PEM or HMAC configuration.
    pub fn single(key: DecodingKey, algorithms: &[Algorithm]) -> Self {
        Self {
            by_kid: HashMap::new(),
            unnamed: Some(VerifyKey {
                key,
                algorithms: algorithms.to_vec(),
            }),
            any_kid: true,
        }
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.by_kid.len() + usize::from(self.unnamed.is_some())
    }

    /// The key a token's `kid` selects. A token without `kid` is served
    /// only by a set of exactly one key: with more, which one is meant
    /// would be a guess.
    pub fn select(&self, kid: Option<&str>) -> Option<&VerifyKey> {
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .or(self.unnamed.as_ref().filter(|_| self.any_kid)),
            None if self.len() == 1 => self
                .unnamed
                .as_ref()
                .or_else(|| self.by_kid.values().next()),
            None => None,
        }
    }

    /// Builds a set from a JWK set document. `origin` (a path or URL) only
    /// names the source in errors and warnings.
    ///
    /// # Errors
    /// A document over [`MAX_JWKS_BYTES`] or [`MAX_JWKS_KEYS`], one that is
    /// not `{"keys":[...]}`, or one without any key usable for `pinned`.
    pub fn from_jwks(bytes: &[u8], pinned: &[Algorithm], origin: &str) -> Result<Self, KeyError> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(KeyError::TooLarge {
                origin: origin.to_owned(),
            });
        }
        #[derive(serde::Deserialize)]
        struct Document<'a> {
            #[serde(borrow, deserialize_with = "at_most_max_keys")]
            keys: Vec<&'a serde_json::value::RawValue>,
        }
        let doc: Document<'_> = serde_json::from_slice(bytes).map_err(|e| {
            if e.to_string().starts_with(TOO_MANY_KEYS) {
                KeyError::TooManyKeys {
                    origin: origin.to_owned(),
                }
            } else {
                KeyError::Parse {
                    origin: origin.to_owned(),
                    message: e.to_string(),
                }
            }
        })?;
        let mut usable: Vec<(Option<String>, VerifyKey)> = Vec::with_capacity(doc.keys.len());
        for (index, value) in doc.keys.into_iter().enumerate() {
            // Each key is parsed on its own, so one key of a kind we do not
            // know (or with an odd field) does not void the whole set.
            let jwk = match serde_json::from_str::<Jwk>(value.get()) {
                Ok(jwk) => jwk,
                Err(e) => {
                    warn!(origin, index, error = %e, "JWK skipped: not a JWK");
                    continue;
                }
            };
            let kid = jwk.common.key_id.clone();
            match usable_key(&jwk, pinned) {
                Ok(key) => usable.push((kid, key)),
                Err(why) => {
                    warn!(
                        origin,
                        index,
                        kid = kid.as_deref().unwrap_or(""),
                        why,
                        "JWK skipped"
                    );
                }
            }
        }
        let mut set = Self::default();
        if let [(None, _)] = usable.as_slice() {
            set.unnamed = usable.pop().map(|(_, key)| key);
            return Ok(set);
        }
        for (index, (kid, key)) in usable.into_iter().enumerate() {
            let Some(kid) = kid else {
                warn!(
                    origin,
                    index,
                    "JWK skipped: no kid, and the set holds other keys, so no token could select it"
                );
                continue;
            };
            if set.by_kid.contains_key(&kid) {
                warn!(
                    origin,
                    kid, "JWK skipped: its kid is already taken by an earlier key"
                );
                continue;
            }
            set.by_kid.insert(kid, key);
        }
        if set.len() == 0 {
            let names: Vec<String> = pinned.iter().map(|a| format!("{a:?}")).collect();
            return Err(KeyError::NoUsableKey {
                origin: origin.to_owned(),
                algorithms: names.join(", "),
            });
        }
        Ok(set)
    }
}

/// The key `jwk` gives for the pinned algorithms, or why it gives none.
fn usable_key(jwk: &Jwk, pinned: &[Algorithm]) -> Result<VerifyKey, &'static str> {
    if let Some(usage) = &jwk.common.public_key_use
        && *usage != PublicKeyUse::Signature
    {
        return Err("its use is not sig");
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("its key_ops lack verify");
    }
    let family = pinned
        .first()
        .map(|a| a.family())
        .ok_or("no pinned algorithm")?;
    let (fits, curve_alg) = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            if rsa_bits(&rsa.n) < MIN_RSA_BITS {
                return Err("its RSA modulus is under 2048 bits");
            }
            (family == AlgorithmFamily::Rsa, None)
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            let (alg, size) = match ec.curve {
                EllipticCurve::P256 => (Some(Algorithm::ES256), 32),
                EllipticCurve::P384 => (Some(Algorithm::ES384), 48),
                _ => return Err("its EC curve is not P-256 or P-384"),
            };
            if decoded_len(&ec.x) != size || decoded_len(&ec.y) != size {
                return Err("its x or y does not fit its curve");
            }
            (family == AlgorithmFamily::Ec, alg)
        }
        AlgorithmParameters::OctetKeyPair(okp) => {
            if okp.curve != EllipticCurve::Ed25519 {
                return Err("its OKP curve is not Ed25519");
            }
            if decoded_len(&okp.x) != 32 {
                return Err("its x is not an Ed25519 public key");
            }
            (family == AlgorithmFamily::Ed, None)
        }
        // A symmetric key published as a JWK is not supported: a JWK set is
        // meant to be public, and HMAC keys must not be.
        AlgorithmParameters::OctetKey(_) => return Err("oct (symmetric) keys are not supported"),
        _ => return Err("its kty is not RSA, EC or OKP"),
    };
    if !fits {
        return Err("its kty does not fit the pinned algorithm family");
    }
    let declared = match jwk.common.key_algorithm {
        None => None,
        Some(alg) => {
            Some(Algorithm::try_from(alg).map_err(|_| "its alg is not a signature algorithm")?)
        }
    };
    let algorithms: Vec<Algorithm> = pinned
        .iter()
        .copied()
        .filter(|a| declared.is_none_or(|d| d == *a) && curve_alg.is_none_or(|c| c == *a))
        .collect();
    if algorithms.is_empty() {
        return Err("its alg or curve is not among auth.algorithms");
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "its key parameters do not decode")?;
    Ok(VerifyKey { key, algorithms })
}

fn b64url(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

/// Length of a base64url value once decoded; 0 when it does not decode.
fn decoded_len(text: &str) -> usize {
    b64url(text).map_or(0, |b| b.len())
}

/// Bits of a base64url RSA modulus, leading zero bytes not counted; 0 when
/// it does not decode.
fn rsa_bits(n: &str) -> usize {
    let Some(bytes) = b64url(n) else {
        return 0;
    };
    let significant = bytes
        .iter()
        .position(|b| *b != 0)
        .map_or(&[][..], |i| &bytes[i..]);
    match significant.first() {
        None => 0,
        Some(top) => (significant.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A P-256 or P-384 public JWK with `kid` (and its PKCS#8 private key).
    pub(crate) fn ec_jwk(kid: &str, p384: bool) -> (serde_json::Value, String) {
        let alg = if p384 {
            &rcgen::PKCS_ECDSA_P384_SHA384
        } else {
            &rcgen::PKCS_ECDSA_P256_SHA256
        };
        let pair = rcgen::KeyPair::generate_for(alg).unwrap();
        let raw = pair.public_key_raw();
        let half = (raw.len() - 1) / 2;
        let jwk = json!({
            "kty": "EC",
            "crv": if p384 { "P-384" } else { "P-256" },
            "kid": kid,
            "x": b64(&raw[1..=half]),
            "y": b64(&raw[1 + half..]),
        });
        (jwk, pair.serialize_pem())
    }

    pub(crate) fn ed_jwk(kid: &str) -> serde_json::Value {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key_raw())})
    }

    pub(crate) fn rsa_jwk(kid: &str, bits: usize) -> serde_json::Value {
        // A modulus of the right size is all parsing looks at.
        let mut n = vec![0xc5u8; bits / 8];
        n[0] = 0x80;
        json!({"kty": "RSA", "kid": kid, "n": b64(&n), "e": "AQAB", "alg": "RS256", "use": "sig"})
    }

    fn set(keys: &[serde_json::Value], pinned: &[Algorithm]) -> Result<KeySet, KeyError> {
        let doc = json!({ "keys": keys }).to_string();
        KeySet::from_jwks(doc.as_bytes(), pinned, "test.json")
    }

    #[test]
    fn keys_of_each_kty_load_for_their_family_only() {
        let (p256, _) = ec_jwk("ec1", false);
        let ed = ed_jwk("ed1");
        let rsa = rsa_jwk("rsa1", 2048);
        let all = [p256.clone(), ed.clone(), rsa.clone()];

        let es = set(&all, &[Algorithm::ES256]).unwrap();
        assert_eq!(es.len(), 1);
        assert_eq!(
            es.select(Some("ec1")).unwrap().algorithms,
            [Algorithm::ES256]
        );
        assert!(es.select(Some("rsa1")).is_none());

        let eddsa = set(&all, &[Algorithm::EdDSA]).unwrap();
        assert!(eddsa.select(Some("ed1")).is_some());
        assert!(eddsa.select(Some("ec1")).is_none());

        // The JWK's alg narrows the pinned list.
        let rs = set(&all, &[Algorithm::RS256, Algorithm::PS256]).unwrap();
        assert_eq!(
            rs.select(Some("rsa1")).unwrap().algorithms,
            [Algorithm::RS256]
        );
    }

    #[test]
    fn misfits_are_skipped_and_an_empty_result_refused() {
        let (p384, _) = ec_jwk("p384", true);
        let err = set(std::slice::from_ref(&p384), &[Algorithm::ES256]).unwrap_err();
        assert!(matches!(err, KeyError::NoUsableKey { .. }), "{err}");
        assert!(set(&[p384], &[Algorithm::ES384]).is_ok());

        let oct = json!({"kty": "oct", "kid": "h", "k": b64(&[7u8; 32])});
        assert!(set(&[oct], &[Algorithm::HS256]).is_err());
        assert!(set(&[rsa_jwk("short", 1024)], &[Algorithm::RS256]).is_err());
        let mut enc = rsa_jwk("enc", 2048);
        enc["use"] = json!("enc");
        assert!(set(&[enc], &[Algorithm::RS256]).is_err());
        let mut rs512 = rsa_jwk("rs512", 2048);
        rs512["alg"] = json!("RS512");
        assert!(set(&[rs512], &[Algorithm::RS256]).is_err());
        // An odd key is skipped, not fatal to its neighbours.
        let odd = json!({"kty": "EC", "crv": "P-256", "kid": 5, "x": "a", "y": "b"});
        let (good, _) = ec_jwk("good", false);
        assert_eq!(set(&[odd, good], &[Algorithm::ES256]).unwrap().len(), 1);
    }

    #[test]
    fn documents_that_are_not_key_sets_are_refused() {
        for bad in [&b"{\"keys\":[{"[..], b"[]", b"{}", b"{\"keys\":{}}", b""] {
            let err = KeySet::from_jwks(bad, &[Algorithm::ES256], "x").unwrap_err();
            assert!(matches!(err, KeyError::Parse { .. }), "{err}");
        }
        assert!(matches!(
            KeySet::from_jwks(b"{\"keys\":[]}", &[Algorithm::ES256], "x"),
            Err(KeyError::NoUsableKey { .. })
        ));
        let huge = vec![b' '; MAX_JWKS_BYTES + 1];
        assert!(matches!(
            KeySet::from_jwks(&huge, &[Algorithm::ES256], "x"),
            Err(KeyError::TooLarge { .. })
        ));
        let many: Vec<_> = (0..=MAX_JWKS_KEYS)
            .map(|i| json!({"kty": "x", "kid": i.to_string()}))
            .collect();
        assert!(matches!(
            set(&many, &[Algorithm::ES256]),
            Err(KeyError::TooManyKeys { .. })
        ));
    }

    #[test]
    fn kid_selection_and_tokens_without_kid() {
        let (a, _) = ec_jwk("a", false);
        let (b, _) = ec_jwk("b", false);
        let one = set(std::slice::from_ref(&a), &[Algorithm::ES256]).unwrap();
        assert!(one.select(Some("a")).is_some());
        assert!(
            one.select(Some("b")).is_none(),
            "a named set serves only its kids"
        );
        assert!(one.select(None).is_some(), "no kid, one key: that key");

        let two = set(&[a, b], &[Algorithm::ES256]).unwrap();
        assert!(two.select(Some("a")).is_some());
        assert!(two.select(Some("b")).is_some());
        assert!(two.select(Some("c")).is_none());
        assert!(two.select(None).is_none(), "no kid, two keys: refused");

        // A lone key without kid serves tokens without kid only.
        let (mut anon, _) = ec_jwk("x", false);
        anon.as_object_mut().unwrap().remove("kid");
        let lone = set(&[anon.clone()], &[Algorithm::ES256]).unwrap();
        assert!(lone.select(None).is_some());
        assert!(lone.select(Some("x")).is_none());
        // Beside named keys it could never be chosen: skipped.
        let (c, _) = ec_jwk("c", false);
        assert_eq!(set(&[anon, c], &[Algorithm::ES256]).unwrap().len(), 1);
    }

    #[test]
    fn the_config_key_serves_any_kid() {
        let single = KeySet::single(DecodingKey::from_secret(&[1; 32]), &[Algorithm::HS256]);
        assert!(single.select(None).is_some());
        assert!(single.select(Some("whatever")).is_some());
    }

    #[test]
    fn duplicate_kids_keep_the_first() {
        let (first, _) = ec_jwk("k", false);
        let (second, _) = ec_jwk("k", false);
        let both = set(&[first.clone(), second], &[Algorithm::ES256]).unwrap();
        assert_eq!(both.len(), 1);
        let alone = set(&[first], &[Algorithm::ES256]).unwrap();
        let (x, y) = (
            both.select(Some("k")).unwrap(),
            alone.select(Some("k")).unwrap(),
        );
        assert_eq!(
            x.key.try_get_as_bytes().unwrap(),
            y.key.try_get_as_bytes().unwrap()
        );
    }

    #[test]
    fn rsa_modulus_bits() {
        assert_eq!(rsa_bits(&b64(&[0x00, 0x80, 0, 0])), 24);
        assert_eq!(rsa_bits(&b64(&[0x01])), 1);
        assert_eq!(rsa_bits("!!"), 0);
    }
}
