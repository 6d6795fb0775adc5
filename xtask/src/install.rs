//! `cargo xtask install`: the release binaries where the systemd unit expects them
//! (`PREFIX/bin`, default /usr/local), their man pages and shell completions, the sample unit
//! and a sample configuration. `cargo xtask man --out DIR` writes only the man pages.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;

/// Flags of `install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Installation prefix: binaries in PREFIX/bin, man pages in PREFIX/share/man.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage everything under this directory instead of / (for packaging).
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

/// Flags of `man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Directory to write vdi.1 and parallaxd.8 into.
    #[arg(long, default_value = "target/man")]
    pub out: PathBuf,
}

/// Writes the man pages (`vdi.1`, one `vdi-SUBCOMMAND.1` per subcommand, `parallaxd.8`) into
/// `dir`; returns their paths.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut page = |cmd: clap::Command, name: &str, section: &str| -> Result<()> {
        let path = dir.join(format!("{name}.{section}"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).title(name.to_uppercase()).section(section).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    let vdi = cli::args::command().name("vdi");
    for sub in vdi.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("vdi-{}", sub.get_name());
        // clap names are &'static without its `string` feature; this tool runs once and exits.
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        page(sub.clone().name(leaked), &name, "1")?;
    }
    page(vdi, "vdi", "1")?;
    page(daemon::config::Flags::command(), "parallaxd", "8")?;
    Ok(written)
}

/// `cargo xtask man`.
pub fn run_man(a: &ManArgs) -> Result<()> {
    let pages = write_man_pages(&a.out)?;
    eprintln!("xtask: wrote {} man pages to {} (try: man -l {}/vdi.1)", pages.len(), a.out.display(), a.out.display());
    Ok(())
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Through a temporary name and a rename: a running binary is replaced, not overwritten.
    let tmp = to.with_extension("xtask-new");
    std::fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    eprintln!("xtask: installed {}", to.display());
    Ok(())
}

/// `cargo xtask install`.
pub fn run(a: &InstallArgs) -> Result<()> {
    let bins = crate::sys::release_binaries(&["daemon", "cli"], &["parallaxd", "vdi"], a.no_build)?;
    let root = |p: &Path| -> PathBuf {
        match &a.destdir {
            Some(d) => d.join(p.strip_prefix("/").unwrap_or(p)),
            None => p.to_path_buf(),
        }
    };
    for b in &bins {
        let name = b.file_name().context("binary name")?;
        copy(b, &root(&a.prefix.join("bin").join(name)), 0o755)?;
    }
    let man = tempfile::tempdir()?;
    for page in write_man_pages(man.path())? {
        let file = page.file_name().context("page name")?.to_string_lossy().into_owned();
        let section = file.rsplit('.').next().unwrap_or("1");
        copy(&page, &root(&a.prefix.join(format!("share/man/man{section}")).join(&file)), 0o644)?;
    }
    let completions = tempfile::tempdir()?;
    let mut cmd = cli::args::command().name("vdi");
    for (shell, dest) in [
        (clap_complete::Shell::Bash, a.prefix.join("share/bash-completion/completions/vdi")),
        (clap_complete::Shell::Zsh, a.prefix.join("share/zsh/site-functions/_vdi")),
        (clap_complete::Shell::Fish, a.prefix.join("share/fish/vendor_completions.d/vdi.fish")),
    ] {
        let file = completions.path().join(shell.to_string());
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "vdi", &mut out);
        std::fs::write(&file, out)?;
        copy(&file, &root(&dest), 0o644)?;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("repository root")?;
    copy(&repo.join("docs/parallaxd.service"), &root(Path::new("/etc/systemd/system/parallaxd.service")), 0o644)?;
    copy(&repo.join("docs/parallaxd.toml"), &root(Path::new("/etc/parallax/parallaxd.toml.example")), 0o644)?;
    eprintln!(
        "xtask: done. Next: edit /etc/systemd/system/parallaxd.service (store path), then \
         `systemctl daemon-reload && systemctl enable --now parallaxd`"
    );
    Ok(())
}
