"""fairdiff-jax: finetuning text-to-image diffusion models for fairness, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="fairdiff-jax",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of 'Finetuning Text-to-Image Diffusion Models for Fairness' (Shen et al., ICLR 2024)"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fairdiff_jax", "fairdiff_jax.*"]),
    include_package_data=True,
    package_data={"fairdiff_jax": ["data/*", "data/**/*"]},
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "diffusers==0.39.*",
        "transformers==4.57.*",
        "numpy>=1.26",
        "safetensors>=0.4",
        "Pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pot>=0.9.4",
            "ruff>=0.6",
            "scipy>=1.11",
            "tensorflow-datasets>=4.9.4",
            "importlib_resources>=6",
            "opencv-python-headless>=4.9,<5",
            "scikit-image>=0.22",
            "dlib-bin>=19.24",  # dlib's face detectors and the reference for the face-embedding parity tests
            "face-recognition-models>=0.3",  # dlib's trained .dat files (about 130 MB)
        ],
        "torch": ["torch==2.13.0", "peft>=0.13", "accelerate>=1.0"],
        "tfds": ["tensorflow-datasets>=4.9.4", "importlib_resources>=6"],
        # OpenCV 5 no longer ships the Haar cascades; dlib-bin: dlib's CNN / HOG face detectors and 5-point landmarks;
        # face-recognition-models: dlib's trained files (detector, landmarks, the face-recognition ResNet)
        "faces": ["opencv-python-headless>=4.9,<5", "dlib-bin>=19.24", "face-recognition-models>=0.3"],
    },
    entry_points={
        "console_scripts": ["fairdiff=fairdiff_jax.cli:main"],
        # the embedded toy world is a plug-in: the core names no toy paths
        "fairdiff_jax.worlds": ["toy = fairdiff_jax.toyworld.plugin:TOY_WORLD"],
        "fairdiff_jax.commands": ["demo = fairdiff_jax.toyworld.demo_cli:main"],
    },
)
