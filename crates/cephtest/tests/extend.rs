//! `Pool::extend_object`, what `RadosBackend::reserve` is built on: it makes an object long
//! enough without changing any byte of it, whatever another write put there.

#[test]
fn extending_an_object_lengthens_it_and_changes_no_byte() {
    let Some(cluster) = cephtest::cluster("extending_an_object_lengthens_it_and_changes_no_byte") else { return };
    let pool = cluster.pool(&cluster.fresh_namespace("extend"));
    let len = |o: &str| {
        let mut b = vec![0u8; 1 << 16];
        pool.read(o, 0, &mut b).expect("read")
    };
    // A missing object is created at the length asked; a short one is lengthened.
    pool.extend_object("missing", 5000).unwrap();
    assert_eq!(len("missing"), 5000);
    pool.write("short", 0, &[7u8; 100]).unwrap();
    pool.extend_object("short", 4096).unwrap();
    assert_eq!(len("short"), 4096);
    let mut b = vec![0u8; 4096];
    pool.read("short", 0, &mut b).unwrap();
    assert!(b[..100].iter().all(|&x| x == 7) && b[100..].iter().all(|&x| x == 0));
    // Long enough already: nothing changes, not even a last byte that is not zero.
    pool.write("long", 0, &[9u8; 8192]).unwrap();
    pool.extend_object("long", 8192).unwrap();
    pool.extend_object("long", 100).unwrap();
    pool.extend_object("long", 0).unwrap();
    let mut b = vec![0u8; 8192];
    assert_eq!(pool.read("long", 0, &mut b).unwrap(), 8192);
    assert!(b.iter().all(|&x| x == 9), "extend_object changed a byte it had no business with");
}

/// What the RADOS store's space reservation rests on, on a pool over its quota (the I/O
/// contexts are opened full-try): a write or an extension that lengthens an object is refused
/// at once with EDQUOT; a write within an object's length, and an extension it already covers,
/// land.
#[test]
fn a_pool_over_its_quota_takes_writes_within_object_lengths_only() {
    let Some(cluster) = cephtest::cluster("a_pool_over_its_quota_takes_writes_within_object_lengths_only") else {
        return;
    };
    let scratch = cluster.scratch_pool("quota");
    let conn = rados::Cluster::connect(&cluster.ceph).expect("connecting");
    let pool = conn.pool(&scratch.name, None).expect("opening the scratch pool");
    pool.extend_object("reserved", 1 << 20).unwrap();
    scratch.set_quota_bytes(4 << 20);
    // Pass the quota, then write a new small object every 250 ms until the monitors, told the
    // usage by the mgr some seconds later, mark the pool full.
    for i in 0..8 {
        pool.write(&format!("fill.{i}"), 0, &[5u8; 1 << 20]).expect("filling under the quota");
    }
    let t0 = std::time::Instant::now();
    let mut objects = 0u32;
    let refused = loop {
        assert!(t0.elapsed() < std::time::Duration::from_secs(120), "the pool was never marked full");
        match pool.write(&format!("more.{objects}"), 0, &[5u8; 4096]) {
            Ok(()) => objects += 1,
            Err(e) => break e,
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    assert_eq!(refused.errno(), Some(libc::EDQUOT), "{refused}");
    // Within lengths: land.
    pool.write("reserved", (1 << 20) - 4096, &[6u8; 4096]).expect("a write within a reserved length");
    pool.write("fill.0", 4096, &[7u8; 4096]).expect("a write within an object's length");
    pool.extend_object("reserved", 1 << 19).expect("an extension already covered");
    // Past them: refused.
    let e = pool.write("reserved", 1 << 20, &[6u8; 4096]).expect_err("a write lengthening an object");
    assert_eq!(e.errno(), Some(libc::EDQUOT), "{e}");
    let e = pool.extend_object("reserved", 2 << 20).expect_err("an extension on a full pool");
    assert_eq!(e.errno(), Some(libc::EDQUOT), "{e}");
    let mut b = vec![0u8; 4096];
    pool.read("reserved", (1 << 20) - 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 6));
}
