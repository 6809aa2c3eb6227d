"""Experiment configs: the schema (``schema``), loading with ``--config.*`` overrides (``loading``), checks
(``validate``)."""

from fairdiff_jax.config.loading import (
    apply_override,
    config_from_argv,
    leaf_keys,
    load_config,
    parse_value,
    plain_config,
    split_overrides,
    write_resolved_config,
)
from fairdiff_jax.config.schema import (
    CLASSES,
    DEFAULT_WORLD,
    adaptor_from_arg,
    attribute,
    attribute_names,
    base_config,
    parse_config_arg,
)
from fairdiff_jax.config.validate import (
    validate_config,
    validate_face_training,
    validate_target,
)

__all__ = [
    "CLASSES",
    "DEFAULT_WORLD",
    "adaptor_from_arg",
    "apply_override",
    "attribute",
    "attribute_names",
    "base_config",
    "config_from_argv",
    "leaf_keys",
    "load_config",
    "parse_config_arg",
    "parse_value",
    "plain_config",
    "split_overrides",
    "validate_config",
    "validate_face_training",
    "validate_target",
    "write_resolved_config",
]
