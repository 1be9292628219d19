//! Finding the kubelet's pod cgroup (`kubepods`) on a node, so `ztunnel run` needs no
//! `--cgroup` in a DaemonSet.
//!
//! The capture programs attach to one cgroup v2 directory and see every process below it.
//! On a node that is the cgroup the kubelet puts every pod under: `kubepods.slice` with the
//! systemd cgroup driver, `kubepods` with the cgroupfs driver, both at the root of the
//! cgroup2 hierarchy, or below `kubelet.slice`/`kubelet` where the kubelet runs with
//! `--cgroup-root=/kubelet` (kind's nodes do).
//!
//! Fail closed: exactly one of those must exist, as a cgroup (it has `cgroup.procs`), under
//! a cgroup2 mount. None, several, or a hierarchy that is not cgroup v2 is an error that
//! names every path looked at; attaching to a guessed cgroup would leave pods uncaptured
//! (too narrow) or capture the node itself (too wide).

use std::path::{Path, PathBuf};

/// Where the kubelet's pod cgroup may be, relative to the cgroup2 mount, in the order
/// reported.
pub const CANDIDATES: [&str; 4] = [
    // systemd driver.
    "kubepods.slice",
    // cgroupfs driver.
    "kubepods",
    // systemd driver, --cgroup-root=/kubelet (kind).
    "kubelet.slice/kubelet-kubepods.slice",
    // cgroupfs driver, --cgroup-root=/kubelet.
    "kubelet/kubepods",
];

/// The conventional cgroup2 mount point.
pub const DEFAULT_MOUNT: &str = "/sys/fs/cgroup";

/// Why the pod cgroup was not found.
#[derive(Debug, thiserror::Error)]
pub enum KubepodsError {
    /// The mount table could not be read.
    #[error("reading {path}: {reason}")]
    MountTable {
        /// The mount table's path.
        path: String,
        /// Why.
        reason: String,
    },
    /// No cgroup2 filesystem is mounted (cgroup v1, or a hybrid layout).
    #[error(
        "no cgroup2 filesystem is mounted ({path} lists none{seen}); ztunnel needs a node \
         with cgroup v2 (unified hierarchy), or pass --cgroup <cgroup v2 directory>"
    )]
    NoCgroup2 {
        /// The mount table read.
        path: String,
        /// What is mounted at /sys/fs/cgroup instead, if anything.
        seen: String,
    },
    /// None of the candidate directories exists.
    #[error(
        "no kubepods cgroup found: looked for {} (the kubelet's pod cgroup with the systemd \
         or cgroupfs driver); mount the host's cgroup2 hierarchy at its path in the \
         container, or pass --cgroup <kubepods directory>",
        .looked_at.join(", ")
    )]
    NotFound {
        /// Every path checked.
        looked_at: Vec<String>,
    },
    /// More than one candidate exists: which one holds the pods is a guess.
    #[error(
        "several kubepods cgroups exist: {}; choose one with --cgroup",
        .found.join(", ")
    )]
    Ambiguous {
        /// The candidates that exist.
        found: Vec<String>,
    },
}

/// A mount from `/proc/self/mountinfo`: mount point and filesystem type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    fstype: String,
}

/// Parses mountinfo lines (`proc(5)`): the mount point is field 5, the filesystem type the
/// first field after the ` - ` separator. Unparsable lines are skipped.
fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some(Mount {
                point: PathBuf::from(unescape(point)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                u8::try_from(v).ok()
            });
        if bytes[i] == b'\\'
            && let Some(v) = octal
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount points, the conventional one first. A later mount over the same point
/// hides an earlier one, so the last entry for each point decides its type.
fn cgroup2_mounts(all: &[Mount]) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = Vec::new();
    for m in all {
        let visible = all.iter().rev().find(|o| o.point == m.point) == Some(m);
        if visible && m.fstype == "cgroup2" && !points.contains(&m.point) {
            points.push(m.point.clone());
        }
    }
    points.sort_by_key(|p| p != Path::new(DEFAULT_MOUNT));
    points
}

/// `path` (absolute, as the mount table names it) under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Finds the kubepods cgroup from a mount table's text (`mountinfo_path` names it in
/// errors), resolving every path under `root` (`/` on a node; a temporary tree in tests).
pub fn find(mountinfo: &str, mountinfo_path: &str, root: &Path) -> Result<PathBuf, KubepodsError> {
    let all = mounts(mountinfo);
    let cgroup2 = cgroup2_mounts(&all);
    if cgroup2.is_empty() {
        let seen = all
            .iter()
            .rev()
            .find(|m| m.point == Path::new(DEFAULT_MOUNT))
            .map(|m| format!("; {DEFAULT_MOUNT} is {}", m.fstype))
            .unwrap_or_default();
        return Err(KubepodsError::NoCgroup2 {
            path: mountinfo_path.to_string(),
            seen,
        });
    }
    let mut looked_at = Vec::new();
    let mut found = Vec::new();
    for mount in &cgroup2 {
        for candidate in CANDIDATES {
            let path = mount.join(candidate);
            // A cgroup v2 directory always has cgroup.procs; a plain directory of that
            // name (or a leftover mount point) is not a cgroup and is not taken.
            if under(root, &path).join("cgroup.procs").is_file() {
                found.push(path);
            } else {
                looked_at.push(path.display().to_string());
            }
        }
    }
    match found.len() {
        0 => Err(KubepodsError::NotFound { looked_at }),
        1 => Ok(under(root, &found[0])),
        _ => Err(KubepodsError::Ambiguous {
            found: found.iter().map(|p| p.display().to_string()).collect(),
        }),
    }
}

