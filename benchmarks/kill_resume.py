"""kill -9 during `segkd train` and `segkd distill --method kd`, then resume to the end.

For each mode the script runs one uninterrupted reference, then kills fresh runs of the same command with SIGKILL at
``--kills`` random times (drawn by a seeded RNG within the reference's training time, counted from the killed run's
first log record), inside the second
checkpoint write (``last.safetensors`` cut midway) and inside the second resume-state write (``resume.pt`` cut
midway), using ``benchmarks/kill_hook.py``. After each kill it lists the files on disk and whether each one loads
(checkpoints through segkd's loader, ``resume.pt`` through ``load_resume``, ``run.json`` and every line of
``metrics.jsonl`` as JSON), resumes (``--resume DIR``, or the same command again when the run died before writing
its run.json) and compares the final weights with the reference: bit-identical or not, and the largest absolute
difference. Finished cases are kept in the JSON, so an interrupted invocation continues where it stopped.

    python benchmarks/kill_resume.py --kills 3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "benchmarks" / "kill_hook.py"
# what describes the machine, not the run: a --resume takes these from its own command line
MACHINE = ["--workers", "0", "--no-progress", "--device", "cpu", "--threads", "1", "--log-every", "1"]
COMMON = ["--data", "synth", "--batch", "2", "--crop", "64x64", "--seed", "0", *MACHINE]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def command(mode: str, out: Path, iters: int, val_every: int, teacher: Path | None) -> list[str]:
    """The segkd arguments of one run of ``mode`` writing to ``out``."""
    sched = ["--iters", str(iters), "--val-every", str(val_every), "--out", str(out)]
    if mode == "train":
        return ["train", "--model", "segformer-b0", *COMMON, *sched]
    return ["distill", "--method", "kd", "--student", "segformer-b0", "--teacher", "segformer-b0",
            "--teacher-weights", str(teacher), *COMMON, *sched]


def run(spec: str, args: list[str], kill_after: float | None = None, log: Path | None = None,
        timeout: float = 900) -> dict[str, Any]:
    """``segkd ARGS`` under the kill hook ``spec``. With ``kill_after``, it is SIGKILLed that many seconds after the
    first record appears in the ``log`` file (training started: the start-up time of a loaded machine varies)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HOOK), spec, *args], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None and log is not None:
        while proc.poll() is None and not (log.is_file() and log.stat().st_size > 0):
            time.sleep(0.02)
        time.sleep(kill_after)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    notes = [ln for ln in err.splitlines() if ln.startswith(("note:", "error:", "warning:"))]
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2), "notes": notes,
            "stderr_tail": err.strip().splitlines()[-3:] if proc.returncode not in (0, -signal.SIGKILL) else []}


def check_file(path: Path) -> dict[str, Any]:
    """Whether one file a run left loads, and what it says (iteration, records)."""
    from segkd.engine.state import load_resume
    from segkd.errors import SegkdError
    from segkd.models.loading import load_model

    name, row = path.name, {"file": path.name, "bytes": path.stat().st_size}
    try:
        if name.endswith(".tmp"):
            return {**row, "loads": None, "what": "temp file of the killed write"}
        if name == ".segkd.lock":
            return {**row, "loads": None, "what": "run lock (no flock held: the next run takes it over)"}
        if name.endswith(".safetensors"):
            model = load_model(path)
            return {**row, "loads": True, "what": f"iteration {model.segkd_meta.metrics.get('iteration')}"}
        if name == "resume.pt":
            return {**row, "loads": True, "what": f"iteration {load_resume(path)['iteration']}"}
        if name == "run.json":
            doc = json.loads(path.read_text())
            return {**row, "loads": True, "what": "finished" if "summary" in doc else "started"}
        if name == "config.yaml":
            import yaml

            iters = yaml.safe_load(path.read_text())["iters"]
            return {**row, "loads": True, "what": f"resolved options (iters {iters})"}
        if name == "metrics.jsonl":
            lines = path.read_text().splitlines()
            good = []
            for line in lines:
                try:
                    good.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
            torn = len(lines) - len(good)
            last = max((r["iter"] for r in good if r.get("type") == "train"), default=0)
            return {**row, "loads": torn == 0, "what": f"{len(good)} records, last train iteration {last}"
                    + (f", {torn} torn line(s)" if torn else "")}
    except (SegkdError, OSError, ValueError) as e:
        return {**row, "loads": False, "what": str(e)[:160]}
    return {**row, "loads": None, "what": "not a segkd run file"}


