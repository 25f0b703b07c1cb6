"""NumPyro's examples/vae as a benchmark anchor (784-400-20 ReLU, Bernoulli, Trace_ELBO).

Two loops, as NumPyro's example offers them: a jitted ``svi.update`` per step, and the
whole epoch in one jitted ``lax.fori_loop`` (NumPyro's example as written). Both draw the
batches from a device-resident array and binarize them on the device. Used only where JAX
and NumPyro are installed (``pip install numpyro``); elsewhere :func:`contenders` is empty.
"""

from __future__ import annotations

import importlib.util


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("jax", "numpyro"))


def contenders(x_cpu, batch_size: int, contender_cls) -> list:
    """The two NumPyro loops as benchmark contenders (none without JAX and NumPyro)."""
    if not available():
        return []
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from jax import lax, random
    from jax.example_libraries import stax
    from numpyro.infer import SVI, Trace_ELBO

    hidden, z_dim = 400, 20
    images = jnp.asarray(x_cpu.numpy())  # (N, 784) on JAX's default device
    n = images.shape[0]
    num_batches = -(-n // batch_size)
    full = n // batch_size  # the fused loop takes full batches, as NumPyro's example does

    def encoder():
        return stax.serial(stax.Dense(hidden), stax.Relu, stax.Dense(2 * z_dim))

    def decoder():
        return stax.serial(stax.Dense(hidden), stax.Relu, stax.Dense(784))

    def model(batch):
        decode = numpyro.module("decoder", decoder(), (batch.shape[0], z_dim))
        with numpyro.plate("batch", batch.shape[0]):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([z_dim]).to_event(1))
            numpyro.sample("obs", dist.Bernoulli(logits=decode(z)).to_event(1), obs=batch)

    def guide(batch):
        encode = numpyro.module("encoder", encoder(), (batch.shape[0], 784))
        loc, raw = jnp.split(encode(batch), 2, axis=-1)
        with numpyro.plate("batch", batch.shape[0]):
            numpyro.sample("z", dist.Normal(loc, jax.nn.softplus(raw) + 1e-6).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
    key = random.PRNGKey(0)
    state = {"svi": svi.init(key, jnp.zeros((batch_size, 784)))}

    def batch_at(key, perm, i):
        index = lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
        return random.bernoulli(key, images[index]).astype(jnp.float32)

    update = jax.jit(svi.update)

    def per_step(epoch):
        ekey = random.fold_in(key, epoch)
        perm = random.permutation(ekey, n)
        svi_state, total = state["svi"], 0.0
        for i in range(num_batches):
            index = perm[i * batch_size : (i + 1) * batch_size]
            batch = random.bernoulli(random.fold_in(ekey, i), images[index]).astype(jnp.float32)
            svi_state, loss = update(svi_state, batch)
            total = total + loss
        state["svi"] = svi_state
        jax.block_until_ready(total)

    @jax.jit
    def fused(svi_state, ekey):
        perm = random.permutation(ekey, n)

        def body(i, val):
            total, s = val
            s, loss = svi.update(s, batch_at(random.fold_in(ekey, i), perm, i))
            return total + loss, s

        return lax.fori_loop(0, full, body, (0.0, svi_state))

    def fused_epoch(epoch):
        total, state["svi"] = fused(state["svi"], random.fold_in(key, epoch))
        jax.block_until_ready(total)

    return [
        contender_cls("NumPyro examples/vae: jitted svi.update per step", batch_size, per_step),
        contender_cls("NumPyro examples/vae as written: the epoch in one jitted fori_loop "
                      f"({full} full batches)", batch_size, fused_epoch),
    ]
