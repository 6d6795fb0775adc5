//! Data patterns and the verification model of simulated guests.
//!
//! Every 512-byte sector a test writes names what it is: the golden image's sectors carry
//! `GOLD` and their sector number; a guest's sectors carry `GUST`, the guest number, the sector
//! and a version. So a wrong read says exactly what it saw — another guest's data, a stale
//! version, golden data where the guest wrote, or garbage — instead of just "mismatch".

use blktap::abi::SECTOR_SIZE;

const GOLD: &[u8; 4] = b"GOLD";
const GUEST: &[u8; 4] = b"GUST";

fn fill(buf: &mut [u8], mut seed: u64) {
    for chunk in buf.chunks_mut(8) {
        // splitmix64: cheap, and every sector's filler differs.
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// True if the golden image has data at `sector`; every fourth 4 KiB block is left a hole so
/// clones also share unallocated ranges.
pub fn golden_has_data(sector: u64) -> bool {
    (sector / 8) % 4 != 3
}

/// Writes the golden content of `sector` into `buf` (512 bytes): a pattern, or zeros in holes.
pub fn golden_sector(sector: u64, buf: &mut [u8]) {
    if !golden_has_data(sector) {
        buf.fill(0);
        return;
    }
    buf[..4].copy_from_slice(GOLD);
    buf[4..12].copy_from_slice(&sector.to_le_bytes());
    fill(&mut buf[12..SECTOR_SIZE], sector ^ 0x601d);
}

/// Writes guest `guest`'s version `version` of `sector` into `buf` (512 bytes).
pub fn guest_sector(guest: u32, sector: u64, version: u64, buf: &mut [u8]) {
    buf[..4].copy_from_slice(GUEST);
    buf[4..8].copy_from_slice(&guest.to_le_bytes());
    buf[8..16].copy_from_slice(&sector.to_le_bytes());
    buf[16..24].copy_from_slice(&version.to_le_bytes());
    fill(&mut buf[24..SECTOR_SIZE], sector ^ (u64::from(guest) << 40) ^ version.rotate_left(17));
}

/// What a sector should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The golden image's content.
    Golden,
    /// Zeros (discarded).
    Zero,
    /// This guest's write with this version.
    Written(u64),
}

/// The bytes guest `guest`'s `sector` holds when it is `e`.
pub fn expect_bytes(guest: u32, sector: u64, e: Expect, buf: &mut [u8]) {
    match e {
        Expect::Golden => golden_sector(sector, buf),
        Expect::Zero => buf.fill(0),
        Expect::Written(v) => guest_sector(guest, sector, v, buf),
    }
}

impl Expect {
    fn code(self) -> u64 {
        match self {
            Expect::Golden => 0,
            Expect::Zero => 1,
            Expect::Written(v) => v.saturating_add(2),
        }
    }

    fn from_code(c: u64) -> Self {
        match c {
            0 => Expect::Golden,
            1 => Expect::Zero,
            v => Expect::Written(v - 2),
        }
    }
}

/// What a guest's disk may hold if the backend crashes now: per sector, the content made
/// durable by the last completed flush (or barrier), and every content submitted since.
#[derive(Debug, Clone)]
pub struct CrashModel {
    guest: u32,
    durable: Vec<Expect>,
    since: Vec<Vec<Expect>>,
}

const CRASH_MAGIC: &[u8; 4] = b"PXCM";

impl CrashModel {
    /// Everything in `model` is durable, nothing submitted since.
    pub fn durable(model: &Model) -> Self {
        Self { guest: model.guest, durable: model.sectors.clone(), since: vec![Vec::new(); model.sectors.len()] }
    }

    /// Records a write (or discard: `Expect::Zero`) of `count` sectors at `sector` submitted.
    pub fn submitted(&mut self, sector: u64, count: u64, e: Expect) {
        for s in &mut self.since[sector as usize..(sector + count) as usize] {
            if !s.contains(&e) {
                s.push(e);
            }
        }
    }

    /// A flush or barrier completed while nothing else was in flight: `model` is durable.
    pub fn flushed(&mut self, model: &Model) {
        self.durable.clone_from(&model.sectors);
        self.since.iter_mut().for_each(Vec::clear);
    }

    /// After a crash: which allowed content `data` (read from `sector`) is, or what is wrong.
    pub fn settle(&self, sector: u64, data: &[u8]) -> Result<Expect, String> {
        let i = sector as usize;
        let mut want = [0u8; SECTOR_SIZE];
        for &e in std::iter::once(&self.durable[i]).chain(&self.since[i]) {
            expect_bytes(self.guest, sector, e, &mut want);
            if data == want {
                return Ok(e);
            }
        }
        expect_bytes(self.guest, sector, self.durable[i], &mut want);
        Err(format!(
            "guest {}: after the crash sector {sector} holds {}; durable was {} ({} later writes allowed)",
            self.guest,
            describe(data),
            describe(&want),
            self.since[i].len()
        ))
    }

    /// Writes the model to `path` (atomically: a temporary file renamed over it).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        w.write_all(CRASH_MAGIC)?;
        w.write_all(&self.guest.to_le_bytes())?;
        w.write_all(&(self.durable.len() as u64).to_le_bytes())?;
        for (d, since) in self.durable.iter().zip(&self.since) {
            w.write_all(&d.code().to_le_bytes())?;
            w.write_all(&(since.len() as u32).to_le_bytes())?;
            for e in since {
                w.write_all(&e.code().to_le_bytes())?;
            }
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(tmp, path)
    }

    /// Reads a model written by [`CrashModel::save`] for `guest`'s disk of `sectors` sectors.
    pub fn load(path: &std::path::Path, guest: u32, sectors: u64) -> std::io::Result<Self> {
        use std::io::{Error, ErrorKind, Read};
        let bad = |m: &str| Error::new(ErrorKind::InvalidData, format!("{}: {m}", path.display()));
        let mut r = std::io::BufReader::new(std::fs::File::open(path)?);
        let mut u32b = [0u8; 4];
        let mut u64b = [0u8; 8];
        r.read_exact(&mut u32b)?;
        if &u32b != CRASH_MAGIC {
            return Err(bad("not a crash model"));
        }
        r.read_exact(&mut u32b)?;
        r.read_exact(&mut u64b)?;
        if u32::from_le_bytes(u32b) != guest || u64::from_le_bytes(u64b) != sectors {
            return Err(bad("for another guest or disk size"));
        }
        let mut m = Self { guest, durable: Vec::new(), since: Vec::new() };
        for _ in 0..sectors {
            r.read_exact(&mut u64b)?;
            m.durable.push(Expect::from_code(u64::from_le_bytes(u64b)));
            r.read_exact(&mut u32b)?;
            let n = u32::from_le_bytes(u32b);
            if n > 1 << 20 {
                return Err(bad("implausible entry count"));
            }
            let mut since = Vec::with_capacity(n as usize);
            for _ in 0..n {
                r.read_exact(&mut u64b)?;
                since.push(Expect::from_code(u64::from_le_bytes(u64b)));
            }
            m.since.push(since);
        }
        Ok(m)
    }
}

/// Describes what a sector's bytes look like, for error messages.
pub fn describe(buf: &[u8]) -> String {
    let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]));
    if buf.iter().all(|&b| b == 0) {
        "zeros".into()
    } else if buf.starts_with(GOLD) {
        format!("golden data of sector {}", u64_at(4))
    } else if buf.starts_with(GUEST) {
        let guest = u32::from_le_bytes(buf[4..8].try_into().unwrap_or([0; 4]));
        format!("guest {guest}'s data for sector {} version {}", u64_at(8), u64_at(16))
    } else {
        "unrecognised bytes".into()
    }
}

