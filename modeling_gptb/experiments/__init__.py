"""Reproducible experiments for GPTB and its ART memory (issue 6).

Run one with `gptb experiment NAME [--preset cpu|gpu|mini] [--seeds N] [--out DIR]` (or
`python -m modeling_gptb.experiments NAME ...`). Each writes `report.md`, `results.json` and PNG plots into
`./gptb-experiments/NAME/` (or `--out`); the published runs live in the repository's `experiments/results/`.

- `sample_efficiency`: GPTB vs GPT-2 (context 64 and 256) at equal tokens and FLOPs, with state-size and
  rebias ablations.
- `novelty`: ART novelty vs nearest-neighbour cosine distance and per-token loss as out-of-domain detectors.
- `continual`: forgetting of domain A after training on domain B, plain vs ART gate / coupled loss / both.
- `memory`: recall at a random key position, MQAR, selective copying and parity: GPTB state-update variants vs
  GPT-2 (full and short context), an LSTM and the `rebias=False` control.
"""

EXPERIMENTS = ("sample_efficiency", "novelty", "continual", "memory")
