//! A simulated blkfront in its own process, for testing the backend across a process boundary.
//!
//! Usage: `blktap-sim-frontend <shared-file> <unix-socket> <rounds>`
//!
//! The shared file holds the ring (page 0) then 8 grant pages (gref k = file page k + 1). The
//! process initialises the ring, then each round writes 4 pages of a pattern to the disk and
//! reads them back into 4 other pages, notifying the backend over the socket when the ring's
//! hold-off logic says so (one byte per notification, in both directions). Exits 0 if every
//! response is OKAY and the data read back matches.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use blktap::abi::{Abi, OP_READ, OP_WRITE, PAGE_SIZE, RSP_OKAY, Request, Segment};
use blktap::front::FrontRing;
use blktap::shm::SharedMem;
use zerocopy::IntoBytes;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn request(op: u8, id: u64, sector: u64, gref: u32) -> Vec<u8> {
    let mut r = Request { operation: op, nr_segments: 1, id, sector_number: sector, ..Default::default() };
    r.seg[0] = Segment { gref, first_sect: 0, last_sect: 7, pad: 0 };
    r.as_bytes().to_vec()
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, file, sock, rounds] = args.as_slice() else {
        return Err("usage: blktap-sim-frontend <shared-file> <unix-socket> <rounds>".into());
    };
    let rounds: u64 = rounds.parse()?;
    let f = OpenOptions::new().read(true).write(true).open(file)?;
    let ring = Arc::new(SharedMem::from_file(&f, 0, PAGE_SIZE)?);
    let pages = SharedMem::from_file(&f, PAGE_SIZE as u64, 8 * PAGE_SIZE)?;
    let mut front = FrontRing::init(ring, Abi::X86_64)?;
    let mut sock = UnixStream::connect(sock)?;
    let mut id = 0u64;
    for round in 0..rounds {
        for g in 0..4usize {
            let byte = (round as u8).wrapping_mul(31).wrapping_add(g as u8);
            pages.write(g * PAGE_SIZE, &[byte; PAGE_SIZE])?;
            pages.write((g + 4) * PAGE_SIZE, &[0; PAGE_SIZE])?;
        }
        let base = (round % 16) * 32;
        for g in 0..4u32 {
            id += 1;
            front.put_request(&request(OP_WRITE, id, base + g as u64 * 8, g))?;
        }
        for g in 0..4u32 {
            id += 1;
            front.put_request(&request(OP_READ, id, base + g as u64 * 8, g + 4))?;
        }
        if front.push_requests_and_check_notify()? {
            sock.write_all(&[1])?;
        }
        let mut got = 0;
        while got < 8 {
            while let Some((_, _, status)) = front.take_response()? {
                if status != RSP_OKAY {
                    return Err(format!("round {round}: status {status}").into());
                }
                got += 1;
            }
            if got < 8 && !front.final_check_for_responses()? {
                let mut b = [0u8; 1];
                if sock.read(&mut b)? == 0 {
                    return Err("backend went away".into());
                }
            }
        }
        for g in 0..4usize {
            let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
            pages.read(g * PAGE_SIZE, &mut a)?;
            pages.read((g + 4) * PAGE_SIZE, &mut b)?;
            if a != b {
                return Err(format!("round {round}: page {g} read back differs").into());
            }
        }
    }
    Ok(())
}
