//! `ambit demo`: builds a small local world, runs the agent on it, sends traffic, and prints what was
//! captured and relayed.

#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Failed(String),
}

pub fn run(_args: DemoArgs) -> Result<(), DemoError> {
    Err(DemoError::Failed("not built yet".into()))
}
