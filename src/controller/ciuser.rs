//! Per-repository CI users: their names, the proof that fkr-qemu created them, and the
//! `<state_dir>/ci-users.json` store.
//!
//! A CI user belongs to one repository *id* (the stable identity: a rename or a transfer keeps it,
//! and a new repository that takes over an old name gets a new id). Nothing here trusts a name alone.
//!
//! ## Naming rule (injective)
//! 1. `<owner>-<repo>-ci`, lowercased, when the owner's name has no `-` and the result is a valid
//!    Forgejo username (letters, digits, `-`, `_`, `.`; no two of `-_.` in a row; no leading or
//!    trailing punctuation; at most 40 characters). The owner is then everything before the first
//!    `-`, so two repositories never map to one name (`acme/my-app` → `acme-my-app-ci`, while
//!    `acme-my/app` falls to rule 2). Forgejo names are unique case-insensitively, so lowercasing
//!    keeps this injective.
//! 2. Otherwise, and whenever the rule-1 name belongs to another repository id (a renamed or
//!    recreated repository): `<stem>-<repo id>_ci`, where `<stem>` is `<owner>-<repo>` lowercased,
//!    every character other than `a-z 0-9 - _ .` replaced by `-`, runs of punctuation collapsed to
//!    one `-`, punctuation trimmed at both ends, cut so the whole name fits 40 characters (`repo`
//!    when nothing is left). The repository id makes it unique; the `_ci` suffix keeps it apart
//!    from every rule-1 name, which all end in `-ci`. No hash: nothing to search for collisions.
//!
//! ## Ownership marker
//! fkr-qemu creates each CI user with `login_name = "fkr-qemu:repo:<repo id>"` and `source_id = 0`.
//! For a local user (`source_id` 0) only a site admin can write `login_name` (admin create/edit
//! API); the user cannot change it in their settings (unlike `full_name`, `description`,
//! `website`, … which are the user's own), registration never sets it, and only admins (and the
//! user) can read it. An existing Forgejo account is used only with this proof — or with the password
//! stored in `ci-users.json` for that repository id, which only fkr-qemu knows. An e-mail address
//! proves nothing: anyone may register with any address when e-mail confirmation is off.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::Error;
use crate::secret::Secret;

/// Forgejo's username length limit.
pub const MAX_USERNAME_LEN: usize = 40;
/// Start of the `login_name` of every CI user fkr-qemu creates.
pub const MARKER_PREFIX: &str = "fkr-qemu:repo:";

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

/// The ownership marker of the CI user of repository `repo_id`.
pub fn marker(repo_id: i64) -> String {
    format!("{MARKER_PREFIX}{repo_id}")
}

/// The repository id a Forgejo user's `login_name`/`source_id` prove it was created for.
pub fn marked_repo(login_name: &str, source_id: i64) -> Option<i64> {
    if source_id != 0 {
        // An external source sets login_name from the outside; not our marker.
        return None;
    }
    let id = login_name.strip_prefix(MARKER_PREFIX)?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

/// Rule 1: `<owner>-<repo>-ci` when the owner has no `-` and the name is valid.
pub fn plain_username(owner: &str, repo: &str) -> Option<String> {
    if owner.contains('-') {
        return None;
    }
    let plain = format!("{owner}-{repo}-ci").to_lowercase();
    is_valid_username(&plain).then_some(plain)
}

/// Rule 2: `<stem>-<repo id>_ci`.
pub fn id_username(owner: &str, repo: &str, repo_id: i64) -> String {
    let suffix = format!("-{repo_id}_ci");
    let raw = format!("{owner}-{repo}").to_lowercase();
    let mut collapsed = String::with_capacity(raw.len());
    let mut in_punct = false;
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() || is_punct(c) {
            c
        } else {
            '-'
        };
        if is_punct(c) {
            if in_punct {
                // Two or more in a row become one `-`.
                collapsed.pop();
                collapsed.push('-');
            } else {
                collapsed.push(c);
            }
            in_punct = true;
        } else {
            in_punct = false;
            collapsed.push(c);
        }
    }
    let max_stem = MAX_USERNAME_LEN.saturating_sub(suffix.len());
    let mut stem: String = collapsed
        .trim_matches(is_punct)
        .chars()
        .take(max_stem)
        .collect();
    stem = stem.trim_end_matches(is_punct).to_owned();
    if stem.is_empty() {
        stem.push_str("repo");
    }
    format!("{stem}{suffix}")
}

