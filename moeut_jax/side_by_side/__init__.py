"""The official PyTorch MoEUT and moeut-jax trained side by side from the same weights.

  python -m moeut_jax.side_by_side --original PATH --text FILE_OR_FOLDER \\
      --profile MoEUT_126M --steps 300 --batch 16 --seq 512 --out runs/side_by_side

Both start from one set of initial weights (the original's initialisation, carried over
with :mod:`moeut_jax.convert`) and read the same batches of byte-level tokens of the given
text, for the same steps of AdamW with gradient clipping and the same learning rates (the
paper's recipe, docs/semantics.md §9). Each run (a *variant*) is a process of its own:

  original            the official model from PATH (its own Triton CVMM on a GPU, under
                      bf16 autocast; on a CPU, in float32, with a plain-PyTorch stand-in
                      for its CVMM op, :mod:`.original`); given twice, its run-to-run spread
  original+efficient_attention
                      the same with PyTorch's cuDNN attention backend off (its attention,
                      called with a boolean mask, then runs the memory-efficient kernel;
                      not counted in the spread)
  original+float32_routers, +float32_cvmm, +float32_sigma_moe, +float32_attention,
  +float32_qk, +float32_sdpa, +float32_rope_table
                      the original with one part out of its bf16 autocast (in float32):
                      its routers' logits, its CVMM calls, its σ-MoE modules, its
                      SwitchHead modules, its q and k projections, its attention kernel,
                      its RoPE angle table; to find which part's rounding changes its curve
  jax                 moeut-jax as it is
  jax+OPTION[+...]    moeut-jax with options that compute as the original does:
                      original_routers  router_dtype = the compute dtype
                      original_cvmm     CvmmConfig(impl="original"): the original's kernels
                      original_rope     rope_table_dtype = the compute dtype (its RoPE
                                        angles in bf16, as on a GPU)

It prints the training losses side by side, the held-out losses with each run's distance
from the original's and the original's own spread, and writes the curves to a PNG.

Modules: :mod:`.shared` (the shared data, weights and learning rates), :mod:`.original`
and :mod:`.ours` (one training run each), :mod:`.report` (tables and the PNG),
:mod:`.cli` (the command and its processes), :mod:`.worker` (one variant's process),
:mod:`.collect` (one table from runs of one setup made by several commands).
"""
from moeut_jax.side_by_side.shared import Setup, Variant, parse_variant, prepare

__all__ = ["Setup", "Variant", "parse_variant", "prepare"]
