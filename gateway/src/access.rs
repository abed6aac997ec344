//! Who may call this gateway, and what each caller may do (`serve --tokens FILE`).
//!
//! Each tenant is a `[[token]]` of the TOML file: a name (for logs), a secret the client presents
//! as `authorization: Bearer SECRET`, and an access level. [`Authenticate`] runs before every RPC
//! of both services: a request without a known secret is refused with `UNAUTHENTICATED` before
//! any service code sees it, and a known one carries its [`Tenant`] in the request's extensions,
//! where the services read it ([`tenant_of`]) to refuse changes from read-only tenants (EROFS)
//! and operations from non-admins. Without `--tokens` every caller is [`Tenant::anonymous`], an
//! admin: the gateway then serves as before, and says so in a warning at start.
//!
//! The file is read again on SIGHUP ([`Tokens::reload`]); a file that does not parse leaves the
//! tokens in force unchanged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// What a tenant may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLevel {
    /// Read everything; change nothing.
    Ro,
    /// Read and write files.
    Rw,
    /// Also the operations that act on the gateway for everyone: pausing uploads, retrying
    /// quarantined blocks, deleting blocks.
    Admin,
}

/// A caller, as its token names it.
#[derive(Debug, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub access: AccessLevel,
    /// The directory it is confined to (`root = "/team-a"`), if any ([`crate::confine`]).
    pub root: Option<TenantRoot>,
}

/// The directory a confined tenant sees as the root of the file system.
#[derive(Debug, PartialEq, Eq)]
pub struct TenantRoot {
    /// As the tokens file writes it, for messages.
    pub path: String,
    /// Its names from the file system's root down.
    pub names: Vec<String>,
    /// Its inode, found at the tenant's first request after the file was read (start or
    /// SIGHUP): renaming the directory later does not change what the tenant sees.
    pub ino: tokio::sync::OnceCell<u64>,
}

impl TenantRoot {
    /// `path`, checked: absolute, no `.` or `..`, no empty or overlong names. `/` confines to
    /// nothing (`None`).
    fn parse(path: &str) -> Result<Option<TenantRoot>, String> {
        let Some(rest) = path.strip_prefix('/') else {
            return Err(format!("root {path:?} must be an absolute path"));
        };
        let names: Vec<String> = rest
            .split('/')
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect();
        if let Some(bad) = names
            .iter()
            .find(|n| *n == "." || *n == ".." || n.len() > 255 || n.contains('\0'))
        {
            return Err(format!("root {path:?} has the name {bad:?}"));
        }
        Ok((!names.is_empty()).then(|| TenantRoot {
            path: path.to_string(),
            names,
            ino: tokio::sync::OnceCell::new(),
        }))
    }
}

impl Tenant {
    /// Everyone, when the gateway runs without `--tokens`.
    pub fn anonymous() -> Arc<Tenant> {
        Arc::new(Tenant {
            name: String::new(),
            access: AccessLevel::Admin,
            root: None,
        })
    }

    pub fn may_write(&self) -> bool {
        self.access != AccessLevel::Ro
    }

    pub fn is_admin(&self) -> bool {
        self.access == AccessLevel::Admin
    }
}

/// Why a tokens file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the tokens file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Shortest secret accepted: 128 bits written in hex.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    secret: String,
    access: AccessLevel,
    root: Option<String>,
}

/// Each known secret with its tenant.
type Known = Vec<(Vec<u8>, Arc<Tenant>)>;

/// The tenants in force.
pub struct Tokens {
    /// `None` without `--tokens`: every caller is [`Tenant::anonymous`].
    path: Option<PathBuf>,
    known: RwLock<Arc<Known>>,
}

