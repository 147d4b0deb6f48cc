//! Privileges: `PR_SET_NO_NEW_PRIVS` for the whole process, and an
//! optional drop to another user and group (`--user`, `--group`) once the
//! VM's devices are open.
//!
//! What abide needs at least: read-write access to `/dev/kvm` (root, or the
//! `kvm` group), access to its image, kernel and snapshot files and API
//! socket directory, and `CAP_NET_ADMIN` only to open a tap by name (a tap
//! descriptor handed over as `fd=` needs nothing). After the drop, the VM
//! runs on with what it has open; what it opens later (a snapshot it is
//! asked to write, a VM `abide serve` is asked to create) must be open to
//! the new user.

use std::ffi::CString;
use std::sync::OnceLock;

/// Why the privileges could not be set or dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// No such user.
    #[error("--user '{0}': no such user (give a name from /etc/passwd or a numeric uid)")]
    NoUser(String),
    /// No such group.
    #[error("--group '{0}': no such group (give a name from /etc/group or a numeric gid)")]
    NoGroup(String),
    /// --group without --user.
    #[error("--group needs --user (abide drops to a user and group together)")]
    GroupWithoutUser,
    /// The kernel refused.
    #[error("cannot {what}")]
    Call {
        /// What was attempted.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Who abide becomes after set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// User id.
    pub uid: libc::uid_t,
    /// Group id.
    pub gid: libc::gid_t,
}

static TARGET: OnceLock<Target> = OnceLock::new();

fn lookup_user(user: &str) -> Result<(libc::uid_t, libc::gid_t), PrivilegeError> {
    let name = CString::new(user).map_err(|_| PrivilegeError::NoUser(user.into()))?;
    // SAFETY: `name` is a valid C string; getpwnam returns null or a
    // pointer to a static record, read at once (main thread, no other
    // thread calls getpw*).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if !pw.is_null() {
        // SAFETY: `pw` is non-null and points to a valid passwd record.
        return Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) });
    }
    match user.parse::<libc::uid_t>() {
        // A numeric uid with no passwd entry keeps its number as group.
        Ok(uid) => Ok((uid, uid)),
        Err(_) => Err(PrivilegeError::NoUser(user.into())),
    }
}

fn lookup_group(group: &str) -> Result<libc::gid_t, PrivilegeError> {
    let name = CString::new(group).map_err(|_| PrivilegeError::NoGroup(group.into()))?;
    // SAFETY: as in lookup_user, for getgrnam.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if !gr.is_null() {
        // SAFETY: `gr` is non-null and points to a valid group record.
        return Ok(unsafe { (*gr).gr_gid });
    }
    group
        .parse()
        .map_err(|_| PrivilegeError::NoGroup(group.into()))
}

/// Resolves `--user`/`--group` (names or numbers) to the ids to drop to.
/// The group defaults to the user's primary group.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Target>, PrivilegeError> {
    let Some(user) = user else {
        return match group {
            Some(_) => Err(PrivilegeError::GroupWithoutUser),
            None => Ok(None),
        };
    };
    let (uid, primary) = lookup_user(user)?;
    let gid = group.map(lookup_group).transpose()?.unwrap_or(primary);
    Ok(Some(Target { uid, gid }))
}

fn check(r: libc::c_int, what: impl Into<String>) -> Result<(), PrivilegeError> {
    if r == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Call {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Sets `PR_SET_NO_NEW_PRIVS` (no exec'd program can gain privileges, and
/// seccomp filters need it) and remembers `target` for [`drop_now`].
/// Called by `main` before any thread starts.
pub fn configure(target: Option<Target>) -> Result<(), PrivilegeError> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(r, "set PR_SET_NO_NEW_PRIVS")?;
    if let Some(t) = target {
        let _ = TARGET.set(t);
    }
    Ok(())
}

/// Whether a drop is configured (the filters then allow glibc's
/// per-thread set*id calls).
pub fn dropping() -> bool {
    TARGET.get().is_some()
}

/// Drops to the configured user and group, for every thread of the
/// process (glibc applies set*id to all threads); nothing if none is
/// configured. Supplementary groups are cleared. Dropping from root to
/// another user also clears every capability.
pub fn drop_now() -> Result<(), PrivilegeError> {
    let Some(t) = TARGET.get() else {
        return Ok(());
    };
    // SAFETY: a null list with size 0 is allowed.
    let r = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(r, "clear the supplementary groups")?;
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::setresgid(t.gid, t.gid, t.gid) };
    check(r, format!("change to group {}", t.gid))?;
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::setresuid(t.uid, t.uid, t.uid) };
    check(r, format!("change to user {}", t.uid))?;
    // Make sure it cannot be undone. The raw call tries on this thread
    // only (glibc's setuid would make every thread try, and the other
    // threads' filters do not allow setuid).
    // SAFETY: plain integer arguments.
    if t.uid != 0 && unsafe { libc::syscall(libc::SYS_setuid, 0) } == 0 {
        return Err(PrivilegeError::Call {
            what: "drop root for good: setuid(0) still succeeds".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve() {
        assert_eq!(resolve(None, None).expect("none"), None);
        assert!(matches!(
            resolve(None, Some("0")),
            Err(PrivilegeError::GroupWithoutUser)
        ));
        assert_eq!(
            resolve(Some("root"), None).expect("root"),
            Some(Target { uid: 0, gid: 0 })
        );
        assert_eq!(
            resolve(Some("12345"), Some("54321")).expect("numbers"),
            Some(Target {
                uid: 12345,
                gid: 54321
            })
        );
        assert!(matches!(
            resolve(Some("no-such-user-abide"), None),
            Err(PrivilegeError::NoUser(_))
        ));
        assert!(matches!(
            resolve(Some("root"), Some("no-such-group-abide")),
            Err(PrivilegeError::NoGroup(_))
        ));
    }
}