def inventory(run_dir: Path) -> list[dict[str, Any]]:
    return [check_file(p) for p in sorted(run_dir.iterdir())] if run_dir.is_dir() else []


def compare(ref: Path, run_dir: Path) -> dict[str, Any]:
    """Final weights (and training-loss log) of a resumed run against the uninterrupted reference."""
    from segkd.checkpoint import read_checkpoint

    a, b = read_checkpoint(ref / "last.safetensors")[0], read_checkpoint(run_dir / "last.safetensors")[0]
    same_keys = a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b) if a else 0.0
    identical = same_keys and all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)

    def losses(d: Path) -> list[tuple[int, float]]:
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["iter"], r["loss"]) for r in recs if r["type"] == "train"]

    return {"bit_identical": identical, "max_abs_diff": diff, "same_loss_log": losses(ref) == losses(run_dir),
            "temp_files_left": len(list(run_dir.glob(".*.tmp"))), "lock_left": (run_dir / ".segkd.lock").exists()}


def one_case(mode: str, label: str, spec: str, delay: float | None, args: list[str], run_dir: Path,
             ref: Path) -> dict[str, Any]:
    """Kill one run, look at what it left, resume it to the end, compare with the reference."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    killed = run(spec, args, kill_after=delay, log=run_dir / "metrics.jsonl")
    after = inventory(run_dir)
    landed = max((int(f["what"].split()[-1]) for f in after if f["file"] == "resume.pt" and f["loads"]), default=0)
    resumed: dict[str, Any] | None = None
    if finished(run_dir):  # the kill landed after the run's last write (while the process was exiting)
        how = "nothing to resume (the run had finished)"
    else:
        if (run_dir / "run.json").is_file():
            again, how = [mode, "--resume", str(run_dir), *MACHINE], "--resume"
        else:
            again, how = args, "the same command again"
        resumed = run("none", again)
    case = {"mode": mode, "kill": label, "spec": spec, "delay_s": delay, "killed": killed,
            "sigkilled": killed["rc"] == -signal.SIGKILL, "files_after_kill": after,
            "resume_state_iteration": landed, "resumed_with": how, "resume": resumed}
    case["compare"] = compare(ref, run_dir) if resumed is None or resumed["rc"] == 0 else None
    return case


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its run.json has the summary written at the end)."""
    path = run_dir / "run.json"
    try:
        return "summary" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def training_time(ref: Path) -> float:
    """Seconds between the reference's first and last log record: the kill times are drawn in that span after a
    killed run's first record (before it a kill only stops the imports, after it the process is exiting)."""
    times = [json.loads(x)["unix_time"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    return round(max(times) - min(times), 2)


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        "# kill -9 and resume", "",
        f"Generated by `benchmarks/kill_resume.py --kills {s['kills']} --seed {s['seed']}` ({s['created']}): "
        f"segformer-b0, `--data synth --batch 2 --crop 64x64 --iters {s['iters']} --val-every {s['val_every']}` "
        "on CPU, one thread; distill = `--method kd` with a segformer-b0 teacher trained for "
        f"{s['teacher_iters']} iterations. Random kill times (seeded) are drawn within the reference's training time "
        "after the killed run's first log record. Each run is killed with SIGKILL, its files checked (checkpoints "
        "through segkd's loader, resume.pt through `load_resume`, run.json and metrics.jsonl as JSON), then resumed "
        "to the end and its final `last.safetensors` compared with an uninterrupted run's.", "",
        "| mode | kill point | trained to (last log line) | state left (resume.pt) | files after the kill (loads?) | "
        "resumed with | bit-identical | max abs diff | same loss log | left after the resume |",
        "|---|---|---:|---|---|---|---|---:|---|---|",
    ]
    mark = {True: "yes", False: "NO", None: "-"}
    for c in doc["cases"]:
        files = ", ".join(f"{f['file']} ({mark[f['loads']]})" for f in c["files_after_kill"]) or "none"
        cmp = c["compare"] or {}
        state = f"iteration {c['resume_state_iteration']}" if c["resume_state_iteration"] else "none"
        logged = next((f["what"].split(", ")[1].split()[-1] for f in c["files_after_kill"]
                       if f["file"] == "metrics.jsonl" and f["loads"] is not False), "-")
        kill = c["kill"] + ("" if c["sigkilled"] else " (finished before the kill)")
        left = [f"{cmp.get('temp_files_left')} temp file(s)"] * bool(cmp.get("temp_files_left")) + [
            "the lock file"] * bool(cmp.get("lock_left"))
        lines.append(f"| {c['mode']} | {kill} | {logged} | {state} | {files} | {c['resumed_with']} | "
                     f"{mark.get(cmp.get('bit_identical'))} | {cmp.get('max_abs_diff', float('nan')):.3g} | "
                     f"{mark.get(cmp.get('same_loss_log'))} | {', '.join(left) or 'nothing'} |")
    ok = [c for c in doc["cases"] if c["compare"] and c["compare"]["bit_identical"]]
    lines += ["", f"{len(ok)} of {len(doc['cases'])} killed runs resumed to weights bit-identical to the "
              "uninterrupted run's. `-`: not applicable (temp files of the killed write and the run lock are removed "
              "or taken over by the resume)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=3, help="Random-time kills per mode.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the kill times.")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--val-every", type=int, default=3)
    p.add_argument("--teacher-iters", type=int, default=4)
    p.add_argument("--modes", default="train,distill")
    p.add_argument("--work", default="/tmp/segkd-kill-resume", help="Scratch folder for the runs.")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/kill_resume.json"))
    p.add_argument("--docs", default=str(ROOT / "docs/kill-resume.md"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from segkd.checkpoint import atomic_write_text

    work, json_path = Path(args.work), Path(args.json)
    work.mkdir(parents=True, exist_ok=True)
    settings = {"kills": args.kills, "seed": args.seed, "iters": args.iters, "val_every": args.val_every,
                "teacher_iters": args.teacher_iters}
    doc: dict[str, Any] = {"settings": settings, "references": {}, "cases": []}
    if json_path.is_file():
        old = json.loads(json_path.read_text())
        if {k: v for k, v in old["settings"].items() if k != "created"} == settings:
            doc = old  # same settings: continue where the last invocation stopped
    doc["settings"]["created"] = time.strftime("%Y-%m-%d")

    def save() -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(doc, indent=2) + "\n")
        atomic_write_text(Path(args.docs), markdown(doc))

    teacher = work / "teacher" / "last.safetensors"
    if not teacher.is_file():
        t = run("none", ["train", "--model", "segformer-b0", *COMMON, "--iters", str(args.teacher_iters),
                         "--val-every", str(args.teacher_iters), "--out", str(work / "teacher")])
        if t["rc"] != 0:
            raise SystemExit(f"teacher run failed: {t}")
    rng = random.Random(args.seed)
    fractions = [round(rng.random(), 3) for _ in range(args.kills)]
    done = {(c["mode"], c["kill"]) for c in doc["cases"]}
    for mode in args.modes.split(","):
        ref = work / f"{mode}-ref"
        if mode not in doc["references"] or not finished(ref):
            import shutil

            shutil.rmtree(ref, ignore_errors=True)
            r = run("none", command(mode, ref, args.iters, args.val_every, teacher))
            if r["rc"] != 0:
                raise SystemExit(f"{mode} reference failed: {r}")
            doc["references"][mode] = {"wall_s": r["wall_s"], "training_s": training_time(ref)}
            save()
        span = doc["references"][mode]["training_s"]
        kills = [(f"{f * span:.1f} s after the first log record", "none", round(f * span, 2)) for f in fractions]
        kills += [("inside the 2nd last.safetensors write", "write:last.safetensors:2", None),
                  ("inside the 2nd resume.pt write", "write:resume.pt:2", None)]
        for i, (label, spec, delay) in enumerate(kills):
            if (mode, label) in done:
                continue
            run_dir = work / f"{mode}-{i}"
            case = one_case(mode, label, spec, delay, command(mode, run_dir, args.iters, args.val_every, teacher),
                            run_dir, ref)
            doc["cases"].append(case)
            cmp = case["compare"] or {}
            print(f"{mode:8s} {label:45s} killed={case['sigkilled']} state={case['resume_state_iteration']} "
                  f"resumed with {case['resumed_with']} bit-identical={cmp.get('bit_identical')} "
                  f"max|diff|={cmp.get('max_abs_diff')}", flush=True)
            save()
    save()
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
