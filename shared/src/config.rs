//! `--config FILE`: a TOML file of flag settings, read before the command line is parsed.
//!
//! Each top-level key names a long flag of the subcommand (`upload_delay = "10s"` or
//! `upload-delay = "10s"` is `--upload-delay 10s`); `true` sets a switch and `false` leaves it
//! off; an array repeats the flag. The settings go in front of the command line's own flags,
//! which therefore override them (the subcommand parses with `args_override_self`). A key that
//! is no flag of the subcommand is refused by the parser as an unknown flag; positional
//! arguments stay on the command line. A switch set `true` in the file cannot be turned off
//! on the command line unless it has a `--no-…` twin (as `--allow-other` has): leave such
//! switches out of a file shared by commands that differ in them.

use std::ffi::OsString;
use std::path::PathBuf;

/// A config file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("--config {}: {reason}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub reason: String,
}

/// `argv` with the settings of the `--config FILE` given after `subcommand` inserted right
/// after it, as flags. `argv` is returned as it is when the subcommand is not there or has no
/// `--config`.
pub fn expand(argv: Vec<OsString>, subcommand: &str) -> Result<Vec<OsString>, ConfigError> {
    let Some(at) = argv
        .iter()
        .skip(1)
        .position(|a| a == subcommand)
        .map(|i| i + 2)
    else {
        return Ok(argv);
    };
    let Some(path) = config_path(&argv[at..]) else {
        return Ok(argv);
    };
    let error = |reason: String| ConfigError {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| error(format!("cannot read it: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| error(format!("not TOML: {}", e.message())))?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let flag = flag_of(key).map_err(error)?;
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for value in values {
            let text = match value {
                toml::Value::Boolean(true) => {
                    flags.push(OsString::from(&flag));
                    continue;
                }
                toml::Value::Boolean(false) => continue,
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => {
                    return Err(error(format!(
                        "{key}: a {} is no flag value (give a string, number, boolean or an \
                         array of them)",
                        other.type_str()
                    )))
                }
            };
            // `--flag=value`, so a value that starts with '-' is not taken for a flag.
            flags.push(OsString::from(format!("{flag}={text}")));
        }
    }
    let mut out = argv;
    out.splice(at..at, flags);
    Ok(out)
}

/// The value of `--config` among a subcommand's arguments (before any `--`).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter().take_while(|a| *a != "--");
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(path));
        }
    }
    None
}

fn flag_of(key: &str) -> Result<String, String> {
    let valid = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid {
        return Err(format!(
            "{key:?} is no flag name (lower-case letters, digits, '_' or '-')"
        ));
    }
    let flag = format!("--{}", key.replace('_', "-"));
    if flag == "--config" {
        return Err("a config file cannot name another one".into());
    }
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn config(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stagefs.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        (dir, path)
    }

    #[test]
    fn settings_go_before_the_command_lines_own_flags() {
        let (_dir, path) = config(
            "upload_delay = \"10s\"\nformat = true\nuploads-paused = false\nmax_connections = 9\n\
             tls_cert = \"-odd.pem\"\n",
        );
        let out = expand(
            argv(&["gw", "serve", "--config", &path, "--max-connections", "2"]),
            "serve",
        )
        .unwrap();
        assert_eq!(
            out,
            argv(&[
                "gw",
                "serve",
                "--format",
                "--max-connections=9",
                "--tls-cert=-odd.pem",
                "--upload-delay=10s",
                "--config",
                &path,
                "--max-connections",
                "2"
            ])
        );
    }

    #[test]
    fn arrays_repeat_and_without_config_nothing_changes() {
        let (_dir, path) = config("option = [\"a\", \"b\"]\n");
        let out = expand(
            argv(&["c", "mount", &format!("--config={path}"), "gw", "/mnt"]),
            "mount",
        )
        .unwrap();
        assert_eq!(&out[2..4], &argv(&["--option=a", "--option=b"])[..]);
        let plain = argv(&["c", "mount", "gw", "/mnt", "--", "--config", "x"]);
        assert_eq!(expand(plain.clone(), "mount").unwrap(), plain);
        assert_eq!(
            expand(argv(&["c", "status", "--config", "x"]), "mount")
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let missing = expand(
            argv(&["gw", "serve", "--config", "/nonexistent.toml"]),
            "serve",
        );
        assert!(missing.unwrap_err().to_string().contains("cannot read it"));
        for (text, says) in [
            ("listen = ", "not TOML"),
            ("[section]\nx = 1\n", "is no flag value"),
            ("\"Bad Key\" = 1\n", "is no flag name"),
            ("config = \"other.toml\"\n", "cannot name another"),
        ] {
            let (_dir, path) = config(text);
            let error = expand(argv(&["gw", "serve", "--config", &path]), "serve").unwrap_err();
            assert!(error.to_string().contains(says), "{text:?}: {error}");
            assert!(error.to_string().starts_with("--config "), "{error}");
        }
    }
}
