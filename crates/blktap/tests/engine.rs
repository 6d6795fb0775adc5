//! The engine against a `MemDisk`: explicit cases and a proptest over arbitrary request streams.

mod common;

use blktap::abi::*;
use blockdev::{BlockDevice, MemDisk};
use common::*;
use proptest::prelude::*;
use zerocopy::IntoBytes;

const DISK: u64 = 512 * 512; // 512 sectors
const GRANTS: usize = 8;

fn page_bytes(r: &Rig, gref: usize) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE];
    r.pages.read(gref * PAGE_SIZE, &mut b).unwrap();
    b
}

#[test]
fn write_then_read_across_segments() {
    for abi in [Abi::X86_64, Abi::X86_32] {
        let mut r = rig(abi, 0, GRANTS, DISK);
        let data: Vec<u8> = (0..PAGE_SIZE * 2).map(|i| (i * 7 % 251) as u8).collect();
        r.pages.write(0, &data).unwrap();
        // Sectors 2..=7 of page 0 then 0..=3 of page 1 -> disk sectors 10..20.
        let w = rw_bytes(abi, OP_WRITE, 1, 10, 2, &[seg(0, 2, 7), seg(1, 0, 3)]);
        let rd = rw_bytes(abi, OP_READ, 2, 10, 1, &[seg(5, 0, 7)]);
        assert_eq!(run(&mut r, &[w, rd]), vec![(1, OP_WRITE, RSP_OKAY), (2, OP_READ, RSP_OKAY)]);
        let mut disk = vec![0u8; 10 * 512];
        r.engine.device().read_at(10 * 512, &mut disk).unwrap();
        assert_eq!(&disk[..6 * 512], &data[2 * 512..PAGE_SIZE]);
        assert_eq!(&disk[6 * 512..], &data[PAGE_SIZE..PAGE_SIZE + 4 * 512]);
        let p5 = page_bytes(&r, 5);
        assert_eq!(&p5[..8 * 512], &disk[..8 * 512]);
        assert_eq!(r.engine.grants().mapped(), 0);
    }
}

#[test]
fn malformed_requests_get_errors_without_side_effects() {
    let mut r = rig(Abi::X86_64, 0, GRANTS, DISK);
    r.pages.write(0, &[0xAA; PAGE_SIZE]).unwrap();
    let a = Abi::X86_64;
    let reqs = vec![
        rw_bytes(a, OP_WRITE, 1, 0, 0, &[]),                            // no segments
        rw_bytes(a, OP_WRITE, 2, 0, 12, &[seg(0, 0, 7); 11]),           // > 11 segments
        rw_bytes(a, OP_WRITE, 3, 0, 1, &[seg(0, 5, 4)]),                // first > last
        rw_bytes(a, OP_WRITE, 4, 0, 1, &[seg(0, 0, 8)]),                // last > 7
        rw_bytes(a, OP_WRITE, 5, 511, 1, &[seg(0, 0, 1)]),              // past the end
        rw_bytes(a, OP_WRITE, 6, u64::MAX / 2, 1, &[seg(0, 0, 0)]),     // offset overflow
        rw_bytes(a, OP_WRITE, 7, 0, 2, &[seg(0, 0, 7), seg(99, 0, 7)]), // bad grant
        rw_bytes(a, OP_READ, 8, 0, 1, &[seg(u32::MAX, 0, 7)]),          // bad grant
        rw_bytes(a, OP_RESERVED_1, 9, 0, 1, &[seg(0, 0, 7)]),           // unknown op
        rw_bytes(a, 0xff, 10, 0, 1, &[seg(0, 0, 7)]),                   // unknown op
        discard_bytes(11, 500, 13),                                     // past the end
        discard_bytes(12, u64::MAX, 1),                                 // overflow
        rw_bytes(a, OP_FLUSH_DISKCACHE, 13, 0, 12, &[]),                // flush, > 11 segments
    ];
    let rsps = run(&mut r, &reqs);
    let want = [
        RSP_ERROR,
        RSP_ERROR,
        RSP_ERROR,
        RSP_ERROR,
        RSP_ERROR,
        RSP_ERROR,
        RSP_ERROR,
        RSP_ERROR,
        RSP_EOPNOTSUPP,
        RSP_EOPNOTSUPP,
        RSP_ERROR,
        RSP_ERROR,
        RSP_ERROR,
    ];
    assert_eq!(rsps.len(), want.len());
    for (i, ((id, _, st), w)) in rsps.iter().zip(want).enumerate() {
        assert_eq!((*id, *st), (i as u64 + 1, w), "request {}", i + 1);
    }
    assert_eq!(r.engine.device().allocated_blocks(), 0, "a malformed write reached the disk");
    assert_eq!(r.engine.grants().mapped(), 0);
}

