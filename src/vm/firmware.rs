//! Finding OVMF: QEMU's firmware descriptors first (`docs/interop/firmware.json`), then the paths
//! Debian, Arch and Fedora install to, unless the config names the files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Error, VmConfig};

/// The firmware a VM boots: a read-only code file and a VARS template copied per VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub code: PathBuf,
    /// Block format of `code` (`raw` or `qcow2`), passed to QEMU's `-drive format=`.
    pub code_format: String,
    pub vars_template: PathBuf,
    pub vars_format: String,
    /// Where the choice came from (descriptor path, `config`, or `fallback`), for the log.
    pub source: String,
}

/// The parts of a QEMU firmware descriptor the selection needs.
#[derive(Debug, Clone, Deserialize)]
pub struct FirmwareDescriptor {
    #[serde(default)]
    pub description: String,
    #[serde(rename = "interface-types", default)]
    pub interface_types: Vec<String>,
    pub mapping: Mapping,
    #[serde(default)]
    pub targets: Vec<Target>,
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Mapping {
    pub device: String,
    /// `split` (default), `combined` or `stateless`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub executable: Option<FlashFile>,
    #[serde(rename = "nvram-template", default)]
    pub nvram_template: Option<FlashFile>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FlashFile {
    pub filename: PathBuf,
    #[serde(default = "raw")]
    pub format: String,
}

fn raw() -> String {
    "raw".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct Target {
    pub architecture: String,
    #[serde(default)]
    pub machines: Vec<String>,
}

/// Features a plain job VM cannot use: secure boot (enforced with enrolled keys) and builds that
/// require the platform to emulate SMM. `amd-sev`, `amd-sev-es`, `amd-sev-snp` and `intel-tdx` are
/// not here: QEMU's firmware.json defines them as "the firmware supports running under …", and the
/// plain builds declare them (Fedora's `50-edk2-ovmf-4m-qcow2-x64-nosb.json` lists `amd-sev-es`,
/// Arch's and Debian's list `amd-sev`). The builds that only serve confidential guests are stateless
/// or memory-mapped, which the split-flash check already skips.
const UNWANTED_FEATURES: &[&str] = &["secure-boot", "enrolled-keys", "requires-smm"];

/// Known (code, vars) pairs, in preference order, when no descriptor fits.
const FALLBACKS: &[(&str, &str)] = &[
    // Debian / Ubuntu (`ovmf`)
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    // Arch (`edk2-ovmf`)
    (
        "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
        "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
    ),
    (
        "/usr/share/edk2-ovmf/x64/OVMF_CODE.fd",
        "/usr/share/edk2-ovmf/x64/OVMF_VARS.fd",
    ),
    // Fedora (`edk2-ovmf`)
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
];

impl FirmwareDescriptor {
    /// Whether this descriptor is a split UEFI flash image for x86_64 q35 without secure boot/SMM.
    fn fits(&self) -> bool {
        let uefi = self.interface_types.iter().any(|t| t == "uefi");
        let split_flash = self.mapping.device == "flash"
            && self.mapping.mode.as_deref().unwrap_or("split") == "split"
            && self.mapping.executable.is_some()
            && self.mapping.nvram_template.is_some();
        let q35 = self.targets.iter().any(|t| {
            t.architecture == "x86_64" && t.machines.iter().any(|m| glob_match(m, "pc-q35-9.9"))
        });
        let clean = !self
            .features
            .iter()
            .any(|f| UNWANTED_FEATURES.contains(&f.as_str()));
        uefi && split_flash && q35 && clean
    }
}

/// Picks the first fitting descriptor (they are given in priority order) whose files exist.
pub fn select_descriptor(
    descriptors: &[(PathBuf, FirmwareDescriptor)],
    exists: impl Fn(&Path) -> bool,
) -> Option<Firmware> {
    descriptors.iter().find_map(|(path, d)| {
        if !d.fits() {
            return None;
        }
        let code = d.mapping.executable.as_ref()?;
        let vars = d.mapping.nvram_template.as_ref()?;
        if !exists(&code.filename) || !exists(&vars.filename) {
            tracing::debug!(descriptor = %path.display(), "firmware descriptor fits but its files are missing");
            return None;
        }
        Some(Firmware {
            code: code.filename.clone(),
            code_format: code.format.clone(),
            vars_template: vars.filename.clone(),
            vars_format: vars.format.clone(),
            source: path.display().to_string(),
        })
    })
}

/// Reads the descriptors of `dirs` in QEMU's order: by file name, a name in an earlier directory hiding
/// the same name in later ones (an empty file hides without providing anything).
pub fn read_descriptors(dirs: &[PathBuf]) -> Vec<(PathBuf, FirmwareDescriptor)> {
    let mut by_name: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                by_name.entry(entry.file_name()).or_insert(path);
            }
        }
    }
    by_name
        .into_values()
        .filter_map(|path| {
            let text = std::fs::read_to_string(&path).ok()?;
            if text.trim().is_empty() {
                return None;
            }
            match serde_json::from_str::<FirmwareDescriptor>(&text) {
                Ok(d) => Some((path, d)),
                Err(e) => {
                    tracing::debug!(descriptor = %path.display(), error = %e, "ignoring unreadable firmware descriptor");
                    None
                }
            }
        })
        .collect()
}

