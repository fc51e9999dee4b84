"""How many processes the launchers start per node: one per GPU this node lets them use.

No GPU here: a fake ``nvidia-smi`` on PATH lists 8 GPUs, so this checks the counting logic only
(``nvidia-smi -L`` narrowed by ``CUDA_VISIBLE_DEVICES`` as CUDA reads it), not a real device.
``launch/local.sh`` runs whole, with a fake interpreter that prints what it was asked to run;
of ``launch/pretrain.slurm`` the per-node lines that choose ``gpus`` and ``nproc`` run alone.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
GPUS = 8
UUID = "GPU-3f2a9c4e-0000-4000-8000-00000000000{}"

# (CUDA_VISIBLE_DEVICES or None for unset, the GPUs a process may use)
CASES = [
    (None, GPUS),
    ("2,3", 2),
    ("0, 5 ,7", 3),
    ("0,1,9,2", 2),  # the list ends at the first index that names no GPU
    ("-1", 0),
    ("", 0),  # set but empty: no GPU
    (UUID.format(3), 1),
    (f"{UUID.format(1)},GPU-ffffffff-not-here,2", 1),
]


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """A directory with ``nvidia-smi`` (8 GPUs; ``FAKE_NO_GPU=1``: none, as on a machine with a
    driver but no device) and ``python`` (prints its arguments and DS_ACCELERATOR)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lines = "\n".join(
        f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: {UUID.format(i)})" for i in range(GPUS)
    )
    _script(
        bin_dir / "nvidia-smi",
        f'if [[ -n ${{FAKE_NO_GPU:-}} ]]; then echo "No devices were found"; exit 6; fi\n'
        f"cat <<'EOF'\n{lines}\nEOF",
    )
    _script(bin_dir / "python", 'echo "DS_ACCELERATOR=${DS_ACCELERATOR:-} ARGS=$*"')
    return bin_dir


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def _env(fake_bin: Path, visible: str | None, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE")
    }
    env.pop("DS_ACCELERATOR", None)
    env.pop("SLURM_GPUS_ON_NODE", None)
    env.update(PATH=f"{fake_bin}:{env['PATH']}", DIVPREC_PYTHON=str(fake_bin / "python"), **extra)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


def _local(fake_bin: Path, visible: str | None, **extra: str) -> str:
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local.sh"), "train.steps=1"],
        env=_env(fake_bin, visible, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize(("visible", "gpus"), CASES)
def test_local_sh_starts_one_process_per_visible_gpu(fake_bin, visible, gpus):
    out = _local(fake_bin, visible)
    if gpus > 1:
        assert f"-m torch.distributed.run --standalone --nproc_per_node {gpus} " in out, out
        assert out.startswith("DS_ACCELERATOR= "), out
    else:  # one process, without torchrun; on the CPU when no GPU is visible
        assert out.endswith("ARGS=-m divprec.pretrain train.steps=1"), out
        assert out.startswith("DS_ACCELERATOR=cpu " if gpus == 0 else "DS_ACCELERATOR= "), out


def test_local_sh_on_a_machine_without_gpus_and_with_nproc_per_node(fake_bin):
    out = _local(fake_bin, None, FAKE_NO_GPU="1")
    assert out == "DS_ACCELERATOR=cpu ARGS=-m divprec.pretrain train.steps=1", out
    out = _local(fake_bin, "0", NPROC_PER_NODE="3")
    assert "--nproc_per_node 3 " in out, out


def _slurm_node_count(fake_bin: Path, visible: str | None, **extra: str) -> tuple[int, int]:
    """(gpus, nproc) as the per-node script of pretrain.slurm computes them: its lines from the
    interpreter's choice to the process count, run alone."""
    lines = (LAUNCH / "pretrain.slurm").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("PYTHON=${DIVPREC_PYTHON"))
    stop = next(i for i, line in enumerate(lines) if line.startswith("nproc=${NPROC_PER_NODE"))
    body = "\n".join(["set -euo pipefail", *lines[start : stop + 1], 'echo "$gpus $nproc"'])
    proc = subprocess.run(
        ["bash", "-c", body],
        env=_env(fake_bin, visible, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    gpus, nproc = proc.stdout.split()
    return int(gpus), int(nproc)


@pytest.mark.parametrize(("visible", "gpus"), CASES)
def test_pretrain_slurm_counts_the_visible_gpus(fake_bin, visible, gpus):
    assert _slurm_node_count(fake_bin, visible) == (gpus, max(gpus, 1))


def test_pretrain_slurm_takes_the_jobs_gpus_from_slurm(fake_bin):
    assert _slurm_node_count(fake_bin, "0,1", SLURM_GPUS_ON_NODE="4") == (4, 4)
    assert _slurm_node_count(fake_bin, None, FAKE_NO_GPU="1") == (0, 1)


def test_both_launchers_count_with_the_same_lines():
    def counting(name: str) -> str:
        text = (LAUNCH / name).read_text()
        return text[text.index("# visible-gpus:") : text.index("# end visible-gpus")]

    assert counting("local.sh") == counting("pretrain.slurm")
