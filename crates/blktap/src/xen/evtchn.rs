//! Interdomain event channels through `/dev/xen/evtchn`: [`XenEventChannel`].
//!
//! Each channel gets its own open of the device, so every port read from it is ours. The
//! kernel masks a port when it fires; reading the port number and writing it back unmasks it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::ioctl::{check, ioc_none};
use crate::event::{EventChannel, Wake};
use crate::{Error, Result};

/// Where the event channel device lives.
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
struct BindInterdomain {
    remote_domain: u32,
    remote_port: u32,
}

/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify` (both one port).
#[repr(C)]
struct PortArg {
    port: u32,
}

const _: () = assert!(size_of::<BindInterdomain>() == 8);
const _: () = assert!(size_of::<PortArg>() == 4);

/// `IOCTL_EVTCHN_BIND_INTERDOMAIN`: returns the local port.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 = ioc_none(b'E', 1, size_of::<BindInterdomain>());
/// `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_EVTCHN_UNBIND: u32 = ioc_none(b'E', 3, size_of::<PortArg>());
/// `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_EVTCHN_NOTIFY: u32 = ioc_none(b'E', 4, size_of::<PortArg>());

/// Our end of an interdomain event channel to a frontend.
#[derive(Debug)]
pub struct XenEventChannel {
    dev: File,
    port: u32,
}

impl XenEventChannel {
    /// Binds to port `remote_port` of domain `remote_domid` through `/dev/xen/evtchn`.
    pub fn bind(remote_domid: u32, remote_port: u32) -> Result<Self> {
        Self::bind_path(Path::new(EVTCHN_PATH), remote_domid, remote_port)
    }

    /// Binds through the event channel device at `path`.
    pub fn bind_path(path: &Path, remote_domid: u32, remote_port: u32) -> Result<Self> {
        let dev =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK).open(path)?;
        let mut op = BindInterdomain { remote_domain: remote_domid, remote_port };
        // SAFETY: `op` is a live `#[repr(C)]` value with the layout of the kernel's
        // `struct ioctl_evtchn_bind_interdomain` (size checked above); the kernel only reads it.
        let ret = unsafe {
            libc::ioctl(dev.as_raw_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN as _, &mut op as *mut BindInterdomain)
        };
        let port = check(ret).map_err(|e| {
            Error::Protocol(format!("cannot bind event channel {remote_port} of domain {remote_domid}: {e}"))
        })?;
        Ok(Self { dev, port: port as u32 })
    }

    /// Our local port.
    pub fn local_port(&self) -> u32 {
        self.port
    }

    fn port_ioctl(&self, request: u32) -> std::io::Result<()> {
        let mut op = PortArg { port: self.port };
        // SAFETY: `op` is a live `#[repr(C)]` value with the layout of the kernel's
        // `struct ioctl_evtchn_notify` / `struct ioctl_evtchn_unbind` (one u32, size checked
        // above); the kernel only reads it.
        let ret = unsafe { libc::ioctl(self.dev.as_raw_fd(), request as _, &mut op as *mut PortArg) };
        check(ret).map(drop)
    }
}

impl EventChannel for XenEventChannel {
    fn notify(&self) -> Result<()> {
        self.port_ioctl(IOCTL_EVTCHN_NOTIFY).map_err(Error::Io)
    }

    fn take(&self) -> Result<Wake> {
        let mut buf = [0u8; 256];
        let n = match (&self.dev).read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return Ok(Wake::TimedOut),
            Err(e) => return Err(Error::Io(e)),
        };
        let fired = buf[..n - n % 4].chunks_exact(4).any(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) == self.port);
        if !fired {
            return Ok(Wake::TimedOut);
        }
        // Unmask our port so the next notification is delivered.
        (&self.dev).write_all(&self.port.to_ne_bytes())?;
        Ok(Wake::Notified)
    }

    fn readable_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

impl Drop for XenEventChannel {
    fn drop(&mut self) {
        let _ = self.port_ioctl(IOCTL_EVTCHN_UNBIND);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_linux_header() {
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
    }

    #[test]
    fn binding_without_xen_fails_cleanly() {
        assert!(matches!(XenEventChannel::bind_path(Path::new("/nonexistent/evtchn"), 1, 2), Err(Error::Io(_))));
        // /dev/null rejects the ioctl.
        assert!(matches!(XenEventChannel::bind_path(Path::new("/dev/null"), 1, 2), Err(Error::Protocol(_))));
    }
}