/// Finds the firmware for a VM: config overrides, else descriptors, else known distribution paths.
pub fn discover_firmware(config: &VmConfig) -> Result<Firmware, Error> {
    discover_firmware_with(config, Path::is_file)
}

/// [`discover_firmware`] with the "is this a file" check supplied by the caller, so that tests can
/// run the whole discovery against another distribution's descriptors with the files they name laid
/// out under a temporary root. The returned paths are the ones the descriptors name.
pub fn discover_firmware_with(
    config: &VmConfig,
    exists: impl Fn(&Path) -> bool,
) -> Result<Firmware, Error> {
    discover_with_fallbacks(config, FALLBACKS, exists)
}

fn discover_with_fallbacks(
    config: &VmConfig,
    fallbacks: &[(&str, &str)],
    exists: impl Fn(&Path) -> bool,
) -> Result<Firmware, Error> {
    match (&config.firmware_code, &config.firmware_vars) {
        (Some(code), Some(vars)) => {
            for p in [code, vars] {
                if !exists(p) {
                    return Err(Error::FirmwareFileMissing { path: p.clone() });
                }
            }
            return Ok(Firmware {
                code: code.clone(),
                code_format: format_of(code),
                vars_template: vars.clone(),
                vars_format: format_of(vars),
                source: "config".into(),
            });
        }
        (None, None) => {}
        _ => return Err(Error::FirmwarePairIncomplete),
    }
    let descriptors = read_descriptors(&config.firmware_descriptor_dirs);
    if let Some(fw) = select_descriptor(&descriptors, &exists) {
        return Ok(fw);
    }
    for (code, vars) in fallbacks {
        let (code, vars) = (Path::new(code), Path::new(vars));
        if exists(code) && exists(vars) {
            return Ok(Firmware {
                code: code.into(),
                code_format: "raw".into(),
                vars_template: vars.into(),
                vars_format: "raw".into(),
                source: "fallback".into(),
            });
        }
    }
    let mut searched: Vec<String> = config
        .firmware_descriptor_dirs
        .iter()
        .map(|d| format!("{}/*.json", d.display()))
        .collect();
    searched.extend(fallbacks.iter().map(|(c, _)| (*c).to_owned()));
    Err(Error::FirmwareNotFound {
        searched: searched.join(", "),
    })
}

fn format_of(p: &Path) -> String {
    if p.extension().is_some_and(|e| e == "qcow2") {
        "qcow2".into()
    } else {
        "raw".into()
    }
}

