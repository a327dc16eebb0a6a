"""The explanation page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, ``make browser``) driven through selenium opens the page from disk
(``file://``), clicks, types and reads the DOM, and every number it reads is checked against
the Explanation the page was made from (its per-target rows, citations, tree, top units).

The explanations are real ones, from the tiny random models of the other tests: a
hierarchical one (tree and citations), a plain token-level one with several target tokens, a
surrogate estimate, a contrastive one and an image-text one with its picture.

Without the browser the tests are skipped, except under CI (``CI=true``): there a missing
browser fails them (:func:`browser_gate`), so CI can never silently skip them.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
from _brute import tiny_llama, trained_bpe, unit_scale_
from PIL import Image

import atman_kernels.hf  # noqa: F401  (registers "atman")
from atman_kernels.explain import AtManExplainer, Explanation, Span
from atman_kernels.explain.render import score_rgb, to_html

BROWSER = pytest.mark.browser


def browser_gate(which: Callable[[str], str | None] | None = None,
                 env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(chromium, chromedriver) paths found by ``which`` (default :func:`shutil.which`).

    Either missing, or selenium not importable: fail when ``env["CI"]`` is "true" (CI must run
    the browser tests), else skip saying what is missing and that ``make browser`` installs it.
    """
    which = shutil.which if which is None else which
    chromium = which("chromium") or which("chromium-browser")
    driver = which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver))
               if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        what = f"{' and '.join(missing)} not found (`make browser` installs the browser)"
        if env.get("CI") == "true":
            pytest.fail(f"CI=true and {what}: a skip would hide the browser tests",
                        pytrace=False)
        pytest.skip(what)
    return chromium, driver


# ---------------------------------------------------------------------- the gate itself
def _outcome(env: Mapping[str, str]) -> str:
    """What :func:`browser_gate` does: "ok", "skip: <why>" or "fail: <why>" (caught here, so a
    skip where a failure is due fails this test instead of skipping it)."""
    try:
        browser_gate(env=env)
    except pytest.skip.Exception as e:
        return f"skip: {e.msg}"
    except pytest.fail.Exception as e:
        return f"fail: {e.msg}"
    return "ok"


def test_gate_skips_without_a_browser_but_fails_under_ci(monkeypatch):
    found = {"chromium": "/usr/bin/chromium", "chromedriver": "/usr/bin/chromedriver"}
    monkeypatch.setattr(shutil, "which", lambda name: found.get(name))
    assert browser_gate(env={}) == ("/usr/bin/chromium", "/usr/bin/chromedriver")
    assert _outcome({"CI": "true"}) == "ok"
    for gone in ("chromium", "chromedriver"):
        monkeypatch.setattr(shutil, "which",
                            lambda name, gone=gone: None if name.startswith(gone) else
                            found.get(name))
        for env in ({}, {"CI": "false"}, {"CI": "1"}):
            assert _outcome(env).startswith(f"skip: {gone} not found"), env
        assert _outcome({"CI": "true"}).startswith(f"fail: CI=true and {gone} not found")


# ---------------------------------------------------------------------- the explanations
PARAGRAPHS = [
    ["Anna Berg runs the city museum.", "She was born in Hamburg.", "Her brother lives in Rome.",
     "The museum opened in 1990.", "It holds old maps."],
    ["Tom Berg teaches music.", "He grew up in Paris.", "He plays the violin.",
     "His school is small.", "Anna visits him often."],
]
DOC = "\n\n".join(" ".join(p) for p in PARAGRAPHS)
TARGET = " Hamburg. She"
SHORT = "Anna Berg runs the city museum. She was born in"
VOCAB = 300


@pytest.fixture(scope="module")
def explainer():
    tok = trained_bpe([DOC + TARGET] * 20, VOCAB)
    model = unit_scale_(tiny_llama(5, vocab=VOCAB, positions=256), seed=5)
    return AtManExplainer(model, tok, progress=False)


