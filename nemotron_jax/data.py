"""Data pipeline: tokenizers, sources, packing and grain datasets of batches.

A batch is a dict of numpy arrays [B_local, T]: "inputs" and "targets" (int32,
targets[t] = inputs[t + 1] within a row), "segment_ids" (int32, 1, 2, ... per
document in a row, 0 on padding) and "loss_mask" (float32, 0 on padding, on a
target that would cross a document boundary, and off the queries of MQAR).

Sources (`data.source`): "stdlib" (the interpreter's standard library .py
files), "text" (a text file or folder), "tokens" (a flat pre-tokenised file)
and "mqar" (synthetic multi-query associative recall). Text is cut into
documents of about `data.chunk_bytes`, tokenized lazily inside the grain map
and packed into rows of seq_len + 1 tokens.

Global batch b holds rows [b B, (b + 1) B) of the split's row stream, and
process p of P feeds rows [p B / P, (p + 1) B / P) of each batch (the rows
its devices own in the batch sharding, which `sharding.process_rows` checks).
Each process reads, tokenizes and packs only its own rows, and the stream
does not depend on the process count. The map sources ("tokens", "mqar",
and unpacked text: one document per row) are indexed by row. Packed text has
one packer ("slot") per row of the global batch: slot j packs documents j,
j + B, j + 2B, ... of the split's document order, and row j of every batch is
slot j's next row, so a process runs only the slots of its rows. The
iterator state holds every slot's position (`merge_states` combines the
processes' states), so a checkpoint restores on any number of processes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sysconfig

import grain
import ml_collections
import numpy as np
import tokenizers

from nemotron_jax.config import ConfigError, _fail, validate_data

SPLITS = ("train", "heldout")
# Few threads: tokenizing holds the GIL, and reading a chunk is cheap.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class ByteTokenizer:
  """UTF-8 bytes as token ids: a vocabulary of 256, one byte per token."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids).astype(np.uint8)).decode("utf-8", errors="replace")

  @functools.cached_property
  def byte_lengths(self) -> np.ndarray:
    """[vocab] UTF-8 bytes each token id stands for."""
    return np.ones(self.vocab_size, np.int32)


def _byte_level_alphabet() -> dict[str, int]:
  """Character -> byte of byte-level BPE: printable bytes stand for themselves,
  the others for chr(256), chr(257), ... in byte order."""
  printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  table = {chr(b): b for b in printable}
  others = [b for b in range(256) if b not in table.values()]
  table.update({chr(256 + n): b for n, b in enumerate(others)})
  return table


class JsonTokenizer:
  """A `tokenizers` tokenizer loaded from a tokenizer.json file."""

  def __init__(self, path: str):
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    # Ids may be sparse, so the vocabulary spans up to the largest one.
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  @functools.cached_property
  def byte_lengths(self) -> np.ndarray:
    """[vocab] UTF-8 bytes each token id stands for; 0 for special tokens.

    Exact for byte-level BPE; otherwise the length of the token decoded alone,
    which can miss a space a decoder strips at the start of a text.
    """
    lengths = np.zeros(self.vocab_size, np.int32)
    byte_level = isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel)
    alphabet = _byte_level_alphabet()
    for token, i in self._tok.get_vocab(with_added_tokens=False).items():
      if byte_level and all(ch in alphabet for ch in token):
        lengths[i] = len(token)
      else:
        lengths[i] = len(self._tok.decode([i]).encode("utf-8"))
    for i, added in self._tok.get_added_tokens_decoder().items():
      lengths[i] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> ByteTokenizer | JsonTokenizer:
  """The tokenizer `data.tokenizer` names: "bytes" or a tokenizer.json (or its folder)."""
  name = data_cfg.tokenizer
  if name == "bytes":
    return ByteTokenizer()
  path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
  if not os.path.isfile(path):
    _fail("data.tokenizer", name,
          f"no file {path!r}; expected 'bytes' or the path of a tokenizer.json (or a folder holding one)")
  try:
    return JsonTokenizer(path)
  except Exception as e:  # tokenizers raises a bare Exception for a malformed file.
    raise ConfigError(f"config field 'data.tokenizer' = {name!r} is invalid: "
                      f"{path!r} is not a loadable tokenizer.json ({e})") from e


