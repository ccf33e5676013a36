"""What the machine has that the kernels' policies depend on: its data caches, read from
Linux's sysfs (elsewhere, or where sysfs cannot be read, nothing is known and the callers
fall back to their fixed defaults).  The bench reports the same figures."""
import os

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
