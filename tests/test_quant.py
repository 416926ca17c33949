"""Low-precision formats and quantised matmuls vs ml_dtypes casts and hand-computed numbers."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemotron_jax import quant

E4M3, E5M2, E2M1 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float4_e2m1fn
ELEMENT = {"fp8_e4m3": E4M3, "fp8_e5m2": E5M2, "fp8_block": E4M3, "mxfp8": E4M3, "nvfp4": E2M1}
RECIPES = ["bf16", "fp8_tensorwise", "fp8_blockwise", "mxfp8", "nvfp4"]
# LLVM -O0 compiles these small graphs ~3x faster; without fast-math the float
# semantics are the same at every level, and the numpy references would catch it.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def grid(dtype):
  """Every finite value of an ml_dtypes float format, sorted, as float64."""
  n = 16 if dtype == E2M1 else 256
  v = np.arange(n, dtype=np.uint8).view(dtype).astype(np.float64)
  return np.unique(v[np.isfinite(v)])


def on_grid(v, dtype):
  return np.isin(np.asarray(v, np.float64), grid(dtype))


def numpy_out(f, static=("fmt", "axis", "two_d")):
  """jit f and hand back numpy arrays; every check then runs in numpy, not in eager JAX ops."""
  jf = jit(f, static_argnames=static)
  return lambda *a, **kw: jax.tree.map(np.asarray, jf(*a, **kw))


qdq = numpy_out(lambda x, fmt, axis=-1, two_d=False:
                quant.quantize_dequantize(x, fmt, axis=axis, two_d=two_d))
qz = numpy_out(lambda x, fmt, axis=-1, two_d=False:
               quant.quantize(x, fmt, axis=axis, two_d=two_d))
both = numpy_out(lambda x, fmt, axis=-1, two_d=False:
                 (quant.quantize(x, fmt, axis=axis, two_d=two_d),
                  quant.quantize_dequantize(x, fmt, axis=axis, two_d=two_d)))
stats_of = numpy_out(lambda x, fmt: quant.quant_stats(x, fmt), static="fmt")
# [len(keys), ...] stochastically rounded copies of x.
sample = numpy_out(lambda x, fmt, keys:
                   jax.vmap(lambda k: quant.quantize_dequantize(x, fmt, key=k))(keys), static="fmt")


def heavy_tailed(shape, seed):
  """Values over ~12 binades with exact zeros and an all-zero row: stresses scales and underflow."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape))
  x[rng.random(shape) < 0.1] = 0
  x[0] = 0
  return x.astype(np.float32)


# --- element grid and scales ---

@pytest.mark.parametrize("fmt,axis,two_d", [
  ("fp8_e4m3", -1, False), ("fp8_e5m2", -1, False), ("fp8_block", -1, False),
  ("fp8_block", 0, False), ("fp8_block", -1, True), ("mxfp8", -1, False), ("mxfp8", 0, False),
  ("nvfp4", -1, False), ("nvfp4", 0, False), ("nvfp4", -1, True)])
def test_values_lie_on_grid(fmt, axis, two_d):
  x = heavy_tailed((150, 70), seed=0)  # neither dim a multiple of any block size
  q, deq = both(x, fmt, axis, two_d)
  assert np.isfinite(deq).all() and (deq[0] == 0).all()
  assert on_grid(q.elements, ELEMENT[fmt]).all()
  np.testing.assert_array_equal(deq, q.elements * q.block_scale * q.tensor_scale)
  # Dividing out the scales lands on the grid up to the one f32 rounding of the tensor scale.
  scale = q.block_scale.astype(np.float64) * q.tensor_scale
  ratio = np.where(scale > 0, deq / np.where(scale > 0, scale, 1), 0)
  g = grid(ELEMENT[fmt])
  nearest = g[np.abs(ratio[..., None] - g).argmin(-1)]
  np.testing.assert_allclose(ratio, nearest, rtol=2 ** -22, atol=0)
  if fmt == "nvfp4":
    assert on_grid(q.block_scale, E4M3).all()
  if fmt == "mxfp8":
    e = np.log2(q.block_scale)
    assert (e == np.round(e)).all()


