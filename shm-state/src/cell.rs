//! A cell: one plain-old-data value in its own block.

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::format::{Block, Kind};
use crate::handle::StateCell;
use crate::mem::Mem;
use crate::state::{State, Tx};

pub(crate) fn check_type<T>(what: &str) -> Result<()> {
    if size_of::<T>() == 0 {
        return Err(Error::unsupported(format!(
            "{what}: zero-sized types are not stored"
        )));
    }
    if align_of::<T>() > 16 {
        return Err(Error::unsupported(format!(
            "{what}: alignment {} exceeds 16",
            align_of::<T>()
        )));
    }
    Ok(())
}

fn cell_block<T: Pod>(mem: &Mem, heap: (u64, u64), h: StateCell<T>) -> Result<Block> {
    check_cell::<T>(Block::expect(mem, heap, h.off()?, Kind::Cell)?)
}

/// Checks that a cell block holds a `T`.
pub(crate) fn check_cell<T: Pod>(b: Block) -> Result<Block> {
    if b.aux != size_of::<T>() as u64 {
        return Err(Error::unsupported(format!(
            "the cell holds {} bytes, the type asked for has {}",
            b.aux,
            size_of::<T>()
        )));
    }
    b.need(b.aux)
}

fn view<T: Pod>(mem: &Mem, heap: (u64, u64), h: StateCell<T>) -> Result<&T> {
    let b = cell_block(mem, heap, h)?;
    let bytes = mem.bytes("cell", b.payload(), size_of::<T>() as u64)?;
    bytemuck::try_from_bytes(bytes)
        .map_err(|e| Error::corrupt("cell", b.payload(), format!("{e:?}")))
}

impl<R: Pod> State<R> {
    /// The value in a cell, read in place.
    pub fn cell<T: Pod>(&self, h: StateCell<T>) -> Result<&T> {
        view(&self.core.mem, self.core.heap()?, h)
    }
}

impl<R: Pod> Tx<'_, R> {
    /// Creates a cell holding `value`.
    pub fn new_cell<T: Pod>(&mut self, value: T) -> Result<StateCell<T>> {
        check_type::<T>("cell")?;
        let size = size_of::<T>() as u64;
        self.core.op(|core| {
            let b = core.alloc(Kind::Cell, size, false)?;
            core.write("cell", b.payload(), bytemuck::bytes_of(&value))?;
            Ok(StateCell::from_off(b.off))
        })
    }

    /// The value in a cell.
    pub fn cell<T: Pod>(&self, h: StateCell<T>) -> Result<&T> {
        view(self.core.mem(), self.core.heap()?, h)
    }

    /// The value in a cell, for changing (journaled first).
    pub fn cell_mut<T: Pod>(&mut self, h: StateCell<T>) -> Result<&mut T> {
        let b = cell_block(self.core.mem(), self.core.heap()?, h)?;
        let bytes = self
            .core
            .bytes_mut("cell", b.payload(), size_of::<T>() as u64)?;
        bytemuck::try_from_bytes_mut(bytes)
            .map_err(|e| Error::corrupt("cell", b.payload(), format!("{e:?}")))
    }

    /// Stores `value` in a cell.
    pub fn set_cell<T: Pod>(&mut self, h: StateCell<T>, value: T) -> Result<()> {
        let b = cell_block(self.core.mem(), self.core.heap()?, h)?;
        self.core
            .write("cell", b.payload(), bytemuck::bytes_of(&value))
    }

    /// Frees a cell. The handle (and its copies) must not be used again.
    pub fn free_cell<T: Pod>(&mut self, h: StateCell<T>) -> Result<()> {
        let b = cell_block(self.core.mem(), self.core.heap()?, h)?;
        self.core.free(b.off, Kind::Cell)
    }
}
