//! `fkr-qemu ci-users`: the per-repository CI users the daemon manages, from
//! `<state_dir>/ci-users.json`. Shows user, repository and creation time only: the file also
//! holds each user's password, which is never printed.

use std::io::Write;

use serde::Serialize;
use time::OffsetDateTime;

use crate::controller::ciuser::CiUserStore;
use crate::ops::paths::DirArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON: `{"users": [{"username", "repository", "created_at"}, …]}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dirs: DirArgs,
}

/// What is shown of a CI user. Built field by field from the stored user, so a secret added to the
/// store later cannot leak into the output by accident.
#[derive(Debug, Serialize)]
struct ShownUser {
    username: String,
    repository: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

#[derive(Debug, Serialize)]
struct Listing {
    users: Vec<ShownUser>,
}

pub async fn run(args: Args) -> Result<(), crate::Error> {
    let dirs = args.dirs.resolve()?;
    let store = CiUserStore::open(dirs.ci_users_file())?;
    let users: Vec<ShownUser> = store
        .users()
        .map(|u| ShownUser {
            username: u.username.clone(),
            repository: u.repository.clone(),
            created_at: u.created_at,
        })
        .collect();
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&Listing { users }).expect("serializing users");
        s.push('\n');
        s
    } else {
        table(&users)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| crate::ops::Error::Output(e).into())
}

fn table(users: &[ShownUser]) -> String {
    // Usernames are at most 40 characters (Forgejo's limit); repositories may be longer.
    let mut s = format!("{:<40} {:<20} {}\n", "USER", "CREATED (UTC)", "REPOSITORY");
    for u in users {
        let created = u
            .created_at
            .format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]"
            ))
            .unwrap_or_default();
        s.push_str(&format!(
            "{:<40} {:<20} {}\n",
            u.username, created, u.repository
        ));
    }
    if users.is_empty() {
        s.push_str("(no CI users)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_user_repo_and_time() {
        let users = [ShownUser {
            username: "alice-web-ci".into(),
            repository: "alice/web".into(),
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        }];
        let t = table(&users);
        let row = t.lines().nth(1).unwrap();
        assert!(row.starts_with("alice-web-ci "), "{row}");
        assert!(row.contains(" 2023-11-14 22:13 "), "{row}");
        assert!(row.ends_with(" alice/web"), "{row}");
        assert!(table(&[]).contains("(no CI users)"));
    }
}
