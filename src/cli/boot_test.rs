//! `fkr-qemu boot-test`.

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_args: Args) -> Result<(), crate::Error> {
    Err(crate::Error::Usage("`boot-test` is not built yet".into()))
}
