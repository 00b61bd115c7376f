"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness (the ``eval`` extra).

Files: scoring (log-likelihoods of token sequences in batched, padded, jitted forward
passes), generation (batched decoding from prompts of different lengths on the KV cache),
harness (the harness's model ``moeut-jax``; importing it imports ``lm_eval`` and registers
the model), run (``train.py eval --tasks``: results JSON and table in the workdir).

Only ``harness`` and ``run`` use ``lm_eval``; this package imports neither.
"""
