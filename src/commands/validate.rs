pub fn run(_a: crate::cli::ValidateArgs) -> crate::error::Result<()> {
    Err(crate::Error::Usage("validate: not built yet".into()))
}
