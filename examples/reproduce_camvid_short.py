"""Reduced-scale (short-schedule) CamVid reproduction, kept for docs/results-short.md.

The converged protocol (3 seeds, teacher cache, label-scarce rows) is examples/reproduce_camvid.py.

Rows (train split for training, val split for reporting, whole 180x240 images):

* ``teacher-cnn``   the shared DeepLabV3-ResNet18 CamVid checkpoint (evaluated, not trained)
* ``teacher-vit``   SegFormer-B1 trained here (``--teacher-iters``, default 2x the student schedule)
* ``b0``            SegFormer-B0 trained alone (no KD), the student schedule
* ``b0+kd``, ``b0+cwd``, ``b0+c2vkd``   CNN teacher -> B0
* ``b0+transkd``    the trained B1 -> B0
* ``r18``           DeepLabV3-ResNet18 trained alone on the student schedule (collab's CNN baseline)
* ``collab``        B0 + R18 trained together; each is compared with its own solo row (``b0`` / ``r18``)
* ``b0+c2vkd+ce``   only with ``--extra``: C2VKD plus the student's CE (diagnoses PDD's weak early gradient)

Budget (measured, one row per core, two single-thread processes merged with ``--merge``): with the defaults (600
iterations, batch 8, random crop 96x128 from the full-resolution images, rescale 0.75-1.5; the B1 teacher 1200)
a row takes 4.5 min (B0 alone), 7-16 min (B0 with a teacher), 26-28 min (the rows that train a DeepLabV3-R18) on
one core: one seed of the table is about 130 core-minutes, ~66 min on the two cores, and two seeds fit in about
2.5 hours. Crops are taken from the full-resolution images so the shared teacher sees its own training scale: at
a 90x120 resize it falls from 57.99 to 39.95 mIoU.

Every row uses the same student schedule (``--iters``, ``--batch``, ``--crop``, AdamW at ``--lr``,
poly decay, ``--warmup``), from random initialisation (no ImageNet weights exist on this machine). The script is
resumable: a finished row is read back from its ``run.json``; an interrupted one continues from its
``resume.pt`` (Ctrl-C, then run the same command again). After every row it rewrites ``docs/results-short.md`` (the
table and how to reproduce) and the raw JSON (``docs/results-short.json``).

    .venv/bin/python examples/reproduce_camvid_short.py --out runs/camvid            # the full table
    .venv/bin/python examples/reproduce_camvid_short.py --only b0,b0+kd --iters 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segkd.checkpoint import atomic_write_text
from segkd.engine.config import TrainConfig
from segkd.models import count_params, create_model
from segkd.models.loading import load_teacher
from segkd.runs.distill import DistillConfig, deploy_gmacs, run_distill
from segkd.runs.rundir import finished_run
from segkd.runs.train import prepare_data, run_train
from segkd.safeio import write_generated
from segkd.shapes import parse_hw

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository
SHARED_TEACHER = str(SHARED / "checkpoints" / "camvid-deeplabv3-resnet18-torchvision.pth")
EVAL_SIZE = (180, 240)


@dataclass
class Row:
    name: str
    kind: str  # eval | train | distill
    model: str
    method: str | None = None
    teacher: str | None = None
    teacher_weights: str | None = None  # a path, or "@row" for the best checkpoint of another row
    peer: str | None = None
    baseline: str | None = None  # the row it is compared with
    peer_baseline: str | None = None
    opts: dict[str, str] = field(default_factory=dict)


def rows(teacher_cnn: str, extra: bool = False) -> list[Row]:
    """The table; ``extra`` adds C2VKD with the student's CE (``--c2vkd-add-ce``) as a diagnostic row."""
    more = [Row("b0+c2vkd+ce", "distill", "segformer-b0", "c2vkd", "deeplabv3-resnet18", teacher_cnn, baseline="b0",
                opts={"add_ce": "true"})] if extra else []
    return [
        Row("teacher-cnn", "eval", "deeplabv3-resnet18", teacher_weights=teacher_cnn),
        Row("teacher-vit", "train", "segformer-b1"),
        Row("b0", "train", "segformer-b0"),
        Row("b0+kd", "distill", "segformer-b0", "kd", "deeplabv3-resnet18", teacher_cnn, baseline="b0"),
        Row("b0+cwd", "distill", "segformer-b0", "cwd", "deeplabv3-resnet18", teacher_cnn, baseline="b0"),
        Row("b0+c2vkd", "distill", "segformer-b0", "c2vkd", "deeplabv3-resnet18", teacher_cnn, baseline="b0"),
        *more,
        Row("b0+transkd", "distill", "segformer-b0", "transkd", "segformer-b1", "@teacher-vit", baseline="b0"),
        Row("r18", "train", "deeplabv3-resnet18"),
        Row("collab", "distill", "segformer-b0", "collab", peer="deeplabv3-resnet18", baseline="b0",
            peer_baseline="r18"),
    ]


