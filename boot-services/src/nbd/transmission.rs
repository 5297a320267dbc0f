//! The transmission phase: requests on the chosen export and their replies.

use crate::source::{BlockSource, ReadAt, SourceError};

use super::wire::{
    self, COMMAND_FLAGS_KNOWN, ERROR_INVALID, ERROR_IO, ERROR_PERMISSION, OFFSET_DATA_OFFSET_BYTES,
    REPLY_FLAG_DONE, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
};
use super::{Command, NbdConnection, NbdError, Phase, RequestHeader};

impl<S: BlockSource> NbdConnection<S> {
    pub(super) fn handle_request(&mut self, request: &RequestHeader) -> Result<(), NbdError> {
        if request.command == Command::Write {
            // The payload follows whatever the flags say, so it is framed first.
            return self.handle_write(request);
        }
        if request.command_flags & !COMMAND_FLAGS_KNOWN != 0 {
            self.reply_error(request.handle, ERROR_INVALID, "unknown command flags");
            return Ok(());
        }
        match request.command {
            Command::Read => self.handle_read(request),
            Command::Disconnect => {
                // Every earlier request already has its reply queued; DISC has none.
                tracing::debug!(export = ?self.export_name(), "nbd client disconnected");
                self.phase = Phase::Closing;
            }
            // Nothing is ever written, so there is nothing to make durable.
            Command::Flush => self.reply_ok(request.handle),
            Command::Trim | Command::WriteZeroes => {
                self.reply_error(request.handle, ERROR_PERMISSION, "export is read-only");
            }
            Command::Write | Command::Cache | Command::BlockStatus | Command::Unknown(_) => {
                self.reply_error(request.handle, ERROR_INVALID, "command not supported");
            }
        }
        Ok(())
    }

    /// Answers a write after its payload has been skipped.
    pub(super) fn reply_write_refused(&mut self, handle: u64) {
        self.reply_error(handle, ERROR_PERMISSION, "export is read-only");
    }

    fn handle_write(&mut self, request: &RequestHeader) -> Result<(), NbdError> {
        if request.length_bytes > self.config.request_bytes_max {
            // Skipping the payload would mean trusting an arbitrary length; the protocol lets
            // the server treat an oversized payload as a denial of service.
            return Err(NbdError::WritePayloadTooLarge {
                length_bytes: request.length_bytes,
                request_bytes_max: self.config.request_bytes_max,
            });
        }
        if request.length_bytes == 0 {
            self.reply_write_refused(request.handle);
        } else {
            self.phase = Phase::DiscardWritePayload {
                handle: request.handle,
                remaining_bytes: request.length_bytes,
            };
        }
        Ok(())
    }

    fn handle_read(&mut self, request: &RequestHeader) {
        let handle = request.handle;
        let Some(export) = &self.export else {
            // Transmission always has an export; answer rather than trust that here.
            self.reply_error(handle, ERROR_INVALID, "no export chosen");
            return;
        };
        if request.length_bytes > self.config.request_bytes_max {
            self.reply_error(
                handle,
                ERROR_INVALID,
                "read longer than the maximum payload",
            );
            return;
        }
        let in_bounds = request
            .offset_bytes
            .checked_add(u64::from(request.length_bytes))
            .is_some_and(|end_bytes| end_bytes <= export.size_bytes);
        if !in_bounds {
            self.reply_error(handle, ERROR_INVALID, "read beyond the end of the export");
            return;
        }
        let Ok(length_bytes) = usize::try_from(request.length_bytes) else {
            self.reply_error(
                handle,
                ERROR_INVALID,
                "read longer than the maximum payload",
            );
            return;
        };
        if length_bytes == 0 {
            // An OFFSET_DATA chunk must carry at least one byte, so an empty structured read
            // ends with a NONE chunk.
            if self.structured_replies {
                self.output.append(&wire::structured_reply_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    handle,
                    0,
                ));
            } else {
                self.reply_ok(handle);
            }
            return;
        }

        // Header first, then the data read straight into the output buffer behind it; if the
        // read fails, everything since `reply_mark` is dropped, so bad bytes never go out.
        let reply_mark = self.output.mark();
        if self.structured_replies {
            // request_bytes_max is clamped so that the offset always fits in the length.
            let chunk_length_bytes = request.length_bytes + OFFSET_DATA_OFFSET_BYTES as u32;
            self.output.append(&wire::structured_reply_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                chunk_length_bytes,
            ));
            self.output.append(&request.offset_bytes.to_be_bytes());
        } else {
            self.output.append(&wire::simple_reply_header(0, handle));
        }
        let data = self.output.tail_mut(length_bytes);
        match read_exact_at(&export.reader, request.offset_bytes, data) {
            Ok(()) => self.output.commit(length_bytes),
            Err(error) => {
                tracing::warn!(
                    export = %export.name,
                    offset_bytes = request.offset_bytes,
                    length_bytes,
                    %error,
                    "nbd read failed, replying EIO"
                );
                self.output.truncate(reply_mark);
                self.reply_error(handle, ERROR_IO, "read failed");
            }
        }
    }

    fn reply_ok(&mut self, handle: u64) {
        // A simple reply is allowed for any request without payload, even with structured
        // replies negotiated.
        self.output.append(&wire::simple_reply_header(0, handle));
    }

    fn reply_error(&mut self, handle: u64, error: u32, message: &'static str) {
        if self.structured_replies {
            // Structured errors carry a message for the user; messages here are short
            // constants, so the 16-bit length always fits.
            let message_length_bytes = u16::try_from(message.len()).unwrap_or(0);
            let message = message
                .get(..usize::from(message_length_bytes))
                .unwrap_or_default();
            let payload_length_bytes = 4 + 2 + u32::from(message_length_bytes);
            self.output.append(&wire::structured_reply_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                handle,
                payload_length_bytes,
            ));
            self.output.append_all(&[
                &error.to_be_bytes(),
                &message_length_bytes.to_be_bytes(),
                message.as_bytes(),
            ]);
        } else {
            self.output
                .append(&wire::simple_reply_header(error, handle));
        }
    }
}

/// Fills `buffer` from `offset_bytes`; a short read inside the export's bounds is an error,
/// because the bounds were checked against the export's size.
fn read_exact_at<R: ReadAt>(
    reader: &R,
    offset_bytes: u64,
    buffer: &mut [u8],
) -> Result<(), SourceError> {
    let mut filled_bytes = 0;
    while let Some(unfilled) = buffer.get_mut(filled_bytes..) {
        if unfilled.is_empty() {
            return Ok(());
        }
        let read_offset_bytes = offset_bytes.saturating_add(filled_bytes as u64);
        let read_bytes = reader.read_at(read_offset_bytes, unfilled)?;
        if read_bytes == 0 || read_bytes > unfilled.len() {
            return Err(SourceError::Io(format!(
                "short read at offset {read_offset_bytes}"
            )));
        }
        filled_bytes += read_bytes;
    }
    Ok(())
}
