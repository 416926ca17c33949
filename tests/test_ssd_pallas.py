"""Pallas SSD kernels (interpreted on CPU) against the jnp chunked and sequential scans; CUDA lowering
at the published Mamba shapes, 64-bit offsets at long lengths, the named error off CUDA."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.kernels.ssd import UnsupportedPlatformError, ssd_pallas
from nemotron_jax.layers.ssd import ssd_chunked, ssd_sequential

# The kernels through the Pallas interpreter: CPU has no compiled kernel.
pallas = functools.partial(ssd_pallas, interpret=True)
KERNELS = {"ssd_chunk_state", "ssd_state_pass", "ssd_chunk_scan", "ssd_state_pass_bwd",
           "ssd_chunk_pair_bwd", "ssd_chunk_token_bwd", "ssd_group_bwd"}
# The custom call of a Triton kernel: jaxlib <= 0.10.2 embeds the Triton IR, later
# versions compile it to PTX while lowering and call it through an FFI target.
TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
CUDA_EXPORT = dict(platforms=("cuda",),
                   disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_TARGETS])


def triton_kernel_names(text):
  """Names of the Pallas Triton kernels called in an exported module's text."""
  assert any(target in text for target in TRITON_TARGETS)
  return re.findall(r'name = "(ssd_\w+)"', text)

