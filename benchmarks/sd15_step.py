"""The paper's training iteration at Stable Diffusion 1.5 size with random weights (nothing is downloaded).

One prompt, N images (24, as for gender), 21 DPM-Solver++ steps with guidance 7.5, text-encoder LoRA of rank 50
(q/k/v/out and fc1/fc2 of every layer), VAE decode at 512 px, a MobileNetV3-Large classifier at 224 px, and the
semantic loss with CLIP ViT-H/14 and DINOv2 ViT-B/14 at 224 px (the encoders of the authors' scripts,
sail-sg/finetune-fair-diffusion exp-1-debias-gender/1-main-debias.py). As there, the iteration generates the
original images and the adapted images without gradient (for the dynamic targets), then the gradient
``--microbatch`` images at a time (adjusted DFT, every step rematerialised), then AdamW. The gradient chunks
replay the targets' chains (``sample_latents(replay=...)``: the U-Net runs only backward); ``--regenerate``
generates them again, as the authors' scripts do. Frozen U-Net, VAE,
classifier and encoders are bfloat16; the text encoder, the LoRA, guidance and the solver's latents float32.
Face detection and the face-realism loss are left out (no face detector at random weights).

    python benchmarks/sd15_step.py --abstract [--tflops 400]   # CPU: compile only, FLOPs and memory
    python benchmarks/sd15_step.py [--iterations 3]            # GPU / TPU: run, s/iter and utilisation
    python benchmarks/sd15_step.py --size tiny [--abstract]    # the same code on tiny modules (any CPU)

``--abstract`` compiles from shapes alone (``jax.eval_shape``): FLOPs per image per step (XLA's cost analysis
of one guided U-Net call and of one step's backward), the iteration's FLOPs from them, the temporary memory
of one image's chain gradient at 4 and 8 steps with the stock and the fused attention, and the predicted
s/iter at ``--tflops``. Memory is compiled with the stock convolution (the one accelerators use).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from fairdiff_jax.models.tiny import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE

warnings.filterwarnings("ignore")

SD15 = {
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
    },
    "text": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    },
    # CLIP ViT-H/14 and DINOv2 ViT-B/14
    "clip": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14),
    "clip_projection": 1024,
    "dino": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14),
    "classifier_width": 1.0,
    "feature_size": 224,  # the classifier's and the encoders' input
    "latent": 64,
    "image": 512,
    "lora_rank": 50,
}
# the same iteration on tiny modules, to exercise the code on a CPU (tests/test_benchmarks.py)
TINY = {
    **SD15,
    "unet": {**TINY_UNET, "cross_attention_dim": 32},
    "vae": {k: v for k, v in TINY_VAE.items() if k != "_class_name"},
    "text": {k: v for k, v in TINY_TEXT_ENCODER.items() if k != "architectures"} | {"vocab_size": 50},
    "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8),
    "clip_projection": 16,
    "dino": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8),
    "classifier_width": 0.25,
    "feature_size": 32,
    "latent": 8,
    "image": 16,
    "lora_rank": 4,
}
SIZES = {"sd15": SD15, "tiny": TINY}
LATENT_SCALE = 0.18215
LAMBDA_IMG, FACTOR1 = 8.0, 0.2
AUTHORS = "17.3 s/iter on 8 A100s (48 h for 10k iterations)"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0}


def build(sizes: dict, num_steps: int, images: int, microbatch: int, replay: bool = True, guidance: float = 7.5):
    """Modules, abstract parameters and the pieces of the iteration (pure functions of explicit parameters)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from transformers import CLIPVisionConfig, Dinov2Config

    from fairdiff_jax import adaptors, alignment, sampling
    from fairdiff_jax.attributes.image_ops import IMAGENET_MEAN, IMAGENET_STD, model_input
    from fairdiff_jax.attributes.mobilenet import MobileNetV3Large
    from fairdiff_jax.attributes.vision_features import CLIPImageFeatures, DINOv2Features
    from fairdiff_jax.models import loader
    from fairdiff_jax.models.loader import SchedulerSettings

    bf16, side = jnp.bfloat16, sizes["feature_size"]
    context_shape = (sizes["text"]["max_position_embeddings"], sizes["text"]["hidden_size"])
    unet = loader.build_unet(sizes["unet"], bf16)
    vae = loader.build_vae(sizes["vae"], bf16)
    text = loader.build_text_encoder(sizes["text"], jnp.float32)
    classifier = MobileNetV3Large(heads={"gender": 2}, width_multiplier=sizes["classifier_width"], dtype=bf16)
    encoder_size = dict(image_size=side)
    clip = CLIPImageFeatures(CLIPVisionConfig(**sizes["clip"], **encoder_size), sizes["clip_projection"])
    dino = DINOv2Features(Dinov2Config(**sizes["dino"], **encoder_size))

    def as_dtype(tree, dtype):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)

    pixels = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    key = jax.random.key(0)
    frozen = {
        "unet": as_dtype(loader.unet_param_shapes(unet), bf16),
        "vae": as_dtype(loader.vae_param_shapes(vae), bf16),
        "text": loader.text_encoder_param_shapes(text),
        "classifier": as_dtype(jax.eval_shape(classifier.init, key, pixels), bf16),
        "clip": as_dtype(jax.eval_shape(clip.init, key, pixels)["params"], bf16),
        "dino": as_dtype(jax.eval_shape(dino.init, key, pixels)["params"], bf16),
    }
    rank = sizes["lora_rank"]
    lora = jax.eval_shape(lambda k: adaptors.init_lora(k, frozen["text"], adaptors.TEXT_ENCODER_TARGETS, rank), key)
    lora_scale = adaptors.lora_scale(rank, float(rank))
    schedule = sampling.make_schedule(SchedulerSettings())

    def unet_fn(params, latents, timesteps, context):  # guidance and the solver in float32
        return unet.apply({"params": params}, latents, timesteps, context).sample.astype(jnp.float32)

    def embed(text_params, ids):
        return text(ids, params=text_params).last_hidden_state

    def generate(params, unet_params, cond, uncond, noise, mode, **chain):
        latents = sampling.sample_latents(
            unet_fn, unet_params, noise, cond, uncond, num_steps, schedule, max_steps=num_steps,
            guidance_scale=guidance, gradient_mode=mode, **chain,
        )  # fmt: skip
        latents, trajectory = latents if chain.get("record") else (latents, None)
        images = sampling.decode_latents(vae, params["vae"], latents, LATENT_SCALE)
        return (images, trajectory) if chain.get("record") else images

    def classify(params, images):
        small = jax.image.resize(images, (images.shape[0], side, side, 3), "linear")
        return classifier.apply(params, small, train=False)["gender"].astype(jnp.float32)

    def extractors(params):  # bfloat16 inputs make the (dtype-less) encoder modules compute in bfloat16
        clip_input = lambda x: model_input(x, side).astype(bf16)  # noqa: E731
        dino_input = lambda x: model_input(x, side, IMAGENET_MEAN, IMAGENET_STD).astype(bf16)  # noqa: E731
        return [
            lambda x: clip.apply({"params": params["clip"]}, clip_input(x)),
            lambda x: dino.apply({"params": params["dino"]}, dino_input(x)),
        ]

    def chunk_loss(lora_params, params, cond_ids, uncond_ids, noise, x_ori, labels, weights, trajectory=None):
        """Loss of ``noise.shape[0]`` images (their share of the N-image loss) through the adjusted DFT
        (replaying the targets' pass when ``trajectory`` is given)."""
        text_params = adaptors.apply_lora(params["text"], lora_params, scale=lora_scale)
        cond = jnp.broadcast_to(embed(text_params, cond_ids), (noise.shape[0], *context_shape))
        uncond = embed(text_params, uncond_ids)
        chunk = generate(params, params["unet"], cond, uncond, noise, "adjusted", replay=trajectory)
        ce = alignment.alignment_cross_entropy(classify(params["classifier"], chunk), labels, images)
        _, per_image = alignment.semantic_loss(chunk, x_ori, extractors(params))
        return ce + LAMBDA_IMG * jnp.sum(weights * per_image) / images

    def iteration(lora_params, params, cond_ids, uncond_ids, noise):
        """Loss and LoRA gradient of one prompt's N images (``noise`` ``[N, 4, h, w]``)."""
        base_cond, base_uncond = embed(params["text"], cond_ids), embed(params["text"], uncond_ids)
        text_params = adaptors.apply_lora(params["text"], lora_params, scale=lora_scale)
        cond, uncond = embed(text_params, cond_ids), embed(text_params, uncond_ids)
        tile = (noise.shape[0], *context_shape)
        x_ori = generate(params, params["unet"], jnp.broadcast_to(base_cond, tile), base_uncond, noise, "detached")
        ori_pred = jnp.argmax(classify(params["classifier"], x_ori), -1)
        adapted, trajectory = generate(
            params, params["unet"], jnp.broadcast_to(cond, tile), uncond, noise, "detached", record=True
        )
        trajectory = jax.lax.stop_gradient(trajectory) if replay else None
        probs = jax.nn.softmax(classify(params["classifier"], jax.lax.stop_gradient(adapted)), -1)
        (labels,), _ = alignment.dynamic_targets([probs], [np.array([0.5, 0.5])])
        has_face = jnp.ones(labels.shape, bool)  # no detector here: every image is its face
        weights = alignment.mismatch_factor({"gender": labels}, {"gender": ori_pred}, has_face, {"gender": FACTOR1})

        def chunks(x):
            return x.reshape((images // microbatch, microbatch) + x.shape[1:])

        def accumulate(carry, rows):
            loss, grads = jax.value_and_grad(chunk_loss)(lora_params, params, cond_ids, uncond_ids, *rows)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, lora_params))
        rows = tuple(chunks(x) for x in (noise, jax.lax.stop_gradient(x_ori), labels, weights))
        rows = (*rows, jax.tree.map(chunks, trajectory))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, rows)
        return loss, grads

    def guided(unet_params, latents, cond, uncond):  # one step's guided U-Net call
        return sampling.guided_output(unet_fn, unet_params, latents, jnp.int32(500), cond, uncond, guidance)

    def step_backward(unet_params, latents, cond, uncond, cotangent):  # its rematerialised forward + VJP
        _, vjp = jax.vjp(lambda c, u: guided(unet_params, latents, c, u), cond, uncond)
        return vjp(cotangent)

    shapes = {
        "latents": jax.ShapeDtypeStruct((1, 4, sizes["latent"], sizes["latent"]), jnp.float32),
        "context": jax.ShapeDtypeStruct((1, *context_shape), jnp.float32),
        "image": jax.ShapeDtypeStruct((1, sizes["image"], sizes["image"], 3), jnp.float32),
        "ids": jax.ShapeDtypeStruct((1, context_shape[0]), jnp.int32),
    }
    pieces = dict(guided=guided, step_backward=step_backward, classify=classify, extractors=extractors, vae=vae)
    return frozen, lora, chunk_loss, iteration, pieces, shapes


