//! `serve --check-config`: everything that can be checked before serving, then the effective config.

use super::{Config, Error};

/// Checks files and Forgejo, prints the effective configuration (secrets redacted) on stdout.
pub async fn check_config(cfg: &Config) -> Result<(), crate::Error> {
    let base = cfg.base_image();
    if !base.is_file() {
        return Err(Error::Missing(format!(
            "the base image {} does not exist (build it with image-builder/build-runner-base.sh or set base_image)",
            base.display()
        ))
        .into());
    }
    print!("{}", cfg.to_redacted_toml());
    println!("# configuration OK");
    Ok(())
}
