"""Everything a CUDA machine should confirm, in one go (tools/gpu_check.sh runs this).

    python tools/gpu_check.py --out gpu_check/            # on one H100/H200, < 8 minutes
    python tools/gpu_check.py --out /tmp/dry --dry-run    # the same steps at tiny sizes, on CPU

Steps, each a subprocess with its own time limit (a failing step is recorded, the next runs):
1. ``gpu_tests``: the GPU test tier (``pytest -m gpu``: the loss kernels, the model build, bf16
   training steps, a checkpoint round trip, grouped experts on the GPU).
2. ``bench_loss``: the shaped loss (``loss.kernel=triton``) against megatron-core's vocab-parallel
   cross-entropy at V 151936 x 16384 tokens in bf16 (time and peak memory ratios, same run);
   ``bench_loss_fused``: the fused output layer + shaped loss against megatron-core's output
   matmul + cross-entropy (h 1536).
3. ``bench_train`` and ``bench_train_fused``: ``dense_1b`` on one GPU, tokens/s and MFU with
   ``loss=ce`` against ``loss=precision``, then against ``loss=precision loss.fused_linear=true``.
4. ``syncs``: host synchronisations in one training step (torch.cuda.set_sync_debug_mode);
   ``fusions``: 3 training steps with megatron-core's fusions (model.fusions) on and off, the
   same losses.
5. ``memory`` and ``memory_async``: ``experiment=paper_dense_1b`` in bf16 for a few steps with a
   checkpoint (synchronous, then asynchronous), preempted and resumed;
   ``torch.cuda.max_memory_allocated`` against the memory plan, and the resumed losses against
   the uninterrupted ones.
Writes ``<out>/gpu_check.json`` (every step's status, seconds and results) and
``<out>/gpu_check.md`` (one table), plus each step's own JSON and log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    summarize: str  # which summary function reads its output
    env: dict[str, str] = field(default_factory=dict)


def steps(out: Path, dry_run: bool) -> list[Step]:
    py = sys.executable
    tools = REPO / "tools"
    if dry_run:
        loss = ["--device", "cpu", "--dtype", "fp32", "--vocab", "4096", "--tokens", "256"]
        loss += ["--topk", "100", "--tp", "1", "--repeats", "1", "--warmup", "0"]
        train = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup-steps", "1"]
        train += ["--seq-length", "64", "--micro-batch", "2", "--global-batch", "4"]
        gpu_tests = ["tests/gpu", "tests/unit/test_loss.py"]  # they skip on CPU
        hidden = "128"
    else:
        loss = ["--device", "cuda", "--dtype", "bf16", "--vocab", "151936", "--tokens", "16384"]
        loss += ["--topk", "100", "--tp", "1", "--repeats", "5", "--kernel", "triton"]
        train = ["--model", "dense_1b", "--device", "cuda", "--precision", "bf16"]
        train += ["--steps", "8", "--warmup-steps", "3", "--seq-length", "4096"]
        train += ["--micro-batch", "1", "--global-batch", "4"]
        gpu_tests = []
        hidden = "1536"  # the paper's 1B model
    dry = ["--dry-run"] if dry_run else []
    return [
        Step(
            "gpu_tests",
            [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_tests,
             f"--junitxml={out / 'gpu_tests.xml'}"],
            240,
            "junit",
            {"DIVPREC_TEST_TIER": "gpu"},
        ),
        Step(
            "bench_loss",
            [py, str(tools / "bench_loss.py"), *loss, "--configs", "paper", "ce",
             "--json", str(out / "bench_loss.json")],
            150,
            "bench_loss",
        ),
        Step(
            "bench_loss_fused",
            [py, str(tools / "bench_loss.py"), *loss, "--fused", "--hidden", hidden,
             "--configs", "paper", "--json", str(out / "bench_loss_fused.json")],
            150,
            "bench_loss",
        ),
        Step(
            "bench_train",
            [py, str(tools / "bench_train.py"), *train, "--losses", "ce", "precision",
             "--json", str(out / "bench_train.json")],
            150,
            "bench_train",
        ),
        Step(
            "bench_train_fused",
            [py, str(tools / "bench_train.py"), *train, "--losses", "ce", "precision",
             "--loss-overrides", "loss.fused_linear=true",
             "--json", str(out / "bench_train_fused.json")],
            150,
            "bench_train",
        ),
        Step(
            "syncs",
            [py, str(tools / "gpu_steps.py"), "syncs", *dry, "--json", str(out / "syncs.json")],
            90,
            "plain",
        ),
        Step(
            "fusions",
            [py, str(tools / "gpu_steps.py"), "fusions", *dry, "--json", str(out / "fusions.json")],
            120,
            "plain",
        ),
        Step(
            "memory",
            [py, str(tools / "gpu_steps.py"), "memory", *dry, "--json", str(out / "memory.json")],
            120,
            "plain",
        ),
        Step(
            "memory_async",
            [py, str(tools / "gpu_steps.py"), "memory", "--async-save", *dry,
             "--json", str(out / "memory_async.json")],
            120,
            "plain",
        ),
    ]  # fmt: skip


def _junit(out: Path, step: Step) -> dict:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _bench_loss(out: Path, step: Step) -> dict:
    records = json.loads(Path(step.command[step.command.index("--json") + 1]).read_text())
    records = records.get("records", records) if isinstance(records, dict) else records
    keep = ("config", "path", "vocab", "tokens", "dtype", "kernel", "time_ratio", "memory_ratio")
    keep += ("loss_memory_ratio",)
    return {"cases": [{k: r.get(k) for k in keep if k in r} for r in records]}


def _bench_train(out: Path, step: Step) -> dict:
    data = json.loads(Path(step.command[step.command.index("--json") + 1]).read_text())
    keep = ("loss", "tokens_per_s", "mfu", "tflops", "ratio_to_baseline")
    return {"runs": [{k: r.get(k) for k in keep} for r in data["runs"]]}


def _plain(out: Path, step: Step) -> dict:
    return json.loads(Path(step.command[step.command.index("--json") + 1]).read_text())


SUMMARIES = {"junit": _junit, "bench_loss": _bench_loss, "bench_train": _bench_train}
SUMMARIES["plain"] = _plain


def run_step(step: Step, out: Path) -> dict:
    log = out / f"{step.name}.log"
    env = {**os.environ, **step.env}
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(
                step.command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                timeout=step.timeout_s,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = None
    result: dict = {
        "status": "timeout" if rc is None else ("ok" if rc == 0 else f"exit {rc}"),
        "seconds": round(time.perf_counter() - start, 1),
        "log": str(log),
    }
    try:
        result["results"] = SUMMARIES[step.summarize](out, step)
    except (OSError, ValueError, KeyError, ET.ParseError) as err:
        result["results"] = None
        result["summary_error"] = f"{type(err).__name__}: {err}"
        if result["status"] == "ok":
            result["status"] = "no results"
    return result


def _figures(name: str, results: dict | None) -> str:
    if not results:
        return "-"
    if name == "gpu_tests":
        return ", ".join(f"{results[k]} {k}" for k in ("passed", "failures", "errors", "skipped"))
    if name.startswith("bench_loss"):
        memory = "loss_memory_ratio" if name.endswith("fused") else "memory_ratio"
        return "; ".join(
            f"{c.get('config')} V{c.get('vocab')} x {c.get('tokens')}: time {c.get('time_ratio'):.3f}x, "
            f"memory {c.get(memory) or float('nan'):.3f}x"
            for c in results["cases"]
            if c.get("time_ratio") is not None
        )
    if name.startswith("bench_train"):
        return "; ".join(
            f"{r['loss']}: {r['tokens_per_s']:.0f} tok/s"
            + (f", MFU {r['mfu']:.3f}" if r.get("mfu") else "")
            + f", {r['ratio_to_baseline']:.3f}x"
            for r in results["runs"]
        )
    if name == "syncs":
        return f"{results['syncs_in_step_3']} syncs in step 3"
    if name == "fusions":
        return (
            f"fused/unfused lm loss: max relative difference "
            f"{results['max_relative_difference']:.2e} (rtol {results['rtol']})"
        )
    if name.startswith("memory"):
        ratio = results.get("measured_over_plan")
        same = results["resumed_lm_loss"] == results["uninterrupted_lm_loss"]
        peak = results.get("max_memory_allocated_gib")
        peak_text = "-" if peak is None else f"{peak:.2f} GiB"
        ratio_text = "-" if ratio is None else f"{ratio:.3f}"
        return (
            f"peak {peak_text}, plan {results['plan_gib']:.2f} GiB (measured/plan {ratio_text}); "
            f"resumed steps {'repeat' if same else 'DIFFER from'} the uninterrupted run"
        )
    return json.dumps(results)[:200]


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="folder for the JSON, table and logs")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (CI runs this)")
    p.add_argument("--only", nargs="*", default=None, help="run only these steps")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": _device(), "dry_run": args.dry_run, "steps": {}}
    t0 = time.perf_counter()
    for step in steps(out, args.dry_run):
        if args.dry_run:  # CPU sizes on a shared machine: the limits are for a GPU's speed
            step.timeout_s *= 4
        if args.only is not None and step.name not in args.only:
            continue
        print(f"gpu_check: {step.name} ...", flush=True)
        report["steps"][step.name] = result = run_step(step, out)
        print(f"gpu_check: {step.name}: {result['status']} in {result['seconds']} s", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [
        f"# GPU check on {report['device']}{' (dry run)' if args.dry_run else ''}",
        "",
        "| step | status | seconds | figures |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in report["steps"].items():
        figures = _figures(name, result["results"])
        lines.append(f"| {name} | {result['status']} | {result['seconds']} | {figures} |")
    lines.append(f"\ntotal {report['seconds']} s")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["status"] == "ok" for r in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
