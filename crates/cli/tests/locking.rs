//! Locking: writers open the store exclusively, readers shared; a second writer is refused
//! with a clear message, or waits with --wait. The test process holds the lock itself.

mod common;

use std::time::Duration;

use blockstore::{BlockStore, OpenOptions};
use common::Env;

fn hold(env: &Env, read_only: bool) -> BlockStore {
    BlockStore::open_path(&env.store, &OpenOptions { read_only, ..OpenOptions::default() }, None)
        .expect("hold the store")
}

fn store_with_a_vdi() -> Env {
    let env = Env::new();
    env.ok(&["init", "--journal", "1M"]);
    env.ok(&["create", "golden", "--size", "1M"]);
    env
}

#[test]
fn a_second_writer_is_refused_while_the_store_is_held() {
    let env = store_with_a_vdi();
    let before = env.store_bytes();
    let held = hold(&env, false);
    for args in [&["create", "x"][..], &["snap", "golden"], &["rename", "golden", "y"], &["delete", "golden"]] {
        let err = env.fails(args, 2, "in use by another process");
        assert!(err.contains("--wait"), "{err}");
    }
    // Readers are refused too while a writer holds it.
    env.fails(&["list"], 2, "is being changed");
    drop(held);
    assert!(env.store_bytes() == before);
    env.ok(&["create", "x"]);
}

#[test]
fn readers_share_and_writers_wait_for_them() {
    let env = store_with_a_vdi();
    let held = hold(&env, true);
    assert!(env.ok(&["list"]).contains("golden"));
    assert!(env.ok(&["info", "golden"]).contains("golden"));
    env.fails(&["snap", "golden"], 2, "in use by another process");
    env.fails(&["check", "--repair"], 2, "in use by another process");
    assert!(env.ok(&["check"]).contains("consistent"));
    drop(held);
}

#[test]
fn wait_queues_behind_the_holder() {
    let env = store_with_a_vdi();
    let held = hold(&env, false);
    let mut child = env
        .cmd(&["--wait", "create", "queued"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(child.try_wait().unwrap().is_none(), "--wait did not wait for the lock");
    drop(held);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("waiting for"));
    assert!(env.ok(&["list"]).contains("queued"));
}
