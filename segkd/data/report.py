"""Rich rendering of ``segkd data inspect``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from segkd.textout import print_table


def render_inspect(report: dict, console: Console) -> None:
    """Header line, one table of class pixel shares per split, image sizes, then every problem."""
    given = ", ".join(f"{flag} {report[key]!r}" for flag, key in (("--img-suffix", "img_suffix"),
                                                                    ("--seg-suffix", "seg_suffix")) if report.get(key))
    console.print(f"[bold]{report['root']}[/]: {report['format']} dataset, {report['num_classes']} classes, "
                  f"ignore index {report['ignore_index']}" + (f", files named by {given}" if given else ""),
                  highlight=False)
    splits = report["splits"]
    if splits:
        table = Table(title="class pixel share (% of all pixels)")
        table.add_column("id", justify="right", no_wrap=True)
        table.add_column("class", no_wrap=True)  # what a row is about: never cut (the split columns wrap)
        for split, s in splits.items():
            table.add_column(f"{split} ({s['pairs']} images)", justify="right")
        for i, name in enumerate(report["class_names"]):
            table.add_row(str(i), name, *(f"{s['class_share_pct'][name]:.2f}" for s in splits.values()))
        table.add_row(str(report["ignore_index"]), "(ignore)",
                      *(f"{s['ignore_share_pct']:.2f}" for s in splits.values()), style="dim")
        print_table(console, table)
    for split, s in splits.items():
        shown = list(s["sizes_hxw"].items())
        sizes = ", ".join(f"{k} ({v})" for k, v in shown[:5]) + (f", +{len(shown) - 5} more" if len(shown) > 5 else "")
        paired = f" (labels named NAME{s['label_suffix']}.png)" if s.get("label_suffix") else ""
        console.print(f"{split}: {s['pairs']} pairs{paired}, image sizes HxW (count): {sizes or '-'}", highlight=False)
    if report["problems"]:
        console.print(f"[red]{len(report['problems'])} problem(s):[/]")
        for p in report["problems"]:
            console.print(f"  {p}", highlight=False, soft_wrap=True, markup=False)
    else:
        console.print("no problems found")
