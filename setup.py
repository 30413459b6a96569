"""Build rrd_kernels from source. Pure-Python package; the CUDA extension (csrc/) is built when nvcc is found."""
from setuptools import find_packages, setup

setup(
    name="rrd_kernels",
    version="0.1.0",
    description="Fused GPU kernels for Relational Representation Distillation (RRD) losses",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rrd_kernels", "rrd_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.2"],
        # numpy < 2.3: triton 3.6's CPU interpreter fails with newer numpy.
        "test": ["pytest>=7", "triton>=3.2; platform_system == 'Linux'", "numpy<2.3", "scikit-learn", "matplotlib", "tqdm"],
    },
)