def count_bytes(tokenizer, batch: dict) -> int:
  """UTF-8 bytes the scored targets of `batch` stand for (bits per byte = nats / ln 2 / this)."""
  lengths = tokenizer.byte_lengths[batch["targets"]]
  return int(np.sum(lengths * (batch["loss_mask"] > 0)))


def _hash(name: str) -> int:
  return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big")


def _heldout_names(names: list[str], fraction: float) -> set[str]:
  """The ceil(fraction * n) names with the smallest hash: stable and never empty for fraction > 0."""
  count = math.ceil(fraction * len(names))
  return set(sorted(names, key=_hash)[:count])


def _list_stdlib() -> tuple[str, list[str]]:
  """The standard library's root and its .py files, without tests and installed packages."""
  root = sysconfig.get_paths()["stdlib"]
  names = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if x not in _STDLIB_SKIP_DIRS]
    names += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
  return root, names


def _list_text(path) -> tuple[str, list[str]]:
  """A folder and the files of `path` in it: the file itself, or all non-hidden files below."""
  if os.path.isfile(path):
    return os.path.dirname(path), [os.path.basename(path)]
  if not os.path.isdir(path):
    _fail("data.path", path,
          "no such file or folder; data.source='text' needs a text file or a folder of them")
  names = []
  for folder, dirs, files in os.walk(path):
    dirs[:] = [x for x in dirs if not x.startswith(".")]
    names += [os.path.relpath(os.path.join(folder, f), path) for f in files if not f.startswith(".")]
  return path, names


def _boundary(f, size: int, k: int, chunk: int) -> int:
  """Start of chunk k of a file: after the last line break in the quarter chunk
  before k * chunk, else k * chunk moved back to the start of a UTF-8 character."""
  pos = k * chunk
  if k == 0 or pos >= size:
    return min(pos, size)
  lo = pos - chunk // 4
  f.seek(lo)
  window = f.read(pos - lo + 1)
  newline = window.rfind(b"\n", 0, pos - lo)
  if newline >= 0:
    return lo + newline + 1
  while pos > lo and window[pos - lo] & 0xC0 == 0x80:
    pos -= 1
  return pos


def _read_chunk(doc: tuple[str, int, int, int]) -> str:
  """Text of one document: chunk k of a file, found from the file alone."""
  path, size, k, chunk = doc
  with open(path, "rb") as f:
    start, stop = _boundary(f, size, k, chunk), _boundary(f, size, k + 1, chunk)
    f.seek(start)
    return f.read(stop - start).decode("utf-8", errors="replace")


def _documents(d: ml_collections.ConfigDict, split: str) -> list[tuple[str, int, int, int]]:
  """(path, size, chunk index, chunk bytes) of each document of a split, in corpus order.

  Files are held out whole, picked by a hash of their relative path; a corpus
  of one file is held out by chunk.
  """
  root, names = _list_stdlib() if d.source == "stdlib" else _list_text(d.path)
  files = sorted((n.replace(os.sep, "/"), os.path.join(root, n)) for n in names)
  files = [(name, path, os.path.getsize(path)) for name, path in files]
  files = [f for f in files if f[2] > 0]
  if not files and d.source == "stdlib":
    _fail("data.source", d.source, f"no .py files under {root!r}; expected 'text' with data.path instead")
  if not files:
    _fail("data.path", d.path, "holds no non-empty files; expected a text file or a folder of them")
  chunk = d.chunk_bytes
  docs = [(name if len(files) > 1 else f"{name}#{k}", (path, size, k, chunk))
          for name, path, size in files for k in range(math.ceil(size / chunk))]
  heldout = _heldout_names(sorted({unit for unit, _ in docs}), d.heldout_fraction)
  picked = [doc for unit, doc in docs if (unit in heldout) == (split == "heldout")]
  if not picked:
    what = f"{len(files)} files" if len(files) > 1 else f"1 file cut into {len(docs)} chunks"
    _fail("data.heldout_fraction", d.heldout_fraction,
          f"leaves the {split} split of {what} empty; expected a fraction that leaves both splits documents")
  return picked


