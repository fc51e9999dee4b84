"""divprec's SentencePiece model as a Hugging Face fast tokenizer (tokenizer.json).

divprec trains byte-fallback BPE models on identity-normalised text: no dummy prefix, spaces
escaped as U+2581, digits split, whitespace runs kept (:mod:`divprec.data.tokenizer`).
SentencePiece's BPE encoder starts from characters and repeatedly merges the adjacent pair whose
concatenation is the highest-scoring piece of the vocabulary; characters left outside the
vocabulary become their UTF-8 bytes (``<0xNN>`` pieces). The same as a ``tokenizers`` BPE model:
the merges are every (left, right) split of every normal piece into two pieces, ranked by the
score of the piece they form; no pre-tokenizer (SentencePiece's BPE encoder does not split at
spaces either); the normalizer only escapes spaces.

Special tokens are the data pipeline's: ``</s>`` (eos) ends every document and is the
end-of-document token, ``<pad>`` pads, ``<s>`` (bos) exists but is never added (divprec's
documents start without it), ``<unk>``. Neither bos nor eos is added when encoding, and special
tokens written in the text are not parsed (``split_special_tokens``): SentencePiece encodes the
text "</s>" as ordinary pieces too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from divprec.interop.hf_mapping import NotExpressible

_NORMAL = 1  # sentencepiece ModelProto.SentencePiece.Type
_UNKNOWN, _CONTROL, _BYTE = 2, 3, 6
_BPE = 2  # TrainerSpec.ModelType
SPACE = "\u2581"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def _model_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _check_convertible(proto, model_file: Path) -> None:
    """Raise :class:`NotExpressible` for a SentencePiece model this conversion is not exact for."""
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    problems = {
        "model_type is not bpe": trainer.model_type != _BPE,
        "byte_fallback is off": not trainer.byte_fallback,
        f"normalization {normalizer.name!r} is not identity": normalizer.name != "identity",
        "add_dummy_prefix is on": normalizer.add_dummy_prefix,
        "remove_extra_whitespaces is on": normalizer.remove_extra_whitespaces,
        "treat_whitespace_as_suffix is on": trainer.treat_whitespace_as_suffix,
    }
    found = [name for name, bad in problems.items() if bad]
    if found:
        raise NotExpressible(
            f"tokenizer {model_file}: {found[0]}; only tokenizers trained by divprec "
            "(tools/train_tokenizer.py) are converted"
        )


def check_convertible(model_file: Path) -> None:
    """Raise :class:`NotExpressible` unless ``model_file`` is a model divprec trains (BPE, byte
    fallback, identity normalisation, no dummy prefix)."""
    _check_convertible(_model_proto(model_file), model_file)


def special_tokens(model_file: Path) -> dict[str, tuple[str, int]]:
    """role (bos, eos, pad, unk) -> (piece, id) of the SentencePiece model."""
    proto = _model_proto(model_file)
    spec = proto.trainer_spec
    ids = {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id, "unk": spec.unk_id}
    return {role: (proto.pieces[i].piece, i) for role, i in ids.items() if i >= 0}


def build_tokenizer(model_file: Path):
    """The ``tokenizers.Tokenizer`` whose ids equal the SentencePiece model's on every text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = _model_proto(model_file)
    _check_convertible(proto, model_file)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    scores = [p.score for p in proto.pieces]
    merges = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                # Higher score merges first; among splits of one piece, the order of the pieces.
                merges.append((-scores[index], index, normal[left], normal[right], left, right))
    merges.sort()
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    bpe = models.BPE(
        vocab=vocab,
        merges=[(m[4], m[5]) for m in merges],
        unk_token=unk,
        byte_fallback=True,
        fuse_unk=True,
        ignore_merges=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = [
        AddedToken(p.piece, special=True, normalized=False)
        for p in proto.pieces
        if p.type in (_CONTROL, _UNKNOWN)
    ]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def tokenizer_config(model_file: Path, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: the fast tokenizer, no bos/eos added, the special tokens."""
    roles = special_tokens(model_file)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # Text is text: "</s>" written in a document is three pieces, as in divprec's pipeline;
        # the special ids come only from the code that adds them (eod after each document).
        "split_special_tokens": True,
        **{f"{role}_token": piece for role, (piece, _) in roles.items()},
    }


def write_hf_tokenizer(model_file: Path, out: Path, max_length: int) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out``;
    returns the special ids for config.json (``bos_token_id``, ``eos_token_id``, ...)."""
    out = Path(out)
    build_tokenizer(model_file).save(str(out / TOKENIZER_JSON))
    config = tokenizer_config(model_file, max_length)
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    roles = special_tokens(model_file)
    (out / SPECIAL_TOKENS_MAP).write_text(
        json.dumps({f"{r}_token": p for r, (p, _) in roles.items()}, indent=2) + "\n"
    )
    return {f"{role}_token_id": i for role, (_, i) in roles.items() if role != "unk"}
