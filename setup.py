from setuptools import find_packages, setup

setup(
    name="adaptive_lr",
    version="0.1.0",
    description="ActiveLR optimizers and the GreedyLR scheduler for PyTorch, with fused kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["adaptive_lr", "adaptive_lr.*"]),
    install_requires=["torch>=2.4"],
)
