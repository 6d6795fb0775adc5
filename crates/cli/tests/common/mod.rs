//! Shared helpers: run the real `vdi` binary in a scratch directory, make ext4 images with
//! `mkfs.ext4` and `debugfs` (no mount), and check outcomes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `vdi` binary under test.
pub fn vdi_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vdi"))
}

/// A scratch directory with a store path and a private run directory (so no test ever finds
/// a real daemon's socket, or another test's).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub run_dir: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("blockstore.dat");
        let run_dir = dir.path().join("run");
        Env { dir, store, run_dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `vdi ARGS` on this env's store, in its directory, stdin from /dev/null.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(vdi_bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env("PARALLAX_STORE", &self.store)
            .env("PARALLAX_RUN_DIR", &self.run_dir)
            .env_remove("VDI_LOG")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run vdi")
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vdi {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs and requires exit `code` with `needle` in stderr (case-insensitive); returns stderr.
    pub fn fails(&self, args: &[&str], code: i32, needle: &str) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "vdi {args:?}: expected exit {code}\nstdout: {}\nstderr: {err}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.to_lowercase().contains(&needle.to_lowercase()), "vdi {args:?}: stderr lacks {needle:?}: {err}");
        err
    }

    /// The store file's bytes.
    pub fn store_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.store).expect("read store")
    }
}

/// Runs a helper program, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `len` bytes of deterministic pseudo-random data (no zero blocks) to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).expect("write random file");
}

/// Makes an ext4 image of `size_mb` MiB at `path` with `mkfs.ext4` and writes `files` (host
/// path, name in the image) into it with `debugfs -w`: a real file system, no mount needed.
pub fn ext4_image(path: &Path, size_mb: u64, files: &[(&Path, &str)]) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size_mb << 20).expect("size image");
    drop(f);
    let dir = path.parent().expect("image dir");
    let p = path.to_str().expect("utf-8 path");
    sh("mkfs.ext4", &["-q", "-F", p], dir);
    for (src, name) in files {
        let req = format!("write {} {name}", src.display());
        sh("debugfs", &["-w", "-R", &req, p], dir);
    }
}

/// Lists the root directory of an ext4 image with `debugfs`.
pub fn ext4_ls(path: &Path) -> String {
    let out = Command::new("debugfs").args(["-R", "ls -l /", path.to_str().expect("utf-8")]).output().expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True if two files have the same bytes (with `cmp`).
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    Command::new("cmp").arg(a).arg(b).status().expect("cmp").success()
}
