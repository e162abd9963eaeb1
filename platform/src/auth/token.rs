//! Secrets. A token is `lyr_` and 43 base62 characters (about 256 bits), so
//! a fast hash is enough: SHA-256 of the token is what is stored, and the
//! comparison after the lookup is constant-time.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn base62(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// A fresh secret token.
pub fn mint_token() -> String {
    format!("lyr_{}", base62(43))
}

/// A fresh public key id.
pub fn mint_key_id() -> String {
    format!("key_{}", base62(16))
}

/// What is stored for a token.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Constant-time comparison of two stored hashes.
pub fn hashes_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_distinct_and_hash_stably() {
        let a = mint_token();
        let b = mint_token();
        assert_eq!(a.len(), 47);
        assert_ne!(a, b);
        assert!(hashes_match(&hash_token(&a), &hash_token(&a)));
        assert!(!hashes_match(&hash_token(&a), &hash_token(&b)));
    }
}