/// The expected content of one guest's disk.
#[derive(Debug, Clone)]
pub struct Model {
    guest: u32,
    sectors: Vec<Expect>,
}

impl Model {
    /// A disk of `sectors` sectors that starts as the golden image.
    pub fn new(guest: u32, sectors: u64) -> Self {
        Self { guest, sectors: vec![Expect::Golden; sectors as usize] }
    }

    /// Number of sectors.
    pub fn len(&self) -> u64 {
        self.sectors.len() as u64
    }

    /// True if the disk has no sectors.
    pub fn is_empty(&self) -> bool {
        self.sectors.is_empty()
    }

    /// The bytes a write of `count` sectors at `sector` with `version` carries.
    pub fn write_data(&self, sector: u64, count: u64, version: u64) -> Vec<u8> {
        let mut data = vec![0u8; count as usize * SECTOR_SIZE];
        for (i, buf) in data.chunks_mut(SECTOR_SIZE).enumerate() {
            guest_sector(self.guest, sector + i as u64, version, buf);
        }
        data
    }

    /// Records a completed write.
    pub fn wrote(&mut self, sector: u64, count: u64, version: u64) {
        self.sectors[sector as usize..(sector + count) as usize].fill(Expect::Written(version));
    }

    /// Records a completed discard.
    pub fn discarded(&mut self, sector: u64, count: u64) {
        self.sectors[sector as usize..(sector + count) as usize].fill(Expect::Zero);
    }

