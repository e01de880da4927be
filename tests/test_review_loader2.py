"""A cgroup v1 CPU limit (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the ``cpu`` controller:
Docker on a cgroup v1 host, older Kubernetes nodes) bounds the automatic loader-worker count as a
cgroup v2 ``cpu.max`` does (tests/test_review_loader1.py)."""

from vutrain.data.epoch_plan import auto_num_workers, cpu_quota_cores

PERIOD = 100000


def _v1_cgroup(tmp_path, path: str, quotas: dict[str, int], mount: str = "cpu,cpuacct") -> tuple[str, str]:
    """A /proc/self/cgroup naming ``path`` in the v1 "cpu,cpuacct" hierarchy (beside a memory and a
    systemd one) and a tree whose ``mount`` folder holds ``quotas`` (folder relative to the mount
    -> cpu.cfs_quota_us, period 100 ms), and no other folder; returns (proc file, root)."""
    root = tmp_path / "sys_fs_cgroup"
    (root / mount).mkdir(parents=True)
    (root / "memory").mkdir()
    for folder, quota in quotas.items():
        (root / mount / folder).mkdir(parents=True, exist_ok=True)
        (root / mount / folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (root / mount / folder / "cpu.cfs_period_us").write_text(f"{PERIOD}\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"12:memory:{path}\n4:cpu,cpuacct:{path}\n1:name=systemd:{path}\n")
    return str(proc), str(root)


def test_a_cgroup_v1_cpu_limit_is_the_smallest_along_the_path(tmp_path):
    """A pod limited to 32 CPUs on a 128-core cgroup v1 node: the pod's cgroup says 32, the
    container's own -1 (no limit), kubepods 64. Until 2026-12-07 only cgroup v2 was read: no
    limit, so 8 ranks took 7 workers each (56 on 32 CPUs) instead of 3."""
    proc, root = _v1_cgroup(
        tmp_path,
        "/kubepods/pod1/ctr",
        {"kubepods/pod1": 32 * PERIOD, "kubepods/pod1/ctr": -1, "kubepods": 64 * PERIOD, "": -1},
    )
    assert cpu_quota_cores(proc, root) == 32
    assert auto_num_workers(100, 8, 8, True, cores=128, machine_cores=128, quota_cores=32) == 3


def test_docker_on_cgroup_v1_reads_the_limit_at_its_mount(tmp_path):
    """`docker run --cpus 2` on a cgroup v1 host: /proc/self/cgroup names the host's path
    (/docker/ID) while the container's mount is its own cgroup, with the limit at its top."""
    proc, root = _v1_cgroup(tmp_path, "/docker/0123abc", {"": 2 * PERIOD})  # no docker/0123abc folder
    assert cpu_quota_cores(proc, root) == 2


def test_a_cpu_only_mount_no_limit_and_half_a_cpu(tmp_path):
    # only a "cpu" folder, no "cpu,cpuacct"
    proc, root = _v1_cgroup(tmp_path / "a", "/job", {"job": 3 * PERIOD}, mount="cpu")
    assert cpu_quota_cores(proc, root) == 3
    proc, root = _v1_cgroup(tmp_path / "b", "/job", {"job": -1, "": -1})
    assert cpu_quota_cores(proc, root) is None
    proc, root = _v1_cgroup(tmp_path / "c", "/", {"": PERIOD // 2})
    assert cpu_quota_cores(proc, root) == 1
