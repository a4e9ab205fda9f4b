//! An append-only log of byte records, in a chain of chunks.
//!
//! Header block (32 bytes): `count u64, bytes u64, first u64, last u64`.
//! Chunk block: `next u64, used u64`, then records `len u32, 0u32, data`
//! padded to 8 bytes. Appending writes past the last chunk's `used`
//! (unjournaled: not yet part of the state) and then journals `used` and
//! the header.

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::format::{
    BLOCK_HEADER, Block, CHUNK_HEADER, Kind, LOG_HEADER, LOG_RECORD_HEADER, u64_at,
};
use crate::handle::StateLog;
use crate::mem::Mem;
use crate::state::{State, Tx};
use crate::tx::TxCore;

/// Chunks grow up to this many bytes (a larger record gets its own chunk).
const MAX_CHUNK: u64 = 1 << 20;
const MIN_CHUNK: u64 = 4096;

#[derive(Debug, Clone, Copy)]
struct Header {
    at: u64,
    count: u64,
    bytes: u64,
    first: u64,
    last: u64,
}

fn header(mem: &Mem, heap: (u64, u64), off: u64) -> Result<Header> {
    let b = Block::expect(mem, heap, off, Kind::Log)?.need(LOG_HEADER)?;
    let at = b.payload();
    let h = Header {
        at,
        count: u64_at(mem, "log count", at)?,
        bytes: u64_at(mem, "log bytes", at + 8)?,
        first: u64_at(mem, "log first chunk", at + 16)?,
        last: u64_at(mem, "log last chunk", at + 24)?,
    };
    if (h.first == 0) != (h.last == 0) || (h.first == 0 && h.count != 0) {
        return Err(Error::corrupt(
            "log header",
            at,
            "chunk pointers and record count disagree",
        ));
    }
    Ok(h)
}

/// A validated chunk: block, `next`, `used`.
fn chunk(mem: &Mem, heap: (u64, u64), off: u64) -> Result<(Block, u64, u64)> {
    let b = Block::expect(mem, heap, off, Kind::LogChunk)?.need(CHUNK_HEADER)?;
    let next = u64_at(mem, "log chunk next", b.payload())?;
    let used = u64_at(mem, "log chunk used", b.payload() + 8)?;
    if used > b.capacity() - CHUNK_HEADER {
        return Err(Error::corrupt(
            "log chunk",
            off,
            format!("{used} bytes used of {}", b.capacity() - CHUNK_HEADER),
        ));
    }
    Ok((b, next, used))
}

fn record_size(len: u64) -> u64 {
    LOG_RECORD_HEADER + len.next_multiple_of(8)
}

/// A log for reading, borrowed from a [`State`].
#[derive(Debug)]
pub struct LogRef<'a> {
    mem: &'a Mem,
    heap: (u64, u64),
    h: Header,
}

impl<'a> LogRef<'a> {
    /// The number of records.
    pub fn len(&self) -> u64 {
        self.h.count
    }

    /// True when the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.h.count == 0
    }

    /// The total size of the records' data in bytes.
    pub fn data_bytes(&self) -> u64 {
        self.h.bytes
    }

    /// Every record, oldest first, read in place. A damaged chunk ends the
    /// iteration with an error.
    pub fn iter(&self) -> LogIter<'a> {
        LogIter {
            mem: self.mem,
            heap: self.heap,
            left: self.h.count,
            chunk: self.h.first,
            pos: 0,
            used: None,
            hops: 0,
            failed: false,
        }
    }

    /// Reads every record and checks the totals against the header.
    pub fn verify(&self) -> Result<()> {
        let (mut n, mut bytes) = (0u64, 0u64);
        for r in self.iter() {
            n += 1;
            bytes += r?.len() as u64;
        }
        if n != self.h.count || bytes != self.h.bytes {
            return Err(Error::corrupt(
                "log header",
                self.h.at,
                format!(
                    "header counts {} records of {} bytes, the chunks hold {n} of {bytes}",
                    self.h.count, self.h.bytes
                ),
            ));
        }
        Ok(())
    }
}

