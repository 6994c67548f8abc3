//! Shell completions (clap_complete) and man pages (clap_mangen), generated from the same
//! command definitions as `--help`, so the three cannot disagree.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell, cmd: &mut clap::Command) {
    clap_complete::generate(shell, cmd, "vdbfs", &mut std::io::stdout());
}

/// Writes one man page per command into `dir` (`vdbfs.1`, `vdbfs-vdb-create.1`, ...);
/// returns the files written.
pub fn manpages(dir: &Path, cmd: clap::Command) -> anyhow::Result<Vec<PathBuf>> {
    fn generate(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            generate(sub, dir, out)?;
        }
        let page = clap_mangen::Man::new(cmd);
        let path = page
            .generate_to(dir)
            .with_context(|| format!("cannot write {}", dir.join(page.get_filename()).display()))?;
        out.push(path);
        Ok(())
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    generate(cmd, dir, &mut out)?;
    out.sort();
    Ok(out)
}
