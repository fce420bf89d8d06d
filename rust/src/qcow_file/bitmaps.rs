//! The persistent bitmaps of an open image, read: `bitmaps()` lists them as QEMU loads them,
//! `dirty_ranges()` gives what one of them marks dirty. A writing handle keeps its enabled
//! bitmaps itself (flagged in use on disk until it closes): for those the answer includes the
//! writes made so far, as QEMU's in-memory bitmaps would.

use super::QcowFile;
use crate::bitmap::{
    entry_defect, read_bitmap_directory, read_dirty_ranges, Bitmap, BitmapEntry, FLAG_AUTO, FLAG_IN_USE,
};
use crate::error::{Error, Result};
use crate::format::AUTOCLEAR_BITMAPS;

impl QcowFile {
    /// The bitmap directory as QEMU trusts it: empty without the bitmaps extension or when a
    /// program without bitmap support cleared its autoclear bit.
    fn bitmap_directory(&self) -> Result<Vec<BitmapEntry>> {
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(Vec::new());
        }
        read_bitmap_directory(&self.raw, &self.header)
    }

    /// Whether this handle keeps `name` up to date itself (it flagged it in use).
    fn tracks_bitmap(&self, name: &str) -> bool {
        self.bitmap_tracker().is_some_and(|t| t.tracks(name))
    }

    /// The persistent bitmaps, in directory order.
    pub fn bitmaps(&self) -> Result<Vec<Bitmap>> {
        Ok(self
            .bitmap_directory()?
            .into_iter()
            .map(|b| Bitmap {
                in_use: b.flags & FLAG_IN_USE != 0 && !self.tracks_bitmap(&b.name),
                enabled: b.flags & FLAG_AUTO != 0,
                granularity: 1u64 << u32::from(b.granularity_bits).min(63),
                persistent: true,
                name: b.name,
            })
            .collect())
    }

    /// The guest ranges `(offset, length)` the bitmap `name` marks dirty, in order (a range
    /// per run of set bits, each bit covering the bitmap's granularity, the last one cut at the
    /// end of the disk). Refused for a bitmap that is not there or is in use (inconsistent),
    /// as QEMU refuses to export one.
    pub fn dirty_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let dir = self.bitmap_directory()?;
        let b = dir
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("Dirty bitmap '{name}' not found")))?;
        let tracked = self.tracks_bitmap(name);
        if b.flags & FLAG_IN_USE != 0 && !tracked {
            return Err(Error::InvalidArgument(format!("Bitmap '{name}' is inconsistent and cannot be used")));
        }
        if let Some(why) = entry_defect(&self.header, b) {
            return Err(Error::corrupt(why, b.entry_offset));
        }
        let mut ranges = read_dirty_ranges(&self.raw, &self.header, b)?;
        if let Some(t) = self.bitmap_tracker().filter(|_| tracked) {
            let g = b.granularity_bits;
            let size = self.header.size;
            let mut all: Vec<(u64, u64)> = ranges.iter().map(|&(s, l)| (s, s + l)).collect();
            all.extend(t.pending().into_iter().map(|(s, e)| ((s >> g) << g, (e.div_ceil(1 << g) << g).min(size))));
            all.sort_unstable();
            ranges.clear();
            for (s, e) in all {
                match ranges.last_mut() {
                    Some(last) if s <= last.0 + last.1 => last.1 = last.1.max(e - last.0),
                    _ => ranges.push((s, e - s)),
                }
            }
        }
        Ok(ranges)
    }
}
