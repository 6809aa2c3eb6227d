"""One adjusted-DFT gradient in JAX (fairdiff_jax.sampling) beside a PyTorch implementation of the same algorithm.

Both sides load the same diffusers-layout folder (a tiny random one by default), run DPM-Solver++ 2M with
classifier-free guidance from the same noise and embeddings, decode with the VAE, and differentiate
``sum(weights * images)`` with respect to the conditional embedding and the U-Net parameters using the
adjusted gradient (U-Net input detached; the guided eps's gradient multiplied by the normalised c_i;
every step checkpointed). Prints the median times, their ratio and the gradients' relative error.

The JAX variants (every pair of ``--conv``, the convolution-gradient modes of ``fairdiff_jax.models.conv``, and
``--attention``, the implementations of ``fairdiff_jax.models.attention``) and PyTorch are timed in turn, one
repeat of each per round, so a drifting machine load affects them alike. PyTorch visits the timesteps that
diffusers' ``DPMSolverMultistepScheduler`` sets from the folder's scheduler config; the run stops if JAX's differ.

    python benchmarks/dft_step.py [--model DIR] [--batch 8] [--steps 10] [--repeats 5] [--unroll]
        [--conv canonical stock] [--attention matmul xla] [--threads 1] [--cpu-devices 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")


def sd_alphas_cumprod(settings) -> np.ndarray:
    return np.asarray(settings.alphas_cumprod(), dtype=np.float64)


def dpm_plan(scheduler_folder: str, alpha_bar: np.ndarray, num_steps: int):
    """Timesteps, first-order flags and normalised c_i of a DPM-Solver++ 2M run (PyTorch side).

    The timesteps are the ones PyTorch diffusers' ``DPMSolverMultistepScheduler`` visits when built from the
    folder's ``scheduler_config.json`` (its own default spacing, as a pipeline swapping in that solver gets
    them), so the JAX side's spacing is checked against diffusers rather than against a copy of itself.
    """
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_pretrained(scheduler_folder, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(num_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    betas = 1.0 - alpha_bar / np.concatenate([[1.0], alpha_bar[:-1]])
    raw = np.array([np.sqrt(alpha_bar[t] * (1 - alpha_bar[t])) / betas[t] for t in timesteps])
    scales = raw / np.exp(np.log(raw).mean())
    lower_order_final = scheduler.config.lower_order_final and num_steps < 15
    first_order = [i == 0 or (i == num_steps - 1 and lower_order_final) for i in range(num_steps)]
    return timesteps, first_order, scales


def torch_dft_gradient(torch, unet, vae, scale, noise, cond, uncond, weights, alpha_bar, plan, gs):
    """Adjusted DFT gradient in PyTorch; returns (d/d cond, {param name: grad})."""
    from torch.utils.checkpoint import checkpoint

    alpha = np.sqrt(alpha_bar)
    sigma = np.sqrt(1.0 - alpha_bar)
    lam = np.log(alpha) - np.log(sigma)
    timesteps, first_order, scales = plan
    num_steps = len(timesteps)
    cond = cond.clone().requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    batch = noise.shape[0]

    def step(latents, prev_x0, cond, i):
        s0 = timesteps[i]
        target = timesteps[i + 1] if i + 1 < num_steps else 0
        model_in = latents.detach()
        context = torch.cat([uncond.expand_as(cond), cond])
        t_batch = torch.full((2 * batch,), s0, dtype=torch.long)
        out = unet(torch.cat([model_in, model_in]), t_batch, encoder_hidden_states=context).sample
        eps_uncond, eps_cond = out.chunk(2)
        eps = eps_uncond + gs * (eps_cond - eps_uncond)
        if eps.requires_grad:
            eps.register_hook(lambda grad, c=float(scales[i]): grad * c)
        x0 = (latents - float(sigma[s0]) * eps) / float(alpha[s0])
        h = lam[target] - lam[s0]
        phi = float(alpha[target] * np.expm1(-h))
        new = float(sigma[target] / sigma[s0]) * latents - phi * x0
        if not first_order[i]:
            r0 = (lam[s0] - lam[timesteps[i - 1]]) / h
            new = new - 0.5 * phi * (x0 - prev_x0) / float(r0)
        return new, x0

    latents, prev_x0 = noise, torch.zeros_like(noise)
    for i in range(num_steps):
        latents, prev_x0 = checkpoint(step, latents, prev_x0, cond, i, use_reentrant=False)
    images = checkpoint(lambda z: vae.decode(z / scale).sample, latents, use_reentrant=False)
    images = images.permute(0, 2, 3, 1).clamp(-1.0, 1.0)
    loss = (weights * images).sum()
    loss.backward()
    return cond.grad, {name: p.grad for name, p in unet.named_parameters()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="diffusers-layout folder (default: a tiny random one)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--unroll", action="store_true", help="fully unroll the JAX scan")
    parser.add_argument(
        "--conv", nargs="+", default=["auto"], help="JAX convolution-gradient modes to time (auto, canonical, stock)"
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        help="JAX attention implementations to time (auto, matmul, xla, chunked, stock); every pair with --conv",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="1: both sides single-threaded (steadier on a shared machine)"
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="N > 1: split the host into N JAX CPU devices and shard the batch over them (data parallel, as the "
        "trainer does over any mesh); PyTorch keeps its intra-op threads. Must divide --batch.",
    )
    args = parser.parse_args(argv)
    if args.cpu_devices < 1 or args.batch % args.cpu_devices:
        parser.error(f"--cpu-devices must be >= 1 and divide --batch {args.batch} (got {args.cpu_devices})")
    if args.cpu_devices > 1:  # before JAX starts its CPU client
        if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
            parser.error("XLA_FLAGS already sets --xla_force_host_platform_device_count; drop it or --cpu-devices")
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        )
    if args.threads == 1:  # before JAX starts its CPU client
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    elif args.threads:
        parser.error("--threads takes 1 (single-threaded) or 0 (each library's default)")

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fairdiff_jax import sampling, schedules
    from fairdiff_jax.models import load_stable_diffusion, write_tiny_sd_folder
    from fairdiff_jax.models.attention import attention_implementation
    from fairdiff_jax.models.conv import canonical_conv_gradients
    from fairdiff_jax.models.convert import flax_to_pt_state_dict

    folder = args.model or write_tiny_sd_folder(tempfile.mkdtemp(prefix="tiny_sd_"), seed=0)
    sd = load_stable_diffusion(folder, components=("unet", "vae", "scheduler"), cache_dir=None)
    unet_pt = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).float()
    vae_pt = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).float()
    vae_pt.requires_grad_(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = unet_pt.config
    size, dim = config.sample_size, config.cross_attention_dim
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((args.batch, 4, size, size)).astype(np.float32)
    cond = rng.standard_normal((args.batch, 16, dim)).astype(np.float32)
    uncond = rng.standard_normal((1, 16, dim)).astype(np.float32)
    image_size = size * 2 ** (len(vae_pt.config.block_out_channels) - 1)
    weights = rng.standard_normal((args.batch, image_size, image_size, 3)).astype(np.float32)

    # ---- JAX
    schedule = sampling.make_schedule(sd.scheduler)
    unet_fn = sampling.unet_apply_fn(sd.unet)

    def loss(unet_params, cond_emb, uncond_emb, noise, weights):
        latents = sampling.sample_latents(
            unet_fn,
            unet_params,
            noise,
            cond_emb,
            uncond_emb,
            args.steps,
            schedule,
            max_steps=args.steps,
            guidance_scale=args.guidance,
            unroll=bool(args.unroll) or 1,
        )
        images = sampling.decode_latents(sd.vae, sd.vae_params, latents, sd.vae_scaling_factor)
        return jnp.sum(weights * images)

    if jax.default_backend() == "cpu" and jax.device_count() != args.cpu_devices:
        raise SystemExit(f"JAX sees {jax.device_count()} CPU devices, --cpu-devices asked for {args.cpu_devices}")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))  # automatic sharding propagation
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jax_inputs = (
        jax.device_put(sd.unet_params, whole),
        jax.device_put(jnp.asarray(cond), rows),
        jax.device_put(jnp.asarray(uncond), whole),
        jax.device_put(jnp.asarray(noise), rows),
        jax.device_put(jnp.asarray(weights), rows),
    )
    compiled = {}
    for mode in args.conv:
        for attention in args.attention:
            variant = f"conv '{mode}', attention '{attention}'"
            start = time.perf_counter()
            with canonical_conv_gradients(mode), attention_implementation(attention):
                grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*jax_inputs).compile()
            compile_s = time.perf_counter() - start
            temp_mb = grad_fn.memory_analysis().temp_size_in_bytes / 2**20
            print(f"jax {variant}: compile {compile_s:.1f} s, temp {temp_mb:.1f} MiB", flush=True)
            jax_grads = jax.block_until_ready(grad_fn(*jax_inputs))  # warm-up
            compiled[variant] = grad_fn

    # ---- PyTorch
    alpha_bar = sd_alphas_cumprod(sd.scheduler)
    plan = dpm_plan(os.path.join(folder, "scheduler"), alpha_bar, args.steps)
    jax_timesteps = [int(t) for t in schedules.timesteps_for(schedule, args.steps)]
    if jax_timesteps != plan[0]:
        raise SystemExit(f"timesteps differ: jax {jax_timesteps}, diffusers {plan[0]}")
    torch_args = (
        torch,
        unet_pt,
        vae_pt,
        float(vae_pt.config.scaling_factor),
        torch.from_numpy(noise),
        torch.from_numpy(cond),
        torch.from_numpy(uncond),
        torch.from_numpy(weights),
        alpha_bar,
        plan,
        args.guidance,
    )
    torch_dft_gradient(*torch_args)  # warm-up

    # ---- timed in turn: one repeat of every JAX variant, then of PyTorch, per round
    jax_times = {variant: [] for variant in compiled}
    torch_times = []
    for _ in range(args.repeats):
        for variant, grad_fn in compiled.items():
            start = time.perf_counter()
            jax_grads = jax.block_until_ready(grad_fn(*jax_inputs))
            jax_times[variant].append(time.perf_counter() - start)
        start = time.perf_counter()
        cond_grad_pt, param_grads_pt = torch_dft_gradient(*torch_args)
        torch_times.append(time.perf_counter() - start)

    # ---- agreement
    pt_from_jax = flax_to_pt_state_dict(jax.device_get(jax_grads[0]))
    num = den = 0.0
    for name, grad in param_grads_pt.items():
        reference = np.asarray(pt_from_jax[name], np.float64).reshape(grad.shape)
        num += float(np.sum((grad.double().numpy() - reference) ** 2))
        den += float(np.sum(reference**2))
    param_err = (num / den) ** 0.5
    cond_jax = np.asarray(jax_grads[1], np.float64)
    cond_err = float(np.linalg.norm(cond_grad_pt.double().numpy() - cond_jax) / np.linalg.norm(cond_jax))

    torch_ms = 1e3 * statistics.median(torch_times)
    print(
        f"model {folder}: batch {args.batch}, {size}x{size} latents, {args.steps} DPM-Solver++ steps, "
        f"CFG {args.guidance}"
    )
    print(f"jax scan unroll: {'full' if args.unroll else 1}")
    print(f"timesteps (diffusers' DPMSolverMultistepScheduler, as JAX visits them): {plan[0]}")
    print(
        f"devices: jax {jax.devices()[0].platform} x{jax.device_count()} (batch sharded), "
        f"torch threads {torch.get_num_threads()}"
    )
    for variant, times in jax_times.items():
        jax_ms = 1e3 * statistics.median(times)
        print(
            f"jax   adjusted DFT gradient, {variant}: {jax_ms:9.1f} ms (median of {args.repeats}); "
            f"torch / jax {torch_ms / jax_ms:.2f}"
        )
    print(f"torch adjusted DFT gradient: {torch_ms:9.1f} ms (median of {args.repeats})")
    print(
        f"gradient relative error (torch vs jax {list(compiled)[-1]}): U-Net params {param_err:.2e}, "
        f"cond embedding {cond_err:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
