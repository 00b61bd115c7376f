"""Data: text, JSON Lines or pre-tokenized files -> a token stream -> Grain batches.

Text and JSON Lines are tokenized once and cached under ``<workdir>/data`` as raw token files
(memory-mapped afterwards); pre-tokenized ``.npy``/``.bin`` files are memory-mapped in place, the
fast path for large corpora. The held-out split is the end of the token stream (after a seeded
shuffle of the documents, for text).

Training examples are windows of T + 1 tokens starting at multiples of T (inputs and shifted
targets). The Grain pipeline shuffles window indices (a new order each epoch), batches the
*global* batch of B indices, and each process reads only its rows, so the batches do not depend
on the number of processes. The iterator's state (one integer) is saved in every checkpoint.

Shapes: A = micro-batches per step (gradient accumulation), M = sequences per micro-batch
(B = A * M), P = processes, T = sequence length.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import sysconfig
from typing import Iterator, Optional, Sequence

import grain
import numpy as np

from moeut_jax.training import tokenizer as tokenizer_lib
from moeut_jax.training.config import Config
from moeut_jax.training.errors import DataError, TokenizerError

TOKEN_SUFFIXES = (".npy", ".bin")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Files a folder contributes as plain text (everything else in a folder is skipped).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".js", ".ts",
                 ".java", ".go", ".rs", ".tex", ".html", ".csv", ".json")


# ---------------------------------------------------------------------------------------------
# Finding and reading the sources.

def default_sources() -> list[str]:
  """The .py files of Python's standard library (without tests and site-packages)."""
  stdlib = sysconfig.get_paths()["stdlib"]
  skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
  files = []
  for root, dirs, names in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in skip)
    files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))
  if not files:
    raise DataError(f"found no .py files under Python's standard library at {stdlib!r}; "
                    f"give --data")
  return sorted(files)


def _kind(path: str) -> str:
  if path.endswith(TOKEN_SUFFIXES):
    return "tokens"
  if path.endswith(JSONL_SUFFIXES):
    return "jsonl"
  return "text"


def resolve_sources(data: Sequence[str]) -> tuple[str, list[str]]:
  """("tokens" | "text", files). Folders are searched recursively; order is sorted."""
  if not data:
    return "text", default_sources()
  files = []
  for entry in data:
    if os.path.isdir(entry):
      found = [p for p in sorted(glob.glob(os.path.join(entry, "**", "*"), recursive=True))
               if os.path.isfile(p) and not os.path.basename(p).startswith(".")
               and p.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + TOKEN_SUFFIXES)]
      if not found:
        raise DataError(f"data folder {entry!r} has no usable files (text: "
                        f"{', '.join(TEXT_SUFFIXES)}; JSON Lines: {', '.join(JSONL_SUFFIXES)}; "
                        f"tokens: {', '.join(TOKEN_SUFFIXES)})")
      files.extend(found)
    elif os.path.isfile(entry):
      files.append(entry)
    else:
      raise DataError(f"data path {entry!r} does not exist")
  kinds = {_kind(f) == "tokens" for f in files}
  if len(kinds) > 1:
    raise DataError("cannot mix pre-tokenized files (.npy/.bin) with text in --data")
  return ("tokens" if kinds == {True} else "text"), files


# A text file that holds a NUL byte, or more than this share of bytes that are not UTF-8, is
# refused as binary (an executable or an image saved as .txt) unless allowed explicitly.
MAX_UNDECODABLE_SHARE = 0.05


def _decode_text(path: str, raw: bytes, allow_binary: bool) -> str:
  """UTF-8 text of a file (undecodable bytes replaced); a DataError if it looks binary."""
  text = raw.decode("utf-8", errors="replace")
  if allow_binary:
    return text
  advice = ("; give text, JSON Lines or token files, or --allow-binary-text to train on it "
            "anyway")
  nul = raw.find(b"\0")
  if nul >= 0:
    raise DataError(f"{path!r} does not look like text: it holds NUL bytes (the first at byte "
                    f"{nul:,} of {len(raw):,}), as binary files do{advice}")
  # Each undecodable sequence became one U+FFFD; U+FFFD written in the file is not counted.
  bad = text.count("\ufffd") - raw.count("\ufffd".encode())
  if bad > MAX_UNDECODABLE_SHARE * len(raw):
    raise DataError(f"{path!r} does not look like text: {bad:,} of its {len(raw):,} bytes "
                    f"({bad / len(raw):.0%}) are not UTF-8 (more than "
                    f"{MAX_UNDECODABLE_SHARE:.0%}){advice}")
  return text


