//! A request's data as its caller holds it: one buffer, or several (a guest's scattered pages)
//! addressed as one run of bytes, so a vectored request reaches the medium without a bounce
//! copy.

use std::io::{IoSlice, IoSliceMut};
use std::ops::Range;

/// The buffers a read fills, in order.
pub(crate) struct ReadBufs<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    /// Where each buffer ends in the run.
    ends: Vec<usize>,
}

impl<'a, 'b> ReadBufs<'a, 'b> {
    /// The run of bytes made of `bufs`, one after another.
    pub(crate) fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        let ends = ends(bufs.iter().map(|b| b.len()));
        ReadBufs { bufs, ends }
    }

    /// Total length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Bytes `range` of the run, as the pieces of the buffers it covers, in order.
    pub(crate) fn slices(&mut self, range: Range<usize>) -> Vec<IoSliceMut<'_>> {
        debug_assert!(range.start <= range.end && range.end <= self.len());
        let mut out = Vec::new();
        let first = first_buffer(&self.ends, range.start);
        for (b, &end) in self.bufs[first..].iter_mut().zip(&self.ends[first..]) {
            let start = end - b.len();
            if start >= range.end {
                break;
            }
            if start == end {
                continue;
            }
            let (lo, hi) = (range.start.max(start) - start, range.end.min(end) - start);
            out.push(IoSliceMut::new(&mut b[lo..hi]));
        }
        out
    }

    /// Zeroes bytes `range` of the run.
    pub(crate) fn zero(&mut self, range: Range<usize>) {
        for mut s in self.slices(range) {
            s.fill(0);
        }
    }
}

/// Running ends of buffers of lengths `lens`.
fn ends(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    lens.scan(0, |end, n| {
        *end += n;
        Some(*end)
    })
    .collect()
}

/// The first buffer holding byte `at` or later (a binary search: a request may bring many
/// buffers, and each piece of it looks its bytes up).
fn first_buffer(ends: &[usize], at: usize) -> usize {
    ends.partition_point(|&end| end <= at)
}

/// The buffers a write takes its data from, in order.
pub(crate) struct WriteBufs<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    /// Where each buffer ends in the run.
    ends: Vec<usize>,
}

impl<'a, 'b> WriteBufs<'a, 'b> {
    /// The run of bytes made of `bufs`, one after another.
    pub(crate) fn new(bufs: &'a [IoSlice<'b>]) -> Self {
        let ends = ends(bufs.iter().map(|b| b.len()));
        WriteBufs { bufs, ends }
    }

    /// Total length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Bytes `range` of the run, as the pieces of the buffers it covers, in order.
    pub(crate) fn slices(&self, range: Range<usize>) -> Vec<IoSlice<'a>> {
        debug_assert!(range.start <= range.end && range.end <= self.len());
        let mut out = Vec::new();
        let first = first_buffer(&self.ends, range.start);
        for (b, &end) in self.bufs[first..].iter().zip(&self.ends[first..]) {
            let start = end - b.len();
            if start >= range.end {
                break;
            }
            if start == end {
                continue;
            }
            let whole: &'a [u8] = b;
            let (lo, hi) = (range.start.max(start) - start, range.end.min(end) - start);
            out.push(IoSlice::new(&whole[lo..hi]));
        }
        out
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
