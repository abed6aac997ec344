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

use crate::{MetaError, Result};

pub use shared::meta::{RequestTag, CHANGE_TAG_HEADER as HEADER, MAX_CHANGE_SLOTS as MAX_SLOTS};

tokio::task_local! {
    static TAG: Option<RequestTag>;
}

/// Runs `work` with `tag` (none: as an untagged request, whatever tag the caller runs with) as
/// the tag of the changes it makes. One task may serve several requests' changes: creates that
/// share a transaction run in the task of the one that leads it (`rules/batch`).
pub async fn scope<F: Future>(tag: Option<RequestTag>, work: F) -> F::Output {
    TAG.scope(tag, work).await
}

/// The tag of the request being served, if it has one.
pub fn current() -> Option<RequestTag> {
    TAG.try_with(|tag| *tag).ok().flatten()
}

/// Reads a tag from its header text.
pub fn parse(text: &str) -> Result<RequestTag> {
    RequestTag::parse(text).map_err(MetaError::Invalid)
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

impl Replayable for crate::Renamed {
    fn recorded(&self) -> u64 {
        self.moved
    }

    /// Which inode the new name replaced is not recorded: the answer names none, which tells
    /// the client to forget what it knew of every inode (as a rename did before it was told).
    fn replayed(_: Option<crate::Attr>) -> Result<crate::Renamed> {
        Ok(crate::Renamed::default())
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