#[test]
fn flush_barrier_discard_and_read_only() {
    let mut r = rig(Abi::X86_64, 0, GRANTS, DISK);
    r.pages.write(0, &[7; PAGE_SIZE]).unwrap();
    let a = Abi::X86_64;
    let rsps = run(
        &mut r,
        &[
            // Linux blkfront sends empty flushes with the block layer's sector (sector_t)-1;
            // refusing them would make the guest stop flushing for good.
            rw_bytes(a, OP_FLUSH_DISKCACHE, 1, u64::MAX, 0, &[]),
            rw_bytes(a, OP_WRITE_BARRIER, 2, u64::MAX, 0, &[]),
            rw_bytes(a, OP_WRITE_BARRIER, 3, 8, 1, &[seg(0, 0, 7)]), // barrier carrying data
            discard_bytes(4, 8, 4),
            discard_bytes(5, 0, 0),
        ],
    );
    assert!(rsps.iter().all(|r| r.2 == RSP_OKAY), "{rsps:?}");
    let mut b = vec![0u8; 4096];
    r.engine.device().read_at(8 * 512, &mut b).unwrap();
    assert!(b[..2048].iter().all(|&x| x == 0));
    assert!(b[2048..].iter().all(|&x| x == 7));

    // A read-only device refuses writes and discards but serves reads.
    let ring = std::sync::Arc::new(blktap::shm::SharedMem::anonymous(PAGE_SIZE).unwrap());
    let pages = std::sync::Arc::new(blktap::shm::SharedMem::anonymous(PAGE_SIZE).unwrap());
    let mut front = blkfront_sim::front::FrontRing::init(ring.clone(), a).unwrap();
    let mut back = blktap::ring::BackRing::new(ring, a).unwrap();
    let engine = blktap::engine::Engine::new(
        MemDisk::new(DISK).into_read_only(),
        blktap::grant::SimGrantTable::new(pages).unwrap(),
    );
    front.put_request(&rw_bytes(a, OP_WRITE, 1, 0, 1, &[seg(0, 0, 7)])).unwrap();
    front.put_request(&discard_bytes(2, 0, 8)).unwrap();
    front.put_request(&rw_bytes(a, OP_READ, 3, 0, 1, &[seg(0, 0, 7)])).unwrap();
    // Flushing a read-only disk is fine (there is nothing to flush), not an error.
    front.put_request(&rw_bytes(a, OP_FLUSH_DISKCACHE, 4, u64::MAX, 0, &[])).unwrap();
    front.push_requests_and_check_notify().unwrap();
    engine.serve(&mut back).unwrap();
    let got: Vec<_> = std::iter::from_fn(|| front.take_response().unwrap()).map(|r| r.2).collect();
    assert_eq!(got, vec![RSP_ERROR, RSP_ERROR, RSP_OKAY, RSP_OKAY]);
}

