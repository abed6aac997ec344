//! Changes that happen once although a client sends them twice.
//!
//! A client that loses the answer to a change (its gateway was killed after the commit, or the
//! connection broke) cannot tell whether the change happened. Retrying `unlink` or `create`
//! blindly would then fail with ENOENT or EEXIST for a change that did happen, or, for
//! `release`, drop a second handle. So a change carries a [`RequestTag`]: a slot of the client's
//! session (one per change in flight, [`MAX_SLOTS`] at most) and a sequence number that grows with
//! each use of the slot. The transaction that makes the change also records `(seq, result)` in
//! the slot (key `r`), so the record commits exactly when the change does. A retry (flagged as
//! such, or a transaction the backend ran again after a conflict) first reads the slot: the same
//! sequence there means the change is done, and the recorded result is answered instead of
//! running it again. The first try skips that read, so a tag costs one more key written.
//!
//! The gateway checks that the tag's session belongs to the caller before it sets the tag; the
//! slots go with the session ([`crate::MetaEngine::close_session`]).
//!
//! The tag travels as a task-local set around the engine call ([`scope`]) rather than as a
//! parameter of every change, so the contract stays the file-system operations.

use std::future::Future;

use crate::{MetaError, Result, SessionId};

/// Slots one session may use at once: the changes it can have in flight.
pub const MAX_SLOTS: u16 = 1024;

/// The gRPC metadata key a client puts its tag in (see [`RequestTag::to_header`]).
pub const HEADER: &str = "stagefs-once";

/// Which change of which session a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTag {
    pub session: SessionId,
    pub slot: u16,
    /// Grows with each change sent in `slot`; a retry repeats it.
    pub seq: u64,
    /// The client sent this change before (without an answer): look for its record first.
    pub retry: bool,
}

tokio::task_local! {
    static TAG: RequestTag;
}

/// Runs `work` with `tag` (none: as an untagged request) as the tag of the changes it makes.
pub async fn scope<F: Future>(tag: Option<RequestTag>, work: F) -> F::Output {
    match tag {
        Some(tag) => TAG.scope(tag, work).await,
        None => work.await,
    }
}

/// The tag of the request being served, if it has one.
pub fn current() -> Option<RequestTag> {
    TAG.try_with(|tag| *tag).ok()
}

impl RequestTag {
    /// `SESSION.SLOT.SEQ` (session as 32 hex digits), then `.r` for a retry.
    pub fn to_header(&self) -> String {
        let retry = if self.retry { ".r" } else { "" };
        format!("{:032x}.{}.{}{retry}", self.session, self.slot, self.seq)
    }

    /// Reads [`RequestTag::to_header`]'s form.
    pub fn parse(text: &str) -> Result<RequestTag> {
        let invalid = || {
            MetaError::Invalid(format!(
                "{HEADER} {:?}: expected SESSION.SLOT.SEQ[.r], a 32-hex-digit session and a slot \
                 below {MAX_SLOTS}",
                shared::clip(text, 80)
            ))
        };
        let mut parts = text.split('.');
        let (Some(session), Some(slot), Some(seq)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let retry = match parts.next() {
            None => false,
            Some("r") => true,
            Some(_) => return Err(invalid()),
        };
        if parts.next().is_some() || session.len() != 32 {
            return Err(invalid());
        }
        let tag = RequestTag {
            session: SessionId::from_str_radix(session, 16).map_err(|_| invalid())?,
            slot: slot.parse().map_err(|_| invalid())?,
            seq: seq.parse().map_err(|_| invalid())?,
            retry,
        };
        if tag.slot >= MAX_SLOTS {
            return Err(invalid());
        }
        Ok(tag)
    }
}

/// The result of a change, as its slot records it: enough to answer a retry.
pub trait Replayable: Sized {
    /// What the slot keeps (an inode number, or 0).
    fn recorded(&self) -> u64;
    /// The answer to a retry of a change that is done: from the current attributes of the inode
    /// it recorded (none when it recorded 0).
    fn replayed(attr: Option<crate::Attr>) -> Result<Self>;
}

impl Replayable for () {
    fn recorded(&self) -> u64 {
        0
    }

    fn replayed(_: Option<crate::Attr>) -> Result<()> {
        Ok(())
    }
}

impl Replayable for crate::Attr {
    fn recorded(&self) -> u64 {
        self.ino
    }

    fn replayed(attr: Option<crate::Attr>) -> Result<crate::Attr> {
        attr.ok_or_else(|| MetaError::Corrupt("a change's record names no inode".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_reads_back_from_its_header() {
        for retry in [false, true] {
            let tag = RequestTag {
                session: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
                slot: 7,
                seq: 99,
                retry,
            };
            assert_eq!(RequestTag::parse(&tag.to_header()).unwrap(), tag);
        }
    }

    #[test]
    fn malformed_tags_are_refused() {
        for text in [
            "",
            "1.2.3",
            "0123456789abcdef0011223344556677.1",
            "0123456789abcdef0011223344556677.1.2.x",
            "0123456789abcdef0011223344556677.1.2.r.r",
            "0123456789abcdef0011223344556677.65535.2",
            "0123456789abcdef001122334455667g.1.2",
        ] {
            assert!(RequestTag::parse(text).is_err(), "{text:?} was accepted");
        }
    }
}
