"""Bitwise snapshot of cpubn's results, for refactorings that must not change a bit.

    python tools/bitwise_snapshot.py save /tmp/bn_before.npz     # with the old build
    (rebuild)
    python tools/bitwise_snapshot.py compare /tmp/bn_before.npz  # with the new build

Runs a broad set of inputs through the public API (float32, float64, float16, bfloat16;
channels-first, channels-last and a middle axis; training forward, eval forward, backward
in both modes; ReLU / residual epilogues; out= including in-place; shapes that take the
channel-block, split, long-run (several RUN_CHUNKs), wide-C and streaming paths; 1 and 2
threads) and stores every output's raw bits (a SHA-256 of them for large arrays).  The half-precision cases run a second time
in a subprocess with CPUBN_PORTABLE_HALF=1, so the tiled portable loops are covered too.
compare exits non-zero on the first-listed differences (array_equal on the bits viewed
as unsigned integers, so NaN payloads and signed zeros count); `compare PATH --all` lists
every difference (for a change that may alter some paths' bits on purpose, to check which).
"""
import hashlib
import os
import subprocess
import sys
import tempfile

import numpy as np

# The checkout's package (pip install . copies the compiled modules next to the sources).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cpubn  # noqa: E402
import cpubn._core.threads  # noqa: E402

# As the test suite does: small calls take the parallel paths too.
cpubn._core.threads.PARALLEL_MIN_ELEMENTS = 1 << 12

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:          # pragma: no cover - the test extra installs it
    BFLOAT16 = None

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)] + (
    [BFLOAT16] if BFLOAT16 is not None else [])
HALF = [d for d in DTYPES if d.itemsize == 2]

# (shape, axis, what it exercises); the big ones take the parallel and streaming paths.
SHAPES = [
    ((2, 3, 5, 7), 1, "small split"),
    ((4, 96, 7, 7), 1, "channel blocks 7x7"),
    ((8, 256, 14, 14), 1, "channel blocks, parallel"),
    ((4, 3, 160, 160), 1, "split, 2 chunks per run"),
    ((2, 4, 20000), 1, "long runs"),
    ((3, 40, 5000), 1, "channel blocks of one channel, S > 4096"),
    ((16, 64, 64, 64), 1, "stream, channel blocks"),
    ((64, 2, 256, 128), 1, "stream, split"),
    ((2, 5, 7, 3), -1, "small rows"),
    ((8, 14, 14, 256), -1, "rows, parallel"),
    ((64, 2048), -1, "wide rows"),
    ((3, 70000), -1, "C above the row block"),
    ((700, 3000), -1, "C above the half tile"),
    ((50, 13), 1, "2-D, C=13"),
    ((16, 64, 64, 64), -1, "stream, rows"),
    ((3, 4, 5, 6), 2, "middle axis"),
    ((300000, 2, 3), 1, "split path in several waves"),
    ((150000, 3, 5), 1, "split path in two waves"),
]
BIG = 1 << 22