@pytest.fixture(scope="module")
def hierarchical(explainer) -> Explanation:
    expl = explainer.explain(DOC, TARGET, granularity="sentence", design="hierarchical",
                             budget=7)
    assert expl.tree and any(n.refined for n in expl.tree)
    assert any(not n.refined and expl.children(k) == [] and n.level == "paragraph"
               for k, n in enumerate(expl.tree))  # an unrefined coarse node
    assert len(expl.citations(3)) >= 2  # the answer has two sentences
    return expl


@pytest.fixture(scope="module")
def plain(explainer) -> Explanation:
    """Token units, several target tokens (the first ones explained units too)."""
    expl = explainer.explain(SHORT, TARGET, granularity="token")
    assert expl.per_target.shape[0] >= 3 and not expl.tree
    return expl


@pytest.fixture(scope="module")
def contrastive() -> Explanation:
    prompt, target, foil = [3, 17, 42, 5, 17, 9, 30, 11, 8, 25, 17, 4], [7, 19, 2], [23, 40]
    expl = AtManExplainer(tiny_llama(5), progress=False).explain(prompt, target, contrast=foil)
    expl.settings.update(target=" Paris", contrast=" Lyon")
    return expl


@pytest.fixture(scope="module")
def pictured() -> Explanation:
    from test_image_text import PROMPT, tiny_llava
    from test_image_text import TARGET as IMAGE_TARGET
    from test_image_text_output import _picture

    model, processor = tiny_llava(11)
    expl = AtManExplainer(model, processor, progress=False).explain(
        (PROMPT, [_picture()]), IMAGE_TARGET)
    assert expl.images is not None and any(s.source == "image" for s in expl.spans)
    return expl


def page_json(page: str) -> dict:
    """The page's one JSON data block, parsed."""
    import json

    start = page.index('<script type="application/json" class="atman-data">')
    body = page[page.index(">", start) + 1:page.index("</script>", start)]
    assert page.count('type="application/json"') == 1
    return json.loads(body)


def test_the_page_reads_one_json_block_the_explanations_own(plain, hierarchical):
    """Not in a browser: the data block is ``to_dict()`` and ``citations(3)``, nothing else,
    and the notebook shows the same page."""
    for expl in (plain, hierarchical):
        page = to_html(expl)
        data = page_json(page)
        assert set(data) == {"explanation", "citations", "cite_k"} and data["cite_k"] == 3
        assert data["explanation"] == json_round(expl.to_dict())
        assert data["citations"] == json_round([c.to_dict() for c in expl.citations(3)])
        assert expl._repr_html_() == page
    # text that would end the script element early stays inside the JSON
    spans = [Span("a </script><b>", 0, 14, (0,)), Span(" <!--x", 14, 20, (1,))]
    odd = Explanation(tokens=[], scores=torch.tensor([1.0, -1.0]),
                      per_target=torch.tensor([[1.0, -1.0]]), target_tokens=[" </script>"],
                      kind="causal_lm", spans=spans, prompt="a </script><b> <!--x")
    page = to_html(odd)
    assert page_json(page)["explanation"]["prompt"] == odd.prompt
    assert page.count("</script>") == 2  # the data block's end and the script's


def json_round(value):
    import json

    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def classified() -> Explanation:
    """An image classifier's explanation (tiny ViT) with its picture."""
    from _brute import tiny_vit

    torch.manual_seed(7)
    pixels = torch.randn(1, 3, 16, 16)
    expl = AtManExplainer(tiny_vit(), progress=False, batch_size=5).explain(pixels, 1)
    assert expl.patch_grid == (4, 4) and expl.image is not None
    return expl


