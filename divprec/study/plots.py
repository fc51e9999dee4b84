"""The study's figures, drawn from a report dict (divprec.study.report) with matplotlib (Agg).

- pretrain_entropy.png   token entropy and LM loss over pre-training steps, per setting
- pass_at_k.png          Pass@k of the pre-trained checkpoints on held-out problems
- rl_curves.png          RL reward, policy entropy and response length over RL steps
- rl_pass_at_k.png       Pass@k at the first and the last RL evaluation

Over several seeds (an aggregated report, divprec.study.seeds), :func:`draw_seeds` draws the seed
mean of every setting with its 95% t-interval as a band, and every seed as a thin line:

- pass_at_k.png          Pass@k after pre-training
- rl_pass_at_k.png       Pass@k at the last RL evaluation (solid) and the first (dashed)
- rl_curves.png          RL reward, policy entropy and response length over RL steps
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "ce": "#444444",
    "precision": "#1f77b4",
    "diversity": "#d62728",
    "tail_penalty": "#2ca02c",
    "head_bonus": "#ff7f0e",
}
DPI = 80
# pyplot's figure registry is global: studies side by side (divprec.study.seeds) draw in turn.
_PYPLOT_LOCK = threading.Lock()


def _color(setting: str) -> str:
    return COLORS.get(setting, "#9467bd")


def _ema(values: list[float | None], alpha: float | None = None) -> list[float]:
    """Exponential moving average; ``alpha`` None: about a 1/20 of the curve's length."""
    alpha = alpha or max(0.05, min(1.0, 20 / max(len(values), 1)))
    out, avg = [], None
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(avg if avg is not None else float("nan"))
            continue
        avg = v if avg is None else (1 - alpha) * avg + alpha * v
        out.append(avg)
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_pretrain(report: dict, path: Path) -> Path:
    """Entropy and LM loss over pre-training; the middle panel zooms on the entropy after the
    first sixth of the steps, where the settings differ by a few percent and the EMA no longer
    lags the steep start."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for setting, entry in report["settings"].items():
        curves = (entry.get("pretrain") or {}).get("curves") or {}
        steps = curves.get("step") or []
        if not steps:
            continue
        for ax, key in ((axes[0], "entropy"), (axes[2], "lm_loss")):
            ax.plot(steps, curves[key], color=_color(setting), alpha=0.15, lw=0.8)
            ax.plot(steps, _ema(curves[key]), color=_color(setting), lw=1.5, label=setting)
        start = next((i for i, s in enumerate(steps) if s >= steps[-1] / 6), 0)
        smooth = _ema(curves["entropy"])
        axes[1].plot(steps[start:], smooth[start:], color=_color(setting), lw=1.5)
    axes[0].set(title="token entropy (training batches)", xlabel="step", ylabel="nats")
    axes[1].set(title="token entropy, later steps (EMA)", xlabel="step", ylabel="nats")
    axes[2].set(title="LM loss (cross-entropy)", xlabel="step", ylabel="nats")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def _plot_curve(ax, passk: dict, setting: str, **kwargs) -> None:
    ks = sorted(int(k) for k in passk)
    ax.plot(
        ks,
        [passk[k] if k in passk else passk[str(k)] for k in ks],
        color=_color(setting),
        marker="o",
        ms=3,
        **kwargs,
    )


def plot_pass_at_k(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for setting, entry in report["settings"].items():
        ev = entry.get("eval") or {}
        if ev.get("pass_at_k"):
            _plot_curve(ax, ev["pass_at_k"], setting, label=setting)
    ax.set_xscale("log", base=2)
    ax.set(title="Pass@k after pre-training (held-out problems)", xlabel="k", ylabel="pass@k")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_rl_curves(report: dict, path: Path) -> Path:
    keys = (
        ("reward_mean", "reward (mean)"),
        ("entropy", "policy entropy"),
        ("response_length", "response length (tokens)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for setting, entry in report["settings"].items():
        history = [r for r in (entry.get("rl") or {}).get("history") or [] if "reward_mean" in r]
        if not history:
            continue
        steps = [r.get("step", i) for i, r in enumerate(history)]
        for ax, (key, _) in zip(axes, keys, strict=True):
            values = [r.get(key) for r in history]
            ax.plot(steps, values, color=_color(setting), alpha=0.2, lw=0.8)
            ax.plot(steps, _ema(values), color=_color(setting), lw=1.5, label=setting)
    for ax, (_, title) in zip(axes, keys, strict=True):
        ax.set(title=title, xlabel="RL step")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_rl_pass_at_k(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for setting, entry in report["settings"].items():
        rl = entry.get("rl") or {}
        if rl.get("first_eval") and rl["first_eval"]["step"] != rl["last_eval"]["step"]:
            _plot_curve(ax, rl["first_eval"]["pass_at_k"], setting, ls="--", alpha=0.5)
        if rl.get("last_eval"):
            _plot_curve(ax, rl["last_eval"]["pass_at_k"], setting, label=setting)
    ax.set_xscale("log", base=2)
    ax.set(title="Pass@k in RL: last eval (solid), first (dashed)", xlabel="k", ylabel="pass@k")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


PLOTS = {
    "pretrain_entropy.png": plot_pretrain,
    "pass_at_k.png": plot_pass_at_k,
    "rl_curves.png": plot_rl_curves,
    "rl_pass_at_k.png": plot_rl_pass_at_k,
}


def draw_all(report: dict, out_dir: Path) -> list[Path]:
    """Every figure of :data:`PLOTS` into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _PYPLOT_LOCK:
        return [draw(report, out_dir / name) for name, draw in PLOTS.items()]


