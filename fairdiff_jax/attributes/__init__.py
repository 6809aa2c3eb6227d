"""Attribute classifiers, gradient-free face detection with differentiable crops and chips, the face-embedding network,
and CLIP / DINO features."""

from fairdiff_jax.attributes.classifier import (
    AttributeClassifier,
    ClassifierOutput,
    FaceAttributeClassifier,
    MultiHeadConvNet,
)
from fairdiff_jax.attributes.classifier_io import (
    ClassifierSpec,
    CombinedClassifier,
    WholeImageClassifier,
    load_attribute_classifiers,
    load_classifier,
    read_classifier_config,
    save_classifier,
)
from fairdiff_jax.attributes.detectors import (
    FACE_DETECTORS,
    OpenCVFaceDetector,
    detector_from_config,
    make_face_detector,
)
from fairdiff_jax.attributes.dlib_detect import DlibFaceDetector
from fairdiff_jax.attributes.face_chip import extract_face_chips
from fairdiff_jax.attributes.face_embedder import DlibFaceResNet, FaceEmbedder, load_face_embedder
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
from fairdiff_jax.attributes.mobilenet import MobileNetV3Large, init_variables
from fairdiff_jax.attributes.torchvision_convert import (
    convert_torchvision_mobilenet,
    import_torchvision_classifier,
    load_torchvision_mobilenet,
    to_torchvision_state_dict,
)
from fairdiff_jax.attributes.vision_features import (
    ImageEncoder,
    load_clip_image_encoder,
    load_dinov2_encoder,
)

__all__ = [
    "FACE_DETECTORS",
    "DlibFaceDetector",
    "DlibFaceResNet",
    "FaceEmbedder",
    "extract_face_chips",
    "load_face_embedder",
    "ClassifierSpec",
    "CombinedClassifier",
    "MobileNetV3Large",
    "OpenCVFaceDetector",
    "WholeImageClassifier",
    "convert_torchvision_mobilenet",
    "detector_from_config",
    "import_torchvision_classifier",
    "init_variables",
    "load_attribute_classifiers",
    "load_classifier",
    "load_torchvision_mobilenet",
    "make_face_detector",
    "read_classifier_config",
    "save_classifier",
    "to_torchvision_state_dict",
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
