"""DDP hygiene (issue 21 item 7): ``find_unused_parameters`` only where a real backward leaves a parameter out."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from segkd.engine.batch import Batch
from segkd.engine.task import OptimConfig, SupervisedTask
from segkd.errors import SegkdError
from segkd.methods import METHODS, make_options
from segkd.methods.task import assemble_task
from segkd.models import create_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _variants(options: type) -> list[dict[str, str]]:
    """The method's defaults, each bool option flipped, and on each of those every weight option (``weight``,
    ``*_weight``, positive by default) set to 0: the ablations that can idle an adapter or a head."""
    hints = typing.get_type_hints(options)
    fields = [f for f in dataclasses.fields(options) if f.default is not dataclasses.MISSING]
    bases: list[dict[str, str]] = [{}] + [{f.name: str(not f.default).lower()} for f in fields if hints[f.name] is bool]
    weights = [f.name for f in fields if hints[f.name] is float and (f.name == "weight" or f.name.endswith("_weight"))
               and f.default > 0]
    return [b for base in bases for b in [base] + [{**base, w: "0"} for w in weights]]


def _other(method: str) -> str:
    spec = METHODS.get(method)
    wants_vit = spec.other_family == "transformer" or any(
        t.startswith(("embed", "stage")) for t in spec.taps.get(spec.other_role, ()))
    return "segformer-b1" if wants_vit else "deeplabv3-resnet18"


def _left_out(task, batch: Batch) -> list[str]:  # noqa: ANN001 - a DistillTask or an OnlineTask
    """The trainable parameters with no gradient after one backward of the task's loss."""
    for part in task.parts().values():
        part.module.zero_grad(set_to_none=True)
    task.losses(batch)["loss"].backward()
    return [n for name, part in task.parts().items() for n, p in part.module.named_parameters(prefix=name)
            if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("method", METHODS.names())  # every registered method
def test_find_unused_parameters_is_what_a_backward_shows(method: str) -> None:
    spec = METHODS.get(method)
    torch.manual_seed(0)
    student, other = create_model("segformer-b0", num_classes=3), create_model(_other(method), num_classes=3)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(2, 3, 64, 64, generator=gen), torch.randint(0, 3, (2, 64, 64), generator=gen)
    checked = 0
    for values in _variants(spec.options):
        try:
            task = assemble_task(spec, make_options(spec, values), student, other, OptimConfig(), OptimConfig())
        except SegkdError:
            continue  # a combination the method refuses
        task.train(True)
        for batch in (1, 2) if not spec.peer else (2,):  # a trained DeepLab peer cannot run BatchNorm at batch 1
            try:
                left = _left_out(task, Batch(images[:batch], labels[:batch]))
            except SegkdError as e:
                assert "no loss term" in str(e)
                break
            assert task.find_unused_parameters(batch) == bool(left), (values, batch, left[:3])
            checked += 1
    assert checked >= 2


def test_supervised_task_needs_the_flag_only_for_an_idle_aux_head() -> None:
    model = create_model("deeplabv3-resnet18", num_classes=3, aux=True)
    batch = Batch(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))
    for weight in (0.4, 0.0):
        task = SupervisedTask(model, aux_weight=weight)
        model.zero_grad(set_to_none=True)
        task.losses(batch)["loss"].backward()
        left = [n for n, p in model.named_parameters() if p.grad is None]
        assert task.find_unused_parameters(2) == bool(left) == (weight == 0.0)
    assert not SupervisedTask(create_model("segformer-b0", num_classes=3)).find_unused_parameters(1)


def test_the_trainer_asks_the_task_with_its_images_per_process(tmp_path: Path) -> None:
    from segkd.engine.distributed import DistInfo
    from segkd.engine.trainer import Trainer
    from tests.test_train import bundle, cfg_for

    asked: list[int] = []

    class Asking(SupervisedTask):
        def find_unused_parameters(self, local_batch: int) -> bool:
            asked.append(local_batch)
            return local_batch == 1

    trainer = Trainer(Asking(create_model("segformer-b0", num_classes=2)), cfg_for(tmp_path, batch=4), bundle())
    assert not trainer.find_unused()
    trainer.info = DistInfo(world_size=4, enabled=True)  # what a 4-process run asks (nothing else reads it here)
    assert trainer.find_unused() and asked == [4, 1]

    class OldForm(SupervisedTask):  # the protocol's earlier plain attribute is still honoured
        find_unused_parameters = True  # type: ignore[assignment]

    assert Trainer(OldForm(create_model("segformer-b0", num_classes=2)), cfg_for(tmp_path), bundle()).find_unused()


# ------------------------------------------------------------------------------------------- interrupt, resume
def test_launch_command_names_torchrun_under_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    from segkd.engine.distributed import DistInfo, launch_command

    cmd = "segkd distill --method kd --resume runs/r"
    assert launch_command(cmd, DistInfo()) == cmd
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch_command(cmd, DistInfo(world_size=2, enabled=True)) == (
        "torchrun --nproc_per_node 2 -m segkd distill --method kd --resume runs/r")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch_command(cmd, DistInfo(rank=5, world_size=8, enabled=True)) == (
        "torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:PORT -m segkd distill "
        "--method kd --resume runs/r (on every node)")