def _row_example(row: np.ndarray, segments: np.ndarray) -> dict:
  """A row of seq_len + 1 tokens and its segment ids -> one example."""
  same = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
  return {"inputs": row[:-1].astype(np.int32), "targets": row[1:].astype(np.int32),
          "segment_ids": segments[:-1].astype(np.int32), "loss_mask": same.astype(np.float32)}


class _SlotPackIterDataset(grain.IterDataset):
  """Packed rows [lo, hi) of each global batch of `global_batch_size` = B rows of text.

  `docs[g]` are the token ids of document g of the split's order (infinite
  for "train"). Slot j packs documents j, j + B, j + 2B, ... into rows of
  `row_len` tokens, each document a new segment; row j of every batch is slot
  j's next row. A document that does not fit goes on in the slot's next row
  from its last packed token, so every token but a document's first is a
  target exactly once; documents of fewer than 2 tokens (no target) are
  skipped. Only the slots [lo, hi) run here, reading only their documents.

  A finite split ends when every slot has run out. With `process_count` > 1
  a process cannot see the others' slots, so past the end of its own it
  yields empty rows (loss_mask 0) without end, and the consumer stops at the
  first batch with no target in any process (`train_loop.evaluate`).
  """

  def __init__(self, docs: grain.MapDataset, *, global_batch_size: int, lo: int, hi: int,
               row_len: int, process_count: int):
    super().__init__()
    self._docs, self._batch, self._lo, self._hi = docs, global_batch_size, lo, hi
    self._row_len, self._alone = row_len, process_count == 1

  def __iter__(self) -> _SlotPackIterator:
    return _SlotPackIterator(self)


class _SlotPackIterator(grain.DatasetIterator):
  """Iterator of _SlotPackIterDataset. Its state is {"slots": [[k, offset], ...]}, one entry
  per slot of the global batch: the slot's current document is its k-th (document
  j + k B) and `offset` of its tokens are packed; [-1, -1] for a slot another process runs."""

  def __init__(self, ds: _SlotPackIterDataset):
    super().__init__()
    self._ds = ds
    self._slots = {j: [0, 0] for j in range(ds._lo, ds._hi)}
    self._current = {}  # slot -> (k, token ids of its current document)

  def _tokens(self, j: int, k: int) -> np.ndarray | None:
    """Token ids of slot j's k-th document; None past the end of a finite split."""
    g = j + k * self._ds._batch
    if g >= len(self._ds._docs):
      return None
    cached = self._current.get(j)
    if cached is None or cached[0] != k:
      cached = self._current[j] = (k, self._ds._docs[g])
    return cached[1]

  def _row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Slot j's next row of tokens and segment ids."""
    n = self._ds._row_len
    row, segments = np.zeros(n, np.int32), np.zeros(n, np.int32)
    k, offset = self._slots[j]
    fill, segment = 0, 0
    while fill < n:
      doc = self._tokens(j, k)
      if doc is None:
        break
      if len(doc) < 2:
        k, offset = k + 1, 0
        continue
      if offset > len(doc) - 2:  # only from a restored state: a continued document has 2 left
        raise ConfigError(
            f"the data iterator state puts slot {j} at token {offset} of a document of "
            f"{len(doc)} tokens; the corpus, data.tokenizer or data.chunk_bytes differ from the "
            "run that wrote the checkpoint; expected those of that run")
      take = min(n - fill, len(doc) - offset)
      segment += 1
      row[fill:fill + take] = doc[offset:offset + take]
      segments[fill:fill + take] = segment
      fill, offset = fill + take, offset + take
      if offset == len(doc):
        k, offset = k + 1, 0
        self._current.pop(j, None)
    if offset:
      offset -= 1  # the next row repeats the last token as the input of the first target
    self._slots[j] = [k, offset]
    return row, segments

  def __next__(self) -> dict:
    rows = [self._row(j) for j in sorted(self._slots)]
    # A slot that has not run out fills at least 2 tokens of its row.
    if self._ds._alone and not any(segments.any() for _, segments in rows):
      raise StopIteration
    rows = [_row_example(*r) for r in rows]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

  def get_state(self) -> dict:
    slots = [[-1, -1]] * self._ds._batch
    for j, position in self._slots.items():
      slots[j] = list(position)
    return {"slots": slots}

  def set_state(self, state: dict):
    if "slots" not in state:
      raise ConfigError(
          "the checkpoint's data iterator state is of the earlier text pipeline, which packed "
          "one stream of documents into all rows; packed text now has one packer per batch row "
          "and cannot continue that stream: resume with the version that wrote the checkpoint, "
          "or start a new --workdir (the checkpoint is left as it is)")
    slots = state["slots"]
    if len(slots) != self._ds._batch:
      raise ConfigError(f"config field 'train.batch_size' = {self._ds._batch} does not fit the "
                        f"checkpoint's data iterator state ({len(slots)} packed rows per batch); "
                        "expected the batch size the run was started with")
    missing = [j for j in self._slots if slots[j][0] < 0]
    if missing:
      raise ValueError(f"the data iterator state lacks the slots {missing[:8]} of this process; "
                       "expected the state of the whole batch (data.merge_states)")
    self._slots = {j: list(slots[j]) for j in self._slots}
    self._current = {}


