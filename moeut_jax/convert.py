"""Converters between PyTorch state dicts of the original (docs/semantics.md §8) and our
parameters.

  params = from_torch_state_dict(state_dict)        # MoEUTLM or bare MoEUT, either layout
  model.apply({"params": params}, tokens)
  sd = to_torch_state_dict(params)                  # dict[str, numpy.ndarray]
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})

Layouts (torch -> ours): linear weights [out, in] become [in, ...] kernels; routers
[E, D] become [D, E]; the expert tensors ``keys, values, v, o`` (Ea > 1) are identical.
Every conversion is a transpose or reshape, so the round trip is exact.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

_LAYER_RE = re.compile(r"^(?:transformer\.)?layers\.(\d+)\.(.+)$")
_LAYER_KEYS_SWITCHHEAD = ("attention.q.weight", "attention.k.weight", "attention.v",
                          "attention.o", "attention.sel_v", "attention.sel_o")
_LAYER_KEYS_GATED = ("attention.q.weight", "attention.k.weight", "attention.v", "attention.o",
                     "attention.sel_o")
_LAYER_KEYS_COMMON = ("ffn.keys", "ffn.values", "ffn.expert_sel", "ln1.weight", "ln1.bias",
                      "ln2.weight", "ln2.bias")
_LM_KEYS = ("embedding.weight", "lm_head.weight", "lm_head.bias", "out_norm.weight",
            "out_norm.bias")


class ConversionError(ValueError):
  """A state dict or parameter tree that does not describe a MoEUT model."""


def _to_numpy(value, key: str) -> np.ndarray:
  if hasattr(value, "detach"):                       # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  try:
    return np.asarray(value)
  except Exception as e:                              # pragma: no cover - exotic inputs
    raise ConversionError(f"{key}: cannot convert a {type(value).__name__} to an array") from e


def _expect(key: str, arr: np.ndarray, shape: tuple) -> None:
  if arr.shape != tuple(shape):
    raise ConversionError(f"{key}: expected shape {tuple(shape)}, got {arr.shape}")


def _layer_dims(get, prefix: str) -> dict:
  """D, H, Dh, Ea, Ef, Es of one layer, read from its tensors."""
  keys = get(prefix + "ffn.keys")
  if keys.ndim != 3:
    raise ConversionError(f"{prefix}ffn.keys: expected [Ef, D, Es], got shape {keys.shape}")
  ef, d, es = keys.shape
  q = get(prefix + "attention.q.weight")
  if q.ndim != 2:
    raise ConversionError(f"{prefix}attention.q.weight: expected [H*Dh, D], got {q.shape}")
  v = get(prefix + "attention.v")
  if v.ndim == 3:                                     # SwitchHead: v [H*Ea, D, Dh]
    dh = v.shape[2]
    if q.shape[0] % dh:
      raise ConversionError(f"{prefix}attention.q.weight: {q.shape[0]} rows is not a multiple "
                            f"of d_head={dh} (from attention.v {v.shape})")
    h = q.shape[0] // dh
    if v.shape[0] % h:
      raise ConversionError(f"{prefix}attention.v: {v.shape[0]} experts is not a multiple of "
                            f"n_heads={h}")
    ea = v.shape[0] // h
  else:                                               # gated: sel_o [H, D]
    h = get(prefix + "attention.sel_o").shape[0]
    if q.shape[0] % h:
      raise ConversionError(f"{prefix}attention.q.weight: {q.shape[0]} rows is not a multiple "
                            f"of n_heads={h} (from attention.sel_o)")
    dh, ea = q.shape[0] // h, 1
  return dict(d=d, h=h, dh=dh, ea=ea, ef=ef, es=es)


def from_torch_state_dict(state_dict: Mapping[str, Any], model=None) -> dict:
  """Converts the original's state dict to our ``params`` (the tree under "params").

  Args:
    state_dict: names of docs/semantics.md §8 -> torch tensors or numpy arrays.
      ``MoEUTLM`` (with ``embedding.weight``) or a bare ``MoEUT``; SwitchHead or gated
      attention.
    model: optional MoEUT/MoEUTLM; if given, every shape is checked against it.

  Raises:
    ConversionError naming the key, for unknown, missing or mis-shaped entries.
  """
  sd = {str(k): v for k, v in state_dict.items()}
  is_lm = "embedding.weight" in sd
  prefix_root = "transformer." if is_lm else ""
  layers: dict[int, set] = {}
  for key in sd:
    if key in _LM_KEYS:
      if not is_lm:
        raise ConversionError(f"{key}: unexpected without embedding.weight")
      continue
    m = _LAYER_RE.match(key)
    if m is None or (is_lm != key.startswith("transformer.")):
      raise ConversionError(f"{key}: unknown key for a {'MoEUTLM' if is_lm else 'MoEUT'} "
                            "state dict")
    layers.setdefault(int(m.group(1)), set()).add(m.group(2))
  if not layers:
    raise ConversionError(f"no {prefix_root}layers.* keys found in the state dict")
  n_groups = max(layers) + 1
  if is_lm:
    for key in _LM_KEYS:
      if key not in sd:
        raise ConversionError(f"{key}: missing from the state dict")

  arrays: dict[str, np.ndarray] = {}

  def get(key):
    if key not in arrays:
      if key not in sd:
        raise ConversionError(f"{key}: missing from the state dict")
      arrays[key] = _to_numpy(sd[key], key)
    return arrays[key]

  group = {}
  dims0 = None
  for g in range(n_groups):
    p = f"{prefix_root}layers.{g}."
    names = layers.get(g, set())
    dims = _layer_dims(get, p)
    if dims0 is None:
      dims0 = dims
    elif dims != dims0:
      raise ConversionError(f"{p}: layer dimensions {dims} differ from layer 0's {dims0}")
    expected = _LAYER_KEYS_COMMON + (_LAYER_KEYS_SWITCHHEAD if dims["ea"] > 1
                                     else _LAYER_KEYS_GATED)
    for name in sorted(names - set(expected)):
      raise ConversionError(f"{p}{name}: unknown key for this attention layout")
    for name in expected:
      get(p + name)                                  # raises for a missing key
    d, h, dh, ea, ef, es = (dims[n] for n in ("d", "h", "dh", "ea", "ef", "es"))
    _expect(p + "attention.q.weight", get(p + "attention.q.weight"), (h * dh, d))
    _expect(p + "attention.k.weight", get(p + "attention.k.weight"), (h * dh, d))
    _expect(p + "ffn.values", get(p + "ffn.values"), (ef, es, d))
    _expect(p + "ffn.expert_sel", get(p + "ffn.expert_sel"), (ef, d))
    for ln in ("ln1", "ln2"):
      _expect(f"{p}{ln}.weight", get(f"{p}{ln}.weight"), (d,))
      _expect(f"{p}{ln}.bias", get(f"{p}{ln}.bias"), (d,))
    att = {"q": get(p + "attention.q.weight").T.reshape(d, h, dh),
           "k": get(p + "attention.k.weight").T.reshape(d, h, dh)}
    if ea > 1:
      _expect(p + "attention.v", get(p + "attention.v"), (h * ea, d, dh))
      _expect(p + "attention.o", get(p + "attention.o"), (h * ea, dh, d))
      _expect(p + "attention.sel_v", get(p + "attention.sel_v"), (h * ea, d))
      _expect(p + "attention.sel_o", get(p + "attention.sel_o"), (h * ea, d))
      att.update(v=get(p + "attention.v"), o=get(p + "attention.o"),
                 sel_v=get(p + "attention.sel_v").T, sel_o=get(p + "attention.sel_o").T)
    else:
      _expect(p + "attention.v", get(p + "attention.v"), (h * dh, d))
      _expect(p + "attention.o", get(p + "attention.o"), (d, h * dh))
      _expect(p + "attention.sel_o", get(p + "attention.sel_o"), (h, d))
      att.update(v=get(p + "attention.v").T.reshape(d, h, dh),
                 o=get(p + "attention.o").T.reshape(h, dh, d),
                 sel_o=get(p + "attention.sel_o").T)
    group[f"layer_{g}"] = {
        "attention": att,
        "ffn": {"keys": get(p + "ffn.keys"), "values": get(p + "ffn.values"),
                "expert_sel": get(p + "ffn.expert_sel").T},
        "ln1": {"scale": get(p + "ln1.weight"), "bias": get(p + "ln1.bias")},
        "ln2": {"scale": get(p + "ln2.weight"), "bias": get(p + "ln2.bias")},
    }

  params: dict = {"layers": group}
  if is_lm:
    d = dims0["d"]
    emb = get("embedding.weight")
    if emb.ndim != 2 or emb.shape[1] != d:
      raise ConversionError(f"embedding.weight: expected [V, {d}], got {emb.shape}")
    v = emb.shape[0]
    _expect("lm_head.weight", get("lm_head.weight"), (v, d))
    _expect("lm_head.bias", get("lm_head.bias"), (v,))
    _expect("out_norm.weight", get("out_norm.weight"), (d,))
    _expect("out_norm.bias", get("out_norm.bias"), (d,))
    params = {"embedding": emb, "transformer": params,
              "out_norm": {"scale": get("out_norm.weight"), "bias": get("out_norm.bias")},
              "lm_head": {"kernel": get("lm_head.weight").T, "bias": get("lm_head.bias")}}
  params = _copy_tree(params)
  if model is not None:
    check_params(params, model)
  return params


def _copy_tree(tree):
  if isinstance(tree, dict):
    return {k: _copy_tree(v) for k, v in tree.items()}
  return np.array(tree, copy=True)


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (str(k),))
  else:
    yield prefix, tree


def check_params(params: Mapping, model) -> None:
  """Raises ConversionError naming the first parameter whose presence or shape differs
  from what ``model`` (MoEUT or MoEUTLM) expects."""
  import jax
  import jax.numpy as jnp
  from moeut_jax.model import MoEUTLM
  x = (jnp.zeros((1, 1), jnp.int32) if isinstance(model, MoEUTLM)
       else jnp.zeros((1, 1, model.d_model), jnp.float32))
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  want = {"/".join(k): v.shape for k, v in _flatten(expected)}
  have = {"/".join(k): np.shape(v) for k, v in _flatten(params)}
  for k in sorted(set(have) - set(want)):
    raise ConversionError(f"{k}: not a parameter of this model")
  for k in sorted(set(want) - set(have)):
    raise ConversionError(f"{k}: missing (the model expects shape {want[k]})")
  for k in sorted(want):
    if tuple(have[k]) != tuple(want[k]):
      raise ConversionError(f"{k}: the model expects shape {want[k]}, got {have[k]}")


def to_torch_state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """Converts our ``params`` (or ``{"params": ...}``) to the original's state dict."""
  if "params" in params and len(params) == 1:
    params = params["params"]
  arr = lambda x: np.array(np.asarray(x), copy=True)
  is_lm = "transformer" in params
  if is_lm:
    for k in ("embedding", "out_norm", "lm_head"):
      if k not in params:
        raise ConversionError(f"{k}: missing from a MoEUTLM parameter tree")
  stack = params["transformer"] if is_lm else params
  if "layers" not in stack:
    raise ConversionError("layers: missing from the parameter tree")
  root = "transformer." if is_lm else ""
  sd: dict[str, np.ndarray] = {}
  names = sorted(stack["layers"], key=lambda n: int(n.split("_")[-1]))
  for i, name in enumerate(names):
    if name != f"layer_{i}":
      raise ConversionError(f"layers/{name}: expected layer_{i}")
    lp = stack["layers"][name]
    p = f"{root}layers.{i}."
    att, ffn = lp["attention"], lp["ffn"]
    d, h, dh = np.shape(att["q"])
    sd[p + "attention.q.weight"] = arr(att["q"]).reshape(d, h * dh).T.copy()
    sd[p + "attention.k.weight"] = arr(att["k"]).reshape(d, h * dh).T.copy()
    if "sel_v" in att:
      sd[p + "attention.v"] = arr(att["v"])
      sd[p + "attention.o"] = arr(att["o"])
      sd[p + "attention.sel_v"] = arr(att["sel_v"]).T.copy()
      sd[p + "attention.sel_o"] = arr(att["sel_o"]).T.copy()
    else:
      sd[p + "attention.v"] = arr(att["v"]).reshape(d, h * dh).T.copy()
      sd[p + "attention.o"] = arr(att["o"]).reshape(h * dh, d).T.copy()
      sd[p + "attention.sel_o"] = arr(att["sel_o"]).T.copy()
    sd[p + "ffn.keys"] = arr(ffn["keys"])
    sd[p + "ffn.values"] = arr(ffn["values"])
    sd[p + "ffn.expert_sel"] = arr(ffn["expert_sel"]).T.copy()
    for ln in ("ln1", "ln2"):
      sd[f"{p}{ln}.weight"] = arr(lp[ln]["scale"])
      sd[f"{p}{ln}.bias"] = arr(lp[ln]["bias"])
  if is_lm:
    sd["embedding.weight"] = arr(params["embedding"])
    sd["lm_head.weight"] = arr(params["lm_head"]["kernel"]).T.copy()
    sd["lm_head.bias"] = arr(params["lm_head"]["bias"])
    sd["out_norm.weight"] = arr(params["out_norm"]["scale"])
    sd["out_norm.bias"] = arr(params["out_norm"]["bias"])
  return sd


