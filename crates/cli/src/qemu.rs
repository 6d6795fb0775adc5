//! Disk-image formats other than raw, through `qemu-img`.
//!
//! Parallax does not read or write qcow2, VMDK, VHDX, VDI or VHD itself: `qemu-img convert`
//! does, talking NBD to a private server this command runs on a socket in a fresh 0700
//! directory. An import is served as a [`vdi::ImportDevice`] (only changed blocks are written,
//! nothing reaches the VDI until the end); an export as the snapshot or VDI, read-only.
//!
//! Formats are recognised by their magic numbers ([`sniff`]) and always named to qemu-img
//! with `-f`, never probed by it: a raw image whose first bytes happen to look like qcow2 must
//! not make qemu-img open the backing file such a header names.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use blockdev::BlockDevice;

use crate::error::Failure;

/// A disk-image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormat {
    /// The bytes of the disk, nothing else.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware.
    Vmdk,
    /// Hyper-V.
    Vhdx,
    /// VirtualBox.
    Vdi,
    /// Virtual PC / VHD.
    Vpc,
}

impl ImageFormat {
    /// The name qemu-img knows the format by.
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vpc => "vpc",
        }
    }
}

/// Bytes [`sniff`] needs from the start of an image.
pub const SNIFF_LEN: usize = 512;

/// The format whose header `head` (the image's first bytes, up to [`SNIFF_LEN`]) and `tail`
/// (its last 512 bytes, if it can be read at an offset) carry; raw if none.
pub fn sniff(head: &[u8], tail: Option<&[u8]>) -> ImageFormat {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        ImageFormat::Qcow2
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        ImageFormat::Vmdk
    } else if at(0, b"vhdxfile") {
        ImageFormat::Vhdx
    } else if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        ImageFormat::Vdi
    } else if at(0, b"conectix") || tail.is_some_and(|t| t.starts_with(b"conectix")) {
        // A dynamic VHD has its footer's copy at the start; a fixed one only at the end.
        ImageFormat::Vpc
    } else {
        ImageFormat::Raw
    }
}

/// Reads the head (and, for a file, the tail) of the image at `path` and names its format.
pub fn sniff_file(path: &Path) -> Result<ImageFormat, Failure> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| Failure::user(format!("cannot open {}: {e}", path.display())))?;
    let mut head = vec![0u8; SNIFF_LEN];
    let n = f.read_at(&mut head, 0).map_err(|e| Failure::user(format!("cannot read {}: {e}", path.display())))?;
    head.truncate(n);
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = vec![0u8; 512];
    let tail = (size >= 1024 && f.read_at(&mut tail, size - 512).ok() == Some(512)).then_some(tail);
    Ok(sniff(&head, tail.as_deref()))
}

fn qemu_img() -> Command {
    let mut c = Command::new(std::env::var_os("PARALLAX_QEMU_IMG").unwrap_or_else(|| "qemu-img".into()));
    c.stdin(Stdio::null());
    c
}

fn run(mut cmd: Command, what: &str) -> Result<Vec<u8>, Failure> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Failure::user(format!(
                "{what} needs qemu-img, which is not installed (Debian: `apt install qemu-utils`); \
                 raw images need nothing (`--format raw`)"
            ))
        } else {
            Failure::system(format!("running qemu-img: {e}"))
        }
    })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(Failure::user(format!("{what}: qemu-img failed: {}", msg.trim())));
    }
    Ok(out.stdout)
}

/// The virtual size of the image at `path` in format `format`, asked of `qemu-img info`.
pub fn virtual_size(path: &Path, format: ImageFormat) -> Result<u64, Failure> {
    let mut cmd = qemu_img();
    cmd.args(["info", "--output=json", "-f", format.qemu_name()]).arg(path);
    let out = run(cmd, &format!("reading {} as {}", path.display(), format.qemu_name()))?;
    let v: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| Failure::system(format!("qemu-img info gave output that is not JSON: {e}")))?;
    v.get("virtual-size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| Failure::system("qemu-img info did not report a virtual size"))
}

