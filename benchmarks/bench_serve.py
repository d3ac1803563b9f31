"""Latency and throughput of `medvlp serve` over real HTTP, with and without micro-batching.

    python benchmarks/bench_serve.py [--kind cxr|ct] [--route diagnose|score] [--model RUN] [--requests 400]
        [--rounds 4] [--concurrency 1,8,32] [--max-batch 16] [--batch-wait-ms 5] [--heatmaps] [--out JSON]

Two real `medvlp serve` processes (uvicorn, one model, one model thread each) on free loopback ports serve the same
model: one with micro-batching (`--max-batch`, `--batch-wait-ms`), one with `--no-batching` (one request per
forward pass, the same single model thread). The client is an asyncio loop of httpx requests in this process: `C`
workers each send `POST /v1/diagnose` (`--kind cxr`: a synthetic radiograph DICOM upload; `--kind ct`: a synthetic
abdominal CT series of 40 DICOM slices, zipped; the model's 4 findings) back to back; with `--route score` they
send `POST /v1/score` with the same upload and three sentences (:data:`SENTENCES`: a one-sided sentence, its
side-swapped and its negated twin), and the untrained model gets a side check (strength 1), so the check's cost is in.
Per concurrency level each mode answers `--requests` requests (a quarter of them, at least 40, at concurrency 1),
split into `--rounds` rounds that alternate between the two servers (A B B A ...), so a change in the machine's
load while the benchmark runs hits both modes alike. Latency is per request as the client sees it (upload, decode,
preprocessing, the forward pass, the answer); throughput is answers per second of summed wall time. 8 warm-up
requests per server are not counted.

Without `--model`, the model is the demo config's architecture (the `model` section of configs/demo-2d.yaml or
demo-3d.yaml, at the default preprocessing's size) with untrained weights, which cost exactly what trained ones do.
Client and servers share the machine's cores, as they would on a single-host deployment; the load average before
and after is recorded. Prints a table and writes JSON (default benchmarks/results/serve.json, serve-ct.json).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medvlp.data.cohort import CohortSpec

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key-" + "5f1e2d3c4b5a6978"
WARMUP = 8
DEMO = {"cxr": "demo-2d.yaml", "ct": "demo-3d.yaml"}
UPLOAD = {"cxr": "DICOM", "ct": "zip of a DICOM series"}
SENTENCES = ["Small left pleural effusion.", "Small right pleural effusion.", "No pleural effusion."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo_model(folder: Path, kind: str, cohort: CohortSpec, side_check: bool) -> tuple[Path, dict[str, Any]]:
    """The demo config's architecture, untrained, saved as a model folder with the cohort's record; and its fields.
    With ``side_check``, a side check along the first axis at strength 1, as a fitted one costs."""
    import torch

    from medvlp.config import load_config
    from medvlp.data.cohort import default_preprocess
    from medvlp.models import MedVLP, ModelConfig
    from medvlp.serve.context import COHORT_RECORD

    torch.manual_seed(0)
    spec = cohort.preprocess or default_preprocess(cohort.spatial_dims)
    fields = {k: v for k, v in load_config(ROOT / "configs" / DEMO[kind]).model.items() if k != "text_dropout"}
    fields |= {"spatial_dims": cohort.spatial_dims, "image_size": list(spec.size)}
    if side_check:
        fields["side_check_axis"] = 0
    model = MedVLP(ModelConfig(**fields))
    if model.side_check is not None:
        model.side_check.set(orientation=1.0, strength=1.0)
    out = model.save_pretrained(folder)
    record = cohort.model_dump(mode="json", include={"modality", "spatial_dims", "findings"}) | {"cohort": cohort.name}
    (out / COHORT_RECORD).write_text(json.dumps(record | {"preprocess": spec.model_dump(mode="json")}))
    return out, fields


def _payloads(kind: str, folder: Path) -> tuple[list[bytes], CohortSpec]:
    """Uploads a client sends (one DICOM file per radiograph, one zip per CT series) and the synthetic cohort's YAML."""
    from medvlp.data.cohort import load_spec
    from medvlp.data.synthetic import synthesize

    yaml_path = synthesize(kind, 8 if kind == "ct" else 16, folder, seed=0)
    images, cohort = yaml_path.parent / "images", load_spec(yaml_path)
    if kind == "cxr":
        return [p.read_bytes() for p in sorted(images.glob("*.dcm"))], cohort
    payloads = []
    for series in sorted(p for p in images.iterdir() if p.is_dir()):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for k, f in enumerate(sorted(series.glob("*.dcm"))):
                zf.writestr(f"{k:04d}.dcm", f.read_bytes())
        payloads.append(buf.getvalue())
    return payloads, cohort


def _forward_ms(model: Path, batches: tuple[int, ...] = (1, 2, 4), repeats: int = 10) -> dict[str, float]:
    """The image tower's forward pass alone (encode_image, no request around it), ms per batch: what batching shares."""
    import torch

    from medvlp.models import load_model

    net = load_model(model).eval()
    out = {}
    for b in batches:
        x = torch.randn(b, 1, *net.config.image_size)
        with torch.inference_mode():
            for _ in range(2):  # warm-up
                net.encode_image(x)
            t0 = time.perf_counter()
            for _ in range(repeats):
                net.encode_image(x)
        out[str(b)] = round((time.perf_counter() - t0) / repeats * 1000.0, 1)
    return out


