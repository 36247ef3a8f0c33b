"""`ember recommend` for people: the machine, one row per quantization, then the advice with its reasons."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ember.bench.hardware import GB

PLACES = {"gpu": "GPU", "gpu+ram": "GPU+RAM split", "ram": "RAM", None: "no"}


def _machine(record: dict) -> str:
    hw, bandwidth, budget = record["hardware"], record["bandwidth"], record["budget"]
    gpus = ", ".join(f"{g['name']} {g['memory_bytes'] / GB:.0f} GB" for g in hw["gpus"]) or "none"
    limit = f" (container limit {hw['memory_limit_bytes'] / GB:.1f} GB)" if hw["memory_limit_bytes"] else ""
    lines = [
        f"CPU     {hw['cpu_model']}, {hw['physical_cores']} cores / {hw['logical_cores']} threads, "
        f"{' '.join(hw['cpu_features']) or 'no SIMD extensions found'}",
        f"RAM     {hw['ram_bytes'] / GB:.1f} GB{limit}, usable for a model {budget['ram_bytes'] / GB:.1f} GB, "
        f"{bandwidth['ram']['bytes_per_s'] / GB:.0f} GB/s {bandwidth['ram']['source']}",
        f"GPU     {gpus}",
    ]
    if hw["gpus"]:
        lines.append(f"        usable for a model {budget['gpu_bytes'] / GB:.1f} GB, "
                     f"{bandwidth['gpu']['bytes_per_s'] / GB:.0f} GB/s {bandwidth['gpu']['source']}")
    return "\n".join(lines)


def options_table(record: dict) -> Table:
    model = record["model"]
    params = model["params"]
    size = f"{params / 1e9:.1f} B" if params >= 1e9 else f"{params / 1e6:.0f} M"
    table = Table(title=f"{model['name']} · {size} parameters · {record['context']} tokens of context",
                  caption=f"KV: one sequence at {record['context']} tokens · tok/s: the memory-bandwidth bound "
                          "(engines reach 50–80 % of it) · seqs: full-context sequences the memory left holds"
                          + (" · *: the file's own size" if any(o["from_file"] for o in record["options"]) else ""))
    for header in ("quant", "weights GB", "KV GB", "total GB", "fits", "tok/s ≲", "seqs"):
        table.add_column(header, justify="left" if header in ("quant", "fits") else "right")
    for o in record["options"]:
        speed = f"{o['decode_tokens_per_s']:.1f}" if o["decode_tokens_per_s"] else "-"
        place = PLACES[o["placement"]]
        if o["placement"] == "gpu+ram":
            place += f" ({o['gpu_share']:.0%} on GPU)"
        table.add_row(
            o["quant"] + ("*" if o["from_file"] else ""), f"{o['weights_bytes'] / GB:.2f}",
            f"{o['kv_bytes'] / GB:.2f}", f"{o['total_bytes'] / GB:.2f}", place, speed,
            str(o["sequences"]) if o["placement"] else "-",
            style="bold green" if o["quant"] == record["choice"] else ("dim" if not o["placement"] else None),
        )
    return table


def render(console: Console, record: dict) -> None:
    console.print(_machine(record), highlight=False)
    console.print()
    console.print(options_table(record))
    console.print()
    for note in record["notes"]:
        console.print(f"[yellow]![/] {note}", highlight=False)
    if record["choice"] is None:
        first, *suggestions = record["choice_reasons"]
        console.print(f"[bold red]✗[/] {first}", highlight=False)
        for suggestion in suggestions:
            console.print(f"→ {suggestion}", highlight=False, soft_wrap=True)
        return
    advice = record["advice"]
    console.print(f"[bold]For {record['use']}: {record['choice']} with {advice['engine']}[/]")
    console.print(f"  [cyan]{advice['command']}[/]", highlight=False, soft_wrap=True)
    for reason in record["choice_reasons"] + advice["reasons"]:
        console.print(f"  • {reason}", highlight=False)
    if advice["alternatives"]:
        console.print("  Alternatives:")
        for alternative in advice["alternatives"]:
            console.print(f"  - {alternative}", highlight=False, soft_wrap=True)
    console.print("  See docs/choosing.md for the reasoning.", style="dim")
