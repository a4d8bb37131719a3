"""The `landmark` command line: thin commands over the library, one error handler."""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from landmark_cli.errors import LandmarkError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ask questions about long documents with a LLaMA-family model and Landmark Attention.")
err = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option("-m", "--model", help="'default' (SmolLM2-135M-Instruct), a Hugging Face "
                                       "LLaMA-family directory, or a .gguf file")]
TopKOpt = Annotated[Optional[int], typer.Option("-k", "--top-k", help="blocks retrieved per layer and KV head at "
                                                 "each step (default 8; trained landmarks: 4, fewer if their "
                                                 "training context needs)", show_default=False)]
BlockOpt = Annotated[int, typer.Option("--block-size", help="tokens per landmark block")]
WindowOpt = Annotated[int, typer.Option("--window", help="local window: recent tokens always attended")]
SinkOpt = Annotated[int, typer.Option("--sink", help="initial tokens always attended")]
ChunkOpt = Annotated[int, typer.Option("--chunk", help="document tokens per reading step")]
DeviceOpt = Annotated[str, typer.Option("--device", help="where the model runs: auto (a CUDA GPU when there is "
                                        "one, else the CPU) | cpu | cuda | cuda:N")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="weights: auto (bfloat16 on a GPU, mixed on the CPU) | "
                                       "mixed (CPU: float32 activations; the matrices in bfloat16 for reading where "
                                       "faster, and for answering a GGUF model's own 4- and 8-bit groups, else "
                                       "float16) | float32 | bfloat16 | float16")]
KernelsOpt = Annotated[str, typer.Option("--kernels", help="auto (the Triton kernels on a GPU; on the CPU, "
                                         "answer steps in one native call where a C compiler builds it) | torch | "
                                         "triton")]


class RepChoice(str, Enum):
    mean = "mean"
    minmax = "minmax"


class SelectChoice(str, Enum):
    shared = "shared"
    layer = "layer"


class OrderChoice(str, Enum):
    best_last = "best-last"
    document = "document"


class PassagesChoice(str, Enum):
    cached = "cached"
    text = "text"


class KVDtypeChoice(str, Enum):
    int8 = "int8"
    float16 = "float16"
    float32 = "float32"


class LandmarksChoice(str, Enum):
    auto = "auto"
    trained = "trained"
    free = "free"


RepOpt = Annotated[RepChoice, typer.Option("--rep", help="block representative while reading: the mean key, or "
                                           "per-channel min/max bounds")]
LandmarksOpt = Annotated[LandmarksChoice, typer.Option("--landmarks", help="trained: the model's <landmark> "
                                                       "tokens; free: block representatives; auto: trained if the "
                                                       "model has a <landmark> token and mem_freq")]
SelectOpt = Annotated[SelectChoice, typer.Option("--select", help="answer-time block selection: shared (one set "
                                                 "chosen by a band of middle layers) or layer (per layer and KV "
                                                 "head)")]
AnswerWindowOpt = Annotated[Optional[int], typer.Option("--answer-window", help="tokens of the document's end "
                                                         "attended while answering (default 0; trained "
                                                         "landmarks: --window)", show_default=False)]
AnswerTopKOpt = Annotated[Optional[int], typer.Option("--answer-top-k", help="blocks retrieved while answering "
                                                      "(default: twice --top-k; trained landmarks: --top-k)",
                                                      show_default=False)]
PassagesOpt = Annotated[Optional[PassagesChoice], typer.Option("--passages", help="shared selection: the chosen "
                                                              "blocks attended as cached (default: their keys and "
                                                              "values as read in the document), or read again as "
                                                              "text before the question", show_default=False)]
KVDtypeOpt = Annotated[Optional[KVDtypeChoice], typer.Option("--kv-dtype", help="how the cache keeps keys and "
                                                             "values: int8 (a float16 scale per block, head and "
                                                             "channel; about half the bytes of float16), float16 or "
                                                             "float32 (default: int8)", show_default=False)]
