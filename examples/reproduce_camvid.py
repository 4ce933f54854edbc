"""The converged CamVid protocol: does distillation beat the same student trained alone, once training has flattened?

Rows (CamVid train split for training, val split for reporting; every val image whole, scored against its
180x240 labels):

* ``b0``               SegFormer-B0 trained alone (no KD)
* ``kd``, ``cwd``, ``dkd``, ``c2vkd``, ``c2vkd+ce``   the shared DeepLabV3-R18 -> B0, through the teacher cache
  (``cwd`` with CIRKD's SegFormer-B0 weights: logits 0.3, features 5)
* ``kd-online``        kd with the teacher run on every (clean) crop instead of the cache: the cache's effect
* ``kd-mask``          kd averaged over labelled pixels only (``mask_ignore``): no KD on the crop's padding, where
  the cache has no teacher output (uniform targets)
* ``dml``              B0 + B0 trained together (online baseline); ``collab`` B0 + R18 (with ``r18`` alone as the
  peer's baseline)
* ``transkd``          a note, not a result: it needs a transformer teacher at least 10 mIoU above B0 alone, and
  none can be trained here (SegFormer-B1 from scratch reached 27.6 against B0's 23.2 in docs/results-short.md)
* label-scarce: ``quarter-b0`` (B0 alone on every 4th training image, 92 labelled), ``quarter-kd+unl`` and
  ``quarter-c2vkd+unl`` (the same 92 labelled images plus the other 275 as ``--unlabeled`` images: distillation
  terms only there; each step has the 8 labelled crops of the row alone plus 8 unlabelled ones)

Protocol (the budget of two CPU cores): inputs resized to 60x80 (one third), random rescale 0.75-1.5, crop
60x80, flip, jitter (the teacher sees the un-jittered view), batch 8, AdamW lr 6e-4 (head x10), 50 warm-up
iterations then poly decay, 1600 iterations, validation every 100; seeds 0, 1, 2. Val inputs are resized to
60x80 too and the upsampled logits are scored against the native 180x240 labels (``val_labels="native"``).
The teacher runs once per training image on the whole 180x240 clean image (``--teacher-cache``), so KD costs no
teacher forward per step and the teacher's targets keep its full-resolution accuracy (57.99 val mIoU) instead of
what it manages on a 60x80 crop.

Table: final val mIoU as mean ± sample std over seeds; Δ = the paired difference with the baseline row at the
same seed (same initial draw; same data order and crops for the full-data rows), mean with a 95 % t-interval;
"flat" = the spread (max - min) of the val mIoU over the last 25 % of the schedule, worst seed, and whether every
seed stays within ±1 mIoU (spread <= 2).

Resumable and parallel: every run lives in ``OUT/<row>_s<seed>``; a finished run is read back from its
``run.json``, an interrupted one continues from its ``resume.pt``. ``--lane K/N`` runs every N-th job (start N
processes); lane 0 prepares the data splits and the teacher cache, the others wait for it. ``--report-only``
writes docs/results.md + docs/results.json from whatever has finished.

    python examples/reproduce_camvid.py --out runs/conv --lane 0/2 &  python examples/reproduce_camvid.py \\
        --out runs/conv --lane 1/2 ;  python examples/reproduce_camvid.py --out runs/conv --report-only
    python examples/reproduce_camvid.py --gpu-recipe --out runs/gpu   # one CUDA GPU: full-resolution schedule
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segkd.checkpoint import atomic_write_text
from segkd.engine.trainer import TrainConfig, finished_run, run_train
from segkd.methods.task import DistillConfig, prepare_distill_data, run_distill
from segkd.safeio import write_generated

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository
TEACHER = str(SHARED / "checkpoints" / "camvid-deeplabv3-resnet18-torchvision.pth")
CAMVID = str(SHARED / "data" / "camvid")
FINDINGS = "<!-- findings: written by hand, kept when the table above is regenerated -->"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class Protocol:
    """The schedule every row shares (``--gpu-recipe`` swaps in the full-resolution one)."""

    resize: str | None = "60x80"
    crop: str = "60x80"
    scale: str = "0.75,1.5"
    batch: int = 8
    lr: float = 6e-4
    warmup: int = 50
    iters: int = 1600
    val_every: int = 100
    device: str = "cpu"
    workers: int = 0
    amp: bool = False
    lanes: int = 1  # parallel processes --spawn starts by default

    def train_kwargs(self) -> dict[str, Any]:
        return dict(resize=self.resize, crop=self.crop, scale=self.scale, batch=self.batch, lr=self.lr,
                    warmup=self.warmup, iters=self.iters, val_every=self.val_every, device=self.device,
                    workers=self.workers, amp=self.amp, aux_weight=0.0, val_labels="native", log_every=10)


# One GPU: native 180x240 crops (3x the CPU protocol's side), scale 0.5-2 (mmseg's), batch 16, 2000 iterations
# (2.5x the images of the CPU protocol, at 9x the pixels), bf16/fp16 autocast, four rows at a time on the one GPU
# (small SegFormer-B0 steps leave it mostly idle) with 3 loader workers each. Budget estimate, not a measurement (no
# GPU in the session that wrote it): ~60 s per B0 row, 39 jobs over 4 lanes.
GPU_RECIPE = Protocol(resize=None, crop="180x240", scale="0.5,2.0", batch=16, lr=6e-4, warmup=100, iters=2000,
                      val_every=250, device="cuda", workers=3, amp=True, lanes=4)


@dataclass
class Row:
    name: str
    model: str = "segformer-b0"
    method: str | None = None  # None: trained alone
    opts: dict[str, str] = field(default_factory=dict)
    data: str = "full"  # full | quarter
    unlabeled: bool = False
    cache: bool = True
    peer: str | None = None
    baseline: str | None = "b0"
    peer_baseline: str | None = None
    note: str | None = None  # a row that reports why it was not run


def rows() -> list[Row]:
    return [
        Row("b0", baseline=None),
        Row("kd", method="kd"),
        Row("cwd", method="cwd", opts={"weight": "0.3", "feature": "true", "feat_weight": "5"}),
        Row("dkd", method="dkd"),
        Row("c2vkd", method="c2vkd"),
        Row("c2vkd+ce", method="c2vkd", opts={"add_ce": "true"}),
        Row("kd-online", method="kd", cache=False),
        Row("kd-mask", method="kd", opts={"mask_ignore": "true"}),
        Row("dml", method="dml", peer="segformer-b0", peer_baseline="b0"),
        Row("transkd", method="transkd", note="not run: TransKD needs a transformer teacher at least 10 mIoU above "
            "B0 alone; none can be trained here (SegFormer-B1 from scratch: 27.6 vs B0 23.2, docs/results-short.md)"
            " and no ImageNet weights exist on this machine"),
        Row("r18", model="deeplabv3-resnet18", baseline=None),
        Row("collab", method="collab", peer="deeplabv3-resnet18", peer_baseline="r18"),
        Row("quarter-b0", data="quarter", baseline=None),
        Row("quarter-kd+unl", method="kd", data="quarter", unlabeled=True, baseline="quarter-b0"),
        Row("quarter-c2vkd+unl", method="c2vkd", opts={"add_ce": "true"}, data="quarter", unlabeled=True,
            baseline="quarter-b0"),
    ]


# run order: the method rows at every seed first; then the online/diagnostic rows at the first seed, then at the
# others; the ResNet-18 rows last (the most expensive: a ResNet-18 trained from scratch). A cut budget leaves
# whole rows, and one seed of every diagnostic, rather than seedless rows.
MAIN = ["b0", "quarter-b0", "quarter-kd+unl", "quarter-c2vkd+unl", "kd", "cwd", "c2vkd+ce", "dkd", "c2vkd"]
EXTRA = ["kd-online", "kd-mask", "dml"]
LATE = ["r18", "collab"]


def jobs(table: list[Row], seeds: list[int]) -> list[tuple[Row, int]]:
    """(row, seed) in run order (see above); note rows are not jobs."""
    by_name = {r.name: r for r in table}
    plan = [(MAIN, seeds), (EXTRA, seeds[:1]), (EXTRA, seeds[1:]), (LATE, seeds)]
    order = [(by_name[n], s) for names, group_seeds in plan for s in group_seeds for n in names if n in by_name]
    return [(r, s) for r, s in order if r.note is None]


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / f"{name.replace('+', '_')}_s{seed}"


# ------------------------------------------------------------------------------------------------- preparation
def make_splits(out: Path, source: str = CAMVID) -> tuple[Path, Path]:
    """``OUT/data/camvid-quarter`` (every 4th training image labelled, val as is) and ``OUT/data/camvid-unlabeled``
    (the other 3/4, images only), as symlinks: the data are never copied."""
    from segkd.data import resolve_data_root

    src = Path(resolve_data_root(source)).resolve()
    quarter, unl = out / "data" / "camvid-quarter", out / "data" / "camvid-unlabeled"
    if any((quarter / n).exists() for n in ("classes.json", "classes.txt", "stats.json")) and unl.is_dir():
        return quarter, unl
    for d in (quarter / "images" / "train", quarter / "labels" / "train", unl):
        d.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted((src / "images" / "train").glob("*.png"))):
        if i % 4 == 0:
            (quarter / "images" / "train" / p.name).symlink_to(p)
            (quarter / "labels" / "train" / p.name).symlink_to(src / "labels" / "train" / p.name)
        else:
            (unl / p.name).symlink_to(p)
    for sub in ("images", "labels"):
        (quarter / sub / "val").symlink_to(src / sub / "val")
    for name in ("classes.json", "classes.txt", "stats.json"):  # the class file last: it marks a finished split
        if (src / name).exists():
            (quarter / name).symlink_to(src / name)
    return quarter, unl


def config(row: Row, seed: int, args: argparse.Namespace) -> TrainConfig:
    out = run_dir(Path(args.out), row.name, seed)
    data = str(Path(args.out) / "data" / "camvid-quarter") if row.data == "quarter" else args.data
    common = dict(data=data, out=str(out), seed=seed, progress=not args.no_progress, **args.protocol.train_kwargs())
    if row.method is None:
        return TrainConfig(model=row.model, **common)
    teacher = {} if row.peer else {"teacher": "deeplabv3-resnet18", "teacher_weights": args.teacher}
    return DistillConfig(model=row.model, method=row.method, peer=row.peer, method_opts=dict(row.opts),
                         teacher_cache=str(Path(args.out) / "teacher-cache") if row.cache and not row.peer else None,
                         unlabeled=str(Path(args.out) / "data" / "camvid-unlabeled") if row.unlabeled else None,
                         **teacher, **common)


def prepare(args: argparse.Namespace) -> None:
    """Data splits and the teacher cache (built on the 367 training images; the label-scarce rows use the same
    images, so the same cache)."""
    make_splits(Path(args.out), args.data)
    cfg = config(Row("cache", method="c2vkd"), 0, args)
    t0 = time.perf_counter()
    prepare_distill_data(cfg)  # type: ignore[arg-type]
    print(f"teacher cache ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    atomic_write_text(Path(args.out) / "prepared", "ok\n")


def run_job(row: Row, seed: int, args: argparse.Namespace) -> None:
    cfg = config(row, seed, args)
    out = Path(cfg.out)
    doc = finished_run(out)
    if doc is not None:
        check_same(doc["config"], cfg, out)
        return
    resume = out if (out / "resume.pt").exists() else None
    print(f"== {row.name} seed {seed}", file=sys.stderr, flush=True)
    (run_train if row.method is None else run_distill)(cfg, resume=resume)  # type: ignore[operator]


PROTOCOL_KEYS = ("model", "data", "iters", "batch", "lr", "warmup", "crop", "resize", "scale", "val_every", "seed",
                 "val_labels", "method", "method_opts", "teacher_weights", "teacher_cache", "unlabeled",
                 "unlabeled_ratio", "peer")


def check_same(saved: dict[str, Any], cfg: TrainConfig, out: Path) -> None:
    """A finished run is reused only if it ran this row's protocol (an option newer than the run counts as its
    default)."""
    from dataclasses import fields

    want = vars(cfg)
    defaults = {f.name: f.default for f in fields(type(cfg))}
    for k in PROTOCOL_KEYS:
        have = saved.get(k, defaults.get(k))
        if k in want and have != want[k]:
            raise SystemExit(f"{out}: finished with {k}={have!r}, this protocol wants {want[k]!r}; "
                             "use another --out")


# ------------------------------------------------------------------------------------------------------ report
def val_curve(out: Path, model: str = "student") -> list[tuple[int, float]]:
    log = out / "metrics.jsonl"
    if not log.exists():
        return []
    recs = [json.loads(ln) for ln in log.read_text().splitlines() if '"type": "val"' in ln]
    return [(r["iter"], r["miou"]) for r in recs if r.get("model") == model]


def flat_spread(curve: list[tuple[int, float]], iters: int) -> float | None:
    """max - min of the val mIoU (points) over the last 25 % of the schedule; None without two such points."""
    tail = [m for it, m in curve if it >= 0.75 * iters]
    return 100 * (max(tail) - min(tail)) if len(tail) >= 2 else None


def collect(table: list[Row], seeds: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Per row and seed: final mIoU, spread of the flat tail, wall time (peer figures for online rows)."""
    res: dict[str, Any] = {}
    for row in table:
        for seed in seeds:
            out = run_dir(Path(args.out), row.name, seed)
            doc = finished_run(out)
            if doc is None:
                continue
            s = doc["summary"]
            iters = s["iterations"]
            for role in s["final"]:
                name = row.name if role == "student" else f"{row.name} (peer)"
                curve = val_curve(out, role)
                res.setdefault(name, {})[str(seed)] = {
                    "miou": s["final"][role]["miou"], "best": s["best"][role]["miou"],
                    "spread": flat_spread(curve, iters), "curve": curve, "wall_s": s["wall_time_s"],
                    "iters": iters, "per_class_iou": s["final"][role].get("per_class_iou")}
    return res


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    m = statistics.fmean(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} ± {statistics.stdev(xs):.2f}"


