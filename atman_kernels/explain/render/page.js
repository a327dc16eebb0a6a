// The explanation page's behaviour. It reads the page's JSON block (render/page_data.py: the
// Explanation's to_dict() and its citations) and nothing else; no network, no library.
(function () {
  "use strict";
  // the page this script belongs to (a notebook may hold several); without currentScript
  // (a script run by a notebook front end) the last page so far is this one
  var pages = document.querySelectorAll(".atman-page");
  var root = document.currentScript ? document.currentScript.closest(".atman-page")
    : pages[pages.length - 1];
  var data = JSON.parse(root.querySelector("script.atman-data").textContent);
  var E = data.explanation;

  function num(x) {  // the Explanation's JSON numbers, non-finite ones as strings
    if (typeof x === "number") return x;
    return x === "Infinity" ? Infinity : x === "-Infinity" ? -Infinity : NaN;
  }
  function fmt(x) {
    return isFinite(x) ? String(parseFloat(x.toPrecision(6))) : String(x);
  }
  function peak(values) {
    var p = 0;
    values.forEach(function (x) { if (isFinite(x)) p = Math.max(p, Math.abs(x)); });
    return p;
  }
  function rgb(u) {  // render/common.py score_rgb: white at 0, red at +1, blue at -1
    var f = Math.round(255 * (1 - Math.abs(u)));
    return u >= 0 ? "rgb(255," + f + "," + f + ")" : "rgb(" + f + "," + f + ",255)";
  }
  function all(sel, within) {
    return Array.prototype.slice.call((within || root).querySelectorAll(sel));
  }

  var combined = E.scores.map(num);
  var rows = E.per_target.map(function (r) { return r.map(num); });
  var units = all(".tok[data-unit]");
  var info = root.querySelector(".rowinfo");
  var legendLo = root.querySelector(".legend.main .lo");
  var legendHi = root.querySelector(".legend.main .hi");

  // colour every unit of the text by one vector of scores (one per unit), scaled by its peak
  function paint(values, what) {
    var p = peak(values);
    units.forEach(function (el) {
      var v = values[Number(el.dataset.unit)];
      var u = p > 0 && isFinite(v) ? Math.max(-1, Math.min(1, v / p)) : 0;
      el.dataset.score = String(v);
      el.style.background = rgb(u);
      el.style.color = Math.abs(u) > 0.6 ? "#fff" : "";  // readable on a strong colour
      el.title = fmt(v) + " nats";
      el.setAttribute("aria-label", el.textContent + ": " + fmt(v) + " nats");
    });
    if (legendLo) legendLo.textContent = fmt(-p);
    if (legendHi) legendHi.textContent = "+" + fmt(p) + " nats";
    if (info) info.textContent = "showing: " + what;
  }

  var chosen = null;  // the selected target row, null = all targets (combined scores)
  function show(t) {
    if (t === null) {
      paint(combined, "all targets (combined score)");
      root.dataset.row = "all";
    } else {
      paint(rows[t], "target token " + t + " " + JSON.stringify(E.target_tokens[t]) +
            " (its row of the per-target matrix)");
      root.dataset.row = String(t);
    }
  }
  function select(t) {
    chosen = t;
    all("[data-target]").forEach(function (el) {
      el.setAttribute("aria-pressed", String(Number(el.dataset.target) === t));
    });
    show(t);
  }
  all("[data-target]").forEach(function (el) {
    var t = Number(el.dataset.target);
    el.addEventListener("mouseenter", function () { show(t); });
    el.addEventListener("mouseleave", function () { show(chosen); });
    el.addEventListener("click", function () { select(t); });
    el.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(t); }
    });
  });
  all("button.reset").forEach(function (b) {
    b.addEventListener("click", function () { select(null); });
  });

  // citations: the answer's sentences, each listing its top units (Explanation.citations)
  var citeList = root.querySelector(".cite-list");
  all("[data-cite]").forEach(function (el) {
    el.addEventListener("click", function () {
      var c = data.citations[Number(el.dataset.cite)];
      all("[data-cite]").forEach(function (o) {
        o.setAttribute("aria-pressed", String(o === el));
      });
      citeList.textContent = "";
      units.forEach(function (u) { u.classList.remove("cited"); });
      c.units.forEach(function (pair) {
        var li = document.createElement("li");
        var s = num(pair.score);
        li.dataset.unit = String(pair.index);
        li.dataset.score = String(s);
        li.textContent = JSON.stringify(E.spans[pair.index].text) + ": " + fmt(s) + " nats";
        citeList.appendChild(li);
        all('.tok[data-unit="' + pair.index + '"]').forEach(function (u) {
          u.classList.add("cited");
        });
      });
      citeList.dataset.cite = el.dataset.cite;
    });
  });

  // the tree of a joint design: coarse units, each expanding to the nodes refining it
  var treeBox = root.querySelector(".tree");
  function children(k) {
    var out = [];
    E.tree.forEach(function (n, j) { if (n.parent === k) out.push(j); });
    return out;
  }
  function nodeList(k) {
    var ul = document.createElement("ul");
    children(k).forEach(function (j) {
      var n = E.tree[j], s = num(n.score);
      var li = document.createElement("li");
      li.dataset.node = String(j);
      var label = document.createElement("span");
      label.className = "node";
      label.dataset.score = String(s);
      label.title = fmt(s) + " nats";
      label.setAttribute("aria-label", n.level + " " + JSON.stringify(n.span.text) + ": " +
                         fmt(s) + " nats");
      label.textContent = n.level + " " + JSON.stringify(n.span.text.slice(0, 80)) + " " +
                          fmt(s) + " nats";
      li.appendChild(label);
      if (n.refined) {
        var b = document.createElement("button");
        b.className = "toggle";
        b.textContent = "expand";
        b.setAttribute("aria-expanded", "false");
        var sub = null;
        b.addEventListener("click", function () {
          if (sub === null) { sub = nodeList(j); li.appendChild(sub); sub.hidden = true; }
          sub.hidden = !sub.hidden;
          b.setAttribute("aria-expanded", String(!sub.hidden));
          b.textContent = sub.hidden ? "expand" : "collapse";
        });
        li.appendChild(b);
      } else {
        var note = document.createElement("span");
        note.className = "unrefined";
        note.textContent = "not refined";
        li.appendChild(note);
      }
      ul.appendChild(li);
    });
    return ul;
  }
  if (treeBox && E.tree.length) treeBox.appendChild(nodeList(null));

  // the top-units table, sorted by a click on its score or position header
  all("table.top th button[data-sort]").forEach(function (b) {
    b.addEventListener("click", function () {
      var table = b.closest("table"), key = b.dataset.sort;
      var body = table.tBodies[0];
      var desc = key === "score";
      if (table.dataset.sorted === key) desc = table.dataset.desc !== "true";
      var trs = all("tr", body);
      trs.sort(function (x, y) {
        var a = Number(x.dataset[key]), c = Number(y.dataset[key]);
        return (desc ? c - a : a - c) || Number(x.dataset.index) - Number(y.dataset.index);
      });
      trs.forEach(function (tr) { body.appendChild(tr); });
      table.dataset.sorted = key;
      table.dataset.desc = String(desc);
      all("th", table).forEach(function (th) { th.removeAttribute("aria-sort"); });
      b.closest("th").setAttribute("aria-sort", desc ? "descending" : "ascending");
    });
  });

  // pictures: the map's opacity over the picture
  all("input.opacity").forEach(function (input) {
    var layer = input.closest("figure").querySelector(".map");
    function apply() { if (layer) layer.style.opacity = String(Number(input.value) / 100); }
    input.addEventListener("input", apply);
    apply();
  });

  select(null);
})();
