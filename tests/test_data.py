"""Tests of the data pipeline: determinism, resumption, sharding, packing, sources, errors."""

import json
import math
import string

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nemotron_jax import config as config_lib
from nemotron_jax import data

NUM_DOCS = 20


def _config(**data_fields):
  c = config_lib.default_config()
  c.data.seq_len = 32
  for name, value in data_fields.items():
    c.data[name] = value
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture
def corpus(tmp_path):
  """A folder of NUM_DOCS files; file i is written only in its own 3 letters, so
  the letters of any piece of text say which document it came from."""
  folder = tmp_path / "corpus"
  folder.mkdir()
  rng = np.random.default_rng(0)
  letters = string.ascii_letters + string.digits
  docs = {}
  for i in range(NUM_DOCS):
    alphabet = letters[3 * i:3 * i + 3]
    text = "".join(rng.choice(list(alphabet), int(rng.integers(20, 150))))
    (folder / f"doc{i:02d}.txt").write_text(text)
    docs[alphabet] = text
  return folder, docs


def _doc_of(text, docs):
  """The alphabet of the single document `text` is a contiguous piece of."""
  owners = [a for a, doc in docs.items() if set(text) <= set(a)]
  assert len(owners) == 1, f"{text!r} mixes documents"
  assert text in docs[owners[0]], f"{text!r} is not a contiguous piece of its document"
  return owners[0]


def _segments(batch, tokenizer, docs):
  """Checks the packing invariants of every row and yields (alphabet, text) of each segment."""
  for inputs, targets, seg, mask in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                                        batch["loss_mask"]):
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    steps = np.diff(seg)
    used = seg > 0
    assert seg[0] == 1 or not used.any()
    assert np.all(used[:-1] >= used[1:]), "padding only at the end of a row"
    assert np.all((steps[used[1:]] == 0) | (steps[used[1:]] == 1))
    # A target is scored exactly when it continues its input's document.
    np.testing.assert_array_equal(mask[:-1], (steps == 0) & used[:-1])
    assert np.all(mask[~used] == 0)
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      ids = inputs[where]
      if mask[where[-1]]:
        ids = np.append(ids, targets[where[-1]])
      text = tokenizer.decode(ids)
      yield _doc_of(text, docs), text


def test_byte_tokenizer_roundtrip():
  tok = data.make_tokenizer(_config().data)
  text = "héllo, 日本 ✓"
  ids = tok.encode(text)
  assert tok.vocab_size == 256 and ids.dtype == np.int32
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(ids[:2]) == "h\ufffd"  # a cut character decodes to U+FFFD


def _source_config(source, corpus, tmp_path, **fields):
  """A config reading `source`: the corpus for "text", random uint16 ids for "tokens"."""
  c = _config(source=source, **fields)
  if source == "text":
    c.data.path = str(corpus[0])
  if source == "tokens":
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16).tofile(path)
    c.data.path = str(path)
  return c


@pytest.mark.parametrize("source", ["stdlib", "text", "tokens", "mqar"])
def test_fresh_iterators_agree_and_seed_matters(source, corpus, tmp_path):
  c = _source_config(source, corpus, tmp_path)
  first = _take(data.make_iterator(c, split="train", global_batch_size=4), 5)
  _assert_same(first, _take(data.make_iterator(c, split="train", global_batch_size=4), 5))
  other = _take(data.make_iterator(c, split="train", global_batch_size=4, seed=1), 5)
  assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


@pytest.mark.parametrize("source,fields", [
    ("stdlib", {}),
    ("text", {}),  # small corpus: the run crosses epochs
    ("text", {"pack": False}),
    ("tokens", {}),
    ("mqar", {}),
])
def test_restored_iterator_matches_uninterrupted(source, fields, corpus, tmp_path):
  c = _source_config(source, corpus, tmp_path, **fields)
  it = data.make_iterator(c, split="train", global_batch_size=4)
  states = []
  batches = []
  for _ in range(30):
    # grain checkpoints the state as JSON, so it must survive the round trip.
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  for step in (1, 3, 7, 20):
    resumed = data.make_iterator(c, split="train", global_batch_size=4)
    resumed.set_state(states[step])
    _assert_same(batches[step:step + 8], _take(resumed, len(batches[step:step + 8])))


