//! Key material. A key is random (256 bits) behind a visible prefix that names its environment;
//! only its SHA-256 hash is ever stored, and only a short prefix is ever displayed or logged.
//!
//! Invariant: a key's secret is never stored or logged; only its SHA-256 hash is kept and compared in constant time,
//! and at most a short prefix is displayed.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::identity::Environment;

/// Prefix of operator (break-glass) keys.
pub const OPERATOR_PREFIX: &str = "sk_op_";

/// How many characters of a key are shown in listings and logs: the environment prefix plus a
/// few random characters, enough to tell keys apart and far too few to guess the rest.
const DISPLAY_RANDOM_CHARS: usize = 6;

/// The SHA-256 of a presented key: what the key store is indexed by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        let digest = Sha256::digest(key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_slice());
        KeyHash(out)
    }

    /// Constant-time comparison, for the places that compare hashes outside a hash map.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for KeyHash {
    // A hash is not a secret, but there is no reason to print all of it either.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash({}…)", hex::encode(&self.0[..4]))
    }
}

/// A freshly generated key: the secret (shown once) and what gets stored.
pub struct NewKey {
    pub secret: String,
    pub hash: KeyHash,
    pub display_prefix: String,
}

/// Generate a key for an environment, or an operator key when `environment` is `None`.
pub fn generate(environment: Option<Environment>) -> Result<NewKey, getrandom::Error> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random)?;
    let prefix = environment.map_or(OPERATOR_PREFIX, Environment::key_prefix);
    let secret = format!("{prefix}{}", hex::encode(random));
    Ok(NewKey { hash: KeyHash::of(&secret), display_prefix: display_prefix(&secret), secret })
}

/// The non-secret prefix of a presented key, safe to log: its environment marker and a few
/// characters. A string that does not look like a key yields only its marker class.
pub fn display_prefix(key: &str) -> String {
    for p in [Environment::Development.key_prefix(), Environment::Production.key_prefix(), OPERATOR_PREFIX] {
        if let Some(rest) = key.strip_prefix(p) {
            let shown: String = rest.chars().take(DISPLAY_RANDOM_CHARS).collect();
            return format!("{p}{shown}");
        }
    }
    "<not-a-key>".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_prefixed() {
        let a = generate(Some(Environment::Development)).unwrap();
        let b = generate(Some(Environment::Development)).unwrap();
        assert!(a.secret.starts_with("sk_dev_"));
        assert_eq!(a.secret.len(), "sk_dev_".len() + 64);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, KeyHash::of(&a.secret));
        assert!(generate(Some(Environment::Production)).unwrap().secret.starts_with("sk_prod_"));
        assert!(generate(None).unwrap().secret.starts_with("sk_op_"));
    }

    #[test]
    fn display_prefix_hides_the_secret() {
        let k = generate(Some(Environment::Production)).unwrap();
        assert_eq!(k.display_prefix.len(), "sk_prod_".len() + 6);
        assert!(k.secret.starts_with(&k.display_prefix));
        assert_eq!(display_prefix("hunter2"), "<not-a-key>");
    }

    #[test]
    fn hash_is_sha256() {
        // sha256("abc")
        assert_eq!(
            hex::encode(KeyHash::of("abc").0),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(KeyHash::of("a").ct_eq(&KeyHash::of("a")));
        assert!(!KeyHash::of("a").ct_eq(&KeyHash::of("b")));
    }
}
