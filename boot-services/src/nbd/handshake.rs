//! The handshake: client flags and option haggling, up to the choice of an export.

use crate::source::{BlockSource, SourceError};

use super::wire::{
    self, CLIENT_FLAG_NO_ZEROES, CLIENT_FLAGS_KNOWN, EXPORT_NAME_REPLY_ZEROES_BYTES,
    INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, OPTION_ABORT, OPTION_EXPORT_NAME,
    OPTION_GO, OPTION_INFO, OPTION_LIST, OPTION_STARTTLS, OPTION_STRUCTURED_REPLY, REPLY_ACK,
    REPLY_ERROR_INVALID, REPLY_ERROR_POLICY, REPLY_ERROR_TOO_BIG, REPLY_ERROR_UNKNOWN,
    REPLY_ERROR_UNSUPPORTED, REPLY_INFO, REPLY_SERVER, STRING_BYTES_MAX, TRANSMISSION_FLAGS,
};
use super::{
    BLOCK_SIZE_MINIMUM_BYTES, BLOCK_SIZE_PREFERRED_BYTES, NbdConnection, NbdError,
    OPTION_HEADER_BYTES, OpenExport, Phase, decode_info_option_data, decode_option_header,
};

/// The information types requested in an `NBD_OPT_INFO` or `NBD_OPT_GO`; `NBD_INFO_EXPORT` is
/// always sent, so it is not tracked.
#[derive(Debug, Default)]
struct InformationRequested {
    name: bool,
    description: bool,
    block_size: bool,
}

impl<S: BlockSource> NbdConnection<S> {
    pub(super) fn handle_client_flags(&mut self, flags: u32) -> Result<(), NbdError> {
        if flags & !CLIENT_FLAGS_KNOWN != 0 {
            return Err(NbdError::UnknownClientFlags { flags });
        }
        // A client without NBD_FLAG_C_FIXED_NEWSTYLE still gets fixed-newstyle option replies:
        // the protocol allows it, and such a client only ever sends NBD_OPT_EXPORT_NAME.
        self.client_no_zeroes = flags & CLIENT_FLAG_NO_ZEROES != 0;
        self.phase = Phase::Options;
        Ok(())
    }