impl Tokens {
    /// No authentication: every caller is an admin.
    pub fn open_to_all() -> Tokens {
        Tokens {
            path: None,
            known: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// The tenants of the TOML file at `path`.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        Ok(Tokens {
            known: RwLock::new(Arc::new(read_tokens(path)?)),
            path: Some(path.to_path_buf()),
        })
    }

    /// Whether callers must present a token.
    pub fn required(&self) -> bool {
        self.path.is_some()
    }

    /// Reads the file again (SIGHUP); on error the tokens in force stay. Returns the number of
    /// tenants now in force.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let fresh = read_tokens(path)?;
        let count = fresh.len();
        *self.known.write().expect("tokens lock poisoned") = Arc::new(fresh);
        Ok(count)
    }

    /// The tenant whose secret `authorization` carries (`Bearer SECRET`).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<Tenant>, Status> {
        if self.path.is_none() {
            return Ok(Tenant::anonymous());
        }
        let Some(header) = authorization else {
            return Err(Status::unauthenticated(
                "this gateway requires a token: pass --token-file or set STAGEFS_TOKEN",
            ));
        };
        let presented = header
            .strip_prefix(b"Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization is not \"Bearer TOKEN\""))?;
        let known = self.known.read().expect("tokens lock poisoned").clone();
        // Every secret is compared, each in constant time, so timing does not tell how much of a
        // guess was right or which tenant it was close to.
        let mut found = None;
        for (secret, tenant) in known.iter() {
            if constant_time_eq(secret, presented) {
                found = Some(tenant.clone());
            }
        }
        found.ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn read_tokens(path: &Path) -> Result<Known, TokensError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| TokensError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let file: TokensFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if file.token.is_empty() {
        return Err(invalid(
            "no [[token]] entries: nobody could connect (drop --tokens to serve without \
             authentication)"
                .into(),
        ));
    }
    let mut tenants: Known = Vec::with_capacity(file.token.len());
    for entry in file.token {
        let name = entry.name.trim().to_string();
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) {
            return Err(invalid(format!(
                "token name {:?}: 1 to 64 printable ASCII characters without spaces",
                shared::clip(&entry.name, 80)
            )));
        }
        if entry.secret.len() < MIN_SECRET_LEN
            || !entry.secret.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(invalid(format!(
                "token {name:?}: a secret is at least {MIN_SECRET_LEN} printable ASCII \
                 characters (e.g. `openssl rand -hex 32`)"
            )));
        }
        let root = match &entry.root {
            Some(path) => {
                TenantRoot::parse(path).map_err(|e| invalid(format!("token {name:?}: {e}")))?
            }
            None => None,
        };
        if root.is_some() && entry.access == AccessLevel::Admin {
            return Err(invalid(format!(
                "token {name:?}: an admin acts on the whole gateway and cannot have a root"
            )));
        }
        if tenants.iter().any(|(_, t)| t.name == name) {
            return Err(invalid(format!("token name {name:?} appears twice")));
        }
        if tenants
            .iter()
            .any(|(secret, _)| secret.as_slice() == entry.secret.as_bytes())
        {
            return Err(invalid(format!(
                "token {name:?} has the secret of another token"
            )));
        }
        tenants.push((
            entry.secret.into_bytes(),
            Arc::new(Tenant {
                name,
                access: entry.access,
                root,
            }),
        ));
    }
    Ok(tenants)
}

/// The interceptor in front of both services: every request is authenticated before any service
/// code runs, and carries its [`Tenant`] from then on.
#[derive(Clone)]
pub struct Authenticate(pub Arc<Tokens>);

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let tenant = self.0.authenticate(
            request
                .metadata()
                .get("authorization")
                .map(|value| value.as_bytes()),
        )?;
        crate::telemetry::count_request(&tenant.name);
        request.extensions_mut().insert(tenant);
        Ok(request)
    }
}

/// The caller of `request`, as [`Authenticate`] found it. A request that did not pass through it
/// (a service called directly, in unit tests) is anonymous.
pub fn tenant_of<T>(request: &Request<T>) -> Arc<Tenant> {
    tenant_in(request.extensions())
}

/// [`tenant_of`] from a request's extensions (a raw HTTP request, below the gRPC layer).
pub fn tenant_in(extensions: &tonic::codegen::http::Extensions) -> Arc<Tenant> {
    extensions
        .get::<Arc<Tenant>>()
        .cloned()
        .unwrap_or_else(Tenant::anonymous)
}

