"""The trainer: exact resume, NaN handling, checkpoints, LR schedule, accumulation, DDP (gloo), the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import Dataset

from segkd.engine.batch import Batch
from segkd.engine.config import TrainConfig
from segkd.engine.distributed import StepSampler
from segkd.engine.hooks import Checkpointing, Validation
from segkd.engine.schedule import apply_lr, lr_factor
from segkd.engine.state import load_resume
from segkd.engine.task import OptimConfig, Part, SupervisedTask, build_optimizer
from segkd.engine.trainer import DataBundle, NonFiniteLoss, Trainer, TrainingInterrupted
from segkd.errors import SegkdError
from segkd.models import SegModel
from segkd.models.loading import load_model, read_checkpoint
from segkd.runs.train import run_train

torch.set_num_threads(1)


class TinySeg(Dataset):
    """Deterministic in-memory images; label = sign of channel 0, with an ignored border row."""

    def __init__(self, n: int, size: int = 32, seed: int = 0, ignore: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        if ignore:
            self.y[:, :2] = 255

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def bundle(n_train: int = 6, n_val: int = 3, ignore: bool = True) -> DataBundle:
    return DataBundle(TinySeg(n_train, ignore=ignore), TinySeg(n_val, seed=1, ignore=ignore), 2, ["bg", "fg"],
                      [[0, 0, 0], [255, 255, 255]])


def cfg_for(out: Path, **kw) -> TrainConfig:
    base = dict(model="segformer-b0", out=str(out), iters=6, batch=2, val_every=3, log_every=1, workers=0,
                progress=False, device="cpu", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def tensors(path: Path) -> dict[str, Tensor]:
    return read_checkpoint(path)[0]


def assert_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------------- schedule
def test_optim_config_defaults_are_adamws() -> None:
    # one set of defaults: a bare OptimConfig is what --optimizer adamw without --lr/--wd/--head-lr-mult gives
    assert OptimConfig() == OptimConfig.make("adamw") and OptimConfig().head_lr_mult == 10.0
    assert OptimConfig.make("sgd").head_lr_mult == 1.0


def test_lr_schedule_warmup_then_poly_by_hand() -> None:
    # 10 iterations, 2 warm-up from ratio 0.1, then poly over the remaining 8
    f = [lr_factor(i, 10, warmup=2, power=1.0, warmup_ratio=0.1) for i in range(10)]
    assert f[0] == pytest.approx(0.1)
    assert f[1] == pytest.approx(0.1 + 0.9 * 0.5)
    assert f[2] == pytest.approx(1.0)
    assert f[6] == pytest.approx(1 - 4 / 8)
    assert f[9] == pytest.approx(1 - 7 / 8)
    assert lr_factor(6, 10, warmup=2, power=2.0) == pytest.approx(0.25)
    assert lr_factor(5, 10, warmup=0, power=0.9) == pytest.approx(0.5**0.9)
    with pytest.raises(SegkdError, match="--warmup"):
        lr_factor(0, 10, warmup=10)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
    part = Part(model, OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, head_lr_mult=10.0),
                list(model[1].parameters()))
    opt = build_optimizer(part)
    apply_lr([opt], 0.5)
    by_lr = sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    # body weight (decay) / body bias (no decay) at 0.05; head weight / head bias at 0.5
    assert by_lr == [(0.05, 0.0, 1), (0.05, 1e-4, 1), (0.5, 0.0, 1), (0.5, 1e-4, 1)]


def test_step_sampler_is_world_size_independent_and_resumable() -> None:
    one = list(StepSampler(10, 4, seed=5, epoch=2))
    assert len(one) == 8 and len(set(one)) == 8  # 2 full global batches, the last 2 images dropped
    r0 = list(StepSampler(10, 4, seed=5, epoch=2, rank=0, world_size=2))
    r1 = list(StepSampler(10, 4, seed=5, epoch=2, rank=1, world_size=2))
    assert r0 == one[0:2] + one[4:6] and r1 == one[2:4] + one[6:8]
    assert list(StepSampler(10, 4, seed=5, epoch=2, start_step=1)) == one[4:]
    assert list(StepSampler(10, 4, seed=5, epoch=3)) != one
    with pytest.raises(SegkdError, match="divisible"):
        StepSampler(10, 3, seed=0, epoch=0, world_size=2)


# ----------------------------------------------------------------------------------------------------- resume
def test_resume_after_interruption_is_bit_identical(tmp_path: Path) -> None:
    data = bundle()
    ref = run_train(cfg_for(tmp_path / "ref"), data=data)
    assert ref["iterations"] == 6

    # Ctrl-C (SIGINT) during iteration 4: the trainer finishes that step, saves, and stops
    def ctrl_c(trainer: Trainer, it: int) -> None:
        if it == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="interrupted at iteration 4/6.*--resume"):
        run_train(cfg_for(tmp_path / "int"), callbacks=[ctrl_c], data=data)
    assert load_resume(tmp_path / "int")["iteration"] == 4
    run_train(cfg_for(tmp_path / "int"), resume=tmp_path / "int", data=data)

    # a hard crash at iteration 5: the resume state from the last validation (iteration 3) is used
    def crash(trainer: Trainer, it: int) -> None:
        if it == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(cfg_for(tmp_path / "crash"), callbacks=[crash], data=data)
    assert load_resume(tmp_path / "crash")["iteration"] == 3
    run_train(cfg_for(tmp_path / "crash"), resume=tmp_path / "crash" / "resume.pt", data=data)

    for run in ("int", "crash"):
        assert_identical(tensors(tmp_path / "ref" / "last.safetensors"), tensors(tmp_path / run / "last.safetensors"))
        a, b = load_resume(tmp_path / "ref"), load_resume(tmp_path / run)
        assert_identical(a["parts"]["student"], b["parts"]["student"])
        assert a["optimizers"]["student"]["state"][0]["step"] == b["optimizers"]["student"]["state"][0]["step"]
        # the metrics log reads as one run: every iteration once, in order, same losses
        recs = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        ref_recs = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["type"] == "train"]
        assert [r["iter"] for r in train] == list(range(1, 7))
        assert [r["loss"] for r in train] == [r["loss"] for r in ref_recs if r["type"] == "train"]

    with pytest.raises(SegkdError, match="already finished"):
        run_train(cfg_for(tmp_path / "ref"), resume=tmp_path / "ref", data=data)
    with pytest.raises(SegkdError, match="holds a finished run; choose another --out"):
        run_train(cfg_for(tmp_path / "ref"), data=data)
    with pytest.raises(SegkdError, match="no resume state"):
        run_train(cfg_for(tmp_path / "x"), resume=tmp_path / "nowhere", data=data)


# -------------------------------------------------------------------------------------------------------- NaN
class NanAt(SupervisedTask):
    """Supervised task whose loss turns NaN at one iteration."""

    def __init__(self, model: SegModel, at: int) -> None:
        super().__init__(model, 255, 0.0, OptimConfig())
        self.calls, self.at = 0, at

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        self.calls += 1
        out = super().losses(batch)
        if self.calls == self.at:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_the_loop_runs_step_then_callbacks_log_validation_checkpoint(tmp_path: Path) -> None:
    from segkd.models import create_model

    torch.manual_seed(0)
    task = SupervisedTask(create_model("segformer-b0", num_classes=2), 255, 0.0, OptimConfig())
    trainer = Trainer(task, cfg_for(tmp_path, iters=5, val_every=2, log_every=2), bundle(), None,
                      callbacks=[lambda t, it: events.append(("callback", it))])
    events: list[tuple[str, int]] = []
    validation, ckpt = trainer.hook(Validation), trainer.hook(Checkpointing)
    real_validate, real_checkpoint, real_log = validation.validate, ckpt.checkpoint, trainer.log
    validation.validate = lambda t: events.append(("validate", t.iteration)) or real_validate(t)  # type: ignore
    ckpt.checkpoint = lambda t, r: events.append(("checkpoint", t.iteration)) or real_checkpoint(t, r)  # type: ignore
    trainer.log = lambda rec: (events.append((rec["type"], rec["iter"])) if rec["type"] != "val" else None,  # type: ignore
                               real_log(rec))
    summary = trainer.fit()
    expected = []
    for it in range(1, 6):
        expected.append(("callback", it))
        if it % 2 == 0 or it == 5:
            expected += [("train", it), ("validate", it), ("checkpoint", it)]
    assert events == expected
    assert summary["iterations"] == 5 and load_resume(tmp_path)["iteration"] == 5
    assert trainer.last_results["student"]["miou"] == summary["final"]["student"]["miou"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    from segkd.models import create_model

    torch.manual_seed(0)
    task = NanAt(create_model("segformer-b0", num_classes=2), at=3)
    cfg = cfg_for(tmp_path, val_every=2)
    trainer = Trainer(task, cfg, bundle(), None)
    written: list[dict[str, bytes]] = []  # the files as each checkpoint left them
    ckpt = trainer.hook(Checkpointing)
    real_checkpoint = ckpt.checkpoint

    def checkpoint(t: Trainer, results: dict) -> None:
        real_checkpoint(t, results)
        written.append({n: (tmp_path / n).read_bytes() for n in ("last.safetensors", "best.safetensors", "resume.pt")})

    ckpt.checkpoint = checkpoint  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLoss) as err:
        trainer.fit()
    msg = str(err.value)
    assert isinstance(err.value, SegkdError)  # the CLI prints it as its one `error:` line
    assert "\n" not in msg and msg.startswith("non-finite loss at iteration 3 (loss = nan")
    assert f"the last good checkpoint {tmp_path / 'last.safetensors'} is kept" in msg
    assert len(written) == 1 and all((tmp_path / n).read_bytes() == b for n, b in written[0].items())  # untouched
    good = tensors(tmp_path / "last.safetensors")
    assert all(bool(t.isfinite().all()) for t in good.values() if t.is_floating_point())
    assert read_checkpoint(tmp_path / "last.safetensors")[1].metrics["iteration"] == 2
    assert load_resume(tmp_path)["iteration"] == 2
    # the in-memory model was not stepped with the NaN gradient either
    assert all(bool(p.isfinite().all()) for p in task.model.parameters())
    log = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["type"] == "error" and log[-1]["iter"] == 3


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_round_trip_with_metadata(tmp_path: Path) -> None:
    summary = run_train(cfg_for(tmp_path, iters=4, val_every=2, model="deeplabv3-resnet18", batch=2), data=bundle())
    best_it = summary["best"]["student"]["iteration"]
    for kind in ("last", "best"):
        model = load_model(tmp_path / f"{kind}.safetensors")
        meta = model.segkd_meta
        assert meta.model == "deeplabv3-resnet18" and meta.num_classes == 2
        assert meta.class_names == ["bg", "fg"] and meta.palette == [[0, 0, 0], [255, 255, 255]]
        assert meta.ignore_index == 255 and len(meta.mean) == 3 and len(meta.std) == 3
        assert meta.args["iters"] == 4 and meta.args["model"] == "deeplabv3-resnet18"
        assert 0.0 <= meta.metrics["miou"] <= 1.0
        assert model.aux_classifier is None  # the training-only aux head is not deployed
        assert not any(k.startswith("aux_classifier") for k in tensors(tmp_path / f"{kind}.safetensors"))
    assert read_checkpoint(tmp_path / "best.safetensors")[1].metrics["iteration"] == best_it
    assert read_checkpoint(tmp_path / "last.safetensors")[1].metrics["iteration"] == 4
    # the aux loss was trained and logged
    train = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in train if r["type"] == "train")
    assert first["loss"] == pytest.approx(first["loss_ce"] + first["loss_aux"], rel=1e-5)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["batch"] == 2 and run["summary"]["iterations"] == 4


def test_amp_channels_last_and_clipping_on_cpu(tmp_path: Path) -> None:
    norms: list[float] = []

    def clipped_norm(trainer: Trainer, it: int) -> None:  # grads are still there after the step
        grads = [p.grad for p in trainer.task.model.parameters() if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))

    summary = run_train(cfg_for(tmp_path, iters=2, val_every=2, amp=True, channels_last=True, clip_grad=0.05),
                        callbacks=[clipped_norm], data=bundle())
    assert summary["iterations"] == 2 and (tmp_path / "last.safetensors").is_file()
    log = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    pre = [r["grad_norm"] for r in log if r["type"] == "train"]
    assert all(p > 0.05 for p in pre)  # the raw norms were above the threshold ...
    assert all(n <= 0.05 * 1.001 for n in norms)  # ... and the applied gradients were clipped to it


# ------------------------------------------------------------------------------------------------ accumulation
class Pixel(SegModel):
    """A 1x1-conv segmenter without BatchNorm or dropout: gradients are exact means over pixels."""

    def __init__(self, name: str = "pixel", num_classes: int = 2) -> None:
        super().__init__(name, num_classes)
        self.output_stride = 1
        self.body = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: Tensor, taps: bool = False) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


def _pixel_run(out: Path, batch: int, accum: int, info=None) -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = Pixel()
    task = SupervisedTask(model, 255, 0.0, OptimConfig(name="sgd", lr=0.5, weight_decay=0.0, momentum=0.0))
    cfg = cfg_for(out, iters=4, batch=batch, accum=accum, val_every=4)
    Trainer(task, cfg, bundle(n_train=8, ignore=False), info).fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_matches_the_big_batch(tmp_path: Path) -> None:
    big = _pixel_run(tmp_path / "big", batch=4, accum=1)
    acc = _pixel_run(tmp_path / "acc", batch=2, accum=2)
    small = _pixel_run(tmp_path / "small", batch=2, accum=1)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(small["head.weight"], big["head.weight"])
    log = [json.loads(x) for x in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from segkd.engine.distributed import cleanup_distributed, init_distributed

    root_p = Path(root)
    info = init_distributed("cpu")  # run_train joins this group and leaves it open
    # 1) segformer-b0 through run_train: the replicas must end identical, rank 0 writes the checkpoints
    captured: dict[str, Trainer] = {}
    run_train(cfg_for(root_p / "ddp", iters=3, batch=4, val_every=3, model="segformer-b0"),
              callbacks=[lambda t, it: captured.setdefault("t", t)], data=bundle(n_train=8, n_val=5))
    model = captured["t"].task.deploy_models()["student"]
    torch.save(model.state_dict(), root_p / f"replica{rank}.pt")
    # 2) a BatchNorm-free model: 2 processes x 2 images must equal 1 process x 4 images
    try:
        state = _pixel_run(root_p / "pixel_ddp", batch=4, accum=1, info=info)
    finally:
        cleanup_distributed(info)
    torch.save(state, root_p / f"pixel{rank}.pt")


def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    from segkd.engine.evaluate import evaluate
    from segkd.engine.inference import make_predictor

    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "replica0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "replica1.pt", weights_only=True)
    assert_identical(r0, r1)
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2
    ddp_miou = run["summary"]["final"]["student"]["miou"]
    assert run["summary"]["final"]["student"]["n_images"] == 5  # 3 + 2 shards, nothing counted twice
    # the same weights evaluated by one process on the whole val set give the same mIoU
    model = load_model(tmp_path / "ddp" / "last.safetensors")
    assert_identical({k: v for k, v in r0.items()}, model.state_dict())
    data = bundle(n_train=8, n_val=5)
    loader = torch.utils.data.DataLoader(data.val, batch_size=1)
    single = evaluate(make_predictor(model), loader, 2, 255, "cpu", progress=False)
    assert single.miou == ddp_miou
    # DDP gradient averaging equals the single-process big batch
    one = _pixel_run(tmp_path / "pixel_one", batch=4, accum=1)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"pixel{rank}.pt", weights_only=True)
        for k in one:
            torch.testing.assert_close(got[k], one[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SegkdError, match="unknown model 'segformer-b9'") as e:
        run_train(cfg_for(tmp_path / "a", model="segformer-b9"), data=bundle())
    assert "\n" not in str(e.value)
    with pytest.raises(SegkdError, match="--batch 2 is not divisible|fewer than --batch"):
        run_train(cfg_for(tmp_path / "b", batch=8), data=bundle())
    for kw, opt in ((dict(iters=0), "--iters"), (dict(accum=0), "--accum"), (dict(crop="12y"), "--crop"),
                    (dict(scale="2,1"), "--scale"), (dict(optimizer="adam"), "--optimizer"),
                    (dict(warmup=6), "--warmup"), (dict(clip_grad=0.0), "--clip-grad"),
                    (dict(device="tpu"), "--device")):
        with pytest.raises(SegkdError, match=opt):
            run_train(cfg_for(tmp_path / "c", **kw), data=bundle())


# ------------------------------------------------------------------------------------------------------- CLI
def _cli(args: list[str]):
    from typer.testing import CliRunner

    from segkd.cli import app

    return CliRunner().invoke(app, args)


def test_cli_unknown_model_is_one_line(tmp_path: Path) -> None:
    res = _cli(["train", "--model", "segformer-b9", "--out", str(tmp_path / "r"), "--iters", "2"])
    assert res.exit_code == 2 and res.output.count("\n") == 1  # a bad option value: a usage error, one line
    assert "unknown model 'segformer-b9'" in res.output
    res = _cli(["train", "--out", str(tmp_path / "r")])
    assert isinstance(res.exception, SegkdError) and "--model is required" in str(res.exception)
    assert not (tmp_path / "r").exists()


def test_cli_train_end_to_end_on_synth(tmp_path: Path) -> None:
    pytest.importorskip("segkd.data", reason="the data package (synth dataset) is not installed yet")
    out = tmp_path / "run"
    args = ["train", "--model", "segformer-b0", "--data", "synth", "--resize", "32x32", "--iters", "2",
            "--batch", "2", "--val-every", "2", "--workers", "0", "--no-progress", "--out", str(out), "--seed", "1"]
    res = _cli(args + ["--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["iterations"] == 2 and 0.0 <= summary["best"]["student"]["miou"] <= 1.0
    meta = load_model(out / "best.safetensors").segkd_meta
    assert meta.args["resize"] == "32x32" and meta.num_classes == len(meta.class_names)
    res = _cli(args)  # the same --out again: refused, nothing overwritten
    assert isinstance(res.exception, SegkdError) and "holds a finished run; choose another --out" in str(
        res.exception)
    res = _cli(["train", "--model", "segformer-b0", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "missing" in res.output  # a --data that does not exist is a usage error
    assert "\n" not in str(res.exception)
