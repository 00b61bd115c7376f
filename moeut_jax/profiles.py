"""Model sizes as named presets: ``MoEUTLM(n_tokens, **profiles.MoEUT_244M)``.

The six profiles of the paper (Csordás et al., 2024), as published with the original
code, plus ``MoEUT_tiny``, which trains in minutes on a 2-core CPU.
"""

MoEUT_44M = dict(d_model=412, n_layers=16, n_heads=4, ff_n_experts=155, ff_expert_size=128,
                 att_n_experts=8, d_head=82, group_size=2, ff_k=12, att_k=2)

MoEUT_126M = dict(d_model=768, n_layers=18, n_heads=4, ff_n_experts=254, ff_expert_size=128,
                  att_n_experts=10, d_head=96, group_size=2, ff_k=12, att_k=2)

MoEUT_244M = dict(d_model=1024, n_layers=18, n_heads=4, ff_n_experts=387, ff_expert_size=128,
                  att_n_experts=10, d_head=128, group_size=2, ff_k=16, att_k=2)

MoEUT_318M = dict(d_model=1024, n_layers=24, n_heads=4, ff_n_experts=338, ff_expert_size=128,
                  att_n_experts=10, d_head=128, group_size=3, ff_k=16, att_k=2)

# The paper's 727M run used d_model=1280; the published profile (this one) has d_model=1024.
MoEUT_727M = dict(d_model=1024, n_layers=36, n_heads=5, ff_n_experts=467, ff_expert_size=128,
                  att_n_experts=13, d_head=128, group_size=4, ff_k=20, att_k=2)

MoEUT_1B = dict(d_model=1536, n_layers=36, n_heads=6, ff_n_experts=565, ff_expert_size=128,
                att_n_experts=12, d_head=128, group_size=4, ff_k=24, att_k=2)

# Not from the paper: small enough to train on a laptop CPU in minutes.
MoEUT_tiny = dict(d_model=128, n_layers=4, n_heads=4, ff_n_experts=16, ff_expert_size=64,
                  att_n_experts=4, d_head=32, group_size=2, ff_k=4, att_k=2)

PAPER_PROFILES = ("MoEUT_44M", "MoEUT_126M", "MoEUT_244M", "MoEUT_318M", "MoEUT_727M", "MoEUT_1B")
ALL_PROFILES = PAPER_PROFILES + ("MoEUT_tiny",)


def get(name: str) -> dict:
  """The profile called ``name`` (a copy), with a clear error for unknown names."""
  if name not in ALL_PROFILES:
    raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(ALL_PROFILES)}")
  return dict(globals()[name])