# ---------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = browser_gate()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1400", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def open_page(browser, expl: Explanation, path) -> None:
    """Write the page, open it from disk, and check its script ran without an error."""
    to_html(expl, path)
    browser.get(path.as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    assert browser.find_element("css selector", ".atman-page").get_attribute("data-row") == "all"


def css(browser, selector: str):
    return browser.find_elements("css selector", selector)


def shown(browser) -> dict[int, float]:
    """unit index -> the score the text shows for it now (data-score; title and aria-label
    carry the same number), every unit drawn in the text."""
    out = {}
    for el in css(browser, ".text .tok[data-unit]"):
        i, value = int(el.get_attribute("data-unit")), float(el.get_attribute("data-score"))
        title = float(el.get_attribute("title").removesuffix(" nats"))
        assert title == pytest.approx(value, rel=1e-5, abs=1e-12)
        assert el.get_attribute("aria-label").endswith(f"{el.get_attribute('title')}")
        out[i] = value
    return out


def background(el) -> tuple[int, int, int]:
    text = el.value_of_css_property("background-color")  # "rgba(r, g, b, a)"
    return tuple(int(float(x)) for x in text[text.index("(") + 1:-1].split(",")[:3])


def assert_shows(browser, expl: Explanation, values: torch.Tensor) -> None:
    """The text shows exactly ``values`` (one per unit), each unit coloured on their peak."""
    got = shown(browser)
    text_units = [i for i, s in enumerate(expl.spans) if s.source != "image"]
    assert sorted(got) == text_units
    values = values.to(torch.float64)
    for i, v in got.items():
        assert v == pytest.approx(float(values[i]), rel=1e-9, abs=1e-12)
    peak = float(values.abs().max())
    for el in css(browser, ".text .tok[data-unit]"):
        want = score_rgb(max(-1.0, min(1.0, float(values[int(el.get_attribute("data-unit"))])
                                       / peak)))
        assert np.abs(np.subtract(background(el), want)).max() <= 1


# ---------------------------------------------------------------------- the tests
@BROWSER
def test_clicking_or_hovering_a_target_token_shows_its_row(browser, plain, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, plain, tmp_path / "p.html")
    assert_shows(browser, plain, plain.scores)  # combined scores by default
    targets = css(browser, "[data-target]")
    assert [int(t.get_attribute("data-target")) for t in targets] == list(
        range(len(plain.target_tokens)))
    assert "".join(t.text for t in targets) == plain.answer.strip() or \
        "".join(t.get_attribute("textContent") for t in targets) == plain.answer
    for i, el in enumerate(targets):
        el.click()
        assert_shows(browser, plain, plain.per_target[i])
        assert el.get_attribute("aria-pressed") == "true"
        assert f"target token {i} " in css(browser, ".rowinfo")[0].text
    # hovering another token shows its row while the pointer is there, then the chosen one
    ActionChains(browser).move_to_element(targets[0]).perform()
    assert_shows(browser, plain, plain.per_target[0])
    ActionChains(browser).move_to_element(css(browser, "h1")[0]).perform()
    assert_shows(browser, plain, plain.per_target[len(targets) - 1])
    css(browser, "button.reset")[0].click()
    assert_shows(browser, plain, plain.scores)
    assert css(browser, ".rowinfo")[0].text == "showing: all targets (combined score)"


@BROWSER
def test_keyboard_focus_and_enter_or_space_select_a_token(browser, plain, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(browser, plain, tmp_path / "k.html")
    keys = ActionChains(browser)
    keys.send_keys(Keys.TAB).send_keys(Keys.TAB).perform()  # the second target token
    active = browser.switch_to.active_element
    assert active.get_attribute("data-target") == "1"
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    assert_shows(browser, plain, plain.per_target[1])
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT) \
        .send_keys(Keys.SPACE).perform()
    assert browser.switch_to.active_element.get_attribute("data-target") == "0"
    assert_shows(browser, plain, plain.per_target[0])


@BROWSER
def test_clicking_an_answer_sentence_lists_its_citations(browser, hierarchical, tmp_path):
    open_page(browser, hierarchical, tmp_path / "c.html")
    cites = hierarchical.citations(3)
    buttons = css(browser, "button.cite")
    assert [b.get_attribute("textContent") for b in buttons] == [c.text for c in cites]
    for n in reversed(range(len(cites))):  # the last first: the list is replaced, not appended
        buttons[n].click()
        items = css(browser, ".cite-list li")
        assert [int(li.get_attribute("data-unit")) for li in items] == [i for i, _ in
                                                                         cites[n].units]
        for li, (_, score) in zip(items, cites[n].units, strict=True):
            assert float(li.get_attribute("data-score")) == pytest.approx(score, rel=1e-9)
        cited = {int(el.get_attribute("data-unit")) for el in css(browser, ".tok.cited")}
        assert cited == {i for i, _ in cites[n].units}
    # the same as cite() of each sentence's range
    for c in cites:
        assert hierarchical.cite(c.start, c.end, 3).units == c.units


@BROWSER
def test_expanding_a_coarse_node_shows_exactly_its_children(browser, hierarchical, tmp_path):
    expl = hierarchical
    open_page(browser, expl, tmp_path / "t.html")

    def listed(parent_li) -> list[int]:
        """The node indices listed, visible, directly under a node (None: the top)."""
        sel = ".tree > ul > li" if parent_li is None else ":scope > ul > li"
        within = browser if parent_li is None else parent_li
        items = within.find_elements("css selector", sel)
        return [int(li.get_attribute("data-node")) for li in items if li.is_displayed()]

    assert listed(None) == expl.children(None)
    queue = [(k, browser.find_element("css selector", f'.tree li[data-node="{k}"]'))
             for k in expl.children(None)]
    expanded = 0
    while queue:
        k, li = queue.pop(0)
        node = expl.tree[k]
        label = li.find_element("css selector", ":scope > .node")
        assert float(label.get_attribute("data-score")) == pytest.approx(node.score, rel=1e-9)
        assert node.level in label.text
        if not node.refined:
            assert li.find_element("css selector", ":scope > .unrefined").text == "not refined"
            assert li.find_elements("css selector", ":scope > button.toggle") == []
            continue
        toggle = li.find_element("css selector", ":scope > button.toggle")
        assert toggle.get_attribute("aria-expanded") == "false" and listed(li) == []
        toggle.click()
        expanded += 1
        assert toggle.get_attribute("aria-expanded") == "true"
        assert listed(li) == expl.children(k)
        queue += [(j, li.find_element("css selector", f':scope > ul > li[data-node="{j}"]'))
                  for j in expl.children(k)]
    assert expanded == sum(n.refined for n in expl.tree) >= 1
    # collapsing hides the children again
    first = next(k for k in expl.children(None) if expl.tree[k].refined)
    li = browser.find_element("css selector", f'.tree > ul > li[data-node="{first}"]')
    li.find_element("css selector", ":scope > button.toggle").click()
    assert listed(li) == []


@BROWSER
def test_the_top_units_table_sorts_by_score_and_position(browser, hierarchical, tmp_path):
    open_page(browser, hierarchical, tmp_path / "s.html")
    top = hierarchical.top(10)

    def table() -> list[tuple[int, float, int]]:
        return [(int(r.get_attribute("data-index")), float(r.get_attribute("data-score")),
                 int(r.get_attribute("data-position")))
                for r in css(browser, "table.top tbody tr")]

    by_position = sorted(top, key=lambda t: (t[1].positions[0], t[0]))
    css(browser, 'table.top button[data-sort="position"]')[0].click()
    assert [i for i, _, _ in table()] == [i for i, _, _ in by_position]
    assert [p for _, _, p in table()] == sorted(p for _, _, p in table())
    css(browser, 'table.top button[data-sort="score"]')[0].click()
    assert [i for i, _, _ in table()] == [i for i, _, _ in top]  # best first, as top()
    scores = [s for _, s, _ in table()]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    css(browser, 'table.top button[data-sort="score"]')[0].click()  # again: lowest first
    assert [s for _, s, _ in table()] == sorted(scores)


@BROWSER
def test_contrastive_page_shows_fact_and_foil(browser, contrastive, tmp_path):
    open_page(browser, contrastive, tmp_path / "f.html")
    lines = css(browser, ".answer")
    assert len(lines) == 2
    fact = "".join(el.get_attribute("textContent")
                   for el in lines[0].find_elements("css selector", "[data-target]"))
    assert fact == contrastive.answer
    assert lines[1].find_element("css selector", ".foil").get_attribute(
        "textContent") == contrastive.contrast
    assert lines[1].text.startswith("rather than")
    assert "rather than ' Lyon'" in css(browser, "h1")[0].text
    legend = css(browser, ".legend.main")[0].text
    assert "supports ' Lyon'" in legend and "supports ' Paris'" in legend
    assert_shows(browser, contrastive, contrastive.scores)
    css(browser, '[data-target="1"]')[0].click()
    assert_shows(browser, contrastive, contrastive.per_target[1])


@BROWSER
def test_a_surrogate_estimate_says_so_with_its_fit(browser, explainer, tmp_path):
    expl = explainer.explain(SHORT, TARGET, granularity="word", design="sampled", budget=24)
    assert expl.is_estimate
    open_page(browser, expl, tmp_path / "e.html")
    note = css(browser, ".estimate")
    assert len(note) == 1 and note[0].is_displayed()
    assert expl.estimate["method"] in note[0].text and "lds = " in note[0].text
    assert f"{expl.estimate['lds']:.3g}" in note[0].text
    # an exact explanation has no such note
    exact = explainer.explain(SHORT, TARGET, granularity="word")
    open_page(browser, exact, tmp_path / "x.html")
    assert css(browser, ".estimate") == []


@BROWSER
@pytest.mark.parametrize("which", ["pictured", "classified"])
def test_the_opacity_slider_blends_the_map_over_the_picture(browser, which, request,
                                                            tmp_path):
    from selenium.webdriver.common.keys import Keys

    expl = request.getfixturevalue(which)
    open_page(browser, expl, tmp_path / "i.html")
    layer = css(browser, ".blend img.map")[0]
    blend = css(browser, ".blend")[0]
    slider = css(browser, "input.opacity")[0]
    assert slider.get_attribute("type") == "range"

    def picture() -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(blend.screenshot_as_png)).convert("RGB"),
                          dtype=np.int64)

    assert float(layer.value_of_css_property("opacity")) == 1.0
    full = picture()
    slider.send_keys(Keys.HOME)
    assert float(layer.value_of_css_property("opacity")) == 0.0
    bare = picture()
    for _ in range(50):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert float(layer.value_of_css_property("opacity")) == pytest.approx(0.5)
    half = picture()
    # without the map the picture alone shows (the image-text one is green); the map
    # changes it, half as much at 0.5
    if which == "pictured":
        assert (bare[..., 1] > bare[..., 0]).mean() > 0.95
    moved, midway = np.abs(full - bare).sum(), np.abs(half - bare).sum()
    assert moved > 0 and 0.3 * moved < midway < 0.7 * moved