def paired(vals: dict[str, Any], base: dict[str, Any]) -> tuple[str, list[float]]:
    """Paired Δ (points) by seed: ``mean [lo, hi]`` with a 95 % t-interval (n >= 2)."""
    ds = [100 * (vals[s]["miou"] - base[s]["miou"]) for s in sorted(vals) if s in base]
    if not ds:
        return "", []
    m = statistics.fmean(ds)
    if len(ds) == 1:
        return f"{m:+.2f} (one seed)", ds
    half = T975[len(ds) - 1] * statistics.stdev(ds) / math.sqrt(len(ds))
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]", ds


def render(table: list[Row], res: dict[str, Any], args: argparse.Namespace) -> str:
    p = args.protocol
    lines = [
        "# CamVid: distillation against the student trained alone, converged protocol",
        "",
        "Generated by `examples/reproduce_camvid.py` (raw figures in `results.json`). CamVid 11 classes, train split "
        "(367 images) for training, val split (101 images) for reporting. "
        f"Schedule of every row: inputs resized to {p.resize or 'native size'}, rescale {p.scale}, crop {p.crop}, "
        f"flip, jitter, batch {p.batch}, AdamW lr {p.lr:g} (head x10), {p.warmup} warm-up iterations then poly "
        f"decay, {p.iters} iterations, validation every {p.val_every}; random initialisation (no ImageNet weights "
        "here). Validation: every val image whole, input resized like training, logits upsampled to and scored "
        "against the native 180x240 labels. Teacher: the shared DeepLabV3-ResNet18 (57.99 val mIoU at 180x240), "
        "through the teacher cache (its whole-image outputs warped onto each crop) unless the row says online.",
        "",
        "val mIoU = final val mIoU, mean ± sample std over seeds (each seed listed); best val = the best periodic "
        "validation, mean over seeds. Δ = paired difference "
        "with the baseline row at the same seed, mean and 95 % t-interval. flat = the worst seed's spread (max - "
        "min) of the val mIoU over the last 25 % of the schedule; ✓ when every seed stays within ±1 mIoU "
        "(spread ≤ 2).",
        "",
        "| row | method (options) | data | val mIoU | per seed | best val | baseline | Δ [95 % CI] | flat (spread) |",
        "|---|---|---|---:|---|---:|---|---:|---:|",
    ]
    for row in table:
        names = [row.name] + ([f"{row.name} (peer)"] if row.peer else [])
        for name in names:
            peer = name.endswith("(peer)")
            method = (row.method or "CE alone") + "".join(f" {k}={v}" for k, v in row.opts.items())
            method += "" if row.method is None or row.peer or row.note else (
                " (cache)" if row.cache else " (teacher online)")
            data = ("1/4 labelled" + (" + 3/4 unlabeled" if row.unlabeled else "")) if row.data == "quarter" \
                else "all labelled"
            label = name + (f" [{row.peer}]" if peer else "")
            if row.note:
                lines.append(f"| {label} | {method} | {data} | {row.note} | | | | | |")
                continue
            vals = res.get(name, {})
            if not vals:
                lines.append(f"| {label} | {method} | {data} | not run yet | | | | | |")
                continue
            xs = [100 * v["miou"] for _, v in sorted(vals.items())]
            base = row.peer_baseline if peer else row.baseline
            delta, _ = paired(vals, res.get(base, {})) if base else ("", [])
            spreads = [v["spread"] for v in vals.values() if v["spread"] is not None]
            flat = "—" if not spreads else f"{'✓' if max(spreads) <= 2 else '✗'} ({max(spreads):.2f})"
            best = statistics.fmean(100 * v["best"] for v in vals.values())
            lines.append(f"| {label} | {method} | {data} | {mean_std(xs)} | {' / '.join(f'{x:.2f}' for x in xs)} | "
                         f"{best:.2f} | {base or '—'} | {delta} | {flat} |")
    lines += ["", "## How to reproduce", "", "```",
              f"python examples/reproduce_camvid.py --out {args.out} --lane 0/2 &",
              f"python examples/reproduce_camvid.py --out {args.out} --lane 1/2",
              f"python examples/reproduce_camvid.py --out {args.out} --report-only", "```", "",
              f"Environment: Python {platform.python_version()}, torch {torch.__version__}, {args.threads} thread(s) "
              "per process, two processes on the 2-core machine.", ""]
    return "\n".join(lines)


