"""Streaming a particle stack larger than memory: epoch time and resident memory.

Writes one stack once (``OUT/stack_D{D}_N{N}.mrcs``, noise images, written in chunks with
:class:`cryofield.io.mrc.MRCStackWriter`) and runs each case below in its own process
(so that its peak RSS is its own), with the stack's pages dropped from the page cache
first (``posix_fadvise(DONTNEED)``: every read of a streamed case comes from the disk):

* ``data``: the data path alone over one epoch (every image once, in the shuffled
  batches of ``Trainer._run_epoch``): read, crop, window, FFT, normalise, CTF
  (:meth:`cryofield.inference.data.BatchMaker.iter_batches`), no training;
* ``train``: the same plus the real gradient step of a homogeneous run
  (``Trainer._train_batch``, defaults of ``cryofield train`` on this machine: hidden
  128, batch 32) for ``--train-batches`` batches.

Ways of reading: ``stream`` (lazy ``ParticleSource`` through the prefetching reader,
the default of ``cryofield train``), ``sync`` (lazy, read in the training thread batch by
batch: the path before the prefetcher), ``mmap`` (``sync`` reading through
``np.memmap``, as ``ParticleSource`` did before: shows the file-backed RSS) and
``memory`` (``ParticleSource(lazy=False)`` on the first ``--n-memory`` images: the
in-memory path; compare per image). Stream ``data`` runs at N/4, N/2 and N show that the
memory does not grow with N.

Writes ``OUT/bench_stream.json`` and ``OUT/bench_stream.md`` and prints both::

    nice -n 10 .venv/bin/python benchmarks/bench_stream.py -o /tmp/cf_stream
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


# ------------------------------------------------------------------ the stack
def write_stack(path: Path, n: int, D: int, chunk: int = 5000, seed: int = 0) -> float:
    """Write ``n`` noise images (a faint disc so the contrast guess has something) to
    ``path``; returns the seconds it took (0 when the file exists)."""
    from cryofield.io.mrc import MRCStackWriter

    if path.is_file():
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    c = np.arange(D) - D // 2
    disc = (np.hypot(c[None, :], c[:, None]) < D / 4).astype(np.float32)
    with MRCStackWriter(path, D, 2.0) as w:
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            w.write(rng.standard_normal((m, D, D), dtype=np.float32) + 0.5 * disc)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop the file's (clean) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _rss_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) / 1024
    return out


# ------------------------------------------------------------------ one case
def _ctf(n: int, seed: int = 1) -> Any:
    import torch

    from cryofield.physics.ctf import CTFParams

    g = np.random.default_rng(seed)
    du = g.uniform(10000, 25000, n)
    f = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32))  # noqa: E731
    return CTFParams(
        defocus_u_A=f(du), defocus_v_A=f(du - g.uniform(0, 500, n)),
        astig_angle_rad=f(g.uniform(0, np.pi, n)), voltage_kV=f(np.full(n, 300.0)),
        cs_mm=f(np.full(n, 2.7)), amp_contrast=f(np.full(n, 0.1)),
        phase_shift_rad=f(np.zeros(n)), bfactor_A2=f(np.zeros(n)),
    )  # fmt: skip


def _use_memmap() -> None:
    """Make ParticleSource read through np.memmap again (the reader before preadv)."""
    from cryofield.io.particles import ParticleSource

    def frames(self: Any, k: int, fr: np.ndarray) -> np.ndarray:
        maps = self.__dict__.setdefault("_bench_maps", {})
        if k not in maps:
            info = self._infos[k]
            maps[k] = np.memmap(self._files[k], dtype=info.dtype, mode="r",
                                offset=info.data_offset, shape=info.shape)  # fmt: skip
        return np.asarray(maps[k][fr])

    ParticleSource._frames = frames  # type: ignore[method-assign]


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process (``--case kind:how:n``)."""
    import torch

    from cryofield.inference.config import TrainConfig
    from cryofield.inference.trainer import Trainer
    from cryofield.io.metadata import load_particle_table
    from cryofield.io.particles import ParticleSource
    from cryofield.physics.rotation import random_rotations

    torch.set_num_threads(args.threads)
    kind, how, n_str = args.case.split(":")
    n = int(n_str)
    if how == "mmap":
        _use_memmap()
    table = load_particle_table(args.stack)
    table = table.subset(np.arange(n)) if n < len(table) else table
    t0 = time.perf_counter()
    source = ParticleSource(table, lazy=how != "memory")
    load_s = time.perf_counter() - t0
    rss_setup = _rss_mb()
    cfg = TrainConfig(outdir=str(Path(args.out) / "unused"), poses_from_file=True,
                      refine_poses=False, num_threads=args.threads, device="cpu")  # fmt: skip
    cfg = cfg.resolved(source.D, n_images=n, apix_A=float(np.mean(source.apix_A)))
    g = torch.Generator().manual_seed(0)
    init = (random_rotations(n, generator=g), torch.zeros(n, 2))
    tr = Trainer(cfg, source, _ctf(n), cfg.outdir, init)
    assert cfg.batch_size is not None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).numpy()
    order = [np.sort(perm[b : b + cfg.batch_size]) for b in range(0, n, cfg.batch_size)]
    if kind == "train":
        order = order[: args.train_batches]
    plan = tr.schedule.plan(1, 0)
    rss_before = _rss_mb()
    images = 0
    t0 = time.perf_counter()
    stream = tr.batches.iter_batches(order, prefetch=how == "stream")
    for batch in stream:
        if kind == "train":
            tr._train_batch(batch, plan)
        else:
            float(batch.images_ft[0, 0].real)  # the batch is there
        images += len(batch)
    wall = time.perf_counter() - t0
    rss_end = _rss_mb()
    return {
        "kind": kind, "how": how, "n": n, "images": images, "batch_size": cfg.batch_size,
        "wall_s": wall, "images_s": images / wall, "us_per_image": 1e6 * wall / images,
        "load_s": load_s if how == "memory" else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_setup_mb": rss_setup["VmRSS"], "rss_before_mb": rss_before["VmRSS"],
        "rss_end_mb": rss_end["VmRSS"], "rss_file_end_mb": rss_end.get("RssFile"),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


# ------------------------------------------------------------------ driver
def _cases(args: argparse.Namespace) -> list[str]:
    N, m = args.n, args.n_memory
    return [
        f"data:stream:{N // 4}", f"data:stream:{N // 2}", f"data:stream:{N}",
        f"data:sync:{N}", f"data:mmap:{N // 4}", f"data:memory:{m}",
        f"train:stream:{N}", f"train:memory:{m}",
    ]  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| case | images read | wall | images/s | us/image | peak RSS | RSS before -> after "
        "the epoch (file-backed) |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        load = f"; loading {r['load_s']:.0f} s" if r.get("load_s") else ""
        lines.append(
            f"| {r['kind']} {r['how']}, N={r['n']} | {r['images']} | {r['wall_s']:.1f} s{load} "
            f"| {r['images_s']:.0f} | {r['us_per_image']:.0f} | {r['peak_rss_mb']:.0f} MB "
            f"| {r['rss_before_mb']:.0f} -> {r['rss_end_mb']:.0f} MB "
            f"({r['rss_file_end_mb']:.0f} MB) |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--out", default="/tmp/cf_stream")
    p.add_argument("-n", "--n", type=int, default=250_000, help="images in the stack")
    p.add_argument("-D", type=int, default=64)
    p.add_argument("--n-memory", type=int, default=50_000, help="images of the in-memory cases")
    p.add_argument("--train-batches", type=int, default=60)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of the training thread (the reader thread is one more)",
    )  # fmt: skip
    p.add_argument("--only", nargs="*", help="cases kind:how:n (default: all)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case
    p.add_argument("--stack", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(args)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stack = out / f"stack_D{args.D}_N{args.n}.mrcs"
    write_s = write_stack(stack, args.n, args.D)
    size_gb = stack.stat().st_size / 1e9
    print(f"stack {stack}: {size_gb:.2f} GB (written in {write_s:.0f} s)", flush=True)
    rows = []
    for case in args.only or _cases(args):
        drop_from_page_cache(stack)
        cmd = [sys.executable, __file__, "--case", case, "--stack", str(stack), "-o",
               str(out), "--threads", str(args.threads),
               "--train-batches", str(args.train_batches)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            print(f"{case} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(line[0][len("RESULT ") :]))
        r = rows[-1]
        print(f"{case}: {r['images_s']:.0f} images/s, peak RSS {r['peak_rss_mb']:.0f} MB",
              flush=True)  # fmt: skip
    summary = {"stack": str(stack), "stack_gb": size_gb, "D": args.D, "n": args.n,
               "write_s": write_s, "cases": rows}  # fmt: skip
    by = {(r["kind"], r["how"]): r for r in rows if r["how"] != "stream" or r["n"] == args.n}
    for kind in ("data", "train"):
        if (kind, "stream") in by and (kind, "memory") in by:
            ratio = by[kind, "stream"]["us_per_image"] / by[kind, "memory"]["us_per_image"]
            summary[f"{kind}_stream_vs_memory_time_per_image"] = ratio
    (out / "bench_stream.json").write_text(json.dumps(summary, indent=2))
    md = _table(rows) + "".join(
        f"\n{k}: {v:.2f}" for k, v in summary.items() if k.endswith("_per_image")
    )
    (out / "bench_stream.md").write_text(md + "\n")
    print(json.dumps(summary, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