H, P, N = 4, 8, 16
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def make_inputs(b, l, g, dtype, with_init, seed=0):
  """Random SSD inputs with realistic ranges: dt in ~(0.05, 1.3), A in [-4.5, -1].

  NumPy draws them: eager jax.random would compile every op, slower than the tests.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  x, B, C = normal(b, l, H, P), normal(b, l, g, N), normal(b, l, g, N)
  dt = jax.nn.softplus(normal(b, l, H) - 1.0)
  A = -jnp.exp(jnp.asarray(rng.uniform(0.0, 1.5, H), jnp.float32))
  D = normal(H)
  init = normal(b, H, P, N) if with_init else None
  x, dt, B, C = (t.astype(dtype) for t in (x, dt, B, C))
  return (x, dt, A, B, C, D), init


def packed_ids(b, l):
  """[b l] ids. Row 0 changes document at 8, 9, 16, 23 and 30: on chunk boundaries for
  chunk 8, a one-token document at 8, mid-chunk changes. Row 1 is one document (id 7)."""
  rows = [np.searchsorted([8, 9, 16, 23, 30], np.arange(l), side="right") + 3, np.full(l, 7)]
  return jnp.asarray(np.stack(rows[:b]), jnp.int32)


@functools.lru_cache(maxsize=None)
def vjp_fn(impl, chunk_size, with_init, with_seg):
  """jit of (inputs, cotangents) -> (y, final state, gradients w.r.t. x, dt, A, B, C, D, initial_state)."""
  def run(args, init, seg, dy, dfinal):
    def f(*diff):
      kw = dict(initial_state=diff[6] if with_init else None, segment_ids=seg if with_seg else None)
      if impl is not ssd_sequential:
        kw["chunk_size"] = chunk_size
      return impl(*diff[:6], **kw)
    (y, final), pullback = jax.vjp(f, *args, init)
    return y, final, pullback((dy, dfinal))
  return jax.jit(run)


# (b, l, n_groups, chunk, dtype, initial state, segment ids): together they cover
# ragged and whole-chunk lengths, 1 / 2 / 4 groups, with and without initial
# state and segments, float32 and bfloat16.
CASES = {
    "f32_ragged_groups2_init_segments": (2, 37, 2, 8, jnp.float32, True, True),
    "f32_whole_chunks_groups1": (1, 32, 1, 16, jnp.float32, False, False),
    "bf16_ragged_groups4_init_segments": (2, 40, 4, 16, jnp.bfloat16, True, True),
}


def rel_err(actual, expected):
  """Largest absolute error relative to the largest reference magnitude."""
  expected = np.asarray(expected, np.float64)
  return np.max(np.abs(np.asarray(actual, np.float64) - expected)) / max(np.max(np.abs(expected)), 1e-6)


@pytest.mark.parametrize("case", CASES)
def test_matches_references(case):
  b, l, g, q, dtype, with_init, with_seg = CASES[case]
  args, init = make_inputs(b, l, g, dtype, with_init)
  init = jnp.zeros((b, H, P, N)) if init is None else init
  seg = packed_ids(b, l)
  rng = np.random.default_rng(1)
  dy = jnp.asarray(rng.standard_normal((b, l, H, P)), jnp.float32)
  dfinal = jnp.asarray(rng.standard_normal((b, H, P, N)), jnp.float32)

  got = vjp_fn(pallas, q, with_init, with_seg)(args, init, seg, dy, dfinal)
  # All paths see the same (possibly bf16-rounded) inputs and work in float32, so
  # y, the final state and float32 gradients differ only by the rounding of
  # different summation orders: ~1e-6 of the largest value here, checked at 1e-5
  # and 2e-5. Gradients w.r.t. bf16 inputs come back rounded to bf16, where
  # nearly equal values can land one step apart: up to 2^-7 of the largest.
  grad_tol = 2e-5 if dtype == jnp.float32 else 1e-2
  for ref in (ssd_chunked, ssd_sequential):
    want = vjp_fn(ref, q, with_init, with_seg)(args, init, seg, dy, dfinal)
    assert rel_err(got[0], want[0]) < 1e-5, f"y vs {ref.__name__}"
    assert rel_err(got[1], want[1]) < 1e-5, f"final state vs {ref.__name__}"
    for name, gg, gw in zip(GRAD_NAMES, got[2], want[2]):
      if name == "initial_state" and not with_init:
        continue
      assert gg.dtype == gw.dtype, name
      assert rel_err(gg, gw) < grad_tol, f"d{name} vs {ref.__name__}: {rel_err(gg, gw):.2e}"


def test_segments_isolate_documents():
  """With a reset at token 8, outputs from 8 on must not depend on earlier tokens or on the initial state."""
  (x, dt, A, B, C, D), init = make_inputs(1, 24, 2, jnp.float32, True)
  seg = jnp.asarray([[0] * 8 + [1] * 16], jnp.int32)
  run = jax.jit(jax.vmap(
      lambda x, init: pallas(x, dt, A, B, C, D, chunk_size=16, initial_state=init, segment_ids=seg)[0]))
  y = run(jnp.stack([x, x.at[:, :8].set(3.0)]), jnp.stack([init, -init]))
  np.testing.assert_array_equal(np.asarray(y[0, :, 8:]), np.asarray(y[1, :, 8:]))
  assert not np.allclose(y[0, :, :8], y[1, :, :8])


def test_cuda_export_contains_triton_kernels():
  b, l, h, p, n, g, q = 1, 32, 4, 16, 16, 2, 16
  shapes = [(b, l, h, p), (b, l, h), (h,), (b, l, g, n), (b, l, g, n), (h,), (b, h, p, n)]
  args = [jnp.zeros(s, jnp.float32) for s in shapes] + [jnp.zeros((b, l), jnp.int32)]

  def loss(x, dt, A, B, C, D, init, seg):
    y, final = ssd_pallas(x, dt, A, B, C, D, chunk_size=q, initial_state=init, segment_ids=seg)
    return jnp.sum(y**2) + jnp.sum(final**2)

  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=range(7))), **CUDA_EXPORT)(*args)
  assert set(triton_kernel_names(exported.mlir_module())) == KERNELS


def test_vmapped_call_exports_for_cuda():
  """Nested vmap of the gradient batches the CUDA kernels and the other platforms' stand-in alike."""
  b, l, h, p, n, g = 1, 20, 4, 16, 16, 2
  shapes = [(b, l, h, p), (b, l, h), (h,), (b, l, g, n), (b, l, g, n), (h,)]
  args = [jax.ShapeDtypeStruct((2, 3, *s), jnp.float32) for s in shapes]
  loss = lambda *a: jnp.sum(ssd_pallas(*a, chunk_size=16)[0] ** 2)
  f = jax.vmap(jax.vmap(jax.value_and_grad(loss, argnums=range(6))))
  assert set(triton_kernel_names(jax.export.export(jax.jit(f), **CUDA_EXPORT)(*args).mlir_module())) == KERNELS
  with pytest.raises(UnsupportedPlatformError):
    jax.export.export(jax.jit(f), platforms=("tpu",))(*args)


