"""Evaluation of trained checkpoints: loading, sampling, pass@k, token statistics, synthetic tasks.

Modules: passk (unbiased pass@k), synthetic (verifiable arithmetic), model (load a checkpoint),
nucleus (temperature / top-p draws), decoding (KV-cached next-token logits), sampling (batched
generation), perplexity (held-out token statistics). Import from the modules: importing this
package stays cheap (no megatron-core).
"""
