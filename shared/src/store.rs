//! Object store URLs: `file:///dir`, `memory://`, `s3://bucket[/prefix]`.
//!
//! S3 settings come from the usual `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...) and can be overridden by [`S3Options`].
//! The store's own retries are kept short: the gateway's upload drain owns retrying, with
//! backoff and quarantine, so an outage shows up in its status instead of inside one request.
//!
//! Every PUT carries a checksum the store verifies before it stores the object
//! ([`S3Integrity`]): by default a CRC64NVME of the body, with the body left out of the request's
//! signature, because hashing every uploaded byte with SHA-256 for the signature (and the store
//! hashing it again to check) was a fifth of the upload drain's cost on a 2-core machine.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

/// The S3 flags of every command that opens the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct S3Options {
    /// S3 endpoint (e.g. http://127.0.0.1:9000); default from AWS_ENDPOINT / AWS_ENDPOINT_URL.
    #[arg(long = "s3-endpoint")]
    pub endpoint: Option<String>,
    /// S3 region; default from AWS_REGION / AWS_DEFAULT_REGION.
    #[arg(long = "s3-region")]
    pub region: Option<String>,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long = "s3-allow-http")]
    pub allow_http: bool,
    /// How the store checks that an uploaded object arrived intact: `crc64nvme` sends a
    /// CRC64NVME of the body that the store verifies (AWS S3, MinIO, s3s; the body is not part of
    /// the request's signature), `signed` puts the body's SHA-256 into the signature, which every
    /// S3-compatible store verifies but costs both sides a hash of every byte. Use `signed` for a
    /// store that rejects the checksum header (the gateway's start-up probe fails on one) or
    /// ignores it (which no probe can tell: over plain HTTP it would take bodies unchecked).
    #[arg(long = "s3-integrity", value_enum, default_value_t)]
    pub integrity: S3Integrity,
}

impl S3Options {
    /// The command-line flags that give these options to another stagefs program.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(endpoint) = &self.endpoint {
            flags.extend(["--s3-endpoint".into(), endpoint.clone()]);
        }
        if let Some(region) = &self.region {
            flags.extend(["--s3-region".into(), region.clone()]);
        }
        if self.allow_http {
            flags.push("--s3-allow-http".into());
        }
        let integrity = clap::ValueEnum::to_possible_value(&self.integrity)
            .expect("every integrity setting has a name");
        flags.extend(["--s3-integrity".into(), integrity.get_name().to_string()]);
        flags
    }
}

/// How the store verifies an uploaded object's bytes (see [`S3Options::integrity`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum S3Integrity {
    /// `x-amz-checksum-crc64nvme`, with an unsigned payload.
    #[default]
    Crc64nvme,
    /// The payload's SHA-256 in the SigV4 signature.
    Signed,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    #[error("store URL {url:?} is not a URL: {source}")]
    Parse {
        url: String,
        source: url::ParseError,
    },
    #[error("store URL {url:?} has unsupported scheme {scheme:?} (use file:///dir, memory:// or s3://bucket)")]
    Scheme { url: String, scheme: String },
    #[error("store URL {url:?} names no bucket")]
    NoBucket { url: String },
    #[error("cannot use local store directory {dir:?}: {source}")]
    LocalDir { dir: String, source: std::io::Error },
    #[error("cannot configure object store {url:?}: {source}")]
    Configure {
        url: String,
        source: object_store::Error,
    },
}

/// Opens the object store a URL names.
pub fn open_store(url: &str, s3: &S3Options) -> Result<Arc<dyn ObjectStore>, StoreUrlError> {
    let parsed = url::Url::parse(url).map_err(|source| StoreUrlError::Parse {
        url: url.into(),
        source,
    })?;
    match parsed.scheme() {
        "memory" => Ok(Arc::new(InMemory::new())),
        "file" => {
            let dir = parsed.path().to_string();
            std::fs::create_dir_all(&dir).map_err(|source| StoreUrlError::LocalDir {
                dir: dir.clone(),
                source,
            })?;
            let store = LocalFileSystem::new_with_prefix(&dir).map_err(|source| {
                StoreUrlError::Configure {
                    url: url.into(),
                    source,
                }
            })?;
            Ok(Arc::new(store))
        }
        "s3" => {
            let bucket = parsed
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| StoreUrlError::NoBucket { url: url.into() })?;
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(RetryConfig {
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(10),
                    ..Default::default()
                })
                .with_client_options(
                    ClientOptions::new()
                        .with_connect_timeout(Duration::from_secs(5))
                        .with_timeout(Duration::from_secs(60)),
                );
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(region) = &s3.region {
                builder = builder.with_region(region);
            }
            if s3.allow_http {
                builder = builder.with_allow_http(true);
            }
            builder = match s3.integrity {
                S3Integrity::Crc64nvme => builder
                    .with_unsigned_payload(true)
                    .with_checksum_algorithm(Checksum::CRC64NVME),
                S3Integrity::Signed => builder.with_unsigned_payload(false),
            };
            let store: Arc<dyn ObjectStore> =
                Arc::new(builder.build().map_err(|source| StoreUrlError::Configure {
                    url: url.into(),
                    source,
                })?);
            let prefix = parsed.path().trim_matches('/');
            if prefix.is_empty() {
                Ok(store)
            } else {
                Ok(Arc::new(PrefixStore::new(store, Path::from(prefix))))
            }
        }
        other => Err(StoreUrlError::Scheme {
            url: url.into(),
            scheme: other.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_schemes_and_missing_buckets() {
        assert!(matches!(
            open_store("ftp://x", &S3Options::default()),
            Err(StoreUrlError::Scheme { .. })
        ));
        assert!(matches!(
            open_store("not a url", &S3Options::default()),
            Err(StoreUrlError::Parse { .. })
        ));
        assert!(open_store("memory://", &S3Options::default()).is_ok());
    }

    #[test]
    fn flags_parse_back_to_the_same_options() {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            s3: S3Options,
        }
        use clap::Parser;
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: Some("eu-west-1".into()),
            allow_http: true,
            integrity: S3Integrity::Signed,
        };
        for options in [options, S3Options::default()] {
            let line = std::iter::once("stagefs".to_string()).chain(options.flags());
            assert_eq!(Command::try_parse_from(line).unwrap().s3, options);
        }
    }
}
