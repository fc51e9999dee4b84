"""Pieces shared by the benchmarks in tools/ (bench_loss.py, bench_threshold.py).

- common: inputs, timing helpers, machine facts, JSON output;
- memory: peak memory of one call (live tensors or the process's resident set);
- loss_calls: the timed calls of the loss benchmark, run in this process or in each tp rank's.
"""