/// The names to try for repository `repo_id`, in order: rule 1 when it applies, then rule 2.
pub fn candidate_usernames(owner: &str, repo: &str, repo_id: i64) -> Vec<String> {
    plain_username(owner, repo)
        .into_iter()
        .chain([id_username(owner, repo, repo_id)])
        .collect()
}

/// One CI user as stored in `ci-users.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CiUser {
    pub username: String,
    /// `owner/repo` when last seen (informative: the repository id is the identity).
    pub repository: String,
    /// The repository this user belongs to; 0 for an entry from a version-1 file not yet bound.
    #[serde(default)]
    pub repo_id: i64,
    /// The password the daemon set (needed for token creation, which requires Basic auth).
    pub password: Secret,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

const VERSION: u32 = 2;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    /// Version 2: keyed by repository id. Version 1: keyed by `owner/repo`, lowercased.
    users: BTreeMap<String, CiUser>,
    /// Version-1 entries, keyed by `owner/repo` lowercased, until a job of that repository binds
    /// them to its id (after proving the stored password still works).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    unbound: BTreeMap<String, CiUser>,
}

/// The `ci-users.json` store: loaded once, every change written back atomically.
#[derive(Debug)]
pub struct CiUserStore {
    path: PathBuf,
    file: StoreFile,
}