def _fresh(fn):
    """A new function object: ``jax.jit`` caches traces per function, and the attention setting is read when tracing."""
    return lambda *args: fn(*args)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def count_flops(frozen, pieces, shapes, images: int, steps: int, replay: bool = True) -> dict:
    """FLOPs per image (XLA cost analysis of single pieces; loops are counted once, so nothing is scanned)."""
    import jax
    import jax.numpy as jnp

    from fairdiff_jax import sampling
    from fairdiff_jax.models.attention import attention_implementation

    latents, context, image = shapes["latents"], shapes["context"], shapes["image"]

    def tail(params, z, x_ori):  # decode, classifier and the two encoders for one image
        images = sampling.decode_latents(pieces["vae"], params["vae"], z, LATENT_SCALE, remat=False)
        logits = pieces["classify"](params["classifier"], images)
        return jnp.sum(logits) + sum(jnp.sum(e(images) * e(x_ori)) for e in pieces["extractors"](params))

    with attention_implementation("xla"):  # the same FLOPs as the fused attention, without a loop of chunks
        lowered = {
            "unet_step": jax.jit(_fresh(pieces["guided"])).lower(frozen["unet"], latents, context, context),
            "unet_step_backward": jax.jit(_fresh(pieces["step_backward"])).lower(
                frozen["unet"], latents, context, context, latents
            ),
            "tail_forward": jax.jit(_fresh(tail)).lower(frozen, latents, image),
            "tail_gradient": jax.jit(jax.grad(tail, argnums=1)).lower(frozen, latents, image),
        }
    flops = {name: _flops(program.compile()) for name, program in lowered.items()}
    chain = steps * flops["unet_step"]
    gradient_chain = steps * flops["unet_step_backward"] + (0 if replay else chain)  # replay: no forward U-Net
    per_image = {
        "original + targets (no gradient)": 2 * (chain + flops["tail_forward"]),
        "gradient pass": gradient_chain + flops["tail_forward"] + flops["tail_gradient"],
    }
    return {"pieces": flops, "per_image": per_image, "iteration": images * sum(per_image.values())}


