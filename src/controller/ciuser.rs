//! Per-repository CI users: their names and the `<state_dir>/ci-users.json` store.
//!
//! ## Naming rule
//! The CI user of `owner/repo` is `<owner>-<repo>-ci`, lowercased (registries want lowercase image
//! paths; Forgejo names are case-insensitive anyway). When that is not a valid Forgejo username
//! (letters, digits, `-`, `_`, `.`; no two of `-_.` in a row; no leading/trailing punctuation; at most 40
//! characters), it is mapped deterministically:
//! 1. every character other than `a-z 0-9 - _ .` becomes `-`;
//! 2. every run of two or more punctuation characters becomes one `-`;
//! 3. leading and trailing punctuation is trimmed from the `<owner>-<repo>` stem;
//! 4. the stem is cut to 30 characters (trailing punctuation trimmed again) and
//!    `-<h>-ci` is appended, `<h>` = the first 6 hex digits of the FNV-1a-64 hash of the lowercased
//!    `owner/repo`, so two repositories that sanitise to the same stem still get different users.
//!
//! Step 4 applies whenever steps 1–3 changed anything or the plain name is over 40 characters; a name
//! that is already valid is used as is (lowercased).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::Error;
use crate::secret::Secret;

/// Forgejo's username length limit.
pub const MAX_USERNAME_LEN: usize = 40;
const STEM_MAX: usize = MAX_USERNAME_LEN - "-abcdef-ci".len();

fn is_punct(c: char) -> bool {
    matches!(c, '-' | '_' | '.')
}

/// Whether Forgejo would accept `name` as a username (the character rules; reserved names aside).
pub fn is_valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USERNAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || is_punct(c))
        && !name.starts_with(is_punct)
        && !name.ends_with(is_punct)
        && !name
            .as_bytes()
            .windows(2)
            .any(|w| is_punct(w[0] as char) && is_punct(w[1] as char))
}

/// FNV-1a, 64 bit: tiny, stable across versions and platforms (the mapping must never change).
fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The CI user's name for `owner/repo` (see the module docs for the rule).
pub fn ci_username(owner: &str, repo: &str) -> String {
    let plain = format!("{owner}-{repo}-ci").to_lowercase();
    if is_valid_username(&plain) {
        return plain;
    }
    let raw = format!("{owner}-{repo}").to_lowercase();
    let replaced: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || is_punct(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut collapsed = String::with_capacity(replaced.len());
    let chars: Vec<char> = replaced.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if is_punct(chars[i]) {
            let start = i;
            while i < chars.len() && is_punct(chars[i]) {
                i += 1;
            }
            collapsed.push(if i - start >= 2 { '-' } else { chars[start] });
        } else {
            collapsed.push(chars[i]);
            i += 1;
        }
    }
    let mut stem: String = collapsed
        .trim_matches(is_punct)
        .chars()
        .take(STEM_MAX)
        .collect();
    stem = stem.trim_end_matches(is_punct).to_owned();
    if stem.is_empty() {
        stem.push_str("repo");
    }
    let hash = fnv1a64(format!("{owner}/{repo}").to_lowercase().as_bytes());
    format!("{stem}-{:06x}-ci", hash >> 40)
}

/// One CI user as stored in `ci-users.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CiUser {
    pub username: String,
    /// `owner/repo`.
    pub repository: String,
    /// The password the daemon set (needed for token creation, which requires Basic auth).
    pub password: Secret,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    /// Keyed by `owner/repo`, lowercased.
    users: BTreeMap<String, CiUser>,
}

/// The `ci-users.json` store: loaded once, every change written back atomically.
#[derive(Debug)]
pub struct CiUserStore {
    path: PathBuf,
    file: StoreFile,
}

