"""Attribute classifiers, gradient-free face detection with differentiable crops, and CLIP / DINO features."""

from fairdiff_jax.attributes.classifier import (
    AttributeClassifier,
    ClassifierOutput,
    FaceAttributeClassifier,
    MultiHeadConvNet,
)
from fairdiff_jax.attributes.faces import FaceCrops, FaceDetections, FaceDetector, FacePipeline, WholeImageDetector
from fairdiff_jax.attributes.image_ops import (
    ARCFACE_TEMPLATE_112,
    align_faces,
    bilinear_sample,
    crop_and_resize,
    expand_square_boxes,
    model_input,
    similarity_transform,
    warp_affine,
)
from fairdiff_jax.attributes.vision_features import (
    ImageEncoder,
    load_clip_image_encoder,
    load_dinov2_encoder,
)

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "AttributeClassifier",
    "ClassifierOutput",
    "FaceAttributeClassifier",
    "FaceCrops",
    "FaceDetections",
    "FaceDetector",
    "FacePipeline",
    "ImageEncoder",
    "MultiHeadConvNet",
    "WholeImageDetector",
    "align_faces",
    "bilinear_sample",
    "crop_and_resize",
    "expand_square_boxes",
    "load_clip_image_encoder",
    "load_dinov2_encoder",
    "model_input",
    "similarity_transform",
    "warp_affine",
]