def write_docs(path: Path, table_md: str) -> None:
    """Write the generated table, keeping whatever follows the FINDINGS marker in the existing file."""
    write_generated(path, table_md, FINDINGS)


def report(table: list[Row], seeds: list[int], args: argparse.Namespace) -> None:
    res = collect(table, seeds, args)
    atomic_write_text(Path(args.json), json.dumps({"protocol": vars(args.protocol), "seeds": seeds, "rows": res},
                                                  indent=1, default=str) + "\n")
    write_docs(Path(args.docs), render(table, res, args))


# -------------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/camvid-converged", help="Folder of every run, the splits and the cache.")
    p.add_argument("--data", default=CAMVID, help="CamVid root (folder layout, as in ../shared/data/camvid).")
    p.add_argument("--teacher", default=TEACHER, help="The CNN teacher's weights.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default=None, help="Comma-separated row names to run.")
    p.add_argument("--lane", default="0/1", help="K/N: run every N-th job starting at K (N parallel processes).")
    p.add_argument("--spawn", type=int, default=None, help="Start N lanes as child processes and wait for them "
                   "(default with --gpu-recipe: 4), then write the report.")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process.")
    p.add_argument("--iters", type=int, default=None, help="Override the schedule length (quick looks, tests).")
    p.add_argument("--gpu-recipe", action="store_true", help="The full-resolution schedule on one CUDA GPU "
                   "(refuses to start without CUDA).")
    p.add_argument("--dry-run", action="store_true", help="With --gpu-recipe: a few iterations on the CPU, to "
                   "check the recipe runs end to end.")
    p.add_argument("--docs", default="docs/results.md")
    p.add_argument("--json", default="docs/results.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    try:
        k, n = (int(v) for v in args.lane.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        p.error(f"--lane takes K/N with 0 <= K < N, got {args.lane!r}")
    args.lane_k, args.lane_n = k, n
    args.protocol = Protocol()
    if args.gpu_recipe:
        if not torch.cuda.is_available() and not args.dry_run:
            p.error("--gpu-recipe needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run checks it on CPU")
        args.protocol = GPU_RECIPE if not args.dry_run else Protocol(
            **{**vars(GPU_RECIPE), "device": "cpu", "iters": 2, "val_every": 2, "warmup": 0, "workers": 0,
               "batch": 2, "amp": False, "lanes": 2})
    if args.iters is not None:
        args.protocol.iters, args.protocol.val_every = args.iters, min(args.protocol.val_every, args.iters)
        args.protocol.warmup = min(args.protocol.warmup, args.iters // 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    table = rows()
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        unknown = keep - {r.name for r in table}
        if unknown:
            raise SystemExit(f"--only: unknown row(s) {', '.join(sorted(unknown))}")
        table = [r for r in table if r.name in keep]
    if args.report_only:
        report(table, args.seeds, args)
        print(f"wrote {args.docs} and {args.json}", file=sys.stderr)
        return 0
    spawn = args.spawn if args.spawn is not None else (args.protocol.lanes if args.gpu_recipe else 1)
    if spawn > 1 and args.lane_n == 1:
        return spawn_lanes(spawn, argv if argv is not None else sys.argv[1:], table, args)
    marker = Path(args.out) / "prepared"
    if args.lane_k == 0:
        if not marker.exists():
            prepare(args)
    else:
        while not marker.exists():
            time.sleep(5)
    for i, (row, seed) in enumerate(jobs(table, args.seeds)):
        if i % args.lane_n == args.lane_k:
            run_job(row, seed, args)
    if args.lane_k == 0:
        report(table, args.seeds, args)
    return 0


def spawn_lanes(n: int, argv: list[str], table: list[Row], args: argparse.Namespace) -> int:
    """Run lanes 0..n-1 of this very command as child processes, then write the report."""
    import subprocess

    base, skip = [], False
    for a in argv:  # drop --spawn N / --spawn=N: the children are lanes
        if skip or a.startswith("--spawn="):
            skip = False
            continue
        if a == "--spawn":
            skip = True
            continue
        base.append(a)
    procs = [subprocess.Popen([sys.executable, __file__, *base, "--lane", f"{k}/{n}"]) for k in range(n)]
    codes = [p.wait() for p in procs]
    report(table, args.seeds, args)
    bad = [k for k, c in enumerate(codes) if c]
    if bad:
        print(f"lane(s) {', '.join(map(str, bad))} failed; finished runs are in the report", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
