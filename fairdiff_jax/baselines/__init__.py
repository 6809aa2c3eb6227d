"""The paper's comparison methods, each a pure transform of the prompts, the embeddings, the frozen U-Net
parameters or the guided noise prediction: ethical intervention, debiasVL, UCE and Fair Diffusion."""

from fairdiff_jax.baselines.class_words import DEFAULT_CLASS_WORDS, joint_class_words
from fairdiff_jax.baselines.debiasvl import (
    DebiasVLConfig,
    calibrated_projection,
    candidate_prompts,
    eos_embeddings,
    orthogonal_complement,
    project_embeddings,
    spurious_prompts,
)
from fairdiff_jax.baselines.ethical_intervention import EthicalInterventionConfig, intervene, prompt_subject
from fairdiff_jax.baselines.fair_diffusion import (
    FairDiffusionConfig,
    SemanticGuide,
    draw_directions,
    edit_prompts,
    fair_guided_output,
    semantic_guidance,
)
from fairdiff_jax.baselines.methods import (
    METHODS,
    BaselineSetup,
    FairGuidance,
    check_method,
    method_config,
    method_defaults,
    prepare_baseline,
)
from fairdiff_jax.baselines.uce import (
    UCEConfig,
    closed_form_kernel,
    cross_attention_modules,
    debias_targets,
    edit_rows,
    uce_debias,
    uce_edit,
)

__all__ = [
    "DEFAULT_CLASS_WORDS",
    "METHODS",
    "BaselineSetup",
    "FairGuidance",
    "check_method",
    "method_config",
    "method_defaults",
    "prepare_baseline",
    "DebiasVLConfig",
    "EthicalInterventionConfig",
    "FairDiffusionConfig",
    "SemanticGuide",
    "UCEConfig",
    "calibrated_projection",
    "candidate_prompts",
    "closed_form_kernel",
    "cross_attention_modules",
    "debias_targets",
    "draw_directions",
    "edit_prompts",
    "edit_rows",
    "eos_embeddings",
    "fair_guided_output",
    "intervene",
    "joint_class_words",
    "orthogonal_complement",
    "project_embeddings",
    "prompt_subject",
    "semantic_guidance",
    "spurious_prompts",
    "uce_debias",
    "uce_edit",
]
