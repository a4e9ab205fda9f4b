//! A growable vector of plain-old-data values.
//!
//! Header block (32 bytes): `len u64, cap u64, data u64, elem_size u32,
//! elem_align u32`; the elements live in a separate data block of at least
//! `cap * elem_size` bytes, reallocated (doubling) when full.

use std::marker::PhantomData;

use bytemuck::Pod;

use crate::cell::check_type;
use crate::error::{Error, Result};
use crate::format::{Block, Kind, VEC_HEADER};
use crate::handle::StateVec;
use crate::mem::Mem;
use crate::state::{State, Tx};
use crate::tx::TxCore;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) at: u64,
    pub(crate) len: u64,
    pub(crate) cap: u64,
    pub(crate) data: u64,
}

fn header<T>(mem: &Mem, heap: (u64, u64), off: u64) -> Result<Header> {
    let b = Block::expect(mem, heap, off, Kind::Vec)?.need(VEC_HEADER)?;
    let raw = mem.bytes("vec header", b.payload(), VEC_HEADER)?;
    let h = decode_header::<T>(raw.try_into().expect("32"), b.payload())?;
    if h.cap != 0 {
        Block::expect(mem, heap, h.data, Kind::VecData)?.need(h.cap * size_of::<T>() as u64)?;
    }
    Ok(h)
}

/// Validates a vec header's fields (`raw`, read from the payload at `at`)
/// against the element type; the data block is the caller's to check.
pub(crate) fn decode_header<T>(raw: &[u8; 32], at: u64) -> Result<Header> {
    let word = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8"));
    let half = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4"));
    let (len, cap, data) = (word(0), word(8), word(16));
    let (size, align) = (half(24), half(28));
    if u64::from(size) != size_of::<T>() as u64 || align as usize != align_of::<T>() {
        return Err(Error::unsupported(format!(
            "the vec holds elements of {size} bytes (align {align}), the type asked for has {} (align {})",
            size_of::<T>(),
            align_of::<T>()
        )));
    }
    if len > cap {
        return Err(Error::corrupt(
            "vec header",
            at,
            format!("length {len} exceeds capacity {cap}"),
        ));
    }
    if cap == 0 {
        if data != 0 {
            return Err(Error::corrupt(
                "vec header",
                at,
                "no capacity but a data block",
            ));
        }
    } else {
        cap.checked_mul(u64::from(size))
            .ok_or_else(|| Error::corrupt("vec header", at, format!("capacity {cap} overflows")))?;
    }
    Ok(Header { at, len, cap, data })
}

fn slice<T: Pod>(mem: &Mem, h: Header) -> Result<&[T]> {
    if h.len == 0 {
        return Ok(&[]);
    }
    let payload = h.data + crate::format::BLOCK_HEADER;
    let bytes = mem.bytes("vec data", payload, h.len * size_of::<T>() as u64)?;
    bytemuck::try_cast_slice(bytes)
        .map_err(|e| Error::corrupt("vec data", payload, format!("{e:?}")))
}

impl<R: Pod> State<R> {
    /// The elements of a vector, read in place.
    pub fn vec<T: Pod>(&self, h: StateVec<T>) -> Result<&[T]> {
        let mem = &self.core.mem;
        slice(mem, header::<T>(mem, self.core.heap()?, h.off()?)?)
    }
}

impl<'s, R: Pod> Tx<'s, R> {
    /// Creates an empty vector.
    pub fn new_vec<T: Pod>(&mut self) -> Result<StateVec<T>> {
        check_type::<T>("vec element")?;
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&(size_of::<T>() as u32).to_le_bytes());
        h[4..].copy_from_slice(&(align_of::<T>() as u32).to_le_bytes());
        self.core.op(|core| {
            let b = core.alloc(Kind::Vec, VEC_HEADER, true)?;
            core.write("vec header", b.payload() + 24, &h)?;
            Ok(StateVec::from_off(b.off))
        })
    }

    /// A vector, for reading and changing in this transaction.
    pub fn vec<T: Pod>(&mut self, h: StateVec<T>) -> Result<VecMut<'_, 's, T>> {
        let off = h.off()?;
        header::<T>(self.core.mem(), self.core.heap()?, off)?;
        Ok(VecMut {
            tx: &mut self.core,
            off,
            _t: PhantomData,
        })
    }
}

/// A vector inside a transaction. Every method re-reads (and re-validates)
/// the header, so the view stays right across reallocations.
#[derive(Debug)]
pub struct VecMut<'t, 's, T> {
    tx: &'t mut TxCore<'s>,
    off: u64,
    _t: PhantomData<T>,
}

impl<T: Pod> VecMut<'_, '_, T> {
    fn header(&self) -> Result<Header> {
        header::<T>(self.tx.mem(), self.tx.heap()?, self.off)
    }

    fn elem(h: &Header, i: u64) -> u64 {
        h.data + crate::format::BLOCK_HEADER + i * size_of::<T>() as u64
    }