def _start(model: Path, log: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = _free_port()
    env = {**os.environ, "MEDVLP_API_KEYS": KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "medvlp", "serve", "--model", str(model), "--port", str(port), *extra]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


async def _load(
    url: str, payloads: list[bytes], concurrency: int, n: int, heatmaps: bool, route: str
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}"}
    data = {"heatmaps": "true" if heatmaps else "false"} if route == "diagnose" else {"texts": json.dumps(SENTENCES)}

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < n:
                k = issued
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"/v1/{route}", files={"file": ("u", payloads[k % len(payloads)])}, data=data)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    continue
                latencies.append(dt)
                batch_sizes.append(int(r.json()["batch_size"]))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "batch_sizes": batch_sizes, "errors": errors, "seconds": wall, "requests": n}


def _summary(concurrency: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Latencies pooled over the rounds; throughput = answers / summed wall time."""
    lat = np.asarray([x for r in runs for x in r["latencies"]]) * 1000.0
    sizes = [x for r in runs for x in r["batch_sizes"]]
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    wall = sum(r["seconds"] for r in runs)
    return {
        "concurrency": concurrency,
        "requests": sum(r["requests"] for r in runs),
        "ok": len(lat),
        "errors": errors,
        "seconds": round(wall, 3),
        "throughput_rps": round(len(lat) / wall, 2),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "mean": round(float(lat.mean()), 1) if len(lat) else None,
        },
        "mean_batch_size": round(float(np.mean(sizes)), 2) if sizes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="cxr", choices=list(DEMO), help="radiographs or CT series")
    parser.add_argument(
        "--model", type=Path, default=None, help="a run or model folder (default: the demo's, untrained)"
    )
    parser.add_argument("--requests", type=int, default=400, help="answers per concurrency level and mode")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the requests are split into")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--heatmaps", action="store_true", help="ask for a heatmap per finding as well")
    parser.add_argument("--route", default="diagnose", choices=["diagnose", "score"], help="the endpoint requested")
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results/serve.json (cxr), serve-ct.json (ct), -score before .json"
    )
    args = parser.parse_args()
    name = ("serve" if args.kind == "cxr" else "serve-ct") + ("-score" if args.route == "score" else "")
    args.out = args.out or ROOT / "benchmarks" / "results" / f"{name}.json"
    levels = [int(c) for c in args.concurrency.split(",")]
    t_all = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp_path = Path(tmp)
        payloads, cohort = _payloads(args.kind, tmp_path / args.kind)
        model, fields = (
            (args.model, None)
            if args.model
            else _demo_model(tmp_path / "model", args.kind, cohort, side_check=args.route == "score")
        )
        modes = {
            "batching": ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)],
            "no_batching": ["--no-batching"],
        }
        forward_ms = _forward_ms(model)
        print(f"image tower forward alone, ms per batch of 1 / 2 / 4: {forward_ms}", flush=True)
        load_before = os.getloadavg()
        servers = {mode: _start(model, tmp_path / f"{mode}.log", extra) for mode, extra in modes.items()}
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        try:
            for _, url in servers.values():
                asyncio.run(_load(url, payloads, 1, WARMUP, args.heatmaps, args.route))
            for c in levels:
                n = max(40, args.requests // 4) if c == 1 else args.requests
                # both servers are up; rounds alternate A B B A so a change in the machine's load hits both modes
                for k in range(args.rounds):
                    order = list(modes) if k % 2 == 0 else list(modes)[::-1]
                    for mode in order:
                        r = asyncio.run(
                            _load(servers[mode][1], payloads, c, n // args.rounds, args.heatmaps, args.route)
                        )
                        runs.setdefault((mode, c), []).append(r)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    results: dict[str, list[dict[str, Any]]] = {}
    for mode in modes:
        for c in levels:
            r = _summary(c, runs[(mode, c)])
            results.setdefault(mode, []).append(r)
            lat = r["latency_ms"]
            print(
                f"{mode:<12} c={c:<3} {r['throughput_rps']:>7.1f} req/s  p50 {lat['p50']:>7.1f} ms"
                f"  p99 {lat['p99']:>7.1f} ms  batch {r['mean_batch_size']:>5}  errors {r['errors']}",
                flush=True,
            )
    import torch

    out = {
        "benchmark": "serve",
        "command": " ".join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
        "kind": args.kind,
        "model": str(args.model) if args.model else f"configs/{DEMO[args.kind]} architecture, untrained",
        "model_fields": fields,
        "endpoint": f"POST /v1/diagnose, multipart {UPLOAD[args.kind]} upload, {len(cohort.findings)} findings"
        + (", heatmaps" if args.heatmaps else "")
        if args.route == "diagnose"
        else f"POST /v1/score, multipart {UPLOAD[args.kind]} upload, {len(SENTENCES)} sentences, side check",
        "image_forward_ms_per_batch": forward_ms,
        "upload_mib": round(float(np.mean([len(p) for p in payloads])) / 2**20, 3),
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "rounds": args.rounds,
        "results": results,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"load average before {out['machine']['load_average_before']}, after {out['machine']['load_average_after']}")
    print(f"total {out['total_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