def test_a_second_signal_stops_at_once_except_under_torchrun(tmp_path: Path) -> None:
    from segkd.engine.distributed import DistInfo
    from segkd.engine.task import SupervisedTask
    from segkd.engine.trainer import Trainer
    from tests.test_train import bundle, cfg_for

    trainer = Trainer(SupervisedTask(create_model("segformer-b0", num_classes=2)), cfg_for(tmp_path), bundle())
    for enabled in (False, True):
        trainer.info = DistInfo(world_size=2 if enabled else 1, enabled=enabled)  # only the handler reads it here
        trainer._stop_requested = False
        old = trainer._install_signals()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            assert trainer._stop_requested
            if enabled:  # torchrun forwards the Ctrl-C it got: the step still finishes and saves
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def test_throughput_after_a_resume_counts_the_resumed_iterations(tmp_path: Path) -> None:
    from segkd.cli import run_span
    from segkd.engine.trainer import TrainingInterrupted
    from segkd.runs.train import run_train
    from tests.test_train import bundle, cfg_for

    def ctrl_c(trainer, it: int) -> None:  # noqa: ANN001 - the trainer's callback signature
        if it == 4:
            os.kill(os.getpid(), signal.SIGINT)

    data = bundle()
    with pytest.raises(TrainingInterrupted) as e:
        run_train(cfg_for(tmp_path / "r"), callbacks=[ctrl_c], data=data)
    assert "continue with: segkd train --resume" in str(e.value) and not e.value.silent
    fresh = run_train(cfg_for(tmp_path / "f", iters=2), data=data)
    assert (fresh["resumed_from"], fresh["iterations_run"]) == (0, 2) and run_span(fresh) == "2 iterations"
    s = run_train(cfg_for(tmp_path / "r"), resume=tmp_path / "r", data=data)
    assert (s["iterations"], s["resumed_from"], s["iterations_run"]) == (6, 4, 2)
    # 2 steps of 2 images since the resume over this session's wall time (not 6 iterations' 12 images)
    assert s["img_s"] == pytest.approx(4 / s["wall_time_s"], rel=0.01, abs=0.01)
    assert run_span(s) == "iterations 5-6 of 6 (2 since the resume at 4)"


def test_torchrun_interrupt_is_one_line_from_rank_0_and_resumes(tmp_path: Path) -> None:
    """Two gloo processes under a real ``torchrun`` with a c10d rendezvous on localhost (what a multi-node launch
    uses, on one machine): Ctrl-C (SIGINT to torchrun's process group) prints one ``interrupted`` line, from rank 0,
    naming torchrun; the resumed run's throughput line counts the resumed iterations."""
    from segkd.data import synthesize
    from segkd.engine.state import load_resume
    from tests.test_train import _free_port

    data = synthesize(tmp_path / "data", n_train=8, n_val=2, size=(32, 48), num_classes=3, seed=0)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def torchrun(*args: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "-m", "segkd", "train",
                *args]

    first = torchrun("--model", "segformer-b0", "--data", str(data), "--out", str(out), "--iters", "500", "--batch",
                     "2", "--crop", "32x32", "--workers", "0", "--device", "cpu", "--no-progress", "--log-every", "1",
                     "--val-every", "500", "--threads", "1")
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(first, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while '"train"' not in ((out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""):
                assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    lines = [ln for ln in (tmp_path / "err").read_text().splitlines() if "interrupted" in ln]
    assert len(lines) == 1, lines
    k = load_resume(out)["iteration"]
    assert f"interrupted at iteration {k}/500" in lines[0] and lines[0].endswith(
        f"continue with: torchrun --nproc_per_node 2 -m segkd train --resume {out}")
    res = subprocess.run(torchrun("--resume", str(out), "--iters", str(k + 2)), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"iterations {k + 1}-{k + 2} of {k + 2} (2 since the resume at {k})" in res.stdout
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


def _shared_worker(rank: int, world: int, port: int, root: str) -> None:
    from segkd.engine.distributed import check_shared_dir, cleanup_distributed, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    info = init_distributed("cpu")
    out: dict[str, object] = {}
    try:
        check_shared_dir(Path(root) / "shared", info, "--out")  # one folder for both ranks: passes
        out["shared"] = sorted(p.name for p in (Path(root) / "shared").iterdir())  # the token is gone again
        try:  # a node-local folder: the same name, another directory on each "node"
            check_shared_dir(Path(root) / f"local{rank}", info, "--teacher-cache")
        except SegkdError as e:
            out["error"], out["silent"] = str(e), e.silent
    finally:
        cleanup_distributed(info)
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))


def test_every_rank_must_see_the_folders_rank_0_writes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.test_train import _free_port

    mp.start_processes(_shared_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["shared"] == r1["shared"] == []
    assert r1["error"] == r0["error"].replace("local0", "local1")  # each rank names the folder it was given
    assert (r0["silent"], r1["silent"]) == (False, True)  # rank 0 says it, once
    assert r0["error"].startswith(f"--teacher-cache {tmp_path / 'local0'}: not the same folder on every process "
                                  "(rank 1 on ") and "shared file system" in r0["error"]
