"""Train a byte-fallback SentencePiece tokenizer on .txt/.jsonl files.

    python tools/train_tokenizer.py --input a.jsonl b.txt --model-prefix out/tok --vocab-size 32000

Writes <model-prefix>.model (pad=0, unk=1, bos=2, eos=3; eos is the end-of-document token).
"""

from __future__ import annotations

import argparse
import sys

from divprec.data.tokenizer import Tokenizer, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".jsonl (one document a line) or text")
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--json-key", default="text", help="text field of .jsonl records")
    p.add_argument(
        "--txt-mode",
        choices=("file", "line"),
        default="file",
        help="a text file is one document, or each non-empty line is one",
    )
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument(
        "--max-train-mb",
        type=float,
        default=8.0,
        help="train on a seeded random sample of about this much text (0 = all of it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    args = p.parse_args(argv)

    try:
        path = train_tokenizer(
            args.input,
            args.model_prefix,
            args.vocab_size,
            text_key=args.json_key,
            txt_mode=args.txt_mode,
            model_type=args.model_type,
            max_train_bytes=int(args.max_train_mb * 1e6) or None,
            seed=args.seed,
            num_threads=args.threads,
            verbose=args.verbose,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    tok = Tokenizer.from_file(path)
    print(f"wrote {path} (vocab_size={tok.vocab_size}, eod_id={tok.eod_id}, pad_id={tok.pad_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