def test_rounding_matches_ml_dtypes():
  """Scale-1 tensors, so the elements are the inputs cast by ml_dtypes (ties, subnormals included)."""
  rng = np.random.default_rng(1)
  for fmt, dtype, fmax in [("fp8_e4m3", E4M3, 448.0), ("fp8_e5m2", E5M2, 57344.0)]:
    g = grid(dtype)
    mids = (g[1:] + g[:-1]) / 2  # exact ties: round-to-nearest-even decides
    mag = np.exp(rng.uniform(np.log(g[g > 0].min() / 4), np.log(fmax), 2000))
    x = np.concatenate([mids, mag * rng.choice([-1, 1], mag.size), [fmax]]).astype(np.float32)
    np.testing.assert_array_equal(qdq(x, fmt), x.astype(dtype).astype(np.float32))
  # nvfp4 with a 6 * 448 in every 16-block: tensor scale 1, block scale 448, elements x / 448.
  g = grid(E2M1)
  e = np.round(rng.uniform(-6, 6, (64, 16)) * 1024) / 1024  # 14 bits, so e * 448 is exact
  e[:, :6] = rng.choice((g[1:] + g[:-1]) / 2, (64, 6))
  e[:, 15] = 6
  e = e.astype(np.float32)
  deq = qdq(e * 448, "nvfp4")
  np.testing.assert_array_equal(deq / 448, e.astype(E2M1).astype(np.float32))


def test_scales_hand_computed():
  # Per tensor: amax 3.5 -> 3.5/448 = 2^-7 and 3.5/57344 = 2^-14.
  x = np.array([1.0, -2.0, 3.5, 0.0, 0.1], np.float32)
  q = qz(x, "fp8_e4m3")
  np.testing.assert_array_equal(q.tensor_scale, 2.0 ** -7)
  np.testing.assert_array_equal(q.elements, [128, -256, 448, 0, 13])  # 12.8 -> 13
  q = qz(x, "fp8_e5m2")
  np.testing.assert_array_equal(q.tensor_scale, 2.0 ** -14)
  np.testing.assert_array_equal(q.elements, [16384, -32768, 57344, 0, 1536])  # 1638.4 -> 1536 (step 256)

  # fp8_block 1x128 tiles of a [3, 200] tensor: tiles of 128 and 72 (+56 padding).
  x = np.zeros((3, 200), np.float32)
  x[0, 5], x[0, 6], x[0, 150], x[0, 151], x[2, 0] = 7.0, 1.0, 0.875, 0.1, -448.0
  q = qz(x, "fp8_block")
  np.testing.assert_array_equal(q.block_scale[:, [0, 127, 128, 199]],
                                [[1 / 64] * 2 + [1 / 512] * 2, [1] * 4, [1] * 4])
  np.testing.assert_array_equal(q.elements[0, [5, 6, 150, 151]], [448, 64, 448, 52])  # 51.2 -> 52 (step 4)
  np.testing.assert_array_equal(qdq(x, "fp8_block")[0, 151], 52 / 512)
  # 128x128 blocks: amax 3.5 in block (0, 0), 7/16 in block (1, 1), the others empty.
  w = np.zeros((130, 140), np.float32)
  w[3, 4], w[129, 139] = 3.5, -7 / 16
  q = qz(w, "fp8_block", two_d=True)
  np.testing.assert_array_equal(q.block_scale[[0, 0, 129, 129], [0, 139, 0, 139]], [2.0 ** -7, 1, 1, 2.0 ** -10])

  # mxfp8 (OCP: 2^(floor(log2 amax) - 8)) over blocks of 32 in a row of 80.
  x = np.zeros((1, 80), np.float32)
  x[0, :3] = 1.0, 0.3, 1e-6  # amax 1 -> 2^-8; 76.8 -> 80 (step 8); 2.6e-4 underflows
  x[0, 32:34] = 500.0, 3.3  # amax 500 -> 2^0; 500 saturates to 448; 3.3 -> 3.25 (step 0.25)
  x[0, 64] = 0.75  # amax 0.75 -> 2^-9; 384
  q = qz(x, "mxfp8")
  np.testing.assert_array_equal(q.block_scale[0, [0, 32, 64]], [2.0 ** -8, 1, 2.0 ** -9])
  np.testing.assert_array_equal(q.elements[0, [0, 1, 2, 32, 33, 64]], [256, 80, 0, 448, 3.25, 384])
  stats = stats_of(x, "mxfp8")
  assert stats["saturation"] == np.float32(1 / 6) and stats["underflow"] == np.float32(1 / 6)

  # nvfp4: amax 2688 = 448 * 6 makes the tensor scale 1; s_block = block amax / 6.
  x = np.zeros((2, 40), np.float32)
  x[0, :2] = 2688.0, 1000.0  # s 448; 1000/448 = 2.23 -> 2
  x[0, 16:18] = 60.0, 25.0  # s 10; 6, and the tie 2.5 -> 2 (even)
  x[0, 32] = 6.6  # s 1.1 -> 1.125 in E4M3; 5.87 -> 6, so it dequantises to 6.75
  x[1, :2] = 3e-3, 1e-3  # s 5e-4 < 2^-10: rounds to 0 in E4M3, the block flushes to zero
  x[1, 32] = 6e-3  # s 1e-3 -> 2^-9 (smallest subnormal); 3.07 -> 3
  expect_bs = [[448, 10, 1.125], [0, 0, 2.0 ** -9]]
  for c in [1.0, 2.0 ** -10]:  # scaling x scales only the tensor scale
    q = qz(x * c, "nvfp4")
    np.testing.assert_array_equal(q.tensor_scale, np.full(x.shape, c, np.float32))
    np.testing.assert_array_equal(q.block_scale[:, [0, 16, 32]], expect_bs)
    np.testing.assert_array_equal(q.elements[0, [0, 1, 16, 17, 32]], [6, 2, 6, 2, 6])
    np.testing.assert_array_equal(q.elements[1], np.where(np.arange(40) == 32, 3, 0))
    np.testing.assert_array_equal(qdq(x * c, "nvfp4")[0, [1, 17, 32]],
                                  np.float32(c) * np.float32([896, 20, 6.75]))
  stats = stats_of(x, "nvfp4")
  assert stats["underflow"] == 2 / 8 and stats["saturation"] == 0


