//! The connection's input and output byte buffers.
//!
//! Both are plain `Vec<u8>`s with a start offset: consuming bytes from the front only moves the
//! offset, and the bytes still wanted are moved to the front only when that copy is cheap
//! (small) or pays for itself (no more bytes to move than were consumed before them), so each
//! byte is moved a bounded number of times on average.

/// Pending bytes at or below this size are always moved to the front when appending, because
/// the copy is cheaper than letting the buffer grow.
const COMPACT_BYTES_MAX: usize = 64 * 1024;

/// Client bytes received but not yet processed.
#[derive(Debug, Default)]
pub(super) struct InputBuffer {
    bytes: Vec<u8>,
    /// Bytes before this offset have been processed.
    start: usize,
}

impl InputBuffer {
    /// The bytes not processed yet.
    pub(super) fn unprocessed(&self) -> &[u8] {
        self.bytes.get(self.start..).unwrap_or_default()
    }

    pub(super) fn len(&self) -> usize {
        self.bytes.len().saturating_sub(self.start)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn append(&mut self, input: &[u8]) {
        let unprocessed_bytes = self.len();
        if self.start > 0
            && (self.start >= unprocessed_bytes || unprocessed_bytes <= COMPACT_BYTES_MAX)
        {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        self.bytes.extend_from_slice(input);
    }

    /// Marks `count_bytes` more bytes as processed.
    pub(super) fn consume(&mut self, count_bytes: usize) {
        self.start = self.start.saturating_add(count_bytes).min(self.bytes.len());
        if self.start == self.bytes.len() {
            // Keep the allocation: the next burst of requests reuses it.
            self.bytes.clear();
            self.start = 0;
        }
    }

    pub(super) fn clear(&mut self) {
        self.bytes.clear();
        self.start = 0;
    }
}

/// Server bytes produced but not yet written by the driver.
///
/// `bytes[start..end]` is pending. `bytes.len()` only grows: bytes past `end` are initialised
/// scratch space, so a read reply can be read straight into the buffer without zero-filling it
/// again each time (the zero-fill costs as much memory bandwidth as the read itself).
#[derive(Debug, Default)]
pub(super) struct OutputBuffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

impl OutputBuffer {
    /// The bytes waiting to be written.
    pub(super) fn pending(&self) -> &[u8] {
        self.bytes.get(self.start..self.end).unwrap_or_default()
    }

    pub(super) fn pending_len(&self) -> usize {
        self.end - self.start
    }

    /// Marks `count_bytes` pending bytes as written (at most all of them).
    pub(super) fn consume(&mut self, count_bytes: usize) {
        self.start = self.start.saturating_add(count_bytes).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends `data` to the pending bytes.
    pub(super) fn append(&mut self, data: &[u8]) {
        let tail = self.tail_mut(data.len());
        tail.copy_from_slice(data);
        self.commit(data.len());
    }

    /// Appends the concatenation of `parts`.
    pub(super) fn append_all(&mut self, parts: &[&[u8]]) {
        for part in parts {
            self.append(part);
        }
    }

    /// A position to [`Self::truncate`] back to, dropping everything appended since.
    pub(super) fn mark(&self) -> usize {
        self.end - self.start
    }

    /// Drops the bytes appended since `mark` was taken (nothing may be consumed in between).
    pub(super) fn truncate(&mut self, mark: usize) {
        self.end = self.start + mark.min(self.end - self.start);
    }

    /// `count_bytes` of writable space just after the pending bytes; [`Self::commit`] makes
    /// them pending. The contents are left over from earlier use.
    pub(super) fn tail_mut(&mut self, count_bytes: usize) -> &mut [u8] {
        self.compact_if_cheap();
        let tail_end = self.end + count_bytes;
        if self.bytes.len() < tail_end {
            self.bytes.resize(tail_end, 0);
        }
        match self.bytes.get_mut(self.end..tail_end) {
            Some(tail) => tail,
            None => unreachable!("the output buffer was just resized to hold the tail"),
        }
    }

    /// Makes `count_bytes` of the space returned by [`Self::tail_mut`] pending.
    pub(super) fn commit(&mut self, count_bytes: usize) {
        assert!(
            self.end + count_bytes <= self.bytes.len(),
            "committed output bytes that were never reserved"
        );
        self.end += count_bytes;
    }

    fn compact_if_cheap(&mut self) {
        let pending_bytes = self.pending_len();
        if self.start > 0 && (self.start >= pending_bytes || pending_bytes <= COMPACT_BYTES_MAX) {
            self.bytes.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending_bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reuses_space_and_keeps_pending_bytes_in_order() {
        let mut output = OutputBuffer::default();
        output.append(b"hello ");
        output.append(b"world");
        output.consume(6);
        assert_eq!(output.pending(), b"world");
        let mark = output.mark();
        output.append(b"!!");
        output.truncate(mark);
        output.append(b"?");
        assert_eq!(output.pending(), b"world?");
        output.consume(100);
        assert_eq!(output.pending(), b"");
        let tail = output.tail_mut(3);
        tail.copy_from_slice(b"abc");
        output.commit(3);
        assert_eq!(output.pending(), b"abc");
    }

    #[test]
    fn input_consumes_and_compacts() {
        let mut input = InputBuffer::default();
        input.append(b"abcdef");
        input.consume(4);
        assert_eq!(input.unprocessed(), b"ef");
        input.append(b"gh");
        assert_eq!(input.unprocessed(), b"efgh");
        input.consume(4);
        assert!(input.is_empty());
    }
}