/// The records of a log, oldest first.
#[derive(Debug)]
pub struct LogIter<'a> {
    mem: &'a Mem,
    heap: (u64, u64),
    left: u64,
    chunk: u64,
    pos: u64,
    used: Option<(u64, u64)>,
    hops: u64,
    failed: bool,
}

impl<'a> LogIter<'a> {
    fn step(&mut self) -> Result<Option<&'a [u8]>> {
        loop {
            if self.left == 0 {
                return Ok(None);
            }
            let (payload, used) = match self.used {
                Some(u) => u,
                None => {
                    if self.chunk == 0 {
                        return Err(Error::corrupt(
                            "log",
                            0,
                            format!("the chunk chain ends {} records early", self.left),
                        ));
                    }
                    // Each hop lands on a distinct block or we are in a cycle.
                    self.hops += 1;
                    if self.hops > (self.heap.1 - self.heap.0) / (BLOCK_HEADER + CHUNK_HEADER) {
                        return Err(Error::corrupt("log", self.chunk, "the chunk chain loops"));
                    }
                    let (b, _, used) = chunk(self.mem, self.heap, self.chunk)?;
                    self.pos = 0;
                    self.used = Some((b.payload(), used));
                    (b.payload(), used)
                }
            };
            if self.pos + LOG_RECORD_HEADER <= used {
                let at = payload + CHUNK_HEADER + self.pos;
                let len = u64::from(u32::from_le_bytes(
                    self.mem.bytes("log record", at, 4)?.try_into().expect("4"),
                ));
                if record_size(len) > used - self.pos {
                    return Err(Error::corrupt(
                        "log record",
                        at,
                        format!("{len} bytes run past the chunk's used bytes"),
                    ));
                }
                self.pos += record_size(len);
                self.left -= 1;
                return Ok(Some(self.mem.bytes(
                    "log record",
                    at + LOG_RECORD_HEADER,
                    len,
                )?));
            }
            self.chunk = u64_at(self.mem, "log chunk next", payload)?;
            self.used = None;
        }
    }
}

impl<'a> Iterator for LogIter<'a> {
    type Item = Result<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(r) => r.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl<R: Pod> State<R> {
    /// A log, for reading in place.
    pub fn log(&self, h: StateLog) -> Result<LogRef<'_>> {
        let heap = self.core.heap()?;
        Ok(LogRef {
            mem: &self.core.mem,
            heap,
            h: header(&self.core.mem, heap, h.off()?)?,
        })
    }
}

impl<'s, R: Pod> Tx<'s, R> {
    /// Creates an empty log.
    pub fn new_log(&mut self) -> Result<StateLog> {
        let b = self
            .core
            .op(|core| core.alloc(Kind::Log, LOG_HEADER, true))?;
        Ok(StateLog::from_off(b.off))
    }

    /// A log, for appending in this transaction.
    pub fn log(&mut self, h: StateLog) -> Result<LogMut<'_, 's>> {
        let off = h.off()?;
        header(self.core.mem(), self.core.heap()?, off)?;
        Ok(LogMut {
            tx: &mut self.core,
            off,
        })
    }
}

/// A log inside a transaction.
#[derive(Debug)]
pub struct LogMut<'t, 's> {
    tx: &'t mut TxCore<'s>,
    off: u64,
}

impl LogMut<'_, '_> {
    fn header(&self) -> Result<Header> {
        header(self.tx.mem(), self.tx.heap()?, self.off)
    }