OrderOpt = Annotated[OrderChoice, typer.Option("--order", help="shared selection: the retrieved passages best last "
                                               "(nearest the question) or in document order")]


@app.callback()
def _group() -> None:
    """Ask questions about long documents with a LLaMA-family model and Landmark Attention."""


def _settings(top_k, block, window, sink, chunk, rep=RepChoice.mean, select=SelectChoice.shared,
              landmarks=LandmarksChoice.auto, order=OrderChoice.best_last, answer_window=None, answer_top_k=None,
              passages=None, kv_dtype=None):
    """The options as Settings; None: the default (for the model's kind of landmark)."""
    from landmark_cli.retrieval.settings import Answering, Reading, Settings

    answer = {"window": answer_window, "top_k": answer_top_k}
    if passages is not None:
        answer["passages"] = passages.value
    read = {} if kv_dtype is None else {"kv_dtype": kv_dtype.value}
    try:
        return Settings(Reading(block=block, top_k=top_k, window=window, sink=sink, chunk=chunk, rep=rep.value, **read),
                        Answering(select=select.value, order=order.value, **answer), landmarks=landmarks.value)
    except ValueError as e:
        raise LandmarkError(str(e), "see the command's --help") from None


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed:,}/{task.total:,} tokens"),
                    TextColumn("{task.fields[rate]:,.0f} tok/s"), TimeRemainingColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


def _load(model: str, device: str = "auto", dtype: str = "auto", kernels: str = "auto", answers: bool = True):
    """Load --model on --device in --dtype, with --kernels; returns (LoadedModel, seconds).
    answers=False: the command only reads documents, so no answering copy of the weights."""
    from landmark_cli.model.device import check_kernels, resolve_device
    from landmark_cli.model.loading import load_in

    where = resolve_device(device)
    kernels = check_kernels(kernels, where)
    t0 = time.perf_counter()
    lm = load_in(model, dtype, where, progress=lambda s: err.print(f"[dim]{s}[/dim]"), answers=answers,
                 kernels=kernels)
    return lm, time.perf_counter() - t0