/// `*` matches any run of characters; everything else matches itself (QEMU's descriptors use no more).
fn glob_match(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> Vec<(PathBuf, FirmwareDescriptor)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware/fixtures");
        read_descriptors(&[dir])
    }

    /// The descriptors one distribution's OVMF package installs (`firmware/fixtures/<distro>/`).
    fn distro(name: &str) -> Vec<(PathBuf, FirmwareDescriptor)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("firmware/fixtures")
            .join(name);
        read_descriptors(&[dir])
    }

    #[test]
    fn arch_gets_the_plain_4m_build_not_the_ia32_one_that_also_fits() {
        let all = distro("arch");
        assert_eq!(all.len(), 5, "{all:?}");
        let fw = select_descriptor(&all, |_| true).unwrap();
        assert_eq!(fw.code, Path::new("/usr/share/edk2/x64/OVMF_CODE.4m.fd"));
        assert_eq!(
            fw.vars_template,
            Path::new("/usr/share/edk2/x64/OVMF_VARS.4m.fd")
        );
        assert_eq!(
            (fw.code_format.as_str(), fw.vars_format.as_str()),
            ("raw", "raw")
        );
        assert!(
            fw.source.ends_with("60-edk2-ovmf-x86_64-4m.json"),
            "{}",
            fw.source
        );
    }

    #[test]
    fn fedora_gets_the_4m_qcow2_build_else_the_2m_raw_one() {
        let all = distro("fedora");
        assert_eq!(all.len(), 9, "{all:?}");
        let fw = select_descriptor(&all, |_| true).unwrap();
        assert_eq!(
            fw.code,
            Path::new("/usr/share/edk2/ovmf/OVMF_CODE_4M.qcow2")
        );
        assert_eq!(
            fw.vars_template,
            Path::new("/usr/share/edk2/ovmf/OVMF_VARS_4M.qcow2")
        );
        assert_eq!(
            (fw.code_format.as_str(), fw.vars_format.as_str()),
            ("qcow2", "qcow2")
        );
        assert!(
            fw.source.ends_with("50-edk2-ovmf-4m-qcow2-x64-nosb.json"),
            "{}",
            fw.source
        );

        // Without the qcow2 images the 2 MiB raw build is next; every secure-boot, SEV and TDX
        // build is still passed over.
        let raw_only = |p: &Path| p.extension() != Some("qcow2".as_ref());
        let fw = select_descriptor(&all, raw_only).unwrap();
        assert_eq!(fw.code, Path::new("/usr/share/edk2/ovmf/OVMF_CODE.fd"));
        assert_eq!(
            fw.vars_template,
            Path::new("/usr/share/edk2/ovmf/OVMF_VARS.fd")
        );
        assert_eq!(
            (fw.code_format.as_str(), fw.vars_format.as_str()),
            ("raw", "raw")
        );
        assert!(
            fw.source.ends_with("51-edk2-ovmf-2m-raw-x64-nosb.json"),
            "{}",
            fw.source
        );
    }

    #[test]
    fn glob() {
        assert!(glob_match("pc-q35-*", "pc-q35-9.9"));
        assert!(glob_match("*", "pc-q35-9.9"));
        assert!(!glob_match("pc-i440fx-*", "pc-q35-9.9"));
        assert!(glob_match("pc-q35-7.2", "pc-q35-7.2"));
    }

    #[test]
    fn picks_the_plain_split_q35_descriptor_and_skips_secure_boot_sev_arm_and_i440fx() {
        let all = fixtures();
        assert!(all.len() >= 8, "fixtures read: {}", all.len());
        let fw = select_descriptor(&all, |_| true).unwrap();
        assert_eq!(fw.code, Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"));
        assert_eq!(
            fw.vars_template,
            Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd")
        );
        assert_eq!(fw.code_format, "raw");
        assert!(fw.source.ends_with("60-edk2-x86_64.json"));
    }

    #[test]
    fn a_fitting_descriptor_with_missing_files_is_skipped() {
        let all = fixtures();
        let fw = select_descriptor(&all, |p| p.starts_with("/usr/share/edk2/x64")).unwrap();
        assert_eq!(fw.code, Path::new("/usr/share/edk2/x64/OVMF_CODE.4m.fd"));
        assert!(select_descriptor(&all, |_| false).is_none());
    }

    #[test]
    fn earlier_directories_hide_later_ones_and_empty_files_mask() {
        let etc = tempfile::tempdir().unwrap();
        let share = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware/fixtures");
        std::fs::write(etc.path().join("60-edk2-x86_64.json"), "").unwrap();
        let all = read_descriptors(&[etc.path().into(), share]);
        assert!(all.iter().all(|(p, _)| !p.ends_with("60-edk2-x86_64.json")));
        let fw = select_descriptor(&all, |_| true).unwrap();
        assert!(fw.source.ends_with("70-arch-edk2-x86_64.json"));
    }

    #[test]
    fn nothing_found_names_what_to_install() {
        let empty = tempfile::tempdir().unwrap();
        let c = VmConfig {
            firmware_descriptor_dirs: vec![empty.path().into()],
            ..VmConfig::default()
        };
        let err = discover_with_fallbacks(
            &c,
            &[("/nonexistent/OVMF_CODE.fd", "/nonexistent/OVMF_VARS.fd")],
            Path::is_file,
        )
        .unwrap_err();
        assert!(matches!(err, Error::FirmwareNotFound { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("apt-get install ovmf") && msg.contains("/nonexistent/OVMF_CODE.fd"),
            "{msg}"
        );
        assert_eq!(err.class(), crate::types::ErrorClass::MissingDependency);
    }

    #[test]
    fn this_host_has_firmware() {
        // OVMF is a CI dependency (.ci/setup): discovery must find it through the descriptors.
        let fw = discover_firmware(&VmConfig::default()).unwrap();
        assert!(fw.code.is_file() && fw.vars_template.is_file());
    }

    #[test]
    fn config_overrides_must_come_in_pairs_and_exist() {
        let mut c = VmConfig {
            firmware_code: Some("/nonexistent/CODE.fd".into()),
            ..VmConfig::default()
        };
        assert!(matches!(
            discover_firmware(&c),
            Err(Error::FirmwarePairIncomplete)
        ));
        c.firmware_vars = Some("/nonexistent/VARS.fd".into());
        let err = discover_firmware(&c).unwrap_err();
        assert!(matches!(err, Error::FirmwareFileMissing { .. }));
        assert!(err.to_string().contains("apt-get install ovmf"));
    }
}
