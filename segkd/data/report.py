"""Rich rendering of ``segkd data inspect``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def render_inspect(report: dict, console: Console) -> None:
    console.print(f"[bold]{report['root']}[/]: {report['format']} dataset, {report['num_classes']} classes, "
                  f"ignore {report['ignore_index']}")
    splits = report["splits"]
    table = Table(title="class pixel share (%)")
    table.add_column("class")
    for split, s in splits.items():
        table.add_column(f"{split} ({s['pairs']} images)", justify="right")
    for name in report["class_names"]:
        table.add_row(name, *(f"{s['class_share_pct'][name]:.2f}" for s in splits.values()))
    console.print(table)
    for split, s in splits.items():
        sizes = ", ".join(f"{k} x{v}" for k, v in list(s["sizes_hxw"].items())[:5])
        console.print(f"{split}: image sizes (HxW) {sizes}; ignore pixels {s['ignore_pixels']:,}")
    if report["problems"]:
        console.print(f"[red]{len(report['problems'])} problem(s):[/]")
        for p in report["problems"]:
            console.print(f"  {p}", highlight=False, soft_wrap=True)
    else:
        console.print("no problems found")