@app.command()
def ask(
    path: Annotated[str, typer.Argument(help="a PDF, .txt or .md file, or a folder indexed with `landmark index`")],
    question: Annotated[str, typer.Argument(help="the question to answer")],
    model: ModelOpt = "default",
    top_k: TopKOpt = None,
    block_size: BlockOpt = 32,
    window: WindowOpt = 1024,
    sink: SinkOpt = 64,
    chunk: ChunkOpt = 512,
    rep: RepOpt = RepChoice.mean,
    kv_dtype: KVDtypeOpt = None,
    select: SelectOpt = SelectChoice.shared,
    order: OrderOpt = OrderChoice.best_last,
    answer_window: AnswerWindowOpt = None,
    answer_top_k: AnswerTopKOpt = None,
    passages: PassagesOpt = None,
    landmarks: LandmarksOpt = LandmarksChoice.auto,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="most answer tokens to generate")] = 128,
    index_first: Annotated[bool, typer.Option("--index", help="PATH is a folder: index new and changed "
                                              "documents first")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    kernels: KernelsOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Answer QUESTION about the document (or indexed folder) at PATH, with its sources."""
    from pathlib import Path

    from landmark_cli.ask import ask as run_ask
    from landmark_cli.ask import ask_folder, check_question
    from landmark_cli.documents import find_documents, load_document

    check_question(question)
    settings = _settings(top_k, block_size, window, sink, chunk, rep, select, landmarks, order, answer_window,
                         answer_top_k, passages, kv_dtype)
    folder = Path(path).expanduser().is_dir()
    if folder:
        if not find_documents(path):  # fail fast, before loading the model
            raise LandmarkError(f"{path} is a directory with no PDF, .txt or .md files in it",
                                "pass a document, or a folder that contains documents")
    else:
        load_document(path)
    lm, load_s = _load(model, device, dtype, kernels)

    def on_token(text: str) -> None:
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()

    if folder:
        index_s = 0.0
        if index_first:
            t0 = time.perf_counter()
            _run_index(lm, settings, path, prune=False, quiet=True)
            index_s = time.perf_counter() - t0

        def left_out(states) -> None:
            names = ", ".join(f"{Path(s.path).name} ({s.state})" for s in states[:5])
            more = f" and {len(states) - 5} more" if len(states) > 5 else ""
            err.print(f"[yellow]Left out, not indexed as they are now:[/yellow] {names}{more}; "
                      f"run `landmark index {path}` to add them", highlight=False)

        result = ask_folder(lm, path, question, settings, max_new_tokens=max_tokens, on_token=on_token,
                            on_left_out=left_out, load_s=load_s, index_s=index_s)
    else:
        with _progress() as bar:
            task = bar.add_task("Reading document", total=None, rate=0.0)
            progress = _reporter(bar, task)

            def on_token_bar(text: str) -> None:
                bar.stop()
                on_token(text)

            result = run_ask(lm, path, question, settings, max_new_tokens=max_tokens, on_token=on_token_bar,
                             progress=progress, load_s=load_s,
                             on_damaged=lambda m: err.print(f"[yellow]Warning:[/yellow] {m}", highlight=False),
                             on_wait=lambda: err.print("Another landmark process is reading this document; "
                                                       "waiting..."))
    if as_json:
        print(json.dumps(result.as_json(), ensure_ascii=False))
        return
    sys.stdout.write("\n")
    if result.sources:
        out.print("\n[bold]Sources[/bold]")
        for s in result.sources:
            where = f"page {s.page}" if s.lines is None else f"lines {s.lines[0]}-{s.lines[1]}"
            if folder:
                where = f"{os.path.relpath(s.path, path)}, {where}"
            snippet = " ".join(s.text.split())
            out.print(f"  [cyan]{where}[/cyan] (block {s.block}, score {s.score:.3f}): "
                      f"[dim]{snippet[:160]}{'...' if len(snippet) > 160 else ''}[/dim]", highlight=False)
    t = result.timings
    what = (f"{result.documents} documents, {result.document_tokens:,} tokens" if folder else
            f"{result.document_tokens:,} document tokens ({'cached' if result.cached else 'read now'})")
    err.print(f"[dim]{what}, {result.retrieved_per_step:,} attended per step; load {t['load_s']:.1f}s, "
              f"read {t['index_s']:.1f}s, answer {t['answer_s']:.1f}s[/dim]")


def _reporter(bar: Progress, task):
    """A progress(done, total) callback for one document's tokens."""
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        bar.update(task, completed=done, total=total, rate=rate)
        if not err.is_terminal:
            err.print(f"reading: {done}/{total} tokens, {rate:.0f} tok/s")
    return progress


def _run_index(lm, settings, folder: str, prune: bool, quiet: bool = False):
    """Index `folder` with a progress display; returns the outcomes."""
    from landmark_cli.index import Indexer

    indexer = Indexer(lm, settings)
    tokens_done = 0
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        files = bar.add_task("Files", total=None, info="")
        doc = bar.add_task("", total=None, info="", visible=False)
        current_name, current_done = "", 0  # the file being read, its tokens read so far

        def on_start(path, i, n):
            nonlocal current_name, current_done
            current_name, current_done = path.name, 0
            bar.update(files, completed=i, total=n, info=f"{i}/{n} files")
            bar.reset(doc, total=None, description=path.name[:40], info="", visible=True)

        def progress(done, total):
            nonlocal current_done
            current_done = done
            rate = (tokens_done + done) / max(time.perf_counter() - started, 1e-9)
            bar.update(doc, completed=done, total=total, info=f"{done:,}/{total:,} tokens, {rate:,.0f} tok/s")
            if not err.is_terminal:
                err.print(f"{current_name}: {done}/{total} tokens, {rate:.0f} tok/s")

        def on_done(o):
            nonlocal tokens_done
            if o.state == "indexed":
                tokens_done += current_done
            bar.update(files, advance=1)
            if not quiet and not err.is_terminal:
                err.print(f"{o.state}: {o.path}" + (f" ({o.error})" if o.error else ""))

        outcomes = indexer.run(folder, prune=prune, on_start=on_start, progress=progress, on_done=on_done)
    return outcomes, tokens_done, time.perf_counter() - started


@app.command()
def index(
    folder: Annotated[str, typer.Argument(help="a folder: every PDF, .txt and .md file below it is indexed")],
    model: ModelOpt = "default",
    top_k: TopKOpt = None,
    block_size: BlockOpt = 32,
    window: WindowOpt = 1024,
    sink: SinkOpt = 64,
    chunk: ChunkOpt = 512,
    rep: RepOpt = RepChoice.mean,
    kv_dtype: KVDtypeOpt = None,
    landmarks: LandmarksOpt = LandmarksChoice.auto,
    status: Annotated[bool, typer.Option("--status", help="show what is indexed, stale, new or failed; "
                                         "read nothing")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="drop the caches of files that were deleted")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    kernels: KernelsOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Read every document below FOLDER into the cache, skipping those already indexed."""
    from rich.table import Table

    from landmark_cli.documents import find_documents
    from landmark_cli.index import Indexer

    settings = _settings(top_k, block_size, window, sink, chunk, rep, landmarks=landmarks, kv_dtype=kv_dtype)
    find_documents(folder)  # a missing folder fails before the model loads
    lm, _ = _load(model, device, dtype, kernels, answers=False)
    if status:
        states = Indexer(lm, settings).status(folder)
        if as_json:
            print(json.dumps({"folder": folder, "documents": [vars(s) for s in states]}, ensure_ascii=False))
            return
        table = Table("document", "state", "tokens", "cache", "note", title=f"Index of {folder}")
        for s in states:
            table.add_row(os.path.relpath(s.path, folder), s.state, f"{s.tokens:,}" if s.tokens else "",
                          f"{s.nbytes / 2**20:,.1f} MiB" if s.nbytes else "", s.error or s.note)
        out.print(table)
        counts = {k: sum(s.state == k for s in states) for k in ("ok", "stale", "new", "failed", "deleted")}
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no documents"
        out.print(f"{summary}; {sum(s.nbytes for s in states) / 2**20:,.1f} MiB cached", highlight=False)
        return
    outcomes, tokens, seconds = _run_index(lm, settings, folder, prune=prune)
    if as_json:
        print(json.dumps({"folder": folder, "tokens_read": tokens, "seconds": round(seconds, 3),
                          "documents": [vars(o) for o in outcomes]}, ensure_ascii=False))
        return
    table = Table("document", "result", "tokens", "time", "note", title=f"Indexed {folder}")
    for o in outcomes:
        style = {"failed": "red", "indexed": "green", "deleted": "yellow"}.get(o.state, "")
        table.add_row(os.path.relpath(o.path, folder), f"[{style}]{o.state}[/{style}]" if style else o.state,
                      f"{o.tokens:,}" if o.tokens else "", f"{o.seconds:.1f}s" if o.state == "indexed" else "",
                      o.error or o.note)
    out.print(table)
    counts = {k: sum(o.state == k for o in outcomes) for k in ("indexed", "skipped", "failed", "deleted", "pruned")}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    rate = f"; {tokens:,} tokens read at {tokens / seconds:,.0f} tok/s" if tokens else ""
    out.print(f"{summary}{rate}", highlight=False)
    if counts["deleted"]:
        out.print(f"Deleted files still have caches: run `landmark index {folder} --prune` to drop them.")


@app.command()
def passkey(
    lengths: Annotated[str, typer.Option("--lengths", help="prompt lengths in tokens of the model's tokenizer, "
                                         "comma-separated: 2k (= 2048), 32000, 1m")] = "2k,8k",
    trials: Annotated[int, typer.Option("--trials", help="prompts per length; trial i uses seed SEED + i")] = 5,
    methods: Annotated[str, typer.Option("--methods", help="comma-separated: landmark (block retrieval), full "
                                         "(full attention over the whole prompt), truncate (full attention over "
                                         "the last tokens that fit the model's context)")] = "landmark,full,truncate",
    top_k: TopKOpt = None,
    block_size: BlockOpt = 32,
    kv_dtype: KVDtypeOpt = None,
    landmarks: LandmarksOpt = LandmarksChoice.auto,
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    kernels: KernelsOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="seed of the first trial of each length")] = 0,
    json_file: Annotated[Optional[str], typer.Option("--json", help="results file, one record per trial; if it "
                                                     "exists, recorded trials are skipped and new ones added")] = None,
    plot_file: Annotated[Optional[str], typer.Option("--plot", help="PNG of accuracy versus length, one line per "
                                                     "method (needs matplotlib)")] = None,
):
    """The paper's passkey retrieval test: landmark retrieval vs. full attention vs. truncation."""
    from pathlib import Path

    from landmark_cli.bench import passkey as pk
    from landmark_cli.bench import passkey_run as grid_run
    from landmark_cli.retrieval.settings import Reading

    from .console import ConsoleListener

    grid = grid_run.Grid(pk.parse_lengths(lengths), trials, [m.strip() for m in methods.split(",") if m.strip()], seed)
    defaults = Reading()
    settings = _settings(top_k, block_size, defaults.window, defaults.sink, defaults.chunk, landmarks=landmarks,
                         kv_dtype=kv_dtype)
    if plot_file:
        pk.require_matplotlib()  # before hours of work, not after
    lm, _ = _load(model, device, dtype, kernels)
    results = grid_run.Results(Path(json_file) if json_file else None, grid_run.grid_meta(lm, settings),
                               lm.runtime())
    with ConsoleListener(err) as listener:
        records = grid_run.run_grid(lm, settings, grid, results, listener)
    title = f"Passkey retrieval: {lm.name} ({lm.model.cfg.context:,}-token context)"
    out.print(pk.table(records, title))
    if json_file:
        err.print(f"[dim]{len(records)} trials recorded in {json_file}[/dim]", highlight=False)
    if plot_file and records:
        pk.plot(records, plot_file, title, context=lm.model.cfg.context)
        err.print(f"[dim]plot saved to {plot_file}[/dim]", highlight=False)


@app.command()
def finetune(
    data: Annotated[str, typer.Option("--data", help="folder of PDF, .txt and .md files to train on")],
    out_dir: Annotated[str, typer.Option("--out", help="directory for the trained checkpoint (reference "
                                         "format; rewritten at every save, resumable)")],
    model: ModelOpt = "default",
    block_size: Annotated[int, typer.Option("--block-size", help="tokens per block: a <landmark> after each "
                                            "(the paper: 50)")] = 50,
    context: Annotated[int, typer.Option("--context", help="training context in tokens, landmarks "
                                         "included")] = 512,
    steps: Annotated[int, typer.Option("--steps", help="optimizer steps")] = 1000,
    batch: Annotated[int, typer.Option("--batch", help="sequences per micro-batch")] = 8,
    accum: Annotated[int, typer.Option("--accum", help="micro-batches per step (gradient accumulation)")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="peak learning rate (AdamW; warm-up, then cosine decay)")] = 3e-4,
    warmup: Annotated[int, typer.Option("--warmup", help="warm-up steps")] = 50,
    save_every: Annotated[int, typer.Option("--save-every", help="steps between checkpoints")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="random seed (data order)")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (a CUDA GPU when there is one) | cpu | cuda | cuda:N; "
                                        "on a GPU: bf16 autocast and the fused Triton kernel")] = "auto",
    restart: Annotated[bool, typer.Option("--restart", help="start from the base model even if OUT holds a "
                                          "run to resume")] = False,
    local_layers: Annotated[int, typer.Option("--local-layers", help="the first N layers read only their own "
                                              "block and --local-blocks before it, never retrieve (not in the "
                                              "paper; for small models trained from scratch: see README)")] = 0,
    local_blocks: Annotated[int, typer.Option("--local-blocks", help="earlier blocks a local layer reads: 1 (the "
                                              "one before its own) or 0 (its own block only, so that the next "
                                              "layer's landmarks must fetch even the previous block: see "
                                              "README)")] = 1,
    loss_on: Annotated[str, typer.Option("--loss-on", help="train only on the text after each occurrence of "
                                         "this marker up to the end of its line (and the end of the document "
                                         "where that line ends it), e.g. 'Answer:' for question-answer "
                                         "documents; default: every token (the paper)")] = "",
):
    """Fine-tune a LLaMA-family model with landmark tokens and the grouped softmax (the paper's recipe)."""
    from landmark_cli.training.finetune import TrainConfig
    from landmark_cli.training.finetune import finetune as run_finetune

    try:
        cfg = TrainConfig(block_size=block_size, context=context, steps=steps, batch=batch, accum=accum, lr=lr,
                          warmup=warmup, save_every=save_every, seed=seed, local_layers=local_layers,
                          local_blocks=local_blocks, loss_on=loss_on)
    except ValueError as e:
        raise LandmarkError(str(e), "see landmark finetune --help") from None
    with Progress(TextColumn("[bold]Training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("", total=steps, info="")

        def on_step(i) -> None:
            info = f"loss {i.loss:.3f}, lr {i.lr:.1e}, {i.tokens_per_s:,.0f} tok/s"
            bar.update(task, completed=i.step, info=info)
            if not err.is_terminal and (i.step % 10 == 0 or i.step == i.steps):
                err.print(f"step {i.step}/{i.steps}: {info}", highlight=False)

        r = run_finetune(model, data, out_dir, cfg, device=device, restart=restart, on_step=on_step,
                         progress=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
    out.print(f"Trained {r['steps']} steps in {r['seconds']:,.0f}s; loss {r['first_loss']:.3f} -> "
              f"{r['last_loss']:.3f}; checkpoint in {r['out']} (ask with `landmark ask FILE QUESTION --model "
              f"{r['out']}`)", highlight=False, soft_wrap=True)


def _size(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


@app.command()
def recover(
    base: Annotated[str, typer.Option("--base", help="the original LLaMA-7B in Hugging Face format "
                                      "(safetensors weights)")],
    diff: Annotated[str, typer.Option("--diff", help="the weight diff (epfml/landmark-attention-llama7b-wdiff, "
                                      "as safetensors)")],
    out_dir: Annotated[str, typer.Option("--out", help="directory to write the recovered model to (must not "
                                         "exist)")],
    dtype: Annotated[str, typer.Option("--dtype", help="of the written weights: float32 (the diff's, "
                                       "lossless) | float16 | bfloat16 (half the size)")] = "float32",
    no_check: Annotated[bool, typer.Option("--no-check", help="skip the passkey test of the recovered "
                                           "model (2 trials at 2k tokens)")] = False,
):
    """Rebuild the Landmark Attention paper's fine-tuned LLaMA-7B from LLaMA and the released weight diff."""
    from landmark_cli.bench.passkey_run import passkey_check
    from landmark_cli.cli.console import ConsoleListener
    from landmark_cli.training.recover import recover as run_recover

    started = time.perf_counter()
    with Progress(TextColumn("[bold]Recovering"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("", total=None, info="")
        shown = {"pct": -10}

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, info=f"{_size(done)}/{_size(total)} {name}")
            pct = 100 * done // max(total, 1)
            if not err.is_terminal and (pct >= shown["pct"] + 10 or done == total):  # a line per 10%
                shown["pct"] = pct
                err.print(f"recovering: {pct}% ({_size(done)}/{_size(total)})", highlight=False)

        r = run_recover(base, diff, out_dir, dtype=dtype, progress=progress,
                        warn=lambda m: err.print(f"[yellow]Warning:[/yellow] {m}", highlight=False))
    check = (f"checksum {r.checksum_got:.4f} matches {r.checksum_expected:.4f}" if r.checksum_expected is not None
             else "no checksum to compare with")
    out.print(f"Recovered {r.tensors} tensors ({_size(r.bytes)}, {r.dtype}) into {r.out} in "
              f"{time.perf_counter() - started:,.0f}s; {check}; <landmark> = {r.mem_id}",
              highlight=False, soft_wrap=True)
    if no_check:
        return
    with ConsoleListener(err) as listener:
        correct, trials = passkey_check(r.out, listener=listener, progress=lambda s: err.print(f"[dim]{s}[/dim]"))
    if correct == trials:
        out.print(f"Passkey check: {correct}/{trials} correct at 2k tokens", highlight=False, soft_wrap=True)
    else:
        err.print(f"[yellow]Warning:[/yellow] passkey check: {correct}/{trials} correct at 2k tokens; the model "
                  f"was written, but may not be the paper's (try `landmark passkey --model {r.out}`)", highlight=False,
                  soft_wrap=True)


cache_app = typer.Typer(no_args_is_help=True, help="See and trim the KV cache (LANDMARK_HOME/store).")
app.add_typer(cache_app, name="cache")


def _cache_root():
    from landmark_cli.paths import home

    return home() / "store"


@cache_app.command("list")
def cache_list(as_json: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False):
    """Every cached reading: its document, model, tokens, size, last use, and whether it is intact or in use."""
    from rich.table import Table

    from landmark_cli.storage import cache

    listed = cache.entries(_cache_root())
    if as_json:
        print(json.dumps({"entries": [c.as_json() for c in listed], "bytes": sum(c.bytes for c in listed)}))
        return
    table = Table(title=f"{_cache_root()}: {len(listed)} entries, {_size(sum(c.bytes for c in listed))}")
    for column in ("document", "model", "tokens", "KV", "size", "last used", "state"):
        table.add_column(column)
    for c in listed:
        state = "damaged" if not c.intact else "in use" if c.in_use else "ok"
        table.add_row(c.source or "?", c.model or "?", f"{c.tokens:,}" if c.tokens else "?",
                      str(c.settings.get("kv_dtype", "?")), _size(c.bytes),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(c.last_used)), state)
    out.print(table)


@cache_app.command("prune")
def cache_prune(max_size: Annotated[str, typer.Option("--max-size", help="keep at most this much, e.g. 20G; "
                                                      "least recently used entries go first")]):
    """Remove the least recently used cached readings until the cache fits --max-size."""
    from landmark_cli.storage import cache

    removed = cache.prune(_cache_root(), cache.parse_size(max_size))
    left = cache.entries(_cache_root())
    out.print(f"Removed {len(removed)} entries ({_size(sum(c.bytes for c in removed))}); "
              f"{len(left)} left ({_size(sum(c.bytes for c in left))})", highlight=False)


@cache_app.command("clear")
def cache_clear():
    """Remove every cached reading that no running landmark process is using."""
    from landmark_cli.storage import cache

    removed, kept = cache.clear(_cache_root())
    out.print(f"Removed {len(removed)} entries ({_size(sum(c.bytes for c in removed))})"
              + (f"; {len(kept)} in use by another process kept" if kept else ""), highlight=False)


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
