"""Notebook display: :func:`show` and the Explanation's ``_repr_html_`` (the HTML page)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .html import render_html
from .terminal import to_terminal

if TYPE_CHECKING:
    from ..explanation import Explanation


def show(expl: Explanation, **kwargs: Any) -> None:
    """Display in a notebook (HTML) or print to the terminal."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        print(to_terminal(expl))
        return
    if get_ipython() is None:
        print(to_terminal(expl))
        return
    display(HTML(render_html(expl, **kwargs)))


def _notebook_html(self: Explanation) -> str:
    return render_html(self)


def attach_notebook_display() -> None:
    """Give :class:`Explanation` its notebook rendering (``_repr_html_``) from here, so that
    the Explanation module itself never imports its renderers."""
    from ..explanation import Explanation

    Explanation._repr_html_ = _notebook_html  # type: ignore[attr-defined]