impl CiUserStore {
    /// Opens the store; a missing file is an empty store (created on the first write). A version-1
    /// file's entries become unbound entries.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let corrupt = |message: String| Error::StateCorrupt {
            path: path.clone(),
            message,
        };
        let mut file = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<StoreFile>(&bytes).map_err(|e| corrupt(e.to_string()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreFile {
                version: VERSION,
                ..StoreFile::default()
            },
            Err(e) => return Err(Error::io("cannot read", &path, e)),
        };
        match file.version {
            1 => {
                file.unbound = std::mem::take(&mut file.users);
                file.version = VERSION;
            }
            VERSION => {
                for (k, u) in &file.users {
                    if k.parse::<i64>().ok() != Some(u.repo_id) || u.repo_id <= 0 {
                        return Err(corrupt(format!(
                            "entry {k:?} does not match its repo_id {}",
                            u.repo_id
                        )));
                    }
                }
            }
            v => return Err(corrupt(format!("unknown version {v}"))),
        }
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn legacy_key(owner: &str, repo: &str) -> String {
        format!("{owner}/{repo}").to_lowercase()
    }

    /// The CI user of repository `repo_id`.
    pub fn get(&self, repo_id: i64) -> Option<&CiUser> {
        self.file.users.get(&repo_id.to_string())
    }

    /// The unbound (version-1) entry recorded for `owner/repo`, if any.
    pub fn unbound(&self, owner: &str, repo: &str) -> Option<&CiUser> {
        self.file.unbound.get(&Self::legacy_key(owner, repo))
    }

    /// Who holds `username` other than repository `repo_id`: `Some("owner/repo (id N)")`.
    pub fn held_by_other(&self, username: &str, repo_id: i64) -> Option<String> {
        let bound = self
            .file
            .users
            .values()
            .find(|u| u.repo_id != repo_id && u.username.eq_ignore_ascii_case(username))
            .map(|u| format!("{} (id {})", u.repository, u.repo_id));
        bound.or_else(|| {
            self.file
                .unbound
                .values()
                .find(|u| u.username.eq_ignore_ascii_case(username))
                .map(|u| format!("{} (unbound entry)", u.repository))
        })
    }

    /// All users, bound ones by repository id, then unbound ones.
    pub fn users(&self) -> impl Iterator<Item = &CiUser> {
        self.file.users.values().chain(self.file.unbound.values())
    }

    /// Adds or replaces the user of `user.repo_id` (dropping the unbound entry of its
    /// `repository`, which it replaces) and writes the file.
    pub fn put(&mut self, user: CiUser) -> Result<(), Error> {
        assert!(user.repo_id > 0, "CI users are bound to a repository id");
        let key = user.repo_id.to_string();
        let legacy_key = user.repository.to_lowercase();
        let previous = self.file.users.insert(key.clone(), user);
        let previous_unbound = self.file.unbound.remove(&legacy_key);
        if let Err(e) = self.save() {
            // Keep memory and disk in step: the caller retries with the old state.
            match previous {
                Some(p) => self.file.users.insert(key, p),
                None => self.file.users.remove(&key),
            };
            if let Some(u) = previous_unbound {
                self.file.unbound.insert(legacy_key, u);
            }
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
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn plain_names_are_kept_when_the_owner_has_no_dash() {
        assert_eq!(ci_name("alice", "web", 1), "alice-web-ci");
        assert_eq!(ci_name("Alice", "Web.Site", 1), "alice-web.site-ci");
        assert_eq!(ci_name("org_1", "my_repo", 1), "org_1-my_repo-ci");
        assert_eq!(ci_name("acme", "my-app", 7), "acme-my-app-ci");
    }

    fn ci_name(owner: &str, repo: &str, id: i64) -> String {
        candidate_usernames(owner, repo, id).remove(0)
    }

    #[test]
    fn the_dash_ambiguity_is_gone() {
        // The issue's pair: both used to be `acme-my-app-ci`.
        let a = candidate_usernames("acme", "my-app", 7);
        let b = candidate_usernames("acme-my", "app", 8);
        assert_eq!(b, vec!["acme-my-app-8_ci".to_string()]);
        for n in &a {
            assert!(!b.contains(n), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn names_are_injective_over_a_crafted_population() {
        // Owners and repositories built from the characters that make names ambiguous; every
        // candidate name of every repository must belong to that repository alone.
        let parts = [
            "a", "a-b", "b", "a.b", "a_b", "b-c", "-", "x--y", "ÿ", "ab", "A-B",
        ];
        let mut seen: HashMap<String, (String, String, i64)> = HashMap::new();
        let mut id = 0;
        let mut owners_seen = std::collections::HashSet::new();
        for owner in parts {
            // Forgejo owner names are unique case-insensitively.
            if !owners_seen.insert(owner.to_lowercase()) {
                continue;
            }
            let mut repos_seen = std::collections::HashSet::new();
            for repo in parts {
                if !repos_seen.insert(repo.to_lowercase()) {
                    continue;
                }
                id += 1;
                for n in candidate_usernames(owner, repo, id) {
                    assert!(is_valid_username(&n), "{owner}/{repo} -> {n}");
                    if let Some(prev) = seen.insert(n.clone(), (owner.into(), repo.into(), id)) {
                        panic!("{n} from both {prev:?} and {owner}/{repo}");
                    }
                }
            }
        }
        assert!(seen.len() > 100);
    }

    #[test]
    fn id_names_are_valid_bounded_and_deterministic() {
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
            let n = id_username(o, r, i64::MAX);
            assert!(is_valid_username(&n), "{o}/{r} -> {n}");
            assert!(n.ends_with(&format!("-{}_ci", i64::MAX)), "{n}");
            assert_eq!(n, id_username(o, r, i64::MAX), "deterministic");
        }
        assert_eq!(id_username("alice", ".github", 12), "alice-github-12_ci");
        assert_eq!(id_username("alice", "a..b", 3), "alice-a-b-3_ci");
        assert_eq!(id_username("o", "---", 3), "o-3_ci");
        assert_eq!(id_username("--", "--", 3), "repo-3_ci");
        let long = id_username("abcdefghijklmnopqrst", "abcdefghijklmnopqrst", 123_456);
        assert_eq!(long.len(), 40, "{long}");
        // Invalid plain names go to rule 2 only.
        assert_eq!(
            candidate_usernames("alice", ".github", 12),
            vec!["alice-github-12_ci"]
        );
        assert_eq!(
            candidate_usernames("abcdefghijklmnopqrst", "abcdefghijklmnopqrst", 5).len(),
            1
        );
    }

    #[test]
    fn markers_round_trip_and_are_strict() {
        assert_eq!(marker(42), "fkr-qemu:repo:42");
        assert_eq!(marked_repo(&marker(42), 0), Some(42));
        for bad in [
            "",
            "fkr-qemu:repo:",
            "fkr-qemu:repo:4x",
            "fkr-qemu:repo:-4",
            "x:42",
        ] {
            assert_eq!(marked_repo(bad, 0), None, "{bad}");
        }
        // A user of an external source has a login_name that source chose.
        assert_eq!(marked_repo(&marker(42), 3), None);
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

    fn user(name: &str, repository: &str, repo_id: i64) -> CiUser {
        CiUser {
            username: name.into(),
            repository: repository.into(),
            repo_id,
            password: Secret::new("pw-123456"),
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        }
    }

    #[test]
    fn store_round_trip_mode_and_atomicity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/ci-users.json");
        let mut s = CiUserStore::open(&path).unwrap();
        assert!(s.get(5).is_none());
        let u = user("alice-web-ci", "alice/web", 5);
        s.put(u.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["ci-users.json".to_string()]);
        let again = CiUserStore::open(&path).unwrap();
        assert_eq!(again.get(5), Some(&u));
        assert_eq!(again.users().count(), 1);
        assert_eq!(
            again.held_by_other("ALICE-web-ci", 6).as_deref(),
            Some("alice/web (id 5)")
        );
        assert_eq!(again.held_by_other("alice-web-ci", 5), None);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"created_at\": \"2023-11-14T22:13:20Z\""),
            "{text}"
        );
        assert!(text.contains("\"version\": 2"), "{text}");
    }

    #[test]
    fn version_one_entries_stay_unbound_until_put() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci-users.json");
        std::fs::write(
            &path,
            r#"{"version":1,"users":{"acme/web":{"username":"acme-web-ci","repository":"acme/web",
               "password":"pw-1","created_at":"2023-11-14T22:13:20Z"}}}"#,
        )
        .unwrap();
        let mut s = CiUserStore::open(&path).unwrap();
        assert!(s.get(9).is_none(), "a v1 entry is not bound to any id");
        assert_eq!(s.unbound("ACME", "web").unwrap().username, "acme-web-ci");
        assert!(s.held_by_other("acme-web-ci", 9).is_some());
        s.put(user("acme-web-ci", "ACME/web", 9)).unwrap();
        let again = CiUserStore::open(&path).unwrap();
        assert!(again.unbound("acme", "web").is_none());
        assert_eq!(again.get(9).unwrap().username, "acme-web-ci");
        assert_eq!(again.users().count(), 1);
    }

    #[test]
    fn corrupt_store_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci-users.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = CiUserStore::open(&path).unwrap_err();
        assert!(e.to_string().contains("ci-users.json"), "{e}");
        // A key that is not its entry's repository id is refused, not trusted.
        std::fs::write(
            &path,
            r#"{"version":2,"users":{"5":{"username":"a-b-ci","repository":"a/b","repo_id":6,
               "password":"p","created_at":"2023-11-14T22:13:20Z"}}}"#,
        )
        .unwrap();
        let e = CiUserStore::open(&path).unwrap_err();
        assert!(e.to_string().contains("repo_id"), "{e}");
    }
}