@pytest.mark.parametrize("fmt,shape", [("fp8_block", (200, 130)), ("nvfp4", (40, 24))])
def test_2d_blocks_transpose(fmt, shape):
  """Square blocks quantise w and w^T alike: forward and dgrad see one quantised weight."""
  w = heavy_tailed(shape, seed=2)
  np.testing.assert_array_equal(qdq(w, fmt, two_d=True).T, qdq(w.T, fmt, two_d=True))
  # 1-D blocks along different axes do not: the check can fail.
  assert (qdq(w, fmt, axis=0) != qdq(w, fmt, axis=1)).any()


# --- stochastic rounding ---

@pytest.mark.parametrize("fmt,dtype,scale",
                         [("fp8_e4m3", E4M3, 1.0), ("fp8_e5m2", E5M2, 1.0), ("nvfp4", E2M1, 448.0)])
def test_stochastic_rounding_unbiased(fmt, dtype, scale):
  """Each sample is a grid neighbour and the mean over N keys is within 3 gaps / sqrt(N) of x.

  Hoeffding: P(|mean - x| >= t * gap) <= 2 exp(-2 N t^2) = 2 e^-18 for
  t = 3 / sqrt(N), under 1e-5 after a union bound over the elements. The
  errors in gaps averaged over all M off-grid elements as well are within
  3 / sqrt(N M) by the same bound, which catches a bias of under 1% of a gap.
  """
  g = grid(dtype)
  fmax = g[-1]
  rng = np.random.default_rng(3)
  e = rng.uniform(-fmax, fmax, (16, 16)) * np.exp(-rng.uniform(0, 3, (16, 16)))
  e = np.round(e * 2.0 ** 10) / 2.0 ** 10  # few enough bits that e * scale is exact
  e[:, 0] = fmax  # pins every scale at `scale`, as in test_rounding_matches_ml_dtypes
  e = e.astype(np.float32)
  x = e * np.float32(scale)
  n = 2000
  keys = jax.random.split(jax.random.key(0), n)
  samples = sample(x, fmt, keys) / scale
  lo = g[np.searchsorted(g, e, side="right") - 1]
  hi = g[np.minimum(np.searchsorted(g, e, side="left"), g.size - 1)]
  assert ((samples == lo) | (samples == hi)).all()
  bound = 3 * (hi - lo) / np.sqrt(n)
  assert (np.abs(samples.mean(0) - e) <= bound).all()
  off = lo != hi
  err = (samples - e)[:, off] / (hi - lo)[off]
  for direction in (1, np.sign(e[off])):  # bias toward -inf, and toward zero
    assert abs(np.mean(err * direction)) <= 3 / np.sqrt(err.size)
  # Round-to-nearest misses the same bound on most off-grid values: the bound can fail.
  rne = qdq(x, fmt) / scale
  assert np.mean(np.abs(rne - e)[off] > bound[off]) > 0.75
  np.testing.assert_array_equal(sample(x, fmt, keys) / scale, samples)  # a fixed key repeats
  assert (samples[0] != samples[1]).any()


