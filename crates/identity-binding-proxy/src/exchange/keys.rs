//! RSA signing keys and their public JWKs.
//!
//! Two parties sign JWTs with RS256 in this system: the proxy's issuer (the assertion it
//! presents to Entra) and, in the emulators, the kube-apiserver (service-account tokens). Both
//! need the same things: load or generate a key, name it with a stable `kid`, sign claims, and
//! publish the public half as a JWK. Only public halves ever leave this module as JWKs.

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::KeyPair as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Why a key could not be loaded, generated or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM block found: expected \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"PUBLIC KEY\"")]
    NoPem,
    #[error("the PEM holds a {0} block, which is not an RSA key this proxy can use")]
    UnsupportedPem(String),
    #[error("the RSA key was rejected: {0}")]
    Rejected(String),
    #[error("unsupported RSA key size {0}: use 2048, 3072 or 4096")]
    UnsupportedSize(usize),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The public half of an RSA key, as a JWK would carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsaPublicKey {
    /// RFC 7638 thumbprint of the key, used as `kid`.
    pub kid: String,
    /// Modulus, base64url without padding.
    pub n: String,
    /// Public exponent, base64url without padding.
    pub e: String,
    spki_der: Vec<u8>,
}

impl RsaPublicKey {
    fn from_components(n: &[u8], e: &[u8], spki_der: Vec<u8>) -> Self {
        let n = URL_SAFE_NO_PAD.encode(strip_leading_zeros(n));
        let e = URL_SAFE_NO_PAD.encode(strip_leading_zeros(e));
        let kid = thumbprint(&n, &e);
        Self {
            kid,
            n,
            e,
            spki_der,
        }
    }

    /// Parses a public key from PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`). A private key PEM is
    /// accepted too and reduced to its public half, so operators can point tools at either.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let block = first_pem_block(pem)?;
        match block.0.as_str() {
            "PUBLIC KEY" | "RSA PUBLIC KEY" => {
                let key = aws_lc_rs::rsa::PublicKey::from_der(&block.1)
                    .map_err(|e| KeyError::Rejected(e.to_string()))?;
                Self::from_aws(&key)
            }
            "PRIVATE KEY" | "RSA PRIVATE KEY" => Ok(SigningKey::from_pem(pem)?.public),
            other => Err(KeyError::UnsupportedPem(other.to_string())),
        }
    }

    fn from_aws(key: &aws_lc_rs::rsa::PublicKey) -> Result<Self, KeyError> {
        let components = PublicKeyComponents::<Vec<u8>>::from(key);
        let spki = key
            .as_der()
            .map_err(|e| KeyError::Rejected(e.to_string()))?;
        let spki: &PublicKeyX509Der = &spki;
        Ok(Self::from_components(
            &components.n,
            &components.e,
            spki.as_ref().to_vec(),
        ))
    }

    /// The JWK of this key for a JWKS document: RS256 signing key.
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": self.kid,
            "n": self.n,
            "e": self.e,
        })
    }

    /// SubjectPublicKeyInfo PEM (`PUBLIC KEY`).
    pub fn to_pem(&self) -> String {
        pem_encode("PUBLIC KEY", &self.spki_der)
    }
}

/// An RSA private key that signs RS256 JWTs with its thumbprint as `kid`.
pub struct SigningKey {
    public: RsaPublicKey,
    encoding: EncodingKey,
    pkcs8_der: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print private material, not even in debug output.
        f.debug_struct("SigningKey")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a new key of `bits` (2048, 3072 or 4096).
    pub fn generate(bits: usize) -> Result<Self, KeyError> {
        let size = match bits {
            2048 => KeySize::Rsa2048,
            3072 => KeySize::Rsa3072,
            4096 => KeySize::Rsa4096,
            other => return Err(KeyError::UnsupportedSize(other)),
        };
        let pair = KeyPair::generate(size).map_err(|e| KeyError::Rejected(e.to_string()))?;
        let der = pair
            .as_der()
            .map_err(|e| KeyError::Rejected(e.to_string()))?;
        Self::from_pkcs8_der(der.as_ref())
    }