SEEDLESS = ("teacher-cnn", "teacher-vit")  # run once (seed 0); every seed's rows use the same teachers


def key(name: str, seed: int) -> str:
    """Results key (and, with '#' -> '_', run directory) of a row at one seed; seed 0 keeps the bare name."""
    return name if seed == 0 or name in SEEDLESS else f"{name}#s{seed}"


def run_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    return Path(args.out) / key(name, seed).replace("+", "_").replace("#", "_")


def common(args: argparse.Namespace, out: Path, iters: int, seed: int) -> dict[str, Any]:
    return dict(data=args.data, out=str(out), iters=iters, lr=args.lr, batch=args.batch, crop=args.crop,
                scale=args.scale, warmup=args.warmup, val_every=args.val_every, workers=args.workers, seed=seed,
                device=args.device, progress=not args.no_progress, log_every=10)


def model_figures(model: torch.nn.Module) -> dict[str, Any]:
    return {"deploy_params": count_params(model), "gmacs": deploy_gmacs(model, EVAL_SIZE)}  # type: ignore[arg-type]


def run_row(row: Row, args: argparse.Namespace, done: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    out = run_dir(args, row.name, seed)
    iters = args.teacher_iters if row.name == "teacher-vit" else args.iters
    if row.kind == "eval":
        from torch.utils.data import DataLoader

        from segkd.engine.evaluate import evaluate
        from segkd.engine.inference import make_predictor

        t0 = time.perf_counter()
        data = prepare_data(TrainConfig(data=args.data, workers=0))
        model = load_teacher(row.model, row.teacher_weights, data.num_classes)  # type: ignore[arg-type]
        loader = DataLoader(data.val, batch_size=1, num_workers=0)
        res = evaluate(make_predictor(model, mode="whole"), loader, data.num_classes, data.ignore_index, "cpu",
                       progress=False).to_dict()
        return {"final_miou": res["miou"], "best_miou": res["miou"], "wall_s": time.perf_counter() - t0,
                "iters": None, "per_class_iou": res.get("per_class_iou"), **model_figures(model)}
    doc = finished_run(out)
    if doc is None:
        resume = out if (out / "resume.pt").exists() else None
        if row.kind == "train":
            cfg = TrainConfig(model=row.model, aux_weight=0.0, pretrained=args.pretrained.get(row.model),
                              **common(args, out, iters, seed))
            run_train(cfg, resume=resume)
        else:
            weights = row.teacher_weights
            if weights and weights.startswith("@"):
                weights = done[weights[1:]]["checkpoint"]
            cfg = DistillConfig(model=row.model, method=row.method or "kd", teacher=row.teacher,
                                teacher_weights=weights, peer=row.peer, method_opts=dict(row.opts),
                                pretrained=args.pretrained.get(row.model),
                                peer_pretrained=args.pretrained.get(row.peer or ""),
                                **common(args, out, iters, seed))
            run_distill(cfg, resume=resume)
        doc = finished_run(out)
        assert doc is not None
    s = doc["summary"]
    result: dict[str, Any] = {"iters": s["iterations"], "seed": seed, "wall_s": s["wall_time_s"], "run_dir": str(out),
                              "checkpoint": s["checkpoints"]["student"]["best"]}
    for role in s["final"]:
        pre = "" if role == "student" else "peer_"
        result[f"{pre}final_miou"] = s["final"][role]["miou"]
        result[f"{pre}best_miou"] = s["best"][role]["miou"]
        result[f"{pre}curve"] = val_curve(out, role)
    student = create_model(row.model, num_classes=11)
    result.update(model_figures(student))
    if row.peer:
        result["peer_model"] = row.peer
        result.update({f"peer_{k}": v for k, v in model_figures(create_model(row.peer, num_classes=11)).items()})
    distill = out / "distill.json"
    if distill.exists():
        rep = json.loads(distill.read_text())
        result["adapter_params"] = rep["adapter_params"]
        result["pool_source"] = rep.get("pool_source")
    return result


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def method_label(row: Row) -> str:
    if row.method is None:
        return "eval only" if row.kind == "eval" else "CE alone"
    return row.method + "".join(f" {k}={v}" for k, v in row.opts.items())


def over_seeds(results: dict[str, Any], name: str, seeds: list[int], field: str = "final_miou"
               ) -> list[tuple[int, float]]:
    """(seed, value) of one row's field at every seed that has finished."""
    return [(sd, results[key(name, sd)][field]) for sd in seeds if key(name, sd) in results]


def miou_cell(vals: list[tuple[int, float]], spread: bool = True) -> str:
    """The mean over seeds, and with several seeds each seed's value in brackets."""
    xs = [v for _, v in vals]
    if not xs:
        return "—"
    mean = pct(sum(xs) / len(xs))
    return mean if len(xs) == 1 or not spread else f"{mean} ({' / '.join(pct(x) for x in xs)})"


def delta_cell(vals: list[tuple[int, float]], base: list[tuple[int, float]]) -> str:
    """Paired difference with the baseline row at the same seed (same data order and initial draw), mean first."""
    b = dict(base)
    ds = [100 * (v - b[sd]) for sd, v in vals if sd in b]
    if not ds:
        return ""
    mean = f"{sum(ds) / len(ds):+.2f}"
    return mean if len(ds) == 1 else f"{mean} ({' / '.join(f'{d:+.2f}' for d in ds)})"


def curve_cell(results: dict[str, Any], name: str, seeds: list[int], field: str = "curve") -> str:
    """mIoU at each periodic validation, averaged over the seeds that have it: how noisy the final figure is."""
    curves = [results[key(name, sd)].get(field) for sd in seeds if key(name, sd) in results]
    curves = [c for c in curves if c]
    if not curves:
        return "—"
    n = min(len(c) for c in curves)
    return " → ".join(pct(sum(c[i][1] for c in curves) / len(curves)) for i in range(n))


def render(results: dict[str, Any], table: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"# {args.title}",
        "",
        f"Generated by `examples/reproduce_camvid_short.py`; raw figures in `{Path(args.json).name}`. CamVid 11 "
        "classes, "
        "train split "
        "(367 images) for training, val split (101 images) for reporting, whole 180x240 images, no test-time "
        "augmentation. val mIoU = final val mIoU after the last iteration, the mean over seeds (each seed in "
        "brackets); best val = the best periodic validation; val curve = the mIoU at each periodic validation "
        "(both means over seeds). Δ vs alone = the paired difference "
        "with the row trained alone at the same seed (same initial draw and data order), mean first. "
        "GMACs at 1x3x180x240; params = deployed model only (training-only adapters in their own "
        "column). Wall time on this machine (2 CPU cores, shared).",
        "",
        f"Schedule (every student row): {args.iters} iterations, batch {args.batch}, random crop {args.crop}, "
        f"rescale {args.scale}, flip, AdamW (lr {args.lr:g}, head x10, wd 0.01), {args.warmup} warm-up "
        f"iterations then poly decay, seeds {','.join(map(str, args.seeds))}, "
        + ("initial weights: " + ", ".join(f"{m} from `{Path(w).name}`" for m, w in args.pretrained.items())
           + ", the rest random." if args.pretrained else "random initialisation (no ImageNet weights).")
        + (f" SegFormer-B1 teacher: {args.teacher_iters} iterations, otherwise the same."
           if any(row.name == "teacher-vit" for row in table) else ""),
        "",
        "| row | model | method | teacher / partner | val mIoU | best val | Δ vs alone | val curve | params (M) "
        "| GMACs | adapters (M) | wall (min) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        seeds = [0] if row.name in SEEDLESS else args.seeds
        vals = over_seeds(results, row.name, seeds)
        if not vals:
            prog = getattr(args, "partial", {}).get(row.name)
            iters = args.teacher_iters if row.name == "teacher-vit" else args.iters
            state = "not run" if prog is None else (
                f"unfinished: {pct(prog['miou'])} at iteration {prog['iter']}/{iters}" if prog["miou"] is not None
                else "started, no validation yet")
            lines.append(f"| {row.name} | {row.model} | {method_label(row)} | {row.teacher or row.peer or '—'} "
                         f"| {state} | | | | | | | |")
            continue
        r = results[key(row.name, vals[0][0])]
        adapters = r.get("adapter_params", {}).get("student") if isinstance(r.get("adapter_params"), dict) else None
        walls = [results[key(row.name, sd)].get("wall_s") for sd, _ in vals]
        wall = "—" if None in walls else f"{sum(walls) / len(walls) / 60:.1f}"
        lines.append(
            f"| {row.name} | {row.model} | {method_label(row)} | "
            f"{row.teacher or row.peer or '—'} | {miou_cell(vals)} | "
            f"{miou_cell(over_seeds(results, row.name, seeds, 'best_miou'), spread=False)} | "
            f"{delta_cell(vals, over_seeds(results, row.baseline or '', seeds))} | "
            f"{curve_cell(results, row.name, seeds)} | {r['deploy_params'] / 1e6:.2f} | {r['gmacs']:.2f} | "
            f"{'—' if adapters is None else f'{adapters / 1e6:.3f}'} | {wall} |")
        if row.peer and "peer_final_miou" in r:
            pvals = over_seeds(results, row.name, seeds, "peer_final_miou")
            padapt = r.get("adapter_params", {}).get("peer")
            lines.append(
                f"| {row.name} (peer) | {row.peer} | {row.method} | {row.model} | {miou_cell(pvals)} | "
                f"{miou_cell(over_seeds(results, row.name, seeds, 'peer_best_miou'), spread=False)} | "
                f"{delta_cell(pvals, over_seeds(results, row.peer_baseline or '', seeds))} | "
                f"{curve_cell(results, row.name, seeds, 'peer_curve')} | {r['peer_deploy_params'] / 1e6:.2f} | "
                f"{r['peer_gmacs']:.2f} | "
                f"{'—' if padapt is None else f'{padapt / 1e6:.3f}'} | (same run) |")
    pool = next((r.get("pool_source") for r in results.values() if r.get("pool_source")), None)
    lines += [
        "",
        "Notes: the C2VKD row uses the published objective (PDD + VLFD, no CE)"
        + (f"; attention pool: {pool}" if pool else "") + ". The collab row is segkd's reconstruction of the "
        "CNN-ViT collaborative method (no public code; see docs/methods.md). Δ compares final mIoU with the row "
        "trained alone on the same schedule (collab: each student with its own solo row).",
        "",
        "## How to reproduce",
        "",
        "```",
        f"python examples/reproduce_camvid_short.py --out {args.out} --iters {args.iters} --teacher-iters "
        f"{args.teacher_iters} --batch {args.batch} --crop {args.crop} --scale {args.scale} --warmup {args.warmup} "
        f"--lr {args.lr:g} --val-every {args.val_every} --threads {args.threads} "
        f"--seeds {','.join(map(str, args.seeds))}" + (" --extra" if args.extra else "")
        + "".join(f" --pretrained {m}={w}" for m, w in args.pretrained.items())
        + (f" --only {args.only}" if args.only else ""),
        "```",
        "",
        "Rows can run in parallel processes (`--only ROWS --json PART.json`) and be merged with "
        "`--report-only --merge PART.json ...`; an interrupted row continues from its `resume.pt` when the same "
        "command is run again.",
        "",
        f"Environment: Python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
    ]
    return "\n".join(lines)


FINDINGS = "<!-- findings: written by hand, kept when the table above is regenerated -->"


def write_docs(path: Path, table_md: str) -> None:
    """Write the generated table, keeping whatever follows the FINDINGS marker in the existing file."""
    write_generated(path, table_md, FINDINGS)


def val_curve(out: Path, model: str = "student") -> list[tuple[int, float]] | None:
    """Every periodic validation of one model of a run, ``[(iteration, mIoU)]`` from its metrics.jsonl."""
    log = out / "metrics.jsonl"
    if not log.exists():
        return None
    vals = [json.loads(ln) for ln in log.read_text().splitlines() if '"type": "val"' in ln]
    return [(v["iter"], v["miou"]) for v in vals if v.get("model") == model]


def progress_of(out: Path) -> dict[str, Any] | None:
    """The last validation of an unfinished row, for the report."""
    curve = val_curve(out)
    if curve is None:
        return None
    return {"iter": curve[-1][0], "miou": curve[-1][1]} if curve else {"iter": 0, "miou": None}


def jobs(table: list[Row], seeds: list[int]) -> list[tuple[Row, int]]:
    """(row, seed) in run order: every row at the first seed, then every student row at the next seed, ..."""
    return [(row, sd) for i, sd in enumerate(seeds) for row in table if i == 0 or row.name not in SEEDLESS]


def report_only(results: dict[str, Any], table: list[Row], args: argparse.Namespace, json_path: Path) -> int:
    partial: dict[str, Any] = {}
    for row, seed in jobs(table, args.seeds):
        out, k = run_dir(args, row.name, seed), key(row.name, seed)
        if row.kind == "eval":
            continue
        if finished_run(out) is not None:  # re-read, so rows merged from older JSON get every field
            results[k] = run_row(row, args, results, seed)
        elif (prog := progress_of(out)) is not None and row.name not in partial:
            partial[row.name] = prog
    args.partial = partial
    doc = {"settings": dict(vars(args)), "rows": results, "unfinished": partial}
    atomic_write_text(json_path, json.dumps(doc, indent=2, default=str) + "\n")
    write_docs(Path(args.docs), render(results, table, args))
    print(f"wrote {args.docs} and {json_path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(SHARED / "data" / "camvid"), help="CamVid root (images/, labels/).")
    p.add_argument("--teacher-cnn", default=SHARED_TEACHER, help="DeepLabV3-ResNet18 CamVid weights.")
    p.add_argument("--out", default="runs/camvid", help="Run directories (one per row).")
    p.add_argument("--docs", default="docs/results-short.md", help="Markdown table to write.")
    p.add_argument("--json", default="docs/results-short.json", help="Raw JSON to write.")
    p.add_argument("--iters", type=int, default=600, help="Iterations of every student row.")
    p.add_argument("--teacher-iters", type=int, default=None, help="Iterations of the SegFormer-B1 teacher "
                   "(default 2x --iters).")
    p.add_argument("--lr", type=float, default=2e-4, help="Base learning rate of every trained row (heads x10).")
    p.add_argument("--batch", type=int, default=8, help="Batch size.")
    p.add_argument("--crop", default="96x128", help="Random crop HxW.")
    p.add_argument("--scale", default="0.75,1.5", help="Random rescale range.")
    p.add_argument("--warmup", type=int, default=50, help="Warm-up iterations.")
    p.add_argument("--val-every", type=int, default=200, help="Validate (and save a resume point) every N iters.")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers.")
    p.add_argument("--seeds", default="0", help="Comma-separated seeds: every student row runs once per seed "
                   "(teachers once); the table shows the mean and each seed.")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    p.add_argument("--extra", action="store_true", help="Also run C2VKD + CE (a diagnostic row, ~+10%% time).")
    p.add_argument("--pretrained", action="append", default=[], metavar="MODEL=PATH",
                   help="Initial weights for every row that trains MODEL (repeatable), e.g. "
                   "segformer-b0=mit_b0.safetensors: an ImageNet encoder, the papers' setting.")
    p.add_argument("--title", default="CamVid reproduction (reduced scale)", help="Heading of the markdown page.")
    p.add_argument("--only", default=None, help="Comma-separated row names to run (others are read if done).")
    p.add_argument("--no-progress", action="store_true", help="Plain log lines instead of progress bars.")
    p.add_argument("--merge", nargs="*", default=[], help="Results JSON files of parallel runs to read rows from.")
    p.add_argument("--report-only", action="store_true", help="Train nothing: write the docs from finished rows "
                   "(and the last validation of unfinished ones).")
    args = p.parse_args(argv)
    args.teacher_iters = args.teacher_iters or 2 * args.iters
    args.seeds = [int(x) for x in args.seeds.split(",")]
    if bad := [x for x in args.pretrained if "=" not in x]:
        p.error(f"--pretrained takes MODEL=PATH, got {bad[0]!r}")
    args.pretrained = dict(x.split("=", 1) for x in args.pretrained)
    parse_hw(args.crop, "--crop")
    torch.set_num_threads(args.threads)
    table = rows(args.teacher_cnn, args.extra)
    only = None if args.only is None else {s.strip() for s in args.only.split(",")}
    json_path = Path(args.json)
    results: dict[str, Any] = json.loads(json_path.read_text())["rows"] if json_path.exists() else {}
    for extra in args.merge:
        results.update(json.loads(Path(extra).read_text())["rows"])
    if args.report_only:  # with --only, a table of just those rows (e.g. a longer schedule run for a few rows)
        return report_only(results, [r for r in table if only is None or r.name in only], args, json_path)
    for row, seed in jobs(table, args.seeds):
        k = key(row.name, seed)
        if only is not None and row.name not in only:
            continue
        if k in results and results[k].get("iters") in (None, args.teacher_iters
                                                        if row.name == "teacher-vit" else args.iters):
            continue
        if row.teacher_weights == "@teacher-vit" and "teacher-vit" not in results:
            print(f"skip {k}: the teacher-vit row has not run", file=sys.stderr)
            continue
        print(f"== {k}", file=sys.stderr, flush=True)
        results[k] = run_row(row, args, results, seed)
        doc = {"settings": dict(vars(args)), "rows": results}
        atomic_write_text(json_path, json.dumps(doc, indent=2, default=str) + "\n")
        write_docs(Path(args.docs), render(results, table, args))
    write_docs(Path(args.docs), render(results, table, args))
    print(f"wrote {args.docs} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
