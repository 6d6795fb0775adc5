//! Ring index arithmetic, wrap-around, notification hold-off and hostile producers.

mod common;

use blktap::Error;
use blktap::abi::{Abi, OP_READ, OP_WRITE, RSP_OKAY};
use common::*;

#[test]
fn wraps_around_u32_producer_indices() {
    for abi in [Abi::X86_64, Abi::X86_32] {
        // Start just below u32::MAX so indices overflow during the run.
        let mut r = rig(abi, u32::MAX - 40, 4, 1 << 20);
        let mut id = 0u64;
        for round in 0..6 {
            let batch: Vec<_> = (0..(20 + round))
                .map(|i| {
                    id += 1;
                    rw_bytes(abi, if i % 2 == 0 { OP_WRITE } else { OP_READ }, id, i as u64 * 8, 1, &[seg(i % 4, 0, 7)])
                })
                .collect();
            let first = id - batch.len() as u64 + 1;
            let rsps = run(&mut r, &batch);
            assert_eq!(rsps.len(), batch.len());
            for (k, (rid, _, st)) in rsps.iter().enumerate() {
                assert_eq!(*rid, first + k as u64);
                assert_eq!(*st, RSP_OKAY);
            }
        }
        assert!(r.back.req_cons() < 1000, "indices wrapped past u32::MAX");
        assert_eq!(r.back.req_cons(), r.back.rsp_prod_pvt());
    }
}

#[test]
fn hostile_req_prod_breaks_the_ring() {
    let mut r = rig(Abi::X86_64, 7, 1, 1 << 20);
    let size = r.back.size();
    // One more than the ring can hold.
    r.front.set_req_prod_raw(7 + size + 1).unwrap();
    assert!(matches!(r.engine.serve(&mut r.back), Err(Error::BrokenRing { .. })));
    // Once broken, stays broken even if the guest "fixes" it.
    r.front.set_req_prod_raw(7).unwrap();
    assert!(matches!(r.back.next_request(), Err(Error::BrokenRing { .. })));

    // Exactly a full ring is fine; a producer that moves backwards is not.
    let mut r = rig(Abi::X86_64, u32::MAX - 3, 1, 1 << 20);
    let size = r.back.size();
    for i in 0..size {
        r.front.put_request(&rw_bytes(Abi::X86_64, OP_READ, i as u64, 0, 1, &[seg(0, 0, 0)])).unwrap();
    }
    r.front.push_requests_and_check_notify().unwrap();
    assert_eq!(r.back.unconsumed_requests().unwrap(), size);
    for _ in 0..3 {
        r.back.next_request().unwrap().unwrap();
    }
    r.front.set_req_prod_raw((u32::MAX - 3).wrapping_add(1)).unwrap();
    assert!(matches!(r.back.next_request(), Err(Error::BrokenRing { .. })));

    for bad in [u32::MAX, 0x8000_0000] {
        let mut r = rig(Abi::X86_64, 0, 1, 1 << 20);
        r.front.set_req_prod_raw(bad).unwrap();
        assert!(r.engine.serve(&mut r.back).is_err());
    }
}

#[test]
fn responses_need_a_request() {
    let mut r = rig(Abi::X86_64, 0, 1, 4096);
    assert!(matches!(r.back.put_response(1, 0, 0), Err(Error::NoOutstandingRequest)));
}

#[test]
fn notification_hold_off() {
    let mut r = rig(Abi::X86_64, 0, 1, 1 << 20);
    // req_event starts at 1: the first request notifies.
    r.front.put_request(&rw_bytes(Abi::X86_64, OP_READ, 1, 0, 1, &[seg(0, 0, 0)])).unwrap();
    assert!(r.front.push_requests_and_check_notify().unwrap());
    // Backend has not re-armed req_event: the next push does not notify.
    r.front.put_request(&rw_bytes(Abi::X86_64, OP_READ, 2, 0, 1, &[seg(0, 0, 0)])).unwrap();
    assert!(!r.front.push_requests_and_check_notify().unwrap());
    // rsp_event is 1: the backend's push notifies; serve re-arms req_event to req_cons + 1.
    let s = r.engine.serve(&mut r.back).unwrap();
    assert_eq!(s.handled, 2);
    assert!(s.notify);
    assert!(!s.more);
    r.front.put_request(&rw_bytes(Abi::X86_64, OP_READ, 3, 0, 1, &[seg(0, 0, 0)])).unwrap();
    assert!(r.front.push_requests_and_check_notify().unwrap());
    // The frontend has not re-armed rsp_event (still 1): no notification for response 3.
    let s = r.engine.serve(&mut r.back).unwrap();
    assert_eq!(s.handled, 1);
    assert!(!s.notify);
    // Frontend consumes and re-arms; next response notifies.
    while r.front.take_response().unwrap().is_some() {}
    assert!(!r.front.final_check_for_responses().unwrap());
    r.front.put_request(&rw_bytes(Abi::X86_64, OP_READ, 4, 0, 1, &[seg(0, 0, 0)])).unwrap();
    r.front.push_requests_and_check_notify().unwrap();
    assert!(r.engine.serve(&mut r.back).unwrap().notify);
}

#[test]
fn final_check_sees_late_requests() {
    let mut r = rig(Abi::X86_64, 0, 1, 1 << 20);
    assert!(!r.back.final_check_for_requests().unwrap());
    r.front.put_request(&rw_bytes(Abi::X86_64, OP_READ, 1, 0, 1, &[seg(0, 0, 0)])).unwrap();
    assert!(r.front.push_requests_and_check_notify().unwrap());
    assert!(r.back.final_check_for_requests().unwrap());
}
