//! Privilege separation (README "Security"): the agent runs as a user of
//! its own, which can reach its workspaces and nothing of the server's.
//!
//! With `BREAKGLASS_AGENT_USER` set (the server started as root), every
//! agent process runs with that user's uid and gid, no supplementary groups
//! (the standard library drops them when root sets a uid) and that user's
//! `HOME`. The server's own files are created under umask 077 and any older
//! ones are made private at start-up, so the agent can neither read the
//! database or the login key nor write them; the data directory is only
//! traversable (0711) when the workspaces live inside it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::unistd::{Uid, User};

/// The user the agent runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// The CLI keeps its state (and its login) here.
    pub home: PathBuf,
}

impl AgentUser {
    /// Looks the user up and checks it can be used: not root, with a home
    /// where the CLI can keep its state (a home it owns, or a `.claude`
    /// directory it owns in it), and the server able to switch to it
    /// (root).
    pub fn lookup(name: &str) -> anyhow::Result<AgentUser> {
        let user = User::from_name(name)
            .with_context(|| format!("BREAKGLASS_AGENT_USER: cannot look up {name:?}"))?
            .with_context(|| format!("BREAKGLASS_AGENT_USER: no user named {name:?}"))?;
        if user.uid.is_root() {
            bail!("BREAKGLASS_AGENT_USER: {name:?} is root; name an unprivileged user of the agent's own");
        }
        if !Uid::effective().is_root() {
            bail!("BREAKGLASS_AGENT_USER: switching the agent to {name:?} needs the server to start as root");
        }
        let home = user.dir.clone();
        let owns_dir =
            |path: &Path| std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.uid() == user.uid.as_raw());
        match std::fs::metadata(&home) {
            Ok(meta) if meta.is_dir() && (owns_dir(&home) || owns_dir(&home.join(".claude"))) => {}
            Ok(_) => bail!(
                "BREAKGLASS_AGENT_USER: {name:?}'s home {} is not a directory it owns, nor does it hold a .claude \
                 directory it owns; the CLI keeps its state there",
                home.display()
            ),
            Err(err) => bail!(
                "BREAKGLASS_AGENT_USER: {name:?}'s home {} cannot be used ({err}); create it, owned by {name}",
                home.display()
            ),
        }
        Ok(AgentUser { name: name.to_owned(), uid: user.uid.as_raw(), gid: user.gid.as_raw(), home })
    }

    /// Hands a workspace and everything in it to the agent, changing
    /// owners without following a single link. Only for a tree nobody but
    /// root could change while it runs (a workspace not yet handed over).
    pub fn give_tree(&self, root: &Path) -> std::io::Result<()> {
        let mut pending = vec![root.to_owned()];
        while let Some(path) = pending.pop() {
            let meta = std::fs::symlink_metadata(&path)?;
            std::os::unix::fs::lchown(&path, Some(self.uid), Some(self.gid))?;
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    pending.push(entry?.path());
                }
            }
        }
        Ok(())
    }
}

/// What ssh and the CLI's Bash tool read from the agent user's home as
/// configuration: ssh reads `~/.ssh/config` (a `ProxyCommand` or
/// `LocalCommand` there runs with every `ssh devvm uptime` the policy lets
/// through), and the CLI sources the shell startup files into every Bash
/// command (a function named `ssh` there replaces ssh).
const READ_AS_CONFIGURATION: [&str; 10] = [
    ".ssh",
    ".ssh/config",
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
];