# --- Random Hadamard Transform ---

def test_hadamard_orthogonal():
  m = quant.rht_matrix()
  np.testing.assert_allclose(m @ m.T, np.eye(16), atol=1e-7)
  np.testing.assert_array_equal(np.abs(m), 0.25)
  sylvester = functools.reduce(np.kron, [np.array([[1, 1], [1, -1]])] * 4)
  signs = np.sign(m[:, 0])  # Sylvester's first column is all ones
  np.testing.assert_array_equal(np.sign(m) * signs[:, None], sylvester)
  assert (signs < 0).any() and (signs > 0).any()
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((40, 6)), rng.standard_normal((40, 5))
  rx, ry = quant.random_hadamard_transform(x, 0), quant.random_hadamard_transform(y, 0)
  assert rx.shape == (48, 6)
  np.testing.assert_allclose(rx.T @ ry, x.T @ y, rtol=1e-5, atol=1e-5)
  spike = np.zeros((1, 16), np.float32)
  spike[0, 3] = 1
  np.testing.assert_allclose(np.abs(quant.random_hadamard_transform(spike, 1)), 0.25)
  # The butterflies equal each zero-padded 16-block times the matrix, along either axis.
  z = rng.standard_normal((3, 37, 5)).astype(np.float32)
  for axis in (1, 2):
    moved = np.moveaxis(z, axis, -1)
    moved = np.pad(moved, [(0, 0), (0, 0), (0, -moved.shape[-1] % 16)])
    blocks = moved.reshape(*moved.shape[:-1], -1, 16).astype(np.float64)
    expected = np.moveaxis((blocks @ m.astype(np.float64)).reshape(moved.shape), -1, axis)
    np.testing.assert_allclose(quant.random_hadamard_transform(z, axis), expected, atol=1e-6)


def test_stochastic_rounding_bits_are_uniform_and_keyed():
  """The counter-based bits: uniform on [0, 1) (mean, variance, a 64-bin histogram),
  uncorrelated between neighbours, different under another key, the same under the same."""
  shape = (1024, 1024)
  u = np.asarray(quant.formats.uniform(jax.random.key(0), shape), np.float64).ravel()
  assert 0 <= u.min() and u.max() < 1
  assert abs(u.mean() - 0.5) < 5e-3 and abs(u.var() - 1 / 12) < 5e-3
  counts = np.histogram(u, 64, (0, 1))[0]
  chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
  assert chi2 < 120  # 63 degrees of freedom: the 1e-6 tail starts near 125
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5e-3
  assert abs(np.corrcoef(u[:-1024], u[1024:])[0, 1]) < 5e-3
  other = np.asarray(quant.formats.uniform(jax.random.key(1), shape)).ravel()
  assert abs(np.corrcoef(u, other)[0, 1]) < 5e-3
  np.testing.assert_array_equal(u, quant.formats.uniform(jax.random.key(0), shape).ravel())