    /// A read view of the log as it is in this transaction.
    pub fn as_ref(&self) -> Result<LogRef<'_>> {
        let heap = self.tx.heap()?;
        Ok(LogRef {
            mem: self.tx.mem(),
            heap,
            h: header(self.tx.mem(), heap, self.off)?,
        })
    }

    /// The number of records.
    pub fn len(&self) -> Result<u64> {
        Ok(self.header()?.count)
    }

    /// True when the log holds no record.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Runs one changing operation; a failure after it changed something
    /// fails the transaction (see `TxCore::settle`).
    fn op<U>(&mut self, f: impl FnOnce(&mut Self) -> Result<U>) -> Result<U> {
        let before = self.tx.changes();
        let result = f(self);
        self.tx.settle(before, &result);
        result
    }

    /// Appends one record.
    pub fn append(&mut self, record: &[u8]) -> Result<()> {
        self.op(|l| l.append_now(record))
    }

    fn append_now(&mut self, record: &[u8]) -> Result<()> {
        let len = record.len() as u64;
        if u32::try_from(len).is_err() {
            return Err(Error::TooLarge {
                what: "log record",
                len,
            });
        }
        let need = record_size(len);
        let h = self.header()?;
        let heap = self.tx.heap()?;
        let mut target = None;
        let mut prev_cap = 0;
        if h.last != 0 {
            let (b, _, used) = chunk(self.tx.mem(), heap, h.last)?;
            prev_cap = b.capacity();
            if need <= b.capacity() - CHUNK_HEADER - used {
                target = Some((b, used));
            }
        }
        let (b, used) = match target {
            Some(t) => t,
            None => {
                let size = (prev_cap * 2)
                    .clamp(MIN_CHUNK, MAX_CHUNK)
                    .max(need + CHUNK_HEADER);
                let b = self.tx.alloc(Kind::LogChunk, size, false)?;
                self.tx.write("log chunk", b.payload(), &[0u8; 16])?;
                if h.last != 0 {
                    let (last, _, _) = chunk(self.tx.mem(), self.tx.heap()?, h.last)?;
                    self.tx.write_u64("log chunk next", last.payload(), b.off)?;
                } else {
                    self.tx.write_u64("log first chunk", h.at + 16, b.off)?;
                }
                self.tx.write_u64("log last chunk", h.at + 24, b.off)?;
                let b = Block::expect(self.tx.mem(), self.tx.heap()?, b.off, Kind::LogChunk)?;
                (b, 0)
            }
        };
        let mut rec = Vec::with_capacity(need as usize);
        rec.extend_from_slice(&(len as u32).to_le_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(record);
        rec.resize(need as usize, 0);
        self.tx
            .write_tail("log record", b.payload() + CHUNK_HEADER + used, &rec)?;
        self.tx
            .write_u64("log chunk used", b.payload() + 8, used + need)?;
        let totals = h.count.checked_add(1).zip(h.bytes.checked_add(len));
        let Some((count, bytes)) = totals else {
            return Err(Error::corrupt(
                "log header",
                h.at,
                format!("{} records of {} bytes cannot grow", h.count, h.bytes),
            ));
        };
        let mut w = [0u8; 16];
        w[..8].copy_from_slice(&count.to_le_bytes());
        w[8..].copy_from_slice(&bytes.to_le_bytes());
        self.tx.write("log header", h.at, &w)
    }

    /// Removes every record (freeing the chunks).
    pub fn clear(&mut self) -> Result<()> {
        self.op(|l| l.clear_now())
    }

    fn clear_now(&mut self) -> Result<()> {
        let h = self.header()?;
        let heap = self.tx.heap()?;
        let mut c = h.first;
        let mut hops = 0u64;
        while c != 0 {
            hops += 1;
            if hops > (heap.1 - heap.0) / (BLOCK_HEADER + CHUNK_HEADER) {
                return Err(Error::corrupt("log", c, "the chunk chain loops"));
            }
            let (b, next, _) = chunk(self.tx.mem(), heap, c)?;
            self.tx.free(b.off, Kind::LogChunk)?;
            c = next;
        }
        self.tx.write("log header", h.at, &[0u8; 32])
    }

    /// Frees the log. Its handle (and copies) must not be used again.
    pub fn free(mut self) -> Result<()> {
        self.op(|l| {
            l.clear_now()?;
            l.tx.free(l.off, Kind::Log)
        })
    }
}