#[test]
fn indirect_requests() {
    let mut r = rig(Abi::X86_64, 0, GRANTS, DISK);
    // Page 7 holds the segment array: 20 segments over data pages 0..4.
    let segs: Vec<Segment> = (0..20).map(|i| seg(i % 4, 0, 7)).collect();
    r.pages.write(7 * PAGE_SIZE, segs.as_bytes()).unwrap();
    let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i / 512) as u8).collect();
    r.pages.write(0, &data).unwrap();
    let mut req = IndirectRequest {
        operation: OP_INDIRECT,
        indirect_op: OP_WRITE,
        nr_segments: 20,
        id: 1,
        sector_number: 16,
        ..Default::default()
    };
    req.indirect_grefs[0] = 7;
    let mut bad = req;
    bad.id = 2;
    bad.indirect_grefs[0] = 99;
    let mut too_many = req;
    too_many.id = 3;
    too_many.nr_segments = 5000;
    let mut flush = req;
    flush.id = 4;
    flush.indirect_op = OP_FLUSH_DISKCACHE;
    let rsps = run(
        &mut r,
        &[req.as_bytes().to_vec(), bad.as_bytes().to_vec(), too_many.as_bytes().to_vec(), flush.as_bytes().to_vec()],
    );
    // An indirect request is answered with the operation it carries (Linux blkfront disables
    // the disk on any other), even when refused.
    assert_eq!(
        rsps,
        vec![
            (1, OP_WRITE, RSP_OKAY),
            (2, OP_WRITE, RSP_ERROR),
            (3, OP_WRITE, RSP_ERROR),
            (4, OP_FLUSH_DISKCACHE, RSP_EOPNOTSUPP)
        ]
    );
    let mut disk = vec![0u8; 20 * PAGE_SIZE];
    r.engine.device().read_at(16 * 512, &mut disk).unwrap();
    for i in 0..20 {
        let p = i % 4;
        assert_eq!(&disk[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], &data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
    }
    assert_eq!(r.engine.grants().mapped(), 0);
}

// ---------- proptest: arbitrary request streams against a model ----------

