(function () {
"use strict";
// Renders the comparison embedded in #diff-data. Every string from the data
// goes into the page with textContent, never as markup. The DOM helpers
// (h, s, byId, failPage) are in dom.js.
var body = document.body;
function fail(msg) { failPage("diff", msg); }
function num(v) {
  if (v === null || v === undefined) return null;
  if (v === "NaN") return NaN;
  if (v === "inf") return Infinity;
  if (v === "-inf") return -Infinity;
  return v;
}
function fmt(v) {
  v = num(v);
  if (v === null) return "-";
  if (!isFinite(v)) return String(v);
  if (v === 0) return "0";
  return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4 ? v.toPrecision(3) : v.toExponential(2);
}
function place(p) {
  return "position " + p.position + ", " + (p.layer === null ? "" : "layer " + p.layer + " ") + p.stage +
    " (error " + fmt(p.error) + " by " + p.measure + ")";
}
// Colour of an error: green at or below 1e-7, through yellow at the
// tolerance, to red two decades above it; NaN and inf are black.
function colour(e, tol) {
  e = num(e);
  if (e === null) return "#eef0f3";
  if (!isFinite(e)) return "#111";
  var lo = -7, mid = Math.log10(Math.max(tol, 1e-12)), hi = mid + 2;
  var x = Math.log10(Math.max(e, 1e-12));
  var t = x <= mid ? Math.max(0, (x - lo) / Math.max(mid - lo, 1e-6)) * 0.5 : 0.5 + Math.min(1, (x - mid) / (hi - mid)) * 0.5;
  var hue = 120 * (1 - t);
  return "hsl(" + hue.toFixed(0) + ",70%," + (t < 0.5 ? 80 - 30 * t : 65 - 25 * (t - 0.5)).toFixed(0) + "%)";
}
var rendered = {};
try {
  var D = JSON.parse(byId("diff-data").textContent);
  var tol = num(D.tolerance);
  var v = byId("verdict-text");
  v.appendChild(h("p", {}, "A: " + D.a.name + " (" + D.a.kind + ", " + D.a.positions + " positions)  \u00b7  B: " + D.b.name + " (" + D.b.kind + ", " + D.b.positions + " positions)"));
  v.appendChild(h("p", { "class": D.first_divergence ? "warn" : "" }, D.first_divergence ?
    "First divergence: " + place(D.first_divergence) + " > tolerance " + fmt(D.tolerance) :
    "No divergence: every error is within the tolerance " + fmt(D.tolerance)));
  if (D.largest_jump) v.appendChild(h("p", {}, "Largest jump: " + place(D.largest_jump) + ", from " + fmt(D.largest_jump.before) + " before it"));
  if (D.contexts_differ_from !== null) v.appendChild(h("p", {}, "The runs read different tokens from position " + D.contexts_differ_from + " on."));
  if (D.only_a.length || D.only_b.length) v.appendChild(h("p", { "class": "note" }, "Skipped: " + D.only_a.length + " positions only in A, " + D.only_b.length + " only in B."));
  if (D.top1_agreement !== null) v.appendChild(h("p", {}, "Top-1 agreement " + (100 * num(D.top1_agreement)).toFixed(1) + "%" + (D.mean_kl !== null ? ", KL(A\u2016B) mean " + fmt(D.mean_kl) + ", max " + fmt(D.max_kl) + " nats" : "")));

  // Heatmap: layers (rows, 0 at the top) x shared positions (columns).
  var P = D.positions, L = D.heatmap.length, cw = Math.max(4, Math.min(22, Math.floor(1100 / Math.max(P.length, 1)))), ch = 14;
  var left = 56, top0 = 18;
  var svg = s("svg", { width: left + cw * P.length + 8, height: top0 + ch * L + 24, viewBox: "0 0 " + (left + cw * P.length + 8) + " " + (top0 + ch * L + 24) });
  var cells = 0;
  var pat = s("pattern", { id: "hatch", width: 4, height: 4, patternUnits: "userSpaceOnUse" });
  pat.appendChild(s("path", { d: "M0,4 L4,0", stroke: "#999", "stroke-width": 1 }));
  var defs = s("defs"); defs.appendChild(pat); svg.appendChild(defs);
  for (var l = 0; l < L; l++) {
    svg.appendChild(s("text", { x: left - 6, y: top0 + ch * l + ch - 3, "text-anchor": "end" }, "L" + l));
    for (var c = 0; c < P.length; c++) {
      var e = D.heatmap[l][c];
      var differ = D.contexts_differ_from !== null && P[c] >= D.contexts_differ_from;
      var r = s("rect", { "class": "cell", x: left + cw * c, y: top0 + ch * l, width: cw, height: ch, fill: differ ? "url(#hatch)" : colour(e, tol) });
      r.appendChild(s("title", {}, "position " + P[c] + ", layer " + l + ": " + (differ ? "not compared" : fmt(e))));
      svg.appendChild(r);
      cells++;
    }
  }
  var step = Math.max(1, Math.ceil(P.length / 20));
  for (var c2 = 0; c2 < P.length; c2 += step) svg.appendChild(s("text", { x: left + cw * c2 + cw / 2, y: top0 + ch * L + 14, "text-anchor": "middle" }, String(P[c2])));
  var fd = D.first_divergence;
  if (fd && fd.layer !== null) {
    var col = P.indexOf(fd.position);
    if (col >= 0) svg.appendChild(s("rect", { "class": "sel", id: "divergence-mark", x: left + cw * col, y: top0 + ch * fd.layer, width: cw, height: ch }));
  }
  byId("heat-plot").appendChild(svg);
  var legend = byId("heat-legend");
  [1e-7, tol / 10, tol, tol * 10, tol * 100].forEach(function (x) {
    var item = h("span");
    item.appendChild(h("span", { "class": "sw", style: "background:" + colour(x, tol) }));
    item.appendChild(document.createTextNode(fmt(x)));
    legend.appendChild(item);
  });
  rendered.heatmap = cells;

  // Tables.
  var t = h("table");
  var hr = h("tr");
  ["layer", "stage", "max error", "at position", "by", "mean error"].forEach(function (x, i) { hr.appendChild(h("th", { "class": i < 2 ? "l" : "" }, x)); });
  t.appendChild(hr);
  D.sites.forEach(function (row) {
    var tr = h("tr");
    var over = !(num(row.max_error) <= tol);
    tr.appendChild(h("td", { "class": "l" }, row.layer === null ? "" : String(row.layer)));
    tr.appendChild(h("td", { "class": "l" }, row.stage));
    tr.appendChild(h("td", { "class": over ? "warn" : "" }, fmt(row.max_error)));
    tr.appendChild(h("td", {}, String(row.position)));
    tr.appendChild(h("td", {}, row.measure));
    tr.appendChild(h("td", {}, fmt(row.mean_error)));
    t.appendChild(tr);
  });
  byId("site-table").appendChild(t);
  rendered.sites = D.sites.length;
  var lt = h("table");
  var lh = h("tr");
  ["layer", "max error", "at stage", "attention top-k shared", "entropy diff", "lens rank change"].forEach(function (x) { lh.appendChild(h("th", {}, x)); });
  lt.appendChild(lh);
  D.layers.forEach(function (row) {
    var tr = h("tr");
    tr.appendChild(h("td", {}, String(row.layer)));
    tr.appendChild(h("td", {}, fmt(row.max_error)));
    tr.appendChild(h("td", {}, row.worst_stage));
    tr.appendChild(h("td", {}, row.attention_overlap === null ? "-" : (100 * num(row.attention_overlap)).toFixed(0) + "%"));
    tr.appendChild(h("td", {}, fmt(row.attention_entropy_diff)));
    tr.appendChild(h("td", {}, row.lens_rank_change === null ? "-" : String(row.lens_rank_change)));
    lt.appendChild(tr);
  });
  byId("layer-table").appendChild(lt);
  rendered.layers = D.layers.length;
  body.setAttribute("data-rendered", Object.keys(rendered).map(function (k) { return k + ":" + rendered[k]; }).join(","));
  if (body.getAttribute("data-status") === "loading") body.setAttribute("data-status", "ok");
} catch (err) {
  fail(err && err.stack ? err.stack : String(err));
}
})();
