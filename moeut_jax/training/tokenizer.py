"""SentencePiece BPE: trained on the data when no tokenizer is given (8000 pieces, digits split).

Settings for code and prose alike: no normalisation, whitespace kept (runs of spaces are pieces),
"\n" a piece of its own, byte fall-back so that no text is unknown. Id 0 is <unk>, id 1 is the
end-of-document token placed between documents.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from moeut_jax.training.errors import TokenizerError

EOS_ID = 1


def _lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  n = 0
  for text in texts:
    for line in text.split("\n"):
      if n >= max_chars:
        return
      n += len(line) + 1
      if line:
        yield line


def train_tokenizer(texts: Sequence[str], path: str, vocab_size: int,
                    max_chars: int) -> "Tokenizer":
  """Trains a BPE model on (a prefix of) ``texts`` and writes it to ``path`` atomically."""
  if not any(texts):
    raise TokenizerError("cannot train a tokenizer: the text is empty")
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, max_chars), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", split_digits=True, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
        character_coverage=0.9999, max_sentence_length=1 << 16, input_sentence_size=0,
        unk_id=0, eos_id=EOS_ID, bos_id=-1, pad_id=-1, num_threads=os.cpu_count() or 1,
        minloglevel=2)
  except RuntimeError as e:  # e.g. "Vocabulary size is too high"
    raise TokenizerError(f"training a SentencePiece tokenizer with vocab_size={vocab_size} "
                         f"failed (it needs 256 byte pieces, 3 special pieces and one per "
                         f"distinct character): {e}") from e
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)
  return Tokenizer(path)


class Tokenizer:
  """A SentencePiece model with the few operations training needs."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise TokenizerError(f"tokenizer file {path!r} does not exist")
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.load(path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"{path!r} is not a SentencePiece model: {e}") from e
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_documents(self, texts: Sequence[str], chunk: int = 256) -> np.ndarray:
    """All documents as one stream, each followed by the end-of-document token."""
    dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
    parts = []
    for i in range(0, len(texts), chunk):
      for ids in self.encode(texts[i:i + chunk]):
        if self.eos_id is not None:
          ids = ids + [self.eos_id]
        parts.append(np.asarray(ids, dtype))
    return np.concatenate(parts) if parts else np.zeros([0], dtype)


def check_vocab(tokenizer: Tokenizer, n_tokens: int, what: str) -> None:
  """The model's vocabulary must be exactly the tokenizer's."""
  if tokenizer.vocab_size != n_tokens:
    raise TokenizerError(
        f"tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} pieces but {what} has "
        f"n_tokens={n_tokens}; use the tokenizer the model was trained with (or "
        f"--vocab-size {tokenizer.vocab_size} for a new run)")