#[derive(Debug, Clone)]
enum Op {
    Rw { write: bool, sector: u64, nr: u8, segs: Vec<(u32, u8, u8)> },
    Flush,
    Discard { sector: u64, n: u64 },
    Unknown(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let seg = (0u32..GRANTS as u32 + 2, 0u8..9, 0u8..9);
    prop_oneof![
        6 => (any::<bool>(), 0u64..520, prop::collection::vec(seg, 1..12))
            .prop_map(|(write, sector, segs)| Op::Rw { write, sector, nr: segs.len() as u8, segs }),
        1 => (any::<bool>(), 0u64..520, prop_oneof![Just(0u8), Just(12u8), Just(255u8)])
            .prop_map(|(write, sector, nr)| Op::Rw { write, sector, nr, segs: vec![(0, 0, 7); 11] }),
        1 => Just(Op::Flush),
        1 => (0u64..520, 0u64..40).prop_map(|(sector, n)| Op::Discard { sector, n }),
        1 => prop_oneof![Just(4u8), Just(7u8), Just(200u8)].prop_map(Op::Unknown),
    ]
}

struct Model {
    disk: Vec<u8>,
    pages: Vec<u8>,
}

impl Model {
    fn apply(&mut self, op: &Op) -> i16 {
        match op {
            Op::Rw { write, sector, nr, segs } => {
                let n = *nr as usize;
                if n == 0 || n > 11 {
                    return RSP_ERROR;
                }
                let segs = &segs[..n];
                if segs.iter().any(|&(g, f, l)| g as usize >= GRANTS || f > l || l > 7) {
                    return RSP_ERROR;
                }
                let len: u64 = segs.iter().map(|&(_, f, l)| (l - f + 1) as u64 * 512).sum();
                if sector * 512 + len > DISK {
                    return RSP_ERROR;
                }
                let mut at = (*sector * 512) as usize;
                if *write {
                    let mut buf = Vec::new();
                    for &(g, f, l) in segs {
                        let p = g as usize * PAGE_SIZE;
                        buf.extend_from_slice(&self.pages[p + f as usize * 512..p + (l as usize + 1) * 512]);
                    }
                    self.disk[at..at + buf.len()].copy_from_slice(&buf);
                } else {
                    for &(g, f, l) in segs {
                        let p = g as usize * PAGE_SIZE;
                        let b = (l - f + 1) as usize * 512;
                        self.pages[p + f as usize * 512..p + f as usize * 512 + b]
                            .copy_from_slice(&self.disk[at..at + b]);
                        at += b;
                    }
                }
                RSP_OKAY
            }
            Op::Flush => RSP_OKAY,
            Op::Discard { sector, n } => {
                if (sector + n) * 512 > DISK {
                    return RSP_ERROR;
                }
                self.disk[(*sector * 512) as usize..((sector + n) * 512) as usize].fill(0);
                RSP_OKAY
            }
            Op::Unknown(_) => RSP_EOPNOTSUPP,
        }
    }
}

fn encode(abi: Abi, id: u64, op: &Op) -> (u8, Vec<u8>) {
    match op {
        Op::Rw { write, sector, nr, segs } => {
            let code = if *write { OP_WRITE } else { OP_READ };
            let s: Vec<Segment> = segs.iter().map(|&(g, f, l)| seg(g, f, l)).collect();
            (code, rw_bytes(abi, code, id, *sector, *nr, &s))
        }
        Op::Flush => (OP_FLUSH_DISKCACHE, rw_bytes(abi, OP_FLUSH_DISKCACHE, id, 0, 0, &[])),
        Op::Discard { sector, n } => {
            let b = match abi {
                Abi::X86_64 => discard_bytes(id, *sector, *n),
                Abi::X86_32 => X86_32DiscardRequest {
                    operation: OP_DISCARD,
                    id,
                    sector_number: *sector,
                    nr_sectors: *n,
                    ..Default::default()
                }
                .as_bytes()
                .to_vec(),
            };
            (OP_DISCARD, b)
        }
        Op::Unknown(c) => (*c, rw_bytes(abi, *c, id, 0, 1, &[seg(0, 0, 7)])),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_request_answered_and_data_matches_model(
        x86_32 in any::<bool>(),
        start in prop_oneof![Just(0u32), Just(u32::MAX - 20), any::<u32>()],
        batches in prop::collection::vec(
            (prop::collection::vec((0usize..GRANTS, any::<u8>()), 0..4), prop::collection::vec(op(), 0..32)),
            1..5,
        ),
    ) {
        let abi = if x86_32 { Abi::X86_32 } else { Abi::X86_64 };
        let mut r = rig(abi, start, GRANTS, DISK);
        let mut model = Model { disk: vec![0; DISK as usize], pages: vec![0; GRANTS * PAGE_SIZE] };
        let mut id = 1000u64;
        for (fills, ops) in &batches {
            for &(g, seed) in fills {
                let bytes: Vec<u8> = (0..PAGE_SIZE).map(|i| seed.wrapping_add((i / 512) as u8)).collect();
                r.pages.write(g * PAGE_SIZE, &bytes).unwrap();
                model.pages[g * PAGE_SIZE..(g + 1) * PAGE_SIZE].copy_from_slice(&bytes);
            }
            let mut reqs = Vec::new();
            let mut want = Vec::new();
            for op in ops {
                id += 1;
                let (code, bytes) = encode(abi, id, op);
                reqs.push(bytes);
                want.push((id, code, model.apply(op)));
            }
            let got = run(&mut r, &reqs);
            prop_assert_eq!(got, want);
        }
        let mut disk = vec![0u8; DISK as usize];
        r.engine.device().read_at(0, &mut disk).unwrap();
        prop_assert!(disk == model.disk, "disk differs from model");
        let mut pages = vec![0u8; GRANTS * PAGE_SIZE];
        r.pages.read(0, &mut pages).unwrap();
        prop_assert!(pages == model.pages, "grant pages differ from model");
        prop_assert_eq!(r.engine.grants().mapped(), 0);
    }
}
