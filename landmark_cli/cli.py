"""The `landmark` command line: thin commands over the library, one error handler."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import LandmarkError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ask questions about long documents with a LLaMA-family model and Landmark Attention.")
err = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option("-m", "--model", help="'default' (SmolLM2-135M-Instruct), a Hugging Face "
                                       "LLaMA-family directory, or a .gguf file")]
TopKOpt = Annotated[int, typer.Option("-k", "--top-k", help="blocks retrieved per layer and KV head at each step")]
BlockOpt = Annotated[int, typer.Option("--block-size", help="tokens per landmark block")]
WindowOpt = Annotated[int, typer.Option("--window", help="local window: recent tokens always attended")]
SinkOpt = Annotated[int, typer.Option("--sink", help="initial tokens always attended")]
ChunkOpt = Annotated[int, typer.Option("--chunk", help="document tokens per reading step")]
RepOpt = Annotated[str, typer.Option("--rep", help="block representative while reading: mean | minmax")]
SelectOpt = Annotated[str, typer.Option("--select", help="answer-time block selection: shared (one set chosen "
                                        "by a band of middle layers) | layer (per layer and KV head)")]


@app.callback()
def _group() -> None:
    """Ask questions about long documents with a LLaMA-family model and Landmark Attention."""


def _settings(top_k, block, window, sink, chunk, rep, select):
    from .engine import Settings

    try:
        return Settings(block=block, top_k=top_k, window=window, sink=sink, chunk=chunk, rep=rep, select=select)
    except ValueError as e:
        raise LandmarkError(str(e), "see landmark ask --help") from None


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed:,}/{task.total:,} tokens"),
                    TextColumn("{task.fields[rate]:,.0f} tok/s"), TimeRemainingColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


@app.command()
def ask(
    path: Annotated[str, typer.Argument(help="a PDF, .txt or .md file")],
    question: Annotated[str, typer.Argument(help="the question to answer")],
    model: ModelOpt = "default",
    top_k: TopKOpt = 8,
    block_size: BlockOpt = 32,
    window: WindowOpt = 1024,
    sink: SinkOpt = 64,
    chunk: ChunkOpt = 512,
    rep: RepOpt = "mean",
    select: SelectOpt = "shared",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="most answer tokens to generate")] = 128,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Answer QUESTION about the document at PATH, with its sources."""
    from .ask import ask as run_ask
    from .documents import load_document
    from .models import load_model

    settings = _settings(top_k, block_size, window, sink, chunk, rep, select)
    load_document(path)  # fail fast on a bad document, before loading the model
    t0 = time.perf_counter()
    lm = load_model(model, progress=lambda s: err.print(f"[dim]{s}[/dim]"))
    load_s = time.perf_counter() - t0

    with _progress() as bar:
        task = bar.add_task("Reading document", total=None, rate=0.0)
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=done, total=total, rate=rate)
            if not err.is_terminal:
                err.print(f"reading: {done}/{total} tokens, {rate:.0f} tok/s")

        def on_token(text: str) -> None:
            if not as_json:
                bar.stop()
                sys.stdout.write(text)
                sys.stdout.flush()

        result = run_ask(lm, path, question, settings, max_new_tokens=max_tokens, on_token=on_token,
                         progress=progress, load_s=load_s,
                         on_wait=lambda: err.print("Another landmark process is reading this document; waiting..."))
    if as_json:
        print(json.dumps(result.as_json(), ensure_ascii=False))
        return
    sys.stdout.write("\n")
    if result.sources:
        out.print("\n[bold]Sources[/bold]")
        for s in result.sources:
            where = f"page {s.page}" if s.page is not None else f"lines {s.lines[0]}-{s.lines[1]}"
            snippet = " ".join(s.text.split())
            out.print(f"  [cyan]{where}[/cyan] (block {s.block}, score {s.score:.3f}): "
                      f"[dim]{snippet[:160]}{'...' if len(snippet) > 160 else ''}[/dim]", highlight=False)
    t = result.timings
    err.print(f"[dim]{result.document_tokens:,} document tokens ({'cached' if result.cached else 'read now'}), "
              f"{result.retrieved_per_step:,} attended per step; load {t['load_s']:.1f}s, "
              f"read {t['index_s']:.1f}s, answer {t['answer_s']:.1f}s[/dim]")


def main() -> None:
    """Entry point: run the app, turning domain errors and Ctrl-C into one-line messages."""
    try:
        app(standalone_mode=False)
    except LandmarkError as e:
        err.print(f"[bold red]Error:[/bold red] {e.message}", highlight=False, soft_wrap=True, markup=True)
        if e.hint:
            err.print(f"  {e.hint}", highlight=False, soft_wrap=True, markup=False)
        if os.environ.get("LANDMARK_DEBUG"):
            raise
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("Interrupted: nothing partial was saved; run the command again to resume.")
        sys.exit(130)
    except Exception as e:  # usage errors of (typer's own copy of) click, and --help's exit
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ in ("Exit", "Abort"):
            sys.exit(getattr(e, "exit_code", 130))
        raise


if __name__ == "__main__":
    main()