    /// Handles one option if all of it is in `remaining`; returns the bytes used.
    pub(super) fn step_option(&mut self, remaining: &[u8]) -> Result<usize, NbdError> {
        let Some(header) = decode_option_header(remaining)? else {
            return Ok(0);
        };
        let data_too_big = header.data_length_bytes > self.config.option_data_bytes_max;
        let option_bytes = usize::try_from(header.data_length_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(OPTION_HEADER_BYTES);
        let data = if data_too_big {
            None
        } else {
            match remaining.get(OPTION_HEADER_BYTES..option_bytes) {
                Some(data) => Some(data),
                None => return Ok(0),
            }
        };
        // Counted only once the option is acted on, so a partially received option is not
        // counted again when the rest arrives.
        self.options_received = self.options_received.saturating_add(1);
        if self.options_received > self.config.options_max {
            return Err(NbdError::TooManyOptions {
                options_max: self.config.options_max,
            });
        }
        match data {
            Some(data) => {
                self.handle_option(header.option, data);
                Ok(option_bytes)
            }
            None if header.option == OPTION_EXPORT_NAME => {
                // No error reply exists for NBD_OPT_EXPORT_NAME, and no export has a name
                // this long: end the session as for any unknown export.
                tracing::debug!(
                    data_length_bytes = header.data_length_bytes,
                    "nbd export name too long, closing"
                );
                self.phase = Phase::Closing;
                Ok(OPTION_HEADER_BYTES)
            }
            None => {
                self.phase = Phase::DiscardOptionData {
                    option: header.option,
                    remaining_bytes: header.data_length_bytes,
                };
                Ok(OPTION_HEADER_BYTES)
            }
        }
    }

    pub(super) fn reply_option_too_big(&mut self, option: u32) {
        self.reply_option(option, REPLY_ERROR_TOO_BIG, &[b"option data too large"]);
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) {
        match option {
            OPTION_EXPORT_NAME => self.handle_export_name(data),
            OPTION_ABORT => {
                // The protocol asks servers to ignore data sent with NBD_OPT_ABORT.
                self.reply_option(option, REPLY_ACK, &[]);
                self.phase = Phase::Closing;
            }
            OPTION_LIST => self.handle_list(data),
            OPTION_STARTTLS => {
                self.reply_option(option, REPLY_ERROR_POLICY, &[b"tls is not supported"]);
            }
            OPTION_INFO | OPTION_GO => self.handle_info_or_go(option, data),
            OPTION_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured_replies = true;
                    self.reply_option(option, REPLY_ACK, &[]);
                } else {
                    self.reply_option(option, REPLY_ERROR_INVALID, &[b"unexpected option data"]);
                }
            }
            _ => self.reply_option(option, REPLY_ERROR_UNSUPPORTED, &[]),
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: enter transmission, or end the session if the export cannot be
    /// served (this option has no error reply).
    fn handle_export_name(&mut self, data: &[u8]) {
        let opened = match std::str::from_utf8(data) {
            Ok(name) => self.open_export(name),
            Err(_) => Err(SourceError::NotFound),
        };
        match opened {
            Ok(export) => {
                self.output.append_all(&[
                    &export.size_bytes.to_be_bytes(),
                    &TRANSMISSION_FLAGS.to_be_bytes(),
                ]);
                if !self.client_no_zeroes {
                    self.output.append(&[0u8; EXPORT_NAME_REPLY_ZEROES_BYTES]);
                }
                self.start_transmission(export);
            }
            Err(error) => {
                tracing::debug!(
                    export = %String::from_utf8_lossy(data),
                    %error,
                    "nbd export refused, closing"
                );
                self.phase = Phase::Closing;
            }
        }
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export (name, then description), then ACK.
    fn handle_list(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.reply_option(
                OPTION_LIST,
                REPLY_ERROR_INVALID,
                &[b"unexpected option data"],
            );
            return;
        }
        for name in self.source.export_names() {
            // Names longer than the protocol allows could not be asked for anyway.
            let Ok(name_length_bytes) = u32::try_from(name.len()) else {
                continue;
            };
            if name.len() > STRING_BYTES_MAX {
                continue;
            }
            let description = self.source.export_description(&name).unwrap_or_default();
            self.reply_option(
                OPTION_LIST,
                REPLY_SERVER,
                &[
                    &name_length_bytes.to_be_bytes(),
                    name.as_bytes(),
                    truncate_string(&description).as_bytes(),
                ],
            );
        }
        self.reply_option(OPTION_LIST, REPLY_ACK, &[]);
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: information replies, then ACK (and, for GO,
    /// transmission) or an error.
    fn handle_info_or_go(&mut self, option: u32, data: &[u8]) {
        let request = match decode_info_option_data(data) {
            Ok(request) => request,
            Err(error) => {
                self.reply_option(option, REPLY_ERROR_INVALID, &[error.to_string().as_bytes()]);
                return;
            }
        };
        let export = match self.open_export(request.export_name) {
            Ok(export) => export,
            Err(SourceError::NotFound) => {
                self.reply_option(option, REPLY_ERROR_UNKNOWN, &[b"export not found"]);
                return;
            }
            Err(SourceError::AccessDenied) => {
                self.reply_option(option, REPLY_ERROR_POLICY, &[b"export access denied"]);
                return;
            }
            Err(error) => {
                tracing::warn!(export = request.export_name, %error, "nbd export failed to open");
                self.reply_option(option, REPLY_ERROR_UNKNOWN, &[b"export unavailable"]);
                return;
            }
        };
        let mut requested = InformationRequested::default();
        for information_type in request.information_requests() {
            match information_type {
                INFO_NAME => requested.name = true,
                INFO_DESCRIPTION => requested.description = true,
                INFO_BLOCK_SIZE => requested.block_size = true,
                // NBD_INFO_EXPORT is always sent; unknown types must be ignored.
                _ => {}
            }
        }
        self.reply_option(
            option,
            REPLY_INFO,
            &[
                &INFO_EXPORT.to_be_bytes(),
                &export.size_bytes.to_be_bytes(),
                &TRANSMISSION_FLAGS.to_be_bytes(),
            ],
        );
        if requested.name {
            self.reply_option(
                option,
                REPLY_INFO,
                &[&INFO_NAME.to_be_bytes(), export.name.as_bytes()],
            );
        }
        if requested.description
            && let Some(description) = self.source.export_description(&export.name)
        {
            self.reply_option(
                option,
                REPLY_INFO,
                &[
                    &INFO_DESCRIPTION.to_be_bytes(),
                    truncate_string(&description).as_bytes(),
                ],
            );
        }
        if requested.block_size {
            self.reply_option(
                option,
                REPLY_INFO,
                &[
                    &INFO_BLOCK_SIZE.to_be_bytes(),
                    &BLOCK_SIZE_MINIMUM_BYTES.to_be_bytes(),
                    &BLOCK_SIZE_PREFERRED_BYTES.to_be_bytes(),
                    &self.config.request_bytes_max.to_be_bytes(),
                ],
            );
        }
        self.reply_option(option, REPLY_ACK, &[]);
        if option == OPTION_GO {
            self.start_transmission(export);
        }
    }

    fn start_transmission(&mut self, export: OpenExport<S::Export>) {
        tracing::debug!(
            export = %export.name,
            size_bytes = export.size_bytes,
            structured_replies = self.structured_replies,
            "nbd transmission started"
        );
        self.export = Some(export);
        self.phase = Phase::Transmission;
    }

    /// Queues an option reply whose data is the concatenation of `data_parts`.
    fn reply_option(&mut self, option: u32, reply_type: u32, data_parts: &[&[u8]]) {
        let data_length_bytes: usize = data_parts.iter().map(|part| part.len()).sum();
        // Every reply carries at most a few protocol strings, each capped at
        // STRING_BYTES_MAX, so the length always fits.
        let Ok(data_length_bytes) = u32::try_from(data_length_bytes) else {
            unreachable!("option reply data is bounded by the string limit");
        };
        self.output.append(&wire::option_reply_header(
            option,
            reply_type,
            data_length_bytes,
        ));
        self.output.append_all(data_parts);
    }
}

/// `text` cut to the protocol's string limit, on a character boundary.
fn truncate_string(text: &str) -> &str {
    if text.len() <= STRING_BYTES_MAX {
        return text;
    }
    let mut end = STRING_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}