/// Finds the kubepods cgroup of the node this process runs on, from
/// `/proc/self/mountinfo`.
pub fn detect() -> Result<PathBuf, KubepodsError> {
    const MOUNTINFO: &str = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|e| KubepodsError::MountTable {
        path: MOUNTINFO.into(),
        reason: e.to_string(),
    })?;
    find(&text, MOUNTINFO, Path::new("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup2 mount at /sys/fs/cgroup, as on a unified-hierarchy node (and in a
    /// container that bind-mounts the host's hierarchy over its own).
    const UNIFIED: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
31 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
";

    /// cgroup v1 (or hybrid): a tmpfs at /sys/fs/cgroup with v1 controllers below it.
    const LEGACY: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
30 22 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 30 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,memory
";

    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let dir =
                std::env::temp_dir().join(format!("ambit-kubepods-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Tree(dir)
        }

        /// Makes `rel` a cgroup: a directory with `cgroup.procs`.
        fn cgroup(&self, rel: &str) -> &Tree {
            let dir = self.0.join(rel);
            std::fs::create_dir_all(&dir).expect("cgroup dir");
            std::fs::write(dir.join("cgroup.procs"), "").expect("cgroup.procs");
            self
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn systemd_driver_layout_is_found() {
        let t = Tree::new("systemd");
        t.cgroup("sys/fs/cgroup")
            .cgroup("sys/fs/cgroup/kubepods.slice");
        t.cgroup("sys/fs/cgroup/system.slice");
        let found = find(UNIFIED, "mountinfo", &t.0).expect("found");
        assert_eq!(found, t.0.join("sys/fs/cgroup/kubepods.slice"));
    }

    #[test]
    fn cgroupfs_driver_layout_is_found() {
        let t = Tree::new("cgroupfs");
        t.cgroup("sys/fs/cgroup").cgroup("sys/fs/cgroup/kubepods");
        let found = find(UNIFIED, "mountinfo", &t.0).expect("found");
        assert_eq!(found, t.0.join("sys/fs/cgroup/kubepods"));
    }

    #[test]
    fn kind_cgroup_root_layout_is_found() {
        let t = Tree::new("kind");
        t.cgroup("sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice");
        let found = find(UNIFIED, "mountinfo", &t.0).expect("found");
        assert_eq!(
            found,
            t.0.join("sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice")
        );
    }

    #[test]
    fn cgroup2_mounted_elsewhere_is_used() {
        let mountinfo = "30 22 0:26 / /run/cg2\\040unified rw - cgroup2 none rw\n";
        let t = Tree::new("elsewhere");
        t.cgroup("run/cg2 unified/kubepods");
        let found = find(mountinfo, "mountinfo", &t.0).expect("found");
        assert_eq!(found, t.0.join("run/cg2 unified/kubepods"));
    }

    #[test]
    fn no_kubepods_is_an_error_naming_every_path_looked_at() {
        let t = Tree::new("none");
        t.cgroup("sys/fs/cgroup")
            .cgroup("sys/fs/cgroup/system.slice");
        // A directory of the right name that is not a cgroup is not taken.
        std::fs::create_dir_all(t.0.join("sys/fs/cgroup/kubepods")).expect("dir");
        let err = find(UNIFIED, "/proc/self/mountinfo", &t.0).expect_err("nothing to find");
        assert!(matches!(err, KubepodsError::NotFound { .. }), "{err}");
        let msg = err.to_string();
        for p in [
            "/sys/fs/cgroup/kubepods.slice",
            "/sys/fs/cgroup/kubepods",
            "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice",
            "--cgroup",
        ] {
            assert!(msg.contains(p), "{p} missing from: {msg}");
        }
    }

    #[test]
    fn both_drivers_present_is_ambiguous_not_a_guess() {
        let t = Tree::new("both");
        t.cgroup("sys/fs/cgroup/kubepods.slice")
            .cgroup("sys/fs/cgroup/kubepods");
        let err = find(UNIFIED, "mountinfo", &t.0).expect_err("ambiguous");
        assert!(matches!(err, KubepodsError::Ambiguous { .. }), "{err}");
        assert!(err.to_string().contains("/sys/fs/cgroup/kubepods.slice"));
    }

    #[test]
    fn cgroup_v1_is_refused_naming_what_is_mounted() {
        let t = Tree::new("v1");
        // Even with a kubepods directory in the v1 hierarchy.
        t.cgroup("sys/fs/cgroup/memory/kubepods");
        let err = find(LEGACY, "/proc/self/mountinfo", &t.0).expect_err("v1");
        let msg = err.to_string();
        assert!(matches!(err, KubepodsError::NoCgroup2 { .. }), "{msg}");
        assert!(msg.contains("/proc/self/mountinfo"), "{msg}");
        assert!(msg.contains("/sys/fs/cgroup is tmpfs"), "{msg}");
    }

    #[test]
    fn a_mount_hidden_by_a_later_one_does_not_count() {
        // cgroup2 at /sys/fs/cgroup, then a tmpfs mounted over it.
        let mountinfo = format!("{UNIFIED}40 30 0:40 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n");
        let t = Tree::new("hidden");
        t.cgroup("sys/fs/cgroup/kubepods.slice");
        let err = find(&mountinfo, "mountinfo", &t.0).expect_err("hidden");
        assert!(matches!(err, KubepodsError::NoCgroup2 { .. }), "{err}");
    }

    #[test]
    fn mountinfo_fields_and_escapes_are_parsed() {
        let m = mounts("36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n");
        assert_eq!(
            m,
            vec![Mount {
                point: PathBuf::from("/mnt/a b"),
                fstype: "ext3".into()
            }]
        );
    }
}