    /// Loads a private key from PEM: PKCS#8 (`PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (label, der) = first_pem_block(pem)?;
        let pair = match label.as_str() {
            "PRIVATE KEY" => KeyPair::from_pkcs8(&der),
            "RSA PRIVATE KEY" => KeyPair::from_der(&der),
            other => return Err(KeyError::UnsupportedPem(other.to_string())),
        }
        .map_err(|e| KeyError::Rejected(e.to_string()))?;
        let pkcs8 = pair
            .as_der()
            .map_err(|e| KeyError::Rejected(e.to_string()))?;
        Self::from_pkcs8_der(pkcs8.as_ref())
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let pair = KeyPair::from_pkcs8(der).map_err(|e| KeyError::Rejected(e.to_string()))?;
        if pair.public_modulus_len() < 256 {
            return Err(KeyError::UnsupportedSize(pair.public_modulus_len() * 8));
        }
        let public = RsaPublicKey::from_aws(pair.public_key())?;
        let encoding = EncodingKey::from_rsa_pem(pem_encode("PRIVATE KEY", der).as_bytes())
            .map_err(|e| KeyError::Rejected(e.to_string()))?;
        Ok(Self {
            public,
            encoding,
            pkcs8_der: der.to_vec(),
        })
    }

    pub fn kid(&self) -> &str {
        &self.public.kid
    }

    pub fn public(&self) -> &RsaPublicKey {
        &self.public
    }

    /// PKCS#8 PEM of the private key. Callers write it with 0600 permissions.
    pub fn private_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.pkcs8_der)
    }

    /// Signs `claims` as an RS256 JWT with this key's `kid` (and optional `typ`).
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, KeyError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.public.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| KeyError::Sign(e.to_string()))
    }
}

/// RFC 7638 JWK thumbprint of an RSA key: SHA-256 over the canonical
/// `{"e":..,"kty":"RSA","n":..}`, base64url.
pub fn thumbprint(n_b64: &str, e_b64: &str) -> String {
    let canonical = format!(r#"{{"e":"{e_b64}","kty":"RSA","n":"{n_b64}"}}"#);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// The label and DER bytes of the first PEM block in `pem`.
fn first_pem_block(pem: &str) -> Result<(String, Vec<u8>), KeyError> {
    let mut lines = pem.lines().map(str::trim);
    let label = loop {
        match lines.next() {
            None => return Err(KeyError::NoPem),
            Some(line) => {
                if let Some(rest) = line.strip_prefix("-----BEGIN ") {
                    if let Some(label) = rest.strip_suffix("-----") {
                        break label.to_string();
                    }
                }
            }
        }
    };
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    for line in lines.by_ref() {
        if line == end {
            let der = STANDARD
                .decode(body.as_bytes())
                .map_err(|e| KeyError::Rejected(format!("bad base64 in PEM: {e}")))?;
            return Ok((label, der));
        }
        body.push_str(line);
    }
    Err(KeyError::NoPem)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_through_pem_with_the_same_kid() {
        let key = SigningKey::generate(2048).unwrap();
        let again = SigningKey::from_pem(&key.private_pem()).unwrap();
        assert_eq!(key.kid(), again.kid());
        let public = RsaPublicKey::from_pem(&key.public().to_pem()).unwrap();
        assert_eq!(&public, key.public());
        assert!(!key.public().to_pem().contains("PRIVATE"));
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // The example key of RFC 7638 section 3.1.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        assert_eq!(
            thumbprint(n, "AQAB"),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn unsupported_size_and_garbage_are_refused() {
        assert!(matches!(
            SigningKey::generate(1024),
            Err(KeyError::UnsupportedSize(1024))
        ));
        assert!(matches!(
            SigningKey::from_pem("not a pem"),
            Err(KeyError::NoPem)
        ));
        assert!(matches!(
            SigningKey::from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(KeyError::UnsupportedPem(_))
        ));
    }
}
