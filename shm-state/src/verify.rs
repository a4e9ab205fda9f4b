//! A full check of the allocator's view of the heap.

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::format::{
    BLOCK_HEADER, Block, DY_ROOT, DY_USED, FREE_HEADS, FREE_SLOTS, Kind, MAX_CLASS, MIN_CLASS,
    read_free_head, u64_at,
};
use crate::state::State;

/// What [`State::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeapReport {
    /// Blocks in use.
    pub live_blocks: u64,
    /// Bytes in use (headers included).
    pub live_bytes: u64,
    /// Blocks on the free lists.
    pub free_blocks: u64,
    /// Bytes on the free lists (headers included).
    pub free_bytes: u64,
}

impl<R: Pod> State<R> {
    /// Walks every block of the heap and every free list: each block header
    /// must be valid and the blocks must tile the heap exactly; each free
    /// list must hold exactly the free blocks of its class, without cycles;
    /// the used-bytes counter must match; the root offset must name a root
    /// block. Costs one pass over the heap.
    pub fn verify(&self) -> Result<HeapReport> {
        let mem = &self.core.mem;
        let heap = self.core.heap()?;
        let mut report = HeapReport::default();
        let mut free_per_class = [0u64; FREE_SLOTS as usize];
        let mut off = heap.0;
        while off < heap.1 {
            let b = Block::read(mem, heap, off)?;
            let size = BLOCK_HEADER + b.capacity();
            if b.kind == Kind::Free {
                report.free_blocks += 1;
                report.free_bytes += size;
                free_per_class[b.class as usize] += 1;
            } else {
                report.live_blocks += 1;
                report.live_bytes += size;
            }
            off += size;
        }
        for class in 0..FREE_SLOTS as u32 {
            let head_off = FREE_HEADS + u64::from(class) * 8;
            let mut at = read_free_head(mem, head_off)?;
            let mut n = 0u64;
            while at != 0 {
                let b = Block::expect(mem, heap, at, Kind::Free)?;
                if b.class != class || !(MIN_CLASS..=MAX_CLASS).contains(&class) {
                    return Err(Error::corrupt(
                        "free list",
                        at,
                        format!("a class {} block on the class {class} list", b.class),
                    ));
                }
                n += 1;
                if n > free_per_class[class as usize] {
                    return Err(Error::corrupt(
                        "free list",
                        head_off,
                        format!("class {class} list is longer than its free blocks (a cycle?)"),
                    ));
                }
                at = b.aux;
            }
            if n != free_per_class[class as usize] {
                return Err(Error::corrupt(
                    "free list",
                    head_off,
                    format!(
                        "class {class} list holds {n} blocks, the heap has {} free",
                        free_per_class[class as usize]
                    ),
                ));
            }
        }
        let root = u64_at(mem, "root offset", DY_ROOT)?;
        if root != 0 {
            Block::expect(mem, heap, root, Kind::Root)?;
        }
        let used = u64_at(mem, "used bytes", DY_USED)?;
        if used != report.live_bytes {
            return Err(Error::corrupt(
                "used bytes",
                DY_USED,
                format!("counter says {used}, the heap holds {}", report.live_bytes),
            ));
        }
        Ok(report)
    }
}