# --- quantised matmuls ---

@functools.partial(jit, static_argnames=("recipe", "grad_fmt", "stochastic_rounding", "rht",
                                         "forward_sr"))
def _vjp(x, w, ct, key, recipe, grad_fmt, stochastic_rounding, rht, forward_sr):
  y, vjp = jax.vjp(lambda x, w: quant.qdot(x, w, recipe, key=key, grad_fmt=grad_fmt,
                                           stochastic_rounding=stochastic_rounding, rht=rht,
                                           forward_sr=forward_sr), x, w)
  return (y,) + vjp(ct)


def _grads(recipe, x, w, ct, key=None, grad_fmt=None, stochastic_rounding=None, rht=None,
           forward_sr=None):
  """(y, dx, dw) of qdot for cotangent ct; one compilation per recipe and options."""
  return tuple(map(np.asarray, _vjp(x, w, ct, key, recipe, grad_fmt, stochastic_rounding, rht,
                                    forward_sr)))


@pytest.fixture(scope="module")
def xw():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 64, 256), np.float32)
  w = rng.standard_normal((256, 128), np.float32) * np.float32(0.05)
  return x, w, rng.standard_normal((2, 64, 128), np.float32)


# Relative Frobenius error of (y, dx, dw) against the bf16 recipe, as (lower, upper) bounds.
# RNE to p mantissa bits has relative RMS error about 2^-p / sqrt(24) for
# normal values: E4M3 (p=3) 0.026, E5M2 (p=2) 0.051. A GEMM of two such
# operands sums independent errors: sqrt(2) * 0.026 = 0.036 for FP8. MXFP8
# adds saturation of values in (448, 512) * scale under the OCP rule. E2M1
# has 1 mantissa bit and a coarse subnormal 0.5, about 0.10 per operand, so
# 0.15 per GEMM; stochastic rounding doubles the error variance of dy
# (ulp^2/6 vs ulp^2/12): sqrt(0.1^2 + 2 * 0.1^2) = 0.17. Upper bounds are
# about 1.25 x those estimates; lower bounds prove quantisation happened.
FP8, E5 = (0.025, 0.045), (0.045, 0.07)
ERROR_BOUNDS = [
  ("fp8_tensorwise", {}, (FP8, FP8, FP8)),
  ("fp8_tensorwise", {"grad_fmt": "e5m2"}, (FP8, E5, E5)),
  ("fp8_blockwise", {}, (FP8, FP8, FP8)),
  ("mxfp8", {}, ((0.025, 0.055),) * 3),
  ("nvfp4", {}, ((0.1, 0.19),) * 3),
  ("nvfp4", {"key": jax.random.key(7)}, ((0.1, 0.19), (0.12, 0.22), (0.12, 0.22))),
]


@pytest.mark.parametrize("recipe,kw,bounds", ERROR_BOUNDS)
def test_qdot_error_vs_bf16(xw, recipe, kw, bounds):
  ref = _grads("bf16", *xw)
  out = _grads(recipe, *xw, **kw)
  for name, a, b, (lo, hi) in zip(["y", "dx", "dw"], out, ref, bounds):
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert lo < err < hi, (recipe, kw, name, err)


def test_all_zero_tensor_gives_zeros():
  # Shapes as in the other tests, so the compilations are shared.
  keys = jax.random.split(jax.random.key(0), 2000)
  for fmt in ["fp8_e4m3", "fp8_e5m2", "nvfp4"]:
    assert (sample(np.zeros((16, 16), np.float32), fmt, keys) == 0).all()
  for fmt in quant.FORMATS:
    assert (both(np.zeros((150, 70), np.float32), fmt)[1] == 0).all()
  for recipe, kw, _ in ERROR_BOUNDS:
    y, dx, dw = _grads(recipe, np.zeros((2, 64, 256), np.float32), np.zeros((256, 128), np.float32),
                       np.ones((2, 64, 128), np.float32), **kw)
    assert (y == 0).all() and (dx == 0).all() and (dw == 0).all()