@BROWSER
def test_screenshot_is_not_blank_and_shows_the_legend(browser, plain, tmp_path):
    open_page(browser, plain, tmp_path / "v.html")
    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 50
    assert (shot.min(-1) < 250).mean() > 0.02  # not a white page
    legend = css(browser, ".legend.main")[0]
    assert legend.is_displayed()
    rect = legend.rect
    inner = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    assert rect["width"] > 0 and rect["height"] > 0
    assert rect["x"] >= 0 and rect["y"] >= 0
    assert rect["x"] + rect["width"] <= inner[0] and rect["y"] + rect["height"] <= inner[1]
    bar = legend.find_element("css selector", ".bar").rect
    x0, y0 = int(bar["x"]), int(bar["y"])
    strip = shot[y0 + 2:y0 + int(bar["height"]) - 2, x0 + 2:x0 + int(bar["width"]) - 2]
    assert (strip == (255, 0, 0)).all(-1).any() or (
        (strip[..., 0] > 240) & (strip[..., 1] < 20)).any()  # its red end
    assert ((strip[..., 2] > 240) & (strip[..., 0] < 20)).any()  # its blue end
    peak = float(plain.scores.abs().max())
    assert legend.find_element("css selector", ".hi").text == f"+{peak:.6g} nats" or \
        float(legend.find_element("css selector", ".hi").text.split()[0]) == pytest.approx(
            peak, rel=1e-5)