/// Refuses an image whose format was only recognised (not named with `--format`) if it would
/// make qemu-img read other files: a qcow2 backing file or external data file, a VMDK
/// descriptor's extents. A raw disk a guest wrote can start with such a header; importing it
/// must not read a host file the guest named. Naming the format says the image is trusted to
/// be what it looks like.
///
/// qcow2 and text VMDK descriptors are judged from their own bytes (qemu-img would open the
/// files they name — a FIFO there would hang the probe); a binary VMDK is asked of
/// `qemu-img info`. VHDX, VDI and VPC images name no other file qemu opens.
pub fn refuse_external_files(path: &Path, format: ImageFormat) -> Result<(), Failure> {
    use std::os::unix::fs::FileExt;
    let refuse = |what: &str| -> Result<(), Failure> {
        Err(Failure::user(format!(
            "{} looks like a {} image that reads another file ({what}); if it is one, say so with \
             `--format {}` (the other file is read too); to import its bytes as they are, `--format raw`",
            path.display(),
            format.qemu_name(),
            format.qemu_name()
        )))
    };
    let f = std::fs::File::open(path).map_err(|e| Failure::user(format!("cannot open {}: {e}", path.display())))?;
    let mut head = [0u8; 512];
    let n = f.read_at(&mut head, 0).map_err(|e| Failure::user(format!("cannot read {}: {e}", path.display())))?;
    let head = &head[..n];
    let be64 = |at: usize| head.get(at..at + 8).map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
    let be32 = |at: usize| head.get(at..at + 4).map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])));
    match format {
        ImageFormat::Qcow2 => {
            // Header: version at 4, backing_file_offset at 8, backing_file_size at 16; from
            // version 3, incompatible_features at 72, whose bit 2 is "external data file".
            if be64(8) != 0 && be32(16) != 0 {
                return refuse("a backing file");
            }
            if be32(4) >= 3 && be64(72) & (1 << 2) != 0 {
                return refuse("an external data file");
            }
            Ok(())
        }
        ImageFormat::Vmdk if head.starts_with(b"# Disk DescriptorFile") => {
            refuse("the extent files its descriptor names")
        }
        ImageFormat::Vmdk => {
            let mut cmd = qemu_img();
            cmd.args(["info", "--output=json", "-f", "vmdk"]).arg(path);
            let out = run(cmd, &format!("reading {} as vmdk", path.display()))?;
            let v: serde_json::Value = serde_json::from_slice(&out)
                .map_err(|e| Failure::system(format!("qemu-img info gave output that is not JSON: {e}")))?;
            if v.get("backing-filename").is_some() {
                return refuse("a parent image");
            }
            let own = std::fs::canonicalize(path).ok();
            let other = v
                .pointer("/format-specific/data/extents")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
                .filter_map(|x| x.get("filename").and_then(|f| f.as_str()))
                .find(|f| std::fs::canonicalize(f).ok() != own);
            match other {
                Some(file) => refuse(file),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Serves one device as the default export of a private NBD socket while `body` runs with
/// the socket's `nbd+unix` URI; the server is stopped (and its connections ended) afterwards.
fn with_private_export<T>(
    dev: Arc<dyn BlockDevice>,
    body: impl FnOnce(&str) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let dir = tempfile::Builder::new()
        .prefix("parallax-convert-")
        .tempdir()
        .map_err(|e| Failure::system(format!("creating a private directory: {e}")))?;
    let path = dir.path().join("nbd.sock");
    let listener =
        UnixListener::bind(&path).map_err(|e| Failure::system(format!("binding {}: {e}", path.display())))?;
    let provider = Arc::new(OneExport(dev));
    let limits = nbd::Limits { max_connections: 4, ..nbd::Limits::default() };
    let server = nbd::Server::spawn_unix(listener, provider, limits)
        .map_err(|e| Failure::system(format!("serving {}: {e}", path.display())))?;
    let uri = format!("nbd+unix:///?socket={}", path.display());
    let out = body(&uri);
    server.shutdown();
    server.wait();
    out
}

/// An NBD export provider with one export, opened under any name.
struct OneExport(Arc<dyn BlockDevice>);

impl nbd::ExportProvider for OneExport {
    fn list(&self) -> Vec<nbd::ExportInfo> {
        vec![nbd::ExportInfo::new("", "")]
    }

    fn open(&self, _name: &str) -> Result<Arc<dyn BlockDevice>, nbd::OpenError> {
        Ok(self.0.clone())
    }
}

/// Fills VDI `id` from the image at `path` in `format` with `qemu-img convert` (one
/// [`vdi::Import`]: all or nothing). Returns what the import did.
pub fn import(
    reg: &Arc<vdi::Registry>,
    id: vdi::VdiId,
    path: &Path,
    format: ImageFormat,
) -> Result<vdi::ImportStats, Failure> {
    let size = virtual_size(path, format)?;
    reg.check_image_fits(id, size)?;
    let dev = Arc::new(vdi::ImportDevice::new(reg.begin_import(id)?, size)?);
    let what = format!("importing {} ({})", path.display(), format.qemu_name());
    with_private_export(dev.clone(), |uri| {
        let mut cmd = qemu_img();
        // -n: the target exists (it is the import); zero areas are written as zeroes, which
        // the import turns into unmapped blocks only where the VDI held data.
        cmd.args(["convert", "-n", "-f", format.qemu_name(), "-O", "raw"]).arg(path).arg(uri);
        run(cmd, &what).map(|_| ())
    })?;
    Ok(dev.finish()?)
}

/// Writes `dev` (a VDI or snapshot, read-only) to a new image file `out` in `format` with
/// `qemu-img convert`; holes stay holes.
pub fn export(dev: Arc<dyn BlockDevice>, out: &Path, format: ImageFormat) -> Result<(), Failure> {
    let what = format!("exporting to {} ({})", out.display(), format.qemu_name());
    with_private_export(dev, |uri| {
        let mut cmd = qemu_img();
        cmd.args(["convert", "-f", "raw", "-O", format.qemu_name()]).arg(uri).arg(out);
        run(cmd, &what).map(|_| ())
    })
}

/// Reads up to [`SNIFF_LEN`] bytes from the start of a stream, for [`sniff`]; the caller
/// feeds them back ahead of the rest.
pub fn read_head(r: &mut dyn Read) -> std::io::Result<Vec<u8>> {
    let mut head = vec![0u8; SNIFF_LEN];
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(n);
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_known_by_their_magic() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        assert_eq!(sniff(b"QFI\xfb\0\0\0\x03", None), ImageFormat::Qcow2);
        assert_eq!(sniff(b"KDMV\x01", None), ImageFormat::Vmdk);
        assert_eq!(sniff(b"# Disk DescriptorFile\n", None), ImageFormat::Vmdk);
        assert_eq!(sniff(b"vhdxfile", None), ImageFormat::Vhdx);
        assert_eq!(sniff(&vdi, None), ImageFormat::Vdi);
        assert_eq!(sniff(b"conectix", None), ImageFormat::Vpc);
        assert_eq!(sniff(&[0u8; 512], Some(b"conectix\0\0")), ImageFormat::Vpc);
        assert_eq!(sniff(&[0u8; 512], Some(&[0u8; 512])), ImageFormat::Raw);
        assert_eq!(sniff(b"QFI", None), ImageFormat::Raw, "too short to be qcow2");
    }
}
