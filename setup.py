from setuptools import find_packages, setup

setup(
    name="hyperopt_torch",
    version="0.1.0",
    description="Gradient-based hyperparameter optimisation by implicit differentiation (Nyström, CG, Neumann) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hyperopt_torch", "hyperopt_torch.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "tqdm"],
    # torchvision is pinned to the release paired with torch 2.13.0: an unpinned one
    # would pull a newer torch (and its CUDA wheels) over the installed one.
    extras_require={
        "recipes": ["torchvision==0.28.0", "pillow", "matplotlib", "numpy"],
        "test": ["pytest", "numpy", "matplotlib"],
        # Optional, for hyperopt_torch.interop and the porting tests (skipped without them); tested with
        # torchopt 0.7.3, higher 0.2.1 and betty-ml 0.1.1. Install with --no-deps to keep the installed torch.
        "peers": ["torchopt>=0.7.3", "optree", "graphviz", "higher>=0.2.1", "betty-ml>=0.1.1"],
    },
    license="MIT",
)
