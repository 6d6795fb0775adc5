//! A request's data as its caller holds it: one buffer, or several (a guest's scattered pages)
//! addressed as one run of bytes, so a vectored request reaches the medium without a bounce
//! copy.

use std::io::{IoSlice, IoSliceMut};
use std::ops::Range;

/// The buffers a read fills, in order.
pub(crate) struct ReadBufs<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    ends: Ends,
}

impl<'a, 'b> ReadBufs<'a, 'b> {
    /// The run of bytes made of `bufs`, one after another.
    pub(crate) fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        let ends = Ends::of(bufs.iter().map(|b| b.len()));
        ReadBufs { bufs, ends }
    }

    /// Total length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Bytes `range` of the run, as the pieces of the buffers it covers, in order.
    pub(crate) fn slices(&mut self, range: Range<usize>) -> Vec<IoSliceMut<'_>> {
        let (first, parts) = self.ends.parts(range);
        self.bufs[first..]
            .iter_mut()
            .zip(parts)
            .filter(|(_, part)| !part.is_empty())
            .map(|(b, part)| IoSliceMut::new(&mut b[part]))
            .collect()
    }

    /// Zeroes bytes `range` of the run.
    pub(crate) fn zero(&mut self, range: Range<usize>) {
        for mut s in self.slices(range) {
            s.fill(0);
        }
    }
}

/// Where each buffer of a run ends: which buffers a range of the run covers, found by a
/// binary search (a request may bring many buffers, and each piece of it looks its bytes up).
struct Ends(Vec<usize>);

impl Ends {
    /// The ends of buffers of lengths `lens`, one after another.
    fn of(lens: impl Iterator<Item = usize>) -> Ends {
        Ends(
            lens.scan(0, |end, n| {
                *end += n;
                Some(*end)
            })
            .collect(),
        )
    }

    /// Length of the run.
    fn len(&self) -> usize {
        self.0.last().copied().unwrap_or(0)
    }

    /// For bytes `range` of the run: the first buffer it touches, and the part of that buffer
    /// and of each following one up to the last it touches (empty for an empty buffer).
    fn parts(&self, range: Range<usize>) -> (usize, impl Iterator<Item = Range<usize>> + '_) {
        debug_assert!(range.start <= range.end && range.end <= self.len());
        let first = self.0.partition_point(|&end| end <= range.start);
        let start_of_first = if first == 0 { 0 } else { self.0[first - 1] };
        let starts = std::iter::once(start_of_first).chain(self.0[first..].iter().copied());
        let parts = starts
            .zip(&self.0[first..])
            .take_while(move |&(start, _)| start < range.end)
            .map(move |(start, &end)| range.start.max(start) - start..range.end.min(end) - start);
        (first, parts)
    }
}

/// The buffers a write takes its data from, in order.
pub(crate) struct WriteBufs<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    ends: Ends,
}

impl<'a, 'b> WriteBufs<'a, 'b> {
    /// The run of bytes made of `bufs`, one after another.
    pub(crate) fn new(bufs: &'a [IoSlice<'b>]) -> Self {
        let ends = Ends::of(bufs.iter().map(|b| b.len()));
        WriteBufs { bufs, ends }
    }

    /// Total length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Bytes `range` of the run, as the pieces of the buffers it covers, in order.
    pub(crate) fn slices(&self, range: Range<usize>) -> Vec<IoSlice<'a>> {
        let bufs: &'a [IoSlice<'b>] = self.bufs;
        let (first, parts) = self.ends.parts(range);
        bufs[first..]
            .iter()
            .zip(parts)
            .filter(|(_, part)| !part.is_empty())
            .map(|(b, part)| {
                let whole: &'a [u8] = b;
                IoSlice::new(&whole[part])
            })
            .collect()
    }

    /// Copies `dst.len()` bytes of the run, from byte `from` on, into `dst`.
    pub(crate) fn copy_to(&self, from: usize, dst: &mut [u8]) {
        let mut at = 0;
        for s in self.slices(from..from + dst.len()) {
            dst[at..at + s.len()].copy_from_slice(&s);
            at += s.len();
        }
        debug_assert_eq!(at, dst.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cross_buffer_edges_and_skip_empty_buffers() {
        let (a, b, c) = ([1u8; 3], [0u8; 0], [2u8; 5]);
        let bufs = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        let w = WriteBufs::new(&bufs);
        assert_eq!(w.len(), 8);
        let lens: Vec<usize> = w.slices(2..5).iter().map(|s| s.len()).collect();
        assert_eq!(lens, [1, 2]);
        let mut dst = [0u8; 4];
        w.copy_to(1, &mut dst);
        assert_eq!(dst, [1, 1, 2, 2]);
        assert!(w.slices(3..3).is_empty());

        let (mut x, mut y) = ([9u8; 4], [9u8; 4]);
        let mut bufs = [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)];
        {
            let mut r = ReadBufs::new(&mut bufs);
            r.zero(3..6);
            assert_eq!(r.len(), 8);
        }
        assert_eq!((x, y), ([9, 9, 9, 0], [0, 0, 9, 9]));
    }
}
