"""The data the interactive HTML page reads: the Explanation's own ``to_dict()`` and the few
things only Python computes (the answer's citations), as one JSON text for a
``<script type="application/json">`` block.

The page's script (``page.js``) reads nothing else: every score, row, tree node and citation it
shows comes from here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..explanation import Explanation

CITE_K = 3  # units listed per answer sentence


def page_data(expl: Explanation, k: int = CITE_K) -> dict[str, Any]:
    """{"explanation": ``expl.to_dict()``, "cite_k": k, "citations": [``Citation.to_dict()``
    of each answer sentence, :meth:`Explanation.citations` with ``k``]}. No citations when the
    answer has nothing to cite (an empty answer, no prompt or image unit)."""
    try:
        citations = [c.to_dict() for c in expl.citations(k)]
    except ValueError:
        citations = []
    return {"explanation": expl.to_dict(), "cite_k": k, "citations": citations}


def page_data_json(expl: Explanation, k: int = CITE_K) -> str:
    """:func:`page_data` as JSON text safe inside a ``<script>`` element (no ``</``, no
    ``<!--``: every ``<`` is written as the JSON escape ``\\u003c``)."""
    text = json.dumps(page_data(expl, k), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