def test_bf16_recipe_is_plain_dot(xw):
  x, w, ct = xw
  y, dx, dw = _grads("bf16", x, w, ct)
  np.testing.assert_allclose(y, x @ w, rtol=2e-2, atol=2e-2)  # bf16 inputs: 2^-9 relative each
  np.testing.assert_allclose(dw, np.einsum("bmk,bmn->kn", x, ct), rtol=2e-2, atol=0.2)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype


@pytest.mark.parametrize("recipe", ["fp8_blockwise", "nvfp4"])
def test_qdot_gemms_use_stated_operands(xw, recipe):
  """Each GEMM equals the plain dot of operands quantised per the recipe; 2-D weights in fwd and dgrad."""
  x, w, ct = xw
  y, dx, dw = _grads(recipe, x, w, ct)
  fmt = {"fp8_blockwise": "fp8_block", "nvfp4": "nvfp4"}[recipe]
  wq = qdq(w, fmt, two_d=True)
  x2, ct2 = x.reshape(-1, 256), ct.reshape(-1, 128)
  if recipe == "nvfp4":  # 128 tokens: 8 blocks of 16 rows, each mixed by the RHT matrix
    m = quant.rht_matrix()
    x2, ct2 = (np.einsum("bik,ij->bjk", v.reshape(8, 16, -1), m).reshape(128, -1) for v in (x2, ct2))
  hi = lambda a, b: a.astype(np.float64) @ b
  np.testing.assert_allclose(y, hi(qdq(x, fmt), wq), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, hi(qdq(ct, fmt), wq.T), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, hi(qdq(x2, fmt, axis=0).T, qdq(ct2, fmt, axis=0)), rtol=1e-5, atol=1e-4)


def test_qdot_options(xw):
  x, w, ct = xw
  k = jax.random.key(3)
  a, b = _grads("nvfp4", x, w, ct, key=k), _grads("nvfp4", x, w, ct, key=k)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  c = _grads("nvfp4", x, w, ct, key=jax.random.key(4))
  assert (a[1] != c[1]).any()
  np.testing.assert_array_equal(a[0], c[0])  # the forward never rounds stochastically
  rne = _grads("nvfp4", x, w, ct)
  off = _grads("nvfp4", x, w, ct, key=k, stochastic_rounding=False)
  for u, v in zip(rne, off):
    np.testing.assert_array_equal(u, v)
  no_rht = _grads("nvfp4", x, w, ct, rht=False)
  np.testing.assert_array_equal(no_rht[1], rne[1])  # RHT touches wgrad only
  assert (no_rht[2] != rne[2]).any()


def test_forward_stochastic_rounding(xw):
  """forward_sr rounds x and w stochastically: keyed, unbiased over keys, gradients' streams kept."""
  x, w, ct = xw
  k = jax.random.key(3)
  rne, grad_sr = _grads("nvfp4", x, w, ct), _grads("nvfp4", x, w, ct, key=k)
  a, b = (_grads("nvfp4", x, w, ct, key=k, forward_sr=True) for _ in range(2))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert (a[0] != rne[0]).any() and (a[1] != grad_sr[1]).any()  # dgrad reuses the rounded weight
  ys = jit(jax.vmap(lambda kk: quant.qdot(x, w, "nvfp4", key=kk, forward_sr=True)))(
      jax.random.split(k, 64))
  exact = x.astype(np.float64) @ w
  err = lambda y: np.linalg.norm(y - exact) / np.linalg.norm(exact)
  # One draw is noisier than rounding to nearest, but the noise averages out; RNE's error does not.
  assert err(np.asarray(ys[0])) > err(rne[0]) > 3 * err(np.mean(np.asarray(ys), 0))
  with pytest.raises(ValueError, match="forward_sr"):
    quant.qdot(x, w, "bf16", key=k, forward_sr=True)


