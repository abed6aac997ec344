//! The suite on PostgreSQL, and what only a shared database has: several engines at once.

use super::Db;

fn db() -> Db {
    Db::postgres()
}

/// Cases of the model test unless `PROPTEST_CASES` says otherwise.
const MODEL_CASES: u32 = 48;

// The same suite files are modules of every backend's test module, on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "conformance.rs"]
mod conformance;
#[allow(clippy::duplicate_mod)]
#[path = "model.rs"]
mod model;