def kv_cache_to_torch(cache, group_size: int) -> dict[int, dict[str, np.ndarray]]:
  """Our KVCache -> the original's cache: {absolute layer: {"k", "v"}}, each [B, H, S, Dh],
  keys scaled but NOT rotated (the original rotates them at every use). Only the filled
  positions of a fixed-capacity cache are exported."""
  from moeut_jax.rope import apply_rope, rotary_width
  import jax.numpy as jnp
  length = int(cache.length)
  if len(cache.k) != group_size:
    raise ConversionError(f"the cache holds {len(cache.k)} distinct layers, not "
                          f"group_size={group_size}")
  repeats, d_head = cache.k[0].shape[0], cache.k[0].shape[-1]
  positions = jnp.arange(length, dtype=jnp.int32)
  out = {}
  for index in range(repeats * group_size):
    k, v = cache.layer(index, group_size)                             # [B, S, H, Dh]
    k = apply_rope(k[:, :length].astype(jnp.float32), -positions, rotary_width(d_head))
    out[index] = {"k": np.transpose(np.asarray(k), (0, 2, 1, 3)),
                  "v": np.transpose(np.asarray(v[:, :length], np.float32), (0, 2, 1, 3))}
  return out


def kv_cache_from_torch(cache: Mapping[int, Mapping[str, Any]], group_size: int, dtype=None):
  """The original's cache (see :func:`kv_cache_to_torch`) -> a growing KVCache that our
  model continues from; keys are rotated at their absolute positions."""
  import jax.numpy as jnp
  from moeut_jax.kv_cache import KVCache
  from moeut_jax.rope import apply_rope, rotary_width
  layers = sorted(int(i) for i in cache)
  if not layers or layers != list(range(len(layers))) or len(layers) % group_size:
    raise ConversionError(f"cache layers {layers} are not 0..n_layers-1 with n_layers a "
                          f"multiple of group_size={group_size}")
  repeats = len(layers) // group_size
  ks, vs = [[None] * repeats for _ in range(group_size)], [[None] * repeats
                                                           for _ in range(group_size)]
  shape = None
  for index in layers:
    entry = cache[index] if index in cache else cache[str(index)]
    for name in ("k", "v"):
      if name not in entry:
        raise ConversionError(f"cache[{index}]: missing {name!r}")
    k, v = _to_numpy(entry["k"], f"cache[{index}].k"), _to_numpy(entry["v"], f"cache[{index}].v")
    if k.ndim != 4 or k.shape != v.shape or (shape is not None and k.shape != shape):
      raise ConversionError(f"cache[{index}]: k {k.shape} and v {v.shape} must both be "
                            f"[B, H, S, Dh]{'' if shape is None else f' = {shape}'}")
    shape = k.shape
    r, g = divmod(index, group_size)
    ks[g][r], vs[g][r] = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, S, H, Dh]
  b, h, s, dh = shape
  dtype = dtype or jnp.float32
  positions = jnp.arange(s, dtype=jnp.int32)
  rot = lambda k: apply_rope(jnp.asarray(k, jnp.float32), positions, rotary_width(dh))
  k = tuple(jnp.stack([rot(x) for x in per_g]).astype(dtype) for per_g in ks)
  v = tuple(jnp.stack([jnp.asarray(x) for x in per_g]).astype(dtype) for per_g in vs)
  return KVCache(k=k, v=v, length=jnp.asarray(s, jnp.int32), fixed=False)