def test_bad_arguments_name_the_field():
  x = jnp.ones((4, 4))
  with pytest.raises(ValueError, match="fmt='fp6'"):
    quant.quantize_dequantize(x, "fp6")
  with pytest.raises(ValueError, match="two_d=True"):
    quant.quantize_dequantize(x, "mxfp8", two_d=True)
  with pytest.raises(ValueError, match="recipe='fp8'"):
    quant.qdot(x, x, "fp8")
  with pytest.raises(ValueError, match="grad_fmt"):
    quant.qdot(x, x, "nvfp4", grad_fmt="e5m2")
  with pytest.raises(ValueError, match="key"):
    quant.qdot(x, x, "nvfp4", stochastic_rounding=True)


@pytest.mark.parametrize("gather_blocks,wgrad_rows", [(None, 128), (3, 16), (2, 32)])
def test_blocked_wgrad_equals_ragged_dot_general(gather_blocks, wgrad_rows, monkeypatch):
  """The blocked weight gradient sums each group's rows: regrouped onto a coarser row grid
  or not, in one pass or in chunks of blocks."""
  from nemotron_jax.layers import moe
  from nemotron_jax.quant import dot as qdot_lib
  b, k, n = 16, 32, 24
  aligned = jnp.array([48, 0, 16, 32], jnp.int32)  # group starts on the b-row grid
  m = 128  # 16 rows past the groups, zero as _align_groups leaves them
  rng = np.random.default_rng(7)
  x, dy = (rng.standard_normal((m, d), np.float32) for d in (k, n))
  x[96:], dy[96:] = 0, 0
  monkeypatch.setattr(qdot_lib, "WGRAD_ROWS", wgrad_rows)
  if gather_blocks:
    monkeypatch.setattr(moe, "GATHER_BYTES", gather_blocks * k * n * 4)
  blocked = qdot_lib._grouped_wgrad("blocked", jnp.asarray(x), jnp.asarray(dy), aligned, b)
  ragged = qdot_lib._grouped_wgrad("ragged", jnp.asarray(x), jnp.asarray(dy), aligned, b)
  np.testing.assert_allclose(blocked, ragged, rtol=1e-5, atol=1e-5)
  assert blocked.shape == (4, k, n) and not np.asarray(blocked[1]).any()


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_qragged_dot_matches_group_loop(recipe, impl):
  """Forward and gradients equal a loop of qdot over the groups, with either grouped GEMM."""
  sizes = [37, 0, 22]  # an empty group, a group starting off the 16-row grid, 5 trailing rows
  m, k, n = 64, 256, 128
  rng = np.random.default_rng(5)
  x, ct = rng.standard_normal((m, k), np.float32), rng.standard_normal((m, n), np.float32)
  w = rng.standard_normal((len(sizes), k, n), np.float32) * np.float32(0.1)
  gs = np.array(sizes, np.int32)

  @jit
  def ragged(x, w):
    y, vjp = jax.vjp(lambda x, w: quant.qragged_dot(x, w, gs, recipe, impl=impl), x, w)
    return (y,) + vjp(ct)

  @jit
  def loop(x, w):
    ys, dxs, dws, start = [], [], [], 0
    for i, s in enumerate(sizes):
      if s == 0:
        dws.append(jnp.zeros((k, n)))
        continue
      sl = slice(start, start + s)
      yi, vjpi = jax.vjp(lambda a, b: quant.qdot(a, b, recipe), x[sl], w[i])
      dxi, dwi = vjpi(ct[sl])
      ys.append(yi)
      dxs.append(dxi)
      dws.append(dwi)
      start += s
    trail = m - start
    return (jnp.concatenate(ys + [jnp.zeros((trail, n))]),
            jnp.concatenate(dxs + [jnp.zeros((trail, k))]), jnp.stack(dws))

  y, dx, dw = ragged(x, w)
  ry, rdx, rdw = loop(x, w)
  np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-4)
