"""The automatic loader-worker count (data.num_workers=-1) on a multi-GPU node: ranks whose affinity
masks overlap share them, and a cgroup CPU limit (a container's) bounds the whole node's ranks."""

import os

from vutrain.data.epoch_plan import auto_num_workers, cpu_quota_cores, ranks_sharing_cores


def test_overlapping_masks_are_shared_between_the_ranks():
    """8 ranks of one launcher held to 32 of a 64-core machine (sbatch -c 32, a cgroup, torchrun
    --numa-binding on two NUMA nodes): 8 masks of 32 cores cannot be disjoint on 64, so at least 4
    ranks share each. Until 2026-12-07 a mask smaller than the machine counted as the rank's own:
    16 workers per rank, 128 on 32 cores."""
    assert ranks_sharing_cores(32, 64, 8) == 4
    assert auto_num_workers(100, 8, 8, True, cores=32, machine_cores=64) == 7  # 8 cores each, less one
    assert auto_num_workers(100, 4, 4, True, cores=48, machine_cores=64) == 15  # 3 share: 16 cores each


def test_whole_machine_and_per_task_shares_keep_their_counts():
    assert ranks_sharing_cores(64, 64, 8) == 8  # torchrun on a whole node
    assert ranks_sharing_cores(8, 64, 8) == 1  # SLURM's per-task binding, 8 cores each
    assert ranks_sharing_cores(5, 64, 8) == 1  # a per-task share that leaves cores over
    assert auto_num_workers(100, 8, 8, True, cores=64, machine_cores=64) == 7
    assert auto_num_workers(100, 8, 8, True, cores=8, machine_cores=64) == 7
    assert auto_num_workers(100, 1, 1, True, cores=64, machine_cores=64) == 16  # the ceiling
    assert auto_num_workers(6, 2, 2, False, cores=64, machine_cores=64) == 3  # the rank's shards
    assert auto_num_workers(100, 1, 1, True, cores=1, machine_cores=1) == 1


def _cgroup(tmp_path, path: str, limits: dict[str, str]) -> tuple[str, str]:
    """A /proc/self/cgroup naming ``path`` (cgroup v2) and a cgroup tree with ``limits`` (folder
    relative to the root -> cpu.max text); returns (proc file, root)."""
    root = tmp_path / "sys_fs_cgroup"
    (root / path.lstrip("/")).mkdir(parents=True)
    for folder, text in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(text + "\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"0::{path}\n")
    return str(proc), str(root)


def test_a_cgroup_cpu_limit_is_read_from_the_process_cgroup_and_its_ancestors(tmp_path):
    """A Kubernetes pod limited to 32 CPUs on a 128-core node: the pod's cgroup says 32, the
    container's own says max; the affinity mask still shows 128 cores."""
    proc, root = _cgroup(
        tmp_path,
        "/kubepods/pod1/ctr",
        {"kubepods/pod1": "3200000 100000", "kubepods/pod1/ctr": "max 100000", "kubepods": "6400000 100000"},
    )
    assert cpu_quota_cores(proc, root) == 32
    # 8 ranks of one torchrun in that pod: 4 CPUs each, 3 workers (16 each, 128 in all, before)
    assert auto_num_workers(100, 8, 8, True, cores=128, machine_cores=128, quota_cores=32) == 3
    # a limit wider than the mask changes nothing
    assert auto_num_workers(100, 8, 8, True, cores=64, machine_cores=64, quota_cores=96) == 7


def test_no_cgroup_limit_reads_as_none(tmp_path):
    proc, root = _cgroup(tmp_path / "a", "/user.slice", {"user.slice": "max 100000"})
    assert cpu_quota_cores(proc, root) is None
    proc, root = _cgroup(tmp_path / "b", "/", {})  # a container's namespaced root without cpu.max
    assert cpu_quota_cores(proc, root) is None
    v1 = tmp_path / "v1_cgroup"
    v1.write_text("4:memory:/x\n1:cpu:/\n")  # cgroup v1 only
    assert cpu_quota_cores(str(v1), root) is None
    assert cpu_quota_cores(str(tmp_path / "missing"), root) is None
    proc, root = _cgroup(tmp_path / "c", "/", {"": "50000 100000"})  # half a CPU: still one
    assert cpu_quota_cores(proc, root) == 1


def test_this_machine_gets_a_count_within_its_cores():
    workers = auto_num_workers(100, 1, 1, True)
    assert 1 <= workers <= max(1, len(os.sched_getaffinity(0)) - 1)
