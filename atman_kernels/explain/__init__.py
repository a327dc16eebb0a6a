"""AtMan explanations: the explainer, its result, units, rendering and batching helpers.

Data flows one way: units (:mod:`.units`) -> factor rows (:mod:`.conceptual`) -> the variant
engine (:mod:`.engine`) running a task (:mod:`.tasks`) -> :class:`Explanation` -> renderers
(:mod:`.render`). :class:`AtManExplainer` (:mod:`.explainer`) is the front end that builds the
units, the task and the targets for each kind of model.
"""

from .conceptual import cosine_similarity_matrix, suppression_factors, unit_factors
from .explainer import AtManExplainer, model_kind
from .explanation import Explanation
from .render import attach_notebook_display, save_png, show, to_html, to_terminal, view_image
from .units import GRANULARITIES, Span, prompt_spans, split_sentences, token_spans

attach_notebook_display()

__all__ = [
    "GRANULARITIES",
    "AtManExplainer",
    "Explanation",
    "Span",
    "cosine_similarity_matrix",
    "model_kind",
    "prompt_spans",
    "save_png",
    "show",
    "split_sentences",
    "suppression_factors",
    "to_html",
    "to_terminal",
    "token_spans",
    "unit_factors",
    "view_image",
]
