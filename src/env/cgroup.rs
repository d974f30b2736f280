//! The CPU time of a sandbox from its cgroup: [`CpuFile`] finds the accounting file of a
//! container's cgroup (cgroup v2 `cpu.stat`, else v1 `cpuacct.usage`) and reads it. Only
//! reads files; which cgroup is whose is the environment's to say.

use std::path::{Path, PathBuf};

/// Where cgroup v2 hierarchies are mounted: alone, or beside v1 ("hybrid").
const V2_ROOTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// Where the v1 CPU accounting controller is mounted.
const V1_ROOTS: [&str; 2] = ["/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu,cpuacct"];

/// The accounting file of one cgroup.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuFile {
    /// cgroup v2 `cpu.stat` (its `usage_usec` line).
    V2(PathBuf),
    /// cgroup v1 `cpuacct.usage` (nanoseconds).
    V1(PathBuf),
}

impl CpuFile {
    /// The first cgroup of `relative` (paths below a hierarchy's root) that exists, under
    /// [`V2_ROOTS`] then [`V1_ROOTS`].
    pub fn find(relative: &[String]) -> Option<CpuFile> {
        CpuFile::find_under(Path::new("/"), relative)
    }

    /// [`CpuFile::find`] with the hierarchies below `root` (a test's directory).
    fn find_under(root: &Path, relative: &[String]) -> Option<CpuFile> {
        let under = |base: &str, cgroup: &str, file: &str| {
            root.join(base.trim_start_matches('/'))
                .join(cgroup)
                .join(file)
        };
        let v2 = V2_ROOTS.iter().flat_map(|base| {
            relative
                .iter()
                .map(move |cgroup| CpuFile::V2(under(base, cgroup, "cpu.stat")))
        });
        let v1 = V1_ROOTS.iter().flat_map(|base| {
            relative
                .iter()
                .map(move |cgroup| CpuFile::V1(under(base, cgroup, "cpuacct.usage")))
        });
        v2.chain(v1).find(|file| file.seconds().is_some())
    }

    /// The CPU time the cgroup's processes used, in seconds; `None` once it is gone.
    pub fn seconds(&self) -> Option<f64> {
        match self {
            CpuFile::V2(path) => {
                let stat = std::fs::read_to_string(path).ok()?;
                let usec = stat
                    .lines()
                    .find_map(|line| line.strip_prefix("usage_usec "))?;
                usec.trim()
                    .parse::<u64>()
                    .ok()
                    .map(|usec| usec as f64 / 1e6)
            }
            CpuFile::V1(path) => {
                let nanos = std::fs::read_to_string(path).ok()?;
                nanos
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .map(|nanos| nanos as f64 / 1e9)
            }
        }
    }
}

/// The cgroups docker and podman give container `id` (a full ID): docker's cgroupfs and
/// systemd drivers, podman's.
pub fn container_cgroups(id: &str) -> Vec<String> {
    vec![
        format!("docker/{id}"),
        format!("system.slice/docker-{id}.scope"),
        format!("machine.slice/libpod-{id}.scope/container"),
        format!("machine.slice/libpod-{id}.scope"),
        format!("libpod_parent/libpod-{id}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_is_read_before_v1_and_a_gone_cgroup_reads_none() {
        let root = std::env::temp_dir().join(format!("ars-cgroup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let id = "abc";
        let v1 = root.join("sys/fs/cgroup/cpuacct/docker/abc");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cpuacct.usage"), "2500000000\n").unwrap();
        let found = CpuFile::find_under(&root, &container_cgroups(id)).unwrap();
        assert_eq!(found, CpuFile::V1(v1.join("cpuacct.usage")));
        assert_eq!(found.seconds(), Some(2.5));

        let v2 = root.join("sys/fs/cgroup/unified/system.slice/docker-abc.scope");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(
            v2.join("cpu.stat"),
            "usage_usec 1250000\nuser_usec 1000000\nsystem_usec 250000\n",
        )
        .unwrap();
        let found = CpuFile::find_under(&root, &container_cgroups(id)).unwrap();
        assert_eq!(found.seconds(), Some(1.25), "{found:?}");

        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found.seconds(), None);
        assert_eq!(CpuFile::find_under(&root, &container_cgroups(id)), None);
    }
}
