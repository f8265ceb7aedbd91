//! Private files of the data directory, written whole or not at all
//! (README "Security": the server's files are its own, mode 0600).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::util::random_token;

/// Writes a whole file or nothing: a temporary file beside it, renamed over
/// it, so a reader never sees half a key or half a link.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temporary = dir.join(format!(".{name}.{}", random_token()));
    let written = (|| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        match_parent_owner(&temporary)?;
        fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// Only root can give a file away, and only a command run as root (by
/// `sudo`, say) leaves files another user's server cannot use.
pub fn match_parent_owner(path: &Path) -> io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let parent = fs::metadata(path.parent().unwrap_or(Path::new(".")))?;
    let own = fs::symlink_metadata(path)?;
    if (own.uid(), own.gid()) != (parent.uid(), parent.gid()) {
        std::os::unix::fs::chown(path, Some(parent.uid()), Some(parent.gid()))?;
    }
    Ok(())
}
