"""Train a MobileNetV3-Large attribute classifier (one head per attribute) and write a classifier folder.

The paper trains gender on CelebA and race / age on FairFace, starting from ImageNet weights, and evaluates with
separately trained classifiers (train twice with different seeds / splits for the training and evaluation ones).

    # FairFace race + age, reading the released CSVs and images directly (no extra dependency)
    python experiments/train_classifier.py --data fairface --data_root ~/fairface --attributes race,age \
        --init mobilenet_v3_large-imagenet.pth --out classifiers/race_age
    # the same through TFDS (array_record, no TensorFlow needed): add --tfds_dir ~/tensorflow_datasets
    # CelebA gender through TFDS
    python experiments/train_classifier.py --data celeba --tfds_dir ~/tensorflow_datasets --attributes gender \
        --out classifiers/gender

Use the folder with ``--config.attributes.<name>.classifier=classifiers/race_age``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairdiff_jax.attributes.classifier_io import UNIT_RANGE, save_classifier
from fairdiff_jax.attributes.mobilenet import MobileNetV3Large, init_variables
from fairdiff_jax.config import CLASSES
from fairdiff_jax.datasets import CelebAGender, FairFaceFiles, batches, fairface_tfds_source
from fairdiff_jax.errors import FairdiffError


def initial_variables(
    module: MobileNetV3Large, image_size: int, seed: int, init_checkpoint: str = ""
) -> dict[str, Any]:
    """Random variables, with the backbone (and ``classifier.0``) from a torchvision ImageNet checkpoint if given."""
    variables = init_variables(module, image_size, seed)
    if not init_checkpoint:
        return variables
    from fairdiff_jax.attributes.torchvision_convert import convert_torchvision_mobilenet, read_state_dict

    state = read_state_dict(init_checkpoint)
    rows = int(np.shape(state["classifier.3.weight"])[0]) if "classifier.3.weight" in state else 0
    _, pretrained = convert_torchvision_mobilenet(
        state, {"pretrained": rows}, width_multiplier=module.width_multiplier, source=init_checkpoint
    )
    params = {k: v for k, v in pretrained["params"].items() if k != "head_pretrained"}
    params.update({k: v for k, v in variables["params"].items() if k.startswith("head_")})
    return {"params": params, "batch_stats": pretrained["batch_stats"]}


def make_steps(module: MobileNetV3Large, optimizer: optax.GradientTransformation, labels: Sequence[str]):
    """``train_step(state, batch, key) -> (state, metrics)`` and ``eval_step(variables, batch) -> correct counts``."""

    def loss_fn(params, batch_stats, batch, key):
        logits, updates = module.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        losses = {n: optax.softmax_cross_entropy_with_integer_labels(logits[n], batch[n]).mean() for n in labels}
        return sum(losses.values()) / len(labels), (losses, updates["batch_stats"])

    @jax.jit
    def train_step(state, batch, key):
        params, batch_stats, opt_state = state
        grads, (losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(params, batch_stats, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), losses

    @jax.jit
    def eval_step(variables, batch):
        logits = module.apply(variables, batch["image"])
        return {n: jnp.sum(jnp.argmax(logits[n], -1) == batch[n]) for n in labels}

    return train_step, eval_step


def accuracy(eval_step, variables, eval_batches: Iterator[dict[str, np.ndarray]], labels) -> dict[str, float]:
    """Accuracy per attribute over one pass of ``eval_batches``."""
    correct, total = dict.fromkeys(labels, 0), 0
    for batch in eval_batches:
        counts = eval_step(variables, batch)
        correct = {n: correct[n] + int(counts[n]) for n in labels}
        total += len(batch["image"])
    return {n: correct[n] / max(total, 1) for n in labels}


def train_classifier(
    train_source: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    out: str,
    *,
    eval_source: Sequence[Mapping[str, Any]] | None = None,
    steps: int = 10_000,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    width_multiplier: float = 1.0,
    image_size: int = 224,
    init_checkpoint: str = "",
    eval_every: int = 1000,
    seed: int = 0,
    log=print,
) -> dict[str, float]:
    """Train heads ``labels`` on ``train_source`` (items with ``image`` and the label keys), write a classifier
    folder to ``out`` and return the final accuracy per attribute on ``eval_source`` (empty without one)."""
    unknown = [n for n in labels if n not in CLASSES]
    if unknown:
        raise FairdiffError(f"unknown attribute(s) {unknown}; choose from {sorted(CLASSES)}")
    module = MobileNetV3Large({n: len(CLASSES[n]) for n in labels}, width_multiplier=width_multiplier)
    variables = initial_variables(module, image_size, seed, init_checkpoint)
    schedule = optax.cosine_decay_schedule(lr, max(steps, 1))
    optimizer = optax.adamw(schedule, weight_decay=weight_decay)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    train_step, eval_step = make_steps(module, optimizer, labels)
    data = batches(train_source, batch_size, image_size=image_size, labels=labels, seed=seed, augment=True)
    key = jax.random.key(seed)

    def evaluate():
        if eval_source is None:
            return {}
        once = batches(eval_source, batch_size, image_size=image_size, labels=labels, shuffle=False, repeat=False)
        return accuracy(eval_step, {"params": state[0], "batch_stats": state[1]}, once, labels)

    start = time.perf_counter()
    for step in range(1, steps + 1):
        key, step_key = jax.random.split(key)
        state, losses = train_step(state, next(data), step_key)
        if step % max(eval_every // 10, 1) == 0 or step == steps:
            values = {n: float(v) for n, v in losses.items()}
            if not all(np.isfinite(v) for v in values.values()):
                raise FairdiffError(f"non-finite loss {values} at step {step}; lower --lr")
            log(json.dumps({"step": step, "loss": values, "seconds": round(time.perf_counter() - start, 1)}))
        if eval_every and step % eval_every == 0 and step != steps:
            log(json.dumps({"step": step, "accuracy": evaluate()}))
    result = evaluate()
    save_classifier(
        out,
        {"params": state[0], "batch_stats": state[1]},
        classes={n: CLASSES[n] for n in labels},
        width_multiplier=width_multiplier,
        input_size=image_size,
        mean=UNIT_RANGE,
        std=UNIT_RANGE,
        source=f"experiments/train_classifier.py, {steps} steps, accuracy {result}",
    )
    log(json.dumps({"saved": out, "accuracy": result}))
    return result


def _sources(args) -> tuple[Sequence, Sequence | None]:
    if args.data == "celeba":
        return CelebAGender(args.tfds_dir or None, "train"), CelebAGender(args.tfds_dir or None, "validation")
    if not args.data_root:
        raise FairdiffError("--data fairface needs --data_root (the folder with fairface_label_train.csv)")
    if args.tfds_dir:
        return tuple(fairface_tfds_source(args.data_root, args.tfds_dir, s) for s in ("train", "validation"))
    return FairFaceFiles(args.data_root, "train"), FairFaceFiles(args.data_root, "validation")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("fairface", "celeba"), required=True)
    parser.add_argument("--data_root", default="", help="FairFace folder: label CSVs and train/, val/ images")
    parser.add_argument("--tfds_dir", default="", help="TFDS data dir; FairFace is built there as array_record")
    parser.add_argument("--attributes", default="", help="comma-separated heads (fairface: race,age; celeba: gender)")
    parser.add_argument("--out", required=True, help="classifier folder to write")
    parser.add_argument("--init", default="", help="torchvision mobilenet_v3_large ImageNet checkpoint to start from")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--eval_every", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    labels = [a for a in args.attributes.split(",") if a] or (["gender"] if args.data == "celeba" else ["race", "age"])
    try:
        train_source, eval_source = _sources(args)
        train_classifier(
            train_source,
            labels,
            args.out,
            eval_source=eval_source,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            width_multiplier=args.width_multiplier,
            image_size=args.image_size,
            init_checkpoint=args.init,
            eval_every=args.eval_every,
            seed=args.seed,
        )
    except FairdiffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
