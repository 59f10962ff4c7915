//! Tuple-encoded keys. Every key is `pack((area, kind, …))`, so ranges by
//! prefix are ordered the same way on every backend.

pub use foundationdb_tuple::{Element, PackError, TuplePack, TupleUnpack, pack, unpack};

use crate::prefix_range;

/// The range holding every key whose tuple starts with `prefix`'s elements.
pub fn tuple_range<T: TuplePack>(prefix: &T) -> (Vec<u8>, Vec<u8>) {
    prefix_range(&pack(prefix))
}