/// Refuses what acts on the gateway for everyone (`what`: "delete blocks") unless the tenant is
/// an admin (on a gateway without `--tokens`, everyone is).
pub fn must_be_admin<T>(request: &Request<T>, what: &str) -> Result<(), Status> {
    let tenant = tenant_of(request);
    if tenant.is_admin() {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "only an admin token may {what}; token {:?} is not one",
        shared::clip(&tenant.name, shared::MAX_ERROR_MESSAGE_BYTES / 4)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SECRET_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn bearer(secret: &str) -> Vec<u8> {
        format!("Bearer {secret}").into_bytes()
    }

    #[test]
    fn known_secrets_name_their_tenant_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            &format!(
                "[[token]]\nname = \"training\"\nsecret = \"{SECRET_A}\"\naccess = \"rw\"\n\n\
                 [[token]]\nname = \"readers\"\nsecret = \"{SECRET_B}\"\naccess = \"ro\"\n"
            ),
        );
        let tokens = Tokens::load(&path).unwrap();
        let tenant = tokens.authenticate(Some(&bearer(SECRET_A))).unwrap();
        assert_eq!(
            (tenant.name.as_str(), tenant.may_write()),
            ("training", true)
        );
        assert!(!tenant.is_admin());
        let tenant = tokens.authenticate(Some(&bearer(SECRET_B))).unwrap();
        assert!(!tenant.may_write());
        for refused in [
            None,
            Some(b"Bearer wrong".to_vec()),
            Some(SECRET_A.as_bytes().to_vec()),
        ] {
            let status = tokens.authenticate(refused.as_deref()).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }

        // Rotation: B is gone, A is now an admin.
        write(
            &dir,
            &format!("[[token]]\nname = \"ops\"\nsecret = \"{SECRET_A}\"\naccess = \"admin\"\n"),
        );
        assert_eq!(tokens.reload().unwrap(), 1);
        assert!(tokens
            .authenticate(Some(&bearer(SECRET_A)))
            .unwrap()
            .is_admin());
        assert!(tokens.authenticate(Some(&bearer(SECRET_B))).is_err());
        // A broken file keeps what is in force.
        write(&dir, "[[token]]\nname = \"x\"\n");
        assert!(matches!(tokens.reload(), Err(TokensError::Invalid { .. })));
        assert!(tokens.authenticate(Some(&bearer(SECRET_A))).is_ok());
    }

    #[test]
    fn a_bad_file_is_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        for (text, says) in [
            ("", "no [[token]]"),
            (
                "[[token]]\nname = \"a\"\nsecret = \"short\"\naccess = \"rw\"\n",
                "at least",
            ),
            (
                &format!("[[token]]\nname = \"a\"\nsecret = \"{SECRET_A}\"\naccess = \"all\"\n"),
                "unknown variant",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsecret = \"{SECRET_A}\"\naccess = \"rw\"\n\
                     root = \"team-a\"\n"
                ),
                "absolute",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsecret = \"{SECRET_A}\"\naccess = \"rw\"\n\
                     root = \"/team-a/../b\"\n"
                ),
                "has the name \"..\"",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsecret = \"{SECRET_A}\"\naccess = \"admin\"\n\
                     root = \"/team-a\"\n"
                ),
                "cannot have a root",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsecret = \"{SECRET_A}\"\naccess = \"rw\"\n\
                     [[token]]\nname = \"a\"\nsecret = \"{SECRET_B}\"\naccess = \"rw\"\n"
                ),
                "appears twice",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsecret = \"{SECRET_A}\"\naccess = \"rw\"\n\
                     [[token]]\nname = \"b\"\nsecret = \"{SECRET_A}\"\naccess = \"rw\"\n"
                ),
                "secret of another",
            ),
        ] {
            let error = Tokens::load(&write(&dir, text))
                .err()
                .expect(text)
                .to_string();
            assert!(error.contains(says), "{text:?}: {error}");
        }
        assert!(matches!(
            Tokens::load(&dir.path().join("missing")),
            Err(TokensError::Read { .. })
        ));
    }

    #[test]
    fn a_root_is_read_as_its_names() {
        let root = TenantRoot::parse("/team-a//runs/").unwrap().unwrap();
        assert_eq!(root.names, ["team-a", "runs"]);
        assert_eq!(root.path, "/team-a//runs/");
        assert!(TenantRoot::parse("/").unwrap().is_none());
        assert!(TenantRoot::parse("/a/./b").is_err());
    }

    #[test]
    fn the_deployment_example_is_a_valid_tokens_file() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/deploy/tokens.example.toml");
        let tokens = Tokens::load(&path).unwrap();
        let known = tokens.known.read().unwrap().clone();
        let levels: Vec<(&str, AccessLevel)> = known
            .iter()
            .map(|(_, t)| (t.name.as_str(), t.access))
            .collect();
        assert_eq!(
            levels,
            [
                ("training", AccessLevel::Rw),
                ("readers", AccessLevel::Ro),
                ("team-a", AccessLevel::Rw),
                ("ops", AccessLevel::Admin)
            ]
        );
    }

    #[test]
    fn without_tokens_everyone_is_an_anonymous_admin() {
        let tokens = Tokens::open_to_all();
        assert!(!tokens.required());
        assert!(tokens.authenticate(None).unwrap().is_admin());
    }
}