def merge_states(states: list[dict]) -> dict:
  """The iterator state of the global stream from every process's `get_state()`: packed text
  states hold only the process's own slots; the other sources' states are the same on every
  process."""
  if "slots" not in states[0]:
    return states[0]
  merged = np.max(np.asarray([s["slots"] for s in states], np.int64), axis=0)
  return {"slots": merged.tolist()}


def _unpacked_example(ids: np.ndarray, seq_len: int) -> dict:
  """One document per row: truncated or padded to seq_len + 1 tokens."""
  ids = ids[:seq_len + 1]
  row = np.zeros(seq_len + 1, np.int32)
  row[:len(ids)] = ids
  return _row_example(row, (np.arange(seq_len + 1) < len(ids)).astype(np.int32))


def _token_file(d: ml_collections.ConfigDict) -> np.memmap:
  path = d.path
  if not os.path.isfile(path):
    _fail("data.path", path, f"no such file; data.source='tokens' needs a flat {d.token_dtype} token file")
  size, itemsize = os.path.getsize(path), np.dtype(d.token_dtype).itemsize
  if size < 2 * itemsize:
    _fail("data.path", path, f"the token file holds {size} bytes; expected at least 2 {d.token_dtype} tokens")
  if size % itemsize:
    _fail("data.token_dtype", d.token_dtype,
          f"{path!r} has {size} bytes, not a multiple of {itemsize}; expected the file's element type")
  return np.memmap(path, dtype=d.token_dtype, mode="r")


def _token_example(i: int, *, tokens, lo: int, hi: int, seq_len: int, eos_id, vocab_size: int, path: str):
  """Row i of tokens[lo:hi]: rows overlap by one token so every token but the first is a target once."""
  start = lo + i * seq_len
  piece = np.asarray(tokens[start:min(start + seq_len + 1, hi)], np.int32)
  if piece.max() >= vocab_size:
    raise ValueError(f"token file {path!r} holds id {piece.max()} near token {start}, "
                     f"but model.vocab_size = {vocab_size}")
  row = np.zeros(seq_len + 1, np.int32)
  row[:len(piece)] = piece
  segments = np.zeros(seq_len + 1, np.int32)
  segments[:len(piece)] = 1
  if eos_id is not None:
    segments[1:len(piece)] += np.cumsum(piece[:-1] == eos_id)
  return _row_example(row, segments)


