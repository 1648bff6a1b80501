use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::Error;

/// The NoCloud seed of one VM. `user_data` may carry secrets (a runner token): the image is written 0600
/// inside a 0700 per-VM directory, and neither the content nor the path's content ever reaches argv.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed {
    /// `instance-id` in meta-data (the VM name).
    pub instance_id: String,
    /// `local-hostname` in meta-data.
    pub hostname: String,
    /// `user-data` (`#cloud-config` …).
    pub user_data: String,
    /// Optional `network-config` (v2).
    pub network_config: Option<String>,
}

impl std::fmt::Debug for Seed {
    // user-data may hold a token: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed")
            .field("instance_id", &self.instance_id)
            .field("hostname", &self.hostname)
            .field(
                "user_data",
                &format_args!("[{} bytes]", self.user_data.len()),
            )
            .field(
                "network_config",
                &self.network_config.as_ref().map(|n| n.len()),
            )
            .finish()
    }
}

impl Seed {
    /// The meta-data file: NoCloud reads `instance-id` and `local-hostname`.
    pub fn meta_data(&self) -> String {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            self.instance_id, self.hostname
        )
    }

    fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut files = vec![
            ("meta-data", self.meta_data().into_bytes()),
            ("user-data", self.user_data.clone().into_bytes()),
        ];
        if let Some(n) = &self.network_config {
            files.push(("network-config", n.clone().into_bytes()));
        }
        files
    }
}

/// FAT volume label the NoCloud datasource looks for.
pub const SEED_LABEL: [u8; 11] = *b"CIDATA     ";

/// Smallest seed image: FAT12 with room for a few KiB of files.
const MIN_SEED_BYTES: u64 = 1024 * 1024;

/// Writes `seed` as a FAT image labelled `CIDATA` at `path` (created with mode 0600; must not exist).
///
/// fatfs 0.3.6 writes the label both into the boot sector and as the root directory's volume-label
/// entry, which is the one current `blkid` reports. Each seed gets a random volume id (fatfs' default is
/// a fixed `1234-5678`), so two attached seeds are never mistaken for one another.
pub fn write_seed(seed: &Seed, path: &Path) -> Result<(), Error> {
    let ctx = || format!("writing seed image {}", path.display());
    let files = seed.files();
    let payload: u64 = files.iter().map(|(_, c)| c.len() as u64).sum();
    // Generous slack for FAT tables and cluster rounding; size is rounded to whole MiB.
    let size = (payload * 2 + MIN_SEED_BYTES).div_ceil(MIN_SEED_BYTES) * MIN_SEED_BYTES;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(ctx(), e))?;
    let result = fill(file, size, &files);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(|e| Error::io(ctx(), e))
}

fn fill(file: File, size: u64, files: &[(&'static str, Vec<u8>)]) -> std::io::Result<()> {
    file.set_len(size)?;
    let mut file = file;
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new()
            .volume_label(SEED_LABEL)
            .volume_id(rand::random()),
    )?;
    {
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for (name, content) in files {
                let mut f = root.create_file(name)?;
                f.truncate()?;
                f.write_all(content)?;
                f.flush()?;
            }
        }
        fs.unmount()?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    fn seed(user_data: String) -> Seed {
        Seed {
            instance_id: "fr-0123abcd".into(),
            hostname: "fr-0123abcd".into(),
            user_data,
            network_config: Some("version: 2\n".into()),
        }
    }

    fn read_back(path: &Path, name: &str) -> Vec<u8> {
        let file = File::open(path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        let mut out = Vec::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn seed_round_trips_through_fatfs_with_label_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let big: String = (0..200_000)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        let s = seed(format!("#cloud-config\n# {big}\n"));
        write_seed(&s, &path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_back(&path, "user-data"), s.user_data.as_bytes());
        assert_eq!(read_back(&path, "meta-data"), s.meta_data().as_bytes());
        assert_eq!(read_back(&path, "network-config"), b"version: 2\n");
        let fs =
            fatfs::FileSystem::new(File::open(&path).unwrap(), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
    }

    #[test]
    fn volume_ids_differ_and_existing_files_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u32> = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("s{i}.img"));
                write_seed(&seed("#cloud-config\n".into()), &p).unwrap();
                fatfs::FileSystem::new(File::open(&p).unwrap(), fatfs::FsOptions::new())
                    .unwrap()
                    .volume_id()
            })
            .collect();
        assert_ne!(ids[0], ids[1]);
        assert!(write_seed(&seed(String::new()), &dir.path().join("s0.img")).is_err());
    }

    #[test]
    fn debug_never_shows_user_data() {
        let s = seed("#cloud-config\ntoken: hunter2\n".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