def make(shape, dtype, seed, hostile=False):
    rng = np.random.default_rng(seed)
    x = (3.0 + 2.0 * rng.standard_normal(shape))
    if hostile:
        flat = x.reshape(-1)
        flat[: flat.size // 3] += 1e4            # large offset
        flat[1::7] = 5.0                         # repeated values
        flat[5] = np.nan if dtype.itemsize != 2 else flat[5]
    return x.astype(dtype)


def params(C, dtype, seed):
    rng = np.random.default_rng(seed)
    pdt = np.float32 if dtype.itemsize == 2 else dtype
    w = (1.0 + 0.5 * rng.standard_normal(C)).astype(pdt)
    b = (0.1 * rng.standard_normal(C)).astype(pdt)
    rm = (3.0 + 0.1 * rng.standard_normal(C)).astype(pdt)
    rv = (4.0 + rng.random(C)).astype(pdt)
    return w, b, rm, rv


def run_case(results, key, shape, axis, dtype, n_threads, variants):
    C = shape[axis]
    x = make(shape, dtype, 1)
    dy = make(shape, dtype, 2)
    res = make(shape, dtype, 3)
    w, b, rm, rv = params(C, dtype, 4)

    def put(name, value):
        results[f"{key}/{name}"] = value

    with cpubn.threads(n_threads):
        for variant in variants:
            act = "relu" if "relu" in variant else None
            r = res if "res" in variant else None
            ww, bb = (None, None) if "noaffine" in variant else (w, b)
            if "w64" in variant:
                ww, bb = w.astype(np.float64), b.astype(np.float64)
            for training in (True, False):
                mode = "train" if training else "eval"
                xin = x.copy()
                out = None
                if "out" in variant:
                    out = np.empty_like(xin)
                if "inplace" in variant:
                    out = xin
                y, mean, invstd = cpubn.batch_norm_forward(
                    xin, ww, bb, None if training else rm.copy(),
                    None if training else rv.copy(), training=training, axis=axis, out=out,
                    activation=act, residual=r)
                put(f"{variant}/{mode}/y", y)
                put(f"{variant}/{mode}/mean", mean)
                put(f"{variant}/{mode}/invstd", invstd)
                if "inplace" in variant:
                    continue                      # x was overwritten
                dyin = dy.copy()
                bout = dyin if "out" in variant else None
                grads = cpubn.batch_norm_backward(
                    dyin, x, mean, invstd, ww, training, axis, out=bout, activation=act,
                    y=y if act else None, residual=r is not None)
                for name, value in zip(("dx", "dweight", "dbias", "dresidual"), grads):
                    put(f"{variant}/{mode}/{name}", value)
    # A hostile input (offset, repeated values, a NaN) on the plain path.
    xh = make(shape, dtype, 5, hostile=True)
    with cpubn.threads(n_threads):
        y, mean, invstd = cpubn.batch_norm_forward(xh, w, b, axis=axis)
        put("hostile/train/y", y)
        put("hostile/train/mean", mean)
        put("hostile/train/invstd", invstd)
        g = cpubn.batch_norm_backward(dy, xh, mean, invstd, w, True, axis)
        put("hostile/train/dx", g[0])
        put("hostile/train/dweight", g[1])


ALL_VARIANTS = ("plain", "relu", "res", "res+relu", "out", "inplace", "noaffine",
                "out+res+relu")


def collect(dtypes):
    results = {}
    for shape, axis, _ in SHAPES:
        size = int(np.prod(shape))
        for dtype in dtypes:
            big = size >= BIG
            variants = ALL_VARIANTS
            if dtype == np.float32:
                variants = variants + ("w64",)
            if big:
                variants = ("plain", "res+relu", "out") if dtype != np.float32 else (
                    "plain", "relu", "res", "out", "inplace")
            for n_threads in (1, 2):
                key = f"{dtype.name}/{'x'.join(map(str, shape))}/axis{axis}/t{n_threads}"
                run_case(results, key, shape, axis, dtype, n_threads, variants)
    return results


# Arrays larger than this are stored as the SHA-256 of their bits (with shape and dtype):
# the full set would take gigabytes.
DIGEST_BYTES = 1 << 18


def as_bits(value):
    a = np.ascontiguousarray(value)
    bits = a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a
    if bits.nbytes <= DIGEST_BYTES:
        return bits
    digest = hashlib.sha256(f"{bits.dtype.str}{bits.shape}".encode())
    digest.update(bits.tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def snapshot():
    results = {k: as_bits(v) for k, v in collect(DTYPES).items()}
    if HALF:
        env = dict(os.environ, CPUBN_PORTABLE_HALF="1")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "portable.npz")
            subprocess.run([sys.executable, __file__, "_portable", path], env=env, check=True)
            with np.load(path) as portable:
                results.update({f"portable/{k}": portable[k] for k in portable.files})
    return results


def main():
    command = sys.argv[1]
    path = sys.argv[2]
    if command == "_portable":
        np.savez(path, **{k: as_bits(v) for k, v in collect(HALF).items()})
        return 0
    results = snapshot()
    if command == "save":
        np.savez(path, **results)
        print(f"saved {len(results)} arrays to {path}")
        return 0
    with np.load(path) as before:
        missing = sorted(set(before.files) ^ set(results))
        differ = [k for k in before.files if k in results and not (
            before[k].dtype == results[k].dtype and before[k].shape == results[k].shape
            and np.array_equal(before[k], results[k]))]
    for k in missing[:20]:
        print("only in one snapshot:", k)
    for k in differ if "--all" in sys.argv[3:] else differ[:40]:
        print("DIFFERENT:", k)
    print(f"{len(results)} arrays compared: {len(differ)} differ, {len(missing)} missing")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
