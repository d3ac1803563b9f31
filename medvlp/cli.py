"""The `medvlp` command line: a thin layer over the library."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

app = typer.Typer(
    name="medvlp",
    help="Medical vision-language models from a cohort of images, reports and outcomes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
cohort_app = typer.Typer(help="Make, check and build cohorts.", no_args_is_help=True)
app.add_typer(cohort_app, name="cohort")
console = Console(stderr=True)

KINDS = ("cxr", "ct")


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for h in logging.root.handlers:  # the console shows warnings; library loggers may still feed their own files
        h.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _recipe(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
        syn = raw["synthetic"]
        return {"kind": str(syn["kind"]), "n": int(syn.get("n", 500)), "seed": int(syn.get("seed", 0))}
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        _fail(f"{path}: not a synthetic cohort recipe (expects `synthetic: {{kind: cxr|ct, n: N, seed: S}}`): {exc}")
        raise  # unreachable


@cohort_app.command("synth")
def cohort_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the cohort into.")],
    kind: Annotated[str | None, typer.Option(help="cxr (2D chest radiographs) or ct (3D abdominal CT).")] = None,
    n: Annotated[int, typer.Option(help="Number of studies.", min=1)] = 500,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    recipe: Annotated[Path | None, typer.Option(help="A recipe such as cohorts/synthetic-cxr.yaml.")] = None,
) -> None:
    """Write a built-in synthetic cohort (real DICOM files, manifest, reports, boxes, survival)."""
    from medvlp.data.synthetic import synthesize

    if recipe is not None:
        r = _recipe(recipe)
        kind, n, seed = r["kind"], r["n"], r["seed"]
    if kind not in KINDS:
        _fail(f"--kind must be one of {', '.join(KINDS)} (or give --recipe), got {kind!r}")
    path = synthesize(kind, n, out, seed=seed)
    console.print(f"wrote {n} synthetic {kind} studies: [bold]{path}[/]")


@cohort_app.command("validate")
def cohort_validate(cohort: Annotated[Path, typer.Argument(help="The cohort YAML.")]) -> None:
    """Check a cohort (YAML, manifest, grounding, files present, reports not empty) without building it."""
    from medvlp.data.cohort import CohortError, load_cohort
    from medvlp.data.validate import record_problems

    try:
        c = load_cohort(cohort)
    except CohortError as exc:
        _fail(str(exc))
        return
    problems = record_problems(c)
    splits = c.manifest["split"].value_counts().to_dict()
    console.print(
        f"{cohort}: {len(c.manifest)} studies {splits}, {len(c.grounding)} phrase boxes, "
        f"findings: {', '.join(c.findings) or 'none'}"
    )
    for study_id, reason in problems:
        console.print(f"  would quarantine {study_id}: {reason}", highlight=False)
    console.print(f"[green]valid[/]: {len(c.manifest) - len(problems)} usable, {len(problems)} would be quarantined")


@cohort_app.command("build")
def cohort_build(
    cohort: Annotated[Path, typer.Argument(help="The cohort YAML.")],
    out: Annotated[Path, typer.Option(help="Cache folder to write (resumable).")],
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: CPU count, at most 8).")] = None,
) -> None:
    """Decode, preprocess and cache every record; bad records go to quarantine.csv."""
    from medvlp.data.build import build_cohort
    from medvlp.data.cohort import CohortError

    try:
        s = build_cohort(cohort, out, workers=workers)
    except (CohortError, RuntimeError) as exc:
        _fail(str(exc))
        return
    console.print(
        f"built {out}: {s.ingested} ingested ({s.reused} reused), {s.quarantined} quarantined in {s.seconds:.1f} s"
    )
    if s.quarantined:
        console.print(f"  reasons in {out / 'quarantine.csv'}")


def _not_yet(what: str, issue: str) -> None:
    _fail(f"`medvlp {what}` is not available yet ({issue}).", code=3)


@app.command()
def train(
    cohort: Annotated[Path, typer.Option(help="The cohort YAML.")],
    out: Annotated[Path, typer.Option(help="Run folder (config, logs, checkpoints, model).")],
    config: Annotated[Path | None, typer.Option(help="Training config YAML, e.g. configs/demo-2d.yaml.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config value: --set stages.stage2-align.lr=1e-4")
    ] = None,
    stages: Annotated[
        str | None, typer.Option(help="Comma-separated subset of stage1-text,stage1-image,stage2-align.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoints.")] = False,
    cache: Annotated[Path | None, typer.Option(help="Cohort cache folder (default: beside the cohort).")] = None,
) -> None:
    """Two-stage pretraining: stage1-text, stage1-image, then stage2-align. Also runs under torchrun."""
    import sys

    from medvlp.config import ConfigError, load_config
    from medvlp.data.cohort import CohortError
    from medvlp.train.run import train as run_train

    try:
        cfg = load_config(config, set_ or [])
        chosen = [s.strip() for s in stages.split(",")] if stages else None
        results = run_train(cfg, cohort, out, stages=chosen, resume=resume, cache_dir=cache, command=sys.argv)
    except (ConfigError, CohortError, ValueError) as exc:
        _fail(str(exc))
        return
    for name, r in results.items():
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        console.print(f"{name}: {r['steps']} steps, final loss {loss}")
    console.print(f"model: [bold]{out / 'stage2-align' / 'model'}[/]")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="A run folder or a model folder.")],
    cohort: Annotated[Path, typer.Option(help="The cohort YAML (its test split is used).")],
    out: Annotated[Path, typer.Option(help="Card folder: metrics.json, model_card.md, plots.")],
    baseline: Annotated[bool, typer.Option(help="Also evaluate the untrained and align-only baselines.")] = False,
    cache: Annotated[Path | None, typer.Option(help="Cohort cache folder (default: beside the cohort).")] = None,
) -> None:
    """Zero-shot, grounding, retrieval, survival and probes on the test split; writes a model card."""
    from medvlp.card import HEADLINE, get
    from medvlp.data.cohort import CohortError
    from medvlp.evaluate import evaluate as run_evaluate

    try:
        metrics = run_evaluate(model, cohort, out, baselines=baseline, cache_dir=cache)
    except (CohortError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    for label, path in HEADLINE:
        v = get(metrics, path)
        console.print(f"  {label}: {'-' if v is None else f'{v:.3f}'}")
    console.print(f"card: [bold]{out / 'model_card.md'}[/]")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve() -> None:
    """The zero-shot diagnosis HTTP API and viewer."""
    _not_yet("serve", "the API is being built")


def shipped_config(name: str) -> Path:
    """A config shipped in the repository's ``configs/`` folder (``demo-2d``, ``tiny-3d``, ...)."""
    import medvlp

    path = Path(medvlp.__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    if not path.is_file():
        _fail(f"shipped config {name!r} not found at {path}: run from a source checkout (pip install -e .)")
    return path


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's cohort, cache and run.")] = Path("demo-out"),
    kind: Annotated[str, typer.Option(help="cxr (2D radiographs) or ct (3D CT).")] = "cxr",
    n: Annotated[int, typer.Option(help="Number of synthetic studies.", min=20)] = 500,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    config: Annotated[Path | None, typer.Option(help="Training config (default configs/demo-2d or demo-3d).")] = None,
) -> None:
    """The whole pipeline on a built-in synthetic cohort: cohort, cache, both training stages, evaluation."""
    from medvlp.config import load_config
    from medvlp.data.build import build_cohort
    from medvlp.data.synthetic import synthesize
    from medvlp.train.run import train as run_train

    if kind not in KINDS:
        _fail(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    cfg = load_config(config or shipped_config("demo-2d" if kind == "cxr" else "demo-3d"), [f"seed={seed}"])
    console.rule(f"medvlp demo: synthetic {kind} cohort of {n} studies")
    yaml_path = synthesize(kind, n, out / "cohort", seed=seed)
    console.print(f"1. cohort written: {yaml_path}")
    s = build_cohort(yaml_path, out / "cache", progress=True)
    console.print(f"2. cache built: {s.ingested} studies ingested, {s.quarantined} quarantined, in {s.seconds:.1f} s")
    results = run_train(cfg, yaml_path, out / "run", cache_dir=out / "cache", command=["medvlp", "demo"])
    for name, r in results.items():
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        console.print(f"3. {name}: {r['steps']} steps, final loss {loss}")
    from medvlp.card import HEADLINE, get
    from medvlp.evaluate import evaluate as run_evaluate

    metrics = run_evaluate(out / "run", yaml_path, out / "card", baselines=True, cache_dir=out / "cache")
    console.print("4. evaluation on the test split (this model | untrained | align only):")
    for label, path in HEADLINE:
        vals = [get(metrics, path), *[get(b, path) for b in metrics.get("baselines", {}).values()]]
        console.print(f"   {label}: " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals))
    console.print(f"model: [bold]{out / 'run' / 'stage2-align' / 'model'}[/] (load it with medvlp.load_model)")
    console.print(f"card:  [bold]{out / 'card' / 'model_card.md'}[/] with its plots")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