def read_documents(files: Sequence[str], text_field: str,
                   allow_binary: bool = False) -> list[str]:
  """One string per text file, one per JSON Lines record; empty documents are dropped.

  Text files that look binary (see ``MAX_UNDECODABLE_SHARE``) raise a DataError unless
  ``allow_binary``."""
  docs = []
  for path in files:
    if _kind(path) == "jsonl":
      opener = gzip.open if path.endswith(".gz") else open
      with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON: {e}") from e
          if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{lineno} has no field {text_field!r} (set --text-field)")
          if not isinstance(record[text_field], str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string")
          if record[text_field]:
            docs.append(record[text_field])
    else:
      with open(path, "rb") as f:
        text = _decode_text(path, f.read(), allow_binary)
      if text:
        docs.append(text)
  return docs


# ---------------------------------------------------------------------------------------------
# Token streams.

class TokenStream:
  """A read-only concatenation of 1-D token arrays (memory maps), sliceable by position."""

  def __init__(self, arrays: Sequence[np.ndarray], start: int = 0, stop: Optional[int] = None):
    self._arrays = list(arrays)
    self._offsets = np.cumsum([0] + [len(a) for a in self._arrays])
    total = int(self._offsets[-1])
    self.start, self.stop = start, total if stop is None else stop

  def __len__(self) -> int:
    return self.stop - self.start

  def split(self, at: int) -> tuple["TokenStream", "TokenStream"]:
    a = TokenStream(self._arrays, self.start, self.start + at)
    b = TokenStream(self._arrays, self.start + at, self.stop)
    return a, b

  def read(self, start: int, stop: int) -> np.ndarray:
    """tokens[start:stop] as int32, clipped to the stream's end."""
    start, stop = self.start + start, min(self.start + stop, self.stop)
    out = []
    i = int(np.searchsorted(self._offsets, start, side="right")) - 1
    while start < stop:
      lo = start - self._offsets[i]
      hi = min(stop, self._offsets[i + 1]) - self._offsets[i]
      out.append(np.asarray(self._arrays[i][lo:hi], np.int32))
      start = self._offsets[i] + hi
      i += 1
    return np.concatenate(out) if out else np.zeros([0], np.int32)

  def max_token(self, chunk: int = 1 << 24) -> int:
    m = -1
    for i in range(0, len(self), chunk):
      m = max(m, int(self.read(i, i + chunk).max()))
    return m


def _load_token_file(path: str, token_dtype: str) -> np.ndarray:
  try:
    if path.endswith(".npy"):
      arr = np.load(path, mmap_mode="r")
    else:
      arr = np.memmap(path, dtype=token_dtype, mode="r")
  except (ValueError, OSError) as e:
    raise DataError(f"cannot read token file {path!r}: {e}") from e
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise DataError(f"token file {path!r} must hold a 1-D integer array, got "
                    f"{arr.dtype}{list(arr.shape)}")
  return arr


# ---------------------------------------------------------------------------------------------
# Preparing the data of a run.

@dataclasses.dataclass
class Data:
  train: TokenStream
  valid: TokenStream
  vocab_size: int
  tokenizer: Optional[tokenizer_lib.Tokenizer]
  description: str


def _fingerprint(config: Config, files: Sequence[str]) -> str:
  h = hashlib.sha256()
  for f in files:
    st = os.stat(f)
    h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
  for name in ("text_field", "tokenizer", "vocab_size", "tokenizer_train_chars",
               "eval_fraction"):
    h.update(f"{name}={getattr(config, name)!r}\n".encode())
  return h.hexdigest()


def cache_dir(workdir: str) -> str:
  return os.path.join(workdir, "data")


def _split(stream: TokenStream, config: Config, what: str) -> tuple[TokenStream, TokenStream]:
  n = len(stream)
  n_valid = max(int(n * config.eval_fraction), 2)
  if n - n_valid < config.seq_len + 1:
    raise DataError(f"{what} has only {n} tokens: too few for seq_len={config.seq_len} plus a "
                    f"held-out split of {config.eval_fraction:.1%}; give more data or a "
                    f"smaller --seq-len")
  return stream.split(n - n_valid)


def prepare(config: Config, workdir: str, *, is_main: bool = True,
            has_checkpoint: bool = False, log=print) -> Data:
  """Finds, tokenizes (once, cached) and splits the data of ``config``."""
  kind, files = resolve_sources(config.data)
  what = "the data " + (", ".join(config.data) if config.data else
                        f"(Python standard library, {len(files)} files)")
  tok = None
  if config.tokenizer:
    tok = tokenizer_lib.Tokenizer(config.tokenizer)
    tokenizer_lib.check_vocab(tok, config.vocab_size, "--vocab-size")

  if kind == "tokens":
    stream = TokenStream([_load_token_file(f, config.token_dtype) for f in files])
    if len(stream) == 0:
      raise DataError(f"{what} is empty (0 tokens)")
    top = stream.max_token()
    if top >= config.vocab_size:
      raise TokenizerError(f"{what} holds token id {top}, outside the model's vocabulary of "
                           f"{config.vocab_size} (set --vocab-size)")
    train, valid = _split(stream, config, what)
    return Data(train, valid, config.vocab_size, tok, what)

  cdir = cache_dir(workdir)
  meta_path = os.path.join(cdir, "cache.json")
  fingerprint = _fingerprint(config, files)
  meta = None
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("fingerprint") != fingerprint:
      if has_checkpoint:
        raise DataError(f"{what} (or the tokenizer settings) changed since the checkpoint in "
                        f"{workdir!r} was written; resuming would read other tokens. Use a new "
                        f"--workdir, or restore the data")
      meta = None
  if meta is None and is_main:
    meta = _build_cache(config, files, cdir, fingerprint, tok, what, log)
  elif meta is None:
    raise DataError(f"process 0 did not build the token cache in {cdir!r} (a shared workdir "
                    f"is needed for multi-host runs)")
  tok = tok or tokenizer_lib.Tokenizer(os.path.join(cdir, "tokenizer.model"))
  tokenizer_lib.check_vocab(tok, config.vocab_size, "--vocab-size")
  dtype = np.dtype(meta["dtype"])
  train = TokenStream([np.memmap(os.path.join(cdir, "train.bin"), dtype=dtype, mode="r")])
  valid = TokenStream([np.memmap(os.path.join(cdir, "valid.bin"), dtype=dtype, mode="r")])
  return Data(train, valid, tok.vocab_size, tok, what)


def _build_cache(config, files, cdir, fingerprint, tok, what, log) -> dict:
  docs = read_documents(files, config.text_field, config.allow_binary_text)
  if not docs:
    raise DataError(f"{what} is empty: no text found in {len(files)} file(s)")
  os.makedirs(cdir, exist_ok=True)
  order = np.random.default_rng(0).permutation(len(docs))
  docs = [docs[i] for i in order]
  if tok is None:
    log(f"Training a SentencePiece BPE tokenizer ({config.vocab_size} pieces) on {what}...")
    tok = tokenizer_lib.train_tokenizer(docs, os.path.join(cdir, "tokenizer.model"),
                                        config.vocab_size, config.tokenizer_train_chars)
  log(f"Tokenizing {len(docs):,} document{'s' if len(docs) != 1 else ''} "
      f"({sum(map(len, docs)) / 1e6:.1f} M characters)...")
  tokens = tok.encode_documents(docs)
  train, valid = _split(TokenStream([tokens]), config, what)
  for name, part in (("train", train), ("valid", valid)):
    tmp = os.path.join(cdir, f"{name}.bin.tmp")
    part.read(0, len(part)).astype(tokens.dtype).tofile(tmp)
    os.replace(tmp, os.path.join(cdir, f"{name}.bin"))
  meta = dict(fingerprint=fingerprint, dtype=tokens.dtype.name, n_train=len(train),
              n_valid=len(valid), n_documents=len(docs))
  tmp = os.path.join(cdir, "cache.json.tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(cdir, "cache.json"))
  log(f"Cached {len(train):,} training and {len(valid):,} held-out tokens in {cdir}")
  return meta


# ---------------------------------------------------------------------------------------------
# Batches.

class _ReadRows(grain.transforms.Map):
  """Global batch of window indices [B] -> this process's token rows [A, M / P, T + 1]."""

  def __init__(self, stream: TokenStream, seq_len: int, grad_accum: int, process_index: int,
               process_count: int):
    self._stream, self._t = stream, seq_len
    self._a, self._p, self._np = grad_accum, process_index, process_count

  def map(self, indices: np.ndarray) -> np.ndarray:
    rows = indices.reshape(self._a, -1)  # [A, M]
    per_process = rows.shape[1] // self._np
    rows = rows[:, self._p * per_process:(self._p + 1) * per_process]  # [A, M / P]
    out = np.empty(rows.shape + (self._t + 1,), np.int32)  # [A, M / P, T + 1]
    for idx in np.ndindex(rows.shape):
      start = int(rows[idx]) * self._t
      out[idx] = self._stream.read(start, start + self._t + 1)
    return out


def train_iterator(stream: TokenStream, config: Config, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """Endless iterator of this process's batches, int32 [A, M / P, T + 1]."""
  n_windows = (len(stream) - 1) // config.seq_len
  if n_windows < 1:
    raise DataError(f"the training split has {len(stream)} tokens, fewer than "
                    f"seq_len + 1 = {config.seq_len + 1}")
  ds = (grain.MapDataset.range(n_windows)
        .shuffle(seed=config.seed)
        .repeat(None)
        .batch(config.batch_size)
        .map(_ReadRows(stream, config.seq_len, config.grad_accum, process_index,
                       process_count)))
  return iter(ds)


def eval_batches(stream: TokenStream, seq_len: int, rows: int, max_batches: Optional[int],
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Consecutive windows of the whole stream, (tokens [M / P, T + 1], weights [M / P, T]).

  The last window is padded; padding has weight 0. At most ``max_batches`` batches.
  """
  n_windows = max(-(-(len(stream) - 1) // seq_len), 0)
  n_batches = -(-n_windows // rows)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  per_process = rows // process_count
  for b in range(n_batches):
    tokens = np.zeros([per_process, seq_len + 1], np.int32)
    weights = np.zeros([per_process, seq_len], np.float32)
    for r in range(per_process):
      w = b * rows + process_index * per_process + r
      if w >= n_windows:
        break
      window = stream.read(w * seq_len, w * seq_len + seq_len + 1)
      tokens[r, :len(window)] = window
      weights[r, :len(window) - 1] = 1.0
    yield tokens, weights
