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
PROMPTS_HELP = "templates: zero-shot with the cohort's prompts; auto: also the prompt prototypes (training labels)"
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
    style: Annotated[
        int | None,
        typer.Option(
            help="Hospital style seed: other phrasing, sections, bilateral findings, lesion sizes and contrast, "
            "image size and spacing, prevalences and column names (0 or none: the built-in cohort).",
            min=0,
        ),
    ] = None,
    unpaired: Annotated[
        int, typer.Option(help="Add this many image-only and as many report-only studies (train, stage 1).", min=0)
    ] = 0,
) -> None:
    """Write a built-in synthetic cohort (real DICOM files, manifest, reports, boxes, survival)."""
    from medvlp.data.synthetic import synthesize

    if recipe is not None:
        r = _recipe(recipe)
        kind, n, seed = r["kind"], r["n"], r["seed"]
    if kind not in KINDS:
        _fail(f"--kind must be one of {', '.join(KINDS)} (or give --recipe), got {kind!r}")
    path = synthesize(kind, n, out, seed=seed, style=style, unpaired=unpaired)
    styled = f" in style {style}" if style else ""
    extra = f" + {unpaired} image-only and {unpaired} report-only" if unpaired else ""
    console.print(f"wrote {n} synthetic {kind} studies{extra}{styled}: [bold]{path}[/]")