    /// The number of elements.
    pub fn len(&self) -> Result<u64> {
        Ok(self.header()?.len)
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The elements.
    pub fn as_slice(&self) -> Result<&[T]> {
        slice(self.tx.mem(), self.header()?)
    }

    /// The element at `i`, if any.
    pub fn get(&self, i: u64) -> Result<Option<&T>> {
        let s = self.as_slice()?;
        Ok(usize::try_from(i).ok().and_then(|i| s.get(i)))
    }

    /// The element at `i`, for changing (journaled first).
    pub fn get_mut(&mut self, i: u64) -> Result<&mut T> {
        let h = self.header()?;
        if i >= h.len {
            return Err(Error::OutOfRange {
                index: i,
                len: h.len,
            });
        }
        let at = Self::elem(&h, i);
        let bytes = self
            .tx
            .bytes_mut("vec element", at, size_of::<T>() as u64)?;
        bytemuck::try_from_bytes_mut(bytes)
            .map_err(|e| Error::corrupt("vec element", at, format!("{e:?}")))
    }

    /// Stores `value` at `i`.
    pub fn set(&mut self, i: u64, value: T) -> Result<()> {
        let h = self.header()?;
        if i >= h.len {
            return Err(Error::OutOfRange {
                index: i,
                len: h.len,
            });
        }
        self.tx
            .write("vec element", Self::elem(&h, i), bytemuck::bytes_of(&value))
    }

    /// Runs one changing operation; a failure after it changed something
    /// fails the transaction (see `TxCore::settle`).
    fn op<U>(&mut self, f: impl FnOnce(&mut Self) -> Result<U>) -> Result<U> {
        let before = self.tx.changes();
        let result = f(self);
        self.tx.settle(before, &result);
        result
    }

    /// Makes room for at least `additional` more elements.
    pub fn reserve(&mut self, additional: u64) -> Result<()> {
        self.op(|v| v.reserve_now(additional))
    }

    fn reserve_now(&mut self, additional: u64) -> Result<()> {
        let h = self.header()?;
        let need = h.len.checked_add(additional).ok_or(Error::TooLarge {
            what: "vec",
            len: u64::MAX,
        })?;
        if need <= h.cap {
            return Ok(());
        }
        let cap = need.max(h.cap.saturating_mul(2)).max(4);
        let size = size_of::<T>() as u64;
        let bytes = cap.checked_mul(size).ok_or(Error::TooLarge {
            what: "vec",
            len: u64::MAX,
        })?;
        let new = self.tx.alloc(Kind::VecData, bytes, false)?;
        if h.len > 0 {
            let old = self
                .tx
                .mem()
                .bytes(
                    "vec data",
                    h.data + crate::format::BLOCK_HEADER,
                    h.len * size,
                )?
                .to_vec();
            self.tx.write("vec data", new.payload(), &old)?;
        }
        if h.data != 0 {
            self.tx.free(h.data, Kind::VecData)?;
        }
        let mut w = [0u8; 16];
        w[..8].copy_from_slice(&cap.to_le_bytes());
        w[8..].copy_from_slice(&new.off.to_le_bytes());
        self.tx.write("vec header", h.at + 8, &w)
    }

    /// Appends `value`.
    pub fn push(&mut self, value: T) -> Result<()> {
        self.extend_from_slice(std::slice::from_ref(&value))
    }

    /// Appends every element of `values`.
    pub fn extend_from_slice(&mut self, values: &[T]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.op(|v| {
            v.reserve_now(values.len() as u64)?;
            let h = v.header()?;
            v.tx.write(
                "vec element",
                Self::elem(&h, h.len),
                bytemuck::cast_slice(values),
            )?;
            v.tx.write_u64("vec length", h.at, h.len + values.len() as u64)
        })
    }

    /// Removes and returns the last element.
    pub fn pop(&mut self) -> Result<Option<T>> {
        let h = self.header()?;
        if h.len == 0 {
            return Ok(None);
        }
        let v = slice::<T>(self.tx.mem(), h)?[h.len as usize - 1];
        self.tx.write_u64("vec length", h.at, h.len - 1)?;
        Ok(Some(v))
    }

    /// Shortens the vector to `len` elements (no-op if it is shorter).
    pub fn truncate(&mut self, len: u64) -> Result<()> {
        let h = self.header()?;
        if len < h.len {
            self.tx.write_u64("vec length", h.at, len)?;
        }
        Ok(())
    }

    /// Removes every element (keeping the capacity).
    pub fn clear(&mut self) -> Result<()> {
        self.truncate(0)
    }

    /// Frees the vector. Its handle (and copies) must not be used again.
    pub fn free(mut self) -> Result<()> {
        self.op(|v| {
            let h = v.header()?;
            if h.data != 0 {
                v.tx.free(h.data, Kind::VecData)?;
            }
            v.tx.free(v.off, Kind::Vec)
        })
    }
}
