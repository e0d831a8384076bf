//! `tokenfs doctor`: checks what mounting needs and what a previous run may
//! have left behind, and says what to do about each problem.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::config::Config;

/// One line of the report.
pub struct Check {
    pub ok: bool,
    pub what: String,
    /// What to do when not ok.
    pub fix: String,
}

fn check(ok: bool, what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        ok,
        what: what.into(),
        fix: fix.into(),
    }
}

/// Runs every check; `config` adds the checks of one configuration.
pub fn run(config: Option<&Config>) -> Vec<Check> {
    let mut out = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    let fuse = Path::new("/dev/fuse");
    let fuse_rw = nix::unistd::access(
        fuse,
        nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
    )
    .is_ok();
    out.push(check(fuse_rw, "/dev/fuse is present and usable", "run the container with --device /dev/fuse (and CAP_SYS_ADMIN), or set mode = \"auto\"/\"files\""));
    let fusermount = crate::mounts::which("fusermount3");
    out.push(check(
        fusermount.is_some(),
        "fusermount3 is installed (needed for auto-unmount)",
        "apt-get install -y fuse3",
    ));
    if let (false, Some(fm)) = (root, &fusermount) {
        let setuid = std::fs::metadata(fm)
            .map(|m| m.mode() & 0o4000 != 0)
            .unwrap_or(false);
        out.push(check(
            setuid,
            "fusermount3 is setuid root (needed without root)",
            "chmod u+s $(which fusermount3), or run tokenfs as root",
        ));
    }
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let allow_other = conf.lines().any(|l| l.trim() == "user_allow_other");
    out.push(check(
        root || allow_other,
        "allow_other is permitted (root, or user_allow_other in /etc/fuse.conf)",
        "add `user_allow_other` to /etc/fuse.conf (auto-unmount needs it when not root)",
    ));
    let (major, minor) = kernel_version();
    out.push(check(
        (major, minor) >= (6, 9),
        format!("kernel {major}.{minor} offers FUSE passthrough (6.9+)"),
        "other files are forwarded through the daemon instead: slower bulk I/O, still correct",
    ));
    for dir in stale_mounts() {
        out.push(check(
            false,
            format!("stale tokenfs mount at {}", dir.display()),
            crate::mounts::detach_command(&dir),
        ));
    }
    let socket = config.map_or_else(crate::config::default_socket, |c| c.socket.clone());
    daemon_check(&socket, &mut out);
    if let Some(c) = config {
        config_checks(c, &mut out);
    }
    out
}

/// Whether a daemon holds the socket's lock, its pid, and whether it answers.
fn daemon_check(socket: &Path, out: &mut Vec<Check>) {
    let shown = socket.display();
    let Some(pid) = crate::lock::holder(&crate::lock::socket_lock_path(socket)) else {
        out.push(check(
            true,
            format!("no tokenfs daemon is running on {shown} (start one with `tokenfs mount`)"),
            "",
        ));
        return;
    };
    match crate::control::call(socket, &crate::control::Request::Status) {
        Ok(v) => {
            let states: Vec<String> = v["mounts"]
                .as_array()
                .map(|ms| {
                    ms.iter()
                        .map(|m| {
                            format!(
                                "{} {}",
                                m["dir"].as_str().unwrap_or("?"),
                                m["state"].as_str().unwrap_or("?")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(check(
                true,
                format!(
                    "tokenfs daemon pid {pid} is running and answers on {shown} ({})",
                    states.join(", ")
                ),
                "",
            ));
        }
        Err(e) => out.push(check(
            false,
            format!("tokenfs daemon pid {pid} is running but not answering: {e}"),
            format!("if it is stopped: kill -CONT {pid}; else kill -TERM {pid} (then kill -KILL {pid}) and mount again"),
        )),
    }
}

fn config_checks(c: &Config, out: &mut Vec<Check>) {
    out.push(check(true, format!("{} is valid", c.path.display()), ""));
    for m in &c.mounts {
        let d = &m.dir;
        out.push(check(
            d.is_dir(),
            format!("mount dir {} exists", d.display()),
            format!("mkdir -p {}", d.display()),
        ));
    }
    busy_dirs(c, out);
    permission_checks(c, out);
}

/// Processes inside a directory that is not mounted yet would keep seeing
/// its hidden originals once it is.
fn busy_dirs(c: &Config, out: &mut Vec<Check>) {
    let unmounted: Vec<std::path::PathBuf> = c
        .mounts
        .iter()
        .filter(|m| m.dir.is_dir() && crate::mounts::tokenfs_at(&m.dir).is_none())
        .map(|m| m.dir.clone())
        .collect();
    for (dir, users) in unmounted
        .iter()
        .zip(crate::mounts::users_inside_each(&unmounted))
    {
        out.push(check(
            users.is_empty(),
            format!(
                "no process works inside {} (it would keep seeing the originals once mounted over){}",
                dir.display(),
                if users.is_empty() {
                    String::new()
                } else {
                    format!(": {}", crate::mounts::describe(&users))
                }
            ),
            format!(
                "after mounting, restart those processes or have them cd into {} again",
                dir.display()
            ),
        ));
    }
}

/// The socket's directory and the config must not be writable by others;
/// the socket must be owner-only.
fn permission_checks(c: &Config, out: &mut Vec<Check>) {
    if let Some(dir) = c.socket.parent().filter(|d| d.exists()) {
        let mode = std::fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0);
        // Others may list it (the socket is 0600 and checks its peer), but
        // must not be able to replace the socket.
        let sticky = mode & 0o1000 != 0;
        out.push(check(
            mode & 0o022 == 0 || sticky,
            format!(
                "control socket directory {} is not writable by others ({mode:o})",
                dir.display()
            ),
            format!("chmod go-w {}", dir.display()),
        ));
    }
    if let Ok(m) = std::fs::metadata(&c.socket) {
        let mode = m.permissions().mode() & 0o777;
        out.push(check(
            mode & 0o077 == 0,
            format!(
                "control socket {} is owner-only ({mode:o})",
                c.socket.display()
            ),
            "restart tokenfs (it creates the socket 0600)",
        ));
    }
    if let Ok(m) = std::fs::metadata(&c.path) {
        let mode = m.permissions().mode() & 0o777;
        out.push(check(
            mode & 0o022 == 0,
            format!(
                "config {} is not writable by others ({mode:o})",
                c.path.display()
            ),
            format!("chmod go-w {}", c.path.display()),
        ));
    }
}

fn kernel_version() -> (u32, u32) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// tokenfs mounts whose daemon is gone. Listing the directory asks the
/// daemon (`stat` may answer from the kernel's attribute cache).
fn stale_mounts() -> Vec<std::path::PathBuf> {
    crate::mounts::entries()
        .into_iter()
        .filter(|e| e.fstype == "fuse.tokenfs")
        .filter(|e| crate::mounts::is_dead(&e.mount_point))
        .map(|e| e.mount_point)
        .collect()
}
