"""The demo's one progress display across its phases (synth, build, training stages, evaluation)."""

from __future__ import annotations

from rich.console import Console

__all__ = ["PipelineProgress"]


class PipelineProgress:
    """The demo's one progress display: an overall bar across all phases and a bar for the phase under way.

    Phases are ``{name: steps}``; :meth:`update` takes ``(phase, done, total)``, the signature of the ``progress``
    callbacks of :func:`medvlp.train.run.train` and (bound to a phase) of ``build_cohort``'s ``on_progress``. When
    a phase ends, a line ``[k/N] phase: ...`` is printed above the display (on a terminal or not).
    """

    def __init__(self, phases: dict[str, int], console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

        self.phases, self.console = {k: max(1, int(v)) for k, v in phases.items()}, console
        self.done = dict.fromkeys(self.phases, 0)
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.overall = self.progress.add_task("pipeline", total=sum(self.phases.values()))
        self.current: str | None = None
        self.task: TaskID | None = None  # the bar of the phase under way

    def __enter__(self) -> PipelineProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, phase: str) -> None:
        """Begin a phase (the previous one, if any, is finished first)."""
        import time

        if self.current is not None:
            self.finish()
        self.current, self.t0 = phase, time.perf_counter()
        k = list(self.phases).index(phase) + 1
        self.task = self.progress.add_task(f"[{k}/{len(self.phases)}] {phase}", total=self.phases[phase])

    def update(self, phase: str, done: int, total: int) -> None:
        """A callback: ``done`` of ``total`` steps of ``phase``, rescaled to the phase's planned steps."""
        if phase != self.current or total <= 0:
            return  # e.g. a cache build with nothing left to do, inside training
        steps = round(self.phases[phase] * min(done, total) / total)
        self._set(steps)

    def _set(self, steps: int) -> None:
        assert self.current is not None and self.task is not None
        self.done[self.current] = steps
        self.progress.update(self.task, completed=steps)
        self.progress.update(self.overall, completed=sum(self.done.values()))

    def finish(self, note: str = "") -> None:
        """Mark the current phase complete and print its line."""
        import time

        if self.current is None:
            return
        assert self.task is not None
        self._set(self.phases[self.current])
        self.progress.remove_task(self.task)
        k = list(self.phases).index(self.current) + 1
        seconds = time.perf_counter() - self.t0
        self.progress.console.print(
            f"[{k}/{len(self.phases)}] {self.current}: {note or 'done'} ({seconds:.1f} s)",
            highlight=False,
            soft_wrap=True,
        )
        self.current = self.task = None
