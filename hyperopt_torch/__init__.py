"""hyperopt_torch: gradient-based hyperparameter optimisation by implicit differentiation."""

from .hvp import Batching
from .hypergrad import HypergradInfo, Hypergradient, implicit_hypergradient
from .ihvp import SOLVER_NAMES, ConjugateGradient, Exact, Identity, Minres, Neumann, NormalCG, Nystrom, make_solver
from .optim import HyperOptimizer
from .unrolled import InnerAdam, InnerSGD, UnrolledHypergradient, UnrolledInfo, adam_step, sgd_step, unrolled_hypergradient

__version__ = "0.1.0"

__all__ = [
    "HyperOptimizer",
    "implicit_hypergradient",
    "Hypergradient",
    "HypergradInfo",
    "Batching",
    "make_solver",
    "SOLVER_NAMES",
    "Nystrom",
    "ConjugateGradient",
    "Minres",
    "NormalCG",
    "Neumann",
    "Identity",
    "Exact",
    "unrolled_hypergradient",
    "UnrolledHypergradient",
    "UnrolledInfo",
    "InnerSGD",
    "sgd_step",
    "InnerAdam",
    "adam_step",
]
