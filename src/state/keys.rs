//! State keys. Entity identifiers are never stored: a customer, merchant, card, e-mail,
//! device or IP becomes an HMAC-SHA256 under a configured secret, so the store, the
//! changelog and any dump of them hold no raw card number or e-mail. Keys start with the
//! input partition, so one partition's state can be dropped or rebuilt alone.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Keyed hashing of identifiers.
#[derive(Clone)]
pub struct Hasher {
    mac: Hmac<Sha256>,
}

impl Hasher {
    pub fn new(secret: &[u8]) -> Hasher {
        Hasher {
            mac: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length"),
        }
    }

    /// 16 bytes of HMAC(kind ‖ 0 ‖ id): `kind` keeps a customer and a merchant with the same
    /// id apart.
    pub fn entity(&self, kind: &str, id: &str) -> [u8; 16] {
        let mut mac = self.mac.clone();
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(id.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// 16 bytes of HMAC(kind ‖ 0 ‖ a ‖ 0 ‖ b): an entity named by two ids (a customer's
    /// session), without building the joined string.
    pub fn entity_pair(&self, kind: &str, a: &str, b: &str) -> [u8; 16] {
        let mut mac = self.mac.clone();
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(a.as_bytes());
        mac.update(&[0]);
        mac.update(b.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// 8 bytes of the same, for the small sets of known cards, devices and IPs.
    pub fn short(&self, kind: &str, id: &str) -> u64 {
        let e = self.entity(kind, id);
        u64::from_le_bytes(e[..8].try_into().expect("8 bytes"))
    }
}

/// A state key: input partition (big-endian, so a partition's keys are one range), then the
/// entity hash.
pub type Key = [u8; 20];

pub fn key(partition: i32, entity: &[u8; 16]) -> Key {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&(partition as u32).to_be_bytes());
    k[4..].copy_from_slice(entity);
    k
}

/// The input partition a state key belongs to.
pub fn partition_of(key: &Key) -> i32 {
    u32::from_be_bytes([key[0], key[1], key[2], key[3]]) as i32
}

/// The key range `[start, end)` of one partition.
pub fn partition_range(partition: i32) -> ([u8; 4], [u8; 4]) {
    let p = partition as u32;
    (p.to_be_bytes(), (p + 1).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_depend_on_secret_kind_and_id_and_hide_the_id() {
        let a = Hasher::new(b"secret-a");
        let b = Hasher::new(b"secret-b");
        assert_eq!(
            a.entity("card", "4111111111111111"),
            a.entity("card", "4111111111111111")
        );
        assert_ne!(
            a.entity("card", "4111111111111111"),
            b.entity("card", "4111111111111111")
        );
        assert_ne!(a.entity("card", "x"), a.entity("email", "x"));
        // No ambiguity between kind and id: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(a.entity("ab", "c"), a.entity("a", "bc"));
        let k = key(7, &a.entity("customer", "alice@example.com"));
        assert!(!k.windows(5).any(|w| w == b"alice"));
        assert_eq!(&k[..4], &[0, 0, 0, 7]);
        let (lo, hi) = partition_range(7);
        assert!(k[..4] >= lo[..] && k[..4] < hi[..]);
    }
}
