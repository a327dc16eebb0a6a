"""AtMan explanations: the explainer, its result, rendering and batching helpers."""

from .conceptual import cosine_similarity_matrix, suppression_factors
from .explainer import AtManExplainer, model_kind
from .explanation import Explanation

__all__ = [
    "AtManExplainer",
    "Explanation",
    "cosine_similarity_matrix",
    "model_kind",
    "suppression_factors",
]
