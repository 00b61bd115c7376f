"""The original's ``profiles`` module: ``MoEUTLM(n_tokens, **profiles.MoEUT_244M)``.

The presets live in :mod:`moeut_jax.profiles`; this top-level module re-exports them
for code written against the original. Library, benchmark and training code import
``moeut_jax.profiles`` (another ``profiles`` module on ``sys.path``, such as the
original's, must not shadow ours).
"""
from moeut_jax.profiles import *  # noqa: F401,F403
from moeut_jax.profiles import PAPER_PROFILES, get  # noqa: F401