@cohort_app.command("validate")
def cohort_validate(cohort: Annotated[Path, typer.Argument(help="The cohort YAML.")]) -> None:
    """Check a cohort (YAML, manifest, grounding, files present, reports not empty) without building it."""
    from medvlp.data.cohort import CohortError, load_cohort
    from medvlp.data.validate import lesion_warnings, pairing_counts, record_problems

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
    p = pairing_counts(c)
    if p["image_only"] or p["report_only"]:
        msg = f"{p['image_only']} image-only and {p['report_only']} report-only studies (train, stage 1 only)"
        console.print(f"  {msg}, {p['paired']} pairs", highlight=False)
    for study_id, reason in problems:
        console.print(f"  would quarantine {study_id}: {reason}", highlight=False)
    for warning in lesion_warnings(c):
        console.print(f"  [yellow]warning[/]: {warning}", highlight=False)
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
    if s.quarantined:  # the console is inside the hospital: it names records by their manifest study_id too
        import pandas as pd

        q = pd.read_csv(out / "quarantine.csv", dtype=str)
        ids = pd.read_csv(out / "secret" / "ids.csv", dtype=str)
        original = dict(zip(ids["study"], ids["study_id"], strict=True))
        for r in q.head(20).itertuples(index=False):
            console.print(f"  row {r.row} ({original.get(r.study, '?')}): {r.reason}", highlight=False)
        more = f" ({len(q) - 20} more)" if len(q) > 20 else ""
        console.print(
            f"  reasons in {out / 'quarantine.csv'}{more}, by row and pseudonym; {out / 'secret/ids.csv'} maps them"
        )


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
    prompts: Annotated[str, typer.Option(help=PROMPTS_HELP)] = "templates",
) -> None:
    """Zero-shot, grounding, retrieval, survival and probes on the test split; writes a model card."""
    from medvlp.card import HEADLINE, get
    from medvlp.data.cohort import CohortError
    from medvlp.evaluate import evaluate as run_evaluate

    try:
        metrics = run_evaluate(model, cohort, out, baselines=baseline, cache_dir=cache, prompts=prompts)
    except (CohortError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    for label, path in HEADLINE:
        v = get(metrics, path)
        console.print(f"  {label}: {'-' if v is None else f'{v:.3f}'}")
    console.print(f"card: [bold]{out / 'model_card.md'}[/]")


@app.command()
def serve(
    model: Annotated[Path, typer.Option(help="A run folder or a model folder.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8000,
    cohort: Annotated[Path | None, typer.Option(help="The training cohort YAML (retrieval corpus).")] = None,
    cache: Annotated[Path | None, typer.Option(help="The training cohort's cache folder (retrieval corpus).")] = None,
    card: Annotated[Path | None, typer.Option(help="Evaluation card folder (default: RUN/card, RUN/../card).")] = None,
    api_keys_file: Annotated[Path | None, typer.Option(help="API keys, one per line (also: MEDVLP_API_KEYS).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without keys (loopback hosts only).")] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload or DICOMweb series (413 beyond).")] = 256.0,
    max_batch: Annotated[int, typer.Option(help="Most requests per forward pass.", min=1)] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a request waits for batch-mates.", min=0)] = 5.0,
    no_batching: Annotated[bool, typer.Option("--no-batching", help="One request per forward pass.")] = False,
    dicomweb_allow: Annotated[
        list[str] | None, typer.Option(help="A DICOMweb base URL the server may pull from (repeatable).")
    ] = None,
    dicomweb_timeout: Annotated[
        float, typer.Option(help="Seconds for a whole DICOMweb pull (connect, answer and every byte).")
    ] = 30.0,
    max_decoded_mb: Annotated[
        float, typer.Option(help="Largest decoded image (pixels x frames x 4 bytes, a whole series counted; 413).")
    ] = 512.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds for a whole request body to arrive (408 beyond).")
    ] = 60.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """The zero-shot diagnosis HTTP API (/v1/...) and its viewer (/). Keys: MEDVLP_API_KEYS or --api-keys-file."""
    try:
        from medvlp.serve.app import ServeSettings
        from medvlp.serve.auth import check_auth_config, load_keys
        from medvlp.serve.dicomweb import DicomWebConfig
        from medvlp.serve.server import load_service, run_server
        from medvlp.serve.uploads import UploadLimits
    except ImportError as exc:
        _fail(f"the server needs the 'serve' extra (pip install 'medvlp[serve]'): {exc}")
        return
    try:
        keys = load_keys(api_keys_file)
        check_auth_config(keys, no_auth, host)
        max_bytes = int(max_upload_mb * (1 << 20))
        if max_bytes < 1:
            raise ValueError(f"--max-upload-mb must be positive, got {max_upload_mb}")
        max_decoded = int(max_decoded_mb * (1 << 20))
        if max_decoded < 1:
            raise ValueError(f"--max-decoded-mb must be positive, got {max_decoded_mb}")
        if not body_timeout > 0 or not dicomweb_timeout > 0:
            raise ValueError(
                f"--body-timeout and --dicomweb-timeout must be positive, got {body_timeout}, {dicomweb_timeout}"
            )
        allow = tuple(dicomweb_allow or ())
        for url in allow:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--dicomweb-allow takes http(s) base URLs, got {url!r}")
        settings = ServeSettings(
            api_keys=tuple(keys),
            limits=UploadLimits(max_bytes=max_bytes, max_unpacked=max(4 * max_bytes, 1 << 30), max_decoded=max_decoded),
            max_batch=1 if no_batching else max_batch,
            batch_wait_ms=0.0 if no_batching else batch_wait_ms,
            dicomweb=DicomWebConfig(allow=allow, timeout=dicomweb_timeout),
            body_timeout=body_timeout,
        )
        for h in logging.root.handlers:  # a server logs its requests (route, status, time: never a key or a header)
            h.setLevel(min(h.level, logging.INFO))
        logging.getLogger("medvlp").setLevel(logging.INFO)
        logging.getLogger("uvicorn").setLevel(logging.INFO)
        service = load_service(model, cohort_yaml=cohort, cache_dir=cache, card=card, device=device)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    auth = f"{len(keys)} API key(s)" if keys else "NO authentication (loopback only)"
    console.print(f"serving {model} on http://{host}:{port} with {auth}; viewer at /, API under /v1", highlight=False)
    run_server(service, settings, host, port)


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="A run folder or a model folder.")],
    out: Annotated[Path, typer.Option(help="Output folder (predictions.parquet/.csv, quarantine.csv; resumable).")],
    cohort: Annotated[Path | None, typer.Option(help="A cohort YAML: score its --split.")] = None,
    split: Annotated[str, typer.Option(help="train, val, test or all (with --cohort).")] = "test",
    images: Annotated[
        Path | None, typer.Option(help="A folder of studies: DICOM files, series folders, NIfTI, PNG.")
    ] = None,
    sr: Annotated[bool, typer.Option("--sr", help="Also write a DICOM SR per DICOM study (OUT/sr).")] = False,
    heatmaps: Annotated[bool, typer.Option("--heatmaps", help="Also write grounding heatmaps (OUT/heatmaps).")] = False,
    batch_size: Annotated[int, typer.Option(help="Studies per forward pass.", min=1)] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Score every study of a cohort split or a folder with the server's own code; bad inputs go to quarantine."""
    from medvlp.data.cohort import CohortError
    from medvlp.predict import find_studies
    from medvlp.predict import predict as run_predict
    from medvlp.serve.server import load_service

    try:
        studies = find_studies(cohort=cohort, split=None if split == "all" else split, images=images, out=out)
        service = load_service(model, device=device, corpus=False)
        s = run_predict(service, studies, out, sr=sr, heatmaps=heatmaps, batch_size=batch_size)
    except (CohortError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    console.print(
        f"predicted {s.scored + s.reused} studies ({s.reused} reused), {s.quarantined} quarantined "
        f"in {s.seconds:.1f} s: [bold]{out / 'predictions.parquet'}[/]",
        highlight=False,
        soft_wrap=True,
    )
    if s.quarantined:
        console.print(f"  reasons in {out / 'quarantine.csv'}", highlight=False)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="A run folder or a model folder.")],
    out: Annotated[Path, typer.Option(help="Export folder (towers, tokenizer, prompt embeddings, scorer.json).")],
    format_: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
) -> None:
    """Export the image and text towers (dynamic batch) with the cached prompts, to score without PyTorch."""
    from medvlp.export import FORMATS, export_onnx
    from medvlp.serve.server import load_service

    if format_ not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, got {format_!r}")
    try:
        service = load_service(model, device="cpu", corpus=False)
        export_onnx(service, out)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    console.print(f"exported to [bold]{out}[/] (score with medvlp.hospital.onnx_scorer.OnnxScorer)", soft_wrap=True)


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
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config value: --set model.text_num_layers=6")
    ] = None,
    ablation: Annotated[
        bool, typer.Option(help="Also train stage 2 alone (align-only baseline): the card shows what stage 1 buys.")
    ] = False,
) -> None:
    """The whole pipeline on a built-in synthetic cohort: cohort, cache, both training stages, evaluation.

    The card compares the model with the same architecture untrained (and, with ``--ablation``, with stage 2
    alone). One progress display covers every phase: synth, build, the training stages, the baseline, the
    evaluation.
    """
    from medvlp.card import HEADLINE, get
    from medvlp.config import STAGES, ConfigError, load_config
    from medvlp.data.build import build_cohort
    from medvlp.data.synthetic import synthesize
    from medvlp.evaluate import evaluate as run_evaluate
    from medvlp.progress import PipelineProgress
    from medvlp.train.run import train as run_train

    if kind not in KINDS:
        _fail(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    try:
        default = shipped_config("demo-2d" if kind == "cxr" else "demo-3d")
        cfg = load_config(config or default, [f"seed={seed}", *(set_ or [])])
    except ConfigError as exc:
        _fail(str(exc))
        return
    stages = [s for s in STAGES if cfg.stages.get(s).enabled]
    phases = {"synth": n, "build": n, **{s: cfg.stages.get(s).steps for s in stages}}
    if ablation:
        phases["baseline (align only)"] = cfg.stages.stage2_align.steps
    phases["evaluation"] = 1
    cache, run, card = out / "cache", out / "run", out / "card"
    console.rule(f"medvlp demo: synthetic {kind} cohort of {n} studies")
    with PipelineProgress(phases, console) as bar:
        bar.start("synth")
        yaml_path = synthesize(kind, n, out / "cohort", seed=seed)
        bar.finish(f"cohort written to {yaml_path}")
        bar.start("build")
        s = build_cohort(yaml_path, cache, on_progress=lambda d, t: bar.update("build", d, t))
        bar.finish(f"{s.ingested} studies ingested, {s.quarantined} quarantined")

        def on_train(phase: str, done: int, total: int) -> None:
            if phase in stages and phase != bar.current:
                bar.start(phase)
            bar.update(phase, done, total)

        results = run_train(cfg, yaml_path, run, cache_dir=cache, command=["medvlp", "demo"], progress=on_train)
        bar.finish()
        for name, r in results.items():
            loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
            console.print(f"      {name}: {r['steps']} steps, final loss {loss}", highlight=False)
        if ablation:
            from medvlp.evaluate import train_align_only

            bar.start("baseline (align only)")
            train_align_only(cfg, yaml_path, cache, card, progress=lambda _, d, t: bar.update(bar.current, d, t))
            bar.finish("stage2-align from the generic towers")
        bar.start("evaluation")
        baselines = ["untrained", "align_only"] if ablation else ["untrained"]
        metrics = run_evaluate(run, yaml_path, card, baselines=baselines, cache_dir=cache)
        bar.finish(f"test split: this model and {' and '.join(b.replace('_', ' ') for b in baselines)}")
    console.print(f"evaluation on the test split (this model | {' | '.join(b.replace('_', ' ') for b in baselines)}):")
    for label, path in HEADLINE:
        vals = [get(metrics, path), *[get(b, path) for b in metrics.get("baselines", {}).values()]]
        console.print(f"   {label}: " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals))
    model_dir = run / "stage2-align" / "model"
    console.print(f"model: [bold]{model_dir}[/] (load it with medvlp.load_model)", soft_wrap=True)
    console.print(f"card:  [bold]{card / 'model_card.md'}[/] with its plots in {card}", soft_wrap=True)
    serve_cmd = f"medvlp serve --model {run} --cohort {yaml_path} --cache {cache} --no-auth"
    console.print(f"serve: [bold]{serve_cmd}[/]  (then open http://127.0.0.1:8000)", soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