/// With approvals on, refuses an agent user that can write what its own
/// commands read as configuration (README "The SSH key and the agent's
/// two hosts"): its home, `~/.ssh`, `~/.ssh/config` and its shell startup
/// files, and every directory above them. Otherwise one allowed write
/// would let every later command the policy runs unasked do anything.
/// A file or directory it cannot write but that is missing is fine: it
/// cannot create it either.
pub fn check_config_is_not_its_own(user: &AgentUser) -> anyhow::Result<()> {
    let refuse = |path: &Path| {
        anyhow::anyhow!(
            "BREAKGLASS_AGENT_USER: {} can write {}, so one allowed write could plant an ssh config or a shell \
             startup file that every later unasked `ssh devvm …` obeys; make its home, ~/.ssh and what they hold \
             root's and not writable by it (README \"The SSH key and the agent's two hosts\"), or set \
             BREAKGLASS_APPROVALS=off",
            user.name,
            path.display()
        )
    };
    let mut targets = vec![user.home.clone()];
    targets.extend(READ_AS_CONFIGURATION.iter().map(|name| user.home.join(name)));
    for target in targets {
        if std::fs::symlink_metadata(&target).is_err() {
            continue;
        }
        // Through any link, to where it leads; and by the path ssh opens.
        let resolved =
            std::fs::canonicalize(&target).with_context(|| format!("while checking {}", target.display()))?;
        for (path, is_target) in [(target.as_path(), true), (resolved.as_path(), true)]
            .into_iter()
            .chain(target.ancestors().skip(1).map(|dir| (dir, false)))
            .chain(resolved.ancestors().skip(1).map(|dir| (dir, false)))
        {
            let meta = std::fs::metadata(path).with_context(|| format!("while checking {}", path.display()))?;
            if writable_by(&meta, user, is_target) {
                return Err(refuse(path));
            }
        }
    }
    Ok(())
}

/// Whether `user` (its uid and primary gid: an agent process has no other
/// group) can change the entry: its owner can always chmod it. In a
/// directory above the target, a sticky bit keeps others' entries
/// (`/tmp`), so only a writable directory without it counts there.
fn writable_by(meta: &std::fs::Metadata, user: &AgentUser, is_target: bool) -> bool {
    let mode = meta.permissions().mode();
    let sticky = !is_target && mode & 0o1000 != 0;
    meta.uid() == user.uid || (!sticky && ((meta.gid() == user.gid && mode & 0o020 != 0) || mode & 0o002 != 0))
}

/// Files the server creates are its own alone, whatever the umask it was
/// started with.
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Makes the data directory's own files private (a database created by an
/// older version, or under another umask, may be world-readable), and sets
/// the directories' modes for the agent user: the data directory only
/// traversable when the workspaces are inside it, the sessions directory
/// traversable and unlistable. Without an agent user the directories are
/// left as the operator made them.
pub fn secure_dirs(data_dir: &Path, sessions_dir: &Path, user: Option<&AgentUser>) -> anyhow::Result<()> {
    let sessions_inside = sessions_dir.starts_with(data_dir);
    for entry in std::fs::read_dir(data_dir).with_context(|| format!("while reading {}", data_dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if sessions_inside && path == sessions_dir {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                .with_context(|| format!("while making {} private", path.display()))?;
        }
    }
    let Some(user) = user else {
        return Ok(());
    };
    set_mode(data_dir, if sessions_inside { 0o711 } else { 0o700 })?;
    set_mode(sessions_dir, 0o711)?;
    check_reachable(sessions_dir, user)
}

fn set_mode(dir: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("while setting the mode of {}", dir.display()))
}

/// The agent starts in its workspace, so every directory above the
/// sessions directory must be searchable by it: said at start-up rather
/// than as a failed turn.
fn check_reachable(sessions_dir: &Path, user: &AgentUser) -> anyhow::Result<()> {
    let absolute = std::path::absolute(sessions_dir)?;
    for dir in absolute.ancestors() {
        let meta = std::fs::metadata(dir).with_context(|| format!("while checking {}", dir.display()))?;
        let mode = meta.permissions().mode();
        let searchable = if meta.uid() == user.uid {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            bail!(
                "BREAKGLASS_AGENT_USER: {} cannot reach its workspaces in {}: {} is not searchable by it \
                 (chmod o+x it, or set BREAKGLASS_SESSIONS_DIR elsewhere)",
                user.name,
                sessions_dir.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// SIGKILLs every process of the agent user: whatever a turn left behind,
/// however it hid (a new session, a scrubbed environment). Only called
/// when no turn is running. Returns how many were found.
pub fn kill_all(user: &AgentUser) -> usize {
    let mut killed = 0;
    for _ in 0..100 {
        let found: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| owned_by(*pid, user.uid))
            .collect();
        if found.is_empty() {
            break;
        }
        for pid in &found {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
        killed += found.len();
    }
    killed
}

/// The process's real uid is `uid`, and it is not a zombie.
fn owned_by(pid: i32, uid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains("Z"));
    let real_uid = status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok());
    !zombie && real_uid == Some(uid)
}
