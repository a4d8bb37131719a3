"""What the command line draws on the terminal: progress bars and per-trial lines."""

from __future__ import annotations

import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from landmark_cli.bench import passkey
from landmark_cli.bench.passkey_run import Listener, Trial


class ConsoleListener(Listener):
    """A progress bar over the tokens to read, on `console` (stderr), and a line per trial;
    only the lines (and reading progress once a minute) when it is not a terminal."""

    def __init__(self, console):
        self.c, self.tty = console, console.is_terminal
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[trial]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                            disable=not self.tty)

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    @staticmethod
    def _work(t: Trial, context: int) -> int:
        """Tokens a trial reads (about): the progress bar's unit."""
        if t.method == "truncate":
            return min(t.length, context)
        return t.length if t.method == "landmark" or t.length < context else 0

    def begin(self, pending: list[Trial], context: int, recorded: int) -> None:
        self.n, self.i, self.context, self.finished, self.in_prefix = len(pending), 0, context, 0, False
        self.task = self.bar.add_task("passkey", total=max(1, sum(self._work(t, context) for t in pending)), trial="")
        self.c.print(f"passkey: {self.n} trial{'s' * (self.n != 1)} to run"
                     + (f" ({recorded} already recorded)" if recorded else ""), highlight=False)

    def start(self, trial: Trial, tokens: int) -> None:
        self.i, self.trial, self.last, self.in_prefix = self.i + 1, trial, time.monotonic(), False
        self.bar.update(self.task, description=f"{passkey.length_label(trial.length)} {trial.method} seed {trial.seed}",
                        trial=f"trial {self.i}/{self.n}")

    def reading(self, done: int, total: int) -> None:
        if not self.in_prefix:
            self.bar.update(self.task, completed=self.finished + done / total * self._work(self.trial, self.context))
        if not self.tty and time.monotonic() - self.last > 60:
            self.last = time.monotonic()
            self.c.print(f"  reading {done:,}/{total:,} tokens", highlight=False)

    def prefix(self, length: int, tokens: int) -> None:
        self.in_prefix, self.last = True, time.monotonic()  # this reading is not part of the bar
        self.c.print(f"reading the filler-only prompt of {passkey.length_label(length)} ({tokens:,} tokens) once: "
                     "trials read from their needle on", highlight=False)

    def done(self, rec: dict) -> None:
        self.finished += self._work(self.trial, self.context)
        self.bar.update(self.task, completed=self.finished)
        head = f"[{self.i}/{self.n}] {passkey.length_label(rec['length'])} {rec['method']} seed {rec['seed']}:"
        if rec["error"]:
            line = f"{head} refused ({rec['error']})"
        else:
            line = (f"{head} {'correct' if rec['correct'] else 'WRONG'} (answer {rec['answer']!r}, expected "
                    f"{rec['expected']}), read {rec['read_tokens'] - rec['reused_tokens']:,} "
                    f"of {rec['read_tokens']:,} tokens "
                    f"in {rec['read_s']:.1f} s, "
                    f"answer {rec['answer_s']:.1f} s")
        self.c.print(line, highlight=False, markup=False, soft_wrap=True)
