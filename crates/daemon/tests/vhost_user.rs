//! vhost-user-blk with a real VMM: QEMU connects to parallaxd's socket (the device is realised
//! with shared guest memory, the CPU stays paused), which opens the VDI for as long as QEMU is
//! connected. One writer per VDI holds across transports, and a restarted QEMU is served again.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A paused QEMU whose only device is a vhost-user-blk disk on `socket`.
fn qemu_on(socket: &std::path::Path, log: &std::path::Path) -> Child {
    Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-M", "q35", "-m", "64", "-nodefaults", "-nographic", "-S"])
        .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-numa", "node,memdev=mem"])
        .args(["-chardev", &format!("socket,id=disk,path={}", socket.display())])
        .args(["-device", "vhost-user-blk-pci,chardev=disk,num-queues=2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start qemu-system-x86_64")
}

/// Waits until `what` holds, or fails after 20 s with the daemon's log.
fn wait_for(d: &Daemon, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; daemon log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn nbd_write(d: &Daemon) -> std::process::Output {
    run("qemu-io", &["-f", "raw", &d.uri("disk"), "-c", "write -P 0x42 0 4k"])
}

#[test]
fn a_vmm_on_vhost_user_holds_the_vdi_and_a_restarted_one_is_served_again() {
    need("qemu-system-x86_64");
    need("qemu-io");
    let (dir, store) = Daemon::prepare(32 * MIB);
    let socket = dir.path().join("disk.sock");
    let socket_arg = format!("{}=disk", socket.display());
    let d = Daemon::start(dir, store, &["--vhost-user-blk", &socket_arg]);
    let qlog = d.dir.path().join("qemu.log");
    // While nothing is connected, NBD may write.
    assert!(nbd_write(&d).status.success());
    let mut q = qemu_on(&socket, &qlog);
    wait_for(&d, "QEMU to take the VDI", || !nbd_write(&d).status.success());
    let out = nbd_write(&d);
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("one writer at a time"), "{text}");
    // QEMU goes away: the VDI is free again.
    q.kill().unwrap();
    q.wait().unwrap();
    wait_for(&d, "the VDI to be released", || nbd_write(&d).status.success());
    // A restarted QEMU is served again and holds the VDI again.
    let mut q = qemu_on(&socket, &qlog);
    wait_for(&d, "the restarted QEMU to take the VDI", || !nbd_write(&d).status.success());
    assert!(q.try_wait().unwrap().is_none(), "QEMU exited: {}", std::fs::read_to_string(&qlog).unwrap_or_default());
    // parallaxd stops cleanly with the VMM still connected (its queues are stopped first).
    assert_eq!(d.stop().0, 0);
    q.kill().unwrap();
    q.wait().unwrap();
}
