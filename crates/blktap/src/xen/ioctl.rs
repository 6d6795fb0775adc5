//! Linux ioctl request numbers of the Xen character devices.
//!
//! The Xen headers (`include/uapi/xen/gntdev.h`, `evtchn.h`) define their requests with
//! `_IOC(_IOC_NONE, type, nr, sizeof(struct ...))`. This is the generic Linux encoding used by
//! x86 and Arm, the architectures Xen runs dom0 on: direction in bits 30..32 (`_IOC_NONE` is
//! 0), argument size in bits 16..30, type in bits 8..16 and number in bits 0..8.

use std::io;

/// `_IOC_NONE`: the kernel does not look at the direction bits for these requests.
const IOC_NONE: u32 = 0;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_SIZEBITS: u32 = 14;

/// `_IOC(_IOC_NONE, ty, nr, size)`; fails to compile if `size` does not fit the size field.
pub const fn ioc_none(ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << IOC_SIZEBITS), "ioctl argument too large");
    (IOC_NONE << IOC_DIRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
}

/// Converts the return value of `libc::ioctl` into a result.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_matches_linux_ioc() {
        // _IOC(_IOC_NONE, 'G', 0, 24) as printed by the kernel headers' users.
        assert_eq!(ioc_none(b'G', 0, 24), 0x0018_4700);
        assert_eq!(ioc_none(b'E', 4, 4), 0x0004_4504);
        assert_eq!(ioc_none(0xff, 0xff, (1 << 14) - 1), 0x3fff_ffff);
    }
}
