//! `fkr-qemu serve`.

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_args: Args) -> Result<(), crate::Error> {
    Err(crate::Error::Usage("`serve` is not built yet".into()))
}