    /// The expected bytes of `sector`.
    pub fn expected(&self, sector: u64, buf: &mut [u8]) {
        expect_bytes(self.guest, sector, self.sectors[sector as usize], buf);
    }

    /// What `sector` should hold.
    pub fn get(&self, sector: u64) -> Expect {
        self.sectors[sector as usize]
    }

    /// Sets what `sector` should hold (after a crash, what it was found to hold).
    pub fn set(&mut self, sector: u64, e: Expect) {
        self.sectors[sector as usize] = e;
    }

    /// Checks `data`, read from `sector`, against the model; the error says what was seen.
    pub fn check(&self, sector: u64, data: &[u8]) -> Result<(), String> {
        let mut want = [0u8; SECTOR_SIZE];
        for (i, got) in data.chunks(SECTOR_SIZE).enumerate() {
            let s = sector + i as u64;
            self.expected(s, &mut want);
            if got != want {
                return Err(format!(
                    "guest {}: sector {s} should hold {} but holds {}",
                    self.guest,
                    describe(&want),
                    describe(got)
                ));
            }
        }
        Ok(())
    }

    /// FNV-1a digest of the whole expected disk (compare with [`digest`] of an export).
    pub fn digest(&self) -> u64 {
        let mut d = Digest::new();
        let mut buf = [0u8; SECTOR_SIZE];
        for s in 0..self.len() {
            self.expected(s, &mut buf);
            d.update(&buf);
        }
        d.value()
    }
}

/// FNV-1a 64-bit, streaming.
#[derive(Debug, Clone, Copy)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest {
    /// The empty digest.
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// The digest so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// The golden image of `sectors` sectors, as bytes.
pub fn golden_image(sectors: u64) -> Vec<u8> {
    let mut out = vec![0u8; sectors as usize * SECTOR_SIZE];
    for (s, buf) in out.chunks_mut(SECTOR_SIZE).enumerate() {
        golden_sector(s as u64, buf);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_what_it_sees() {
        let mut m = Model::new(3, 64);
        let other = Model::new(4, 64);
        let img = golden_image(64);
        assert!(m.check(0, &img).is_ok());
        m.wrote(8, 2, 7);
        let mine = m.write_data(8, 2, 7);
        assert!(m.check(8, &mine).is_ok());
        let theirs = other.write_data(8, 2, 7);
        let err = m.check(8, &theirs).unwrap_err();
        assert!(err.contains("guest 4's data"), "{err}");
        let err = m.check(8, &img[8 * 512..10 * 512]).unwrap_err();
        assert!(err.contains("golden data of sector 8"), "{err}");
        m.discarded(0, 1);
        assert!(m.check(0, &[0u8; 512]).is_ok());
        // Sectors 24..32 are a hole in the golden image.
        assert!(img[24 * 512..32 * 512].iter().all(|&b| b == 0));
        assert_ne!(m.digest(), Model::new(3, 64).digest());
    }

    #[test]
    fn crash_model_allows_durable_or_later_content_and_round_trips() {
        let mut m = Model::new(2, 32);
        m.wrote(0, 2, 5);
        let mut c = CrashModel::durable(&m);
        c.submitted(0, 1, Expect::Written(6));
        c.submitted(1, 1, Expect::Zero);
        let v5 = m.write_data(0, 2, 5);
        let v6 = m.write_data(0, 1, 6);
        assert_eq!(c.settle(0, &v5[..512]), Ok(Expect::Written(5)));
        assert_eq!(c.settle(0, &v6), Ok(Expect::Written(6)));
        assert_eq!(c.settle(1, &[0u8; 512]), Ok(Expect::Zero));
        // Golden content where version 5 was made durable is a lost write.
        let err = c.settle(0, &golden_image(1)).unwrap_err();
        assert!(err.contains("golden data") && err.contains("version 5"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.state");
        c.save(&p).unwrap();
        let back = CrashModel::load(&p, 2, 32).unwrap();
        assert_eq!(back.settle(0, &v6), Ok(Expect::Written(6)));
        assert!(CrashModel::load(&p, 3, 32).is_err());
        m.wrote(0, 1, 6);
        c.flushed(&m);
        assert!(c.settle(0, &v5[..512]).is_err(), "version 5 was overwritten durably");
    }
}
