"""Tokenise .jsonl/.txt documents into a megatron-core indexed dataset.

    python tools/preprocess_data.py --input a.jsonl b.jsonl --tokenizer-model tok.model \
        --output-prefix data/corpus --workers 8

Writes <output-prefix>.bin and <output-prefix>.idx; each document is followed by the
end-of-document token. <output-prefix>.meta.json records the tokenizer (file hash, vocabulary)
and the largest token id, which training checks at start-up. Use the prefix in data.blend.
"""

from __future__ import annotations

import argparse
import os
import sys

from divprec.data.preprocess import preprocess_files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".jsonl (one document a line) or text")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    p.add_argument("--json-key", default="text", help="text field of .jsonl records")
    p.add_argument(
        "--txt-mode",
        choices=("file", "line"),
        default="file",
        help="a text file is one document, or each non-empty line is one",
    )
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--chunk-mb", type=float, default=1.0, help="text per worker task")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    try:
        stats = preprocess_files(
            args.input,
            args.tokenizer_model,
            args.output_prefix,
            text_key=args.json_key,
            txt_mode=args.txt_mode,
            workers=args.workers,
            chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
            show_progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output_prefix}.{{bin,idx,meta.json}}: {stats.num_documents} documents, "
        f"{stats.num_tokens} tokens in {stats.seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
