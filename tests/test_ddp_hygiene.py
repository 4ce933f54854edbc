"""DDP hygiene (issue 21 item 7): ``find_unused_parameters`` only where a real backward leaves a parameter out."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from segkd.engine.batch import Batch
from segkd.engine.task import OptimConfig, SupervisedTask
from segkd.errors import SegkdError
from segkd.methods import METHODS, make_options
from segkd.methods.task import assemble_task
from segkd.models import create_model

torch.set_num_threads(1)


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
