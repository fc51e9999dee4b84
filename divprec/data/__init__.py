"""Training data: tokenizer, preprocessing to megatron indexed datasets, the embedded default
corpus, megatron-core GPT datasets and the resumable batch order.

Modules (import what you need; megatron-core is only imported where it is used):
    config          DataConfig (the Hydra ``data`` group) and validate_data_config
    tokenizer       Tokenizer (SentencePiece) and train_tokenizer
    documents       reading .jsonl/.txt inputs in a fixed order
    preprocess      preprocess_files: text -> <prefix>.bin/.idx (+ .meta.json)
    sidecar         <prefix>.meta.json: the tokenizer and largest id the data was written with
    checks          check_data: start-up checks of the files, splits and token ids (one line each)
    default_corpus  ensure_default_corpus: the stdlib sources, built once and cached
    megatron_helpers  the check that megatron-core's compiled index helpers import
    dataset         build_gpt_datasets: train/valid/test from a DataConfig
    batches         build_batch_iterator: deterministic, resumable, DP-size-independent order
"""