impl CiUserStore {
    /// Opens the store; a missing file is an empty store (created on the first write).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::StateCorrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreFile {
                version: 1,
                users: BTreeMap::new(),
            },
            Err(e) => return Err(Error::io("cannot read", &path, e)),
        };
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn key(owner: &str, repo: &str) -> String {
        format!("{owner}/{repo}").to_lowercase()
    }

    pub fn get(&self, owner: &str, repo: &str) -> Option<&CiUser> {
        self.file.users.get(&Self::key(owner, repo))
    }

    /// All users, ordered by repository.
    pub fn users(&self) -> impl Iterator<Item = &CiUser> {
        self.file.users.values()
    }

    /// Adds or replaces the user of `owner/repo` and writes the file.
    pub fn put(&mut self, owner: &str, repo: &str, user: CiUser) -> Result<(), Error> {
        let key = Self::key(owner, repo);
        let previous = self.file.users.insert(key.clone(), user);
        if let Err(e) = self.save() {
            // Keep memory and disk in step: the caller retries with the old state.
            match previous {
                Some(p) => self.file.users.insert(key, p),
                None => self.file.users.remove(&key),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Writes the file atomically: a 0600 temp file in the same directory, fsync, rename, fsync dir.
    fn save(&self) -> Result<(), Error> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        let json = serde_json::to_vec_pretty(&self.file).expect("the store serialises");
        // tempfile creates the file with mode 0600.
        let mut tmp = tempfile::Builder::new()
            .prefix(".ci-users.")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| Error::io("cannot create a temp file in", dir, e))?;
        tmp.write_all(&json)
            .and_then(|()| tmp.write_all(b"\n"))
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| Error::io("cannot write", tmp.path(), e))?;
        tmp.persist(&self.path)
            .map_err(|e| Error::io("cannot rename into place", &self.path, e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("cannot fsync", dir, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn plain_names_are_kept() {
        assert_eq!(ci_username("alice", "web"), "alice-web-ci");
        assert_eq!(ci_username("Alice", "Web.Site"), "alice-web.site-ci");
        assert_eq!(ci_username("org_1", "my_repo"), "org_1-my_repo-ci");
    }

    #[test]
    fn invalid_names_map_to_valid_deterministic_ones() {
        let cases = [
            ("alice", ".github"),
            ("alice", "repo_"),
            ("alice", "a..b"),
            ("alice", "a-_-b"),
            (
                "a-very-long-organisation-name",
                "and-an-even-longer-repository-name",
            ),
            ("x", "ümlaut"),
            ("o", "---"),
        ];
        for (o, r) in cases {
            let n = ci_username(o, r);
            assert!(is_valid_username(&n), "{o}/{r} -> {n}");
            assert!(n.ends_with("-ci"), "{n}");
            assert_eq!(n, ci_username(o, r), "deterministic");
        }
        assert!(ci_username("alice", ".github").starts_with("alice-github-"));
        assert!(ci_username("alice", "a..b").starts_with("alice-a-b-"));
        // Same stem, different repositories: different users.
        assert_ne!(ci_username("alice", "a..b"), ci_username("alice", "a-_b"));
        assert_ne!(ci_username("alice", "a..b"), ci_username("alice", "a-b"));
        // Long names are cut to at most 40 characters.
        let long = ci_username(
            "a-very-long-organisation-name",
            "and-an-even-longer-repository-name",
        );
        assert_eq!(long, "a-very-long-organisation-name-1b090f-ci");
        let long = ci_username("abcdefghijklmnopqrst", "abcdefghijklmnopqrst");
        assert_eq!(long.len(), 40, "{long}");
        // The rule is frozen: a changed hash would orphan existing users.
        assert_eq!(
            ci_username("alice", ".github"),
            format!("alice-github-{:06x}-ci", fnv1a64(b"alice/.github") >> 40)
        );
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn validity_rules() {
        assert!(is_valid_username("a-b_c.d"));
        assert!(!is_valid_username("a--b"));
        assert!(!is_valid_username("a._b"));
        assert!(!is_valid_username("-a"));
        assert!(!is_valid_username("a."));
        assert!(!is_valid_username(&"a".repeat(41)));
        assert!(!is_valid_username("a b"));
    }

    #[test]
    fn store_round_trip_mode_and_atomicity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/ci-users.json");
        let mut s = CiUserStore::open(&path).unwrap();
        assert!(s.get("alice", "web").is_none());
        let user = CiUser {
            username: ci_username("alice", "web"),
            repository: "alice/web".into(),
            password: Secret::new("pw-123456"),
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        };
        s.put("Alice", "Web", user.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["ci-users.json".to_string()]);
        let again = CiUserStore::open(&path).unwrap();
        assert_eq!(again.get("alice", "web"), Some(&user));
        assert_eq!(again.users().count(), 1);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"created_at\": \"2023-11-14T22:13:20Z\""),
            "{text}"
        );
    }

    #[test]
    fn corrupt_store_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci-users.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = CiUserStore::open(&path).unwrap_err();
        assert!(e.to_string().contains("ci-users.json"), "{e}");
    }
}