def abstract(args) -> int:
    import jax

    from fairdiff_jax.models.attention import attention_implementation
    from fairdiff_jax.models.conv import canonical_conv_gradients
    from fairdiff_jax.sampling import Trajectory

    sizes = SIZES[args.size]
    with canonical_conv_gradients("stock"):
        frozen, _, _, _, pieces, shapes = build(sizes, args.steps, args.images, args.microbatch)
        start = time.perf_counter()
        counted = count_flops(frozen, pieces, shapes, args.images, args.steps, not args.regenerate)
        print(f"FLOP count compiled in {time.perf_counter() - start:.0f} s")
        per_step = counted["pieces"]
        print(f"per image per step: guided U-Net forward (batch 2) {per_step['unet_step'] / 1e12:.4g} TFLOP, its "
              f"backward with rematerialisation {per_step['unet_step_backward'] / 1e12:.4g} TFLOP")  # fmt: skip
        for name, value in counted["per_image"].items():
            print(f"per image, {name}: {value / 1e12:.4g} TFLOP")
        total = counted["iteration"]
        chain = args.images * args.steps * per_step["unet_step"]
        how = "generated again" if args.regenerate else "replayed (no forward U-Net)"
        print(f"iteration ({args.images} images, {args.steps} steps, gradient chains {how}): {total / 1e15:.4g} PFLOP; "
              f"one chain over all images is {chain / 1e15:.4g} PFLOP ({100 * chain / total:.0f} %)")  # fmt: skip
        for tflops in args.tflops:
            print(f"predicted at {tflops:.0f} TFLOP/s: {total / (tflops * 1e12):.3g} s/iter")

        latents, context = shapes["latents"], shapes["context"]
        for implementation in ("stock", "auto"):
            with attention_implementation(implementation):
                program = jax.jit(_fresh(pieces["step_backward"]))
                compiled = program.lower(frozen["unet"], latents, context, context, latents).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
            print(f"one step's backward (guided U-Net, batch 2), {implementation} attention: temp {temp:.4g} GiB")
        for steps in args.steps_list:
            for implementation in ("stock", "auto"):
                frozen_s, lora_s, chunk_loss, _, _, shapes_s = build(sizes, steps, args.images, args.microbatch)
                spec = jax.ShapeDtypeStruct
                inputs = (lora_s, frozen_s, shapes_s["ids"], shapes_s["ids"], shapes_s["latents"], shapes_s["image"],
                          spec((1,), "int32"), spec((1,), "float32"))  # fmt: skip
                if not args.regenerate:  # the recorded chain the gradient replays: [1, steps, C, h, w] twice
                    recorded = spec((1, steps, *shapes_s["latents"].shape[1:]), "float32")
                    inputs = (*inputs, Trajectory(recorded, recorded))
                start = time.perf_counter()
                with attention_implementation(implementation):
                    compiled = jax.jit(jax.grad(chunk_loss)).lower(*inputs).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
                label = "stock" if implementation == "stock" else "fused (chunked on CPU; cuDNN flash on GPU)"
                kind = "regenerated" if args.regenerate else "replayed"
                print(f"one image's chain gradient ({kind}), {steps} steps, {label} attention: temp {temp:.4g} GiB "
                      f"(compiled in {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return 0


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    sizes = SIZES[args.size]
    frozen, lora, _, iteration, pieces, shapes = build(
        sizes, args.steps, args.images, args.microbatch, not args.regenerate
    )
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}) x{jax.device_count()}; using one", flush=True)

    def materialise(tree, key):
        """Random weights on the device from one normal draw: fan-in scaled kernels, unit scales and variances."""
        paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        sizes = [int(np.prod(leaf.shape)) for _, leaf in paths]
        offsets = np.cumsum([0] + sizes)

        def draw(key):
            flat = jax.random.normal(key, (int(offsets[-1]),), jnp.float32)
            leaves = []
            for (path, leaf), start, size in zip(paths, offsets, sizes):
                name = str(getattr(path[-1], "key", path[-1]))
                values = flat[start : start + size].reshape(leaf.shape)
                if name in ("scale", "var"):
                    values = jnp.ones(leaf.shape)
                elif name in ("bias", "mean"):
                    values = jnp.zeros(leaf.shape)
                elif len(leaf.shape) >= 2:  # kernels, embeddings, LoRA factors
                    values = values / np.sqrt(np.prod(leaf.shape[:-1]))
                leaves.append(values.astype(leaf.dtype))
            return treedef.unflatten(leaves)

        return jax.jit(draw)(key)

    params, lora_params = materialise(frozen, jax.random.key(1)), materialise(lora, jax.random.key(2))
    optimizer = optax.adamw(5e-5, weight_decay=1e-2)

    def train_step(lora_params, opt_state, params, ids, uncond_ids, noise):
        loss, grads = iteration(lora_params, params, ids, uncond_ids, noise)
        updates, opt_state = optimizer.update(grads, opt_state, lora_params)
        return optax.apply_updates(lora_params, updates), opt_state, loss

    vocab = sizes["text"]["vocab_size"]
    ids = jnp.asarray(np.arange(shapes["ids"].shape[1])[None] % (vocab - 2), jnp.int32)
    noise = jax.random.normal(jax.random.key(3), (args.images, *shapes["latents"].shape[1:]), jnp.float32)
    opt_state = optimizer.init(lora_params)
    start = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(lora_params, opt_state, params, ids, ids, noise).compile()
    print(f"compiled the iteration in {time.perf_counter() - start:.0f} s", flush=True)
    times = []
    for i in range(args.iterations + 1):  # the first is a warm-up
        start = time.perf_counter()
        lora_params, opt_state, loss = step(lora_params, opt_state, params, ids, ids, noise)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
        print(f"iteration {i}: {times[-1]:.2f} s, loss {float(loss):.4f}", flush=True)
    seconds = float(np.median(times[1:]))
    if args.iteration_pflop:
        flops = 1e15 * args.iteration_pflop
    else:
        flops = count_flops(frozen, pieces, shapes, args.images, args.steps, not args.regenerate)["iteration"]
    achieved = flops / seconds / 1e12
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device.device_kind), None)
    stats = device.memory_stats() or {}
    print(f"{seconds:.2f} s/iter (median of {args.iterations}); {flops / 1e15:.4g} PFLOP/iter -> "
          f"{achieved:.4g} TFLOP/s" + (f", {100 * achieved / peak:.0f} % of the {peak:.0f} TFLOP/s bf16 peak" if peak
          else "") + f"; peak memory {stats.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB")  # fmt: skip
    print(f"the authors: {AUTHORS}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--abstract", action="store_true", help="compile on shapes only (CPU): FLOPs and memory")
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15", help="tiny: small modules, for tests")
    parser.add_argument("--images", type=int, default=24, help="images per prompt per iteration (N)")
    parser.add_argument("--steps", type=int, default=21, help="sampling steps of the iteration")
    parser.add_argument(
        "--regenerate", action="store_true", help="gradient chunks generate their chains again (as the authors do)"
    )
    parser.add_argument("--microbatch", type=int, default=8, help="images per gradient chunk")
    parser.add_argument("--steps-list", type=int, nargs="+", default=[4, 8], help="step counts for the memory check")
    parser.add_argument("--tflops", type=float, nargs="+", default=[400.0], help="throughputs for the prediction")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument(
        "--iteration-pflop", type=float, default=None, help="FLOPs per iteration (from --abstract) to skip counting"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's bf16 peak, if not in the table")
    args = parser.parse_args(argv)
    if args.images % args.microbatch:
        parser.error(f"--microbatch {args.microbatch} must divide --images {args.images}")
    return abstract(args) if args.abstract else run(args)


if __name__ == "__main__":
    sys.exit(main())
