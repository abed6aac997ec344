//! Keeping `updatedb` off stagefs mounts. Ctrip's lesson with a shared file system: the nightly
//! `updatedb` of every node walked the whole shared tree at once and overloaded the metadata
//! engine. A mount run as root adds its file-system type, `fuse.stagefs`, to `PRUNEFS` in
//! updatedb's configuration (as JuiceFS does for its own type), so `locate` databases leave every
//! stagefs mount out; `--no-prune-updatedb` leaves the file alone.

use std::io::Write;
use std::path::Path;

/// The type of every stagefs mount in `/proc/mounts` (`fuse.` and the mount's subtype).
pub const FS_TYPE: &str = "fuse.stagefs";

/// Where mlocate and plocate read their configuration.
pub const DEFAULT_CONF: &str = "/etc/updatedb.conf";

/// `conf` with `fs_type` added to its `PRUNEFS` (a line appended when there is none), or `None`
/// when `PRUNEFS` names it already (updatedb compares types without regard to case).
pub fn with_pruned(conf: &str, fs_type: &str) -> Option<String> {
    let mut out = String::with_capacity(conf.len() + fs_type.len() + 16);
    let mut found = false;
    for line in conf.split_inclusive('\n') {
        let Some(value) = prunefs_value(line).filter(|_| !found) else {
            out.push_str(line);
            continue;
        };
        found = true;
        let types: Vec<&str> = value.split_whitespace().collect();
        if types.iter().any(|t| t.eq_ignore_ascii_case(fs_type)) {
            return None;
        }
        let mut types = types;
        types.push(fs_type);
        out.push_str(&format!("PRUNEFS=\"{}\"\n", types.join(" ")));
    }
    if !found {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("PRUNEFS=\"{fs_type}\"\n"));
    }
    Some(out)
}

/// The value of a `PRUNEFS = "..."` line, without its quotes.
fn prunefs_value(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("PRUNEFS")?.trim_start();
    let value = rest.strip_prefix('=')?.trim();
    Some(value.trim_matches(|c| c == '"' || c == '\''))
}

/// Adds [`FS_TYPE`] to `PRUNEFS` in the configuration at `path`. The file is rewritten whole
/// (a temporary file beside it, renamed over it, so updatedb never reads half a file) and keeps
/// its mode. `Ok(false)`: nothing to do (already there, or updatedb is not installed).
pub fn prune(path: &Path) -> std::io::Result<bool> {
    let conf = match std::fs::read_to_string(path) {
        Ok(conf) => conf,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let Some(new) = with_pruned(&conf, FS_TYPE) else {
        return Ok(false);
    };
    let permissions = std::fs::metadata(path)?.permissions();
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".stagefs-{}", std::process::id()));
    let temp = std::path::PathBuf::from(temp);
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(new.as_bytes())?;
    file.set_permissions(permissions)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_type_to_an_existing_prunefs_line() {
        let conf = "PRUNE_BIND_MOUNTS=\"yes\"\nPRUNEFS=\"NFS nfs nfs4 afs\"\nPRUNEPATHS=\"/tmp\"\n";
        assert_eq!(
            with_pruned(conf, FS_TYPE).unwrap(),
            "PRUNE_BIND_MOUNTS=\"yes\"\nPRUNEFS=\"NFS nfs nfs4 afs fuse.stagefs\"\n\
             PRUNEPATHS=\"/tmp\"\n"
        );
    }

    #[test]
    fn leaves_a_configuration_that_names_it_alone() {
        assert_eq!(with_pruned("PRUNEFS = 'nfs FUSE.STAGEFS'\n", FS_TYPE), None);
    }

    #[test]
    fn appends_a_line_when_there_is_none() {
        assert_eq!(
            with_pruned("PRUNEPATHS=\"/tmp\"", FS_TYPE).unwrap(),
            "PRUNEPATHS=\"/tmp\"\nPRUNEFS=\"fuse.stagefs\"\n"
        );
        assert_eq!(
            with_pruned("", FS_TYPE).unwrap(),
            "PRUNEFS=\"fuse.stagefs\"\n"
        );
        assert_eq!(
            with_pruned("PRUNEFSX=\"a\"\n", FS_TYPE).unwrap(),
            "PRUNEFSX=\"a\"\nPRUNEFS=\"fuse.stagefs\"\n",
            "another variable that starts alike"
        );
    }

    #[test]
    fn prunes_a_file_in_place_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("updatedb.conf");
        assert!(!prune(&path).unwrap(), "no file: updatedb is not installed");
        std::fs::write(&path, "PRUNEFS=\"nfs\"\n").unwrap();
        assert!(prune(&path).unwrap());
        assert!(!prune(&path).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "PRUNEFS=\"nfs fuse.stagefs\"\n"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}
