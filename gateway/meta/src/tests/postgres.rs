//! The suite on PostgreSQL, and what only a shared database has: several engines at once.

use super::Db;

fn db() -> Db {
    Db::postgres()
}

/// Cases of the model test unless `PROPTEST_CASES` says otherwise.
const MODEL_CASES: u32 = 48;

#[path = "conformance.rs"]
mod conformance;
#[path = "model.rs"]
mod model;
