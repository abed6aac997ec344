//! gRPC answers: the errno a refusal carries in `stagefs-errno`, and what a refusal must look like.

use tonic::{Code, Status};

/// The errno a failed RPC carries in `stagefs-errno`.
pub fn errno_of(status: &Status) -> i32 {
    let value = status
        .metadata()
        .get(proto::ERRNO_METADATA_KEY)
        .unwrap_or_else(|| {
            panic!(
                "{:?} {:?} carries no {} metadata",
                status.code(),
                status.message(),
                proto::ERRNO_METADATA_KEY
            )
        });
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{} is not a decimal errno: {value:?}",
                proto::ERRNO_METADATA_KEY
            )
        })
}

/// Asserts that `result` failed with `errno` and `code`.
pub fn expect_errno<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, Status>,
    errno: i32,
    code: Code,
) {
    let status = match result {
        Ok(value) => panic!("{what}: expected errno {errno}, got success {value:?}"),
        Err(status) => status,
    };
    assert_eq!(
        (errno_of(&status), status.code()),
        (errno, code),
        "{what}: {status:?}"
    );
    assert!(
        !status.message().is_empty(),
        "{what}: the message says nothing"
    );
}
