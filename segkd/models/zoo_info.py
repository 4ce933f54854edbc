"""What ``segkd models`` shows: parameters, GMACs at a stated size and the feature taps of each zoo model."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from segkd.models import MODELS, count_params, create_model
from segkd.models.flops import count_flops
from segkd.shapes import check_min_size, model_stride, parse_hw
from segkd.textout import print_table


def describe_models(name: str | None, num_classes: int, size: str, flops: bool = True) -> list[dict]:

    h, w = parse_hw(size, "--size")
    names = [MODELS.canonical(name)] if name else MODELS.names()
    rows = []
    for n in names:
        model = create_model(n, num_classes=num_classes).eval().deploy_form()  # what is shipped: branches fused
        row = {
            "name": n,
            "family": MODELS.get(n).family,
            "summary": MODELS.get(n).summary,
            "params_m": round(count_params(model) / 1e6, 3),
            "output_stride": model.output_stride,
            "taps": [{"name": s.name, "kind": s.kind, "channels": s.channels, "stride": s.stride}
                     for s in model.feature_info],
            "aliases": sorted(a for a, c in MODELS.aliases().items() if c == n),
        }
        if flops:
            check_min_size((h, w), model_stride(model), "--size", n)
            row["gmacs"] = round(count_flops(model, (1, 3, h, w)).gmacs, 2)
        rows.append(row)
    return rows


def render_models(rows: list[dict], console: Console, size: str, num_classes: int) -> None:
    table = Table(title=f"segkd model zoo ({num_classes} classes; GMACs at 1x3x{size}, attention counted)")
    for col in ("model", "family", "params (M)", "GMACs", "out stride", "feature taps (channels@stride)"):
        table.add_column(col, justify="right" if col in ("params (M)", "GMACs", "out stride") else "left",
                         no_wrap=col == "model")  # a model name is what users copy: never cut it
    for r in rows:
        taps = " ".join(f"{t['name']}:{t['channels']}@{t['stride']}" for t in r["taps"])
        gmacs = f"{r['gmacs']:.2f}" if "gmacs" in r else "-"
        table.add_row(r["name"], r["family"], f"{r['params_m']:.2f}", gmacs, str(r["output_stride"]), taps)
    print_table(console, table)
    console.print("GMACs = multiply-adds (the SegFormer/mmseg papers' 'FLOPs'); FLOPs = 2 x GMACs. Params and GMACs "
                  "of reparameterisable encoders (MobileOne, RepViT, FastViT) are after fusion, as exported.")
    console.print("Students on any timm encoder with strides 4-32: lraspp-<encoder> or mlp-<encoder>, e.g. "
                  "lraspp-efficientnet_b0, mlp-fastvit_t8 (`segkd models NAME` shows one).", highlight=False)
