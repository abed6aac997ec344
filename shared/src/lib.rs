//! Pieces every stagefs crate agrees on: the block layout and object keys, object store URLs,
//! human-readable sizes, and `--config` files.

pub mod config;
pub mod layout;
pub mod meta;
pub mod size;
pub mod store;
pub mod telemetry;

pub use layout::{BlockKey, KeyError, BLOCK_SIZE, CHUNK_SIZE};

/// Longest error message a server sends (gRPC `grpc-message`): messages quote what a client sent,
/// and a client may send megabytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes (at a character boundary), saying how long it was; for error
/// messages and log lines that carry a client's strings.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub(32);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// An error and its causes, `: `-separated (tonic's transport errors say little on their own).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod clip_tests {
    #[test]
    fn clip_keeps_short_text_and_cuts_long_text_at_a_character() {
        assert_eq!(super::clip("short", 100), "short");
        let long = "é".repeat(1000);
        let clipped = super::clip(&long, 100);
        assert!(clipped.len() <= 100, "{}", clipped.len());
        assert!(clipped.ends_with("… (2000 bytes)"), "{clipped}");
    }
}
