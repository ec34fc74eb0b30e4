"""Package megascale; the top-level kernels/ directory installs as megascale.kernels."""

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["megascale", "megascale.*"])]
packages.append("megascale.kernels")

setup(
    name="megascale",
    version="0.1.0",
    description="Large-scale LLM pretraining with DeepSpeed, tied blocks, untying and trace fine-tuning",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megascale.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "sentencepiece>=0.2",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "filelock",
    ],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        "triton": ["triton"],
        "dev": ["pytest", "tensorboard"],
    },
)
