//! `vdi`'s side: send a command line and this process's stdin, stdout and stderr, wait for
//! the exit code.

use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage};

use crate::wire::{self, REPLY_LEN, bad};

/// Sends `args` with this process's stdin, stdout and stderr to the daemon at `socket` and
/// waits for the exit code. `Ok(None)`: nobody is listening there (no daemon, stale socket),
/// nothing was sent. `Err`: the request was sent but no exit code came back.
pub fn forward(socket: &Path, args: &[String]) -> io::Result<Option<i32>> {
    let Ok(stream) = UnixStream::connect(socket) else { return Ok(None) };
    let msg = wire::encode_request(args)?;
    let (stdin, stdout, stderr) = (io::stdin(), io::stdout(), io::stderr());
    let fds = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(bad("cannot attach the descriptors"));
    }
    let sent = loop {
        match rustix::net::sendmsg(&stream, &[IoSlice::new(&msg)], &mut control, rustix::net::SendFlags::empty()) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            // The daemon went away between connect and send: nothing ran, run locally.
            Err(_) => return Ok(None),
        }
    };
    let mut w = &stream;
    w.write_all(&msg[sent..])?;
    let mut answer = [0u8; REPLY_LEN];
    let mut r = &stream;
    r.read_exact(&mut answer).map_err(|e| {
        io::Error::new(e.kind(), format!("parallaxd did not report how the command ended ({e}); it may have stopped"))
    })?;
    Ok(Some(wire::decode_reply(&answer)?))
}
