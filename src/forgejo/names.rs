//! Names and credentials the orchestrator creates on Forgejo: CI users, their e-mail addresses and
//! passwords, and token names. Deterministic where the startup sweep must recognise them.

use crate::secret::Secret;
use rand::seq::SliceRandom;
use rand::Rng;

/// Every token the orchestrator mints is named `orch-<job id>-<random>`; the sweep deletes only these.
pub const TOKEN_PREFIX: &str = "orch-";

/// Forgejo's limit on user names.
const MAX_USERNAME: usize = 40;

/// `orch-<job id>-<8 random hex digits>`.
pub fn token_name(job_id: i64) -> String {
    format!(
        "{TOKEN_PREFIX}{job_id}-{:08x}",
        rand::thread_rng().gen::<u32>()
    )
}

/// The CI user of `owner/repo`: `<owner>-<repo>-ci`, made valid for Forgejo's user-name rules
/// (letters, digits, `-`, `_`, `.`; no two punctuation characters in a row; none at either end;
/// at most 40 characters). Lower-cased, because Forgejo compares user names case-insensitively.
/// A name that would be too long keeps its start and gets a stable 8-hex-digit hash of the full
/// `owner/repo`, so two long names never collide by truncation alone.
pub fn ci_username(owner: &str, repo: &str) -> String {
    let base = sanitize(&format!("{owner}-{repo}"));
    let full = format!("{base}-ci");
    if full.len() <= MAX_USERNAME && !base.is_empty() {
        return full;
    }
    let hash = format!(
        "{:08x}",
        fnv1a(format!("{owner}/{repo}").to_lowercase().as_bytes())
    );
    // `<start>-<hash>-ci`
    let keep = MAX_USERNAME - hash.len() - 4;
    let start: String = base.chars().take(keep).collect();
    let start = start.trim_end_matches(['-', '_', '.']);
    if start.is_empty() {
        format!("{hash}-ci")
    } else {
        format!("{start}-{hash}-ci")
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

fn sanitize(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut pending_punct: Option<char> = None;
    for c in raw.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            if let Some(p) = pending_punct.take() {
                if !out.is_empty() {
                    out.push(p);
                }
            }
            out.push(c);
        } else {
            // A run of punctuation (or anything Forgejo does not allow) becomes one character: the
            // first of the run when it is allowed, else `-`.
            let p = if matches!(c, '-' | '_' | '.') { c } else { '-' };
            pending_punct.get_or_insert(p);
        }
    }
    out
}

/// FNV-1a, 32 bits: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_forgejo_username(name: &str) -> bool {
        let punct = |c: char| matches!(c, '-' | '_' | '.');
        !name.is_empty()
            && name.len() <= MAX_USERNAME
            && name.chars().all(|c| c.is_ascii_alphanumeric() || punct(c))
            && !name.starts_with(punct)
            && !name.ends_with(punct)
            && !name
                .chars()
                .zip(name.chars().skip(1))
                .any(|(a, b)| punct(a) && punct(b))
    }

    #[test]
    fn plain_names_keep_their_shape() {
        assert_eq!(ci_username("acme", "widget"), "acme-widget-ci");
        assert_eq!(ci_username("Acme", "Widget.rs"), "acme-widget.rs-ci");
    }

    #[test]
    fn awkward_names_become_valid() {
        for (o, r) in [
            ("acme", "_private"),
            ("acme", "a..b"),
            ("a", "x-"),
            ("o", "ünïcode"),
            (
                "averyveryverylongorganisationname",
                "andaveryverylongrepositoryname",
            ),
            (
                "averyveryverylongorganisationname",
                "andaveryverylongrepositorynamf",
            ),
            ("___", "___"),
        ] {
            let n = ci_username(o, r);
            assert!(valid_forgejo_username(&n), "{o}/{r} -> {n}");
            assert!(n.ends_with("-ci"));
        }
        assert_ne!(
            ci_username(
                "averyveryverylongorganisationname",
                "andaveryverylongrepositoryname"
            ),
            ci_username(
                "averyveryverylongorganisationname",
                "andaveryverylongrepositorynamf"
            )
        );
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
