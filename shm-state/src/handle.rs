//! Typed handles: the offsets of structures, stored in the root (or in other
//! structures) as plain `u64`s.

use std::fmt;
use std::marker::PhantomData;

use bytemuck::{Pod, Zeroable};

macro_rules! handle {
    ($(#[$doc:meta])* $name:ident < $($p:ident),* >, $kind:literal) => {
        $(#[$doc])*
        #[repr(transparent)]
        pub struct $name<$($p),*> {
            off: u64,
            _t: PhantomData<($($p,)*)>,
        }

        impl<$($p),*> $name<$($p),*> {
            /// The null handle: no structure (a zeroed root holds these).
            pub const NULL: Self = Self { off: 0, _t: PhantomData };

            pub(crate) fn from_off(off: u64) -> Self {
                Self { off, _t: PhantomData }
            }

            /// True for the null handle.
            pub fn is_null(&self) -> bool {
                self.off == 0
            }

            /// The structure's block offset in the region (0 when null).
            pub fn offset(&self) -> u64 {
                self.off
            }

            pub(crate) fn off(&self) -> crate::Result<u64> {
                if self.off == 0 {
                    Err(crate::Error::NullHandle { kind: $kind })
                } else {
                    Ok(self.off)
                }
            }
        }

        impl<$($p),*> Clone for $name<$($p),*> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<$($p),*> Copy for $name<$($p),*> {}
        impl<$($p),*> PartialEq for $name<$($p),*> {
            fn eq(&self, other: &Self) -> bool {
                self.off == other.off
            }
        }
        impl<$($p),*> Eq for $name<$($p),*> {}
        impl<$($p),*> Default for $name<$($p),*> {
            fn default() -> Self {
                Self::NULL
            }
        }
        impl<$($p),*> fmt::Debug for $name<$($p),*> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#x})", stringify!($name), self.off)
            }
        }
        // SAFETY: a transparent wrapper of one u64 plus a zero-sized
        // PhantomData: no padding, and all-zero is a valid value (NULL).
        unsafe impl<$($p: 'static),*> Zeroable for $name<$($p),*> {}
        // SAFETY: as above, and every bit pattern is a valid value (an
        // offset that is validated on every use, never trusted).
        unsafe impl<$($p: 'static),*> Pod for $name<$($p),*> {}
    };
}

handle!(
    /// A cell holding one plain-old-data value of type `T`.
    StateCell<T>, "cell"
);
handle!(
    /// A growable vector of plain-old-data values of type `T`.
    StateVec<T>, "vec"
);
handle!(
    /// A hash map from `K` to `V`, each a plain-old-data type or
    /// [`Bytes`](crate::Bytes) (a byte string).
    StateMap<K, V>, "map"
);
handle!(
    /// An append-only log of byte records.
    StateLog<>, "log"
);
handle!(
    /// A ring of variable-length frames between a producer and a consumer
    /// (see [`RingMut`](crate::RingMut)).
    StateRing<>, "ring"
);
handle!(
    /// A value one writer publishes and many read without waiting (see
    /// [`SharedState::publish`](crate::SharedState::publish)).
    StatePublished<>, "published value"
);
