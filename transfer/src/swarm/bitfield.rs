//! Which chunks of an image a peer holds: one bit per chunk, in manifest order.

/// A fixed-length set of chunk indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitfield {
    length: u32,
    words: Vec<u64>,
    count: u32,
}

/// A bitfield from the network that does not fit the image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitfieldError {
    /// The bytes are not the length `length` needs.
    #[error("a bitfield of {length} chunks takes {expected} bytes, not {actual}")]
    WrongSize {
        /// Chunks.
        length: u32,
        /// Bytes it takes.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// Bits are set past the last chunk.
    #[error("bits set past chunk {length}")]
    TrailingBits {
        /// Chunks.
        length: u32,
    },
}

impl Bitfield {
    /// No chunk of `length`.
    pub fn empty(length: u32) -> Self {
        Self {
            length,
            words: vec![0; Self::word_count(length)],
            count: 0,
        }
    }

    /// Every chunk of `length` (a seed).
    pub fn full(length: u32) -> Self {
        let mut field = Self::empty(length);
        for index in 0..length {
            field.insert(index);
        }
        field
    }

    fn word_count(length: u32) -> usize {
        usize::try_from(length.div_ceil(64)).unwrap_or(usize::MAX)
    }

    /// Chunks in the image.
    pub fn len(&self) -> u32 {
        self.length
    }

    /// Whether the image has no chunks.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Chunks held.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.count == self.length
    }

    /// Whether chunk `index` is held (false past the end).
    pub fn contains(&self, index: u32) -> bool {
        index < self.length
            && self
                .words
                .get((index / 64) as usize)
                .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    /// Marks chunk `index` held; false if it was already, or is past the end.
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= self.length || self.contains(index) {
            return false;
        }
        if let Some(word) = self.words.get_mut((index / 64) as usize) {
            *word |= 1 << (index % 64);
            self.count += 1;
            return true;
        }
        false
    }

    /// Marks chunk `index` not held; false if it was not.
    pub fn remove(&mut self, index: u32) -> bool {
        if !self.contains(index) {
            return false;
        }
        if let Some(word) = self.words.get_mut((index / 64) as usize) {
            *word &= !(1 << (index % 64));
            self.count -= 1;
            return true;
        }
        false
    }

    /// The bits, 64 chunks a word: chunk `i` is bit `i % 64` of word `i / 64` (none set past
    /// the end). For searches that test whole words at once.
    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    /// The indexes held, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.length).filter(|index| self.contains(*index))
    }

    /// Bytes on the wire: bit `i` is bit `i % 8` of byte `i / 8`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let size = usize::try_from(self.length.div_ceil(8)).unwrap_or(0);
        let mut bytes = Vec::with_capacity(size);
        for word in &self.words {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes.truncate(size);
        bytes
    }

    /// Reads [`to_bytes`](Self::to_bytes) for an image of `length` chunks.
    pub fn from_bytes(length: u32, bytes: &[u8]) -> Result<Self, BitfieldError> {
        let expected = usize::try_from(length.div_ceil(8)).unwrap_or(usize::MAX);
        if bytes.len() != expected {
            return Err(BitfieldError::WrongSize {
                length,
                expected,
                actual: bytes.len(),
            });
        }
        let mut field = Self::empty(length);
        for (word, chunk) in field.words.iter_mut().zip(bytes.chunks(8)) {
            let mut buffer = [0u8; 8];
            buffer[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(buffer);
        }
        let tail = length % 64;
        if tail != 0 && field.words.last().is_some_and(|last| last >> tail != 0) {
            return Err(BitfieldError::TrailingBits { length });
        }
        field.count = field.words.iter().map(|word| word.count_ones()).sum();
        Ok(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_misfits_are_refused() {
        let mut field = Bitfield::empty(70);
        for index in [0, 9, 63, 64, 69] {
            assert!(field.insert(index));
        }
        assert!(!field.insert(9), "already held");
        assert!(!field.insert(70), "past the end");
        assert_eq!(field.count(), 5);
        let bytes = field.to_bytes();
        assert_eq!(bytes.len(), 9);
        assert_eq!(Bitfield::from_bytes(70, &bytes), Ok(field.clone()));
        assert_eq!(field.iter().collect::<Vec<_>>(), vec![0, 9, 63, 64, 69]);
        assert!(matches!(
            Bitfield::from_bytes(70, &bytes[..8]),
            Err(BitfieldError::WrongSize { .. })
        ));
        let mut trailing = bytes;
        trailing[8] |= 0x80;
        assert_eq!(
            Bitfield::from_bytes(70, &trailing),
            Err(BitfieldError::TrailingBits { length: 70 })
        );
        assert!(Bitfield::full(70).is_complete());
        assert!(Bitfield::from_bytes(0, &[]).is_ok_and(|field| field.is_complete()));
    }
}
