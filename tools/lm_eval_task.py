"""Write an lm-evaluation-harness task over divprec's synthetic arithmetic eval split (offline).

    python tools/lm_eval_task.py tasks/                      # tasks/divprec_arithmetic.yaml + .jsonl
    HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=hf/exp1,dtype=float32 \
        --tasks divprec_arithmetic --include_path tasks/ --device cpu --batch_size 1

The JSONL holds ``--n`` problems of the eval split (divprec.eval.synthetic: the expressions no
training text contains), one ``{"prompt", "answer"}`` per line. The task generates greedily from
the prompt (``Q: 3 + 4 * 2 - 5 = ?\\nA:``) until the next problem or a blank line and scores the integer
after ``Answer:`` by exact match, as divprec's own checker does. The dataset is read with the
``json`` builder that ships with ``datasets``: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from divprec.eval.synthetic import ANSWER_MARKER, ArithmeticTask

TASK = "divprec_arithmetic"


def task_yaml(data_file: Path, max_gen_toks: int) -> str:
    """The task definition (lm-evaluation-harness YAML) reading ``data_file``."""
    regex = re.escape(ANSWER_MARKER) + r"[ \t]*(-?\d+)"
    return "\n".join(
        [
            f"task: {TASK}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file))}",
            "test_split: test",
            "output_type: generate_until",
            'doc_to_text: "{{prompt}}"',
            'doc_to_target: "{{answer}}"',
            "generation_kwargs:",
            # The next problem or a blank line ends a solution (and the eos token, lm-eval adds it).
            '  until: ["\\nQ:", "\\n\\n"]',
            f"  max_gen_toks: {max_gen_toks}",
            "  do_sample: false",
            "filter_list:",
            "  - name: answer",
            "    filter:",
            "      - function: regex",
            f"        regex_pattern: {json.dumps(regex)}",
            "      - function: take_first",
            "metric_list:",
            "  - metric: exact_match",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )


def write_task(out: Path, n: int, seed: int = 0, max_gen_toks: int = 96) -> Path:
    """Write ``<out>/divprec_arithmetic.jsonl`` and ``.yaml``; returns the YAML's path."""
    out = Path(out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{TASK}.jsonl"
    with open(data, "w") as f:
        for problem in ArithmeticTask(seed=seed).generate(n, "eval"):
            f.write(json.dumps({"prompt": problem.prompt, "answer": problem.answer}) + "\n")
    path = out / f"{TASK}.yaml"
    path.write_text(task_yaml(data, max_gen_toks))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path, help="directory for the task YAML and its JSONL")
    p.add_argument("--n", type=int, default=200, help="problems of the eval split")
    p.add_argument("--seed", type=int, default=0, help="ArithmeticTask seed")
    p.add_argument("--max-gen-toks", type=int, default=96, help="longest generated solution")
    args = p.parse_args(argv)
    path = write_task(args.out, args.n, args.seed, args.max_gen_toks)
    print(f"wrote {path} ({args.n} problems of the eval split) and {path.with_suffix('.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
