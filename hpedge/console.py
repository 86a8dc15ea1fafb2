"""What the command line shows: progress of long steps (a live bar on a terminal, a plain log elsewhere) and the
tables of plans, package footprints, distillation memory and engines."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def progress(title: str) -> Iterator[Callable[[str, int, int], None]]:
    """``cb(what, done, total)`` for a long step: a live bar on a terminal; in a log (stderr not a TTY) one
    line per stage and about every 10 % of a long loop, each with the elapsed time."""
    if err_console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err_console, transient=True) as prog:
            task = prog.add_task(title, total=1)
            yield lambda what, k, n: prog.update(task, description=what, completed=k, total=n)
        return
    t0 = time.monotonic()
    last = {"what": None, "tenth": -1}

    def line(text: str) -> None:
        s = int(time.monotonic() - t0)
        print(f"[{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}] {text}", file=sys.stderr, flush=True)

    def cb(what: str, k: int, n: int) -> None:
        if last["what"] is None:  # the first report (a usage error before any work prints nothing)
            line(f"{title}: started")
        stage = what.split(": ", 1)[0]  # "distilling: loss 0.123" is one stage, however its details change
        tenth = int(10 * k / n) if n > 0 else 0
        if stage != last["what"]:
            line(f"{what} ({k}/{n})" if n > 1 else what)
            last.update(what=stage, tenth=tenth)
        elif n >= 10 and tenth > last["tenth"]:
            line(f"{what} {k}/{n} ({k / n:.0%})")
            last["tenth"] = tenth

    yield cb
    if last["what"] is not None:
        line(f"{title}: done")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def params(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def print_plan(p: Any) -> None:
    console.print(f"[bold]{p.family}[/] transformer, {p.num_blocks} blocks; protected: 0..{p.first_removable - 1}")
    console.print(f"remove ({len(p.remove)}): {p.remove}")
    console.print(f"keep   ({len(p.kept)}): {p.kept}")
    t = Table("", "before", "after", "change")
    t.add_row("parameters", params(p.params_before), params(p.params_after), f"{p.kept_ratio:.1%} kept")
    t.add_row("bf16 bytes", gb(p.bytes_bf16_before), gb(p.bytes_bf16_after),
              f"{p.bytes_bf16_after / p.bytes_bf16_before - 1:+.1%}")
    t.add_row("INT4 weights", "", gb(p.bytes_int4_after), f"{p.bytes_int4_after / p.bytes_bf16_before - 1:+.1%} vs bf16")
    console.print(t)
    if p.package_memory is not None:
        print_footprint(p.package_memory)
    for n in p.notes:
        console.print(f"note: {n}")


def print_footprint(fp: dict[str, Any]) -> None:
    t = Table(f"package on {fp['target']} ({fp['residency']}, {fp['resolution']} px, {fp['prompts']} image(s)"
              f"{', T5 dropped' if fp['drop_t5'] else ''})", "precision", "GB")
    for c, b in fp["weights"].items():
        t.add_row(c, fp["precisions"].get(c, ""), f"{b / 1e9:.2f}")
    for ph, b in fp["activations"].items():
        t.add_row(f"activations: {ph}", "fp16", f"{b / 1e9:.2f}")
    how = "all weights + the largest phase's activations" if fp["residency"] == "resident" else "the largest phase"
    t.add_row(f"[bold]needed[/] ({how})", "", f"{fp['need'] / 1e9:.2f}")
    t.add_row("available (memory less the profile's reserve)", "", f"{fp['capacity'] / 1e9:.2f}")
    console.print(t)


def print_precision_choice(choice: Any) -> None:
    """The engine precisions of a target with their footprints (:func:`hpedge.targets.footprint.choose_precision`)."""
    t = Table("engine precision", "transformer GB", "needed GB", "fits")
    for p, tr, need, fits in choice.rows():
        t.add_row(p + (" [bold](auto)[/]" if choice.order and p == choice.order[0] else ""), f"{tr:.2f}", f"{need:.2f}",
                  "yes" if fits else "no")
    console.print(t)
    console.print(choice.why + ("" if choice.order else "; none fits"))


def print_distill_memory(m: Any) -> None:
    """The table of :func:`hpedge.compress.memory.estimate_for`'s estimate."""
    gib = 2**30
    t = Table(f"distillation, per GPU ({m.mixed_precision}, {m.height} px, batch {m.batch_per_gpu} per GPU, "
              f"{m.text_tokens} text tokens)", "GiB")
    for k, v in m.rows.items():
        t.add_row(k, f"{v / gib:.2f}")
    t.add_row("activations", f"{m.activations / gib:.2f}")
    t.add_row("activations, --gradient-checkpointing", f"{m.activations_checkpointed / gib:.2f}")
    t.add_row("[bold]total[/]", f"{m.total(False) / gib:.2f}")
    t.add_row("[bold]total, --gradient-checkpointing[/]", f"{m.total(True) / gib:.2f}")
    console.print(t)
    console.print("note: text encoders and VAE leave the GPU while training (they encode the pool's prompts first); "
                  "under FSDP / ZeRO-3 the student, gradient and AdamW rows divide by the process count (the student "
                  "then in fp32 throughout); measured against this estimate: benchmarks/results/distill-memory.md")


def print_engines(e: dict[str, Any]) -> None:
    if e["status"] != "built":
        console.print(f"[yellow]notice:[/] engines {e['status']}: {e['reason']}")
        return
    caps = ", ".join("sm_" + c.replace(".", "") for c in e["compute_capabilities"])
    for name, c in e["components"].items():
        console.print(f"engine {name}: {c['library']} {c['version']} for {caps}, {c['engine_bytes'] / 1e6:.1f} MB "
                      f"(ONNX weights {c['onnx_weight_bytes'] / 1e6:.1f} MB), "
                      + ("from the engine cache" if c["cache"] == "hit" else f"built in {c['build_seconds']:.1f} s"))
    parity = e.get("parity", {})
    if parity and not parity.get("run"):
        console.print(f"engine parity: {parity['reason']}")
