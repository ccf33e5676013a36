"""What the machine has that the thread policy and the kernels' policies depend on: the
CPUs this process may use and how many are idle now, and its data caches, read from
Linux's procfs and sysfs (elsewhere, or where they cannot be read, nothing is known and
the callers fall back to their fixed defaults).  The bench reports the same figures."""
import math
import os

_usable: int | None = None     # cached usable_cpus()


def _cgroup_cpu_quota() -> float | None:
    """The cgroup CPU limit in CPUs (a float), or None when there is none."""
    try:                                               # cgroup v2
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:                                               # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota
    (rounded up).  Read once, at the first call."""
    global _usable
    if _usable is None:
        try:
            count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            count = os.cpu_count() or 1
        quota = _cgroup_cpu_quota()
        if quota is not None:
            count = min(count, max(1, math.ceil(quota)))
        _usable = max(1, count)
    return _usable


_loadavg_fd: int | None = None


def affinity_is_restricted() -> bool:
    """Whether this process may run on fewer CPUs than the machine has (taskset, a
    container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return False


_restricted: bool | None = None     # cached affinity_is_restricted()
_machine_cpus = os.cpu_count() or 1  # os.cpu_count() reads sysfs on every call


def idle_cpus(own_tasks: int = 1) -> int | None:
    """CPUs this process may use that no other process's task needs right now: from the
    instantaneous count of runnable tasks in Linux's /proc/loadavg (the file is kept open,
    so a call is one read), less own_tasks (this process's tasks running now: the caller,
    and OpenMP workers still spinning), at most usable_cpus().  None where nothing is
    known: no /proc/loadavg, or an affinity mask narrower than the machine, where the
    machine-wide count says nothing about this process's own CPUs (a container pinned to
    its cores on a busy host has them to itself)."""
    global _loadavg_fd, _restricted
    if _restricted is None:
        _restricted = affinity_is_restricted()
    if _restricted:
        return None
    try:
        if _loadavg_fd is None:
            _loadavg_fd = os.open("/proc/loadavg", os.O_RDONLY)
        running = int(os.pread(_loadavg_fd, 128, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None
    neighbours = max(0, running - own_tasks)
    return min(usable_cpus(), _machine_cpus - neighbours)


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}     # sysfs cache sizes: "512K"


def data_caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Sizes in bytes of the data caches CPU 0 sees, by level ({"L1": 32768, "L2": ...});
    {} where they cannot be read."""
    caches: dict[str, int] = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return caches
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(root, entry, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        try:
            nbytes = (int(size[:-1]) * _SIZE_UNITS[size[-1]] if size[-1] in _SIZE_UNITS
                      else int(size))
        except (ValueError, IndexError):
            continue
        caches[f"L{level}"] = nbytes
    return caches


def last_level_cache_bytes(caches: dict[str, int]) -> int:
    """The size of the highest cache level in `caches` (data_caches), 0 if none is known."""
    levels = [int(name[1:]) for name in caches if name[1:].isdigit()]
    return caches[f"L{max(levels)}"] if levels else 0
