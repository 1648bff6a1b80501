//! `fkr-qemu ci-users`.

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_args: Args) -> Result<(), crate::Error> {
    Err(crate::Error::Usage("`ci-users` is not built yet".into()))
}
