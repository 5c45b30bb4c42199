"""Distribution "sparse-attn": the Python layer ``sparse_attn`` and the kernels ``sparse_attn_kernels``.

The kernels live in ``kernels/`` in the source tree and install as ``sparse_attn_kernels``
(never as a top-level ``kernels``, a different PyPI package that transformers and diffusers import).
"""

from setuptools import find_packages, setup

kernel_packages = ["sparse_attn_kernels"] + [
    "sparse_attn_kernels." + name for name in find_packages("kernels")
]

setup(
    name="sparse-attn",
    version="0.1.0",
    description="Block-sparse and stripe-sparse attention kernels (Triton) with a pattern layer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["sparse_attn", "sparse_attn.*"]) + kernel_packages,
    package_dir={"sparse_attn_kernels": "kernels"},
    install_requires=["torch>=2.5", "triton>=3.0", "einops"],
    extras_require={
        # the integration tests run real model classes; versions pinned to the ones tested
        "test": ["pytest>=7", "numpy", "matplotlib", "tqdm",
                 "transformers==5.24.0", "diffusers==0.42.1", "gguf==0.19.0", "accelerate==1.15.0"],
        "bench": ["matplotlib", "tqdm", "numpy"],
        "integrations": ["transformers>=5.0", "diffusers>=0.42"],
    },
    entry_points={"console_scripts": ["sparse-attn=sparse_attn.cli:main"]},
    license="Apache-2.0",
)
