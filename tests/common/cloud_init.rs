//! Cloud-init for the test guest: `#cloud-config` user-data, and the files the guest reported over
//! the serial console (`fkr-report`, image-builder/README.md).

use std::collections::BTreeMap;

use base64::Engine;

/// One `write_files` item: path, permissions, content (base64-encoded here).
pub struct WriteFile<'a> {
    pub path: &'a str,
    pub permissions: &'a str,
    pub content: &'a [u8],
}

/// `#cloud-config` in the exact shape of ARCHITECTURE.md's "Seed contract".
pub fn user_data(files: &[WriteFile], runcmd: &[&str], poweroff: bool) -> String {
    let mut s = String::from("#cloud-config\n");
    if !files.is_empty() {
        s.push_str("write_files:\n");
        for f in files {
            s.push_str(&format!(
                "- path: {}\n  owner: root:root\n  permissions: '{}'\n  encoding: b64\n  content: {}\n",
                f.path,
                f.permissions,
                base64::engine::general_purpose::STANDARD.encode(f.content)
            ));
        }
    }
    if !runcmd.is_empty() {
        s.push_str("runcmd:\n");
        for c in runcmd {
            s.push_str(&format!("- '{}'\n", c.replace('\'', "''")));
        }
    }
    if poweroff {
        s.push_str("power_state:\n  mode: poweroff\n  timeout: 30\n  condition: true\n");
    }
    s
}

/// Files the guest printed with `fkr-report`, by guest path.
pub fn reported_files(serial: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(p) = line.strip_prefix("fkr-report-begin ") {
            current = Some((p.to_owned(), String::new()));
        } else if let Some(p) = line.strip_prefix("fkr-report-end ") {
            if let Some((path, b64)) = current.take() {
                assert_eq!(path, p, "interleaved fkr-report blocks");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("fkr-report content is base64");
                out.insert(path, bytes);
            }
        } else if let Some((_, b64)) = current.as_mut() {
            b64.push_str(line.trim());
        }
    }
    out
}