def test_bad_groups_names_the_field():
  (x, dt, A, B, C, D), _ = make_inputs(1, 8, 1, jnp.float32, False)
  B3 = jnp.zeros((1, 8, 3, N))
  with pytest.raises(ValueError, match="n_groups = 3"):
    ssd_pallas(x, dt, A, B3, B3, D, chunk_size=8)


# Published Mamba shapes (heads, head_dim, groups, d_state, chunk): Nemotron 3 Nano,
# Nemotron Nano v2 (head_dim 80), Nemotron-H 8B, and an odd one where nothing is a
# power of two (head_dim 12, d_state 24, chunk 48).
PUBLISHED = {"nano3": (64, 64, 8, 128, 128), "nano_v2": (128, 80, 8, 128, 128),
             "nemotron_h_8b": (128, 64, 8, 128, 128), "odd": (6, 12, 3, 24, 48)}


def ssd_inputs(b, l, h, p, g, n, dtype, seed=0):
  """(x, dt, A, B, C, D), initial state, segment ids (a change at l // 3), as make_inputs but any shape."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  x, B, C = normal(b, l, h, p), normal(b, l, g, n), normal(b, l, g, n)
  dt = jax.nn.softplus(normal(b, l, h) - 1.0)
  A = -jnp.exp(jnp.asarray(rng.uniform(0.0, 1.5, h), jnp.float32))
  x, dt, B, C = (t.astype(dtype) for t in (x, dt, B, C))
  seg = jnp.asarray(np.repeat([[0] * (l // 3) + [1] * (l - l // 3)], b, axis=0), jnp.int32)
  return (x, dt, A, B, C, normal(h)), normal(b, h, p, n), seg


@pytest.mark.parametrize("shape", PUBLISHED)
def test_published_shapes_export_for_cuda(shape):
  """Forward and backward lower to Triton at every published shape, float32 and bfloat16."""
  h, p, g, n, q = PUBLISHED[shape]
  b, l = 1, 2 * q + 5
  for dtype in (jnp.float32, jnp.bfloat16):
    (x, dt, A, B, C, D), init, seg = jax.eval_shape(lambda: ssd_inputs(b, l, h, p, g, n, dtype))

    def loss(x, dt, A, B, C, D, init, seg):
      y, final = ssd_pallas(x, dt, A, B, C, D, chunk_size=q, initial_state=init, segment_ids=seg)
      return jnp.sum(y**2) + jnp.sum(final**2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=range(7)))
    text = jax.export.export(grad, **CUDA_EXPORT)(x, dt, A, B, C, D, init, seg).mlir_module()
    assert set(triton_kernel_names(text)) == KERNELS, (shape, dtype)


# Interpreted values and gradients at the published head_dim / groups / d_state / chunk
# with 8 heads (the interpreter's run time grows with the grid), a little over one chunk;
# the odd shape in full over three chunks.
VALUE_CASES = {"head_dim64_f32": (8, 64, 8, 128, 128, jnp.float32, 128 + 5),
               "head_dim80_bf16": (8, 80, 8, 128, 128, jnp.bfloat16, 128 + 5),
               "odd_f32": (6, 12, 3, 24, 48, jnp.float32, 2 * 48 + 7)}


@pytest.mark.parametrize("case", VALUE_CASES)
def test_published_shapes_match_xla(case):
  h, p, g, n, q, dtype, l = VALUE_CASES[case]
  args, init, seg = ssd_inputs(1, l, h, p, g, n, dtype)
  rng = np.random.default_rng(1)
  dy = jnp.asarray(rng.standard_normal((1, l, h, p)), jnp.float32)
  dfinal = jnp.asarray(rng.standard_normal((1, h, p, n)), jnp.float32)
  got = vjp_fn(pallas, q, True, True)(args, init, seg, dy, dfinal)
  want = vjp_fn(ssd_chunked, q, True, True)(args, init, seg, dy, dfinal)
  # float32 throughout: different summation orders round differently, ~1e-6 of the
  # largest value for sums of a few hundred terms. dA and dD [h] each sum ~1e6
  # products of both signs (every token and head_dim entry), so their rounding
  # relative to the largest entry reaches a few 1e-5. bf16 gradients are rounded to bf16.
  assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
  for name, gg, gw in zip(GRAD_NAMES, got[2], want[2]):
    grad_tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4 if name in ("A", "D") else 2e-5
    assert gg.dtype == gw.dtype, name
    assert rel_err(gg, gw) < grad_tol, f"d{name}: {rel_err(gg, gw):.2e}"


def test_dot_precision_bf16_rounds_operands():
  """precision="bf16" changes results by bf16 rounding of the dot operands (and no more)."""
  args, init, seg = ssd_inputs(1, 40, 4, 16, 2, 16, jnp.float32)
  run = jax.jit(lambda precision: pallas(*args, chunk_size=16, initial_state=init, segment_ids=seg,
                                         precision=precision)[0], static_argnums=0)
  err = rel_err(run("bf16"), run("float32"))
  assert 1e-4 < err < 3e-2, err


def test_non_cuda_platform_raises_named_error():
  (x, dt, A, B, C, D), _, _ = ssd_inputs(1, 20, 4, 16, 2, 16, jnp.float32)
  f = jax.jit(lambda *a: ssd_pallas(*a, chunk_size=16)[0])
  message = r"only for CUDA, not for platform\(s\) \['tpu'\].*interpret=True"
  with pytest.raises(UnsupportedPlatformError, match=message):
    jax.export.export(f, platforms=("tpu",))(x, dt, A, B, C, D)
  with pytest.raises(UnsupportedPlatformError, match=r"\['cpu'\]"):
    f(x, dt, A, B, C, D)


@pytest.mark.parametrize("setting,value", [("block_p", 24), ("block_t", 8), ("num_warps", 3),
                                           ("precision", "fp16"), ("interpret", None)])
def test_bad_kernel_setting_names_it(setting, value):
  (x, dt, A, B, C, D), _, _ = ssd_inputs(1, 8, 4, 16, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match=f"{setting} = {value!r} is invalid"):
    ssd_pallas(x, dt, A, B, C, D, chunk_size=8, **{setting: value})


def triton_modules(exported):
  """{kernel name: [Triton IR text]} of the Triton calls in an exported CUDA module.

  Reads the kernels' serialized Triton IR through jax's private MLIR bindings (a test-only
  look inside the lowering, which has no public API). Skips where jaxlib embeds compiled
  PTX instead (after 0.10.2).
  """
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib.mlir import ir
  from jax._src.pallas.triton import lowering as triton_lowering

  with jax_mlir.make_ir_context():
    module = ir.Module.parse(exported.mlir_module())
  found = {}

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          if inner.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in inner.attributes:
            config = inner.attributes["mhlo.backend_config"]
            if "ir" not in config:
              pytest.skip("this jaxlib embeds compiled PTX, not Triton IR, in the export")
            with triton_lowering._new_ir_context():
              kernel = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
              found.setdefault(ir.StringAttr(config["name"]).value, []).append(str(kernel))
          walk(inner.operation)

  walk(module.operation)
  return found


def test_long_sequence_uses_64_bit_offsets():
  """At 512K tokens of Nano 3 Mamba shapes the states [b chunks h p n] take 8 GiB: every kernel
  must address such operands with 64-bit offsets (32-bit ones wrap past 2^31 elements)."""
  h, p, g, n, q = PUBLISHED["nano3"]
  l = 1 << 19
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  args = [spec((1, l, h, p)), spec((1, l, h)), spec((h,), jnp.float32), spec((1, l, g, n)),
          spec((1, l, g, n)), spec((h,), jnp.float32)]

  def loss(*a):
    y, final = ssd_pallas(*a, chunk_size=q)
    return jnp.sum(y) + jnp.sum(final)

  exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=range(6))), **CUDA_EXPORT)(*args)
  modules = triton_modules(exported)
  assert set(modules) == KERNELS
  for name, texts in modules.items():
    for text in texts:
      assert re.search(r"tt\.addptr.*tensor<[^>]*i64>", text), f"{name} has no 64-bit offsets"