def _band(ax, series: dict, setting: str, per_seed: bool = True, **kwargs) -> None:
    """The seed mean of ``series`` (divprec.study.aggregate.curves) with its interval shaded
    and, with ``per_seed``, every seed as a thin line."""
    xs, color = series["x"], _color(setting)
    nan = float("nan")
    mean = [nan if v is None else v for v in series["mean"]]
    ax.plot(xs, mean, color=color, lw=1.6, marker="o", ms=3, **kwargs)
    if all(v is not None for v in series["low"]):
        ax.fill_between(xs, series["low"], series["high"], color=color, alpha=0.15, lw=0)
    if per_seed:
        for values in series["per_seed"].values():
            line = [nan if v is None else v for v in values]
            ax.plot(xs, line, color=color, lw=0.6, alpha=0.35, ls=kwargs.get("ls", "-"))


def plot_seeds_pass_at_k(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for setting, series in report["curves"].items():
        if "pretrain_pass_at_k" in series:
            _band(ax, series["pretrain_pass_at_k"], setting, label=setting)
    ax.set_xscale("log", base=2)
    n = len(report["study"]["seeds"])
    ax.set(
        title=f"Pass@k after pre-training: mean of {n} seeds, 95% interval",
        xlabel="k",
        ylabel="pass@k",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_seeds_rl_pass_at_k(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for setting, series in report["curves"].items():
        if "rl_first_pass_at_k" in series:
            _band(ax, series["rl_first_pass_at_k"], setting, per_seed=False, ls="--", alpha=0.5)
        if "rl_last_pass_at_k" in series:
            _band(ax, series["rl_last_pass_at_k"], setting, label=setting)
    ax.set_xscale("log", base=2)
    ax.set(title="Pass@k in RL: last eval (solid), first (dashed)", xlabel="k", ylabel="pass@k")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_seeds_rl_curves(report: dict, path: Path) -> Path:
    keys = (
        ("rl/reward_mean", "reward (mean)"),
        ("rl/entropy", "policy entropy"),
        ("rl/response_length", "response length (tokens)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for setting, series in report["curves"].items():
        for ax, (key, _) in zip(axes, keys, strict=True):
            if key in series:
                _band(ax, series[key], setting, label=setting)
    for ax, (_, title) in zip(axes, keys, strict=True):
        ax.set(title=f"{title}, seed mean", xlabel="RL step")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


SEED_PLOTS = {
    "pass_at_k.png": plot_seeds_pass_at_k,
    "rl_pass_at_k.png": plot_seeds_rl_pass_at_k,
    "rl_curves.png": plot_seeds_rl_curves,
}


def draw_seeds(report: dict, out_dir: Path) -> list[Path]:
    """Every figure of :data:`SEED_PLOTS` for an aggregated report into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _PYPLOT_LOCK:
        return [draw(report, out_dir / name) for name, draw in SEED_PLOTS.items()]
