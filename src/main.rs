//! The `tollgate` binary: parses the command line, picks a mode, starts it.
#![forbid(unsafe_code)]

use anyhow::Result;

fn main() -> Result<()> {
    print!("{}", tollgate::api::crds_yaml()?);
    Ok(())
}