def _token_rows(d, m, split: str) -> grain.MapDataset:
  tokens = _token_file(d)
  cut = len(tokens) - math.ceil(d.heldout_fraction * len(tokens))
  lo, hi = (0, cut) if split == "train" else (cut, len(tokens))
  if hi - lo < 2:
    _fail("data.heldout_fraction", d.heldout_fraction,
          f"the {split} split of {d.path!r} ({len(tokens)} tokens) has {hi - lo} tokens; expected >= 2")
  rows = math.ceil((hi - lo - 1) / d.seq_len)
  return grain.MapDataset.range(rows).map(functools.partial(
      _token_example, tokens=tokens, lo=lo, hi=hi, seq_len=d.seq_len, eos_id=d.eos_id,
      vocab_size=m.vocab_size, path=d.path))


def _mqar_example(index: int, *, seed: int, split: str, num_kv_pairs: int, seq_len: int,
                 vocab_size: int, min_kv_pairs: int = 0) -> dict:
  """Example `index` of multi-query associative recall (Zoology, Arora et al. 2023).

  The row is k1 v1 ... kN vN, then zeros where each key recurs once, in random
  order and at a random even offset, followed by its value; the loss is only
  on predicting those values. Keys and values are distinct ids from the lower
  and upper half of [1, vocab_size). N is num_kv_pairs, or with min_kv_pairs > 0
  drawn per example uniformly from [min_kv_pairs, num_kv_pairs] (Zoology trains
  on such a mixture and evaluates each N apart).
  """
  rng = np.random.default_rng((seed, SPLITS.index(split), index))
  n = int(rng.integers(min_kv_pairs, num_kv_pairs + 1)) if min_kv_pairs else num_kv_pairs
  half = (vocab_size - 1) // 2
  keys = 1 + rng.choice(half, n, replace=False)
  values = 1 + half + rng.choice(vocab_size - 1 - half, n, replace=False)
  row = np.zeros(seq_len + 1, np.int32)
  row[0:2 * n:2], row[1:2 * n:2] = keys, values
  queries = 2 * n + 2 * rng.choice((seq_len + 1 - 2 * n) // 2, n, replace=False)
  row[queries], row[queries + 1] = keys, values
  example = _row_example(row, np.ones(seq_len + 1, np.int32))
  example["loss_mask"] = np.zeros(seq_len, np.float32)
  example["loss_mask"][queries] = 1.0
  return example


def _mqar_rows(d, m, split: str, seed: int) -> grain.MapDataset:
  count = d.mqar.num_examples if split == "train" else math.ceil(d.mqar.num_examples * d.heldout_fraction)
  if count == 0:
    _fail("data.heldout_fraction", d.heldout_fraction, "MQAR has no held-out examples; expected > 0")
  return grain.MapDataset.range(count).map(functools.partial(
      _mqar_example, seed=seed, split=split, num_kv_pairs=d.mqar.num_kv_pairs, seq_len=d.seq_len,
      vocab_size=m.vocab_size, min_kv_pairs=d.mqar.min_kv_pairs))


class _LocalRowsIterDataset(grain.IterDataset):
  """Batches of rows [lo, hi) of each global batch of `global_batch_size` rows of a map
  dataset, reading only those rows; a short last batch is padded with empty rows."""

  def __init__(self, rows: grain.MapDataset, *, global_batch_size: int, lo: int, hi: int):
    super().__init__()
    self._rows, self._batch, self._lo, self._hi = rows, global_batch_size, lo, hi

  def _read(self, b: int) -> dict:
    start, n = b * self._batch, len(self._rows)
    rows = [self._rows[i] for i in range(start + self._lo, min(start + self._hi, n))]
    # A batch past the end of a split pads with empty rows shaped like one of this process's.
    example = None if rows else self._rows[self._lo if self._lo < n else 0]
    return _local_batch(rows, size=self._hi - self._lo, example=example)

  def __iter__(self) -> _GlobalRowsIterator:
    count = -(-len(self._rows) // self._batch)
    batches = grain.MapDataset.range(count).map(self._read)
    return _GlobalRowsIterator(batches.to_iter_dataset(_READ_OPTIONS).__iter__(), self._batch)


class _GlobalRowsIterator(grain.DatasetIterator):
  """A batch iterator whose state is the count of global rows consumed: the same on every
  process, and the state grain's batching of the whole row stream would have."""

  def __init__(self, parent: grain.DatasetIterator, global_batch_size: int):
    super().__init__(parent)
    self._batch = global_batch_size

  def __next__(self) -> dict:
    return next(self._parent)

  def get_state(self) -> dict:
    return {"next_index": self._parent.get_state()["next_index"] * self._batch}

  def set_state(self, state: dict):
    rows = state["next_index"]
    if rows % self._batch:
      raise ConfigError(f"config field 'train.batch_size' = {self._batch} does not fit the "
                        f"checkpoint's data iterator state (row {rows}, not a multiple of it); "
                        "expected the batch size the run was started with")
    self._parent.set_state({"next_index": rows // self._batch})


def _local_batch(rows: list[dict], *, size: int, example: dict | None = None) -> dict:
  """A batch of `size` rows: `rows`, then empty rows shaped like `example` (default the first row)."""
  blank = {k: np.zeros_like(v) for k, v in (example or rows[0]).items()}
  rows = rows + [blank] * (size - len(rows))
  return {k: np.stack([r[k] for r in rows]) for k in blank}


def make_dataset(config: ml_collections.ConfigDict, *, split: str, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 seed: int | None = None) -> grain.IterDataset:
  """The grain dataset of this process's batches; see `make_iterator`."""
  d, m = config.data, config.model
  validate_data(d, m)
  if split not in SPLITS:
    raise ValueError(f"split = {split!r} is invalid; expected one of {list(SPLITS)}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size = {global_batch_size} is invalid; expected a positive "
                     f"multiple of process_count = {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index = {process_index} is invalid; expected 0 <= index < {process_count}")
  seed = config.seed if seed is None else seed
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed = {seed!r} is invalid; expected a non-negative integer")
  # grain's shuffle wants a 32-bit seed.
  order_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  train = split == "train"

  def ordered(ds: grain.MapDataset) -> grain.MapDataset:
    return ds.shuffle(order_seed).repeat() if train else ds

  local = global_batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  if d.source in ("mqar", "tokens"):
    rows = _mqar_rows(d, m, split, seed) if d.source == "mqar" else _token_rows(d, m, split)
    return _LocalRowsIterDataset(ordered(rows), global_batch_size=global_batch_size, lo=lo, hi=hi)
  tokenizer = make_tokenizer(d)
  if tokenizer.vocab_size > m.vocab_size:
    _fail("model.vocab_size", m.vocab_size,
          f"data.tokenizer {d.tokenizer!r} has {tokenizer.vocab_size} ids; expected vocab_size >= that")
  ids = ordered(grain.MapDataset.source(_documents(d, split))).map(
      lambda doc: tokenizer.encode(_read_chunk(doc)))
  if not d.pack:
    rows = ids.map(functools.partial(_unpacked_example, seq_len=d.seq_len))
    return _LocalRowsIterDataset(rows, global_batch_size=global_batch_size, lo=lo, hi=hi)
  return _SlotPackIterDataset(ids, global_batch_size=global_batch_size, lo=lo, hi=hi,
                              row_len=d.seq_len + 1, process_count=process_count)


def make_iterator(config: ml_collections.ConfigDict, *, split: str, global_batch_size: int,
                  process_index: int = 0, process_count: int = 1,
                  seed: int | None = None) -> grain.DatasetIterator:
  """Iterator of dict batches [global_batch_size // process_count, data.seq_len].

  "train" repeats forever, reshuffled each epoch; "heldout" is one pass in
  corpus order whose last batch is padded with loss_mask 0 rows (packed text
  on several processes: empty batches follow without end, see
  `_SlotPackIterDataset`). Batches depend only on the seed (default
  config.seed), not on the process count. The iterator's get_state() /
  set_state() resume a run exactly; set_state takes the state of the whole
  stream, which for several processes is `merge_states` of theirs.
  """
  return iter(make_dataset(config, split=split, global_batch_size=global_batch_size,
                           process_index=process_index, process_count=process_count, seed=seed))
