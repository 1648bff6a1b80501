//! Names and credentials the orchestrator creates on Forgejo: CI users' e-mail addresses and
//! passwords, and token names. Deterministic where the startup sweep must recognise them. The CI
//! user's *name* and its ownership marker are the controller's business (`controller::ciuser`).

use crate::secret::Secret;
use rand::seq::SliceRandom;
use rand::Rng;

/// Every token the orchestrator mints starts with `orch-`; the sweep deletes only these.
pub const TOKEN_PREFIX: &str = "orch-";

/// `orch-<job id>-<8 random hex digits>`: the name before host ids (still recognised by the sweep).
pub fn token_name(job_id: i64) -> String {
    format!(
        "{TOKEN_PREFIX}{job_id}-{:08x}",
        rand::thread_rng().gen::<u32>()
    )
}

/// `orch-<job id>-<host id>-<8 random hex digits>`: the token of a job on host `host_id`.
pub fn host_token_name(host_id: &str, job_id: i64) -> String {
    format!(
        "{TOKEN_PREFIX}{job_id}-{host_id}-{:08x}",
        rand::thread_rng().gen::<u32>()
    )
}

/// Who minted a token, as its name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenMinter<'a> {
    /// `orch-<job>-<host>-<hex>`: that host.
    Host(&'a str),
    /// `orch-<job>-<hex>`: a version without host ids (one host per Forgejo).
    Legacy,
}

/// Parses a token name minted by [`host_token_name`] or [`token_name`]; `None` for any other name.
pub fn token_minter(name: &str) -> Option<TokenMinter<'_>> {
    let rest = name.strip_prefix(TOKEN_PREFIX)?;
    let (job, rest) = rest.split_once('-')?;
    if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (host, hex) = match rest.rsplit_once('-') {
        Some((host, hex)) => (Some(host), hex),
        None => (None, rest),
    };
    if hex.len() != 8 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    match host {
        None => Some(TokenMinter::Legacy),
        Some(h) if !h.is_empty() => Some(TokenMinter::Host(h)),
        Some(_) => None,
    }
}

/// An address that can never receive mail: `<user>@<domain>` with a `.invalid` domain by default.
pub fn ci_email(username: &str, domain: &str) -> String {
    format!("{username}@{domain}")
}

/// A strong random password (32 characters) with lower- and upper-case letters, digits and
/// punctuation, so that it passes any `PASSWORD_COMPLEXITY` setting of the server.
pub fn generate_password() -> Secret {
    const LOWER: &[u8] = b"abcdefghijkmnopqrstuvwxyz";
    const UPPER: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
    const DIGIT: &[u8] = b"23456789";
    const PUNCT: &[u8] = b"-_.!+=";
    let mut rng = rand::thread_rng();
    let all: Vec<u8> = [LOWER, UPPER, DIGIT, PUNCT].concat();
    let mut chars: Vec<u8> = [LOWER, UPPER, DIGIT, PUNCT]
        .iter()
        .map(|class| *class.choose(&mut rng).expect("non-empty class"))
        .collect();
    while chars.len() < 32 {
        chars.push(*all.choose(&mut rng).expect("non-empty alphabet"));
    }
    chars.shuffle(&mut rng);
    Secret::new(String::from_utf8(chars).expect("ASCII alphabet"))
}

/// The password every host derives for a CI user from the key the hosts share: the same key and
/// identity give the same password on every host, with no state to sync, so a host that resets a
/// CI user's password sets the one every other host already uses (README.md, "Several hosts").
/// `identity` is the CI user's stable identity (repository id and name). HMAC-SHA256 over a
/// counter is the byte stream; each character class is represented, as in [`generate_password`].
pub fn derived_password(key: &[u8], identity: &str) -> Secret {
    use hmac::{Hmac, Mac};
    const LOWER: &[u8] = b"abcdefghijkmnopqrstuvwxyz";
    const UPPER: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
    const DIGIT: &[u8] = b"23456789";
    const PUNCT: &[u8] = b"-_.!+=";
    let mut stream = Vec::new();
    for block in 0u8..4 {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(b"fkr-qemu ci-user password v1\0");
        mac.update(identity.as_bytes());
        mac.update(&[0, block]);
        stream.extend_from_slice(&mac.finalize().into_bytes());
    }
    let mut bytes = stream.into_iter();
    let mut next = || {
        bytes
            .next()
            .expect("128 bytes are enough for 32 characters and a shuffle")
    };
    let all: Vec<u8> = [LOWER, UPPER, DIGIT, PUNCT].concat();
    let mut chars: Vec<u8> = [LOWER, UPPER, DIGIT, PUNCT]
        .iter()
        .map(|class| class[usize::from(next()) % class.len()])
        .collect();
    while chars.len() < 32 {
        chars.push(all[usize::from(next()) % all.len()]);
    }
    // A deterministic Fisher-Yates shuffle, so the class representatives are not always first.
    for i in (1..chars.len()).rev() {
        chars.swap(i, usize::from(next()) % (i + 1));
    }
    Secret::new(String::from_utf8(chars).expect("ASCII alphabet"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_passwords_are_stable_per_key_and_identity_and_mixed() {
        let a = derived_password(b"key one", "repo:7:acme-web-ci");
        assert_eq!(a, derived_password(b"key one", "repo:7:acme-web-ci"));
        assert_ne!(a, derived_password(b"key two", "repo:7:acme-web-ci"));
        assert_ne!(a, derived_password(b"key one", "repo:8:acme-web-ci"));
        let s = a.expose();
        assert_eq!(s.len(), 32);
        assert!(s.chars().any(|c| c.is_ascii_lowercase()));
        assert!(s.chars().any(|c| c.is_ascii_uppercase()));
        assert!(s.chars().any(|c| c.is_ascii_digit()));
        assert!(s.chars().any(|c| !c.is_ascii_alphanumeric()));
    }

    #[test]
    fn token_names_say_which_host_minted_them() {
        let n = host_token_name("build-1", 42);
        assert!(n.starts_with("orch-42-build-1-"), "{n}");
        assert_eq!(token_minter(&n), Some(TokenMinter::Host("build-1")));
        assert_eq!(token_minter(&token_name(42)), Some(TokenMinter::Legacy));
        for other in [
            "orch-",
            "orch-42",
            "orch--build-1-0123abcd",
            "orch-x-build-0123abcd",
            "orch-42--0123abcd",
            "orch-42-build-0123ABCD",
            "my-token",
            "orch-42-build-1-0123abc",
        ] {
            assert_eq!(token_minter(other), None, "{other}");
        }
    }

    #[test]
    fn token_names_carry_prefix_and_job() {
        let n = token_name(42);
        assert!(n.starts_with("orch-42-"), "{n}");
        assert_eq!(n.len(), "orch-42-".len() + 8);
        assert_ne!(token_name(42), token_name(42));
    }

    #[test]
    fn passwords_are_long_and_mixed() {
        let p = generate_password();
        let s = p.expose();
        assert_eq!(s.len(), 32);
        assert!(s.chars().any(|c| c.is_ascii_lowercase()));
        assert!(s.chars().any(|c| c.is_ascii_uppercase()));
        assert!(s.chars().any(|c| c.is_ascii_digit()));
        assert!(s.chars().any(|c| !c.is_ascii_alphanumeric()));
        assert_ne!(generate_password(), p);
    }
}
