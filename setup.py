from setuptools import find_packages, setup

setup(
    name="adaptive_lr",
    version="0.1.0",
    description="ActiveLR optimizers and the GreedyLR scheduler for PyTorch, with fused kernels",
    python_requires=">=3.10",
    # kernels/ ships as adaptive_lr.kernels: a top-level `kernels` belongs to another PyPI project
    packages=find_packages(include=["adaptive_lr", "adaptive_lr.*"]) + ["adaptive_lr.kernels"],
    package_dir={"adaptive_lr.kernels": "kernels"},
    install_requires=["torch>=2.4"],
)