def _shard_batches(c, split, count, p, n, global_batch_size=12):
  """n batches of process p of `count`; a held-out pass of packed text on several processes
  goes on with empty batches past its end, and the one after the n-th must be empty."""
  it = data.make_iterator(c, split=split, global_batch_size=global_batch_size, process_index=p,
                          process_count=count)
  batches = _take(it, n)
  if split == "heldout" and count > 1 and c.data.source in ("stdlib", "text") and c.data.pack:
    assert not next(it)["loss_mask"].any()
  return batches


@pytest.mark.parametrize("source,split", [("stdlib", "train"), ("text", "heldout"), ("text", "train"),
                                          ("mqar", "train"), ("tokens", "heldout"), ("tokens", "train")])
def test_process_shards_partition_the_global_batch(source, split, corpus, tmp_path):
  c = _source_config(source, corpus, tmp_path, heldout_fraction=0.25)
  it = data.make_iterator(c, split=split, global_batch_size=12)
  glob = _take(it, 3) if split == "train" else list(it)
  if source == "text" and split == "heldout":
    # 5 held-out documents of 20-150 bytes: one per slot 0..4, rows 5..11 empty, and the
    # pass lasts as long as the longest document's rows.
    assert 2 <= len(glob) <= 5 and not any(b["segment_ids"][5:].any() for b in glob)
  for count in (1, 2, 4):
    shards = [_shard_batches(c, split, count, p, len(glob)) for p in range(count)]
    for step, whole in enumerate(glob):
      for k in whole:
        parts = [shard[step][k] for shard in shards]
        assert all(part.shape[0] == 12 // count for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole[k], err_msg=k)


def test_map_sources_read_only_the_process_rows(monkeypatch):
  c = _config(source="mqar", heldout_fraction=0.25)
  c.data.mqar.num_examples = 64  # 16 held-out rows: batches of 12 and a padded 4
  read = []
  example = data._mqar_example
  monkeypatch.setattr(data, "_mqar_example", lambda index, **kw: read.append(index) or example(index, **kw))
  whole = list(data.make_iterator(c, split="heldout", global_batch_size=12))
  assert sorted(read) == list(range(16))
  for p in range(3):
    read.clear()
    shard = list(data.make_iterator(c, split="heldout", global_batch_size=12, process_index=p,
                                    process_count=3))
    # Held-out rows are in order, so row i is in slot i % 12 of its batch: slots 4p .. 4p + 3.
    assert read and all(4 * p <= i % 12 < 4 * p + 4 for i in read), (p, sorted(read))
    np.testing.assert_array_equal(shard[0]["inputs"], whole[0]["inputs"][4 * p:4 * p + 4])


def test_packed_text_reads_only_the_process_documents(corpus, monkeypatch):
  path, docs = corpus
  c = _config(source="text", path=str(path), heldout_fraction=0.5)
  tok = data.make_tokenizer(c.data)
  read = []
  read_chunk = data._read_chunk
  monkeypatch.setattr(data, "_read_chunk", lambda doc: read.append(doc) or read_chunk(doc))
  # Held out: 10 documents in corpus order, so slot j of 4 packs documents j, j + 4, j + 8.
  order = data._documents(c.data, "heldout")
  whole = list(data.make_iterator(c, split="heldout", global_batch_size=4))
  assert sorted(read) == sorted(order)  # each document read once
  for count in (2, 4):
    for p in range(count):
      read.clear()
      shard = _shard_batches(c, "heldout", count, p, len(whole), global_batch_size=4)
      mine = range(p * 4 // count, (p + 1) * 4 // count)
      assert sorted(read) == sorted(doc for g, doc in enumerate(order) if g % 4 in mine), (count, p)
      for batch in shard:
        list(_segments(batch, tok, docs))
  # Train: the processes' reads together are the single process's, each about 1/4 of them.
  read.clear()
  _take(data.make_iterator(c, split="train", global_batch_size=8), 6)
  single = sorted(read)
  shares = []
  for p in range(4):
    read.clear()
    for batch in _take(data.make_iterator(c, split="train", global_batch_size=8, process_index=p,
                                          process_count=4), 6):
      list(_segments(batch, tok, docs))
    shares.append(sorted(read))
  assert sorted(doc for share in shares for doc in share) == single
  assert all(len(share) < len(single) / 2 for share in shares), [len(x) for x in shares]


def _states_of(c, count, n, state=None):
  """The iterators of `count` processes (batch 8) set to `state`, after n batches each."""
  its = [data.make_iterator(c, split="train", global_batch_size=8, process_index=p,
                            process_count=count) for p in range(count)]
  for it in its:
    if state is not None:
      it.set_state(state)
    _take(it, n)
  return its


@pytest.mark.parametrize("source", ["stdlib", "text", "tokens", "mqar"])
def test_iterator_state_restores_on_another_process_count(source, corpus, tmp_path):
  c = _source_config(source, corpus, tmp_path)
  one = data.make_iterator(c, split="train", global_batch_size=8)
  _take(one, 3)
  after_three = json.loads(json.dumps(one.get_state()))
  expected = _take(one, 2)
  after_five = json.loads(json.dumps(one.get_state()))
  for saved, resumed in ((1, 2), (1, 4), (2, 4), (4, 2), (2, 1), (4, 1)):
    its = _states_of(c, saved, 3)
    # What train_loop.global_data_state checkpoints: the processes' states merged, through JSON.
    state = json.loads(json.dumps(data.merge_states([it.get_state() for it in its])))
    assert state == after_three, (saved, resumed)
    shards = [_take(it, 2) for it in _states_of(c, resumed, 0, state)]
    for step, whole in enumerate(expected):
      for k in whole:
        np.testing.assert_array_equal(np.concatenate([s[step][k] for s in shards]), whole[k])
    its = _states_of(c, resumed, 2, state)
    assert json.loads(json.dumps(data.merge_states([it.get_state() for it in its]))) == after_five


def test_packed_text_state_errors(corpus):
  c = _config(source="text", path=str(corpus[0]))
  it = data.make_iterator(c, split="train", global_batch_size=4, process_index=1, process_count=2)
  # A state of the previous pipeline (one packed stream, grain's window shuffle) is refused.
  with pytest.raises(config_lib.ConfigError, match="earlier text pipeline.*new --workdir"):
    it.set_state({"parent": {"next_index": 3}, "offset": 5})
  with pytest.raises(config_lib.ConfigError, match="'train.batch_size' = 4.*8 packed rows"):
    it.set_state({"slots": [[0, 0]] * 8})
  it.set_state({"slots": [[0, 0]] * 2 + [[0, 10 ** 6]] * 2})  # another corpus's state
  with pytest.raises(config_lib.ConfigError, match="slot 2 at token 1000000 of a document"):
    next(it)
  with pytest.raises(ValueError, match=r"lacks the slots \[2, 3\]"):
    it.set_state(data.make_iterator(c, split="train", global_batch_size=4, process_index=0,
                                    process_count=2).get_state())


def test_packing_respects_documents(corpus):
  path, docs = corpus
  c = _config(source="text", path=str(path), heldout_fraction=0.25)
  tok = data.make_tokenizer(c.data)
  # The held-out pass is finite: every token but each document's first is a target once.
  scored = 0
  seen = set()
  pieces = []
  for batch in data.make_iterator(c, split="heldout", global_batch_size=4):
    scored += batch["loss_mask"].sum()
    assert data.count_bytes(tok, batch) == batch["loss_mask"].sum()
    for alphabet, text in _segments(batch, tok, docs):
      seen.add(alphabet)
      pieces.append(text)
  assert len(seen) == math.ceil(0.25 * NUM_DOCS)
  assert scored == sum(len(docs[a]) - 1 for a in seen)
  assert any(len(p) == c.data.seq_len + 1 for p in pieces), "no document spans a row"
  for batch in _take(data.make_iterator(c, split="train", global_batch_size=4), 20):
    list(_segments(batch, tok, docs))


def test_heldout_files_never_in_train(corpus):
  path, docs = corpus
  c = _config(source="text", path=str(path), heldout_fraction=0.25)
  tok = data.make_tokenizer(c.data)
  heldout = {a for b in data.make_iterator(c, split="heldout", global_batch_size=4)
             for a, _ in _segments(b, tok, docs)}
  train_chars = sum(len(docs[a]) for a in docs if a not in heldout)
  rows = 2 * train_chars // c.data.seq_len + 8  # more than an epoch
  train = {a for b in _take(data.make_iterator(c, split="train", global_batch_size=4), rows // 4)
           for a, _ in _segments(b, tok, docs)}
  assert not heldout & train
  assert heldout | train == set(docs)


def test_stdlib_heldout_split_is_by_file():
  d = _config().data
  train = {path for path, *_ in data._documents(d, "train")}
  heldout = {path for path, *_ in data._documents(d, "heldout")}
  assert heldout and train and not heldout & train
  assert not any("site-packages" in p or "/test/" in p for p in train | heldout)
  assert len(heldout) == math.ceil(d.heldout_fraction * len(train | heldout))


def test_unpacked_rows_hold_one_document_and_epochs_reshuffle(corpus):
  path, docs = corpus
  c = _config(source="text", path=str(path), pack=False, heldout_fraction=0.25, seq_len=64)
  tok = data.make_tokenizer(c.data)
  per_epoch = NUM_DOCS - math.ceil(0.25 * NUM_DOCS)
  order = []
  for batch in _take(data.make_iterator(c, split="train", global_batch_size=5), 2 * per_epoch // 5):
    for row in range(5):
      (alphabet, text), = _segments({k: v[row:row + 1] for k, v in batch.items()}, tok, docs)
      assert text == docs[alphabet][:c.data.seq_len + 1]
      order.append(alphabet)
  first, second = order[:per_epoch], order[per_epoch:]
  assert sorted(first) == sorted(second) and len(set(first)) == per_epoch
  assert first != second


def test_stdlib_batches_are_well_formed():
  c = _config(seq_len=64)
  tok = data.make_tokenizer(c.data)
  batch = next(data.make_iterator(c, split="train", global_batch_size=6, process_index=1,
                                  process_count=2))
  for k, dtype in (("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                   ("loss_mask", np.float32)):
    assert batch[k].shape == (3, 64) and batch[k].dtype == dtype, k
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["loss_mask"].mean() > 0.9
  assert data.count_bytes(tok, batch) == batch["loss_mask"].sum()


@pytest.mark.parametrize("min_kv_pairs", [0, 2])
def test_mqar_targets_are_the_values_of_queried_keys(min_kv_pairs):
  c = _config(source="mqar", seq_len=64)
  c.model.vocab_size = 96
  c.data.mqar.num_kv_pairs = 6
  c.data.mqar.min_kv_pairs = min_kv_pairs
  c.data.mqar.num_examples = 40
  v = c.model.vocab_size
  counts = set()
  batches = _take(data.make_iterator(c, split="train", global_batch_size=8), 3)
  heldout = list(data.make_iterator(c, split="heldout", global_batch_size=8))
  assert sum(len(b["inputs"]) for b in heldout) == 8  # ceil(40 * 0.05) = 2, padded
  assert heldout[0]["loss_mask"][2:].sum() == 0 and heldout[0]["segment_ids"][2:].sum() == 0
  for batch in batches + heldout:
    for inputs, targets, seg, mask in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                                          batch["loss_mask"]):
      if not mask.any():
        continue
      n = int(mask.sum())  # one query per pair
      counts.add(n)
      keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
      assert len(set(keys)) == n and keys.max() < values.min() and values.max() < v
      assert keys.min() >= 1 and np.all(seg == 1)
      pairs = dict(zip(keys, values))
      queries = np.flatnonzero(mask)
      assert len(queries) == n and queries.min() >= 2 * n
      assert sorted(inputs[queries]) == sorted(keys)
      np.testing.assert_array_equal(targets[queries], [pairs[k] for k in inputs[queries]])
      row = np.append(inputs, targets[-1])
      filler = np.ones(len(row), bool)
      filler[:2 * n] = filler[queries] = filler[queries + 1] = False
      assert np.all(row[filler] == 0)
  if min_kv_pairs:
    assert min(counts) >= 2 and max(counts) <= 6 and len(counts) >= 3, counts
    c.data.mqar.min_kv_pairs = 7
    with pytest.raises(config_lib.ConfigError, match="'data.mqar.min_kv_pairs' = 7.*from 1 to"):
      data.make_iterator(c, split="train", global_batch_size=8)
  else:
    assert counts == {6}
  train_rows = {r.tobytes() for b in batches for r in b["inputs"]}
  assert not train_rows & {r.tobytes() for r in heldout[0]["inputs"][:2]}


def _token_file(tmp_path, n=1000, eos_every=7):
  """Token i is i + 1, except every eos_every-th token is the EOS id 0."""
  tokens = np.arange(1, n + 1, dtype=np.uint32)
  tokens[eos_every - 1::eos_every] = 0
  path = tmp_path / "tokens.u32"
  tokens.tofile(path)
  return path, tokens


def test_token_file_rows_split_and_eos_segments(tmp_path):
  path, tokens = _token_file(tmp_path)
  c = _config(source="tokens", path=str(path), token_dtype="uint32", eos_id=0, seq_len=16,
              heldout_fraction=0.1)
  c.model.vocab_size = 1024
  cut = 900
  rows = [r for b in data.make_iterator(c, split="heldout", global_batch_size=4)
          for r in zip(*(b[k] for k in ("inputs", "targets", "segment_ids", "loss_mask")))]
  scored = 0
  for i, (inputs, targets, seg, mask) in enumerate(rows):
    # Row i is tokens[cut + 16 i : cut + 16 i + 17]: consecutive rows share a token.
    piece = tokens[cut + 16 * i:cut + 16 * i + 17]
    row, segments = np.zeros(17, np.int64), np.zeros(17, np.int64)
    row[:len(piece)] = piece
    segments[:len(piece)] = 1 + np.cumsum(np.r_[0, piece[:-1] == 0])
    np.testing.assert_array_equal(inputs, row[:-1])
    np.testing.assert_array_equal(targets, row[1:])
    np.testing.assert_array_equal(seg, segments[:-1])
    scored += mask.sum()
  # Every held-out token but the first is a target once, unless it follows an EOS.
  assert scored == np.sum(tokens[cut:-1] != 0)
  train = _take(data.make_iterator(c, split="train", global_batch_size=4), 30)
  assert max(max(b["inputs"].max(), b["targets"].max()) for b in train) <= cut
  c.model.vocab_size = 512
  with pytest.raises(ValueError, match="model.vocab_size = 512"):
    _take(data.make_iterator(c, split="heldout", global_batch_size=4), 10)


def _bpe_tokenizer(texts, path):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  tok.save(str(path))


def test_tokenizer_json_source(corpus, tmp_path):
  path, docs = corpus
  _bpe_tokenizer(list(docs.values()) + ["héllo 日本 ✓"], tmp_path / "tokenizer.json")
  c = _config(source="text", path=str(path), tokenizer=str(tmp_path), heldout_fraction=0.25)
  c.model.vocab_size = 512
  tok = data.make_tokenizer(c.data)
  assert isinstance(tok, data.JsonTokenizer) and 256 < tok.vocab_size <= 320
  text = "héllo 日本 ✓ and more"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and len(ids) < len(text.encode("utf-8"))
  assert tok.byte_lengths[ids].sum() == len(text.encode("utf-8"))
  assert tok.byte_lengths[tok.encode("<eos>")].sum() == 0
  seen = set()
  for batch in data.make_iterator(c, split="heldout", global_batch_size=4):
    seen |= {a for a, _ in _segments(batch, tok, docs)}
  assert len(seen) == math.ceil(0.25 * NUM_DOCS)
  c.model.vocab_size = 256
  with pytest.raises(config_lib.ConfigError, match="model.vocab_size"):
    data.make_iterator(c, split="train", global_batch_size=4)


def test_single_text_file_is_split_by_chunk(tmp_path):
  lines = [f"line {i} " + "x" * (i % 37) for i in range(400)]
  (tmp_path / "one.txt").write_text("\n".join(lines))
  # A chunk is at most 1.25 chunk_bytes, so with pack=False each row holds a whole one.
  c = _config(source="text", path=str(tmp_path / "one.txt"), chunk_bytes=256, heldout_fraction=0.2,
              pack=False, seq_len=320)
  tok = data.make_tokenizer(c.data)

  def chunks(split):
    count = len(data._documents(c.data, split))
    batches = _take(data.make_iterator(c, split=split, global_batch_size=1), count)
    return [tok.decode(b["inputs"][0][b["segment_ids"][0] > 0]) for b in batches]

  heldout, train = chunks("heldout"), chunks("train")
  assert len(heldout) == math.ceil(0.2 * (len(heldout) + len(train)))
  assert all(t.startswith("line ") for t in heldout + train)
  assert "".join(sorted(heldout + train, key=lambda t: int(t.split()[1]))) == "\n".join(lines)


@pytest.mark.parametrize("fields,match", [
    ({"source": "text", "path": "/no/such/dir"}, "data.path"),
    ({"source": "text", "path": "EMPTY"}, "data.path.*no non-empty files"),
    ({"source": "tokens", "path": "EMPTY_FILE"}, "data.path.*0 bytes"),
    ({"source": "tokens", "path": "ODD_FILE"}, "data.token_dtype"),
    ({"tokenizer": "/no/such/tokenizer.json"}, "data.tokenizer.*tokenizer.json"),
    ({"source": "mqar", "seq_len": 16}, "data.mqar.num_kv_pairs.*at most 4"),
    ({"chunk_bytes": 10}, "data.chunk_bytes"),
    ({"heldout_fraction": 0.0}, "data.heldout_fraction.*heldout split"),
    ({"shuffle_window": 32}, "data.shuffle_window.*retired"),
])
def test_bad_input_errors_name_the_field(fields, match, tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty.bin").write_bytes(b"")
  (tmp_path / "odd.bin").write_bytes(b"\x01" * 5)
  paths = {"EMPTY": tmp_path / "empty", "EMPTY_FILE": tmp_path / "empty.bin",
           "ODD_FILE": tmp_path / "odd.bin"}
  c = _config(**{k: str(paths.get(v, v)) if k == "path" else v for k, v in fields.items()})
  with pytest.raises(config_lib.ConfigError, match=match):
    next(data.make_iterator(c, split="heldout", global_batch_size=4))


def test_saved_config_with_the_retired_shuffle_window_loads():
  saved = json.loads(_config().to_json())
  saved["data"]["shuffle_window"] = 1024  # what earlier runs wrote to config.json
  assert config_lib.from_dict(saved).data.shuffle_window is None
  assert saved["data"]["shuffle_window"] == 1024  # the caller's dict is left alone


@pytest.mark.parametrize("kwargs,match", [
    ({"split": "test"}, "split"),
    ({"global_batch_size": 6, "process_count": 4}, "global_batch_size = 6"),
    ({"process_index": 2, "process_count": 2}, "process_index"),
])
def test_bad_arguments(kwargs, match):
  kwargs = {"split": "train", "global_batch_size": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    data.make_iterator(_config(), **kwargs)
