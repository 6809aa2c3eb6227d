"""Distributional alignment: dynamic targets by expected optimal transport, L_align, and the regularisers."""

from fairdiff_jax.alignment.assignment import solve_assignment
from fairdiff_jax.alignment.face import (
    default_keep_confidence,
    face_loss_mask,
    face_realism_loss,
    keep_original_face,
    nearest_reference,
)
from fairdiff_jax.alignment.losses import (
    AlignmentOutput,
    alignment_cross_entropy,
    distributional_alignment,
    distributional_alignment_grouped,
)
from fairdiff_jax.alignment.semantic import (
    cosine_similarity,
    mismatch_factor,
    scale_face_gradient,
    scale_gradient,
    semantic_loss,
)
from fairdiff_jax.alignment.targets import (
    binary_expected_targets,
    binomial_cdf,
    dynamic_targets,
    dynamic_targets_grouped,
    expected_targets,
    sample_target_labels,
    transport_expectation,
    validate_target,
)

__all__ = [
    "AlignmentOutput",
    "alignment_cross_entropy",
    "binary_expected_targets",
    "binomial_cdf",
    "cosine_similarity",
    "distributional_alignment",
    "distributional_alignment_grouped",
    "dynamic_targets",
    "dynamic_targets_grouped",
    "expected_targets",
    "default_keep_confidence",
    "face_loss_mask",
    "face_realism_loss",
    "keep_original_face",
    "mismatch_factor",
    "nearest_reference",
    "sample_target_labels",
    "scale_face_gradient",
    "scale_gradient",
    "semantic_loss",
    "solve_assignment",
    "transport_expectation",
    "validate_target",
]
