"""Text generation: sampling over a fixed-size token buffer (one compile for any length)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(model, variables, prompt: jax.Array, max_new_tokens: int, *, rng: jax.Array,
                  temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """prompt [l] int32 -> [l + max_new_tokens]. Each step re-reads the whole buffer.

  Causality means tokens after the current position never influence it, so
  one jitted forward over the padded buffer serves every step.
  """
  length = prompt.shape[0] + max_new_tokens
  buffer = jnp.zeros((1, length), jnp.int32).at[0, :prompt.shape[0]].set(prompt)

  def step(carry, i):
    buffer, rng = carry
    logits = model.apply(variables, buffer)[0, i - 1]
    rng, key = jax.random.split(rng)
    if temperature == 0:
      token = jnp.argmax(logits)
    else:
      logits = logits / temperature
      if top_k:
        cutoff = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
      token = jax.random.categorical(key, logits)
    return (buffer.at[0, i].set(token.astype(jnp.int32)), rng), None

  (buffer, _), _ = jax.lax.scan(step, (buffer, rng), jnp.arange(prompt.shape[0], length))
  return buffer[0]
