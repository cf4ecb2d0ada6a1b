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
    extras_require={
        "recipes": ["torchvision", "matplotlib", "numpy"],
        "unrolled": ["higher"],
        "test": ["pytest", "numpy", "matplotlib", "scipy"],
    },
    license="MIT",
)
