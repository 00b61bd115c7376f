"""moeut-jax: MoEUT (Mixture-of-Experts Universal Transformers) in JAX/Flax."""
from moeut_jax.generate import generate
from moeut_jax.kv_cache import KVCache
from moeut_jax.losses import head_nll, token_nll
from moeut_jax.masks import AttentionMask
from moeut_jax.model import MoEUT, MoEUTLM, MoEUTOutput

__all__ = ["AttentionMask", "KVCache", "MoEUT", "MoEUTLM", "MoEUTOutput", "generate",
           "head_nll", "token_nll"]
